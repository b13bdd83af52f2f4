"""`rayapp select` and `rayapp compare` on the paper's published per-sample perplexities."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayapp.config import ConfigError, load_config
from rayapp.stages.select.stage import SelectError
from tests.conftest import REPO, SHARED, run_stage


def run_select(cfg):
    return run_stage("select", cfg)

# the full published files where ../shared is there, else a committed sample of them: these tests
# always run (a skip would be a test that cannot fail)
FULL = (SHARED / "paper-perplexities").exists()
PAPER = SHARED / "paper-perplexities" if FULL else REPO / "tests" / "data" / "paper-perplexities-sample"


def _empty_rows(path, model="opt-350m") -> int:
    t = pq.read_table(path).to_pandas()
    return int((t[[f"{model}_P{i}" for i in range(4)]] == 1.0).all(axis=1).sum())


def _cfg(tmp_path, path, model, *extra):
    return load_config(REPO / "configs/tiny.yaml", [
        f"output_dir={tmp_path}", f"select.trajectories={path}", f"select.trajectory_prefix={model}_",
        "select.stratified=false", *extra])


def test_select_on_published_alpaca_perplexities(tmp_path):
    out = run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-350m", "select.budget=0.05"))
    main = out.selections["lp"]
    t = pq.read_table(main.path).to_pandas()
    n_rows = pq.read_metadata(PAPER / "alpaca.parquet").num_rows
    eligible = n_rows - _empty_rows(PAPER / "alpaca.parquet")  # rows with no response tokens: P = 1 throughout
    if FULL:
        assert (n_rows, eligible) == (52002, 52001)
    assert len(t) == main.rows == len(np.array_split(np.arange(eligible), 20)[0])
    # the hardest 5 %: every kept LP(1) is at or below every LP(1) left out
    full = pq.read_table(PAPER / "alpaca.parquet").to_pandas()
    P = full[[f"opt-350m_P{i}" for i in range(4)]].to_numpy()
    lp = (P[:, 0] - P[:, 1]) / (P[:, 0] - P[:, 3])
    kept = full["index"].astype(str).isin(set(t.id)).to_numpy()
    assert kept.sum() == len(t)
    valid = ~np.all(P == 1.0, axis=1)
    assert lp[kept].max() <= lp[valid & ~kept].min()
    prov = json.loads((tmp_path / "select" / main.tag / "selection.json").read_text())
    assert prov["prefix"] == "opt-350m_" and prov["excluded_no_response"] == n_rows - eligible
    assert prov["stratified"] is False
    assert set(out.selections) == {"lp", "random", "ppl_high"}  # text-needing baselines skipped, said so


def test_dolly_rows_without_response_tokens_are_excluded_and_counted(tmp_path):
    fixed = run_select(_cfg(tmp_path / "a", PAPER / "dolly.parquet", "opt-350m", "select.budget=0.05"))
    prov = json.loads((tmp_path / "a" / "select" / fixed.selections["lp"].tag / "selection.json").read_text())
    empty = _empty_rows(PAPER / "dolly.parquet")
    assert empty == (544 if FULL else 60) and prov["no_response_rows"] == prov["excluded_no_response"] == empty
    original = run_select(_cfg(tmp_path / "b", PAPER / "dolly.parquet", "opt-350m", "select.budget=0.05",
                               "select.keep_empty_responses=true"))
    kept = pq.read_table(original.selections["lp"].path)["P0"].to_numpy()
    assert (kept == 1.0).sum() == empty  # the original code's pitfall: all of them rank as the hardest


def test_stratified_needs_text_and_unknown_model_is_named(tmp_path):
    with pytest.raises(SelectError, match="stratified selection clusters the rows' text"):
        run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-350m", "select.stratified=true"))
    with pytest.raises(SelectError, match="no columns opt-99b_P0"):
        run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-99b"))
    with pytest.raises(ConfigError, match="select.method"):
        load_config(REPO / "configs/tiny.yaml", ["select.method=hardest"])


@pytest.mark.slow
def test_compare_cli_prints_the_cross_model_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rayapp", "compare", "--trajectories", str(PAPER / "alpaca.parquet"),
                           "--reference", "opt-13b", "--models", "opt-350m,opt-6.7b", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {l.split("|")[1].strip(): l for l in proc.stdout.splitlines() if l.startswith("| opt-")}
    rho_small = float(rows["opt-350m"].split("|")[2])
    rho_big = float(rows["opt-6.7b"].split("|")[2])
    assert 0.5 < rho_small < rho_big < 1.0  # hardness transfers, and more so between closer sizes
    assert (tmp_path / "compare.png").stat().st_size > 5000


def test_stratified_selection_on_published_perplexities_with_clusters_made_elsewhere(tmp_path):
    """select --trajectories refused stratified selection (no text to cluster); with a clustering
    from a file it runs the paper's per-cluster chunks, and equals the pure strategy on it."""
    import pyarrow as pa

    from rayapp.selection.methods import Trajectories
    from rayapp.selection.strategies import select as pure_select
    from rayapp.stages.select.stage import load_external_trajectories

    path = PAPER / "dolly.parquet"
    index = pq.read_table(path)["index"].to_numpy()
    clusters = (index * 7919) % 40  # any clustering made elsewhere: 40 groups
    pq.write_table(pa.table({"index": index, "cluster": clusters.astype(np.int32)}), tmp_path / "clusters.parquet")
    cfg = _cfg(tmp_path / "run", path, "opt-350m", "select.budget=0.1", "select.stratified=true",
               f"select.clusters={tmp_path / 'clusters.parquet'}", "select.baselines=[clust_rand, 'ppl_high:global']")
    out = run_select(cfg)
    assert set(out.selections) == {"lp", "clust_rand", "ppl_high:global"}
    prov = json.loads((tmp_path / "run" / "select" / out.selections["lp"].tag / "selection.json").read_text())
    assert prov["stratified"] is True and prov["n_clusters"] == 40
    assert prov["cluster_settings"]["kind"] == "clusters"
    traj, _ = load_external_trajectories(str(path), "opt-350m_")
    by_index = dict(zip(index.astype(str), clusters))
    idx, _ = pure_select("lp", Trajectories(ids=traj.ids, P=traj.P), 0.1,
                         clusters=np.asarray([by_index[i] for i in traj.ids]))
    assert set(pq.read_table(out.selections["lp"].path)["id"].to_pylist()) == set(traj.ids[idx])


