"""Steps prepare takes the same way whether it runs on the driver (stage.py) or spread over Ray
Data (distributed.py): the sources cut into blocks, a source's checks, the tokenizer, the held-out
split's bounds, the shards' names, and the manifest once every row is accounted for."""

from __future__ import annotations

import os
import time
from collections import Counter

from rayapp.config import RunConfig, SourceConfig
from rayapp.core import storage
from rayapp.core.chat import chat_template, has_generation_blocks
from rayapp.core.errors import InputDataError
from rayapp.core.hashing import sha256_bytes
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import HoldoutRecord, PreparedManifest, ShardRecord, SourceRecord
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_tokenizer
from rayapp.stages.prepare.blocks import detect, plan_blocks
from rayapp.stages.prepare.readers import source_identity
from rayapp.stages.prepare.records import Reject, SourceReport

log = get_logger(__name__)


def _resolve_source_path(src: SourceConfig, quiet: bool = False) -> str:
    if src.fallback and not storage.exists(src.path) and src.format != "hf":
        if not quiet:
            log.info("%s not found; using the fallback %s", src.path, src.fallback)
        return src.fallback
    return src.path


def _source_name(src: SourceConfig, path: str) -> str:
    return src.name or os.path.basename(path.rstrip("/")).split(".")[0]


def plan_sources(cfg: RunConfig) -> tuple[list[dict], list[SourceReport]]:
    """Every source cut into blocks (stages/prepare/blocks.py), as ``process_block`` jobs in source
    order, and each source's (empty) tally."""
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
    return jobs, reports


def check_source(report: SourceReport, first_reject: Reject | None) -> None:
    """A source that gave no rows, or none usable, stops the run; else its tally is logged."""
    if report.rows_read and not report.rows_ok:
        first = first_reject
        detail = f"; first: {first.row_kind} {first.row}: {first.reason}" if first else ""
        raise InputDataError(f"{report.path}: no usable rows ({report.rows_read} read, all rejected{detail})")
    if report.rows_read == 0:
        raise InputDataError(f"{report.path}: no rows")
    log.info("read %s: %d rows, %d ok, %d rejected (%s)", report.path, report.rows_read, report.rows_ok,
             sum(report.rejected.values()), report.schema)


def run_tokenizer(cfg: RunConfig, texts, conversations: bool):
    """The run's tokenizer (the tiny one trained from ``texts()`` on first use), and the chat
    template when there are ``conversations``: (source, tokenizer, template, template kind)."""
    tok_src = registry.ensure_tokenizer(cfg, texts)
    tokenizer = load_tokenizer(tok_src, trust_remote_code=cfg.models.reference.trust_remote_code)
    template, template_kind = chat_template(tokenizer, cfg.data.template.chat) if conversations else (None, None)
    if conversations:
        how = "its assistant masks" if has_generation_blocks(template) else "rendered turn boundaries"
        log.info("conversations: %s chat template, labels from %s", template_kind, how)
    return tok_src, tokenizer, template, template_kind


def check_holdout_size(n_hold: int, eligible: int) -> None:
    if 2 * n_hold > eligible:
        raise InputDataError(
            f"data.holdout_rows={n_hold} would hold out at least half of the {eligible} usable rows; "
            "lower it (e.g. --set data.holdout_rows=0 for none)")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def remove_stale_shards(layout: RunLayout, old: set[str], written: list[str]) -> None:
    """Old shards are replaced only after the new ones are written; stale names are removed last."""
    for stale in old - {layout.prepared_file(f) for f in written}:
        storage.remove(stale)


def finish(cfg: RunConfig, *, tok_src: str, tokenizer, template: str | None, template_kind: str | None,
           reports: list[SourceReport], counts: Counter, rejected: int, shards: list[ShardRecord],
           holdout: HoldoutRecord | None, tokens: int, response_tokens: int, ids_sha256: str, tok_seconds: float,
           t_start: float, rejects_path: str) -> PreparedManifest:
    """The manifest, once every row is accounted for (read = kept + held out + rejected), and the log."""
    reject_reasons: Counter = Counter()
    for rep in reports:
        reject_reasons.update(rep.rejected)
    if counts["dropped_too_long"]:
        reject_reasons["too long (truncation: drop)"] += counts["dropped_too_long"]
    if counts["template_errors"]:
        reject_reasons["chat template cannot render the conversation"] += counts["template_errors"]
    rows_read = sum(r.rows_read for r in reports)
    n_rows = sum(s.rows for s in shards)
    kept = n_rows + (holdout.rows if holdout else 0)
    if rows_read != kept + rejected:
        raise AssertionError(f"{rows_read} rows read but {kept} kept and {rejected} rejected")
    manifest = PreparedManifest(
        tokenizer=tok_src,
        vocab_size=len(tokenizer),
        eos_token=tokenizer.eos_token,
        template=cfg.data.template.model_dump(),
        max_length=cfg.data.max_length,
        truncation=cfg.data.truncation,
        sources=[SourceRecord(path=r.path, name=r.name, schema=r.schema, identity=r.identity, rows_read=r.rows_read,
                              rows_ok=r.rows_ok, rejected=dict(r.rejected)) for r in reports],
        rows_read=rows_read,
        rows=n_rows,
        rejected=rejected,
        reject_reasons=dict(reject_reasons),
        truncated=counts["truncated"],
        conversations=counts["conversations"],
        chat_template=template_kind,
        chat_template_sha256=sha256_bytes(template.encode())[:16] if template else None,
        turns_dropped=counts["turns_dropped"],
        no_response_tokens=counts["no_response_tokens"],
        tokens=tokens,
        response_tokens=response_tokens,
        shards=shards,
        holdout=holdout,
        ids_sha256=ids_sha256,
        tokenize_seconds=round(tok_seconds, 2),
        seconds=round(time.perf_counter() - t_start, 2),
    )
    held = f", {holdout.rows} held out" if holdout else ""
    log.info("%d rows kept%s, %d rejected of %d read; %d truncated to %d tokens, %d with no response tokens left; "
             "%d tokens in %d shards", n_rows, held, rejected, rows_read, counts["truncated"], cfg.data.max_length,
             counts["no_response_tokens"], manifest.tokens, len(shards))
    if counts["conversations"]:
        log.info("%d of them conversations; %d kept their last turns only (earliest exchanges dropped to fit)",
                 counts["conversations"], counts["turns_dropped"])
    if rejected:
        log.info("rejects with reasons: %s", rejects_path)
        for reason, n in reject_reasons.most_common(8):
            log.info("  %6d  %s", n, reason)
    return manifest
