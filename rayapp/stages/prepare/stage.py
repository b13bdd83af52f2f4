"""The prepare stage: sources -> normalised, templated, tokenized Parquet shards, a held-out split,
a rejects file and the manifest."""

from __future__ import annotations

import os
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from rayapp.config import RunConfig
from rayapp.core import storage
from rayapp.core.errors import InputDataError
from rayapp.core.hashing import fingerprint, sha256_bytes, sha256_file
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import HoldoutRecord, PreparedManifest, ShardRecord
from rayapp.core.stage import Stage, StageContext
from rayapp.core.template import PromptFormatter
from rayapp.ml.models import registry
from rayapp.ml.models.packaged import is_packaged
from rayapp.ml.tokenize import tokenize_rows
from rayapp.stages.prepare.blocks import BlockResult, process_block
from rayapp.stages.prepare.common import (
    _resolve_source_path,
    check_holdout_size,
    check_source,
    finish,
    plan_sources,
    remove_stale_shards,
    run_tokenizer,
    shard_name,
)
from rayapp.stages.prepare.readers import UnreadableSourceError, source_identity
from rayapp.stages.prepare.records import (  # noqa: F401
    SHARD_SCHEMA,
    Reject,
    SourceReport,
    _plain_text,
    holdout_key,
    reason_key,
    rejects_jsonl,
    tokenized_row,
    tokenizer_item,
    training_text,
)

log = get_logger(__name__)

def read_sources(cfg: RunConfig) -> tuple[list[dict], list[Reject], list[SourceReport]]:
    """Every source, block by block, in this process. The outcomes are walked in source order:
    lines are numbered, each source's ``limit`` applied, and duplicates dropped (the first
    occurrence is kept). With ``data.workers`` the spread path (distributed.py) does the same
    without gathering the rows; both give the same rows and rejects."""
    t0 = time.perf_counter()
    jobs, reports = plan_sources(cfg)
    results = _process_in_order(jobs, cfg)
    rows: list[dict] = []
    rejects: list[Reject] = []
    seen: dict[str, str] = {}
    for i, (src, report) in enumerate(zip(cfg.data.sources, reports)):
        offset = 0
        for res in (r for r in results if r.block.source == i):
            if res.error:
                raise UnreadableSourceError(res.error)
            for o in res.outcomes:
                if src.limit is not None and report.rows_read >= src.limit:
                    break
                report.rows_read += 1
                line = o.row + offset
                if o.reason is None and cfg.data.dedupe and o.id in seen:
                    o.reason = f"duplicate row (first seen at {seen[o.id]}), id {o.id}"
                    o.raw = None
                if o.reason is not None:
                    rejects.append(Reject(report.path, o.row_kind, line, o.field, o.reason, o.raw))
                    report.rejected[reason_key(o.reason)] += 1
                    continue
                seen[o.id] = f"{report.path}:{o.row_kind} {line}"
                rows.append(dict(file=report.path, row_kind=o.row_kind, id=o.id, instruction=o.instruction,
                                 input=o.input, output=o.output, source=report.name, source_row=line,
                                 prompt=o.prompt, messages=o.messages))
                report.rows_ok += 1
            offset += res.span
        check_source(report, next((r for r in rejects if r.file == report.path), None))
    log.info("read %d blocks in %.1fs on the driver", len(jobs), time.perf_counter() - t0)
    return rows, rejects, reports


def _process_in_order(jobs: list[dict], cfg: RunConfig) -> list[BlockResult]:
    """The blocks in this process, in order; a source's blocks stop once its limit is read."""
    results: list[BlockResult] = []
    read: Counter = Counter()
    for job in jobs:
        block, limit = job["block"], job["max_rows"]
        left = None if limit is None else limit - read[block.source]
        if left is not None and left <= 0:
            continue
        res = process_block(**{**job, "max_rows": left})
        read[block.source] += len(res.outcomes)
        results.append(res)
    return results


def _tokenizer_identity(cfg: RunConfig) -> str:
    """The tiny tokenizer is trained from the data (already in the fingerprint); any other one is
    identified by its tokenizer.json when it is a local folder, else by its name and the revision
    its files are staged at (a hub tokenizer: registry.ensure_tokenizer)."""
    name = cfg.models.tokenizer or cfg.models.reference.name_or_path
    if name == registry.TINY:
        return f"tiny:vocab={cfg.models.reference.tiny.vocab_size}"
    tok_file = os.path.join(storage.local_path(name), "tokenizer.json")
    if not storage.is_remote(name) and os.path.isfile(tok_file):
        return "sha256:" + sha256_file(tok_file)
    return f"{name}@{registry.tokenizer_revision(cfg) or 'default'}"