def test_embeddings_from_a_file_are_clustered_with_the_authors_recipe(tmp_path):
    """An `embedding` column is clustered here: KMeans(n_clusters, random_state=seed, n_init="auto")
    in the file's order, as the authors' code clusters."""
    import pyarrow as pa
    from sklearn.cluster import KMeans

    from rayapp.stages.select.external_clusters import read_clusters

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (5, 16))
    vecs = np.concatenate([c + rng.normal(0, 0.1, (30, 16)) for c in centers]).astype(np.float32)
    ids = [f"r{i}" for i in range(len(vecs))]
    pq.write_table(pa.table({"id": ids, "embedding": list(vecs)}), tmp_path / "emb.parquet")
    table, how = read_clusters(str(tmp_path / "emb.parquet"), n_clusters=5, seed=42)
    by_id = dict(zip(table["id"].to_pylist(), table["cluster"].to_pylist()))
    want = KMeans(n_clusters=5, random_state=42, n_init="auto").fit_predict(vecs)
    assert [by_id[i] for i in ids] == want.tolist()
    assert how["kind"] == "embeddings" and how["dim"] == 16
    assert len({by_id[f"r{i}"] for i in range(30)}) == 1  # one blob, one cluster


def test_embeddings_from_a_file_above_the_fit_bound_are_read_in_batches_and_assigned(tmp_path, monkeypatch):
    """Above select.kmeans_fit_rows the file is read a batch at a time: the fit's sample kept, then
    every row assigned to its nearest centroid; the clusters equal k-means on the whole matrix at
    once (clustering.kmeans), and the file's integer index is matched as text."""
    import pyarrow as pa

    from rayapp.selection.clustering import kmeans
    from rayapp.stages.select import external_clusters

    monkeypatch.setattr(external_clusters, "BATCH_ROWS", 37)  # batches that split the sample unevenly
    vecs = np.random.default_rng(3).normal(0, 1, (400, 6)).astype(np.float32)
    pq.write_table(pa.table({"index": np.arange(400)[::-1], "embedding": list(vecs)}), tmp_path / "emb.parquet",
                   row_group_size=100)
    table, how = external_clusters.read_clusters(str(tmp_path / "emb.parquet"), n_clusters=7, seed=5, fit_rows=150)
    assert table["cluster"].to_pylist() == kmeans(vecs, 7, 5, fit_rows=150).tolist()
    assert how["fitted_on_rows"] == 150 and table["id"].to_pylist()[:2] == ["399", "398"]
    picked = external_clusters.clusters_for_ids("emb", table, np.asarray(["0", "399"]))
    assert picked.tolist() == [table["cluster"][399].as_py(), table["cluster"][0].as_py()]


