"""Experiment tracking, read back from each backend: training's per-step metrics come from rank 0
inside Ray Train's training function (two real workers), every stage's numbers when its manifest is
written, all under one run, each tagged with its stage; the values equal the manifests'.

- tensorboard: the event files, read with TensorBoard's EventAccumulator;
- mlflow, server: a real `mlflow server` on 127.0.0.1 (sqlite store, local artifact root; conftest's
  mlflow_server, from its own environment), which the whole pipeline's Ray job (conftest's
  pipeline_run, shared with test_pipeline.py) logs to; read through its REST API;
- mlflow, file store: a folder as tracking.uri (up to the reference stage: the same client code).
W&B needs its service: its writer is configured and documented, not run here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from rayapp.config import RunConfig, load_config
from rayapp.core import tracking
from rayapp.core.errors import ConfigError
from tests.conftest import ALPACA, REPO, tiny_config_dict


class TensorBoardRun:
    def __init__(self, folder):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        self.events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        self.events.Reload()

    def series(self, key):
        return [(e.step, e.value) for e in self.events.Scalars(key)]

    def keys(self):
        return set(self.events.Tags()["scalars"])

    def files(self, prefix):
        return self.events.Tensors(f"{prefix}/files/text_summary")[0].tensor_proto.string_val[0].decode()


class MlflowRun:
    def __init__(self, uri, run_name):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        [run] = self.client.search_runs([self.client.get_experiment_by_name("rayapp").experiment_id],
                                        filter_string=f"tags.mlflow.runName = '{run_name}'")
        self.run = run

    def series(self, key):
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run.info.run_id, key))

    def keys(self):
        return set(self.run.data.metrics)

    def files(self, prefix):
        return " ".join(f.path for f in self.client.list_artifacts(self.run.info.run_id, prefix))


def _run_pipeline(tmp, tracking: dict, until: str, workers: int = 2):
    cfg = tiny_config_dict(tmp, [{"path": str(ALPACA), "limit": 160}], data__holdout_rows=16)
    cfg["name"] = "tracked"
    cfg["tracking"] = tracking
    cfg["reference"] = {"epochs": 2, "per_device_batch_size": 8, "num_workers": workers, "fsdp": False,
                        "log_every_steps": 1, "learning_rate": 1e-3, "eval_rows": 16}
    cfg["score"] = {"local": True, "rows_per_task": 64}
    cfg["select"] = {"budget": 0.25, "n_clusters": 4, "embed_max_tokens": 32}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    proc = subprocess.run([sys.executable, "-m", "rayapp", "run", "-c", str(path), "--until", until], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


# the file store runs the same client code as the server: extended, for CI's 30-minute budget
@pytest.fixture(scope="module", params=["tensorboard", "mlflow-server",
                                        pytest.param("mlflow-files", marks=pytest.mark.extended)])
def tracked_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "tensorboard":
        # to the reference model only, trained in the driver (Ray Train's local mode): the MLflow server
        # run covers score's and select's logging and rank 0 of two workers (CI's budget)
        run = _run_pipeline(tmp, {"backend": "tensorboard"}, "reference", workers=0)
        yield run, TensorBoardRun(run / "tracking" / "tracked"), ["prepare", "reference"]
    elif request.param == "mlflow-files":
        store = tmp / "mlruns"
        run = _run_pipeline(tmp, {"backend": "mlflow", "uri": str(store)}, "reference")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        yield run, MlflowRun(f"file://{store}", "tracked"), ["prepare", "reference"]
    else:
        # the pipeline job on the three-node cluster (conftest.pipeline_run), tracked to a real server:
        # every stage's logging, training's from rank 0 of two workers
        uri = request.getfixturevalue("mlflow_server")
        if uri is None:
            pytest.skip("no MLflow server environment: `make .venv-mlflow/.installed` (make test builds it)")
        run, proc, _ = request.getfixturevalue("pipeline_run")
        assert proc.returncode == 0, proc.stdout[-3000:]
        labels = json.loads((run / "summary.json").read_text())["stages"]
        yield run, MlflowRun(uri, "test"), [tracking.tag(label) for label in labels]


@pytest.mark.slow
def test_training_logs_every_step_from_rank_0_and_ends_on_the_manifest(tracked_run):
    run, tracked, _ = tracked_run
    metrics = json.loads((run / "reference" / "manifest.json").read_text())["metrics"]
    loss = tracked.series("reference/loss")
    assert [s for s, _ in loss] == list(range(1, metrics["total_steps"] + 1))  # one point per step, once
    assert loss[-1][1] == pytest.approx(metrics["last_loss"], rel=1e-6)
    assert all(v > 0 for _, v in tracked.series("reference/tokens_per_s"))
    assert tracked.series("reference/eval_loss")[-1][1] == pytest.approx(metrics["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_each_stage_logs_its_numbers_and_files_under_its_name(tracked_run):
    run, tracked, stages = tracked_run
    prepared = json.loads((run / "prepared" / "manifest.json").read_text())
    assert tracked.series("prepare/rows") == [(0, prepared["rows"])]
    if "select" in stages:
        scores = json.loads((run / "scores" / "manifest.json").read_text())
        assert tracked.series("score/stats/rows") == [(0, pytest.approx(scores["stats"]["rows"]))]
        assert "select/seconds" in tracked.keys()
        assert "report.html" in tracked.files("select")  # attached (MLflow) or listed (TensorBoard)
    # the stages that ran, and nothing outside their names
    assert {k.split("/")[0] for k in tracked.keys()} == set(stages)
    if isinstance(tracked, MlflowRun):
        assert tracked.run.info.status == "FINISHED"


def test_tracking_needs_a_place_the_backend_can_write(tmp_path):
    base = tiny_config_dict(tmp_path, [{"path": str(ALPACA)}])
    for tracking, output_dir, what in [({"backend": "tensorboard", "uri": "s3://b/tb"}, None, "local or shared"),
                                       ({"backend": "tensorboard"}, "s3://b/run", "set tracking.uri"),
                                       ({"backend": "mlflow"}, "s3://b/run", "MLflow tracking server"),
                                       ({"backend": "mlflow", "uri": "s3://b/ml"}, None, "an object store is")]:
        cfg = {**base, "tracking": tracking, **({"output_dir": output_dir} if output_dir else {})}
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError, match=what):
            load_config(str(path))


class _RecordingWandb:
    """A stand-in for the wandb module that records what rayapp asks of it. W&B's service needs a
    network and an API key, which this machine has not: this is the one mock in the tracking tests,
    of a cloud API's client."""

    def __init__(self):
        self.calls = []
        outer = self

        class Run:
            def define_metric(self, name, step_metric=None):
                outer.calls.append(("define_metric", name, step_metric))

            def log(self, data):
                outer.calls.append(("log", dict(data)))

            def log_artifact(self, artifact):
                outer.calls.append(("log_artifact", artifact.name, sorted(artifact.files)))

            def finish(self):
                outer.calls.append(("finish",))

        class Artifact:
            def __init__(self, name, type):
                self.name, self.files = name, []

            def add_file(self, path, name):
                assert os.path.isfile(path)
                self.files.append(name)

        self.Artifact, self._run = Artifact, Run()

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self._run


