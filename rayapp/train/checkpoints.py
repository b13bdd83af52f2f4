"""Training checkpoints: sharded DCP state for resume, plus consolidated HF exports.

Layout under a stage's folder:
  checkpoints/step-000120/   torch.distributed.checkpoint shards + rayapp_progress.json (written last)
  exports/epoch-1/           save_pretrained (safetensors) + tokenizer + rayapp_checkpoint.json (last)
The marker file written last is what makes a folder count as complete.
"""

from __future__ import annotations

import json
import os
import re
import uuid

PROGRESS = "rayapp_progress.json"
EXPORT_MARKER = "rayapp_checkpoint.json"


def step_dir(ckpt_root: str, step: int) -> str:
    return os.path.join(ckpt_root, f"step-{step:06d}")


def latest_complete(ckpt_root: str) -> tuple[str, dict] | None:
    if not os.path.isdir(ckpt_root):
        return None
    best = None
    for name in os.listdir(ckpt_root):
        m = re.fullmatch(r"step-(\d+)", name)
        marker = os.path.join(ckpt_root, name, PROGRESS)
        if m and os.path.exists(marker):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, os.path.join(ckpt_root, name))
    if best is None:
        return None
    with open(os.path.join(best[1], PROGRESS)) as f:
        return best[1], json.load(f)


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def export_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, EXPORT_MARKER))


def mark_export(path: str, info: dict) -> None:
    write_json(os.path.join(path, EXPORT_MARKER), {"uid": uuid.uuid4().hex, **info})


def prune(ckpt_root: str, keep: int) -> None:
    """Keep the newest ``keep`` complete step checkpoints."""
    import shutil

    steps = sorted(
        (n for n in os.listdir(ckpt_root) if re.fullmatch(r"step-\d+", n)
         and os.path.exists(os.path.join(ckpt_root, n, PROGRESS))),
        reverse=True,
    )
    for old in steps[keep:]:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)


def claim_work_dir(work: str, fingerprint: str, force: bool) -> None:
    """Make ``work`` ready for a training run with these inputs. When the inputs or settings
    changed (or ``force``), old checkpoints and exports are removed so they are never resumed from;
    otherwise they stay, and the run resumes from them."""
    import shutil

    marker = os.path.join(work, "fingerprint.txt")
    stale = os.path.exists(marker) and open(marker).read().strip() != fingerprint
    if force or stale:
        for sub in ("checkpoints", "exports", "stats", "ray_train"):
            shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    with open(marker, "w") as f:
        f.write(fingerprint)
