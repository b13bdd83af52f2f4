"""Steps of `rayapp run` that use Ray, each in a driver process of its own, once a loss was seen.

Why: a Ray driver keeps per-process state about the workers it has talked to (the core worker's
pubsub subscriptions, actor handles, Ray Train's and Ray Data's module state). After a worker or
node that one stage used dies, that state has been seen to stop a later stage's actors from ever
being reported alive to the same driver (docs/reliability.md, "A driver that stops seeing actors
come alive"). A new driver process starts with none of it, and Ray reclaims the old driver's
actors and placement groups when it exits.

When (``ray.stage_processes: auto``, the default): the run's own process drives the steps while
they go well. ``LossWatch`` notes, around each step, whether a worker of the cluster ended by a
crash or a kill (Ray's exit type SYSTEM_ERROR or NODE_OUT_OF_MEMORY) or a node died; after such a
step every later step runs in a new process. A healthy run pays nothing; the cost of isolation
(the imports once, and each step's new Ray workers: about 15 s of the demo's 200) falls on runs
that lost something. ``always`` isolates every step, ``never`` none.

How, cheaply: the run's process starts (or joins) the cluster, then starts a multiprocessing
*forkserver* that imports torch, transformers, Ray Data and Ray Train once, while prepare runs.
Each step is a process forked from it: it connects to the same cluster (``ray.init`` takes about
0.1 s), runs its stages through the usual runner, sends back their results, and ends. The run's
own process keeps only what must outlive a step (the work ``Stage.start_ahead`` began).

The forked process inherits no logging set-up and no environment changes made after the
forkserver started, so both are passed along.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from typing import Any

from rayapp.core.errors import RayappError
from rayapp.core.raycluster import RUN_CLUSTER_ENV, RUN_DIR_ENV  # noqa: F401  (their home: raycluster reads them)

# Imported once by the forkserver, so a step process starts with them in memory (copy-on-write).
# (matplotlib: select's and evaluate's reports are drawn in the step's process)
# rayapp's own modules that stages import lazily, too: inside a Ray job they live in the job's
# working_dir, which may be unpacked again while a step starts.
PRELOAD = ["rayapp.pipeline", "rayapp.core.summary", "torch", "transformers", "pyarrow.parquet", "ray.data",
           "ray.train.torch", "matplotlib.pyplot", "sklearn.cluster", "rayapp.ml.train.runner", "rayapp.ml.train.worker",
           "rayapp.stages.score.engine", "rayapp.stages.select.embed", "rayapp.stages.select.report", "rayapp.stages.evaluate.generate",
           "rayapp.stages.evaluate.report", "rayapp.stages.prepare.parallel"]
_RUN_DIR: list[str] = []
# How long a step process may take to clean up after Ctrl-C (Ray Train's abort of a worker group)
INTERRUPT_GRACE_S = 60


class StepProcessError(RayappError):
    """A step's process ended without a result: killed, or it crashed in native code."""


def _context():
    return multiprocessing.get_context("forkserver")


def remember_run_dir() -> None:
    """Note the folder `rayapp run` started in, before any step: inside a Ray job it may later be
    deleted and unpacked again, and then only its path is left (``run_dir``). Idempotent."""
    if not _RUN_DIR:
        _RUN_DIR.append(os.getcwd())


def start_forkserver() -> None:
    """Start the warm process steps are forked from. Call once Ray is up: its environment (the
    cluster's auth settings, which Ray reads when it is imported) is copied now. Returns at once;
    the imports run in the forkserver meanwhile. Idempotent."""
    from multiprocessing import forkserver

    from rayapp.core.raycluster import step_back_into

    remember_run_dir()
    step_back_into(run_dir())  # the forkserver starts in the run's folder, as it is now
    ctx = _context()
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