def test_wandb_logs_one_resumable_run_with_a_step_axis_per_stage(tmp_path, monkeypatch):
    from rayapp.core import tracking

    cfg = tiny_config_dict(tmp_path, [{"path": str(ALPACA)}], name="paper")
    cfg["tracking"] = {"backend": "wandb", "experiment": "lp-data"}
    cfg = RunConfig.model_validate(cfg)
    if importlib.util.find_spec("wandb") is None:  # the real package is not installed here: a clear error first
        with pytest.raises(ConfigError, match=r"rayapp\[wandb\]"):
            tracking.check_available(cfg)
    fake = _RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    t = tracking.target(cfg)
    w = tracking.open_writer(t)  # what rank 0 of a training run does
    for step in (1, 2):
        w.scalars("reference", {"loss": 3.0 / step, "lr": 1e-3, "mfu": float("nan")}, step)
    w.close()
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    tracking.log_manifest(cfg, "select", {"rows": 12, "report": str(report), "nested": {"seconds": 1.5}},
                          [str(report), str(tmp_path / "never-written.parquet")])

    inits = [c[1] for c in fake.calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0] == inits[1]  # the same run, resumed by each process
    assert inits[0]["project"] == "lp-data" and inits[0]["name"] == "paper" and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == tracking.wandb_run_id("paper", cfg.output_dir)
    assert ("define_metric", "reference/*", "reference/step") in fake.calls
    assert ("define_metric", "select/*", "select/step") in fake.calls
    logs = [c[1] for c in fake.calls if c[0] == "log"]
    assert logs[:2] == [{"reference/loss": 3.0, "reference/lr": 1e-3, "reference/step": 1},  # NaN left out
                        {"reference/loss": 1.5, "reference/lr": 1e-3, "reference/step": 2}]
    assert logs[2] == {"select/rows": 12.0, "select/nested/seconds": 1.5, "select/step": 0}
    assert ("log_artifact", "select-files", ["report.html"]) in fake.calls
    assert [c for c in fake.calls if c[0] == "finish"] == [("finish",), ("finish",)]
