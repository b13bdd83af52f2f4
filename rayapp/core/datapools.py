"""Ray Data pipelines driven from an actor of their own, their output streamed back.

Why not from the driver: Ray Data hands every actor pool its transform as an object-store argument
and turns actor restarts on, and for each such actor Ray's core worker, in the process that
creates it, prints an error line (``core_worker.cc ... has constructor arguments in the object
store and max_restarts > 0``; ray-project/ray#57733). Ray Data holds that argument for the pool's
lifetime, so the restarts our pools rely on work. Created from another process, the pool's lines
go to that process's worker log with the rest of Ray's internals (shown with -v), and the user's
terminal keeps only rayapp's lines.

The driver of a pool is an actor of its own on the driver's node, asking for no CPU: it only
drives Ray Data, and it owns the pool. Its items come back one by one (a streaming generator), so
a caller commits results as they arrive and the watchdog sees each one as progress. Closing the
stream (done, failed or stalled) ends that actor, and with it whatever of the pool is left: a
failed pool's actors are otherwise kept alive by the references in the error's traceback.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable


class _PoolDriver:
    def stream(self, data_context, make_items: Callable[..., Iterable[Any]], args: tuple):
        import ray.data

        ray.data.DataContext._set_current(data_context)  # the driver's settings (progress bars, ...)
        yield from make_items(*args)


class DrivenStream:
    """The items of ``make_items(*args)``, computed in an actor of its own on this node."""

    def __init__(self, make_items: Callable[..., Iterable[Any]], *args):
        import ray
        import ray.data
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        driver = ray.remote(num_cpus=0, max_restarts=0)(_PoolDriver)
        self._driver = driver.options(scheduling_strategy=here).remote()
        self._refs = self._driver.stream.options(num_returns="streaming", name=f"rayapp-data:{make_items.__name__}") \
            .remote(ray.data.DataContext.get_current(), make_items, args)
        self._closed = False

    def __iter__(self) -> "DrivenStream":
        return self

    def __next__(self) -> Any:
        import ray

        try:
            return ray.get(next(self._refs))
        except BaseException:  # StopIteration included: done, or failed
            self.close()
            raise

    def close(self) -> None:
        """End the driving actor (and what is left of its pool); idempotent."""
        if self._closed:
            return
        self._closed = True
        import ray

        try:
            ray.kill(self._driver)
        except Exception:  # already gone
            pass
