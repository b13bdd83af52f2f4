"""Content hashes: stable row ids and file digests for manifests."""

from __future__ import annotations

import hashlib
import json


def row_id(instruction: str, input_text: str, output: str) -> str:
    """Same (instruction, input, output) -> same id on every run and machine.

    JSON-encoding the triple keeps field boundaries unambiguous ("ab"+"c" != "a"+"bc")."""
    blob = json.dumps([instruction, input_text, output], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
