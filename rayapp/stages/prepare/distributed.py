"""Prepare without a gather (``data.workers`` > 0): the same rows, rejects and manifest as the
driver path in stage.py, with the rows staying on the workers. The driver sees one summary per
block, per dedupe partition and per shard (spread.py does its arithmetic), and at most
``data.holdout_rows`` held-out candidates at a time."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict

from rayapp.config import RunConfig
from rayapp.core import storage, work_items
from rayapp.core.errors import InputDataError
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import HoldoutRecord, PreparedManifest, ShardRecord
from rayapp.stages.prepare import parallel, spread
from rayapp.stages.prepare.common import (
    check_holdout_size,
    check_source,
    finish,
    plan_sources,
    remove_stale_shards,
    run_tokenizer,
    shard_name,
)
from rayapp.stages.prepare.parallel import work_file
from rayapp.stages.prepare.readers import UnreadableSourceError
from rayapp.stages.prepare.records import Reject, training_text

log = get_logger(__name__)


def prepare_spread(cfg: RunConfig, layout: RunLayout) -> PreparedManifest:
    """The spread path; its work folder (a copy of the data, several times over) is removed
    whether it succeeds or fails."""
    from rayapp.core.raycluster import init_ray

    init_ray(cfg)
    work = storage.join(layout.prepared, ".work")
    storage.remove_dir(work)
    try:
        return _prepare_spread(cfg, layout, work)
    finally:
        storage.remove_dir(work)


def _prepare_spread(cfg: RunConfig, layout: RunLayout, work: str) -> PreparedManifest:
    t_start = time.perf_counter()
    workers, stall = cfg.data.workers, cfg.ray.stall_timeout_s
    jobs, reports = plan_sources(cfg)
    n_blocks = len(jobs)
    partitions = spread.partitions_for(n_blocks, workers)

    # 1. every block read, normalised and templated; its outcomes and dedupe keys written
    done = work_items.step_timer(log, "prepare")

    reads = parallel.run_items(parallel.read_block, [
        {"g": g, "work": work, "partitions": partitions,
         "job": {**job, "block": asdict(job["block"]), "template": job["template"].model_dump()}}
        for g, job in enumerate(jobs)], workers, "the source-reading tasks", stall)
    for r in reads:
        if r["error"]:
            raise UnreadableSourceError(r["error"])
    done(f"{n_blocks} blocks read")
    sources = [job["block"].source for job in jobs]
    offsets, cuts = spread.starts_and_cuts(sources, [r["outcomes"] for r in reads], [r["span"] for r in reads],
                                           [src.limit for src in cfg.data.sources])
    storage.write_json(storage.join(work, "blocks.json"), [
        {"source": s, "path": reports[s].path, "name": reports[s].name, "row_kind": r["row_kind"], "offset": off,
         "cut": cut} for s, r, off, cut in zip(sources, reads, offsets, cuts)])

    # 2. duplicates, by a hash-partitioned pass over the ids (the first occurrence in source order is kept)
    if cfg.data.dedupe:
        found = parallel.run_items(parallel.find_repeats, [{"work": work, "p": p} for p in range(partitions)],
                                   workers, "the de-duplication tasks", stall)
        log.info("de-duplicated %d rows in %d partitions: %d repeats", sum(f["keys"] for f in found), partitions,
                 sum(f["repeats"] for f in found))
        done("de-duplication")

    # 3. each block's rows numbered, limited and de-duplicated: its kept rows and rejects written
    resolved = parallel.run_items(parallel.resolve_block, [
        {"work": work, "g": g, "partitions": partitions, "dedupe": cfg.data.dedupe} for g in range(n_blocks)],
        workers, "the row-resolving tasks", stall)
    for s, report in enumerate(reports):
        mine = [r for g, r in enumerate(resolved) if sources[g] == s]
        for r in mine:
            report.rows_read += r["rows_read"]
            report.rows_ok += r["rows_ok"]
            report.rejected.update(r["rejected"])
        first = next((Reject(**r["first_reject"]) for r in mine if r["first_reject"]), None)
        check_source(report, first)
    done("rows resolved")

    # 4. the tokenizer (the tiny one is trained on the kept rows, streamed a block at a time)
    with_rows = [g for g, r in enumerate(resolved) if r["rows_ok"]]

    def texts():
        for g in with_rows:
            for row in storage.read_parquet(work_file(work, "kept", g), ["prompt", "output", "messages"]).to_pylist():
                yield training_text(row)

    tok_src, tokenizer, template, template_kind = run_tokenizer(
        cfg, texts, any(r["conversations"] for r in resolved))
    done("tokenizer")

    # 5. the kept rows tokenized by an actor pool that loads the tokenizer once per actor
    t_tok = time.perf_counter()
    n_hold = cfg.data.holdout_rows
    tokenized = parallel.run_items(parallel.TokenizeBlocks, [
        {"work": work, "g": g, "path": reports[sources[g]].path, "row_kind": reads[g]["row_kind"]} for g in with_rows],
        workers, "the tokenizer actor pool", stall,
        fn_constructor_kwargs=dict(tokenizer=tok_src, trust_remote_code=cfg.models.reference.trust_remote_code,
                                   max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                                   chat_template=template, template=cfg.data.template.model_dump(),
                                   holdout_rows=n_hold, holdout_seed=cfg.data.holdout_seed))
    tok_seconds = time.perf_counter() - t_tok
    done("tokenized")
    counts: Counter = Counter()
    rows_of = [0] * n_blocks
    for g, t in zip(with_rows, tokenized):
        counts.update(t["counts"])
        rows_of[g] = t["rows"]
    if not sum(rows_of):
        raise InputDataError("no rows left after tokenization; see the rejects file")

    # 6. the held-out split: the smallest seeded hashes of the ids among every block's candidates
    held: dict[int, list[int]] = {}
    if n_hold:
        check_holdout_size(n_hold, sum(t["eligible"] for t in tokenized))
        for _key, g, i in spread.smallest(_holdout_candidates(work, [g for g, t in zip(with_rows, tokenized)
                                                                      if t["eligible"]]), n_hold):
            held.setdefault(g, []).append(i)
        held = {g: sorted(rows) for g, rows in sorted(held.items())}

    # 7. the shards and the held-out file, written by tasks from the blocks' tokenized rows
    pieces = spread.shard_pieces([rows_of[g] - len(held.get(g, [])) for g in range(n_blocks)], cfg.data.shard_rows)
    items = [{"work": work, "dest": layout.prepared_file(shard_name(i)),
              "pieces": [{"g": g, "lo": lo, "hi": hi, "rows": rows_of[g], "drop": held.get(g, [])}
                         for g, lo, hi in shard]} for i, shard in enumerate(pieces)]
    if held:
        items.append({"work": work, "dest": layout.holdout,
                      "pieces": [{"g": g, "take": rows} for g, rows in held.items()]})
    old = set(storage.list_files(layout.prepared, ".parquet"))
    written = parallel.run_items(parallel.write_rows, items, workers, "the shard-writing tasks", stall)
    shards = [ShardRecord(file=shard_name(i), rows=w["rows"], first_id=w["first_id"])
              for i, w in enumerate(written[:len(pieces)])]
    holdout = None
    if held:
        w = written[-1]
        holdout = HoldoutRecord(path=layout.holdout, rows=w["rows"], ids_sha256=w["ids_sha256"])
    elif storage.exists(layout.holdout):
        storage.remove(layout.holdout)
    remove_stale_shards(layout, old, [s.file for s in shards])
    done(f"{len(shards)} shards written")

    # 8. the rejects file and the hash of the training ids, written by a task
    n_rejects = sum(sum(r["rejected"].values()) for r in resolved) + counts["template_errors"] + \
        counts["dropped_too_long"]
    (ids_sha256,) = parallel.run_items(parallel.finish_files, [{
        "work": work, "rejects": layout.rejects, "shards": [layout.prepared_file(s.file) for s in shards]}],
        1, "the task writing the rejects file and hashing the ids", stall)
    done("rejects and ids hash")
    train = written[:len(pieces)]
    return finish(cfg, tok_src=tok_src, tokenizer=tokenizer, template=template, template_kind=template_kind,
                  reports=reports, counts=counts, rejected=n_rejects, shards=shards, holdout=holdout,
                  tokens=sum(w["tokens"] for w in train), response_tokens=sum(w["response_tokens"] for w in train),
                  ids_sha256=ids_sha256, tok_seconds=tok_seconds, t_start=t_start, rejects_path=layout.rejects)


def _holdout_candidates(work: str, blocks: list[int]):
    """Each block's held-out candidates (key, block, row), read a block at a time."""
    for g in blocks:
        t = storage.read_parquet(work_file(work, "holdout-keys", g))
        yield [(k, g, r) for k, r in zip(t["key"].to_pylist(), t["row"].to_pylist())]
