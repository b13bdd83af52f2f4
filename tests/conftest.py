"""Shared fixtures: real data from ../shared/data (or the committed sample), tiny configs."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALPACA = SHARED / "alpaca-43k.jsonl" if (SHARED / "alpaca-43k.jsonl").exists() else REPO / "rayapp/assets/alpaca-sample.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
# the fault hooks reach product code through its injection point (rayapp/core/hooks.py); every
# process the tests start inherits this, Ray's clusters and jobs included
os.environ.setdefault("RAYAPP_TEST_HOOKS", "rayapp.testing.faults")


@pytest.fixture(autouse=True)
def torch_process_settings():
    """A test that runs a training worker in this process (rather than in a Ray actor) sets torch's
    thread count and deterministic kernels for the whole process; later tests get them back as they
    were (CI once spent minutes building meta models with NaN-filled allocations after one did)."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    with open(ALPACA, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < start:
                continue
            obj = json.loads(line)
            if obj["output"].strip():
                rows.append(obj)
            if len(rows) >= n:
                break
    return rows


def write_jsonl(path: Path, rows: list, raw_lines: list[bytes] | None = None) -> Path:
    with open(path, "wb") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
        for raw in raw_lines or []:
            f.write(raw + b"\n")
    return path


def tiny_config_dict(tmp: Path, sources: list[dict], **overrides) -> dict:
    cfg = {
        "name": "test",
        "output_dir": str(tmp / "run"),
        # one driver for every stage: tests of other features (some lose workers on purpose) skip the
        # loss watch and the step processes (test_stage_processes and test_stage_faults cover them)
        "ray": {"num_cpus": 2, "stage_processes": "never"},
        # no held-out split unless a test asks for one: its row counts stay those of its input
        "data": {"sources": sources, "max_length": 128, "shard_rows": 64, "holdout_rows": 0},
        "models": {
            "reference": {"name_or_path": "tiny", "tiny": {"vocab_size": 512, "hidden_size": 32,
                                                            "intermediate_size": 64, "num_hidden_layers": 2,
                                                            "num_attention_heads": 2}},
            "target": {"name_or_path": "tiny", "tiny": {"vocab_size": 512, "hidden_size": 32,
                                                         "intermediate_size": 64, "num_hidden_layers": 2,
                                                         "num_attention_heads": 2, "seed": 1}},
        },
    }
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def run_stage(name: str, cfg, force: bool = False):
    """One pipeline stage through the runner, as `rayapp <name>` runs it; its typed manifest."""
    from rayapp import pipeline

    return pipeline.run(name, cfg, force=force).manifest


@pytest.fixture
def make_config(tmp_path):
    from rayapp.config import RunConfig

    def _make(sources: list[dict], **overrides) -> RunConfig:
        return RunConfig.model_validate(tiny_config_dict(tmp_path, sources, **overrides))

    return _make


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster with 2 CPUs, shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        # "local": a cluster of its own, never the three-node one other tests start
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def wait_for_idle_cpus(ray, timeout: float) -> None:
    """A failed or stalled run's actor pool lives until its dataset is collected (pytest.raises keeps
    the traceback, and with it the executor); later tests need those CPUs."""
    import gc
    import time

    t0 = time.time()
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        gc.collect()
        if time.time() - t0 > timeout:
            pytest.fail(f"the previous run's actors still hold CPUs after {timeout}s: {ray.available_resources()}")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def three_nodes():
    """A real three-node Ray cluster on 127.0.0.1: a head with one CPU (where job drivers run) and
    two workers with 2 CPUs and one 'gpu_small' unit each - the stand-in for a one-GPU node type.
    Its dashboard (the job server) listens on loopback only."""
    from ray.cluster_utils import Cluster

    port = free_port()
    # each node's dashboard agent on a port of its own: the default one (52365) may already be held
    # by another Ray instance on this machine (ray_local), and a head without its agent takes no jobs
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        "dashboard_agent_listen_port": free_port()})
    # every node must share the head's authentication mode: a later local ray.init() in this
    # process (ray_local) turns token auth on in os.environ, and a node added after that with it
    # on cannot talk to a head without it
    cluster.rayapp_auth_mode = os.environ.get("RAY_AUTH_MODE")
    for _ in range(2):
        add_gpu_node(cluster)
    cluster.wait_for_nodes()
    yield cluster, f"http://127.0.0.1:{port}"
    cluster.shutdown()


def add_gpu_node(cluster):
    """A worker like the three-node cluster's (2 CPUs, one 'gpu_small'), e.g. the replacement an
    autoscaler would start for a lost node."""
    saved = os.environ.get("RAY_AUTH_MODE")
    _set_env("RAY_AUTH_MODE", getattr(cluster, "rayapp_auth_mode", saved))
    try:
        return cluster.add_node(num_cpus=2, resources={"gpu_small": 1}, dashboard_agent_listen_port=free_port())
    finally:
        _set_env("RAY_AUTH_MODE", saved)


def replace_hung_workers_node(cluster, marker, job, output=lambda: "", timeout: float = 600) -> None:
    """Once a fault hook has hung a worker and written {node_id} to ``marker`` (while ``job``, a
    thread, is alive), kill that worker's whole node and add a replacement, as an autoscaler would.
    ``output``: the job's output so far, for the failure message."""
    t0 = time.time()
    while not marker.exists() and job.is_alive() and time.time() - t0 < timeout:
        time.sleep(0.5)
    assert marker.exists(), output()
    hung_on = json.loads(marker.read_text())["node_id"]
    node = next(n for n in cluster.worker_nodes if n.node_id == hung_on)
    cluster.remove_node(node, allow_graceful=False)
    add_gpu_node(cluster)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def wait_for_url(url: str, timeout: float, what: str, proc=None, log=None) -> None:
    """Poll ``url`` until it answers; fail early if ``proc`` (the server) exits, showing ``log``."""
    import time
    import urllib.error
    import urllib.request

    def tail() -> str:
        return f":\n{open(log).read()[-3000:]}" if log else ""

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}{tail()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered (e.g. 401 where Ray's token authentication is on): it is up
        except OSError:
            time.sleep(1)
    pytest.fail(f"{what} not ready at {url} after {timeout}s{tail()}")


def wait_for_job_server(address: str, timeout: float = 60) -> None:
    wait_for_url(address + "/api/version", timeout, "Ray job server")


MLFLOW_SERVER = REPO / ".venv-mlflow" / "bin" / "mlflow"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, local artifact root), from its own
    environment (.venv-mlflow: the server needs pyarrow<26); its URI, or None where that
    environment is not built (`make .venv-mlflow/.installed`; make test builds it)."""
    import subprocess

    if not MLFLOW_SERVER.exists():
        yield None
        return
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(tmp / "mlflow-server.log", "w")
    server = subprocess.Popen([str(MLFLOW_SERVER), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                               "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(uri + "/health", 120, "mlflow server", server, tmp / "mlflow-server.log")
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, three_nodes, mlflow_server):
    """The whole pipeline as a Ray job on the three-node cluster (test_pipeline.py), tracked to
    the MLflow server: one run that test_pipeline and test_tracking both read (CI's budget)."""
    from tests.test_pipeline import run_pipeline_job

    tracking = {"backend": "mlflow", "uri": mlflow_server} if mlflow_server else None
    return run_pipeline_job(tmp_path_factory, three_nodes, stop_first=False, tracking=tracking)
