"""Selection strategies (pure numpy): the paper's cluster-stratified chunking and its baselines.

Every method reduces to a *sort key* (ascending = chosen first by the "low" chunk). Within each
cluster rows are sorted by the key and split into ``round(1 / budget)`` chunks with
``numpy.array_split`` semantics; the "low" chunk is the first, "mid" the middle one, "high" the
last. The global (unstratified) variant is the same with one cluster holding every row, or, given
a size (the main selection's row count, so compared subsets are equally large), that many rows from
the chosen end of the global order.

Cherry-LLM's IFD (``ifd_cherry``) is its own rule, as its authors compute it: rows cut to
max_length (where the trajectories say which) and rows whose IFD is above 1 (the prompt does not
help) or undefined are dropped, then the highest IFDs are kept,
globally: ``int(budget x rows left)`` of them, or the given size.
"""

from __future__ import annotations

import numpy as np

from rayapp.selection.methods import Trajectories, ifd_scores, method_named  # noqa: F401  (re-exported)
from rayapp.selection.metrics import no_response_rows


def n_chunks(budget: float) -> int:
    """1% -> 100 chunks, 5% -> 20, 10% -> 10, 25% -> 4, 33% -> 3 (the paper's budgets)."""
    if not 0 < budget <= 1:
        raise ValueError("budget must be in (0, 1]")
    return max(1, int(round(1 / budget)))


def sort_key(method: str, t: Trajectories, lp_epoch: int = 1, seed: int = 42) -> np.ndarray:
    """Ascending key: the rows a method wants most come first (``methods.METHODS[method].key``)."""
    m = method_named(method)
    return np.zeros(len(t.ids)) if m.key is None else m.key(t, lp_epoch, seed)


