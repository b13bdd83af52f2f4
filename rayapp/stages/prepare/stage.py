"""The prepare stage: sources -> normalised, templated, tokenized Parquet shards, a held-out split,
a rejects file and the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from rayapp.config import RunConfig, SourceConfig
from rayapp.core import storage
from rayapp.core.chat import chat_template, has_generation_blocks
from rayapp.core.errors import InputDataError
from rayapp.core.hashing import fingerprint, sha256_bytes, sha256_file
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import HoldoutRecord, PreparedManifest, ShardRecord, SourceRecord
from rayapp.core.stage import Stage, StageContext
from rayapp.core.template import PromptFormatter
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_tokenizer
from rayapp.ml.models.packaged import is_packaged
from rayapp.ml.tokenize import tokenize_rows
from rayapp.stages.prepare.blocks import BlockResult, detect, plan_blocks, process_block
from rayapp.stages.prepare.readers import UnreadableSourceError, source_identity

log = get_logger(__name__)

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("prompt", pa.string()),
        # a conversation's turns (roles system/user/assistant); null for Alpaca-style rows
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


@dataclass
class Reject:
    file: str
    row_kind: str
    row: int
    field: str | None
    reason: str
    raw: str | None = None


@dataclass
class _Row:
    file: str
    row_kind: str
    id: str
    instruction: str
    input: str
    output: str
    source: str
    source_row: int
    prompt: str | None
    messages: list[dict] | None = None


@dataclass
class SourceReport:
    path: str
    name: str
    schema: str
    identity: str
    rows_read: int = 0
    rows_ok: int = 0
    rejected: Counter = field(default_factory=Counter)


def _resolve_source_path(src: SourceConfig, quiet: bool = False) -> str:
    if src.fallback and not storage.exists(src.path) and src.format != "hf":
        if not quiet:
            log.info("%s not found; using the fallback %s", src.path, src.fallback)
        return src.fallback
    return src.path


def _reason_key(reason: str) -> str:
    """Group reject reasons for the summary ("field 'output' is empty (empty response)" etc.)."""
    return reason.split(":")[0] if reason.startswith(("malformed JSON", "invalid UTF-8")) else reason.split(" (first")[0]


def _source_name(src: SourceConfig, path: str) -> str:
    return src.name or os.path.basename(path.rstrip("/")).split(".")[0]


def read_sources(cfg: RunConfig) -> tuple[list[_Row], list[Reject], list[SourceReport]]:
    """Every source, block by block (stages/prepare/blocks.py): in this process, or as Ray Data tasks when
    ``data.workers`` > 0. The driver then walks the outcomes in source order: it numbers the lines,
    applies each source's ``limit``, and drops duplicates (the first occurrence is kept), so both
    ways give the same rows and rejects."""
    t0 = time.perf_counter()
    block_bytes = int(cfg.data.block_mb * 2**20)
    reports: list[SourceReport] = []
    jobs: list[dict] = []
    for i, src in enumerate(cfg.data.sources):
        path = _resolve_source_path(src)
        blocks = plan_blocks(i, path, src.format, src.split, block_bytes)
        schema, detected_at = (src.schema_, (0, 0)) if src.schema_ != "auto" else detect(blocks)
        reports.append(SourceReport(path=path, name=_source_name(src, path), schema=schema or src.schema_,
                                    identity=source_identity(path, src.format)))
        jobs += [dict(block=b, schema=schema, detected_at=detected_at, max_chars=cfg.data.max_chars,
                      template=cfg.data.template, max_rows=src.limit) for b in blocks]
    if cfg.data.workers:
        from rayapp.core.raycluster import init_ray
        from rayapp.stages.prepare.parallel import process_blocks

        init_ray(cfg)
        results = process_blocks(jobs, cfg.data.workers, stall_s=cfg.ray.stall_timeout_s)
    else:
        results = _process_in_order(jobs, cfg)
    rows: list[_Row] = []
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
                    report.rejected[_reason_key(o.reason)] += 1
                    continue
                seen[o.id] = f"{report.path}:{o.row_kind} {line}"
                rows.append(_Row(report.path, o.row_kind, o.id, o.instruction, o.input, o.output, report.name,
                                 line, o.prompt, o.messages))
                report.rows_ok += 1
            offset += res.span
        path = report.path
        if report.rows_read and not report.rows_ok:
            first = next((r for r in rejects if r.file == path), None)
            detail = f"; first: {first.row_kind} {first.row}: {first.reason}" if first else ""
            raise InputDataError(f"{path}: no usable rows ({report.rows_read} read, all rejected{detail})")
        if report.rows_read == 0:
            raise InputDataError(f"{path}: no rows")
        log.info("read %s: %d rows, %d ok, %d rejected (%s)", path, report.rows_read, report.rows_ok,
                 sum(report.rejected.values()), report.schema)
    where = f"{cfg.data.workers} Ray Data workers" if cfg.data.workers else "the driver"
    log.info("read %d blocks in %.1fs on %s", len(jobs), time.perf_counter() - t0, where)
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


def holdout_order(ids: list[str], seed: int) -> list[int]:
    """Row positions ordered by a seeded hash of their ids: the first N form the held-out split,
    the same rows on every run and machine, whatever order the sources list them in."""
    keys = [hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest() for rid in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


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


def _plain_text(messages: list[dict]) -> str:
    """A conversation as text for training the tiny tokenizer (before any chat template exists)."""
    return "".join(f"### {m['role'].title()}:\n{m['content']}\n\n" for m in messages)


def prepare(cfg: RunConfig, layout: RunLayout) -> PreparedManifest:
    t_start = time.perf_counter()
    rows, rejects, reports = read_sources(cfg)
    fmt = PromptFormatter(cfg.data.template)

    def training_texts():
        for r in rows:
            yield r.prompt + r.output if r.messages is None else _plain_text(r.messages)

    tok_src = registry.ensure_tokenizer(cfg, training_texts)
    tokenizer = load_tokenizer(tok_src, trust_remote_code=cfg.models.reference.trust_remote_code)
    eos = tokenizer.eos_token
    n_conversations = sum(r.messages is not None for r in rows)
    template, template_kind = chat_template(tokenizer, cfg.data.template.chat) if n_conversations else (None, None)
    if n_conversations:
        how = "its assistant masks" if has_generation_blocks(template) else "rendered turn boundaries"
        log.info("%d conversations: %s chat template, labels from %s", n_conversations, template_kind, how)

    t_tok = time.perf_counter()
    kept_cols: dict[str, list] = {n: [] for n in SHARD_SCHEMA.names}
    counts: Counter = Counter()
    items = [{"prompt": r.prompt, "response": fmt.response(r.output, eos)} if r.messages is None
             else {"messages": r.messages} for r in rows]
    if cfg.data.workers:
        from rayapp.stages.prepare.parallel import tokenize

        tokens = tokenize(items, tok_src, cfg.models.reference.trust_remote_code, cfg.data.max_length,
                          cfg.data.truncation, template, cfg.data.workers, stall_s=cfg.ray.stall_timeout_s)
    else:
        tokens = tokenize_rows(tokenizer, items, cfg.data.max_length, cfg.data.truncation, template)
    for row, tk in zip(rows, tokens):
        if tk.error:
            rejects.append(Reject(row.file, row.row_kind, row.source_row, "messages", tk.error))
            counts["template_errors"] += 1
            continue
        prompt = row.prompt if row.messages is None else tk.prompt
        if tk.truncated and cfg.data.truncation == "drop":
            rejects.append(Reject(row.file, row.row_kind, row.source_row, None,
                                  f"too long: {tk.full_length} tokens > max_length {cfg.data.max_length} "
                                  "(truncation: drop)"))
            counts["dropped_too_long"] += 1
            continue
        counts["truncated"] += tk.truncated
        counts["turns_dropped"] += tk.turns_dropped > 0
        counts["no_response_tokens"] += tk.n_response_tokens == 0
        counts["conversations"] += row.messages is not None
        for name, value in (
            ("id", row.id), ("instruction", row.instruction), ("input", row.input), ("output", row.output),
            ("source", row.source), ("source_row", row.source_row), ("prompt", prompt), ("messages", row.messages),
            ("input_ids", tk.input_ids), ("labels", tk.labels), ("n_tokens", len(tk.input_ids)),
            ("n_response_tokens", tk.n_response_tokens), ("truncated", tk.truncated),
        ):
            kept_cols[name].append(value)
    tok_seconds = time.perf_counter() - t_tok
    if not kept_cols["id"]:
        raise InputDataError("no rows left after tokenization; see the rejects file")
    table = pa.Table.from_pydict(kept_cols, schema=SHARD_SCHEMA)

    # the held-out split: rows with response tokens, by a seeded hash of their ids
    holdout = None
    n_hold = cfg.data.holdout_rows
    if n_hold:
        eligible = [i for i, n in enumerate(kept_cols["n_response_tokens"]) if n > 0]
        if 2 * n_hold > len(eligible):
            raise InputDataError(
                f"data.holdout_rows={n_hold} would hold out at least half of the {len(eligible)} usable rows; "
                "lower it (e.g. --set data.holdout_rows=0 for none)")
        order = holdout_order([kept_cols["id"][i] for i in eligible], cfg.data.holdout_seed)
        held = sorted(eligible[j] for j in order[:n_hold])
        held_set = set(held)
        held_table = table.take(pa.array(held, pa.int64()))
        table = table.take(pa.array([i for i in range(table.num_rows) if i not in held_set], pa.int64()))
        storage.write_parquet(layout.holdout, held_table)
        holdout = HoldoutRecord(path=layout.holdout, rows=held_table.num_rows,
                                ids_sha256=sha256_bytes("\n".join(held_table["id"].to_pylist()).encode()))
    elif storage.exists(layout.holdout):
        storage.remove(layout.holdout)

    # Replace the old shards only after the new ones are written; stale names are removed last.
    n_rows = table.num_rows
    old = set(storage.list_files(layout.prepared, ".parquet"))
    shards = []
    for i, lo in enumerate(range(0, n_rows, cfg.data.shard_rows)):
        part = table.slice(lo, cfg.data.shard_rows)
        fname = f"shard-{i:05d}.parquet"
        storage.write_parquet(layout.prepared_file(fname), part)
        shards.append(ShardRecord(file=fname, rows=part.num_rows, first_id=part["id"][0].as_py()))
        old.discard(layout.prepared_file(fname))
    for stale in old:
        storage.remove(stale)

    storage.write_text(layout.rejects, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects))
    reject_reasons: Counter = Counter()
    for rep in reports:
        reject_reasons.update(rep.rejected)
    if counts["dropped_too_long"]:
        reject_reasons["too long (truncation: drop)"] += counts["dropped_too_long"]
    if counts["template_errors"]:
        reject_reasons["chat template cannot render the conversation"] += counts["template_errors"]
    rows_read = sum(r.rows_read for r in reports)
    kept = n_rows + (holdout.rows if holdout else 0)
    if rows_read != kept + len(rejects):
        raise AssertionError(f"{rows_read} rows read but {kept} kept and {len(rejects)} rejected")
    manifest = PreparedManifest(
        tokenizer=tok_src,
        vocab_size=len(tokenizer),
        eos_token=eos,
        template=cfg.data.template.model_dump(),
        max_length=cfg.data.max_length,
        truncation=cfg.data.truncation,
        sources=[SourceRecord(path=r.path, name=r.name, schema=r.schema, identity=r.identity, rows_read=r.rows_read,
                              rows_ok=r.rows_ok, rejected=dict(r.rejected)) for r in reports],
        rows_read=rows_read,
        rows=n_rows,
        rejected=len(rejects),
        reject_reasons=dict(reject_reasons),
        truncated=counts["truncated"],
        conversations=counts["conversations"],
        chat_template=template_kind,
        chat_template_sha256=sha256_bytes(template.encode())[:16] if template else None,
        turns_dropped=counts["turns_dropped"],
        no_response_tokens=counts["no_response_tokens"],
        tokens=int(pa.compute.sum(table["n_tokens"]).as_py() or 0),
        response_tokens=int(pa.compute.sum(table["n_response_tokens"]).as_py() or 0),
        shards=shards,
        holdout=holdout,
        ids_sha256=sha256_bytes("\n".join(table["id"].to_pylist()).encode()),
        tokenize_seconds=round(tok_seconds, 2),
        seconds=round(time.perf_counter() - t_start, 2),
    )
    held = f", {holdout.rows} held out" if holdout else ""
    log.info("%d rows kept%s, %d rejected of %d read; %d truncated to %d tokens, %d with no response tokens left; "
             "%d tokens in %d shards", n_rows, held, len(rejects), rows_read, counts["truncated"], cfg.data.max_length,
             counts["no_response_tokens"], manifest.tokens, len(shards))
    if counts["conversations"]:
        log.info("%d of them conversations; %d kept their last turns only (earliest exchanges dropped to fit)",
                 counts["conversations"], counts["turns_dropped"])
    if rejects:
        log.info("rejects with reasons: %s", layout.rejects)
        for reason, n in reject_reasons.most_common(8):
            log.info("  %6d  %s", n, reason)
    return manifest
