"""Experiment tracking: one TensorBoard run per pipeline run, every event tagged with its stage.

- Training logs its per-step metrics (loss, lr, tokens/s, MFU where known) from rank 0 inside the
  training function, as Ray Train's guidance on experiment tracking says, into the run's folder.
- Every stage's manifest, when it is written, logs its numbers (rows, scoring rate, eval loss,
  win / tie / lose and winning score...) as ``<stage>/<field>`` at step 0, and the files it names
  (reports, selection provenance) as text.

The writer is PyTorch's ``torch.utils.tensorboard.SummaryWriter``; it needs the ``tensorboard``
package (the ``tracking`` extra). Several processes (the driver, rank 0 of each training run) write
event files of their own into one run folder, which TensorBoard reads as one run.
"""

from __future__ import annotations

import math
import os

from rayapp.common import storage

STEP_METRICS = ("loss", "lr", "tokens_per_s", "mfu", "epoch")


def run_dir(cfg) -> str | None:
    """The run's TensorBoard folder, or None when tracking is off."""
    t = cfg.tracking
    if t.backend == "none":
        return None
    root = t.uri or storage.join(cfg.output_dir, "tracking")
    return os.path.join(root, t.run_name or cfg.name)


def tag(label: str) -> str:
    """A stage label as a tag prefix: "finetune (full)" -> "finetune-full"."""
    return label.replace(" (", "-").replace(")", "").replace(" ", "-")


def check_available(cfg) -> None:
    """Fail before any stage runs when the configured backend's client is not installed."""
    if cfg.tracking.backend == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            from rayapp.common.errors import ConfigError

            raise ConfigError("tracking.backend: tensorboard needs the tensorboard package: "
                              "pip install 'rayapp[tracking]'") from None


class Writer:
    def __init__(self, folder: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("tracking.backend: tensorboard needs the tensorboard package "
                              "(pip install 'rayapp[tracking]')") from exc
        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(log_dir=folder)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def text(self, name: str, text: str, step: int = 0) -> None:
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _numbers(obj: dict, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a manifest, as "a/b/c" -> value (lists are left out: shards, checkpoints)."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and depth < 3:
            out.update(_numbers(value, f"{prefix}{key}/", depth + 1))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def _files(obj, depth: int = 0) -> list[str]:
    if isinstance(obj, dict) and depth < 4:
        return [f for v in obj.values() for f in _files(v, depth + 1)]
    if isinstance(obj, str) and obj.endswith((".html", ".md", ".json", ".parquet", ".png")) and "/" in obj:
        return [obj]
    return []


def log_manifest(cfg, label: str, manifest: dict) -> None:
    """A finished stage's numbers and the files it names, into the run's tracking."""
    folder = run_dir(cfg)
    if folder is None:
        return
    w = Writer(folder)
    try:
        prefix = tag(label)
        w.scalars(prefix, _numbers(manifest), 0)
        files = sorted(set(_files(manifest)))
        if files:
            w.text(f"{prefix}/files", "\n".join(f"- {f}" for f in files))
    finally:
        w.close()
