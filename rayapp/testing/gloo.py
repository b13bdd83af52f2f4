"""Run a function on N local processes joined in a gloo process group, without Ray: for tests and
benchmarks of the FSDP2 code paths (sharding, sharded loading) at the world size they need."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def _entry(rank: int, world: int, init_file: str, fn: Callable, args: tuple, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_gloo(fn: Callable, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; returns their results by rank.
    ``fn`` must be importable (a module-level function) and return something picklable."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="rayapp-gloo-") as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world, os.path.join(tmp, "init"), fn, args, results), nprocs=world, join=True)
        return [results[r] for r in range(world)]
