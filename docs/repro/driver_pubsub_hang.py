"""Does a driver stop seeing actors come alive after a worker it subscribed to died? (Ray 2.60)

A standalone reproduction attempt for issue 28 (item 1). One driver process, one local Ray cluster,
a sequence of steps, then checks that a *fresh* actor becomes usable from this driver:

    python docs/repro/driver_pubsub_hang.py --steps train,check
    python docs/repro/driver_pubsub_hang.py --steps borrow_sigkill,check --cluster utils --restore reinit

Steps (comma-separated, run in order):
  train           a TorchTrainer fit, 2 workers, a trivial gloo all-reduce loop (the TrainController
                  actor and its workers end and are reclaimed, as after a finished rayapp finetune)
  train_kill      the same, but rank 0 SIGKILLs itself once; FailureConfig(max_failures=1) recovers
  borrow_sigkill  an actor ray.put()s an object and returns its ref, which the driver reads; and
                  the actor keeps a ref to an object the driver ray.put(), so the driver
                  long-polls that actor's worker for the ref's removal; then the actor's process
                  is SIGKILLed (the driver logs "A worker is dead.
                  subscription_failure_callback will be invoked")
  borrow_kill     the same, ended with ray.kill instead of SIGKILL
  detached        a detached actor that owns a borrowed object, ended with ray.kill
  remove_node     (--cluster utils only) an actor on a second node owns a borrowed object; the node
                  is removed (raylet and its workers die, as when a spot node is lost)
  check           a fresh actor: ray.get(ping, timeout=30); then a Ray Data map_batches on an
                  ActorPoolStrategy(size=1) pool, bounded by --data-timeout

Every wait is bounded: a check prints OK or HANG, and the script always ends (exit code 0 if all
checks were OK, 3 if one hung). With --restore reinit (needs --cluster utils, where the cluster
outlives the driver's connection), a check that hung is repeated after ray.shutdown() and
ray.init(address=<the same cluster>) in the same process.

Only ray and torch are used. Logs: the driver's core-worker log is printed (its subscriber.cc and
actor_manager.cc lines) at the end, from <temp-dir>/session_latest/logs/python-core-driver-*.log.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import signal
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")  # as tests/conftest.py
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# on a loaded 2-core machine the raylet's 15 s wait for its agents' ports can run out at startup
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")

import ray  # noqa: E402

T0 = time.monotonic()


def say(*args):
    print(f"[{time.monotonic() - T0:7.1f}s]", *args, flush=True)


# ---------------------------------------------------------------- actors used by the steps
@ray.remote(num_cpus=0)
class Owner:
    """Owns an object the driver borrows, so the driver's core worker subscribes to this worker
    (object eviction / ref-removed / locations channels) until the object is released."""

    def make(self):
        return [ray.put(b"x" * 200_000)]  # > max_direct_call_object_size: lives in plasma

    def pid(self):
        return os.getpid()

    def hold(self, refs):
        self.held = refs  # borrows the driver's object: the driver subscribes to this worker
        return len(refs)


@ray.remote(num_cpus=0)
class Pinger:
    def ping(self):
        return os.getpid()


class Double:
    def __call__(self, batch):
        batch["id"] = batch["id"] * 2
        return batch


def train_loop(config):
    import torch
    import torch.distributed as dist

    import ray.train

    ctx = ray.train.get_context()
    marker = config.get("kill_marker")
    for step in range(3):
        t = torch.ones(4) * (ctx.get_world_rank() + 1)
        dist.all_reduce(t)
        if marker and step == 1 and ctx.get_world_rank() == 0 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # once: the retry finds the marker
        ray.train.report({"step": step, "sum": float(t[0])})


# ---------------------------------------------------------------- steps
def step_train(state, kill=False):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = tempfile.mkdtemp(prefix="repro-train-")
    cfg = {"kill_marker": os.path.join(storage, "killed")} if kill else {}
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="repro", storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=1 if kill else 0)))
    t = time.monotonic()
    result = _bounded(trainer.fit, state.args.step_timeout, "TorchTrainer.fit")
    say(f"train{'_kill' if kill else ''}: fit ended in {time.monotonic() - t:.1f}s, "
        f"error={getattr(result, 'error', None)!r}, metrics={getattr(result, 'metrics', None)}")


def _borrow(owner):
    """Both directions of worker-to-driver pubsub: the driver borrows an object `owner` owns, and
    `owner` borrows an object the driver owns (the driver then long-polls `owner` for the ref's
    removal, as it does with a TrainController that holds the driver's refs)."""
    [inner] = ray.get(owner.make.remote(), timeout=60)
    ray.get(inner, timeout=60)
    mine = ray.put(b"y" * 200_000)
    ray.get(owner.hold.remote([mine]), timeout=60)
    return inner, mine


def step_borrow(state, how):
    opts = {"lifetime": "detached", "name": f"repro-detached-{os.getpid()}"} if how == "detached" else {}
    owner = Owner.options(**opts).remote()
    pid = ray.get(owner.pid.remote(), timeout=60)
    state.keep.append(_borrow(owner))  # keep the borrowed ref alive: the subscription stays
    if how == "sigkill":
        os.kill(pid, signal.SIGKILL)
    else:
        ray.kill(owner, no_restart=True)
    _wait_dead(pid)
    time.sleep(2)
    say(f"borrow_{how}: owner pid {pid} ended")


def step_remove_node(state):
    if state.cluster is None:
        raise SystemExit("remove_node needs --cluster utils")
    node = state.cluster.add_node(num_cpus=1, resources={"far": 1})
    state.cluster.wait_for_nodes()
    owner = Owner.options(resources={"far": 1}).remote()
    ray.get(owner.pid.remote(), timeout=60)
    state.keep.append(_borrow(owner))
    t = time.monotonic()
    state.cluster.remove_node(node, allow_graceful=False)
    # Until the GCS has marked the node dead (missed health checks), new actors can still be placed
    # there and die "before they ran" (ActorDiedError, not a hang): wait for that first.
    while time.monotonic() - t < 90 and any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
        time.sleep(1)
    say(f"remove_node: node removed; the GCS marked it dead after {time.monotonic() - t:.1f}s")


def _wait_dead(pid, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _bounded(fn, timeout, what):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # reported, never swallowed
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise TimeoutError(f"{what} did not finish in {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def gcs_state(actor_id_hex):
    try:
        info = ray._private.state.actors(actor_id=actor_id_hex)
        return info.get("State") if isinstance(info, dict) else info
    except Exception as e:  # state is only reported
        return f"? ({type(e).__name__})"


def check(state, label="check"):
    ok = True
    p = Pinger.remote()
    aid = p._actor_id.hex()
    t = time.monotonic()
    try:
        ray.get(p.ping.remote(), timeout=30)
        say(f"{label}: fresh actor ping OK in {time.monotonic() - t:.1f}s")
    except ray.exceptions.GetTimeoutError:
        ok = False
        say(f"{label}: fresh actor ping HANG (30s); GCS says the actor is {gcs_state(aid)}; actor_id={aid}")
    state.check_actor_ids.append(aid)
    ray.kill(p)

    t = time.monotonic()
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ds = ray.data.range(16, override_num_blocks=4).map_batches(
            Double, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1))
        rows = _bounded(ds.take_all, state.args.data_timeout, "Ray Data pool")
        assert sorted(r["id"] for r in rows) == [2 * i for i in range(16)], rows
        say(f"{label}: Ray Data ActorPoolStrategy pool OK in {time.monotonic() - t:.1f}s")
    except TimeoutError:
        ok = False
        say(f"{label}: Ray Data ActorPoolStrategy pool HANG ({state.args.data_timeout}s)")
        try:
            alive = [a for a in ray._private.state.actors().values()
                     if "MapWorker" in a.get("ActorClassName", "") and a.get("State") == "ALIVE"]
            say(f"{label}: GCS lists {len(alive)} ALIVE MapWorker actor(s): "
                f"{[a['ActorID'] for a in alive]}")
        except Exception as e:
            say(f"{label}: GCS actor list failed: {e!r}")
    return ok


# ---------------------------------------------------------------- driver
class State:
    def __init__(self, args):
        self.args = args
        self.cluster = None
        self.address = None
        self.keep = []
        self.check_actor_ids = []


def connect(state, tries=4):
    """Start the cluster and connect; a node that times out at startup (on a loaded machine the
    raylet gives its agents ~15 s to come up) is retried: that failure is not the one studied here."""
    for i in range(tries):
        try:
            return _connect(state)
        except Exception as e:
            if i == tries - 1 or "timed out during startup" not in str(e):
                raise
            say(f"cluster start failed ({e}); retrying")
            ray.shutdown()
            if state.cluster is not None:
                with keep_address_file():
                    state.cluster.shutdown()
                state.cluster = None
            kill_leftovers(state.args.temp_dir)


def _connect(state):
    a = state.args
    common = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    if a.cluster == "local":
        # as tests/conftest.py: ray_local (the driver starts the cluster; shutdown ends it)
        ray.init(address="local", num_cpus=2, _temp_dir=a.temp_dir, **common)
    else:
        from ray.cluster_utils import Cluster

        # Cluster writes (and on shutdown deletes) /tmp/ray/ray_current_cluster, which other Ray
        # users of this machine may rely on: put back what was there
        with keep_address_file():
            state.cluster = Cluster()
            state.cluster.add_node(num_cpus=2, include_dashboard=False, temp_dir=a.temp_dir)
        state.address = state.cluster.address
        ray.init(address=state.address, **common)


@contextlib.contextmanager
def keep_address_file():
    path = ray._common.utils.get_ray_address_file(None)
    prev = open(path).read() if os.path.exists(path) else None
    try:
        yield
    finally:
        if prev is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(prev)


def kill_leftovers(temp_dir):
    """A node that failed to start leaves its agents running: end those of this script's temp dir."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if temp_dir.encode() in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def driver_log():
    node = ray._private.worker.global_worker.node
    logs = node.get_logs_dir_path()
    return sorted(glob.glob(os.path.join(logs, f"python-core-driver-*_{os.getpid()}.log")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="train,check")
    ap.add_argument("--cluster", choices=["local", "utils"], default="utils")
    ap.add_argument("--restore", choices=["none", "reinit"], default="none")
    ap.add_argument("--data-timeout", type=float, default=60)
    ap.add_argument("--step-timeout", type=float, default=150)
    ap.add_argument("--temp-dir", default="/tmp/rayrepro")
    args = ap.parse_args()
    if args.restore == "reinit" and args.cluster != "utils":
        ap.error("--restore reinit needs --cluster utils")
    state = State(args)
    connect(state)
    say(f"ray {ray.__version__}, cluster={args.cluster}, steps={args.steps}")
    logs = driver_log()
    results = []
    try:
        for step in args.steps.split(","):
            if step == "train":
                step_train(state)
            elif step == "train_kill":
                step_train(state, kill=True)
            elif step in ("borrow_sigkill", "borrow_kill", "detached"):
                step_borrow(state, {"borrow_sigkill": "sigkill", "borrow_kill": "kill"}.get(step, step))
            elif step == "remove_node":
                step_remove_node(state)
            elif step == "check":
                ok = check(state)
                results.append(ok)
                if not ok and args.restore == "reinit":
                    state.keep.clear()
                    ray.shutdown()
                    ray.init(address=state.address, include_dashboard=False, logging_level="WARNING",
                             log_to_driver=False)
                    logs += driver_log()
                    say("restore: ray.shutdown() + ray.init(address=same cluster) done")
                    results.append(check(state, "check after reinit"))
            else:
                raise SystemExit(f"unknown step {step!r}")
    except TimeoutError as e:
        say(f"HANG in a step: {e}")
        results.append(False)
    except BaseException:  # printed here: the exit below is os._exit
        traceback.print_exc()
        results.append(False)
    finally:
        for path in logs:
            lines = [ln.rstrip() for ln in open(path, errors="replace")
                     if "subscriber.cc" in ln or ("actor_manager.cc" in ln and "state: ALIVE" in ln)
                     or any(a in ln for a in state.check_actor_ids)]
            say(f"driver log {path}: {len(lines)} subscriber/ALIVE/check-actor lines")
            for ln in lines[-40:]:
                print("   ", ln[:260])
        verdict = "OK" if results and all(results) else "HANG"
        say(f"RESULT {verdict} ({sum(results)}/{len(results)} checks OK)")
        sys.stdout.flush()
        # a hung Ray Data thread may block a clean shutdown: bound it, then leave
        def stop():
            ray.shutdown()
            if state.cluster is not None:
                with keep_address_file():
                    state.cluster.shutdown()

        th = threading.Thread(target=stop, daemon=True)
        th.start()
        th.join(60)
        kill_leftovers(args.temp_dir)
        os._exit(0 if verdict == "OK" else 3)


if __name__ == "__main__":
    main()