@pytest.mark.parametrize("table, message", [
    ({"name": ["a"], "cluster": [1]}, "needs an 'id' or 'index' column"),
    ({"id": ["a", "b"], "size": [1, 2]}, "needs a 'cluster' column"),
    ({"id": ["a", "b", "a"], "cluster": [1, 2, 3]}, "row 2: field 'id': 'a' repeats row 0"),
    ({"id": ["a", "b"], "cluster": [1, None]}, "row 1: field 'cluster' is null"),
    ({"id": ["a", "b"], "cluster": [1.5, 2.0]}, "field 'cluster' must hold integers"),
    ({"id": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]}, "row 1: field 'embedding' has 1 dimensions, not 2"),
    ({"id": ["a", "b"], "embedding": [[1.0, 2.0], None]}, "row 1: field 'embedding' is empty"),
])
def test_a_bad_clusters_file_names_its_file_row_and_field(tmp_path, table, message):
    import pyarrow as pa

    from rayapp.stages.select.external_clusters import ClustersFileError, read_clusters

    path = tmp_path / "clusters.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(ClustersFileError, match=f"{path}.*{message}".replace("(", r"\(").replace(")", r"\)")):
        read_clusters(str(path), n_clusters=2, seed=0)


def test_rows_without_a_cluster_are_an_error(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"index": [0, 1, 2], "cluster": [0, 0, 1]}), tmp_path / "few.parquet")
    cfg = _cfg(tmp_path / "run", PAPER / "dolly.parquet", "opt-350m", "select.stratified=true",
               f"select.clusters={tmp_path / 'few.parquet'}", "select.baselines=[]")
    with pytest.raises(Exception, match="rows to select from have no cluster"):
        run_select(cfg)


def test_clustering_in_source_order_is_the_authors_and_in_id_order_ignores_the_sources_order():
    """select.cluster_order, as the stage fits (clustering.fit_in_order): "source" clusters the rows
    in the order given (the prepared shards', the sources'), exactly the authors' KMeans; "id"
    gives every row the same cluster whatever order the sources list the rows in, and can differ
    from the source order's clusters."""
    import hashlib

    from sklearn.cluster import KMeans

    from rayapp.selection.clustering import fit_in_order

    rng = np.random.default_rng(1)
    vecs = rng.normal(0, 1, (300, 8)).astype(np.float32)  # no clear structure: the start matters
    ids = np.asarray([hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(300)])  # content hashes
    _, in_order, labels = fit_in_order(ids, vecs, "source", 12, 42)
    assert in_order.tolist() == ids.tolist()
    assert labels.tolist() == KMeans(n_clusters=12, random_state=42, n_init="auto").fit_predict(vecs).tolist()

    def by_id(rows):
        _, got_ids, got = fit_in_order(ids[rows], vecs[rows], "id", 12, 42)
        return dict(zip(got_ids.tolist(), got.tolist()))

    shuffled = rng.permutation(300)
    assert by_id(np.arange(300)) == by_id(shuffled)
    id_labels = [by_id(np.arange(300))[i] for i in ids]
    assert len(set(zip(id_labels, labels.tolist()))) > 12  # another partition, not just other label names


