"""The evaluation prompt sets: the five of this line of work, each with its own schema, and any
JSONL of prompts with a configurable field. Every set maps to rows of
``{set, id, instruction, input, reference}`` (reference: a gold answer where the set has one).

A JSONL set may hold conversations instead: ``messages`` (OpenAI roles) or ``conversations`` as a
list of ShareGPT turns. The model answers the last user turn given the turns before it; a last
assistant turn is the reference answer. Such rows also carry ``turns`` (the turns before the answer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from rayapp.core import storage


class EvalSetError(ValueError):
    """A bad evaluation set file or row; the message names the file, line and field."""


@dataclass(frozen=True)
class EvalSetSpec:
    file: str
    prompt_field: str
    id_field: str | None = None


# The five sets shipped in ../shared/data/eval/ (see its README), by their usual names.
BUILTIN_SETS: dict[str, EvalSetSpec] = {
    "vicuna": EvalSetSpec("vicuna.jsonl", "text", "question_id"),
    "koala": EvalSetSpec("koala.jsonl", "prompt", "id"),
    "wizardlm": EvalSetSpec("wizardlm.jsonl", "Instruction", "idx"),
    "sinstruct": EvalSetSpec("sinstruct.jsonl", "instruction", "id"),
    "lima": EvalSetSpec("lima.jsonl", "conversations", None),
}


def _text(value, where: str) -> str:
    if isinstance(value, list):  # a conversation given as turns: the first turn is the prompt
        value = value[0] if value else ""
    if isinstance(value, dict):
        value = value.get("value", value.get("content", ""))
    if not isinstance(value, str):
        raise EvalSetError(f"{where}: expected text, got {type(value).__name__}")
    return value


def _turns(rec: dict, where: str) -> list[dict] | None:
    """A conversation row's turns (roles normalised), or None for a single-prompt row."""
    from rayapp.core.chat import CONVERSATION_FIELDS, ROLE_ALIASES

    for key, role_key, text_key in CONVERSATION_FIELDS.values():
        value = rec.get(key)
        if not (isinstance(value, list) and value and all(isinstance(t, dict) for t in value)):
            continue
        turns = []
        for i, t in enumerate(value):
            role = ROLE_ALIASES.get(t.get(role_key)) if isinstance(t.get(role_key), str) else None
            if role is None:
                raise EvalSetError(f"{where}: field '{key}[{i}].{role_key}': unknown role {t.get(role_key)!r}")
            if not isinstance(t.get(text_key), str):
                raise EvalSetError(f"{where}: field '{key}[{i}].{text_key}' must be a string")
            turns.append({"role": role, "content": t[text_key]})
        return turns
    return None


def render_turns(turns: list[dict]) -> str:
    """Turns as plain text, for judges and the Alpaca template: each under its speaker's name."""
    return "\n\n".join(f"{t['role'].title()}: {t['content']}" for t in turns)


def load_eval_set(name: str, path: str, prompt_field: str, id_field: str | None = None,
                  limit: int | None = None) -> list[dict]:
    """Read one set. Self-Instruct rows carry `instances`: the first instance's input is the
    prompt's input and its output the reference answer."""
    if not storage.exists(path):
        raise EvalSetError(f"evaluation set '{name}': file not found: {path}")
    rows: list[dict] = []
    for lineno, line in enumerate(storage.read_bytes(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise EvalSetError(f"{where}: expected a JSON object")
        turns = _turns(rec, where)
        if turns is not None:
            reference = turns.pop()["content"] if turns[-1]["role"] == "assistant" else None
            if not turns or turns[-1]["role"] != "user":
                raise EvalSetError(f"{where}: a conversation prompt must end with a user turn (or a user turn "
                                   "and its reference answer)")
            rid = rec.get(id_field) if id_field else None
            rows.append({"set": name, "id": f"{name}-{rid if rid is not None else lineno}",
                         "instruction": turns[-1]["content"], "input": "", "reference": reference, "turns": turns})
            if limit and len(rows) >= limit:
                break
            continue
        if prompt_field not in rec:
            raise EvalSetError(f"{where}: field '{prompt_field}' is missing (set '{name}')")
        instruction = _text(rec[prompt_field], f"{where}: field '{prompt_field}'").strip()
        if not instruction:
            raise EvalSetError(f"{where}: field '{prompt_field}' is empty (set '{name}')")
        inp, reference = "", None
        instances = rec.get("instances")
        if isinstance(instances, list) and instances and isinstance(instances[0], dict):
            inp = str(instances[0].get("input") or "")
            reference = instances[0].get("output") or None
        elif isinstance(rec.get("input"), str):
            inp = rec["input"]
        if reference is None and isinstance(rec.get("output"), str):
            reference = rec["output"]
        rid = rec.get(id_field) if id_field else None
        rows.append({"set": name, "id": f"{name}-{rid if rid is not None else lineno}",
                     "instruction": instruction, "input": inp, "reference": reference})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise EvalSetError(f"evaluation set '{name}' ({path}) has no prompts")
    return rows


def resolve_set(entry: str, eval_dir: str, prompt_field: str) -> tuple[str, str, str, str | None]:
    """(name, path, prompt field, id field) for a built-in set name or a JSONL path."""
    if entry in BUILTIN_SETS:
        spec = BUILTIN_SETS[entry]
        return entry, storage.join(eval_dir, spec.file), spec.prompt_field, spec.id_field
    if entry.endswith((".jsonl", ".json")):
        name = os.path.splitext(os.path.basename(entry))[0]
        return name, entry, prompt_field, "id"
    raise EvalSetError(f"unknown evaluation set {entry!r}: use one of {sorted(BUILTIN_SETS)} or a .jsonl path")