class PrepareStage(Stage):
    name = "prepare"
    folder = "prepared"
    help = "load, normalise, template and tokenize the data into Parquet shards"
    manifest_type = PreparedManifest

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement

        return [placement.preparing(cfg)]

    def uses_ray(self, cfg: RunConfig) -> bool:
        return bool(cfg.data.workers)  # without workers, prepare reads and tokenizes in the driver

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs=None) -> str:
        sources = []
        for src in cfg.data.sources:
            path = _resolve_source_path(src, quiet=True)
            sources.append({"path": path, "identity": source_identity(path, src.format), "limit": src.limit})
        return fingerprint(data=cfg.data.content(), sources=sources, tokenizer=registry.tokenizer_source(cfg),
                           tokenizer_identity=_tokenizer_identity(cfg))

    def outputs_complete(self, manifest: PreparedManifest, layout: RunLayout) -> bool:
        files = manifest.shard_paths(layout) + ([manifest.holdout.path] if manifest.holdout else [])
        # a packaged model's tokenizer is a name (converted into the node's cache on use), not a path
        tokenizer_there = is_packaged(manifest.tokenizer) or storage.exists(manifest.tokenizer)
        return all(storage.exists(f) for f in files) and tokenizer_there

    def run(self, ctx: StageContext) -> PreparedManifest:
        return prepare(ctx.cfg, ctx.layout)

    def done_detail(self, m: PreparedManifest) -> dict:
        return {"rows": m.rows, "rejected": m.rejected}

    def summary(self, m: PreparedManifest, layout: RunLayout) -> list[str]:
        held = f", {m.holdout.rows} held out for eval" if m.holdout else ""
        chats = (f" ({m.conversations} conversations, {m.chat_template} chat template, {m.turns_dropped} with "
                 "earliest turns dropped)") if m.conversations else ""
        return [f"{m.rows} training rows{chats}{held}, {m.rejected} rejected ({layout.rejects}), {m.truncated} "
                f"truncated, {m.no_response_tokens} with no response tokens"]


def holdout_order(ids: list[str], seed: int) -> list[int]:
    """Row positions ordered by a seeded hash of their ids: the first N form the held-out split,
    the same rows on every run and machine, whatever order the sources list them in."""
    keys = [holdout_key(seed, rid) for rid in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


def prepare(cfg: RunConfig, layout: RunLayout) -> PreparedManifest:
    if cfg.data.workers:
        from rayapp.stages.prepare.distributed import prepare_spread

        return prepare_spread(cfg, layout)
    t_start = time.perf_counter()
    rows, rejects, reports = read_sources(cfg)
    tok_src, tokenizer, template, template_kind = run_tokenizer(
        cfg, lambda: (training_text(r) for r in rows), any(r["messages"] is not None for r in rows))

    t_tok = time.perf_counter()
    fmt = PromptFormatter(cfg.data.template)
    counts: Counter = Counter()
    tokens = tokenize_rows(tokenizer, [tokenizer_item(r, fmt, tokenizer.eos_token) for r in rows],
                           cfg.data.max_length, cfg.data.truncation, template)
    kept = []
    for row, tk in zip(rows, tokens):
        out = tokenized_row(row, tk, row["file"], row["row_kind"], cfg.data.max_length, cfg.data.truncation, counts)
        (rejects if isinstance(out, Reject) else kept).append(out)
    tok_seconds = time.perf_counter() - t_tok
    if not kept:
        raise InputDataError("no rows left after tokenization; see the rejects file")
    table = pa.Table.from_pylist(kept, schema=SHARD_SCHEMA)
    del kept

    # the held-out split: rows with response tokens, by a seeded hash of their ids
    holdout = None
    n_hold = cfg.data.holdout_rows
    if n_hold:
        eligible = [i for i, n in enumerate(table["n_response_tokens"].to_pylist()) if n > 0]
        check_holdout_size(n_hold, len(eligible))
        ids = table["id"].to_pylist()
        order = holdout_order([ids[i] for i in eligible], cfg.data.holdout_seed)
        held = sorted(eligible[j] for j in order[:n_hold])
        held_set = set(held)
        held_table = table.take(pa.array(held, pa.int64()))
        table = table.take(pa.array([i for i in range(table.num_rows) if i not in held_set], pa.int64()))
        storage.write_parquet(layout.holdout, held_table)
        holdout = HoldoutRecord(path=layout.holdout, rows=held_table.num_rows,
                                ids_sha256=sha256_bytes("\n".join(held_table["id"].to_pylist()).encode()))
    elif storage.exists(layout.holdout):
        storage.remove(layout.holdout)

    n_rows = table.num_rows
    old = set(storage.list_files(layout.prepared, ".parquet"))
    shards = []
    for i, lo in enumerate(range(0, n_rows, cfg.data.shard_rows)):
        part = table.slice(lo, cfg.data.shard_rows)
        storage.write_parquet(layout.prepared_file(shard_name(i)), part)
        shards.append(ShardRecord(file=shard_name(i), rows=part.num_rows, first_id=part["id"][0].as_py()))
    remove_stale_shards(layout, old, [s.file for s in shards])
    storage.write_text(layout.rejects, rejects_jsonl(rejects))
    return finish(cfg, tok_src=tok_src, tokenizer=tokenizer, template=template, template_kind=template_kind,
                  reports=reports, counts=counts, rejected=len(rejects), shards=shards, holdout=holdout,
                  tokens=int(pa.compute.sum(table["n_tokens"]).as_py() or 0),
                  response_tokens=int(pa.compute.sum(table["n_response_tokens"]).as_py() or 0),
                  ids_sha256=sha256_bytes("\n".join(table["id"].to_pylist()).encode()),
                  tok_seconds=tok_seconds, t_start=t_start, rejects_path=layout.rejects)


