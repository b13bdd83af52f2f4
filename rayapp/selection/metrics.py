"""Pure math on loss trajectories (numpy only; no Ray, no torch).

P is an (n_rows, n_epochs + 1) array of perplexities: P[:, 0] before training, P[:, i] after epoch i.
"""

from __future__ import annotations

import numpy as np


def learning_percentage(P: np.ndarray, i: int = 1) -> np.ndarray:
    """LP(i) = (P[i-1] - P[i]) / (P0 - Pn): the share of the total drop that happened in epoch i.
    Defined as 0 where P0 == Pn (no drop at all)."""
    P = np.asarray(P, dtype=np.float64)
    if not 1 <= i < P.shape[1]:
        raise ValueError(f"LP({i}) needs 1 <= i <= {P.shape[1] - 1} epochs")
    total = P[:, 0] - P[:, -1]
    step = P[:, i - 1] - P[:, i]
    out = np.zeros(len(P))
    np.divide(step, total, out=out, where=total != 0)
    return out


def learning_percentage_approx(P0: np.ndarray, P1: np.ndarray) -> np.ndarray:
    """LP_app = (P0 - P1) / P0: needs only one epoch. 0 where P0 == 0 (cannot happen for perplexities)."""
    P0 = np.asarray(P0, dtype=np.float64)
    P1 = np.asarray(P1, dtype=np.float64)
    out = np.zeros(len(P0))
    np.divide(P0 - P1, P0, out=out, where=P0 != 0)
    return out


def ifd(nll_prompted: np.ndarray, nll_response_only: np.ndarray) -> np.ndarray:
    """Instruction-following difficulty: loss of the response given its prompt / loss of the
    response alone. Near 1: the prompt barely helps (hard); NaN where the alone-loss is 0."""
    a = np.asarray(nll_prompted, dtype=np.float64)
    b = np.asarray(nll_response_only, dtype=np.float64)
    out = np.full(len(a), np.nan)
    np.divide(a, b, out=out, where=b > 0)
    return out


def no_response_rows(P: np.ndarray, n_tokens: np.ndarray | None) -> np.ndarray:
    """Rows with no response tokens (every label masked): their perplexity is 1 at every epoch.

    With token counts this is exact; for trajectories published without them (the paper's), a
    row whose perplexity is exactly 1.0 at every checkpoint is taken as one."""
    if n_tokens is not None:
        return np.asarray(n_tokens) == 0
    return np.all(np.asarray(P) == 1.0, axis=1)


def metric_columns(P: np.ndarray) -> dict[str, np.ndarray]:
    """The scores a selected row carries: P0..Pn, LP(1..n) and LP_app."""
    cols = {f"P{i}": P[:, i] for i in range(P.shape[1])}
    for i in range(1, P.shape[1]):
        cols[f"lp{i}"] = learning_percentage(P, i)
    cols["lp_app"] = learning_percentage_approx(P[:, 0], P[:, 1])
    return cols


def lp_of(method: str, lp_epoch: int, P: np.ndarray) -> np.ndarray:
    """The LP a selection's report plots and picks its examples by: LP_app for ``lp_app``, else LP(lp_epoch)."""
    return learning_percentage_approx(P[:, 0], P[:, 1]) if method == "lp_app" else learning_percentage(P, lp_epoch)
