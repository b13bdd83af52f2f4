"""The Ray side of prepare without a gather (distributed.py drives it): each step is a Ray Data map
over small work items (a block, a dedupe partition, a shard), and each item reads its inputs from
and writes its rows to the run's work folder, returning only a summary (counts, a few keys) to the
driver. Rows never pass through the driver.

Work folder (``prepared/.work``), one file per block ``g`` or partition ``p``:
  blocks.json          the block table: source, path, name, row kind, line offset, outcomes read
  read/g.parquet       every outcome of the block, kept or rejected (process_block)
  keys/g.parquet       (id, order, row, partition) of the valid outcomes, sorted by partition
  repeats/p.parquet    the repeats partition p found: (order, first_order, first_row)
  kept/g.parquet       the block's rows once limits and duplicates are applied
  rejects-read/g.jsonl the block's rejects when read;  rejects-tok/g.jsonl when tokenized
  tokens/g.parquet     the block's tokenized rows (shard schema), in row groups of 1,024
  holdout-keys/g.parquet  the block's smallest seeded hashes of ids (key, row): its held-out candidates
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp.config import TemplateConfig
from rayapp.core import storage, work_items
from rayapp.core.hashing import sha256_bytes
from rayapp.core.repeats import repeats
from rayapp.stages.prepare import spread
from rayapp.stages.prepare.blocks import Block, process_block
from rayapp.stages.prepare.records import (
    READ_COLUMNS,
    SHARD_SCHEMA,
    Reject,
    holdout_key,
    reason_key,
    rejects_jsonl,
    tokenized_row,
    tokenizer_item,
)

NOTHING_YET = "nothing yet (prepare writes its shards once every row is read and tokenized)"
TOKENS_ROW_GROUP = 1024  # a shard reads only the row groups of a block's tokens that it takes

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
OUTCOME_SCHEMA = pa.schema([("row", pa.int64()), ("row_kind", pa.string()), ("id", pa.string()),
                            ("instruction", pa.string()), ("input", pa.string()), ("output", pa.string()),
                            ("prompt", pa.string()), ("messages", MESSAGES), ("field", pa.string()),
                            ("reason", pa.string()), ("raw", pa.string())])
READ_SCHEMA = pa.schema([SHARD_SCHEMA.field(n) for n in READ_COLUMNS])


def work_file(work: str, kind: str, n: int, suffix: str = ".parquet") -> str:
    return storage.join(work, kind, f"{n:05d}{suffix}")


def run_items(fn, items: list[dict], workers: int, what: str, stall_s: float | None, **map_kwargs) -> list:
    """``work_items.run_items`` for prepare's steps."""
    return work_items.run_items(fn, items, workers, what, stall_s, stage="prepare", committed=NOTHING_YET,
                                **map_kwargs)


_reply = work_items.reply


def read_block(item: dict) -> dict:
    """Read, normalise and template one block; keep its outcomes and its keys for the dedupe pass."""
    it = json.loads(item["item"])
    job, g, work = it["job"], it["g"], it["work"]
    job["block"], job["template"] = Block(**job["block"]), TemplateConfig(**job["template"])
    job["detected_at"] = tuple(job["detected_at"]) if job["detected_at"] else None
    res = process_block(**job)
    if res.error:
        return _reply(item, {"error": res.error, "outcomes": 0, "span": 0, "row_kind": None})
    outcomes = pa.Table.from_pylist([asdict(o) for o in res.outcomes], schema=OUTCOME_SCHEMA)
    storage.write_parquet(work_file(work, "read", g), outcomes)
    valid = np.flatnonzero(np.asarray(outcomes["reason"].is_null()))
    ids = outcomes["id"].take(pa.array(valid))
    keys = pa.table({"id": ids, "order": spread.order_keys(g, valid),
                     "row": outcomes["row"].take(pa.array(valid)),
                     "partition": spread.partition_of(ids.to_pylist(), it["partitions"])})
    storage.write_parquet(work_file(work, "keys", g), keys.sort_by("partition"), row_group_size=8192)
    kinds = set(outcomes["row_kind"].to_pylist())
    if len(kinds) > 1:  # a line number's kind is taken per block below
        raise AssertionError(f"{job['block'].path}: rows of several kinds in one block: {sorted(kinds)}")
    return _reply(item, {"error": None, "outcomes": outcomes.num_rows, "span": res.span,
                         "row_kind": next(iter(kinds), None)})


