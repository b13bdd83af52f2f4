"""Experiment tracking: one run per pipeline run, every event tagged with its stage.

- Training logs its per-step metrics (loss, lr, tokens/s, MFU where known) from rank 0 inside the
  training function, as Ray Train's guidance on experiment tracking says.
- Every stage's manifest, when it is written, logs its numbers (rows, scoring rate, eval loss,
  win / tie / lose and winning score...) as ``<stage>/<field>`` at step 0, and attaches the files
  it names (reports, selection provenance) where the backend keeps files.

Three backends, each through its own client, behind one small writer interface (``scalars``,
``files``, ``close``):

- ``tensorboard``: PyTorch's ``SummaryWriter`` writes event files into the run's folder. Several
  processes (the driver, rank 0 of each training run) write files of their own there, which
  TensorBoard reads as one run. Files are listed as text (TensorBoard keeps no artifacts).
- ``mlflow``: ``MlflowClient`` against a tracking server, a database or a local file store. The
  driver creates the run before any stage starts (``start``); every process then finds it by name.
- ``wandb``: one W&B run whose id is derived from the run's name, resumed by each process in turn
  (the driver between stages, rank 0 while training: never two at once). Each stage's metrics
  have their own step axis (``<stage>/step``), since W&B's own step must only grow.
"""

from __future__ import annotations

import math
import os
import re
import time

from rayapp.core import storage

STEP_METRICS = ("loss", "lr", "tokens_per_s", "mfu", "epoch")
MAX_ARTIFACT_BYTES = 64 * 2**20  # files bigger than this (a selected shard) are listed, not uploaded
CLIENTS = {"tensorboard": ("tensorboard", "tracking"), "mlflow": ("mlflow", "tracking"), "wandb": ("wandb", "wandb")}


def target(cfg) -> dict | None:
    """Where this run's tracking goes, as plain data a Ray Train worker can take; None when off."""
    t = cfg.tracking
    if t.backend == "none":
        return None
    name = t.run_name or cfg.name
    if t.backend == "tensorboard":
        root = t.uri or storage.join(cfg.output_dir, "tracking")
        return {"backend": "tensorboard", "folder": os.path.join(root, name)}
    if t.backend == "mlflow":
        return {"backend": "mlflow", "uri": mlflow_uri(t.uri or storage.join(cfg.output_dir, "mlruns")),
                "experiment": t.experiment, "run_name": name}
    return {"backend": "wandb", "project": t.experiment, "run_name": name, "run_id": wandb_run_id(name, cfg.output_dir),
            "dir": os.path.abspath(storage.local_path(cfg.output_dir)) if not storage.is_remote(cfg.output_dir)
            else None}


def mlflow_uri(uri: str) -> str:
    """A folder becomes a file store URI; a server, database or databricks URI stays as it is."""
    if "://" in uri or uri.startswith(("databricks", "sqlite:", "file:")):
        return uri
    return "file://" + os.path.abspath(uri)


def wandb_run_id(name: str, output_dir: str) -> str:
    """A stable W&B run id for one pipeline run: its name and where its outputs go."""
    from rayapp.core.hashing import short_digest

    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:48]}-{short_digest(output_dir.encode())[:8]}"


def tag(label: str) -> str:
    """A stage label as a tag prefix: "finetune (full)" -> "finetune-full"."""
    return label.replace(" (", "-").replace(")", "").replace(" ", "-")


def check_available(cfg) -> None:
    """Fail before any stage runs when the configured backend's client is not installed."""
    backend = cfg.tracking.backend
    if backend == "none":
        return
    module, extra = CLIENTS[backend]
    try:
        __import__(module)
    except ImportError:
        from rayapp.core.errors import ConfigError

        raise ConfigError(f"tracking.backend: {backend} needs the {module} package: "
                          f"pip install 'rayapp[{extra}]'") from None


def start(cfg) -> None:
    """Before the first stage (after ``check_available``): an MLflow run exists, and is reachable."""
    t = target(cfg)
    if t and t["backend"] == "mlflow":
        MlflowWriter(t, create=True).close()


def finish(cfg, ok: bool) -> None:
    """After the last stage: an MLflow run is marked finished (or failed)."""
    t = target(cfg)
    if t and t["backend"] == "mlflow":
        try:
            MlflowWriter(t).finish(ok)
        except Exception as exc:  # the run's own outcome matters more than its tracking status
            from rayapp.core.log import get_logger

            get_logger("rayapp.tracking").warning("tracking: could not mark the MLflow run finished: %s", exc)


