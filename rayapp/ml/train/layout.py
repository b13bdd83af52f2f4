"""Where a training run's files live inside its work folder (the reference's, or one finetune
subset's): the one place their names are joined.

    checkpoints/step-000120/   sharded DCP checkpoints (ml/train/checkpoints.py)
    exports/epoch-1/, final/   HF exports (the reference's per epoch, every run's final)
    stats/progress.json        rank 0's latest step, written every log step (`rayapp status` reads it)
    stats/rank-<r>.json        each rank's final numbers
    ray_train/                 Ray Train's own run storage
"""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.core import storage
from rayapp.core.stage import StageProgress

# What a training stage clears when its inputs change, so a run never resumes from checkpoints of
# other inputs (Stage.reset_on_change), and on --force.
TRAINING_STATE = ("checkpoints", "exports", "stats", "ray_train")


@dataclass(frozen=True)
class TrainingLayout:
    work_dir: str

    @property
    def checkpoints(self) -> str:
        return storage.join(self.work_dir, "checkpoints")

    @property
    def exports(self) -> str:
        return storage.join(self.work_dir, "exports")

    @property
    def final_export(self) -> str:
        return storage.join(self.exports, "final")

    def epoch_export(self, epoch: int) -> str:
        return storage.join(self.exports, f"epoch-{epoch}")

    @property
    def stats(self) -> str:
        return storage.join(self.work_dir, "stats")

    @property
    def progress(self) -> str:
        return storage.join(self.stats, "progress.json")

    def rank_stats(self, rank: int) -> str:
        return storage.join(self.stats, f"rank-{rank}.json")

    @property
    def ray_train(self) -> str:
        return storage.join(self.work_dir, "ray_train")


def training_progress(work_dir: str) -> StageProgress | None:
    """A training run's progress (`rayapp status`): rank 0's latest logged step of all of them."""
    try:
        p = storage.read_json(TrainingLayout(work_dir).progress)
    except (FileNotFoundError, OSError, ValueError):
        return None
    if not p or "step" not in p or "total_steps" not in p:
        return None
    return StageProgress(p["step"], p["total_steps"], "steps", p.get("time"),
                         {k: p[k] for k in ("epoch", "epochs", "loss", "tokens_per_s") if k in p})


def training_detail(metrics: dict) -> dict:
    """A finished training run's headline numbers (`rayapp status`)."""
    return {k: metrics[k] for k in ("global_step", "eval_loss", "last_loss") if metrics.get(k) is not None}
