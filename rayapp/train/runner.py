"""Driver side of a training run: Ray Data input, TorchTrainer with FSDP2/DDP workers, failures."""

from __future__ import annotations

import os

from rayapp.common import storage
from rayapp.config import TrainConfig


def run_training(
    stage: str,
    train_cfg: TrainConfig,
    train_files: list[str],
    total_rows: int,
    init_model: str,
    tokenizer: str,
    work_dir: str,
    export_every_epoch: bool,
    trust_remote_code: bool = False,
    eval_file: str | None = None,
    runtime_env: dict | None = None,
) -> dict:
    """Fine-tune ``init_model`` on the prepared rows in ``train_files``.

    ``work_dir`` (a local or shared path) receives checkpoints/ (sharded, for resume), exports/
    (save_pretrained) and stats/. Returns the last reported metrics."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayapp.train.loop import train_loop_per_worker

    # A shared path is used as it is; on an object store (s3://, gs://) checkpoints and exports go
    # through node-local staging folders and are uploaded (see train/checkpoints.py).
    remote = storage.is_remote(work_dir)
    if not remote:
        work_dir = os.path.abspath(work_dir)
    from rayapp.train.checkpoints import staging_root

    staging = staging_root(work_dir) if remote else None
    # Each worker reads the training files itself (tokenized instruction sets are tens of MB even
    # at paper scale) and takes its rows from a seeded DistributedSampler: the data order is then
    # the same in every attempt, which exact resume needs (see train/loop.py).
    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = train_cfg.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "stage": stage,
            "train": train_cfg.model_dump(),
            "init_model": init_model,
            "tokenizer": tokenizer,
            "total_rows": total_rows,
            "train_files": list(train_files),
            "checkpoint_dir": storage.join(work_dir, "checkpoints"),
            "export_dir": storage.join(work_dir, "exports"),
            "stats_dir": storage.join(work_dir, "stats"),
            "staging_dir": staging,
            "export_every_epoch": export_every_epoch,
            "checkpoint_every_steps": train_cfg.checkpoint_every_steps,
            "eval_file": eval_file,
            "trust_remote_code": trust_remote_code,
        },
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"{stage}-train",
            # Ray Train's own run state only (rayapp keeps its checkpoints itself); local when the
            # work dir is on an object store, since no checkpoint is reported through Ray.
            storage_path=os.path.join(staging, "ray_train") if remote else os.path.join(work_dir, "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=runtime_env,
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{stage}: training failed: {result.error}")
    stats_file = storage.join(work_dir, "stats", "rank-0.json")
    stats = storage.read_json(stats_file) if storage.exists(stats_file) else {}
    return {**dict(result.metrics or {}), **stats}
