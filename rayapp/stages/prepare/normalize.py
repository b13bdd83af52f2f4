"""Map Alpaca- and Dolly-style rows onto one schema and validate them.

Alpaca: instruction, input, output.  Dolly: instruction, context, response (category ignored).
`input`/`context` is optional (missing or null means no input); `instruction` and the response are
required non-empty strings. Every problem names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rayapp.core.hashing import row_id

FIELD_MAPS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
}


@dataclass
class Normalized:
    id: str
    instruction: str
    input: str
    output: str


class RowError(ValueError):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


def detect_schema(obj: dict[str, Any]) -> str | None:
    if "output" in obj:
        return "alpaca"
    if "response" in obj:
        return "dolly"
    return None


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def normalize_row(obj: dict[str, Any], schema: str, max_chars: int) -> Normalized:
    fields = FIELD_MAPS[schema]
    values: dict[str, str] = {}
    for ours, theirs in fields.items():
        optional = ours == "input"
        if theirs not in obj:
            if optional:
                values[ours] = ""
                continue
            raise RowError(theirs, f"field '{theirs}' is missing")
        v = obj[theirs]
        if v is None:
            if optional:
                values[ours] = ""
                continue
            raise RowError(theirs, f"field '{theirs}' is null")
        if not isinstance(v, str):
            raise RowError(theirs, f"field '{theirs}' must be a string, got {_type_name(v)}")
        if "\x00" in v:
            raise RowError(theirs, f"field '{theirs}' contains a NUL character")
        if not optional and not v.strip():
            what = "response" if ours == "output" else ours
            raise RowError(theirs, f"field '{theirs}' is empty (empty {what})")
        values[ours] = v
    total = sum(len(v) for v in values.values())
    if total > max_chars:
        raise RowError(None, f"row too large: {total} characters > max_chars {max_chars}")
    return Normalized(
        id=row_id(values["instruction"], values["input"], values["output"]),
        instruction=values["instruction"],
        input=values["input"],
        output=values["output"],
    )
