"""Autoscaling for real, on this machine: Ray's own autoscaler, with its fake multi-node provider,
starts and stops worker nodes of cluster/aws.yaml's types (the same names, custom resources and
logical GPU counts; CPUs scaled down to 2 cores) while the pipeline runs as a Ray job submitted
with `rayapp submit`. Stages pin themselves to node types as the paper presets do: scoring and
embedding on gpu-small, the reference model's two workers together on one gpu-4x node, the
targets' two workers together on one gpu-8x node (STRICT_PACK); nothing runs on the GPUs (there
are none), only the placement is GPU-shaped. The cluster starts with the head alone; the test
checks the node types the autoscaler started and what ran on them, that the outputs equal those
of the same config run locally, and that the workers go away once idle."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.autoscaling_cluster import FakeAutoscalingCluster, node_types_like
from tests.conftest import ALPACA, REPO, SHARED, tiny_config_dict

# The job alone takes ~4 min here and the local run to compare with as long again: both in
# `make test-extended`, outside CI's 30-minute budget (test_pipeline submits the pipeline as a job
# to a three-node cluster in CI).
pytestmark = [pytest.mark.slow, pytest.mark.extended]

# one CPU a gpu-small node (one scoring actor each), two on the training types (two workers each)
CPUS = {"gpu-small": 1, "gpu-4x": 2, "gpu-8x": 2}
MAX_WORKERS = {"gpu-small": 2, "gpu-4x": 1, "gpu-8x": 1}
LABELS = {"gpu_small": "gpu-small", "gpu_4x": "gpu-4x", "gpu_8x": "gpu-8x"}


def autoscaling_config(tmp, out: str) -> dict:
    cfg = tiny_config_dict(tmp, [{"path": str(ALPACA), "limit": 120}], data__shard_rows=64, data__max_length=96,
                           data__holdout_rows=16)
    cfg["output_dir"] = out
    cfg["ray"] = {"autoscaling": True}  # the job joins the cluster (RAY_ADDRESS)
    train = {"learning_rate": 2e-3, "per_device_batch_size": 16, "num_workers": 2, "cpus_per_worker": 1,
             "fsdp": False, "log_every_steps": 5, "placement_strategy": "STRICT_PACK"}
    cfg["reference"] = {**train, "epochs": 2, "resources_per_worker": {"gpu_4x": 1}}
    cfg["finetune"] = {**train, "epochs": 1, "eval_rows": 16, "resources_per_worker": {"gpu_8x": 1}}
    # a logical GPU each: the autoscaler must find a node type that has GPUs (the actors run on CPU)
    cfg["score"] = {"modes": ["prompted"], "rows_per_task": 64,
                    "resources": {"num_cpus": 1, "num_gpus": 1, "max_actors": 2, "resources": {"gpu_small": 1}}}
    cfg["select"] = {"budget": 0.25, "n_clusters": 4, "embed_max_tokens": 32}
    cfg["evaluate"] = {"models": ["selected", "full"], "sets": ["sinstruct"], "max_prompts": 4,
                       "eval_dir": str(SHARED / "eval"),
                       "generation": {"max_new_tokens": 8, "batch_size": 8, "temperature": 0.7, "top_p": 0.9,
                                      "repetition_penalty": 1.2,
                                      "resources": {"num_cpus": 1, "num_gpus": 1, "resources": {"gpu_small": 1}}},
                       "judge": {"kind": "reference"}}
    return cfg


def _node_type(resources: dict) -> str:
    found = [LABELS[k] for k in resources if k in LABELS]
    return found[0] if found else "head"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The config run as a Ray job on the autoscaling cluster; then the cluster's record of nodes
    and actors."""
    from ray.util.state import list_actors

    from rayapp.ops.submit import submit

    tmp = tmp_path_factory.mktemp("autoscaling")
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(autoscaling_config(tmp, str(tmp / "cluster"))))
    cluster = FakeAutoscalingCluster(node_types_like(str(REPO / "cluster/aws.yaml"), CPUS, MAX_WORKERS),
                                     head_cpus=1, idle_timeout_minutes=0.25)
    with cluster:
        assert len(cluster.nodes()) == 1  # the head alone
        out = io.StringIO()
        t0 = time.time()
        # No working_dir upload: the code is installed, as it is in the cluster image (cluster/Dockerfile).
        # Here every "node" shares one disk, and each node the autoscaler adds unpacks the job's
        # working_dir again at the same path, under the processes already running in it.
        rc = submit(cluster.dashboard_url, [sys.executable, str(REPO / "jobs" / "run_pipeline.py"), "--config",
                                            str(tmp / "cluster.yaml")], working_dir=None, out=out)
        job_s = time.time() - t0
        assert rc == 0, out.getvalue()[-4000:] + "\n--- cluster log ---\n" + cluster.log_tail()
        actors = list_actors(address=cluster.dashboard_url, limit=10_000, detail=True)
        nodes = cluster.nodes()
        # every worker gone once idle (idle_timeout_minutes 0.25): the head alone again
        t0 = time.time()
        while sum(n["state"] == "ALIVE" for n in cluster.nodes()) > 1 and time.time() - t0 < 180:
            time.sleep(2)
        down_s = time.time() - t0
        alive_after = [n for n in cluster.nodes() if n["state"] == "ALIVE"]
    print(f"job on the autoscaling cluster {job_s:.0f} s; scaled down {down_s:.0f} s after the job")
    return {"tmp": tmp, "cluster": tmp / "cluster", "log": out.getvalue(), "actors": actors, "nodes": nodes,
            "alive_after": alive_after}


