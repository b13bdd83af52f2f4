"""Progress watchdogs (issue 28, item 2): no progress for ray.stall_timeout_s is a clear StallError,
never a silent wait. The watchdog itself, then a real scoring actor pool that hangs, then a Ray
Train fit whose workers hang, each on the session's local cluster."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from rayapp.core.errors import RayappError, StallError
from rayapp.core.watchdog import watched, watched_iter
from tests.conftest import wait_for_idle_cpus

MARGIN_S = 1.0  # how late past stall_s the pure watchdog may raise


def _steps(n: int, every: float):
    for i in range(n):
        time.sleep(every)
        yield i


def test_steady_slow_progress_finishes_past_the_stall_time():
    """Each step is well inside stall_s, the whole call well past it: no stall."""
    count = [0]

    def call():
        for _ in _steps(12, 0.1):
            count[0] += 1
        return "done"

    t0 = time.monotonic()
    assert watched(call, stage="t", waiting_for="w", stall_s=0.4, progress=lambda: count[0]) == "done"
    assert time.monotonic() - t0 > 0.4 * 2
    assert list(watched_iter(_steps(12, 0.1), stage="t", waiting_for="w", stall_s=0.4)) == list(range(12))
    # the consumer's own time on an item is not a stall
    got = []
    for i in watched_iter(_steps(3, 0.0), stage="t", waiting_for="w", stall_s=0.3):
        time.sleep(0.5)
        got.append(i)
    assert got == [0, 1, 2]


def test_a_stall_raises_in_time_naming_stage_wait_and_commits():
    release = threading.Event()
    stopped = []
    count = [0]

    def call():
        count[0] += 1  # some progress, then none
        release.wait()

    t0 = time.monotonic()
    with pytest.raises(StallError) as err:
        watched(call, stage="score", waiting_for="the scoring actor pool (Ray Data)", stall_s=0.5,
                progress=lambda: count[0], committed=lambda: "12 of 40 units under /runs/x/scores",
                on_stall=lambda: stopped.append(True))
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 0.5 + MARGIN_S and stopped == [True]
    assert isinstance(err.value, RayappError)  # the CLI prints it as one line
    assert str(err.value) == ("score: no progress for 0.5 s waiting for the scoring actor pool (Ray Data); committed: "
                              "12 of 40 units under /runs/x/scores. Rerun the same command to resume from there; "
                              "raise ray.stall_timeout_s if a step can take longer.")
    release.set()

    def stalls_after_two():
        yield from (1, 2)
        release.clear()
        release.wait()

    got = []
    t0 = time.monotonic()
    with pytest.raises(StallError, match=r"^select: no progress for 0.4 s waiting for the embedding pool; "
                                         r"committed: nothing yet\."):
        for item in watched_iter(stalls_after_two(), stage="select", waiting_for="the embedding pool", stall_s=0.4):
            got.append(item)
    assert got == [1, 2] and 0.4 <= time.monotonic() - t0 < 0.4 + MARGIN_S
    release.set()


def test_errors_pass_through_and_none_or_zero_turns_it_off():
    def boom():
        raise ValueError("the call's own error")

    with pytest.raises(ValueError, match="own error"):
        watched(boom, stage="t", waiting_for="w", stall_s=5)

    def broken():
        yield 1
        raise ValueError("the iterator's own error")

    with pytest.raises(ValueError, match="iterator's own error"):
        list(watched_iter(broken(), stage="t", waiting_for="w", stall_s=5))
    for off in (None, 0):
        threads = []
        # no thread, no clock: a call with no progress at all for longer than any stall_s here finishes
        assert watched(lambda: (time.sleep(0.6), threads.append(threading.current_thread()))[1] or "ok",
                       stage="t", waiting_for="w", stall_s=off) == "ok"
        assert threads == [threading.current_thread()]
        assert list(watched_iter(_steps(2, 0.6), stage="t", waiting_for="w", stall_s=off)) == [0, 1]


# a real pool or worker group that hangs (~45-65 s here): extended, for CI's budget
@pytest.mark.extended
def test_a_scoring_pool_that_stops_making_progress_fails_in_time_with_what_is_committed(ray_local, make_config,
                                                                                        tmp_path):
    """The product's scoring path on a real actor pool, whose actor hangs in its third unit (the
    scorer's own fault hook: the actor is alive, no result ever comes). The stage fails within
    ray.stall_timeout_s of its last result, and says what is committed, which a rerun keeps
    (test_score.py: test_interrupted_run_resumes_without_rescoring)."""
    from rayapp.config import ScoreConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.ml.models import registry
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids
    from rayapp.testing.faults import SCORE_FAULT_ENV
    from tests.conftest import alpaca_rows, run_stage, write_jsonl

    # the wait for the first result includes the actor's start (torch, transformers, the model),
    # which takes 20 s and more on 2 busy cores
    stall_s = 30.0
    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(64)))}], data__shard_rows=16,
                      ray__stall_timeout_s=stall_s)
    manifest = run_stage("prepare", cfg)
    assert len(manifest.shards) == 4
    ckpts = [CheckpointRecord(name="ref", path=registry.model_source(cfg, "reference"), uid="a")]
    bos, pad = special_ids(load_tokenizer(manifest.tokenizer))
    sc = ScoreConfig(modes=["prompted"], rows_per_task=16, resources={"num_cpus": 1, "min_actors": 1, "max_actors": 1})
    out, marker = str(tmp_path / "scores"), tmp_path / "hung"

    t0 = time.time()
    with pytest.raises(StallError) as err:
        score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, ckpts, out, sc, bos, pad,
                          stall_s=cfg.ray.stall_timeout_s, runtime_env={"env_vars": {SCORE_FAULT_ENV: f"hang:2:{marker}"}})
    raised = time.time()
    if not marker.exists():
        pytest.fail(f"no result within {stall_s:g} s of the pool's start ({raised - t0:.0f} s): {err.value}")
    hung_at = os.path.getmtime(marker)  # the actor wrote it as it began to hang
    assert raised - hung_at < stall_s + 5, "the stall was noticed late"
    # the two units scored before the hang are committed as they arrive; Ray Data may hold the
    # second one back in the hung task's output block, so one or both are in
    committed = len(storage.list_files(storage.join(out, "ref"), ".parquet"))
    assert committed in (1, 2)
    assert str(err.value) == (
        f"score: no progress for {stall_s:g} s waiting for the scoring actor pool (Ray Data, torch scorers); "
        f"committed: {committed} of 4 (checkpoint, shard) units under {out}. Rerun the same command to resume from "
        "there; raise ray.stall_timeout_s if a step can take longer.")
    # the hung actor goes (as a lost node's would); its pool is shut down, its CPU freed
    os.kill(json.loads(marker.read_text())["pid"], 9)
    del err
    wait_for_idle_cpus(ray_local, timeout=90)


# a real pool or worker group that hangs (~45-65 s here): extended, for CI's budget
@pytest.mark.extended
def test_a_training_fit_whose_workers_hang_is_stopped_and_raises(ray_local, monkeypatch, tmp_path):
    """A Ray Train fit (2 workers) whose workers log one step, then hang: the fit is aborted
    (its workers gone, their CPUs free) and a StallError names the stage, the fit and what is
    committed."""
    import rayapp.ml.train.worker
    from rayapp.config import FinetuneConfig
    from rayapp.ml.train.runner import TrainJob, run_training

    def hang(config):  # the training loop, pickled by value to the workers
        import time as _time

        import ray.train

        from rayapp.core import storage

        job = config["jobs"][0]
        rank = ray.train.get_context().get_world_rank()
        storage.write_text(storage.join(job["work_dir"], "stats", f"pid-{rank}"), str(os.getpid()))
        if rank == 0:
            storage.write_json(storage.join(job["work_dir"], "stats", "progress.json"),
                               {"step": 1, "total_steps": 10, "epoch": 1, "epochs": 1, "loss": 1.0,
                                "tokens_per_s": 1.0, "time": _time.time()})
        _time.sleep(3600)

    monkeypatch.setattr(rayapp.ml.train.worker, "train_loop_per_worker", hang)
    work = tmp_path / "ft"
    job = TrainJob(label="finetune (full)", init_model="tiny", tokenizer="tiny", train_files=["none.parquet"],
                   total_rows=8, work_dir=str(work))
    stall_s = 10.0
    stats = work / "stats"
    started = threading.Event()

    def heartbeat():
        """Progress while the workers start (30 s and more on 2 busy cores), as a slow first step's
        log lines would be: the stall this test is about begins once both workers hang."""
        from rayapp.core import storage

        while not all((stats / f"pid-{r}").exists() for r in (0, 1)):
            storage.write_json(str(stats / "progress.json"), {"step": 0, "total_steps": 10, "epoch": 1, "epochs": 1,
                                                              "loss": 1.0, "tokens_per_s": 1.0, "time": time.time()})
            time.sleep(1.0)
        started.set()

    threading.Thread(target=heartbeat, daemon=True).start()
    t0 = time.time()
    with pytest.raises(StallError) as err:
        run_training("finetune", FinetuneConfig(num_workers=2, max_failures=0), [job], stall_s=stall_s)
    raised = time.time()
    assert started.is_set()
    pids = [int((stats / f"pid-{r}").read_text()) for r in (0, 1)]
    progressed = os.path.getmtime(stats / "progress.json")
    # raised stall_s after the last progress (+ the 1 s poll of progress.json), the abort (at most
    # 30 s) included
    assert stall_s <= raised - progressed < stall_s + 35, (progressed - t0, raised - t0)
    assert re.fullmatch(
        rf"finetune: no progress for 10 s waiting for the Ray Train fit \(2 workers: finetune \(full\); progress is "
        rf"a training step logged\); committed: finetune \(full\): no checkpoint under {re.escape(str(work))}/"
        r"checkpoints\. Rerun the same command to resume from there; raise ray.stall_timeout_s if a step can take "
        r"longer\.", str(err.value)), str(err.value)
    del err
    deadline = time.time() + 60
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "the hung training workers still run"
    wait_for_idle_cpus(ray_local, timeout=90)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
