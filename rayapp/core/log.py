"""Logging: one logger per module under ``rayapp``; the CLI sets the format and the level.

Lines read ``[stage] message``: the logger ``rayapp.stages.score.engine`` prints as ``[score]``
(the folders that only group packages, ``stages``, ``ml`` and ``ops``, are not tags).
Processes Ray starts (actors, training workers) call ``configure`` themselves with the level the
driver passes along, since they do not inherit the driver's logging set-up.
"""

from __future__ import annotations

import logging
import sys

ROOT = "rayapp"
GROUPS = ("stages", "ml", "ops")


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        if parts[0] == ROOT:
            parts = [p for p in parts[1:] if p not in GROUPS] or [ROOT]
        tag = parts[0]
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg += "\n" + self.formatException(record.exc_info)
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[{tag}] {prefix}{msg}"


def configure(level: int = logging.INFO, stream=None) -> None:
    """Send rayapp's log records to ``stream`` (stdout) at ``level``; idempotent."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    for h in list(logger.handlers):
        if getattr(h, "_rayapp", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_StageFormatter())
    handler._rayapp = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def current_level() -> int:
    return logging.getLogger(ROOT).getEffectiveLevel()


def get_logger(name: str) -> logging.Logger:
    """``get_logger(__name__)`` in every module."""
    return logging.getLogger(name)
