"""`rayapp run` runs steps that use Ray in a driver process of their own (core/isolation.py):
after a step that lost a worker or a node (``LossWatch``), or every step with ``always``. What a
step raises, or a step process that dies, reaches the user as it would from one process, and a
rerun resumes. The cross-stage fault tests on a cluster, where the loss watch turns the step
processes on, are in test_stage_faults.py. The two `rayapp run` tests here (about a minute each,
with ``always``) are extended; CI runs run_step and the loss watch below."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, alpaca_rows, tiny_config_dict, write_jsonl


@pytest.mark.slow  # a forkserver driver process per step: ~25 s
def test_a_step_in_its_own_process_returns_what_it_made_and_raises_what_it_raised(tmp_path, make_config):
    """isolation.run_step with the real prepare stage (no Ray needed): the results come back from
    the step's process as the runner made them, and a user's error comes back as itself (type
    and message), not as a generic failure."""
    from rayapp.core import isolation
    from rayapp.core.errors import RayappError
    from rayapp.core.manifests import PreparedManifest, read_manifest
    from rayapp.stages.prepare.stage import PrepareStage

    cfg = make_config([{"path": str(write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(40)))}])
    isolation.start_forkserver()
    [result] = isolation.run_step([PrepareStage()], cfg, False)
    assert not result.skipped and result.stage.name == "prepare" and result.manifest.rows == 40
    on_disk = read_manifest(str(tmp_path / "run" / "prepared" / "manifest.json"), PreparedManifest)
    assert on_disk == result.manifest
    [again] = isolation.run_step([PrepareStage()], cfg, False)
    assert again.skipped  # the runner's up-to-date check ran in the step's process

    missing = make_config([{"path": str(tmp_path / "missing.jsonl")}], output_dir=str(tmp_path / "other"))
    with pytest.raises(RayappError, match="missing.jsonl: file not found") as err:
        isolation.run_step([PrepareStage()], missing, False)
    assert type(err.value).__name__ == "UnreadableSourceError"


_LOSS_WATCH_SCRIPT = """
import os, signal, time, ray
from rayapp.core.isolation import LossWatch

ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
         logging_level="ERROR", log_to_driver=False)

@ray.remote
class Worker:
    def pid(self):
        return os.getpid()
    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

@ray.remote
def square(x):
    return x * x

watch = LossWatch()
assert ray.get([square.remote(i) for i in range(8)]) == [i * i for i in range(8)]
ended = Worker.remote()
ray.get(ended.pid.remote())
ray.kill(ended)  # ended on purpose, as Ray Train and Ray Data end their actors
dropped = Worker.remote()
ray.get(dropped.pid.remote())
del dropped  # out of scope

from rayapp.core.datapools import DrivenStream

class Double:
    def __call__(self, batch):
        if (batch["id"] < 0).any():
            raise ValueError("a bad row")
        return {"id": batch["id"] * 2}

def pool(first):  # a Ray Data actor pool, driven and owned by an actor of its own
    import ray.data
    ds = ray.data.range(4, override_num_blocks=4).map(lambda r: {"id": r["id"] + first}).map_batches(
        Double, batch_size=1, num_cpus=0.5, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
    yield from ds.iter_batches(batch_size=None)

assert sum(len(b["id"]) for b in DrivenStream(pool, 0)) == 4  # done: the stream ends its driver
time.sleep(3)
print("healthy:", watch.losses(), flush=True)

# A failed pool ends its driver too, and with it the pool. Its step fails, so whether the watch
# counts the tasks Ray Data was still cancelling (killed with their owner: SYSTEM_ERROR, under
# load) does not matter; it is outside the healthy window.
try:
    list(DrivenStream(pool, -2))
    raise SystemExit("a bad row went through")
except Exception as exc:  # RayTaskError(UserCodeException), with the row's message
    assert "a bad row" in str(exc), exc

watch = LossWatch()
victim = Worker.remote()
pid = ray.get(victim.pid.remote())
try:
    ray.get(victim.die.remote())
except ray.exceptions.RayActorError:
    pass
for _ in range(30):  # the raylet records the exit within a moment
    lost = watch.losses()
    if lost:
        break
    time.sleep(1)
print("killed pid", pid, ":", lost, flush=True)
"""


@pytest.mark.slow  # a Ray cluster with its dashboard in a subprocess: ~60 s
def test_the_loss_watch_sees_a_killed_worker_and_nothing_in_a_healthy_step():
    """LossWatch on a real local cluster (with its dashboard, as `rayapp run` starts one): tasks,
    an actor ended with ray.kill, one dropped out of scope, and a Ray Data pool driven from an actor
    (core/datapools.py) that finishes are no loss; an actor process that is SIGKILLed is,
    named by its pid and Ray's exit type."""
    proc = subprocess.run([sys.executable, "-c", _LOSS_WATCH_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-3000:]
    assert "healthy: []" in out, out
    killed = next(line for line in out.splitlines() if line.startswith("killed pid"))
    pid = killed.split()[2]
    assert f"worker pid {pid} on node" in killed and "ended with SYSTEM_ERROR" in killed, killed


def _rayapp(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "rayapp", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _config(tmp_path, **overrides):
    src = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(96))
    cfg = tiny_config_dict(tmp_path, [{"path": str(src)}], **overrides)
    cfg["ray"]["stage_processes"] = "always"
    cfg["reference"] = {"epochs": 1, "per_device_batch_size": 8, "num_workers": 0, "checkpoint_every_steps": 2,
                        "log_every_steps": 1, "learning_rate": 1e-3}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.extended
def test_a_step_process_killed_is_reported_and_the_rerun_resumes(tmp_path):
    """Local-mode training runs in the reference step's own driver process; SIGKILL it at step 5.
    The run's process says which step's process died, with its exit code, and exits 1; the same
    command then resumes training from the step-4 checkpoint, prepare up to date."""
    from rayapp.testing.faults import TRAIN_KILL_ENV

    path = _config(tmp_path)
    first = _rayapp("run", "-c", str(path), "--until", "reference", env={TRAIN_KILL_ENV: "5"})
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-3000:]
    assert "rayapp run: error: reference: its driver process ended with exit code -9 and no result" in first.stderr
    assert "Traceback" not in first.stderr
    run = tmp_path / "run"
    state = json.loads((run / "reference" / "rayapp_state.json").read_text())
    assert state["state"] == "running"  # the step's process died before it could write anything else
    second = _rayapp("run", "-c", str(path), "--until", "reference")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())["stages"]
    assert summary["prepare"]["skipped"] and not summary["reference"]["skipped"]
    assert json.loads((run / "reference" / "stats" / "rank-0.json").read_text())["resumed_from_step"] == 4


@pytest.mark.extended
def test_an_error_in_a_step_process_prints_as_its_one_line(tmp_path):
    """A user's error raised inside a step's process prints as one line, as from one process, and
    the stage's state marker records it. Here: the progress watchdog's StallError, from a 2-worker
    fit given 1 s to show progress."""
    path = _config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["reference"]["num_workers"] = 2
    cfg["ray"]["stall_timeout_s"] = 1
    path.write_text(yaml.safe_dump(cfg))
    proc = _rayapp("run", "-c", str(path), "--until", "reference")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rayapp run: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("rayapp run: error: reference: no progress for 1 s waiting for"), lines
    state = json.loads((tmp_path / "run" / "reference" / "rayapp_state.json").read_text())
    assert state["state"] == "failed" and "StallError" in state["error"]
