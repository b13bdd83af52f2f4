"""Driver side of a training run: a TorchTrainer of FSDP2/DDP workers, failures, a progress line."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from rayapp.common import storage
from rayapp.common.log import current_level, get_logger
from rayapp.common.progress import ProgressLine
from rayapp.config import TrainConfig

log = get_logger("rayapp.train")

# What a training run keeps in its work dir: resumable state and outputs. A stage that trains
# clears them when its inputs change, so a run never resumes from checkpoints of other inputs.
TRAINING_STATE = ("checkpoints", "exports", "stats", "ray_train")


def _watch_progress(jobs: list[tuple[str, str]], stop: threading.Event) -> None:
    """Draw rank 0's progress (stats/progress.json, written every log step) as one line per job."""
    lines: dict[str, ProgressLine] = {}
    seen: dict[str, dict] = {}
    while not stop.wait(1.0):
        for label, stats_dir in jobs:
            uri = storage.join(stats_dir, "progress.json")
            try:
                p = storage.read_json(uri) if storage.exists(uri) else None
            except (OSError, ValueError):
                p = None
            if p and p != seen.get(label):
                seen[label] = p
                line = lines.setdefault(label, ProgressLine(label, unit="steps"))
                mfu = f" mfu {p['mfu']:.1%}" if "mfu" in p else ""
                line.update(p["step"], p["total_steps"],
                            f"epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.4f} {p['tokens_per_s']:,.0f} tokens/s{mfu}")
    for line in lines.values():
        line.close()


@dataclass(frozen=True)
class TrainJob:
    """One model to train: what from, on which rows, and where its outputs go."""

    label: str  # e.g. "finetune (full)"
    init_model: str
    tokenizer: str
    train_files: list[str]
    total_rows: int
    work_dir: str  # checkpoints/, exports/ and stats/ (a local or shared path, or an object store)
    export_every_epoch: bool = False
    eval_file: str | None = None  # held-out rows for the eval loss
    trust_remote_code: bool = False


def _with_allocator_conf(runtime_env: dict | None, use_gpu: bool) -> dict | None:
    """The training workers' runtime env with the caching allocator's expandable segments
    (plan/memory.py: ALLOCATOR_CONF), which `rayapp plan` budgets fragmentation for. A setting of the
    driver's own (its env or the job's runtime env) is left to the workers; so is one in
    ``runtime_env``."""
    from rayapp.plan.memory import ALLOCATOR_CONF

    if not use_gpu or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return runtime_env
    env = dict(runtime_env or {})
    env["env_vars"] = {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_CONF, **(env.get("env_vars") or {})}
    return env


def run_training(stage: str, train_cfg: TrainConfig, jobs: list[TrainJob], runtime_env: dict | None = None,
                 tracking: dict | None = None) -> list[dict]:
    """Fine-tune each job's model on its rows, one job after the other on one Ray Train worker group
    (its processes, imports and process group are set up once). Returns rank 0's final stats per job."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayapp.common import placement
    from rayapp.common.rehearsal import collective_backend
    from rayapp.train.checkpoints import staging_root
    from rayapp.train.worker import WorkerConfig, train_loop_per_worker

    worker_cfgs = []
    for job in jobs:
        # A shared path is used as it is; on an object store (s3://, gs://) checkpoints and exports
        # go through node-local staging folders and are uploaded (see train/checkpoints.py).
        remote = storage.is_remote(job.work_dir)
        work_dir = job.work_dir if remote else os.path.abspath(job.work_dir)
        worker_cfgs.append(WorkerConfig(
            stage=stage, train=train_cfg, init_model=job.init_model, tokenizer=job.tokenizer,
            total_rows=job.total_rows, train_files=tuple(job.train_files), work_dir=work_dir,
            staging_dir=staging_root(work_dir) if remote else None, export_every_epoch=job.export_every_epoch,
            eval_file=job.eval_file, trust_remote_code=job.trust_remote_code, log_level=current_level(),
            tracking=tracking, tracking_label=job.label, lora=getattr(train_cfg, "lora", None),
        ))
    first = worker_cfgs[0]
    # Each worker reads the training files itself (tokenized instruction sets are tens of MB even
    # at paper scale) and takes its rows from a seeded DistributedSampler: the data order is then
    # the same in every attempt, which exact resume needs (see train/worker.py).
    where = placement.training(stage, train_cfg)
    # Ray Train's own run state only (rayapp keeps its checkpoints itself): beside the first job's
    # outputs, or node-local when they are on an object store (no checkpoint is reported to Ray).
    ray_state = (os.path.join(first.staging_dir, "ray_train") if first.staging_dir
                 else os.path.join(first.work_dir, "ray_train"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"jobs": [c.model_dump(mode="json") for c in worker_cfgs]},
        torch_config=TorchConfig(backend=collective_backend(train_cfg.use_gpu)),
        # num_workers=0: Ray Train's local mode (no worker actors, no resources to reserve)
        scaling_config=ray.train.ScalingConfig(num_workers=0) if where is None else
        ray.train.ScalingConfig(**where.train_scaling(train_cfg.use_gpu, train_cfg.num_workers)),
        run_config=ray.train.RunConfig(
            name=f"{stage}-{os.path.basename(first.work_dir.rstrip('/'))}",
            storage_path=ray_state,
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env=_with_allocator_conf(runtime_env, train_cfg.use_gpu),
        ),
    )
    local_mode = train_cfg.num_workers == 0
    workers = max(1, train_cfg.num_workers)
    log.info("effective batch %d rows (%d per device x %d accumulation steps x %d worker%s; the paper: 128)",
             train_cfg.per_device_batch_size * train_cfg.gradient_accumulation_steps * workers,
             train_cfg.per_device_batch_size, train_cfg.gradient_accumulation_steps, workers, "s" * (workers > 1))
    if local_mode:  # the training function runs in this process: keep its torch settings as they were
        import torch

        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=([(j.label, c.stats_dir) for j, c in zip(jobs, worker_cfgs)],
                                                            stop), daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        watcher.join(timeout=5)
        if local_mode:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    if result.error:
        raise RuntimeError(f"{stage}: training failed: {result.error}")
    out = []
    for c in worker_cfgs:
        stats_file = storage.join(c.stats_dir, "rank-0.json")
        out.append(storage.read_json(stats_file) if storage.exists(stats_file) else {})
    return out
