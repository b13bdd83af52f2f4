"""Experiment tracking with TensorBoard, read back from the event files: training's per-step
metrics come from rank 0 inside Ray Train's training function (two real workers), every stage's
numbers when its manifest is written, all under one run, each tagged with its stage; the values
equal the manifests'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from rayapp.common.errors import ConfigError
from rayapp.config import load_config
from tests.conftest import ALPACA, REPO, tiny_config_dict


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    cfg = tiny_config_dict(tmp, [{"path": str(ALPACA), "limit": 160}], data__holdout_rows=16)
    cfg["name"] = "tracked"
    cfg["tracking"] = {"backend": "tensorboard"}
    cfg["reference"] = {"epochs": 2, "per_device_batch_size": 8, "num_workers": 2, "fsdp": False,
                        "log_every_steps": 1, "learning_rate": 1e-3, "eval_rows": 16}
    cfg["score"] = {"local": True, "rows_per_task": 64}
    cfg["select"] = {"budget": 0.25, "n_clusters": 4, "embed_max_tokens": 32}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    proc = subprocess.run([sys.executable, "-m", "rayapp", "run", "-c", str(path), "--until", "select"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp / "run"
    events = EventAccumulator(str(run / "tracking" / "tracked"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return run, events


def _series(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_training_logs_every_step_from_rank_0_and_ends_on_the_manifest(tracked_run):
    run, events = tracked_run
    metrics = json.loads((run / "reference" / "manifest.json").read_text())["metrics"]
    loss = _series(events, "reference/loss")
    assert [s for s, _ in loss] == list(range(1, metrics["total_steps"] + 1))  # one point per step, once
    assert loss[-1][1] == pytest.approx(metrics["last_loss"], rel=1e-6)
    assert all(v > 0 for _, v in _series(events, "reference/tokens_per_s"))
    assert _series(events, "reference/eval_loss")[-1][1] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_each_stage_logs_its_numbers_and_files_under_its_name(tracked_run):
    run, events = tracked_run
    prepared = json.loads((run / "prepared" / "manifest.json").read_text())
    assert _series(events, "prepare/rows") == [(0, prepared["rows"])]
    scores = json.loads((run / "scores" / "manifest.json").read_text())
    rows = scores["stats"]["rows"]
    assert _series(events, "score/stats/rows") == [(0, pytest.approx(rows))]
    tags = events.Tags()
    assert "select/seconds" in tags["scalars"]
    text = events.Tensors("select/files/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report.html" in text
    # the four stages, and nothing outside their names
    prefixes = {t.split("/")[0] for t in tags["scalars"]}
    assert prefixes == {"prepare", "reference", "score", "select"}


def test_tracking_needs_a_folder_tensorboard_can_write(tmp_path):
    base = tiny_config_dict(tmp_path, [{"path": str(ALPACA)}])
    for tracking, output_dir, what in [({"backend": "tensorboard", "uri": "s3://b/tb"}, None, "local or shared"),
                                       ({"backend": "tensorboard"}, "s3://b/run", "set tracking.uri")]:
        cfg = {**base, "tracking": tracking, **({"output_dir": output_dir} if output_dir else {})}
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError, match=what):
            load_config(str(path))