def find_repeats(item: dict) -> dict:
    """Partition ``p``'s keys from every block, within the sources' limits: each id's occurrences
    after its first."""
    it = json.loads(item["item"])
    work, p = it["work"], it["p"]
    blocks = storage.read_json(storage.join(work, "blocks.json"))
    cuts = np.array([b["cut"] for b in blocks], dtype=np.int64)
    parts = [storage.read_parquet(work_file(work, "keys", g), ["id", "order", "row"], filters=[("partition", "=", p)])
             for g, b in enumerate(blocks) if b["cut"]]
    keys = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string()),
                                                             "order": pa.array([], pa.int64()),
                                                             "row": pa.array([], pa.int64())})
    keys = keys.filter(pa.array(spread.within_cuts(keys["order"].to_numpy(), cuts)))
    found = repeats(keys)
    storage.write_parquet(work_file(work, "repeats", p), found, row_group_size=8192)
    return _reply(item, {"keys": keys.num_rows, "repeats": found.num_rows})


def resolve_block(item: dict) -> dict:
    """One block's outcomes within its source's limit, numbered as file lines, with repeats
    rejected: its kept rows and rejects written, its tally returned."""
    it = json.loads(item["item"])
    work, g, partitions = it["work"], it["g"], it["partitions"]
    blocks = storage.read_json(storage.join(work, "blocks.json"))
    me = blocks[g]
    outcomes = storage.read_parquet(work_file(work, "read", g)).slice(0, me["cut"]).to_pylist()
    first_seen: dict[int, tuple[int, int]] = {}
    if it["dedupe"]:
        lo, hi = g << spread.ORDER_BITS, (g + 1) << spread.ORDER_BITS
        for p in range(partitions):
            found = storage.read_parquet(work_file(work, "repeats", p), filters=[("order", ">=", lo), ("order", "<", hi)])
            for order, first_order, first_row in zip(*(found[c].to_pylist() for c in found.column_names)):
                first_seen[order - lo] = (first_order >> spread.ORDER_BITS, first_row)
    kept, rejects, rejected = [], [], Counter()
    for pos, o in enumerate(outcomes):
        line = o["row"] + me["offset"]
        if o["reason"] is None and pos in first_seen:
            fb, frow = first_seen[pos]
            first = blocks[fb]
            o["reason"] = f"duplicate row (first seen at {first['path']}:{first['row_kind']} {frow + first['offset']}), " \
                          f"id {o['id']}"
            o["raw"] = None
        if o["reason"] is not None:
            rejects.append(Reject(me["path"], o["row_kind"], line, o["field"], o["reason"], o["raw"]))
            rejected[reason_key(o["reason"])] += 1
            continue
        kept.append({**{k: o[k] for k in ("id", "instruction", "input", "output", "prompt", "messages")},
                     "source": me["name"], "source_row": line})
    if kept:
        storage.write_parquet(work_file(work, "kept", g), pa.Table.from_pylist(kept, schema=READ_SCHEMA))
    if rejects:
        storage.write_text(work_file(work, "rejects-read", g, ".jsonl"), rejects_jsonl(rejects))
    return _reply(item, {"rows_read": len(outcomes), "rows_ok": len(kept), "rejected": dict(rejected),
                         "first_reject": asdict(rejects[0]) if rejects else None,
                         "conversations": sum(r["messages"] is not None for r in kept)})


