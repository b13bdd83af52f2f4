"""Which model export is this: the marker file every export writes last, on local paths and
object stores alike."""

from __future__ import annotations

import uuid

from rayapp.core import storage

# Written last into every consolidated export (save_pretrained folder): its presence makes the
# folder complete, and its uid changes whenever the weights do.
EXPORT_MARKER = "rayapp_checkpoint.json"


def export_complete(path: str) -> bool:
    return storage.exists(storage.join(path, EXPORT_MARKER))


def mark_export(path: str, info: dict) -> None:
    storage.write_json(storage.join(path, EXPORT_MARKER), {"uid": uuid.uuid4().hex, **info})


def artifact_uid(path: str) -> str:
    """The uid of a rayapp export at ``path`` (local, s3://, gs://); for anything else (a hub
    name, a folder rayapp did not write) the path itself."""
    marker = storage.join(path, EXPORT_MARKER)
    if storage.exists(marker):
        return str(storage.read_json(marker)["uid"])
    return path