def test_compare_runs_of_different_families_row_by_row(tmp_path):
    """`compare --run NAME=PATH`: two runs' trajectories (as the score stage writes them), in other
    row orders and with rows only one has, are matched by id, as runs with different tokenizers
    are; the table equals the one on the shared file."""
    import pyarrow as pa

    full = pq.read_table(PAPER / "alpaca.parquet")
    ids = np.asarray([str(i) for i in full["index"].to_pylist()])

    def run_file(model, rows, name):
        cols = {"id": pa.array(ids[rows])}
        cols.update({f"P{i}": full[f"{model}_P{i}"].take(pa.array(rows)) for i in range(4)})
        pq.write_table(pa.table(cols), tmp_path / name)
        return tmp_path / name

    rng = np.random.default_rng(0)
    n = len(ids)
    a = run_file("opt-350m", rng.permutation(n)[: n - 7], "a.parquet")  # 7 rows it does not have
    b = run_file("llama2-7b", rng.permutation(n), "b.parquet")
    proc = subprocess.run([sys.executable, "-m", "rayapp", "compare", "--run", f"opt-350m={a}", "--run",
                           f"llama2-7b={b}", "--reference", "llama2-7b"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "7 rows are in only one of them" in proc.stdout
    got = next(line for line in proc.stdout.splitlines() if line.startswith("| opt-350m"))

    from rayapp.stages.select.compare import align_by_id, compare_pair, format_table
    from rayapp.stages.select.stage import load_external_trajectories

    x, y, unmatched = align_by_id(load_external_trajectories(str(a), "")[0], load_external_trajectories(str(b), "")[0])
    assert unmatched == 7 and np.array_equal(x.ids, y.ids)
    want = next(line for line in format_table({"opt-350m": compare_pair(x, y)}).splitlines()
                if line.startswith("| opt-350m"))
    assert got == want


@pytest.mark.slow
def test_another_seed_or_cluster_count_reclusters_the_cached_embeddings(make_config, tmp_path, monkeypatch):
    """Re-selecting with another seed or number of clusters re-runs k-means on the embeddings kept
    beside the prepared shards: the encoder does not run again, and the clusters are those k-means
    gives from scratch. Above select.kmeans_fit_rows, k-means is fitted on a seeded sample (ordered
    like every row would be) and the Ray Data assignment pool sends every row to its nearest
    centroid. A shard whose embeddings are lost is embedded again, alone."""
    import pyarrow as pa
    from sklearn.cluster import KMeans

    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import read_prepared
    from rayapp.selection.clustering import fit_sample, kmeans
    from rayapp.stages.select import clusters, embed
    from tests.conftest import alpaca_rows, write_jsonl

    src = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(48))
    cfg = make_config([{"path": str(src)}], select__n_clusters=4, data__shard_rows=16)
    run_stage("prepare", cfg)
    layout, prepared = RunLayout(cfg.output_dir), read_prepared(RunLayout(cfg.output_dir))
    assert len(prepared.shards) == 3
    first = clusters.clusters_for(cfg, layout, prepared, force=False)
    files = [layout.embedding_file(s.file) for s in prepared.shards]
    emb = pa.concat_tables([storage.read_parquet(f) for f in files])  # prepared order
    ids = np.asarray(emb["id"].to_pylist())
    vecs = np.asarray(emb["embedding"].combine_chunks().flatten()).reshape(len(ids), -1)
    by_id = np.argsort(ids, kind="stable")

    real_embed = embed.embed_prepared
    embedded: list[list[str]] = []

    def no_encoder(*args, **kwargs):
        raise AssertionError("the rows were embedded again")

    monkeypatch.setattr(embed, "embed_prepared", no_encoder)
    for n, seed, fit_rows in ((4, 7, 200_000), (6, 42, 200_000), (6, 42, 20)):
        settings = {"n_clusters": n, "seed": seed, "kmeans_fit_rows": fit_rows}
        other = cfg.model_copy(update={"select": cfg.select.model_copy(update=settings)})
        labels = clusters.clusters_for(other, layout, prepared, force=False)
        got = dict(zip(labels["id"].to_pylist(), labels["cluster"].to_pylist()))
        assert len(got) == len(ids) and len(set(got.values())) == n
        if fit_rows >= len(ids):  # every row, in id order: the authors' KMeans as it always was
            want = dict(zip(ids[by_id], kmeans(vecs[by_id], n, seed).tolist()))
        else:  # a 20-row sample of the prepared rows, fitted in id order; every row assigned
            sample = fit_sample(len(ids), fit_rows, seed)
            in_order = sample[np.argsort(ids[sample], kind="stable")]
            model = KMeans(n_clusters=n, random_state=seed, n_init="auto").fit(vecs[in_order])
            want = dict(zip(ids, model.predict(vecs).tolist()))
            assert want != dict(zip(ids[by_id], kmeans(vecs[by_id], n, seed).tolist()))  # the sample mattered
        assert got == want
    assert first["cluster"].to_pylist() != labels["cluster"].to_pylist()

    def recording(files, *args, **kwargs):
        embedded.append(list(files))
        return real_embed(files, *args, **kwargs)

    monkeypatch.setattr(embed, "embed_prepared", recording)
    storage.remove(files[1])
    other = cfg.model_copy(update={"select": cfg.select.model_copy(update={"seed": 3})})
    clusters.clusters_for(other, layout, prepared, force=False)
    assert embedded == [[prepared.shard_paths(layout)[1]]]
    again = storage.read_parquet(files[1])
    assert again["id"].to_pylist() == ids[16:32].tolist()
    np.testing.assert_allclose(np.asarray(again["embedding"].combine_chunks().flatten()).reshape(16, -1),
                               vecs[16:32], rtol=0, atol=1e-6)


def test_a_missing_or_broken_clusters_file_is_named(tmp_path):
    from rayapp.stages.select.external_clusters import ClustersFileError, read_clusters

    with pytest.raises(ClustersFileError, match=f"select.clusters: {tmp_path / 'nope.parquet'}: file not found"):
        read_clusters(str(tmp_path / "nope.parquet"), n_clusters=2, seed=0)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ClustersFileError, match="broken.parquet: not a readable Parquet file"):
        read_clusters(str(tmp_path / "broken.parquet"), n_clusters=2, seed=0)
