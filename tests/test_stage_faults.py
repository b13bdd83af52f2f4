"""A loss in one stage must not stall the next (issue 28), on the three-node cluster, as users run
the pipeline: `rayapp run` submitted as a Ray job.

- a training worker killed during finetune, then evaluate's generation pool;
- a whole node killed during finetune (its training worker hangs first, so the node holds one),
  a replacement node added, then evaluate's generation pool;
- a scoring worker killed during score, then select's clustering and selection.

The tests share one base run (prepare to select, once) and each removes the outputs of the stages
it tests before it runs them, so only those run.
Every job runs with a short `ray.stall_timeout_s`: a stage that stops making progress (the Ray 2.60
driver hang of docs/reliability.md) fails the job with a StallError in minutes instead of hanging
the test. The jobs' own output (`[run] (i/n) ...` and each stage's lines) is kept in the failure
message. `make test-extended` (about 12 minutes here)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading

import pytest
import yaml

from tests.conftest import REPO
from tests.test_pipeline import pipeline_config

pytestmark = pytest.mark.extended

STALL_S = 240  # far above any quiet spell of these tiny stages, far below the test's patience
JOB_TIMEOUT_S = 1200


def _config(tmp, output_dir):
    """The test pipeline's config, with finetune placed on the 'GPU' nodes (so a node kill hits a
    training worker), restarts allowed, checkpoints every 2 steps and the short watchdog."""
    path = pipeline_config(tmp)
    cfg = yaml.safe_load(path.read_text())
    cfg["output_dir"] = str(output_dir)
    cfg["ray"] = {"stall_timeout_s": STALL_S}
    # 4 rows per device: the selection (36 rows) takes 4 steps on 2 workers, the full set 18
    cfg["finetune"].update({"per_device_batch_size": 4, "resources_per_worker": {"gpu_small": 0.5},
                            "max_failures": 2, "checkpoint_every_steps": 2, "log_every_steps": 1})
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(address, path, env: dict | None = None, until: str | None = None):
    """Submit `rayapp run` (jobs/run_pipeline.py) in a thread; returns (thread, result, output)."""
    from rayapp.ops.submit import submit

    entry = [sys.executable, "jobs/run_pipeline.py", "--config", str(path)] + (["--until", until] if until else [])
    runtime_env = json.dumps({"env_vars": env}) if env else None
    out, result = io.StringIO(), {}
    job = threading.Thread(target=lambda: result.update(rc=submit(
        address, entry, working_dir=str(REPO), runtime_env_json=runtime_env, out=out)), daemon=True)
    job.start()
    return job, result, out


def _finish(job, result, out, what: str) -> str:
    job.join(JOB_TIMEOUT_S)
    log = out.getvalue()
    assert not job.is_alive(), f"{what}: the job did not end in {JOB_TIMEOUT_S} s:\n{log[-4000:]}"
    assert result.get("rc") == 0, f"{what}: the job failed:\n{log[-4000:]}"
    return log


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, three_nodes):
    """prepare, reference, score and select, once, for the fault runs to start from: (its output
    dir, its config, the sha256 of each selection it made)."""
    from tests.conftest import wait_for_job_server

    _, address = three_nodes
    wait_for_job_server(address)
    tmp = tmp_path_factory.mktemp("stage-faults")
    run = tmp / "run"
    path = _config(tmp, run)
    _finish(*_submit(address, path, until="select"), "the base run")
    return run, path, _selections(run)


def _selections(run) -> dict[str, str]:
    manifest = json.loads((run / "select" / "manifest.json").read_text())
    return {k: v["sha256"] for k, v in manifest["selections"].items()}


def _without(run, stages: tuple[str, ...]) -> None:
    """Remove these stages' outputs, so the next `rayapp run` runs them again (and only them)."""
    for name in stages:
        shutil.rmtree(run / name, ignore_errors=True)
    (run / "summary.json").unlink(missing_ok=True)


