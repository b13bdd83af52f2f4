"""A generated corpus of malformed rows mixed into real Alpaca lines, each with the reason (and the
field) prepare must reject it for. Seeded, so a failure names the same lines every time."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rayapp.core.hashing import row_id


@dataclass
class Expected:
    kind: str
    reason: str  # a substring of the reject's reason
    field: str | None


def _line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _broken_json(row, rng):
    line = _line(row)
    return line[: rng.randint(1, len(line) - 2)], Expected("broken JSON", "malformed JSON", None)


def _wrong_type(row, rng):
    field, value, name = rng.choice([("output", 42, "int"), ("output", ["a", "b"], "list"),
                                     ("instruction", {"text": row["instruction"]}, "dict"),
                                     ("input", 3.5, "float"), ("output", True, "bool")])
    return _line({**row, field: value}), Expected("wrong type", f"field '{field}' must be a string, got {name}", field)


def _huge(row, rng, max_chars):
    out = (row["output"] + " ") * (max_chars // max(len(row["output"]), 1) + 2)
    return _line({**row, "output": out}), Expected("huge row", "row too large", None)


def _empty_response(row, rng):
    return _line({**row, "output": rng.choice(["", " ", "\n\t "])}), Expected("empty response", "empty response", "output")


def _invalid_utf8(row, rng):
    line = _line(row)
    cut = rng.randint(min(line.index(b'"output"') + 11, len(line) - 2), len(line) - 2)  # inside the output
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80"])  # stray, broken, cut off, surrogate
    return line[:cut] + bad + line[cut:], Expected("invalid UTF-8", "invalid UTF-8", None)


def _null_field(row, rng):
    return _line({**row, "instruction": None}), Expected("null field", "field 'instruction' is null", "instruction")


def _missing_field(row, rng):
    return _line({k: v for k, v in row.items() if k != "instruction"}), Expected(
        "missing field", "field 'instruction' is missing", "instruction")


def _not_an_object(row, rng):
    return _line(rng.choice([[row["instruction"], row["output"]], row["output"], 7])), Expected(
        "not an object", "expected a JSON object", None)


def _nul_char(row, rng):
    out = row["output"]
    i = rng.randint(0, len(out))
    return _line({**row, "output": out[:i] + "\x00" + out[i:]}), Expected("NUL character", "NUL character", "output")


MAKERS = [_broken_json, _wrong_type, _huge, _empty_response, _invalid_utf8, _null_field, _missing_field,
          _not_an_object, _nul_char]


def mixed_corpus(path: Path, good: list[dict], n_bad: int, seed: int = 0,
                 max_chars: int = 200_000) -> tuple[dict[int, Expected], set[str]]:
    """Write the good rows with ``n_bad`` malformed ones (every kind, plus exact duplicates of
    earlier good rows) at random places. Returns {1-based line: Expected} and the good rows' ids."""
    rng = random.Random(seed)
    uniq = {}
    for r in good:
        uniq.setdefault((r["instruction"], r.get("input", ""), r["output"]), r)
    good = list(uniq.values())
    entries: list[tuple[bytes, Expected | None, int | None]] = [(_line(r), None, i) for i, r in enumerate(good)]
    n_kinds = len(MAKERS) + 1
    for k in range(n_bad):
        pos = rng.randint(1, len(entries))
        if k % n_kinds == len(MAKERS):  # a duplicate of a good row that comes earlier
            originals = [e[2] for e in entries[:pos] if e[2] is not None]
            row = good[rng.choice(originals)]
            text = json.dumps(row, ensure_ascii=rng.random() < 0.5, indent=None, separators=rng.choice([(",", ":"), (", ", ": ")]))
            entries.insert(pos, (text.encode(), Expected("duplicate", "duplicate row (first seen at", None), None))
            continue
        maker = MAKERS[k % n_kinds]
        row = rng.choice(good)
        line, exp = maker(row, rng, max_chars) if maker is _huge else maker(row, rng)
        entries.insert(pos, (line, exp, None))
    with open(path, "wb") as f:
        for line, _, _ in entries:
            f.write(line + b"\n")
    expected = {n: e for n, (_, e, _) in enumerate(entries, start=1) if e is not None}
    ids = {row_id(r["instruction"], r.get("input", ""), r["output"]) for r in good}
    return expected, ids
