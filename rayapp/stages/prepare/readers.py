"""Read raw rows from JSON, JSONL, Parquet or an HF `datasets` source, keeping where each came from.

A reader yields ``RawRow``s: either a parsed mapping or the reason it could not be parsed, with
the file and 1-based line (JSONL) or 0-based row index (JSON arrays, Parquet, datasets), so that
every bad row can be reported precisely and nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rayapp.core import storage
from rayapp.core.errors import InputDataError
from rayapp.core.hashing import sha256_file, short_digest


class UnreadableSourceError(InputDataError):
    """The whole file cannot be read (missing, not JSON at all, not Parquet, ...)."""


@dataclass
class RawRow:
    file: str
    row: int  # 1-based line number for JSONL, 0-based index otherwise
    row_kind: str  # "line" or "row"
    data: dict[str, Any] | None
    error: str | None = None
    field: str | None = None
    raw: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.row_kind} {self.row}"


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith(".parquet") or lower.endswith(".pq"):
        return "parquet"
    if storage.exists(path) and not os.path.isfile(storage.local_path(path)):
        return "hf"  # a folder: an HF dataset saved to disk or a folder of data files
    if not storage.exists(path) and "/" in path and not path.startswith((".", "/")) and "://" not in path:
        return "hf"  # looks like a hub name, e.g. "tatsu-lab/alpaca"
    raise UnreadableSourceError(f"{path}: cannot tell the format from the name; set format: json|jsonl|parquet|hf")


def _preview(raw: bytes | str, limit: int = 300) -> str:
    text = raw if isinstance(raw, str) else raw.decode("utf-8", errors="backslashreplace")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def _read_all(path: str) -> bytes:
    if not storage.exists(path):
        raise UnreadableSourceError(f"{path}: file not found")
    try:
        return storage.read_bytes(path)
    except OSError as exc:
        raise UnreadableSourceError(f"{path}: cannot read: {exc}") from None


def iter_jsonl(path: str, data: bytes | None = None) -> Iterator[RawRow]:
    data = _read_all(path) if data is None else data
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRow(path, lineno, "line", None, f"invalid UTF-8 at byte {exc.start} of the line", None, _preview(line))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRow(path, lineno, "line", None, f"malformed JSON: {exc.msg} at column {exc.colno}", None, _preview(text))
            continue
        if not isinstance(obj, dict):
            yield RawRow(path, lineno, "line", None, f"expected a JSON object, got {type(obj).__name__}", None, _preview(text))
            continue
        yield RawRow(path, lineno, "line", obj)


def iter_json(path: str) -> Iterator[RawRow]:
    data = _read_all(path)
    head = data.lstrip()[:1]
    if head != b"[":
        # Many ".json" instruction files are really JSON Lines (one object per line).
        yield from iter_jsonl(path, data)
        return
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UnreadableSourceError(f"{path}: invalid UTF-8 at byte {exc.start}; a JSON array cannot be read past it") from None
    except json.JSONDecodeError as exc:
        raise UnreadableSourceError(f"{path}: malformed JSON array: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    for i, obj in enumerate(rows):
        if not isinstance(obj, dict):
            yield RawRow(path, i, "row", None, f"expected a JSON object, got {type(obj).__name__}", None, _preview(json.dumps(obj)))
        else:
            yield RawRow(path, i, "row", obj)


def iter_parquet(path: str) -> Iterator[RawRow]:
    for i, obj in enumerate(storage.read_parquet_or_raise(path, UnreadableSourceError).to_pylist()):
        yield RawRow(path, i, "row", obj)


def iter_hf(path: str, split: str) -> Iterator[RawRow]:
    import datasets

    local = storage.local_path(path)
    try:
        if os.path.isdir(local) and os.path.exists(os.path.join(local, "dataset_info.json")):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as exc:
        raise UnreadableSourceError(f"{path}: cannot load as an HF dataset (split {split!r}): {exc}") from None
    for i, obj in enumerate(ds):
        yield RawRow(path, i, "row", dict(obj))


def iter_rows(path: str, fmt: str, split: str = "train") -> Iterator[RawRow]:
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "json":
        return iter_json(path)
    if fmt == "parquet":
        return iter_parquet(path)
    return iter_hf(path, split)


def _folder_identity(local_dir: str) -> str:
    """Names, sizes and modification times of every file under a folder (an HF dataset saved with
    ``save_to_disk``, or a folder of data files): any rewrite changes it."""
    entries = []
    for root, _, files in sorted(os.walk(local_dir)):
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            entries.append(f"{os.path.relpath(os.path.join(root, name), local_dir)}:{st.st_size}:{st.st_mtime_ns}")
    return "folder:" + short_digest("\n".join(entries).encode())


def _hub_identity(name: str) -> str:
    """The resolved revision of an HF hub dataset: the commit the hub serves now, or, offline, the
    hash the datasets cache keys that revision by."""
    try:
        from huggingface_hub import HfApi

        return "hf-revision:" + str(HfApi().dataset_info(name).sha)
    except Exception:
        pass
    try:
        import datasets

        return "hf-builder:" + str(datasets.load_dataset_builder(name).hash)
    except Exception as exc:
        raise UnreadableSourceError(f"{name}: cannot resolve the HF dataset's revision: {exc}") from None


def source_identity(path: str, fmt: str) -> str:
    """What identifies the current content of a source, for the prepare stage's fingerprint: a
    changed file, object or dataset revision makes prepared data out of date."""
    fmt = detect_format(path, fmt)
    if storage.is_remote(path):
        if not storage.exists(path):
            raise UnreadableSourceError(f"{path}: not found")
        return "object:" + storage.object_identity(path)
    if fmt == "hf":
        local = storage.local_path(path)
        return _folder_identity(local) if os.path.isdir(local) else _hub_identity(path)
    if not os.path.isfile(path):
        raise UnreadableSourceError(f"{path}: file not found")
    return "sha256:" + sha256_file(path)
