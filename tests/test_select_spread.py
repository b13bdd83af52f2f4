"""Select without a gather (``select.workers`` > 0) against the in-process path: the same rows in
every selection, the same provenance, and the pieces it is made of against numpy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp.config import load_config
from rayapp.selection.strategies import orderable, rank_range, stratified_select, take_from_end
from tests.conftest import REPO, SHARED, run_stage

FULL = (SHARED / "paper-perplexities").exists()
PAPER = SHARED / "paper-perplexities" if FULL else REPO / "tests" / "data" / "paper-perplexities-sample"


def test_orderable_keys_sort_as_numpy_sorts_the_floats():
    rng = np.random.default_rng(0)
    key = np.concatenate([rng.normal(0, 1e3, 500), rng.normal(0, 1e-300, 50), [0.0, -0.0, 0.0, -0.0],
                          [np.inf, -np.inf, np.nan, np.nan, 1.0, 1.0, -1.0]])
    key = key[rng.permutation(len(key))]
    pos = np.arange(len(key))
    assert np.array_equal(np.lexsort((pos, orderable(key))), np.argsort(key, kind="stable"))


@pytest.mark.parametrize("rows", [0, 1, 7, 100, 1001])
@pytest.mark.parametrize("chunk", ["low", "mid", "high"])
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.33, 1.0])
def test_rank_ranges_are_the_chunks_and_ends_the_in_process_selection_takes(rows, chunk, budget):
    key = np.random.default_rng(rows).normal(size=rows)
    order = np.argsort(key, kind="stable")
    lo, hi = rank_range(rows, budget, chunk)
    assert np.array_equal(np.sort(order[lo:hi]), stratified_select(key, np.zeros(rows, int), budget, chunk))
    size = rows // 3
    lo, hi = rank_range(rows, budget, chunk, size)
    assert np.array_equal(np.sort(order[lo:hi]), take_from_end(key, size, chunk))


def _embeddings(path, ids: np.ndarray, dim: int = 12, centres: int = 30) -> None:
    rng = np.random.default_rng(7)
    centre = rng.normal(0, 4, (centres, dim))
    vecs = (centre[rng.integers(0, centres, len(ids))] + rng.normal(0, 1, (len(ids), dim))).astype(np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim)
    pq.write_table(pa.table({"index": ids, "embedding": embedding}), path, row_group_size=1000)


def _run(tmp_path, name, workers, *extra):
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"output_dir={tmp_path / name}", f"select.trajectories={PAPER / 'dolly.parquet'}",
        "select.trajectory_prefix=opt-350m_", f"select.workers={workers}", *extra])
    return run_stage("select", cfg)


def _same_selections(tmp_path, a, b, names=("in-process", "spread")):
    assert list(a.selections) == list(b.selections)
    for key, ra in a.selections.items():
        rb = b.selections[key]
        assert (ra.tag, ra.rows, ra.sha256) == (rb.tag, rb.rows, rb.sha256), key  # the same bytes
        ta, tb = pq.read_table(ra.path), pq.read_table(rb.path)
        assert ta.schema == tb.schema, key
        assert ta.equals(tb), key
        pa_, pb = (json.loads((tmp_path / n / "select" / ra.tag / "selection.json").read_text()) for n in names)
        for p in (pa_, pb):
            p.pop("config_digest")  # the configs differ in select.workers alone
        assert pa_ == pb, key


def test_spread_select_equals_the_in_process_one_on_published_perplexities_and_embeddings(tmp_path, monkeypatch):
    """The paper's Dolly perplexities (15k rows) with a 30-centre embeddings file, k-means fitted on
    a 2,000-row sample and every row assigned in the split tasks: stratified LP, the random draws,
    and global selections of the main selection's size (Ray Data's sort), in blocks and
    partitions small enough that every step has several."""
    from rayapp.stages.select import distributed
    from rayapp.stages.select import stage as select_stage

    monkeypatch.setattr(distributed, "BLOCK_ROWS", 4000)
    monkeypatch.setattr(distributed, "PARTITION_ROWS", 3000)
    monkeypatch.setattr(distributed, "REPORT_SAMPLE_ROWS", 5000)  # the report from a sample
    # selections written in several windows (row groups) on both paths: the files must be the same bytes
    monkeypatch.setattr(distributed, "SELECTION_WINDOW_ROWS", 100)
    monkeypatch.setattr(select_stage, "SELECTION_WINDOW_ROWS", 100)
    _embeddings(tmp_path / "emb.parquet", pq.read_table(PAPER / "dolly.parquet", columns=["index"])["index"].to_numpy())
    extra = ["select.stratified=true", f"select.clusters={tmp_path / 'emb.parquet'}", "select.n_clusters=30",
             "select.kmeans_fit_rows=2000", "select.budget=0.05",
             "select.baselines=[clust_rand, random, ppl_high, 'ppl_high:global', 'lp_app:global', ppl_low, full]"]
    a = _run(tmp_path, "in-process", 0, *extra)
    b = _run(tmp_path, "spread", 2, *extra)
    _same_selections(tmp_path, a, b)
    assert (tmp_path / "spread" / "select" / "report" / "report.html").stat().st_size > 2000
    assert not (tmp_path / "spread" / "select" / ".work").exists()


def test_spread_select_global_mid_chunk_without_size_matching(tmp_path):
    extra = ["select.stratified=false", "select.chunk=mid", "select.budget=0.1", "select.match_size=false",
             "select.baselines=[random, ppl_high, 'lp_app']"]
    a = _run(tmp_path, "in-process", 0, *extra)
    b = _run(tmp_path, "spread", 2, *extra)
    _same_selections(tmp_path, a, b)


def test_spread_select_names_rows_without_a_cluster_as_the_in_process_path_does(tmp_path):
    from rayapp.stages.select.external_clusters import ClustersFileError

    pq.write_table(pa.table({"index": [0, 1, 2], "cluster": [0, 0, 1]}), tmp_path / "few.parquet")
    messages = []
    for workers in (0, 2):
        with pytest.raises(ClustersFileError, match="rows to select from have no cluster") as err:
            _run(tmp_path, f"w{workers}", workers, "select.stratified=true",
                 f"select.clusters={tmp_path / 'few.parquet'}", "select.baselines=[]")
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert not (tmp_path / "w2" / "select" / ".work").exists()