def chunk_index(chunk: str, k: int) -> int:
    return {"low": 0, "mid": k // 2, "high": k - 1}[chunk]


def stratified_select(key: np.ndarray, clusters: np.ndarray, budget: float, chunk: str = "low") -> np.ndarray:
    """Indices chosen: per cluster, sort by key (stable, ties keep row order), array_split into
    round(1/budget) chunks, keep the chosen chunk. Returned sorted ascending.

    One sort by (cluster, key, row) for all clusters, and each cluster's chunk from its row count
    alone (``array_split`` gives chunk j of n rows the ranks ``j*(n//k) + min(j, n%k)`` on, one more
    row for the first n%k chunks). A pass per cluster scanned every row once per cluster: 0.84 s
    against 0.27 s here at a million rows in 1,000 clusters, and it grows with the clusters."""
    key = np.asarray(key, dtype=np.float64)
    clusters = np.asarray(clusters)
    k = n_chunks(budget)
    which = chunk_index(chunk, k)
    if len(key) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((key, clusters))  # stable: equal (cluster, key) keep row order
    _, starts, counts = np.unique(clusters[order], return_index=True, return_counts=True)
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    size = np.repeat(counts, counts)
    lo = which * (size // k) + np.minimum(which, size % k)
    hi = lo + size // k + (which < size % k)
    return np.sort(order[(rank >= lo) & (rank < hi)])


def orderable(key: np.ndarray) -> np.ndarray:
    """int64 keys that sort as numpy sorts these floats (``argsort``, ``lexsort``): -0.0 equal to
    0.0, NaN after everything. A sort elsewhere (Ray Data's, by (key, row)) then gives numpy's order."""
    k = np.asarray(key, dtype=np.float64) + 0.0  # -0.0 + 0.0 is 0.0
    bits = k.view(np.int64)
    out = np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)
    return np.where(np.isnan(k), np.iinfo(np.int64).max, out)


def rank_range(rows: int, budget: float, chunk: str = "low", size: int | None = None) -> tuple[int, int]:
    """The ranks [lo, hi) a global selection keeps of ``rows`` candidates in key order: the chosen
    chunk (``array_split`` semantics, as one cluster holding every row), or ``size`` rows from the
    chosen end (low: the smallest keys, high: the largest, mid: the middle)."""
    if size is not None:
        size = min(size, rows)
        start = {"low": 0, "mid": (rows - size) // 2, "high": rows - size}[chunk]
        return start, start + size
    k = n_chunks(budget)
    which = chunk_index(chunk, k)
    lo = which * (rows // k) + min(which, rows % k)
    return lo, lo + rows // k + int(which < rows % k)


def take_from_end(key: np.ndarray, size: int, chunk: str = "low") -> np.ndarray:
    """``size`` indices from the chosen end of the global order (low: smallest keys first, high: the
    largest, mid: the middle), sorted ascending."""
    ordered = np.argsort(np.asarray(key, dtype=np.float64), kind="stable")
    lo, hi = rank_range(len(ordered), 1.0, chunk, size)
    return np.sort(ordered[lo:hi])


def candidates(method: str, t: Trajectories, lp_epoch: int = 1, seed: int = 42,
               keep_empty_responses: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """What a method ranks: the rows it may choose (rows with no response tokens excluded unless
    ``keep_empty_responses``; then its own ``keep`` rules), its sort key for every row, and the
    counts for provenance (each a sum over rows, so parts of the rows add up)."""
    m = method_named(method)
    empty = no_response_rows(t.P, t.n_tokens)
    eligible = np.ones(len(t.ids), dtype=bool) if keep_empty_responses else ~empty
    info = {"rows": len(t.ids), "no_response_rows": int(empty.sum()), "excluded_no_response": int((~eligible).sum())}
    if m.key is not None and m.keep is not None:
        for keep, dropped in m.keep(t):
            info[dropped] = int((eligible & ~keep).sum())
            eligible &= keep
    return eligible, sort_key(method, t, lp_epoch=lp_epoch, seed=seed), info


def global_size(method: str, eligible_rows: int, budget: float, size: int | None) -> int | None:
    """How many rows a global selection keeps: ``size`` when given; for a method with its own
    ``keep`` rules (Cherry-LLM), ``int(budget x the rows it keeps)``; else None (the chunk)."""
    if size is None and method_named(method).keep is not None:
        return int(eligible_rows * budget)
    return size


def selection_info(method: str, info: dict, selected: int, budget: float, stratified: bool,
                   matched: int | None) -> dict:
    """The provenance of one selection: the candidates' counts, the rows selected, and how."""
    if method_named(method).key is None:
        return {**info, "selected": selected, "scope": "global"}
    return {**info, "selected": selected, "chunks": n_chunks(budget), "scope": "stratified" if stratified else "global",
            **({"size_matched_to": matched} if matched is not None and not stratified else {})}


def select(
    method: str,
    t: Trajectories,
    budget: float,
    clusters: np.ndarray | None = None,
    chunk: str = "low",
    lp_epoch: int = 1,
    seed: int = 42,
    keep_empty_responses: bool = False,
    size: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Indices into ``t`` of the selected rows, and counts for provenance.

    Given ``clusters`` the selection is stratified (per-cluster chunks), else global: the global
    chunk, or exactly ``size`` rows when given. Rows with no response tokens are excluded before
    ranking (their LP is 0 by definition, so the original code ranks them hardest) unless
    ``keep_empty_responses`` reproduces that behaviour."""
    m = method_named(method)
    if m.needs_clusters and clusters is None:
        raise ValueError(f"{method} needs clusters")
    eligible, key, info = candidates(method, t, lp_epoch, seed, keep_empty_responses)
    pos = np.nonzero(eligible)[0]
    if m.key is None:  # every row
        return pos, selection_info(method, info, len(pos), budget, False, None)
    if m.scope == "global":
        clusters = None  # global by definition
    if clusters is not None:
        chosen = pos[stratified_select(key[pos], np.asarray(clusters)[pos], budget, chunk)]
    else:
        lo, hi = rank_range(len(pos), budget, chunk, global_size(method, len(pos), budget, size))
        chosen = np.sort(pos[np.argsort(key[pos], kind="stable")[lo:hi]])
    return chosen, selection_info(method, info, len(chosen), budget, clusters is not None, size)
