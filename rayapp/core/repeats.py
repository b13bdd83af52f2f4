"""Repeated keys, found column-wise: sort by (key, order) and compare neighbours, so every
occurrence of a key after its first is found without a Python dict of every key. Prepare's
de-duplication partitions and the clusters file's id check both use it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def repeats(keys: pa.Table) -> pa.Table:
    """Among ``keys`` (id, order, row), every occurrence of an id after its first (smallest order):
    (order, first_order, first_row), sorted by order."""
    if keys.num_rows == 0:
        return pa.table({"order": pa.array([], pa.int64()), "first_order": pa.array([], pa.int64()),
                         "first_row": pa.array([], pa.int64())})
    keys = keys.take(pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("order", "ascending")]))
    ids = keys["id"].combine_chunks()
    n = len(ids)
    first = np.ones(n, dtype=bool)
    first[1:] = ~np.asarray(pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False))
    first_at = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    order, row = keys["order"].to_numpy(), keys["row"].to_numpy()
    repeat = ~first
    out = pa.table({"order": order[repeat], "first_order": order[first_at[repeat]],
                    "first_row": row[first_at[repeat]]})
    return out.sort_by("order")
