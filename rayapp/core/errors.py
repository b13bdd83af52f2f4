"""Errors a user can fix. The CLI prints these as one line (exit 2 for usage and config, 1 for
the rest); any other exception is a bug and shows its traceback."""

from __future__ import annotations


class RayappError(Exception):
    """A problem with the user's config, input or environment, not with rayapp."""

    exit_code = 1


class ConfigError(RayappError, ValueError):
    """A configuration problem, with a message that names the key."""

    exit_code = 2


class MissingInputError(RayappError):
    """A stage's input (an earlier stage's output) is not there yet."""


class InputMismatchError(RayappError):
    """A stage's inputs were made from other inputs than the ones beside them."""


class InputDataError(RayappError):
    """Input data that cannot be used at all (an unreadable file, nothing left to train on)."""


class StallError(RayappError):
    """Ray work that made no progress for ``ray.stall_timeout_s`` (core/watchdog.py). The message
    names the stage, what it waited for and what is committed, so a rerun resumes from there."""

    def __init__(self, stage: str, waiting_for: str, stall_s: float, committed: str):
        self.stage, self.waiting_for, self.stall_s, self.committed = stage, waiting_for, stall_s, committed
        super().__init__(
            f"{stage}: no progress for {stall_s:g} s waiting for {waiting_for}; committed: {committed}. "
            "Rerun the same command to resume from there; raise ray.stall_timeout_s if a step can take longer.")

    def __reduce__(self):  # picklable (raised in a Ray task, it reaches the driver as itself)
        return type(self), (self.stage, self.waiting_for, self.stall_s, self.committed)
