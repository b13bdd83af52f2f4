"""The prepare stage: sources -> normalised, templated, tokenized Parquet shards + manifest + rejects."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from rayapp import __version__
from rayapp.common import storage
from rayapp.common.hashing import sha256_bytes, sha256_file
from rayapp.common.layout import RunLayout
from rayapp.config import RunConfig, SourceConfig
from rayapp.models import registry
from rayapp.models.loading import load_tokenizer
from rayapp.prepare.normalize import RowError, detect_schema, normalize_row
from rayapp.prepare.readers import RawRow, UnreadableSourceError, iter_rows
from rayapp.prepare.template import PromptFormatter
from rayapp.prepare.tokenize import tokenize_pairs

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("prompt", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


class PrepareError(RuntimeError):
    """The stage cannot go on (a whole source unreadable, nothing left to write)."""


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


@dataclass
class SourceReport:
    path: str
    name: str
    schema: str
    sha256: str | None
    rows_read: int = 0
    rows_ok: int = 0
    rejected: Counter = field(default_factory=Counter)


def _resolve_source_path(src: SourceConfig) -> str:
    if src.fallback and not storage.exists(src.path) and src.format != "hf":
        print(f"[prepare] {src.path} not found; using the fallback {src.fallback}")
        return src.fallback
    return src.path


def _digest_source(path: str) -> str | None:
    if storage.is_remote(path) or not os.path.isfile(path):
        return None
    return sha256_file(path)


def _reason_key(reason: str) -> str:
    """Group reject reasons for the summary ("field 'output' is empty (empty response)" etc.)."""
    return reason.split(":")[0] if reason.startswith(("malformed JSON", "invalid UTF-8")) else reason.split(" (first")[0]


def read_sources(cfg: RunConfig) -> tuple[list[_Row], list[Reject], list[SourceReport]]:
    rows: list[_Row] = []
    rejects: list[Reject] = []
    reports: list[SourceReport] = []
    seen: dict[str, str] = {}
    for src in cfg.data.sources:
        path = _resolve_source_path(src)
        name = src.name or os.path.basename(path.rstrip("/")).split(".")[0]
        report = SourceReport(path=path, name=name, schema=src.schema_, sha256=_digest_source(path))
        schema = None if src.schema_ == "auto" else src.schema_
        t0 = time.perf_counter()

        def reject(raw: RawRow, fld: str | None, reason: str) -> None:
            rejects.append(Reject(raw.file, raw.row_kind, raw.row, fld, reason, raw.raw))
            report.rejected[_reason_key(reason)] += 1

        try:
            for raw in iter_rows(path, src.format, src.split):
                if src.limit is not None and report.rows_read >= src.limit:
                    break
                report.rows_read += 1
                if raw.data is None:
                    reject(raw, raw.field, raw.error or "unreadable row")
                    continue
                if schema is None:
                    schema = detect_schema(raw.data)
                    if schema is None:
                        reject(raw, None, "cannot tell the schema: no 'output' (Alpaca) or 'response' (Dolly) field")
                        continue
                    report.schema = schema
                try:
                    norm = normalize_row(raw.data, schema, cfg.data.max_chars)
                except RowError as err:
                    raw.raw = raw.raw or json.dumps(raw.data, ensure_ascii=False, default=str)[:300]
                    reject(raw, err.field, err.reason)
                    continue
                if cfg.data.dedupe and norm.id in seen:
                    reject(raw, None, f"duplicate row (first seen at {seen[norm.id]}), id {norm.id}")
                    continue
                seen[norm.id] = raw.where
                rows.append(_Row(raw.file, raw.row_kind, norm.id, norm.instruction, norm.input, norm.output, name, raw.row))
                report.rows_ok += 1
        except UnreadableSourceError as err:
            raise PrepareError(str(err)) from None
        if report.rows_read and not report.rows_ok:
            first = next((r for r in rejects if r.file == path), None)
            detail = f"; first: {first.row_kind} {first.row}: {first.reason}" if first else ""
            raise PrepareError(f"{path}: no usable rows ({report.rows_read} read, all rejected{detail})")
        if report.rows_read == 0:
            raise PrepareError(f"{path}: no rows")
        took = time.perf_counter() - t0
        print(
            f"[prepare] read {path}: {report.rows_read} rows, {report.rows_ok} ok, "
            f"{sum(report.rejected.values())} rejected ({report.schema}, {took:.1f}s)"
        )
        reports.append(report)
    return rows, rejects, reports


def _fingerprint(cfg: RunConfig, reports_or_sources: list, tokenizer_src: str) -> str:
    tok_digest = None
    tok_file = os.path.join(tokenizer_src, "tokenizer.json")
    if os.path.isfile(tok_file):
        tok_digest = sha256_file(tok_file)
    blob = json.dumps(
        {
            "data": cfg.data.model_dump(mode="json", by_alias=True),
            "sources": reports_or_sources,
            "tokenizer": tokenizer_src,
            "tokenizer_sha256": tok_digest,
            "version": __version__,
        },
        sort_keys=True,
    )
    return sha256_bytes(blob.encode())[:16]


def _source_identity(cfg: RunConfig) -> list:
    ids = []
    for src in cfg.data.sources:
        path = _resolve_source_path(src) if src.fallback else src.path
        ids.append({"path": path, "sha256": _digest_source(path), "limit": src.limit})
    return ids


def is_complete(cfg: RunConfig) -> bool:
    """True when the prepared shards on disk match this config and these inputs."""
    layout = RunLayout(cfg.output_dir)
    if not storage.exists(layout.prepared_manifest):
        return False
    manifest = storage.read_json(layout.prepared_manifest)
    try:
        tok = registry.tokenizer_source(cfg)
        want = _fingerprint(cfg, _source_identity(cfg), tok)
    except Exception:
        return False
    if manifest.get("fingerprint") != want:
        return False
    return all(storage.exists(storage.join(layout.prepared, s["file"])) for s in manifest["shards"])


def run_prepare(cfg: RunConfig, force: bool = False) -> dict:
    layout = RunLayout(cfg.output_dir)
    if not force and is_complete(cfg):
        manifest = storage.read_json(layout.prepared_manifest)
        print(f"[prepare] up to date: {manifest['rows']} rows in {len(manifest['shards'])} shards at {layout.prepared}")
        return manifest

    t_start = time.perf_counter()
    rows, rejects, reports = read_sources(cfg)
    fmt = PromptFormatter(cfg.data.template)
    prompts = [fmt.prompt(r.instruction, r.input) for r in rows]

    def training_texts():
        for p, r in zip(prompts, rows):
            yield p + r.output

    tok_src = registry.ensure_tokenizer(cfg, training_texts)
    tokenizer = load_tokenizer(tok_src, trust_remote_code=cfg.models.reference.trust_remote_code)
    eos = tokenizer.eos_token

    t_tok = time.perf_counter()
    kept_cols: dict[str, list] = {n: [] for n in SHARD_SCHEMA.names}
    counts = Counter()
    batch = 1024
    for lo in range(0, len(rows), batch):
        chunk = rows[lo : lo + batch]
        toks = tokenize_pairs(
            tokenizer,
            prompts[lo : lo + batch],
            [fmt.response(r.output, eos) for r in chunk],
            cfg.data.max_length,
        )
        for row, prompt, tk in zip(chunk, prompts[lo : lo + batch], toks):
            if tk.truncated and cfg.data.truncation == "drop":
                rejects.append(
                    Reject(row.file, row.row_kind, row.source_row, None,
                           f"too long: {tk.full_length} tokens > max_length {cfg.data.max_length} (truncation: drop)")
                )
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += tk.truncated
            counts["no_response_tokens"] += tk.n_response_tokens == 0
            for name, value in (
                ("id", row.id), ("instruction", row.instruction), ("input", row.input), ("output", row.output),
                ("source", row.source), ("source_row", row.source_row), ("prompt", prompt),
                ("input_ids", tk.input_ids), ("labels", tk.labels), ("n_tokens", len(tk.input_ids)),
                ("n_response_tokens", tk.n_response_tokens), ("truncated", tk.truncated),
            ):
                kept_cols[name].append(value)
    tok_seconds = time.perf_counter() - t_tok

    n_rows = len(kept_cols["id"])
    if n_rows == 0:
        raise PrepareError("no rows left after tokenization; see the rejects file")
    table = pa.Table.from_pydict(kept_cols, schema=SHARD_SCHEMA)

    # Replace the old shards only after the new ones are written; stale names are removed last.
    old = set(storage.list_files(layout.prepared, ".parquet"))
    shards = []
    for i, lo in enumerate(range(0, n_rows, cfg.data.shard_rows)):
        part = table.slice(lo, cfg.data.shard_rows)
        fname = f"shard-{i:05d}.parquet"
        storage.write_parquet(storage.join(layout.prepared, fname), part)
        shards.append({"file": fname, "rows": part.num_rows, "first_id": part["id"][0].as_py()})
        old.discard(storage.join(layout.prepared, fname))
    for stale in old:
        fs, p = storage.resolve(stale)
        fs.delete_file(p)

    storage.write_text(
        layout.rejects, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects)
    )
    reject_reasons = Counter()
    for rep in reports:
        reject_reasons.update(rep.rejected)
    if counts["dropped_too_long"]:
        reject_reasons["too long (truncation: drop)"] += counts["dropped_too_long"]
    rows_read = sum(r.rows_read for r in reports)
    manifest = {
        "stage": "prepare",
        "rayapp_version": __version__,
        "fingerprint": _fingerprint(cfg, _source_identity(cfg), tok_src),
        "config_digest": cfg.digest(),
        "tokenizer": tok_src,
        "vocab_size": len(tokenizer),
        "eos_token": eos,
        "template": cfg.data.template.model_dump(),
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "sources": [
            {"path": r.path, "name": r.name, "schema": r.schema, "sha256": r.sha256, "rows_read": r.rows_read,
             "rows_ok": r.rows_ok, "rejected": dict(r.rejected)}
            for r in reports
        ],
        "rows_read": rows_read,
        "rows": n_rows,
        "rejected": len(rejects),
        "reject_reasons": dict(reject_reasons),
        "truncated": counts["truncated"],
        "no_response_tokens": counts["no_response_tokens"],
        "tokens": int(sum(kept_cols["n_tokens"])),
        "response_tokens": int(sum(kept_cols["n_response_tokens"])),
        "shards": shards,
        "ids_sha256": sha256_bytes("\n".join(kept_cols["id"]).encode()),
        "seconds": round(time.perf_counter() - t_start, 2),
        "tokenize_seconds": round(tok_seconds, 2),
    }
    assert rows_read == n_rows + len(rejects), "every input row is either kept or rejected"
    storage.write_json(layout.prepared_manifest, manifest)
    print(
        f"[prepare] {n_rows} rows kept, {len(rejects)} rejected of {rows_read} read; "
        f"{counts['truncated']} truncated to {cfg.data.max_length} tokens, "
        f"{counts['no_response_tokens']} with no response tokens left; "
        f"{manifest['tokens']} tokens in {len(shards)} shards ({manifest['seconds']:.1f}s)"
    )
    if rejects:
        print(f"[prepare] rejects with reasons: {layout.rejects}")
        for reason, n in reject_reasons.most_common(8):
            print(f"[prepare]   {n:6d}  {reason}")
    return manifest