class TokenizeBlocks:
    """An actor that loads the tokenizer once and tokenizes blocks of kept rows: it writes each
    block's tokenized rows and rejects, and returns its tally and its few held-out candidates."""

    def __init__(self, tokenizer: str, trust_remote_code: bool, max_length: int, truncation: str,
                 chat_template: str | None, template: dict, holdout_rows: int, holdout_seed: int):
        from rayapp.core.template import PromptFormatter
        from rayapp.ml.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.fmt = PromptFormatter(TemplateConfig(**template))
        self.max_length, self.truncation, self.chat_template = max_length, truncation, chat_template
        self.holdout_rows, self.holdout_seed = holdout_rows, holdout_seed

    def __call__(self, item: dict) -> dict:
        from rayapp.ml.tokenize import tokenize_rows

        it = json.loads(item["item"])
        work, g = it["work"], it["g"]
        rows = storage.read_parquet(work_file(work, "kept", g)).to_pylist()
        tokens = tokenize_rows(self.tokenizer, [tokenizer_item(r, self.fmt, self.tokenizer.eos_token) for r in rows],
                               self.max_length, self.truncation, self.chat_template)
        counts: Counter = Counter()
        kept, rejects = [], []
        for row, tk in zip(rows, tokens):
            out = tokenized_row(row, tk, it["path"], it["row_kind"], self.max_length, self.truncation, counts)
            (rejects if isinstance(out, Reject) else kept).append(out)
        if kept:
            storage.write_parquet(work_file(work, "tokens", g), pa.Table.from_pylist(kept, schema=SHARD_SCHEMA),
                                  row_group_size=TOKENS_ROW_GROUP)
        if rejects:
            storage.write_text(work_file(work, "rejects-tok", g, ".jsonl"), rejects_jsonl(rejects))
        eligible = [(holdout_key(self.holdout_seed, r["id"]), i) for i, r in enumerate(kept)
                    if r["n_response_tokens"] > 0] if self.holdout_rows else []
        if eligible:  # the block's smallest held-out keys: no more than the split's size can be held out
            keys, rows = zip(*heapq.nsmallest(self.holdout_rows, eligible))
            storage.write_parquet(work_file(work, "holdout-keys", g), pa.table({"key": keys, "row": rows}))
        return _reply(item, {"rows": len(kept), "counts": dict(counts), "eligible": len(eligible)})


def write_rows(item: dict) -> dict:
    """One output file (a shard, or the held-out split) from pieces of blocks' tokenized rows: a
    range of a block's training rows (its rows less those ``drop``ped to the holdout), or the rows
    at ``take``."""
    it = json.loads(item["item"])
    parts = []
    for piece in it["pieces"]:
        src = work_file(it["work"], "tokens", piece["g"])
        if "take" in piece:
            positions = np.asarray(piece["take"], dtype=np.int64)
        else:
            training = np.setdiff1d(np.arange(piece["rows"]), np.asarray(piece["drop"], dtype=np.int64))
            positions = training[piece["lo"]:piece["hi"]]
        parts.append(storage.read_row_groups(src, positions))
    table = pa.concat_tables(parts).cast(SHARD_SCHEMA)
    storage.write_parquet(it["dest"], table)
    ids = table["id"].to_pylist()
    return _reply(item, {"rows": table.num_rows, "first_id": ids[0] if ids else None,
                         "ids_sha256": sha256_bytes("\n".join(ids).encode()),
                         "tokens": int(pc.sum(table["n_tokens"]).as_py() or 0),
                         "response_tokens": int(pc.sum(table["n_response_tokens"]).as_py() or 0)})


def finish_files(item: dict) -> dict:
    """One task, so that the driver streams nothing: the rejects file from the blocks' parts (read
    rejects first, then tokenizer ones, as the driver path orders them), and the sha256 of every
    training id joined by newlines (as the driver path hashes one list), a shard's ids at a time."""
    it = json.loads(item["item"])
    work = it["work"]
    parts = [f for kind in ("rejects-read", "rejects-tok") for f in storage.list_files(storage.join(work, kind), ".jsonl")]
    storage.concat_files(parts, it["rejects"])
    h = hashlib.sha256()
    sep = b""
    for path in it["shards"]:
        for rid in storage.read_parquet(path, ["id"])["id"].to_pylist():
            h.update(sep + rid.encode())
            sep = b"\n"
    return _reply(item, h.hexdigest())
