"""Content hashes: stable row ids, file digests and stage fingerprints."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Recorded digests and fingerprints are this many hex characters (64 bits): plenty to tell runs
# apart, short enough to read in a manifest or a log line.
SHORT = 16


def row_id(instruction: str, input_text: str, output: str) -> str:
    """Same (instruction, input, output) -> same id on every run and machine.

    JSON-encoding the triple keeps field boundaries unambiguous ("ab"+"c" != "a"+"bc")."""
    blob = json.dumps([instruction, input_text, output], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def conversation_id(messages: list[dict[str, str]]) -> str:
    """Same turns -> same id; covers every turn's role and text. The JSON list of [role, content]
    pairs cannot collide with an Alpaca triple's list of three strings."""
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short_digest(data: bytes) -> str:
    """The short content hash manifests record for files and id lists."""
    return sha256_bytes(data)[:SHORT]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def seeded_fraction(positions, seed: int):
    """A number in [0, 1) for each position, the same on every worker and run (splitmix64 of the
    position and the seed): rows whose number is below f are a seeded sample of about f of them."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.asarray(positions, dtype=np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _plain(obj: Any) -> Any:
    dump = getattr(obj, "model_dump", None)  # pydantic models: their JSON form
    if callable(dump):
        return dump(mode="json", by_alias=True)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot fingerprint a {type(obj).__name__}")


def fingerprint(**parts: Any) -> str:
    """One stable short hash of named parts (strings, numbers, lists, dicts, pydantic models):
    the identity of what a stage's output was made from."""
    blob = json.dumps(parts, sort_keys=True, default=_plain, separators=(",", ":"))
    return short_digest(blob.encode("utf-8"))
