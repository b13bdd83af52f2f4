"""What prepare writes, row by row, shared by the driver path and the spread one: the shard schema,
a rejected row, a source's tally, and what a tokenized row becomes (kept, or rejected and why)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa

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

# a row that was read and kept, before tokenizing: the shard columns up to the prompt, plus where it came from
READ_COLUMNS = ("id", "instruction", "input", "output", "source", "source_row", "prompt", "messages")


@dataclass
class Reject:
    file: str
    row_kind: str
    row: int
    field: str | None
    reason: str
    raw: str | None = None


@dataclass
class SourceReport:
    path: str
    name: str
    schema: str
    identity: str
    rows_read: int = 0
    rows_ok: int = 0
    rejected: Counter = field(default_factory=Counter)


def rejects_jsonl(rejects: list[Reject]) -> str:
    """Rejects as the rejects file holds them: one JSON object a line."""
    return "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects)


def reason_key(reason: str) -> str:
    """Group reject reasons for the summary ("field 'output' is empty (empty response)" etc.)."""
    return reason.split(":")[0] if reason.startswith(("malformed JSON", "invalid UTF-8")) else reason.split(" (first")[0]


def tokenized_row(row: dict, tk, file: str, row_kind: str, max_length: int, truncation: str,
                  counts: Counter) -> dict | Reject:
    """A read row (``READ_COLUMNS``) and its tokens (ml/tokenize.Tokenized): the shard row, or the
    reject when its chat template cannot render it or it is too long under ``truncation: drop``.
    ``counts`` gathers truncated, turns_dropped, no_response_tokens, conversations, template_errors
    and dropped_too_long."""
    if tk.error:
        counts["template_errors"] += 1
        return Reject(file, row_kind, row["source_row"], "messages", tk.error)
    if tk.truncated and truncation == "drop":
        counts["dropped_too_long"] += 1
        return Reject(file, row_kind, row["source_row"], None,
                      f"too long: {tk.full_length} tokens > max_length {max_length} (truncation: drop)")
    counts["truncated"] += tk.truncated
    counts["turns_dropped"] += tk.turns_dropped > 0
    counts["no_response_tokens"] += tk.n_response_tokens == 0
    counts["conversations"] += row["messages"] is not None
    return {**{name: row[name] for name in READ_COLUMNS},
            "prompt": row["prompt"] if row["messages"] is None else tk.prompt,
            "input_ids": tk.input_ids, "labels": tk.labels, "n_tokens": len(tk.input_ids),
            "n_response_tokens": tk.n_response_tokens, "truncated": tk.truncated}


def _plain_text(messages: list[dict]) -> str:
    """A conversation as text for training the tiny tokenizer (before any chat template exists)."""
    return "".join(f"### {m['role'].title()}:\n{m['content']}\n\n" for m in messages)


def training_text(row: dict) -> str:
    """What the tiny tokenizer is trained on for a read row."""
    return row["prompt"] + row["output"] if row["messages"] is None else _plain_text(row["messages"])


def tokenizer_item(row: dict, fmt, eos: str) -> dict:
    """A read row as ``tokenize_rows`` takes it: an Alpaca ``{prompt, response}`` or ``{messages}``
    (``fmt``: core/template.PromptFormatter)."""
    return {"prompt": row["prompt"], "response": fmt.response(row["output"], eos)} if row["messages"] is None \
        else {"messages": row["messages"]}


def holdout_key(seed: int, row_id: str) -> str:
    """The seeded hash that orders rows for the held-out split (smallest first)."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()
