"""Paired bootstrap of held-out response NLL between two arms, pooled over seeds (no Ray, no torch)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def mean_nll(loss: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted mean response NLL of one model over rows."""
    return float(loss.sum() / tokens.sum())


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], tokens: np.ndarray, *,
                      resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Arm ``a`` minus arm ``b`` in token-weighted mean NLL on the same rows: each arm is the mean
    over its seeds' models (one array of per-row loss sums per seed, aligned with ``tokens``).
    The rows are resampled jointly for every model (scipy's paired bootstrap, BCa), so the
    interval reflects which rows were held out; the seeds' own spread is in ``per_seed``."""
    k = len(a)

    def statistic(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        n = arrays[0].sum(axis=axis)
        ma = np.mean([x.sum(axis=axis) / n for x in arrays[1:1 + k]], axis=0)
        mb = np.mean([x.sum(axis=axis) / n for x in arrays[1 + k:]], axis=0)
        return ma - mb

    data = (tokens.astype(np.float64), *[x.astype(np.float64) for x in a], *[x.astype(np.float64) for x in b])
    res = stats.bootstrap(data, statistic, n_resamples=resamples, paired=True, vectorized=True,
                          confidence_level=confidence, rng=np.random.default_rng(seed))
    return {"difference": float(statistic(*data)),
            "ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
            "per_seed": [mean_nll(x, tokens) for x in a],
            "baseline_per_seed": [mean_nll(x, tokens) for x in b]}
