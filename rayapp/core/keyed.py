"""Files that say what they were made from. A stage's intermediate results (a model's answers, a
pair's judgments, a scored (checkpoint, shard) unit, the embeddings) are written with the keys that
made them, and reused only while the keys asked for are the ones written: a changed config or input
means the file is made again, and a file cut off mid-write (no keys) is never taken as done.

Parquet files carry their keys in the footer's key-value metadata, so a check reads only the
footer. Line-delimited JSON carries them in a ``<file>.meta.json`` beside it, written last."""

from __future__ import annotations

import json
from typing import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from rayapp.core import storage

META_SUFFIX = ".meta.json"


def with_keys(table: pa.Table, keys: Mapping[str, str]) -> pa.Table:
    """``table`` with ``keys`` added to its schema metadata (what it already had is kept)."""
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): str(v).encode() for k, v in keys.items()})
    return table.replace_schema_metadata(meta)


def write_table(uri: str, table: pa.Table, keys: Mapping[str, str]) -> None:
    storage.write_parquet(uri, with_keys(table, keys))


def table_keys(uri: str) -> tuple[dict[str, str], int] | None:
    """The keys in a Parquet file's footer and its row count; None if it is absent or unreadable."""
    if not storage.exists(uri):
        return None
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.read_metadata(f)
    except Exception:  # a torn or foreign file is not a result: it is made again
        return None
    have = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (meta.metadata or {}).items()}
    return have, meta.num_rows


def is_current(uri: str, keys: Mapping[str, str], rows: int | None = None, absent: tuple | list = ()) -> bool:
    """Whether the Parquet file at ``uri`` was written with ``keys`` (and has ``rows`` rows), and
    without any of the ``absent`` keys (settings written only where they are not the default)."""
    found = table_keys(uri)
    if found is None:
        return False
    have, n = found
    return ((rows is None or n == rows) and all(have.get(k) == str(v) for k, v in keys.items())
            and not any(k in have for k in absent))


def read_table(uri: str, keys: Mapping[str, str], columns: list[str] | None = None) -> pa.Table | None:
    """The table at ``uri`` if it was written with ``keys``, else None."""
    if not is_current(uri, keys):
        return None
    return storage.read_parquet(uri, columns)


def write_records(uri: str, records: list[dict], keys: Mapping[str, str], **about) -> None:
    """``records`` as JSON lines, then the keys (and ``about``, for people) beside them."""
    storage.write_text(uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    storage.write_json(uri + META_SUFFIX, {**{k: str(v) for k, v in keys.items()}, "rows": len(records), **about})


def read_records(uri: str, keys: Mapping[str, str]) -> list[dict] | None:
    """The records at ``uri`` if they were written with ``keys``, else None."""
    meta_uri = uri + META_SUFFIX
    if not storage.exists(meta_uri) or not storage.exists(uri):
        return None
    meta = storage.read_json(meta_uri)
    if any(meta.get(k) != str(v) for k, v in keys.items()):
        return None
    records = [r for _, r in storage.jsonl_records(uri, storage.read_bytes(uri).decode("utf-8"))]
    if "rows" in meta and len(records) != meta["rows"]:
        return None
    return records
