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
