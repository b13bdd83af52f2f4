"""Reading the manifests one stage leaves for the next."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.layout import RunLayout


class MissingInputError(RuntimeError):
    """A stage's input (an earlier stage's output) is not there yet."""


def read_prepared_manifest(layout: RunLayout) -> dict:
    if not storage.exists(layout.prepared_manifest):
        raise MissingInputError(f"no prepared data at {layout.prepared}: run `rayapp prepare` first")
    return storage.read_json(layout.prepared_manifest)
