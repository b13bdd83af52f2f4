"""Training checkpoints: sharded DCP state for resume, plus consolidated HF exports.

Layout under a stage's folder (a local/shared path, or an s3:// / gs:// prefix):
  checkpoints/step-000120/   torch.distributed.checkpoint shards + rayapp_progress.json (written last)
  exports/epoch-1/           save_pretrained (safetensors) + tokenizer + rayapp_checkpoint.json (last)
The marker file written last is what makes a folder count as complete.

On an object store the workers write through a node-local staging folder: each rank saves its own
DCP shard files there (rank 0 also the metadata) and uploads them; rank 0 writes the marker after a
barrier, so a step folder counts as complete only once every rank's shards are in the bucket.
"""

from __future__ import annotations

import os
import re
import shutil

from rayapp.common import storage
from rayapp.common.artifacts import EXPORT_MARKER, export_complete, mark_export  # noqa: F401  (re-exported)

PROGRESS = "rayapp_progress.json"


def step_dir(ckpt_root: str, step: int) -> str:
    return storage.join(ckpt_root, f"step-{step:06d}")


def _complete_steps(ckpt_root: str) -> list[int]:
    steps = []
    for name in storage.list_dirs(ckpt_root):
        m = re.fullmatch(r"step-(\d+)", name)
        if m and storage.exists(storage.join(ckpt_root, name, PROGRESS)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_complete(ckpt_root: str) -> tuple[str, dict] | None:
    steps = _complete_steps(ckpt_root)
    if not steps:
        return None
    path = step_dir(ckpt_root, steps[-1])
    return path, storage.read_json(storage.join(path, PROGRESS))


def write_json(path: str, obj: dict) -> None:
    storage.write_json(path, obj)  # atomic: temporary name, then rename (one PUT on object stores)


def prune(ckpt_root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete step checkpoints."""
    for step in _complete_steps(ckpt_root)[:-keep] if keep > 0 else []:
        storage.remove_dir(step_dir(ckpt_root, step))


# ---- object-store staging ----------------------------------------------------------------------


def staging_root(work_dir: str) -> str:
    """The node-local folder that stands in for a remote ``work_dir`` while files are written."""
    return storage.local_cache_dir(work_dir, "train-staging")


def save_location(step_uri: str, rank: int, staging: str | None) -> str:
    """Where this rank's DCP writer puts its files: the step folder itself on a shared
    filesystem, a rank-private local folder (uploaded by ``publish``) for an object store."""
    if not storage.is_remote(step_uri):
        return step_uri
    local = os.path.join(staging, f"rank-{rank}", os.path.basename(step_uri))
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local, exist_ok=True)
    return local


def publish(local: str, target_uri: str) -> None:
    """Upload a staged folder to the object store and drop the local copy (no-op when local)."""
    if local == target_uri or not storage.is_remote(target_uri):
        return
    storage.upload_dir(local, target_uri)
    shutil.rmtree(local, ignore_errors=True)


def load_location(step_uri: str, rank: int, staging: str | None) -> str:
    """A local copy of a complete step checkpoint to load from (downloads it from an object store)."""
    if not storage.is_remote(step_uri):
        return step_uri
    return storage.download_dir(step_uri, os.path.join(staging, f"rank-{rank}", "resume"))
