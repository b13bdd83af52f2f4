"""Selection math on hand-made trajectories with known answers, plus property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayapp.selection.metrics import ifd, learning_percentage, learning_percentage_approx, no_response_rows
from rayapp.selection.strategies import Trajectories, n_chunks, select, stratified_select


def test_lp_known_values():
    P = np.array([
        [10.0, 6.0, 3.0, 2.0],   # drop 8: epoch-1 share 4/8
        [10.0, 9.0, 4.0, 2.0],   # 1/8: learned late (hard)
        [10.0, 2.0, 2.0, 2.0],   # 8/8: learned at once (easy)
        [5.0, 5.0, 5.0, 5.0],    # P0 == Pn: defined as 0
        [4.0, 5.0, 4.5, 3.0],    # perplexity went *up* in epoch 1: negative share
    ])
    np.testing.assert_allclose(learning_percentage(P, 1), [0.5, 0.125, 1.0, 0.0, -1.0])
    np.testing.assert_allclose(learning_percentage(P, 2), [3 / 8, 5 / 8, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(learning_percentage(P, 3), [1 / 8, 2 / 8, 0.0, 0.0, 1.5])
    # the shares of all epochs add up to 1 wherever there was a drop
    total = sum(learning_percentage(P, i) for i in (1, 2, 3))
    np.testing.assert_allclose(total[[0, 1, 2, 4]], 1.0)
    np.testing.assert_allclose(learning_percentage_approx(P[:, 0], P[:, 1]), [0.4, 0.1, 0.8, 0.0, -0.25])
    with pytest.raises(ValueError):
        learning_percentage(P, 4)


def test_ifd_and_no_response_detection():
    np.testing.assert_allclose(ifd(np.array([1.0, 2.0, 1.0]), np.array([2.0, 2.0, 0.0]))[:2], [0.5, 1.0])
    assert np.isnan(ifd(np.array([1.0]), np.array([0.0]))[0])
    P = np.array([[1.0, 1.0, 1.0], [2.0, 1.5, 1.2]])
    assert no_response_rows(P, None).tolist() == [True, False]  # published trajectories: all-ones
    assert no_response_rows(P, np.array([3, 0])).tolist() == [False, True]  # token counts win


def test_chunks_for_paper_budgets():
    assert [n_chunks(b) for b in (0.01, 0.03, 0.05, 0.10, 0.25, 0.33)] == [100, 33, 20, 10, 4, 3]


def test_stratified_array_split_semantics_and_tiny_clusters():
    key = np.array([5, 1, 3, 2, 4, 0.5, 9, 8], dtype=float)
    clusters = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    # 3 chunks: cluster 0 (5 rows) -> sizes 2,2,1; cluster 1 (1 row) -> 1,0,0; cluster 2 (2 rows) -> 1,1,0
    low = stratified_select(key, clusters, 1 / 3, "low")
    assert low.tolist() == [1, 3, 5, 7]  # keys 1,2 | 0.5 | 8
    high = stratified_select(key, clusters, 1 / 3, "high")
    assert high.tolist() == [0]  # last chunk of cluster 0 only; the tiny clusters' last chunks are empty
    mid = stratified_select(key, clusters, 1 / 3, "mid")
    assert mid.tolist() == [2, 4, 6]


def _per_cluster_loop(key, clusters, budget, chunk):
    """The definition, one cluster at a time (what stratified_select computed before one sort)."""
    k = n_chunks(budget)
    which = {"low": 0, "mid": k // 2, "high": k - 1}[chunk]
    chosen = [np.array_split(rows[np.argsort(key[rows], kind="stable")], k)[which]
              for rows in (np.nonzero(clusters == c)[0] for c in np.unique(clusters))]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 120).flatmap(lambda n: st.tuples(
    st.lists(st.one_of(st.sampled_from([0.0, 1.0, np.inf, -np.inf, np.nan]), st.floats(-5, 5)),
             min_size=n, max_size=n),
    st.lists(st.integers(-2, 12), min_size=n, max_size=n),
    st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.33, 0.5, 1.0]), st.sampled_from(["low", "mid", "high"]))))
def test_one_sort_selects_what_the_per_cluster_loop_does(args):
    key, clusters, budget, chunk = np.array(args[0], dtype=np.float64), np.array(args[1]), args[2], args[3]
    got = stratified_select(key, clusters, budget, chunk)
    assert got.tolist() == _per_cluster_loop(key, clusters, budget, chunk).tolist()


def test_ties_keep_row_order():
    key = np.zeros(6)
    assert stratified_select(key, np.zeros(6, dtype=int), 0.5).tolist() == [0, 1, 2]


def test_empty_response_rows_are_excluded_unless_reproducing_the_original():
    P = np.array([[8.0, 2.0, 1.5], [1.0, 1.0, 1.0], [8.0, 7.0, 1.5], [6.0, 3.0, 2.0]])
    t = Trajectories(ids=np.array(list("abcd")), P=P, n_tokens=np.array([5, 0, 7, 3]))
    fixed, info = select("lp", t, 0.25)
    assert info["excluded_no_response"] == 1 and 1 not in fixed.tolist()
    assert fixed.tolist() == [2]  # LP(1) = 1/6.5: the hardest real row
    original, _ = select("lp", t, 0.25, keep_empty_responses=True)
    assert original.tolist() == [1]  # the original code's pitfall: LP = 0 ranks hardest


def test_baselines_order_rows_as_documented():
    P = np.array([[3.0, 2.0], [9.0, 2.0], [5.0, 4.0], [7.0, 1.0]])
    t = Trajectories(ids=np.array(list("abcd")), P=P, n_tokens=np.array([1, 9, 3, 5]),
                     nll_response_only=np.log(np.array([3.1, 90.0, 5.2, 7.5])), response_length=np.array([1, 9, 3, 5]))
    assert select("ppl_high", t, 0.25)[0].tolist() == [1]
    assert select("ppl_low", t, 0.25)[0].tolist() == [0]
    assert select("longest", t, 0.25)[0].tolist() == [1]
    # IFD = ln P0 / response-only NLL: rows 0..3 -> 0.971, 0.488, 0.976, 0.966; highest (row 2) first
    assert select("ifd", t, 0.25)[0].tolist() == [2]
    assert select("full", t, 0.25)[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="clust_rand needs clusters"):
        select("clust_rand", t, 0.25)


trajectories = st.integers(min_value=1, max_value=120).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(1.0, 50.0), min_size=n * 3, max_size=n * 3),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.sampled_from([0.01, 0.05, 0.1, 0.25, 0.33, 0.5, 1.0]),
        st.sampled_from(["low", "mid", "high"]),
        st.sampled_from(["lp", "lp_app", "ppl_high", "clust_rand", "random"]),
        st.integers(0, 10),
    )
)


@settings(max_examples=150, deadline=None)
@given(trajectories)
def test_selection_properties(args):
    flat, clusters, budget, chunk, method, seed = args
    n = len(clusters)
    P = np.array(flat).reshape(n, 3)
    clusters = np.array(clusters)
    ids = np.array([f"id{i}" for i in range(n)])
    t = Trajectories(ids=ids, P=P, n_tokens=np.full(n, 4))
    idx, info = select(method, t, budget, clusters=clusters, chunk=chunk, seed=seed)
    k = n_chunks(budget)
    which = {"low": 0, "mid": k // 2, "high": k - 1}[chunk if method not in ("random",) else chunk]
    # size = sum over clusters of that cluster's chosen array_split chunk
    groups = clusters if method != "random" else np.zeros(n, dtype=int)
    expected = sum(len(np.array_split(np.arange((groups == c).sum()), k)[which]) for c in np.unique(groups))
    assert len(idx) == expected == info["selected"]
    assert len(set(idx.tolist())) == len(idx) and set(ids[idx]) <= set(ids)  # a subset, no repeats
    again, _ = select(method, t, budget, clusters=clusters, chunk=chunk, seed=seed)
    assert np.array_equal(idx, again)  # deterministic for a seed


def cherry_reference(nll_prompted: np.ndarray, nll_alone: np.ndarray, rate: float, truncated=None) -> list[int]:
    """Cherry-LLM's data_by_IFD.py loop, restated: rows cut to max_length (skipped before scoring)
    and rows with a mean-loss ratio above 1 are skipped, the rest sorted by (ratio, row) ascending,
    the last int(len * rate) kept."""
    rates = []
    for i, (a, b) in enumerate(zip(nll_prompted, nll_alone)):
        if truncated is not None and truncated[i]:
            continue
        if not b > 0:
            continue
        r = a / b
        if r > 1:
            continue
        rates.append((r, i))
    rates = sorted(rates)
    k = int(len(rates) * rate)
    return sorted(i for _, i in rates[len(rates) - k:]) if k else []


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 80).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0.05, 6.0), min_size=n, max_size=n), st.lists(st.floats(0.0, 6.0), min_size=n, max_size=n),
    st.sampled_from([0.05, 0.1, 0.25, 0.33, 0.5]),
    st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))))
def test_ifd_cherry_is_cherry_llms_rule(args):
    prompted, alone, rate = (np.array(args[0]), np.array(args[1]), args[2])
    truncated = None if args[3] is None else np.array(args[3])
    prompted = np.log(np.exp(prompted))  # what rayapp reads back from P0 = exp(mean NLL)
    n = len(prompted)
    t = Trajectories(ids=np.array([f"r{i}" for i in range(n)]), P=np.stack([np.exp(prompted), np.exp(prompted)], 1),
                     n_tokens=np.full(n, 5), nll_response_only=alone, truncated=truncated)
    ratio = prompted / np.where(alone > 0, alone, 1)
    if len(set(np.round(ratio[alone > 0], 12))) < (alone > 0).sum():
        return  # ties: Cherry breaks them by row index, descending; rayapp keeps row order (documented)
    idx, info = select("ifd_cherry", t, rate)
    assert idx.tolist() == cherry_reference(prompted, alone, rate, truncated)
    assert info["scope"] == "global"
    whole = np.ones(n, dtype=bool) if truncated is None else ~truncated
    assert info.get("dropped_truncated", 0) == int((~whole).sum())
    assert info["dropped_ifd_above_1_or_undefined"] == int((whole & ~((alone > 0) & (ratio <= 1))).sum())


def test_global_baselines_match_the_stratified_selections_size():
    """At 1 % with many small clusters, per-cluster chunks keep far more than 1 % of the rows; a
    global baseline asked for the same size keeps exactly as many, from its end of the order."""
    rng = np.random.default_rng(0)
    n = 3000
    clusters = rng.integers(0, 1000, n)
    P = np.stack([rng.uniform(2, 9, n), rng.uniform(1.5, 5, n), rng.uniform(1, 2, n)], 1)
    t = Trajectories(ids=np.array([f"r{i}" for i in range(n)]), P=P, n_tokens=np.full(n, 4),
                     response_length=rng.integers(1, 900, n))
    lp, _ = select("lp", t, 0.01, clusters=clusters)
    glob, _ = select("random", t, 0.01)
    assert len(lp) > 2 * len(glob)  # the confound: the stratified subset gets twice the data
    for method in ("random", "ppl_high", "longest"):
        idx, info = select(method, t, 0.01, size=len(lp))
        assert len(idx) == len(lp) and info["size_matched_to"] == len(lp) and info["scope"] == "global"
    longest, _ = select("longest", t, 0.01, size=len(lp))
    assert t.response_length[longest].min() >= np.sort(t.response_length)[-len(lp)]
    clust_rand, info = select("clust_rand", t, 0.01, clusters=clusters)
    assert len(clust_rand) == len(lp) and info["scope"] == "stratified"


def test_a_new_selection_method_is_one_entry(monkeypatch):
    """The README's recipe: one Method (its key, its rules) in selection/methods.py, and it runs
    through the same paths as the paper's methods: the name and tag parse, it selects stratified and
    global, and a method it cannot run on these trajectories is refused with the reason."""
    from rayapp.selection import methods

    shortest = methods.Method("shortest", "the shortest responses",
                              lambda t, lp_epoch, seed: np.asarray(t.response_length, dtype=np.float64),
                              unrunnable=lambda t: "no lengths" if t.response_length is None else None)
    monkeypatch.setitem(methods.METHODS, "shortest", shortest)
    assert methods.parse_selection("shortest:global") == ("shortest", "global")
    assert methods.tag("shortest", "low", 0.25, "global") == "shortest-global-low-25pct"
    assert methods.is_tag("shortest-low-25pct")
    lengths = np.array([5, 1, 4, 2, 8, 3, 7, 6])
    t = Trajectories(ids=np.array([f"r{i}" for i in range(8)]), P=np.full((8, 2), 2.0) - [[0, 1]] * 8,
                     n_tokens=np.full(8, 4), response_length=lengths)
    chosen, info = select("shortest", t, 0.25)
    assert sorted(lengths[chosen]) == [1, 2] and info["scope"] == "global"
    chosen, info = select("shortest", t, 0.5, clusters=np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    assert sorted(lengths[chosen]) == [1, 2, 3, 6] and info["scope"] == "stratified"
    no_lengths = Trajectories(ids=t.ids, P=t.P, n_tokens=t.n_tokens)
    assert methods.method_named("shortest").unrunnable(no_lengths) == "no lengths"
    with pytest.raises(ValueError, match="unknown selection method 'longer'"):
        methods.parse_selection("longer")


def test_kmeans_fits_every_row_up_to_the_bound_and_a_seeded_sample_above_it():
    """Up to ``fit_rows`` rows: exactly the authors' KMeans over every row. Above: KMeans fitted on a
    seeded sample, every row then at its nearest centroid; on separated blobs it finds the same
    partition as the full fit."""
    from sklearn.cluster import KMeans

    from rayapp.selection.clustering import fit_sample, kmeans

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (6, 8))
    vecs = np.concatenate([c + rng.normal(0, 0.5, (200, 8)) for c in centers]).astype(np.float32)
    vecs = vecs[rng.permutation(len(vecs))]
    full = KMeans(n_clusters=6, random_state=42, n_init="auto").fit_predict(vecs)
    assert kmeans(vecs, 6, 42, fit_rows=len(vecs)).tolist() == full.tolist()
    assert kmeans(vecs, 6, 42, fit_rows=None).tolist() == full.tolist()

    sample = fit_sample(len(vecs), 150, 42)
    assert len(sample) == 150 and (np.diff(sample) > 0).all()
    assert (fit_sample(len(vecs), 150, 42) == sample).all() and (fit_sample(len(vecs), 150, 7) != sample).any()
    sampled = kmeans(vecs, 6, 42, fit_rows=150)
    centroids = KMeans(n_clusters=6, random_state=42, n_init="auto").fit(vecs[sample]).cluster_centers_
    nearest = ((vecs[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert sampled.tolist() == nearest.tolist()
    pairs = set(zip(full.tolist(), sampled.tolist()))
    assert len(pairs) == 6  # one to one: the same six blobs


def test_a_fit_sample_smaller_than_the_clusters_is_refused():
    from rayapp.config import SelectConfig

    with pytest.raises(ValueError, match="kmeans_fit_rows .10. must be at least n_clusters .1000."):
        SelectConfig(kmeans_fit_rows=10)
