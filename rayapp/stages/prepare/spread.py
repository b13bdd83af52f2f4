"""The bookkeeping of prepare without a gather (pure; distributed.py runs it on Ray Data).

The driver keeps one small summary per block and per shard, never a row: from each block's count
of outcomes and the lines it spans it works out where the block's lines start and how many of its
outcomes fall within its source's ``limit``; from each block's count of kept rows and its few
held-out candidates, which rows are held out and which rows go to which shard. Duplicates are
found by a hash-partitioned pass: every block sends each (id, order) to a partition chosen by a
hash of the id, and each partition sorts its keys, so every repeat of an id, in any file or
block, meets the first occurrence in one place.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np

from rayapp.core.work_items import hash_partition

ORDER_BITS = 32  # an order key is (global block index << 32) | position of the outcome in its block


def order_keys(block: int, positions: np.ndarray) -> np.ndarray:
    """Keys that sort outcomes as one sequential read of every source would meet them."""
    return (np.int64(block) << ORDER_BITS) | positions.astype(np.int64)


def block_of(order: np.ndarray) -> np.ndarray:
    return order >> ORDER_BITS


def position_of(order: np.ndarray) -> np.ndarray:
    return order & ((1 << ORDER_BITS) - 1)


def partition_of(ids: Iterable[str], partitions: int) -> np.ndarray:
    """The dedupe partition of each id (``work_items.hash_partition``)."""
    return hash_partition(ids, partitions)


def partitions_for(blocks: int, workers: int) -> int:
    """Enough partitions to keep both workers busy, and at least one per 8 blocks, so a partition
    holds about 8 blocks' keys however large the sources grow."""
    return max(1, min(blocks, 2 * workers), -(-blocks // 8))


def starts_and_cuts(sources: list[int], outcomes: list[int], spans: list[int],
                    limits: list[int | None]) -> tuple[list[int], list[int]]:
    """For blocks in source order (their source, outcome count, lines spanned): the line number
    each block's rows are offset by, and how many of its outcomes are read (a source's ``limit``
    counts rows from its start, across blocks)."""
    offsets, cuts = [], []
    spanned: dict[int, int] = {}
    read: dict[int, int] = {}
    for source, n, span in zip(sources, outcomes, spans):
        offsets.append(spanned.get(source, 0))
        spanned[source] = offsets[-1] + span
        limit = limits[source]
        cut = n if limit is None else max(0, min(n, limit - read.get(source, 0)))
        cuts.append(cut)
        read[source] = read.get(source, 0) + cut
    return offsets, cuts


def within_cuts(order: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Which keys belong to outcomes that are read (inside their source's limit)."""
    return position_of(order) < cuts[block_of(order)]


def smallest(candidates: Iterable[list[tuple[str, int, int]]], n: int) -> list[tuple[str, int, int]]:
    """The ``n`` smallest (holdout key, block, row) over every block's own ``n`` smallest, merged a
    block at a time: no more than ``n`` plus one block's are held."""
    best: list[tuple[str, int, int]] = []
    for block in candidates:
        best = heapq.nsmallest(n, best + list(block))
    return sorted(best)


def shard_pieces(rows_per_block: list[int], shard_rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive shards of ``shard_rows`` over the blocks' training rows in block order (the same
    cut as slicing one table of them): each shard as (block, first, stop) ranges of its blocks'
    training rows."""
    shards: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = shard_rows
    for block, n in enumerate(rows_per_block):
        lo = 0
        while lo < n:
            take = min(room, n - lo)
            current.append((block, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_rows
    if current:
        shards.append(current)
    return shards
