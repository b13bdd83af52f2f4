"""Fault injection for tests, behind one call each in the product code.

Both hooks are read from the environment of the process Ray starts (``runtime_env.env_vars``),
so a test injects a fault into a real actor or training worker without touching the code path.

``RAYAPP_TEST_SCORE_FAULT="<mode>:<n>[:<marker file>]"``: in the middle of its (n+1)-th batch
(after the prompted losses, before the response-only ones) a scoring actor
  raise  raises an error (every actor, every time: the run fails),
  kill   SIGKILLs its own process, once (the marker file, created exclusively, records it),
  hang   writes {pid, node_id} to the marker and sleeps, once, so a test can kill its node.

``RAYAPP_TEST_TRAIN_KILL_AT_STEP="<n>"``: rank 0's worker process is SIGKILLed (as the OOM
killer or a lost node would) once the run passes global step n; once per run, since a marker
beside the training stats records it, so the restarted attempt goes on.

``RAYAPP_TEST_TRAIN_HANG_AT_STEP="<n>:<marker file>"``: once the run passes global step n, rank 0
writes {pid, node_id} to the marker and sleeps, once (the marker is created exclusively), so a
test can kill its node; the restarted attempt goes on.
"""

from __future__ import annotations

import json
import os
import signal
import time

SCORE_FAULT_ENV = "RAYAPP_TEST_SCORE_FAULT"
TRAIN_KILL_ENV = "RAYAPP_TEST_TRAIN_KILL_AT_STEP"
TRAIN_HANG_ENV = "RAYAPP_TEST_TRAIN_HANG_AT_STEP"


def _claim_once(marker: str, payload: str) -> bool:
    """True for the one process that creates ``marker`` (restarted actors find it and go on)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(payload)
    return True


class ScoreFault:
    def __init__(self, spec: str):
        mode, _, rest = spec.partition(":")
        n, _, marker = rest.partition(":")
        if mode not in ("raise", "kill", "hang") or not n.isdigit() or (mode != "raise" and not marker):
            raise ValueError(f"{SCORE_FAULT_ENV}={spec!r}: expected raise:<n>, kill:<n>:<marker> or hang:<n>:<marker>")
        self.mode, self.after, self.marker = mode, int(n), marker or None

    def __call__(self, batches_done: int) -> None:
        if batches_done < self.after:
            return
        if self.mode == "raise":
            raise RuntimeError(f"injected scoring fault after {batches_done} batches ({SCORE_FAULT_ENV})")
        import ray

        info = json.dumps({"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()})
        if not _claim_once(self.marker, info):
            return
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)  # hang: the test kills this actor's node meanwhile
        raise RuntimeError(f"{SCORE_FAULT_ENV}: hung for 600 s and nobody killed the node")


def score_fault_hook():
    """A callable ``hook(batches_done)`` for a scoring actor, or None when no fault is asked for."""
    spec = os.environ.get(SCORE_FAULT_ENV)
    return ScoreFault(spec) if spec else None


class TrainKill:
    def __init__(self, at_step: int, marker: str):
        self.at_step, self.marker = at_step, marker

    def __call__(self, global_step: int, rank: int) -> None:
        if rank != 0 or global_step < self.at_step:
            return
        from rayapp.core import storage

        if storage.exists(self.marker):
            return
        storage.write_text(self.marker, str(global_step))
        print(f"test hook {TRAIN_KILL_ENV}: killing this worker (pid {os.getpid()}) at step {global_step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class TrainHang:
    def __init__(self, spec: str):
        n, _, marker = spec.partition(":")
        if not n.isdigit() or not marker:
            raise ValueError(f"{TRAIN_HANG_ENV}={spec!r}: expected <n>:<marker file>")
        self.at_step, self.marker = int(n), marker

    def __call__(self, global_step: int, rank: int) -> None:
        if rank != 0 or global_step < self.at_step:
            return
        import ray

        info = json.dumps({"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                           "step": global_step})
        if not _claim_once(self.marker, info):
            return
        print(f"test hook {TRAIN_HANG_ENV}: rank 0 (pid {os.getpid()}) hangs at step {global_step}", flush=True)
        time.sleep(600)  # the test kills this worker's node meanwhile
        raise RuntimeError(f"{TRAIN_HANG_ENV}: hung for 600 s and nobody killed the node")


def train_kill_hook(stats_dir: str):
    """A callable ``hook(global_step, rank)`` for the training loop, or None when not asked for."""
    if os.environ.get(TRAIN_HANG_ENV):
        return TrainHang(os.environ[TRAIN_HANG_ENV])
    at = int(os.environ.get(TRAIN_KILL_ENV, "0") or 0)
    if not at:
        return None
    from rayapp.core import storage

    return TrainKill(at, storage.join(stats_dir, ".fault_injected"))
