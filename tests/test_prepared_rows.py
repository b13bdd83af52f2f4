"""Reading prepared shards by position (select's rows without reading the whole prepared table)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp.core.prepared_rows import PreparedRows, positions_of


@pytest.fixture
def shards(tmp_path):
    """Three shards of 4, 0 and 5 rows (an empty shard is legal: a small dataset, many workers)."""
    sizes, paths, start = [4, 0, 5], [], 0
    for s, n in enumerate(sizes):
        ids = [f"r{start + i}" for i in range(n)]
        path = tmp_path / f"shard-{s}.parquet"
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "output": [f"text of {i}" for i in ids],
                                 "input_ids": [[start + i] * (i + 1) for i in range(n)]}), path)
        paths.append(str(path))
        start += n
    return PreparedRows(paths, sizes)


def test_take_returns_rows_in_the_order_given_across_shards(shards):
    assert shards.rows == 9
    got = shards.take(np.array([7, 0, 5, 3, 8]))
    assert got["id"].to_pylist() == ["r7", "r0", "r5", "r3", "r8"]
    assert got["input_ids"].to_pylist()[0] == [7] * 4  # the whole row, not just its id
    assert shards.take(np.array([6, 1]), columns=["output"]).column_names == ["output"]
    empty = shards.take(np.array([], dtype=np.int64))
    assert empty.num_rows == 0 and "id" in empty.column_names
    with pytest.raises(IndexError, match="0..8"):
        shards.take(np.array([9]))


def test_columns_reduces_each_shard_before_the_next(shards):
    lengths = shards.columns(["id", "output"], per_shard=lambda t: t.select(["id"]))
    assert lengths.column_names == ["id"] and lengths["id"].to_pylist() == [f"r{i}" for i in range(9)]


def test_positions_of_ids_in_prepared_order_and_out_of_it(shards):
    prepared_ids = shards.columns(["id"])["id"]
    same = positions_of(np.array([f"r{i}" for i in range(9)]), prepared_ids)
    assert same.tolist() == list(range(9))
    assert positions_of(np.array(["r8", "r2", "r4"]), prepared_ids).tolist() == [8, 2, 4]
    with pytest.raises(KeyError, match="1 ids are not in the prepared data .*nope"):
        positions_of(np.array(["r1", "nope"]), prepared_ids)
