"""Work spread over Ray Data as small items: each item (a block, a partition, a range of rows)
reads its inputs from and writes its rows to a work folder, and returns only a summary (counts, a
few keys) to the driver, so no row passes through it. Prepare and select without a gather
(``data.workers``, ``select.workers``) run every step this way.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable

import numpy as np


def run_items(fn, items: list[dict], workers: int, what: str, stall_s: float | None, *, stage: str,
              committed: str, **map_kwargs) -> list:
    """``fn`` over ``items`` (dicts sent as JSON), ``workers`` at a time, as Ray Data; the results
    (JSON-able) in the items' order. Each finished item is progress for the watchdog; ``committed``
    says what a stall leaves behind."""
    import ray.data

    from rayapp.core.watchdog import watched_iter

    if not items:
        return []
    ds = ray.data.from_items([{"i": i, "item": json.dumps(it)} for i, it in enumerate(items)],
                             override_num_blocks=len(items))
    size = min(workers, len(items))
    pool = ray.data.ActorPoolStrategy(size=size) if isinstance(fn, type) else ray.data.TaskPoolStrategy(size=size)
    done = ds.map(fn, num_cpus=1, compute=pool, **map_kwargs)
    rows = watched_iter(done.iter_rows(), stage=stage, stall_s=stall_s, committed=committed,
                        waiting_for=f"{what} (Ray Data, {len(items)} items)")
    return [json.loads(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]


def item_of(row: dict) -> dict:
    """The item a ``run_items`` function was given."""
    return json.loads(row["item"])


def reply(row: dict, result) -> dict:
    """What a ``run_items`` function returns for ``row``: its JSON-able ``result``."""
    return {"i": row["i"], "result": json.dumps(result)}


def hash_partition(ids: Iterable[str], partitions: int) -> np.ndarray:
    """Each id's partition by a stable hash (CRC32): the same on every worker and run, so every
    occurrence of an id, in any file or block, meets in one partition."""
    return np.fromiter((zlib.crc32(i.encode()) % partitions for i in ids), dtype=np.int32)


def step_timer(log, stage: str):
    """``done(step)``: logs the step's time since the last call and the driver's peak RSS so far."""
    import resource
    import time

    last = [time.perf_counter()]

    def done(step: str) -> None:
        log.info("%s: %s in %.1fs (driver's peak RSS so far %d MiB)", stage, step, time.perf_counter() - last[0],
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10)
        last[0] = time.perf_counter()

    return done


def error_reply(exc: Exception) -> dict:
    """A RayappError as a task's reply, for ``raise_errors`` on the driver to raise as it was."""
    return {"error": str(exc), "module": type(exc).__module__, "cls": type(exc).__qualname__}
