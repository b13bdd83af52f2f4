"""Map Alpaca- and Dolly-style rows and conversations onto one schema and validate them.

Alpaca: instruction, input, output.  Dolly: instruction, context, response (category ignored).
`input`/`context` is optional (missing or null means no input); `instruction` and the response are
required non-empty strings.

Conversations: ``messages`` (OpenAI: ``[{role, content}]`` with roles system/user/assistant) or
ShareGPT ``conversations`` (``[{from, value}]`` with system/human/gpt and the usual aliases). A
conversation must end with a non-empty assistant turn; a system prompt may only open it. Besides its
turns a conversation row fills the Alpaca fields that selection and reports read: ``instruction`` is
its user turns joined by blank lines, ``input`` is empty and ``output`` is its last assistant turn.

Every problem names the field (``messages[3].role``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rayapp.core.chat import CONVERSATION_FIELDS, ROLE_ALIASES, ROLES
from rayapp.core.hashing import conversation_id, row_id

FIELD_MAPS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
}

SCHEMAS = ("alpaca", "dolly", *CONVERSATION_FIELDS)


@dataclass
class Normalized:
    id: str
    instruction: str
    input: str
    output: str
    messages: list[dict[str, str]] | None = None  # a conversation's turns, roles normalised


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
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    return None


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def normalize_row(obj: dict[str, Any], schema: str, max_chars: int) -> Normalized:
    if schema in CONVERSATION_FIELDS:
        return normalize_conversation(obj, schema, max_chars)
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


def normalize_conversation(obj: dict[str, Any], schema: str, max_chars: int) -> Normalized:
    key, role_key, text_key = CONVERSATION_FIELDS[schema]
    if key not in obj:
        raise RowError(key, f"field '{key}' is missing")
    turns = obj[key]
    if not isinstance(turns, (list, tuple)):
        # Parquet and HF datasets give lists; a JSON string of turns is still one string
        raise RowError(key, f"field '{key}' must be a list of turns, got {_type_name(turns)}")
    if not turns:
        raise RowError(key, f"field '{key}' has no turns")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"turn {where} must be an object, got {_type_name(turn)}")
        if role_key not in turn:
            raise RowError(f"{where}.{role_key}", f"turn {where} has no '{role_key}'")
        role = ROLE_ALIASES.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            known = ", ".join(ROLES if schema == "messages" else sorted(ROLE_ALIASES))
            raise RowError(f"{where}.{role_key}", f"unknown role {turn[role_key]!r} in {where} (known: {known})")
        if text_key not in turn:
            raise RowError(f"{where}.{text_key}", f"turn {where} has no '{text_key}'")
        text = turn[text_key]
        if not isinstance(text, str):
            raise RowError(f"{where}.{text_key}", f"{where}.{text_key} must be a string, got {_type_name(text)}")
        if "\x00" in text:
            raise RowError(f"{where}.{text_key}", f"{where}.{text_key} contains a NUL character")
        if role == "assistant" and not text.strip():
            raise RowError(f"{where}.{text_key}", f"empty assistant turn {where}")
        if role == "system" and i > 0:
            raise RowError(f"{where}.{role_key}", f"a system turn may only open the conversation ({where})")
        messages.append({"role": role, "content": text})
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RowError(key, f"no assistant turn in '{key}'")
    if messages[-1]["role"] != "assistant":
        last = f"{key}[{len(messages) - 1}]"
        raise RowError(f"{last}.{role_key}", f"the last turn {last} is the {messages[-1]['role']}'s, not the "
                                             "assistant's (nothing to learn after it)")
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise RowError(None, f"row too large: {total} characters > max_chars {max_chars}")
    return Normalized(
        id=conversation_id(messages),
        instruction="\n\n".join(m["content"] for m in messages if m["role"] == "user"),
        input="",
        output=assistant[-1],
        messages=messages,
    )