def _evaluate_finished(run, log: str) -> None:
    summary = json.loads((run / "summary.json").read_text())
    stages = summary["stages"]
    assert [k for k, v in stages.items() if not v["skipped"]] == ["finetune (selected)", "finetune (full)",
                                                                   "evaluate"], log[-3000:]
    evaluate = json.loads((run / "evaluate" / "manifest.json").read_text())
    assert evaluate["prompts"] > 0 and set(evaluate["models"]) >= {"selected", "full"}, evaluate
    assert "[run] (6/6) evaluate" in log and "[evaluate] done in" in log, log[-3000:]


def _isolated_after(step: str, log: str, lost: str) -> None:
    """The run's process saw the loss (``lost``: Ray's exit type, or "died" for a node) and gave
    every later step a driver process of its own (ray.stage_processes: auto)."""
    line = next((line for line in log.splitlines() if line.startswith(f"[run] warning: {step} lost ")), None)
    assert line and lost in line and "each later step runs in a driver process of its own" in line, log[-3000:]


def _resumed(run, subset: str) -> int:
    return json.loads((run / "finetune" / subset / "stats" / "rank-0.json").read_text())["resumed_from_step"]


def test_worker_killed_during_finetune_then_evaluate_runs(base_run, three_nodes, tmp_path):
    from rayapp.testing.faults import TRAIN_KILL_ENV

    _, address = three_nodes
    run, path, _ = base_run
    _without(run, ("finetune", "evaluate"))
    log = _finish(*_submit(address, path, env={TRAIN_KILL_ENV: "3"}), "a worker killed during finetune")
    for subset in ("selected", "full"):
        assert (run / "finetune" / subset / "stats" / ".fault_injected").exists()  # the kill happened
        assert _resumed(run, subset) >= 2  # and training went on from its step-2 checkpoint
    _isolated_after("finetune (selected), finetune (full)", log, "ended with SYSTEM_ERROR")
    _evaluate_finished(run, log)


def test_scoring_worker_killed_then_select_clusters_and_selects(base_run, three_nodes, tmp_path):
    from rayapp.testing.faults import SCORE_FAULT_ENV

    _, address = three_nodes
    run, path, selections = base_run
    _without(run, ("scores", "select", "finetune", "evaluate"))  # no scores, no clusters
    marker = tmp_path / "scorer-killed"
    log = _finish(*_submit(address, path, env={SCORE_FAULT_ENV: f"kill:1:{marker}"}, until="select"),
                  "a scoring worker killed")
    assert marker.exists()  # one scoring actor was killed mid-block
    summary = json.loads((run / "summary.json").read_text())["stages"]
    assert not summary["score"]["skipped"] and not summary["select"]["skipped"]
    _isolated_after("score", log, "ended with SYSTEM_ERROR")
    # the same selections as the base run, whose scoring was not interrupted
    assert _selections(run) == selections, log[-3000:]


def test_node_killed_during_finetune_then_evaluate_runs(base_run, three_nodes, tmp_path):
    """Last in this module: it changes the shared cluster's nodes (one removed, one added)."""
    from rayapp.testing.faults import TRAIN_HANG_ENV
    from tests.conftest import replace_hung_workers_node

    cluster, address = three_nodes
    run, path, _ = base_run
    _without(run, ("finetune", "evaluate"))
    marker = tmp_path / "trainer-hung"
    job, result, out = _submit(address, path, env={TRAIN_HANG_ENV: f"3:{marker}"})
    # the replacement node is where the autoscaler would put the pending training bundle
    replace_hung_workers_node(cluster, marker, job, lambda: out.getvalue()[-4000:])
    log = _finish(job, result, out, "a node killed during finetune")
    _isolated_after("finetune (selected), finetune (full)", log, "died")
    _evaluate_finished(run, log)
    assert _resumed(run, "selected") >= 2 or _resumed(run, "full") >= 2
