"""Read and write run outputs on a local path or an object store (s3://, gs://) through pyarrow.fs.

Every write is atomic: the bytes go to a temporary name in the same folder and are renamed into
place, so a crash never leaves a half-written file that a later stage would take as complete.
(On object stores a single PUT is already atomic, and rename is not, so we write directly.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly inside folder ``uri`` ending with ``suffix``, sorted, as full URIs/paths."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and ".tmp-" not in i.base_name
    )
    return [join(uri, n) for n in names]


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_remote(uri):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_text(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def write_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes_atomic(uri, buf.getvalue())


@contextlib.contextmanager
def _atomic_output(uri: str):
    """An output stream for ``uri`` that appears whole or not at all where the file system allows
    (a local file: written under a temporary name, renamed into place on success, deleted on failure)."""
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    target = path if is_remote(uri) else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(target) as out:
            yield out
    except BaseException:
        if target != path and fs.get_file_info(target).type == pafs.FileType.File:
            fs.delete_file(target)
        raise
    if target != path:
        os.replace(target, path)


def write_parquet_parts(uri: str, parts: Iterable[pa.Table]) -> int:
    """One Parquet file from ``parts`` (tables of one schema), written as they come, so only one
    part is in memory at a time; atomically where the file system allows (a local file appears
    whole or not at all). Returns the rows written. One part gives the bytes ``write_parquet`` does."""
    rows, writer = 0, None
    with _atomic_output(uri) as out:
        for part in parts:
            if writer is None:
                writer = pq.ParquetWriter(out, part.schema, compression="zstd")
            writer.write_table(part)
            rows += part.num_rows
        if writer is None:
            raise ValueError(f"{uri}: no parts to write")
        writer.close()
    return rows


def read_parquet(uri: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """``filters`` (pyarrow's DNF) skip the row groups whose statistics rule them out."""
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters)


def read_schema(uri: str) -> pa.Schema:
    """A Parquet file's schema, from its footer."""
    fs, path = resolve(uri)
    return pq.read_schema(path, filesystem=fs)


def read_row_groups(uri: str, positions, columns: list[str] | None = None) -> pa.Table:
    """The rows at ``positions`` (sorted) of a Parquet file, reading only the row groups that hold them."""
    import numpy as np

    fs, path = resolve(uri)
    positions = np.asarray(positions, dtype=np.int64)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of = np.searchsorted(starts, positions, side="right") - 1
        groups = np.unique(group_of)  # ascending: the groups follow one another in the table read
        table = pf.read_row_groups(groups.tolist(), columns=columns)
    # where each group read begins in that table, less where it begins in the file
    begins = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64)[groups])])[:-1]
    shift = (begins - starts[groups])[np.searchsorted(groups, group_of)]
    return table.take(pa.array(positions + shift))


def iter_chunks(uri: str, chunk_bytes: int = 1 << 22):
    """The bytes of ``uri``, ``chunk_bytes`` at a time."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as src:
        while chunk := src.read(chunk_bytes):
            yield chunk


def concat_files(parts: list[str], uri: str, chunk_bytes: int = 1 << 22) -> int:
    """One file of ``parts`` one after another, copied a chunk at a time (never one part whole in
    memory), atomically where the file system allows. Returns the bytes written."""
    written = 0
    with _atomic_output(uri) as out:
        for part in parts:
            for chunk in iter_chunks(part, chunk_bytes):
                out.write(chunk)
                written += len(chunk)
    return written


def read_parquet_or_raise(uri: str, error: type[Exception], what: str = "") -> pa.Table:
    """``read_parquet`` of a file a user named, its failures raised as ``error`` naming the file
    (``what``: the setting that names it, e.g. "select.clusters")."""
    where = f"{what}: {uri}" if what else uri
    if not exists(uri):
        raise error(f"{where}: file not found")
    try:
        return read_parquet(uri)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise error(f"{where}: not a readable Parquet file: {exc}") from None


def read_parquet_dir(uri: str, columns: list[str] | None = None) -> pa.Table:
    files = list_files(uri, ".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet files in {uri}")
    return pa.concat_tables([read_parquet(f, columns) for f in files])


def local_path(uri: str) -> str:
    """A local filesystem path for ``uri``; remote URIs are returned unchanged."""
    return uri if is_remote(uri) else resolve(uri)[1]


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly inside ``uri`` (empty if it does not exist)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))
                  if i.type == pafs.FileType.Directory)


def remove_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def remove(uri: str) -> None:
    """Remove a file or a folder (with its contents); nothing if it is not there."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def object_identity(uri: str) -> str:
    """What identifies a file's current version without reading it: size and modification time
    (an object store's PUT changes both). Used for sources too large, or too remote, to hash."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    mtime = info.mtime_ns if info.mtime_ns is not None else None
    return f"size={info.size};mtime_ns={mtime}"


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files (recursively) to ``uri``; an object store gets one PUT per file."""
    pafs.copy_files(os.path.abspath(local_dir), uri if is_remote(uri) else resolve(uri)[1],
                    destination_filesystem=None if is_remote(uri) else pafs.LocalFileSystem())


def download_dir(uri: str, local_dir: str, skip_suffixes: tuple[str, ...] = ()) -> str:
    """Copy folder ``uri`` into ``local_dir`` (written under a temporary name, then renamed, so a
    half-finished download is never taken for a complete one), leaving out files whose names end
    with ``skip_suffixes`` (e.g. the weights, when only a model's config and tokenizer are needed).
    Returns ``local_dir``."""
    import shutil

    tmp = f"{local_dir.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    fs, path = resolve(uri)
    os.makedirs(tmp)  # copy_files creates sub-folders, not the destination itself
    if skip_suffixes:
        _copy_files_except(fs, path, tmp, skip_suffixes)
    else:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if os.path.exists(local_dir):
        shutil.rmtree(local_dir)
    os.makedirs(os.path.dirname(os.path.abspath(local_dir)), exist_ok=True)
    os.replace(tmp, local_dir)
    return local_dir


def _copy_files_except(fs: pafs.FileSystem, path: str, local_dir: str, skip_suffixes: tuple[str, ...]) -> None:
    import shutil

    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File or info.path.endswith(skip_suffixes):
            continue
        dest = os.path.join(local_dir, os.path.relpath(info.path, path))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def cache_root() -> str:
    """The node's rayapp cache ($RAYAPP_CACHE_DIR, else ~/.cache/rayapp)."""
    return os.environ.get("RAYAPP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rayapp")


def local_cache_dir(uri: str, kind: str) -> str:
    """A per-URI folder under the node's cache for copies of remote artifacts (models, checkpoints)."""
    from rayapp.core.hashing import short_digest

    return os.path.join(cache_root(), kind, short_digest(uri.encode()))


def jsonl_records(where: str, text: str):
    """(line number, record) of each non-empty line of a JSONL text; a bad line is a ValueError
    naming ``where`` and the line."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}:{lineno}: not valid JSON ({exc.msg})") from None
