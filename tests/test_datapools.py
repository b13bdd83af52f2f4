"""Ray Data pools driven from a Ray task (rayapp/core/datapools.py), on a real local Ray."""

from __future__ import annotations

import os
import time

import pytest

from rayapp.core.datapools import DrivenStream

NOISE = "has constructor arguments in the object store and max_restarts > 0"


def _stderr_after(capfd, settle_s: float = 1.0, until: str | None = None, wait_s: float = 20.0) -> str:
    """What reached stderr: after ``settle_s``, or, with ``until``, once it appears (or ``wait_s``
    passes): Ray's C++ logger writes from its own threads, sometimes seconds late under load."""
    time.sleep(settle_s)
    err = capfd.readouterr().err
    deadline = time.time() + wait_s
    while until is not None and until not in err and time.time() < deadline:
        time.sleep(0.5)
        err += capfd.readouterr().err
    return err


def test_a_pool_driven_from_an_actor_streams_its_items_and_keeps_rays_noise_off_the_terminal(ray_local, capfd):
    # defined here, so Ray ships them by value to workers that cannot import this test module
    class Doubler:
        def __call__(self, batch):
            return {"id": batch["id"] * 2}

    def doubled(n: int):
        import ray.data

        ds = ray.data.range(n, override_num_blocks=n).map_batches(
            Doubler, batch_size=1, batch_format="numpy", num_cpus=0.5,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            yield batch["id"].tolist()

    capfd.readouterr()
    items = list(DrivenStream(doubled, 5))
    assert sorted(x for item in items for x in item) == [0, 2, 4, 6, 8]
    assert NOISE not in _stderr_after(capfd)
    # the same pool created by this process: Ray's core worker prints the line here (ray#57733),
    # once per process: no earlier test in this process may create an actor pool with constructor
    # arguments (test files run in name order; test_prepare.py's do, after this one)
    assert sorted(x for item in doubled(5) for x in item) == [0, 2, 4, 6, 8]
    err = _stderr_after(capfd, until=NOISE)
    assert NOISE in err and "MapWorker(MapBatches(Doubler))" in err


def test_closing_a_stream_ends_its_driver(ray_local, tmp_path):
    pid_file = tmp_path / "pid"

    def one_then_hang(path: str):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        yield "first"
        time.sleep(600)
        yield "never"

    stream = DrivenStream(one_then_hang, str(pid_file))
    assert next(stream) == "first"
    pid = int(pid_file.read_text())
    stream.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the driving actor {pid} still runs 60 s after the stream was closed")
    with pytest.raises(Exception):
        next(stream)
    stream.close()  # idempotent