@pytest.fixture(scope="module")
def local_run(runs):
    """The same config run locally (`rayapp run`: a local cluster with the same custom resources)."""
    tmp = runs["tmp"]
    local = autoscaling_config(tmp, str(tmp / "local"))
    local["ray"] = {"num_cpus": 2, "num_gpus": 2, "resources": {"gpu_small": 2, "gpu_4x": 2, "gpu_8x": 2}}
    (tmp / "local.yaml").write_text(yaml.safe_dump(local))
    proc = subprocess.run([sys.executable, "-m", "rayapp", "run", "-c", str(tmp / "local.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "local"


def test_autoscaler_started_the_node_types_the_stages_asked_for(runs):
    types = {n["node_id"]: _node_type(n["resources_total"]) for n in runs["nodes"]}
    started = sorted(t for t in types.values() if t != "head")
    assert set(started) == {"gpu-small", "gpu-4x", "gpu-8x"}, started
    assert "GPU" in next(n for n in runs["nodes"] if _node_type(n["resources_total"]) == "gpu-8x")["resources_total"]
    by_class: dict[str, list] = {}
    for a in runs["actors"]:
        by_class.setdefault(a.class_name, []).append(a)
    scorers = by_class["LossScorer"] if "LossScorer" in by_class else \
        [a for a in runs["actors"] if "LossScorer" in a.class_name]
    assert scorers and {types[a.node_id] for a in scorers} == {"gpu-small"}
    # the full-size pool (ray.autoscaling): both scoring actors asked for at once, on two nodes
    assert len({a.node_id for a in scorers}) == 2
    embedders = [a for a in runs["actors"] if "Embedder" in a.class_name]
    assert embedders and {types[a.node_id] for a in embedders} == {"gpu-small"}
    # Ray Train's workers: each run's two workers on one node (STRICT_PACK) of its type
    workers = [a for a in runs["actors"] if "TrainWorker" in a.class_name]
    runs_by_pg: dict[str, set] = {}
    for a in workers:
        runs_by_pg.setdefault(a.placement_group_id, set()).add(a.node_id)
    assert all(len(nodes) == 1 for nodes in runs_by_pg.values()), runs_by_pg
    kinds = sorted(types[next(iter(nodes))] for nodes in runs_by_pg.values())
    assert kinds == ["gpu-4x", "gpu-8x"], kinds  # the reference; the targets (selected and full, one run)


def test_the_job_finished_every_stage(runs):
    assert "finished in" in runs["log"]
    summary = json.loads((runs["cluster"] / "summary.json").read_text())
    # finetune's two runs are labelled "finetune (selected)" and "finetune (full)"
    assert {label.split(" ")[0] for label in summary["stages"]} == {"prepare", "reference", "score", "select",
                                                                  "finetune", "evaluate"}
    results = json.loads((runs["cluster"] / "evaluate" / "results.json").read_text())
    assert results["pairs"]


def test_the_job_gives_the_same_outputs_as_the_local_run(runs, local_run):
    local, cluster = local_run, runs["cluster"]
    tag = json.loads((local / "select" / "manifest.json").read_text())["main"]
    sel = [pq.read_table(next((d / "select").glob(f"{tag}-*/selected.parquet"))).column("id").to_pylist()
           for d in (local, cluster)]
    assert sel[0] and sel[0] == sel[1]
    traj = [pq.read_table(d / "scores" / "trajectories.parquet").to_pandas().sort_values("id") for d in (local, cluster)]
    cols = [c for c in traj[0].columns if c.startswith(("P", "nll"))]
    assert list(traj[0]["id"]) == list(traj[1]["id"])
    np.testing.assert_allclose(traj[0][cols].to_numpy(), traj[1][cols].to_numpy(), rtol=1e-6)
    for model in ("selected", "full"):
        m = [json.loads((d / "finetune" / model / "manifest.json").read_text())["metrics"] for d in (local, cluster)]
        assert m[0]["global_step"] == m[1]["global_step"] and m[0]["world"] == m[1]["world"] == 2
        assert m[0]["eval_loss"] == pytest.approx(m[1]["eval_loss"], rel=1e-5)
    results = [json.loads((d / "evaluate" / "results.json").read_text()) for d in (local, cluster)]
    assert results[0]["pairs"] == results[1]["pairs"] and results[0]["rouge_l"] == results[1]["rouge_l"]


def test_workers_scale_back_down_after_the_idle_timeout(runs):
    assert len(runs["alive_after"]) == 1 and _node_type(runs["alive_after"][0]["resources_total"]) == "head"