class LossWatch:
    """Whether a step lost a worker (crashed, killed, out of memory) or a node: started just before
    the step, asked just after. Reads the cluster's node table (``ray.nodes``) and its workers' exit
    records (Ray's State API, served by the dashboard). Where those cannot be read, it counts as a
    loss: isolating a step that did not need it costs seconds, missing one can cost a stalled run."""

    LOST_EXITS = ("SYSTEM_ERROR", "NODE_OUT_OF_MEMORY")

    def __init__(self):
        import time

        import ray

        self.since_ms = int(time.time() * 1000) - 1000  # clocks of one machine; a second of slack
        # this cluster's, by its GCS address: the State API otherwise finds "a running cluster" on
        # the machine, which may be another one
        self.address = ray.get_runtime_context().gcs_address
        self.dead_nodes = self._dead_nodes()

    @staticmethod
    def _dead_nodes() -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if not n["Alive"]}

    def losses(self) -> list[str]:
        """What was lost since the watch started, in words; empty when nothing was."""
        lost = [f"node {n[:12]} died" for n in sorted(self._dead_nodes() - self.dead_nodes)]
        try:
            from ray.util.state import list_workers

            for exit_type in self.LOST_EXITS:
                dead = [("is_alive", "=", "False"), ("exit_type", "=", exit_type)]
                for w in list_workers(address=self.address, filters=dead, limit=10_000, timeout=30, detail=True,
                                      raise_on_missing_output=False):
                    if (w.end_time_ms or 0) >= self.since_ms:
                        lost.append(f"worker pid {w.pid} on node {w.node_id[:12]} ended with {exit_type}")
        except Exception as exc:  # no dashboard, or it did not answer
            lost.append(f"the workers' exits could not be read ({type(exc).__name__}: {str(exc)[:200]})")
        return lost


def run_dir() -> str:
    return _RUN_DIR[0] if _RUN_DIR else os.getcwd()


def _run_in_child(conn, env: dict[str, str], cwd: str, level: int, group: list, cfg, force: bool) -> None:
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(cwd)
    except OSError:
        pass  # a Ray job's working dir re-created under us: raycluster steps back into it
    from rayapp.core import log as logs

    logs.configure(level)
    outcome: tuple[str, Any]
    try:
        from rayapp.core.stage import run_stages

        outcome = ("ok", run_stages(group, cfg, force))
    except BaseException as exc:  # noqa: BLE001 - every ending goes back to the run's process
        outcome = ("error", _portable(exc))
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # ends this driver's job: Ray reclaims its actors and placement groups now
        except Exception:
            pass
    try:
        conn.send(outcome)
    except Exception as exc:  # a result that does not pickle is a bug; still say what happened
        conn.send(("error", _portable(RuntimeError(f"cannot send the step's result back: {exc}"))))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles (RayappError and its kinds do), else a RuntimeError with
    its text; either way carrying the step process's traceback for the run's process to show."""
    import pickle

    tb = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
        out = exc
    except Exception:  # still a user's error (one line, its exit code) if it was one
        out = RayappError(str(exc)) if isinstance(exc, RayappError) else RuntimeError(f"{type(exc).__name__}: {exc}")
        out.exit_code = getattr(exc, "exit_code", 1)
    if not isinstance(out, (RayappError, KeyboardInterrupt)):
        out.add_note(f"in the step's own driver process:\n{tb}")
    return out


def run_step(group: list, cfg, force: bool) -> list:
    """Run one step of the plan (``stages.run_stages``) in a driver process forked from the
    forkserver; return its results, or raise what it raised."""
    from rayapp.core.log import current_level

    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    env = {**os.environ, RUN_DIR_ENV: run_dir()}
    import ray

    if ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        env[RUN_CLUSTER_ENV] = ray.get_runtime_context().gcs_address
    proc = ctx.Process(target=_run_in_child, args=(send, env, run_dir(), current_level(), group, cfg, force),
                       name=f"rayapp-{group[0].name}", daemon=False)
    proc.start()
    send.close()
    try:
        outcome = _wait(proc, receive)
    except KeyboardInterrupt:
        # Ctrl-C reached the step's process too (one process group): let it stop its Ray work
        proc.join(INTERRUPT_GRACE_S)
        if proc.is_alive():
            proc.kill()
        raise
    proc.join()
    if outcome is None:
        raise StepProcessError(
            f"{group[0].label}: its driver process ended with exit code {proc.exitcode} and no result "
            f"(killed, or out of memory?). Rerun the same command to resume from what is committed.")
    kind, value = outcome
    if kind == "error":
        raise value
    return value


def _wait(proc, receive):
    """The step's outcome, or None once its process has died without sending one."""
    while True:
        if receive.poll(1.0):
            try:
                return receive.recv()
            except EOFError:
                return None
        if not proc.is_alive() and not receive.poll(0):
            return None
