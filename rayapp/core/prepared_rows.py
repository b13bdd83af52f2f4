"""The prepared shards read by position, a column or a handful of rows at a time.

A stage that needs a few columns of every row (select: response lengths, truncation flags) or the
full rows of a subset (a selection, a report's examples) reads just those, shard by shard, instead
of every column of every shard into one table: the token ids alone are most of the bytes, and a
selection holds a fraction of the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp.core import storage


class PreparedRows:
    """The prepared shards, in order, with their row counts (``PreparedManifest.shards``)."""

    def __init__(self, paths: Sequence[str], rows: Sequence[int]):
        self.paths = list(paths)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(rows, dtype=np.int64))])

    @classmethod
    def of(cls, prepared, layout) -> PreparedRows:
        return cls(prepared.shard_paths(layout), [s.rows for s in prepared.shards])

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    @property
    def column_names(self) -> list[str]:
        """The shards' columns (read from the first shard's footer)."""
        import pyarrow.parquet as pq

        fs, path = storage.resolve(self.paths[0])
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow.names

    def columns(self, names: list[str], per_shard=lambda shard: shard) -> pa.Table:
        """These columns of every row, in prepared order; ``per_shard(table) -> table`` reduces each
        shard's before the next is read (e.g. a text column to its lengths)."""
        return pa.concat_tables([per_shard(storage.read_parquet(p, names)) for p in self.paths])

    def take(self, positions: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """The rows at these prepared positions, in the order given; only the shards holding one
        of them are read, each once."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.rows):
            raise IndexError(f"prepared positions out of range 0..{self.rows - 1}")
        order = np.argsort(positions, kind="stable")
        ascending = positions[order]
        shard_of = np.searchsorted(self.starts, ascending, side="right") - 1
        parts = []
        for s in np.unique(shard_of):
            local = ascending[shard_of == s] - self.starts[s]
            parts.append(storage.read_parquet(self.paths[s], columns).take(pa.array(local)))
        if not parts:  # no rows: the schema of the first shard
            return storage.read_parquet(self.paths[0], columns).slice(0, 0) if self.paths else pa.table({})
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(order, kind="stable")))  # back to the order given


def positions_of(ids: pa.Array | np.ndarray, prepared_ids: pa.Array, within: str = "the prepared data") -> np.ndarray:
    """Each id's position among ``prepared_ids``, column-wise; the trajectories are written in
    prepared order, so this is usually ``arange`` and checked as such first. Raises KeyError
    naming an id that is not there (``within``: what ``prepared_ids`` are, for the message)."""
    ids = pa.array(ids, pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    if isinstance(prepared_ids, pa.ChunkedArray):
        prepared_ids = prepared_ids.combine_chunks()
    if len(ids) == len(prepared_ids) and pc.all(pc.equal(ids, prepared_ids)).as_py():
        return np.arange(len(ids), dtype=np.int64)
    pos = pc.index_in(ids, value_set=prepared_ids)
    if pos.null_count:
        missing = pc.filter(ids, pc.is_null(pos))
        raise KeyError(f"{len(missing)} ids are not in {within} (e.g. {missing[0].as_py()})")
    return np.asarray(pos.to_numpy(zero_copy_only=False), dtype=np.int64)
