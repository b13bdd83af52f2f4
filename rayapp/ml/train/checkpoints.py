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

from rayapp.core import storage
from rayapp.core.artifacts import EXPORT_MARKER, export_complete, mark_export  # noqa: F401  (re-exported)

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


def fetch_step(step_uri: str, staging: str | None) -> str:
    """A local copy of a complete step checkpoint to load from.

    From an object store the step folder is downloaded once per node, into the node's staging
    folder, under a file lock: a node's ranks share one copy (at 13B, weights and Adam state are
    ~156 GB, eight copies would not fit a node's disk). ``drop_fetched`` removes it once every rank
    has loaded. A shared filesystem path is read in place."""
    import fcntl

    if not storage.is_remote(step_uri):
        return step_uri
    local = os.path.join(staging, "resume", os.path.basename(step_uri.rstrip("/")))
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(f"{local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.exists(f"{local}.complete"):  # another rank of this node may have fetched it
            shutil.rmtree(local, ignore_errors=True)
            storage.download_dir(step_uri, local)
            open(f"{local}.complete", "w").close()
    return local


def drop_fetched(local: str, step_uri: str) -> None:
    """Remove a node's downloaded step folder (call on one rank per node, after a barrier)."""
    if local == step_uri:
        return
    for path in (f"{local}.complete", f"{local}.lock"):
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(local, ignore_errors=True)


def set_config_dtype(export_dir: str, dtype) -> None:
    """Record the dtype an export's weights are stored in, in its config.json (local folder)."""
    import json

    path = os.path.join(export_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