def open_writer(t: dict):
    return {"tensorboard": TensorBoardWriter, "mlflow": MlflowWriter, "wandb": WandbWriter}[t["backend"]](t)


def _finite(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardWriter:
    def __init__(self, t: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("tracking.backend: tensorboard needs the tensorboard package "
                              "(pip install 'rayapp[tracking]')") from exc
        os.makedirs(t["folder"], exist_ok=True)
        self.writer = SummaryWriter(log_dir=t["folder"])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in _finite(values).items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def files(self, prefix: str, paths: list[str]) -> None:
        self.writer.add_text(f"{prefix}/files", "\n".join(f"- {f}" for f in paths), 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MlflowWriter:
    def __init__(self, t: dict, create: bool = False):
        if t["uri"].startswith("file:"):
            # MLflow 3 keeps its file store for existing set-ups only, behind this opt-in; a folder
            # named in tracking.uri is that opt-in (a server or sqlite:// is what MLflow advises)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=t["uri"])
        self.run_id = self._run(t["experiment"], t["run_name"], create)

    def _run(self, experiment: str, run_name: str, create: bool) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        found = self.client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{run_name}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run_id = found[0].info.run_id
            if create and found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")  # a resumed pipeline logs on into its run
            return run_id
        return self.client.create_run(exp_id, run_name=run_name, tags={"rayapp.run_name": run_name}).info.run_id

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}/{k}", v, now, step) for k, v in _finite(values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def files(self, prefix: str, paths: list[str]) -> None:
        listed = []
        for path in paths:
            local, size = _local_copy(path)
            if local is None:
                listed.append(f"- {path} ({size / 2**20:.0f} MiB: not attached)")
                continue
            self.client.log_artifact(self.run_id, local, artifact_path=prefix)
            listed.append(f"- {path}")
        self.client.log_text(self.run_id, "\n".join(listed) + "\n", f"{prefix}/files.md")

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")

    def close(self) -> None:
        pass


class WandbWriter:
    def __init__(self, t: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=t["project"], name=t["run_name"], id=t["run_id"], resume="allow",
                              dir=t.get("dir"), reinit="create_new")
        self.axes: set[str] = set()

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if prefix not in self.axes:  # each stage on its own step axis
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.axes.add(prefix)
        self.run.log({**{f"{prefix}/{k}": v for k, v in _finite(values).items()}, f"{prefix}/step": step})

    def files(self, prefix: str, paths: list[str]) -> None:
        artifact = self.wandb.Artifact(f"{prefix}-files", type="rayapp-stage")
        for path in paths:
            local, _ = _local_copy(path)
            if local is not None:
                artifact.add_file(local, name=os.path.basename(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


def _local_copy(path: str) -> tuple[str | None, int]:
    """A local file holding ``path`` (downloaded from an object store when it is there), or None
    with its size when it is over MAX_ARTIFACT_BYTES."""
    if not storage.is_remote(path):
        size = os.path.getsize(path)
        return (path if size <= MAX_ARTIFACT_BYTES else None), size
    data = storage.read_bytes(path)
    if len(data) > MAX_ARTIFACT_BYTES:
        return None, len(data)
    import tempfile

    local = os.path.join(tempfile.mkdtemp(prefix="rayapp-artifact-"), os.path.basename(path))
    with open(local, "wb") as f:
        f.write(data)
    return local, len(data)


def _numbers(obj: dict, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a manifest, as "a/b/c" -> value (lists are left out: shards, checkpoints)."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        if isinstance(value, dict) and depth < 3:
            out.update(_numbers(value, f"{prefix}{key}/", depth + 1))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def log_manifest(cfg, label: str, manifest: dict, files: list[str] = ()) -> None:
    """A finished stage's numbers, and the files it keeps with the run (``Stage.artifacts``), into
    the run's tracking."""
    t = target(cfg)
    if t is None:
        return
    w = open_writer(t)
    try:
        prefix = tag(label)
        w.scalars(prefix, _numbers(manifest), 0)
        files = sorted(f for f in set(files) if storage.exists(f))
        if files:
            w.files(prefix, files)
    finally:
        w.close()
