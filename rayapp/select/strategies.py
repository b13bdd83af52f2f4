"""Selection strategies (pure numpy): the paper's cluster-stratified chunking and its baselines.

Every method reduces to a *sort key* (ascending = chosen first by the "low" chunk). Within each
cluster rows are sorted by the key and split into ``round(1 / budget)`` chunks with
``numpy.array_split`` semantics; the "low" chunk is the first, "mid" the middle one, "high" the
last. The global (unstratified) variant is the same with one cluster holding every row, or, given
a size (the main selection's row count, so compared subsets are equally large), that many rows from
the chosen end of the global order.

Cherry-LLM's IFD (``ifd_cherry``) is its own rule, as its authors compute it: rows whose IFD is
above 1 (the prompt does not help) or undefined are dropped, then the highest IFDs are kept,
globally: ``int(budget x rows left)`` of them, or the given size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayapp.config import SELECT_METHODS as METHODS
from rayapp.select.metrics import ifd, learning_percentage, learning_percentage_approx


@dataclass
class Trajectories:
    """What the strategies need, one entry per row."""

    ids: np.ndarray  # str
    P: np.ndarray  # (n, epochs + 1)
    n_tokens: np.ndarray | None = None  # response tokens
    nll_response_only: np.ndarray | None = None  # epoch-0 NLL of the response without its prompt
    response_length: np.ndarray | None = None  # characters or tokens of the response
    # the model IFD is measured with, when not the reference's epoch 0 (e.g. the untrained target):
    # its mean NLL of the response with and without the prompt
    ifd_nll: np.ndarray | None = None
    ifd_nll_response_only: np.ndarray | None = None


def n_chunks(budget: float) -> int:
    """1% -> 100 chunks, 5% -> 20, 10% -> 10, 25% -> 4, 33% -> 3 (the paper's budgets)."""
    if not 0 < budget <= 1:
        raise ValueError("budget must be in (0, 1]")
    return max(1, int(round(1 / budget)))


def sort_key(method: str, t: Trajectories, lp_epoch: int = 1, seed: int = 42) -> np.ndarray:
    """Ascending key: the rows a method wants most come first."""
    n = len(t.ids)
    if method == "lp":
        return learning_percentage(t.P, lp_epoch)  # low LP(1) = learned late = hard
    if method == "lp_app":
        return learning_percentage_approx(t.P[:, 0], t.P[:, 1])
    if method == "ppl_high":
        return -t.P[:, 0]
    if method == "ppl_low":
        return t.P[:, 0]
    if method == "ifd":
        score = ifd_scores(t)
        # high IFD first; IFD >= 1 (the prompt does not help at all) and NaN go last
        return np.where(np.isnan(score) | (score >= 1), np.inf, -score)
    if method == "ifd_cherry":
        score = ifd_scores(t)
        # Cherry-LLM keeps IFD == 1 (it skips only `mean_rate > 1`); select() drops the rest
        return np.where(np.isnan(score) | (score > 1), np.inf, -score)
    if method == "longest":
        if t.response_length is None:
            raise ValueError("longest needs response lengths")
        return -np.asarray(t.response_length, dtype=np.float64)
    if method in ("random", "clust_rand"):
        # an independent stream per method: the two random baselines must not share one permutation
        return np.random.default_rng([seed, METHODS.index(method)]).permutation(n).astype(np.float64)
    if method == "full":
        return np.zeros(n)
    raise ValueError(f"unknown selection method {method!r}; known: {', '.join(METHODS)}")


def ifd_scores(t: Trajectories) -> np.ndarray:
    """IFD per row: mean NLL of the response given its prompt over its mean NLL alone (epoch 0)."""
    if t.ifd_nll is not None and t.ifd_nll_response_only is not None:
        return ifd(t.ifd_nll, t.ifd_nll_response_only)
    if t.nll_response_only is None:
        raise ValueError("ifd needs response-only scores (score.modes must include response_only)")
    return ifd(np.log(t.P[:, 0]), t.nll_response_only)


def chunk_index(chunk: str, k: int) -> int:
    return {"low": 0, "mid": k // 2, "high": k - 1}[chunk]


def stratified_select(key: np.ndarray, clusters: np.ndarray, budget: float, chunk: str = "low") -> np.ndarray:
    """Indices chosen: per cluster, sort by key (stable, ties keep row order), array_split into
    round(1/budget) chunks, keep the chosen chunk. Returned sorted ascending."""
    key = np.asarray(key, dtype=np.float64)
    clusters = np.asarray(clusters)
    k = n_chunks(budget)
    which = chunk_index(chunk, k)
    chosen = []
    for c in np.unique(clusters):
        rows = np.nonzero(clusters == c)[0]
        ordered = rows[np.argsort(key[rows], kind="stable")]
        chosen.append(np.array_split(ordered, k)[which])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def take_from_end(key: np.ndarray, size: int, chunk: str = "low") -> np.ndarray:
    """``size`` indices from the chosen end of the global order (low: smallest keys first, high: the
    largest, mid: the middle), sorted ascending."""
    ordered = np.argsort(np.asarray(key, dtype=np.float64), kind="stable")
    size = min(size, len(ordered))
    start = {"low": 0, "mid": (len(ordered) - size) // 2, "high": len(ordered) - size}[chunk]
    return np.sort(ordered[start:start + size])


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
    from rayapp.select.metrics import no_response_rows

    n = len(t.ids)
    empty = no_response_rows(t.P, t.n_tokens)
    eligible = np.ones(n, dtype=bool) if keep_empty_responses else ~empty
    info = {"rows": n, "no_response_rows": int(empty.sum()), "excluded_no_response": int((~eligible).sum())}
    if method == "full":
        idx = np.nonzero(eligible)[0]
        return idx, {**info, "selected": len(idx), "scope": "global"}
    if method == "clust_rand" and clusters is None:
        raise ValueError("clust_rand needs clusters")
    matched = size
    if method in ("random", "ifd_cherry"):
        clusters = None  # global by definition
    if method == "ifd_cherry":
        score = ifd_scores(t)
        keep = ~np.isnan(score) & (score <= 1)  # Cherry-LLM: `if mean_rate > 1: continue`
        info["dropped_ifd_above_1_or_undefined"] = int((eligible & ~keep).sum())
        eligible &= keep
        if size is None:
            size = int(eligible.sum() * budget)
    key = sort_key(method, t, lp_epoch=lp_epoch, seed=seed)
    pos = np.nonzero(eligible)[0]
    if clusters is not None:
        chosen = pos[stratified_select(key[pos], np.asarray(clusters)[pos], budget, chunk)]
    elif size is not None:
        chosen = pos[take_from_end(key[pos], size, chunk)]
    else:
        chosen = pos[stratified_select(key[pos], np.zeros(len(pos), dtype=np.int64), budget, chunk)]
    return chosen, {**info, "selected": int(len(chosen)), "chunks": n_chunks(budget),
                    "scope": "stratified" if clusters is not None else "global",
                    **({"size_matched_to": matched} if matched is not None and clusters is None else {})}
