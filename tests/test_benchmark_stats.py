"""The paired bootstrap behind `python -m benchmarks lp-vs-baselines`: it must find a real difference
between two arms, find none where there is none, and pool seeds as the mean of their models."""

from __future__ import annotations

import numpy as np

from benchmarks.lp_vs_baselines.stats import mean_nll, paired_difference


def _rows(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 120, n).astype(np.float64)
    per_token = rng.gamma(4.0, 0.5, n)  # rows differ a lot in difficulty, as held-out answers do
    return rng, tokens, per_token


def test_a_constant_gap_is_found_exactly_with_a_tight_interval():
    rng, tokens, per_token = _rows()
    b = [per_token * tokens * rng.normal(1, 0.02) for _ in range(3)]
    a = [x + 0.05 * tokens for x in b]  # every row 0.05 nats/token worse
    d = paired_difference(a, b, tokens, resamples=500)
    assert abs(d["difference"] - 0.05) < 1e-12
    assert d["ci"][0] > 0.049 and d["ci"][1] < 0.051


def test_pairing_sees_a_small_gap_that_row_difficulty_would_hide():
    rng, tokens, per_token = _rows()
    b = [per_token * tokens]
    a = [(per_token + 0.03 + rng.normal(0, 0.02, len(tokens))) * tokens]
    d = paired_difference(a, b, tokens, resamples=1000)
    assert d["ci"][0] > 0  # paired: the rows' spread (gamma, sd ~1 nat) cancels
    spread = np.std(per_token)
    assert spread > 20 * 0.03


def test_no_difference_gives_an_interval_around_zero():
    rng, tokens, per_token = _rows(seed=3)
    b = [(per_token + rng.normal(0, 0.3, len(tokens))) * tokens for _ in range(3)]
    a = [(per_token + rng.normal(0, 0.3, len(tokens))) * tokens for _ in range(3)]
    d = paired_difference(a, b, tokens, resamples=1000)
    assert d["ci"][0] < 0 < d["ci"][1]


def test_seeds_pool_as_the_mean_of_their_models():
    rng, tokens, per_token = _rows(seed=5)
    a = [(per_token + s) * tokens for s in (0.1, 0.2, 0.3)]
    b = [per_token * tokens]
    d = paired_difference(a, b, tokens, resamples=200)
    assert np.isclose(d["difference"], 0.2)
    assert np.allclose(d["per_seed"], [mean_nll(x, tokens) for x in a])
    assert np.isclose(np.mean(d["per_seed"]) - d["baseline_per_seed"][0], d["difference"])
