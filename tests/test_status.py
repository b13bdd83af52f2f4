"""`rayapp status` follows a real run from its output_dir: stages done, running (training step of
total, time left), failed (with the error), not started; locally and on an object store (moto's
S3 server, as in test_remote_storage.py: the cloud cannot be reached from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from rayapp.config import load_config
from rayapp.ops.status import run_status
from tests.conftest import ALPACA, REPO, tiny_config_dict
from tests.s3_server import create_bucket, start_s3_server


def _own_env(extra: dict | None = None) -> dict:
    """This process's environment without RAY_ADDRESS: each run starts a local cluster of its own,
    not one an earlier test's ray.init left there."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(extra or {})}


def _rayapp(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "rayapp", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_own_env(env))


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """`rayapp run --until score` in a subprocess, its status read every 0.2 s while it runs."""
    tmp = tmp_path_factory.mktemp("status")
    cfg = tiny_config_dict(tmp, [{"path": str(ALPACA), "limit": 200}])
    cfg["reference"] = {"epochs": 3, "per_device_batch_size": 4, "num_workers": 0, "fsdp": False,
                        "log_every_steps": 1, "learning_rate": 1e-3}
    cfg["score"] = {"local": True, "rows_per_task": 64}
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(str(path))
    proc = subprocess.Popen([sys.executable, "-m", "rayapp", "run", "-c", str(path), "--until", "score"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_own_env())
    seen = []
    while proc.poll() is None:
        seen.append({s.label: s for s in run_status(config.output_dir, config)})
        time.sleep(0.2)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    return config, path, seen


@pytest.mark.slow
def test_status_follows_a_run_while_it_trains(watched_run):
    config, _, seen = watched_run
    training = [s["reference"] for s in seen if s["reference"].state == "running" and s["reference"].done]
    assert training, "never saw the reference model training"
    mid = next((t for t in training if 0 < t.done < t.total), training[0])
    assert mid.total == 150 and mid.unit == "steps" and mid.detail["epochs"] == 3
    assert mid.eta_s is not None and mid.eta_s > 0 and mid.started
    # while it trained, prepare was done and score not started
    at = next(s for s in seen if s["reference"] is mid)
    assert at["prepare"].state == "done" and at["score"].state == "not started"
    # steps only go forward
    steps = [t.done for t in training]
    assert steps == sorted(steps)


@pytest.mark.slow
def test_status_of_the_finished_run_text_and_json(watched_run):
    config, path, _ = watched_run
    final = {s.label: s for s in run_status(config.output_dir, config)}
    assert [final[k].state for k in ("prepare", "reference", "score")] == ["done"] * 3
    assert final["select"].state == final["evaluate"].state == "not started"
    assert final["reference"].detail["global_step"] == 150
    text = _rayapp("status", "-c", str(path))
    assert text.returncode == 0, text.stderr
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("reference "))
    assert "done" in line and "global_step 150" in line
    doc = json.loads(_rayapp("status", "--output-dir", config.output_dir, "--json").stdout)
    states = {s["label"]: s["state"] for s in doc["stages"]}
    assert states["prepare"] == "done" and states["select"] == "not started"


def test_a_failed_stage_shows_its_error(tmp_path):
    missing = tmp_path / "no-such-file.jsonl"
    cfg = tiny_config_dict(tmp_path, [{"path": str(missing)}])
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _rayapp("prepare", "-c", str(path)).returncode != 0
    doc = json.loads(_rayapp("status", "-c", str(path), "--json").stdout)
    prepare = doc["stages"][0]
    assert prepare["state"] == "failed" and "no-such-file.jsonl" in prepare["error"]
    assert all(s["state"] == "not started" for s in doc["stages"][1:])


@pytest.mark.slow
def test_status_reads_a_run_on_an_object_store(watched_run, tmp_path):
    from rayapp.core import storage

    config, _, _ = watched_run
    proc, env = start_s3_server()
    try:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            create_bucket(env, "rayapp-status")
            storage.upload_dir(config.output_dir, "s3://rayapp-status/run")
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        out = _rayapp("status", "--output-dir", "s3://rayapp-status/run", "--json", env=env)
        assert out.returncode == 0, out.stderr
        states = {s["label"]: s["state"] for s in json.loads(out.stdout)["stages"]}
        assert states["prepare"] == states["reference"] == states["score"] == "done"
        assert states["select"] == "not started"
    finally:
        proc.terminate()
