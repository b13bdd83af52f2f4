"""Token-budget batching (pure): sort rows by length and pack them so padded tokens stay small."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_budget_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int,
                         max_padding: float = 1.0) -> list[list[int]]:
    """Group row indices into batches whose padded size (rows x longest row) fits ``batch_tokens``.

    Rows are taken longest first, so each batch holds rows of similar length; a row longer than
    the budget gets a batch of its own rather than being dropped. ``max_padding`` < 1 also closes a
    batch before a row shorter than ``(1 - max_padding)`` x the batch's longest, so no batch is more
    than that share padding: with a GPU-sized budget, the sparse long tail of a length
    distribution would otherwise share batches with rows half their length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        width = max(longest, n)
        if current and ((len(current) + 1) * width > batch_tokens or len(current) >= max_rows
                        or n < (1 - max_padding) * width):
            batches.append(current)
            current, longest = [], 0
            width = n
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def fixed_size_batches(n_rows: int, batch_size: int) -> list[list[int]]:
    """The hand-written baseline: consecutive rows, fixed count per batch."""
    return [list(range(lo, min(lo + batch_size, n_rows))) for lo in range(0, n_rows, batch_size)]


def padding_stats(lengths: Sequence[int], batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded tokens) for a batching of rows with these lengths."""
    real = padded = 0
    for b in batches:
        width = max(lengths[i] for i in b)
        real += sum(lengths[i] for i in b)
        padded += width * len(b)
    return real, padded


def length_ordered_units(lengths: Sequence[int], rows_per_unit: int) -> list[np.ndarray]:
    """Cut a shard's rows into work units of ``rows_per_unit`` rows taken in length order (longest
    first; ties in row order), so each unit, and each batch cut from it, holds rows of similar
    length. Consecutive rows in file order have unrelated lengths, so units of consecutive rows
    padded every batch to its longest row (17% of the computed tokens on Alpaca, against 0.1%
    when the whole set is sorted). Row indices inside a unit are sorted, for a cheap ``take``."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths, dtype=np.int64)))
    return [np.sort(order[lo:lo + rows_per_unit]) for lo in range(0, len(order), rows_per_unit)]
