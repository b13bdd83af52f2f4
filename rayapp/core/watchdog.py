"""Progress watchdogs: no progress for ``ray.stall_timeout_s`` -> a StallError, never a silent wait.

Where rayapp waits on Ray work (an actor pool's results, a Ray Train fit, a task started ahead), a
lost notification can leave the driver waiting for ever with nothing on screen (issue 28: after a
subscribed worker dies, the driver may never see later actors come alive, and a Ray Data pool then
waits in ``get_output_blocking``). Each such wait goes through one of these:

- ``watched(call, ...)``: the blocking ``call`` runs in a daemon thread while the caller's thread
  polls; progress is any change of the value a ``progress()`` probe returns (a count of committed
  files, a step number), or, with no probe, nothing: then the whole wait is bounded by ``stall_s``.
- ``watched_iter(iterable, ...)``: each item is progress; the next item not arriving within
  ``stall_s`` (time the consumer spends on an item does not count) is a stall. The items are taken
  in a daemon thread and handed over one at a time, in order.
- ``ProgressTimer``: the clock itself, for a wait that cannot move to another thread (Ray Train's
  fit keeps the main thread for its Ctrl-C handler; ml/train/runner.py polls from its progress thread).

On a stall, ``on_stall()`` (if given) stops what can be stopped, then a ``StallError`` names the stage,
what it waited for and what is committed (``committed``: a string, or a callable asked at that
moment). ``stall_s`` None or 0 turns the watchdog off: the call or iteration runs as it would bare.

Hand-written rather than a library: timeout packages (func_timeout, stopit, timeout-decorator)
bound a whole call's duration, not the time since its last progress, and interrupt by signals (main
thread only) or by injecting exceptions into the thread, which cannot break a wait inside Ray's C++
core; ``concurrent.futures`` threads are joined at interpreter exit, so a call that never returns
would then hang the exit too. Daemon threads and a queue are all this needs.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from rayapp.core.errors import StallError

T = TypeVar("T")
_NOTHING = object()


def enabled(stall_s: float | None) -> bool:
    return bool(stall_s) and stall_s > 0


def _poll_s(stall_s: float) -> float:
    """How often the waiting thread looks: often enough to stop within a few percent of stall_s."""
    return min(1.0, max(0.02, stall_s / 20))


def describe(committed) -> str:
    if callable(committed):
        try:
            committed = committed()
        except Exception as exc:  # the error names the stall, not a failure to describe it
            committed = f"unknown ({type(exc).__name__}: {exc})"
    return committed or "nothing yet"


def stall_error(stage: str, waiting_for: str, stall_s: float, committed=None) -> StallError:
    return StallError(stage, waiting_for, stall_s, describe(committed))


class ProgressTimer:
    """Seconds since the probed value last changed; ``stalled`` once that reaches ``stall_s``."""

    def __init__(self, stall_s: float, value: Any = _NOTHING):
        self.stall_s, self.value, self.since = stall_s, value, time.monotonic()

    def observe(self, value: Any) -> bool:
        """Record the probe's current value; True when it has not changed for stall_s."""
        if value != self.value:
            self.value, self.since = value, time.monotonic()
        return self.stalled()

    def reset(self) -> None:
        self.since = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.since

    def stalled(self) -> bool:
        return self.idle_s() >= self.stall_s


def _probe(progress: Callable[[], Any] | None, last: Any) -> Any:
    if progress is None:
        return last
    try:
        return progress()
    except Exception:  # a probe that cannot read (a file being replaced) saw no progress
        return last


def watched(call: Callable[[], T], *, stage: str, waiting_for: str, stall_s: float | None,
            progress: Callable[[], Any] | None = None, committed=None,
            on_stall: Callable[[], None] | None = None) -> T:
    """``call()``, or a StallError once ``progress()`` has not changed for ``stall_s`` seconds."""
    if not enabled(stall_s):
        return call()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    timer = ProgressTimer(stall_s, _probe(progress, None))
    threading.Thread(target=run, name=f"rayapp-watched-{stage}", daemon=True).start()
    while not done.wait(_poll_s(stall_s)):
        if timer.observe(_probe(progress, timer.value)) and not done.is_set():
            if on_stall is not None:
                on_stall()
            raise stall_error(stage, waiting_for, stall_s, committed)
    if "error" in box:
        raise box["error"]
    return box["value"]


def watched_iter(iterable: Iterable[T], *, stage: str, waiting_for: str, stall_s: float | None,
                 committed=None, on_stall: Callable[[], None] | None = None) -> Iterator[T]:
    """The items of ``iterable`` in order, or a StallError when the next one takes over ``stall_s``."""
    if not enabled(stall_s):
        yield from iterable
        return
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()  # the consumer has gone (done, failed, or stalled)

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put((kind, value), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(iterable)
        try:
            for item in it:
                if not put("item", item):
                    break
            else:
                put("end", None)
        except BaseException as exc:
            put("error", exc)
        finally:
            if stop.is_set() and hasattr(it, "close"):
                try:
                    it.close()  # a Ray Data iterator shuts its executor (and its actor pool) down
                except Exception:
                    pass

    threading.Thread(target=produce, name=f"rayapp-watched-{stage}", daemon=True).start()
    timer = ProgressTimer(stall_s)
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=_poll_s(stall_s))
            except queue.Empty:
                if timer.stalled():
                    stop.set()
                    if on_stall is not None:
                        on_stall()
                    raise stall_error(stage, waiting_for, stall_s, committed) from None
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
            timer.reset()  # the consumer's own time on an item is not a stall
    finally:
        stop.set()
