"""Cluster-level faults on the three-node cluster (`make test-extended`; left out of `make test`,
whose 20-minute CI budget they do not fit): the pipeline job stopped and re-submitted, and a
worker node killed in the middle of a scoring block."""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.test_pipeline import _copy_run, pipeline_config, run_pipeline_job

pytestmark = pytest.mark.extended


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, three_nodes):
    return run_pipeline_job(tmp_path_factory, three_nodes, stop_first=True)


def test_stopped_job_resubmitted_resumes_where_it_stopped(pipeline_run):
    out, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["prepare"]["skipped"]  # the first attempt's prepared data is reused
    assert not summary["stages"]["reference"]["skipped"]
    stats = json.loads((out / "reference" / "stats" / "rank-0.json").read_text())
    assert stats["resumed_from_step"] >= 1  # training went on from its latest checkpoint
    assert all((out / "reference" / "exports" / f"epoch-{e}" / "rayapp_checkpoint.json").exists() for e in (1, 2, 3))


def _selected_ids(run) -> dict[str, set]:
    manifest = json.loads((run / "select" / "manifest.json").read_text())
    return {m: set(pq.read_table(e["path"], columns=["id"])["id"].to_pylist()) for m, e in manifest["selections"].items()}


def test_node_killed_mid_scoring_leaves_scores_and_selection_unchanged(pipeline_run, three_nodes, tmp_path):
    """The first run's prepared data and reference checkpoints, scored again as a job: one scoring
    actor hangs mid-block and its whole node is killed (raylet and workers); a replacement node
    joins, as the autoscaler would add one. The job ends with exactly one score per (id,
    checkpoint), and its scores, and the selections made from them, equal those of the first run,
    whose scoring was not interrupted. (Last in this module: it changes the shared cluster's nodes.)"""
    from rayapp.ops.submit import submit
    from rayapp.testing.faults import SCORE_FAULT_ENV as FAULT_ENV
    from tests.conftest import replace_hung_workers_node

    cluster, address = three_nodes
    run_a, proc, _ = pipeline_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    path = pipeline_config(tmp_path)
    run_b = tmp_path / "run"
    _copy_run(run_a, run_b, parts=("models", "prepared", "reference"))
    marker = tmp_path / "scorer-hung"
    env = json.dumps({"env_vars": {FAULT_ENV: f"hang:1:{marker}"}})
    out, result = io.StringIO(), {}
    job = threading.Thread(target=lambda: result.update(rc=submit(
        address, [sys.executable, "jobs/run_score.py", "--config", str(path)], working_dir=str(REPO),
        runtime_env_json=env, out=out)))
    job.start()
    replace_hung_workers_node(cluster, marker, job, lambda: out.getvalue()[-3000:])
    job.join(600)
    assert result.get("rc") == 0, out.getvalue()[-3000:]
    # select here, on the clusters of the first run (its cached clusters, keyed by the prepared data)
    (run_b / "select").mkdir()
    shutil.copy(run_a / "select" / "clusters.parquet", run_b / "select" / "clusters.parquet")
    from rayapp.config import load_config
    from tests.conftest import run_stage

    run_stage("select", load_config(path))
    # the clusters were reused, not computed again (no embedding at all)
    assert (run_b / "select" / "clusters.parquet").read_bytes() == (run_a / "select" / "clusters.parquet").read_bytes()
    assert not (run_b / "select" / "embeddings").exists()
    a = pq.read_table(run_a / "scores" / "trajectories.parquet").to_pandas().set_index("id")
    b = pq.read_table(run_b / "scores" / "trajectories.parquet").to_pandas().set_index("id")
    assert b.index.is_unique and set(a.index) == set(b.index)
    for ck in json.loads((run_b / "reference" / "manifest.json").read_text())["checkpoints"]:
        scores = pq.read_table(run_b / "scores" / "reference" / ck["name"]).to_pandas()
        assert scores.id.is_unique and set(scores.id) == set(b.index)  # one score per (id, checkpoint)
    p_cols = [c for c in a.columns if c.startswith("P")]
    np.testing.assert_allclose(b.loc[a.index, p_cols], a[p_cols], rtol=1e-5)
    assert _selected_ids(run_b) == _selected_ids(run_a)
