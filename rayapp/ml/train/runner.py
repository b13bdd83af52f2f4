"""Driver side of a training run: a TorchTrainer of FSDP2/DDP workers, failures, a progress line."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

from rayapp.config import RayConfig, TrainConfig
from rayapp.core import storage
from rayapp.core.log import current_level, get_logger
from rayapp.core.progress import ProgressLine
from rayapp.core.watchdog import enabled, watched
from rayapp.ml.train.layout import TrainingLayout

log = get_logger("rayapp.ml.train")

# What a training run keeps in its work dir: resumable state and outputs. A stage that trains
# clears them when its inputs change, so a run never resumes from checkpoints of other inputs.
# run_training's default: the config's. The stages that train should pass cfg.ray.stall_timeout_s.
STALL_S_DEFAULT = RayConfig.model_fields["stall_timeout_s"].default


def _watch_progress(jobs: list[tuple[str, str]], stop: threading.Event, changes: list[int] | None = None) -> None:
    """Draw rank 0's progress (``TrainingLayout.progress``, written every log step) as one line per job
    (label, work dir); ``changes[0]`` counts the new contents seen (the fit's progress for the watchdog)."""
    lines: dict[str, ProgressLine] = {}
    seen: dict[str, dict] = {}
    while not stop.wait(1.0):
        for label, work_dir in jobs:
            uri = TrainingLayout(work_dir).progress
            try:
                p = storage.read_json(uri) if storage.exists(uri) else None
            except (OSError, ValueError):
                p = None
            if p and p != seen.get(label):
                seen[label] = p
                if changes is not None:
                    changes[0] += 1
                line = lines.setdefault(label, ProgressLine(label, unit="steps"))
                mfu = f" mfu {p['mfu']:.1%}" if "mfu" in p else ""
                line.update(p["step"], p["total_steps"],
                            f"epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.4f} {p['tokens_per_s']:,.0f} tokens/s{mfu}")
    for line in lines.values():
        line.close()


def _controller_recorder(path: str):
    """A Ray Train controller callback that leaves the controller's actor handle, pickled, in ``path``:
    the watchdog's way to abort a fit that stalls. Ray 2.60's trainer keeps the handle to itself (it
    aborts the controller only from its Ctrl-C handler); the controller runs on the driver's node, so
    a local file reaches it. ControllerCallback is a DeveloperAPI of Ray Train v2."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class RecordControllerHandle(ControllerCallback):
        def after_controller_start(self, train_run_context) -> None:
            import ray
            import ray.cloudpickle

            data = ray.cloudpickle.dumps(ray.get_runtime_context().current_actor)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)

    return RecordControllerHandle()


def _abort_fit(handle_file: str, grace_s: float = 30.0) -> None:
    """Stop a running fit: the controller's own abort (it stops the worker group and frees its
    placement group), then a kill of the controller actor in case the abort is never delivered."""
    import ray
    import ray.cloudpickle

    try:
        with open(handle_file, "rb") as f:
            controller = ray.cloudpickle.loads(f.read())
    except (OSError, EOFError):
        log.warning("the training controller never started: nothing to abort")
        return
    try:
        ray.wait([controller.abort.remote()], timeout=grace_s)
    finally:
        ray.kill(controller, no_restart=True)


def _committed(jobs: list["TrainJob"], worker_cfgs: list) -> str:
    """Each job's newest complete checkpoint (a rerun resumes from it) and its final export, if made."""
    from rayapp.core.artifacts import export_complete
    from rayapp.ml.train.checkpoints import latest_complete

    parts = []
    for job, c in zip(jobs, worker_cfgs):
        if export_complete(c.files.final_export):
            parts.append(f"{job.label}: trained and exported to {c.files.final_export}")
            continue
        last = latest_complete(c.checkpoint_dir)
        parts.append(f"{job.label}: " + (f"checkpoint {last[0].rstrip('/').rsplit('/', 1)[-1]}" if last
                                         else "no checkpoint") + f" under {c.checkpoint_dir}")
    return "; ".join(parts)


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
    (ml/train/policy.py: ALLOCATOR_CONF), which `rayapp plan` budgets fragmentation for. A setting of the
    driver's own (its env or the job's runtime env) is left to the workers; so is one in
    ``runtime_env``."""
    from rayapp.ml.train.policy import ALLOCATOR_CONF

    if not use_gpu or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return runtime_env
    env = dict(runtime_env or {})
    env["env_vars"] = {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_CONF, **(env.get("env_vars") or {})}
    return env


def run_training(stage: str, train_cfg: TrainConfig, jobs: list[TrainJob], runtime_env: dict | None = None,
                 tracking: dict | None = None, stall_s: float | None = STALL_S_DEFAULT) -> list[dict]:
    """Fine-tune each job's model on its rows, one job after the other on one Ray Train worker group
    (its processes, imports and process group are set up once). Returns rank 0's final stats per job.

    ``stall_s`` (ray.stall_timeout_s): no new rank-0 progress (stats/progress.json, every log step)
    for that long stops the fit (the controller is aborted) and raises a StallError."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayapp.core import placement
    from rayapp.core.rehearsal import collective_backend
    from rayapp.ml.train.checkpoints import staging_root
    from rayapp.ml.train.worker import WorkerConfig, train_loop_per_worker

    worker_cfgs = []
    for job in jobs:
        # A shared path is used as it is; on an object store (s3://, gs://) checkpoints and exports
        # go through node-local staging folders and are uploaded (see ml/train/checkpoints.py).
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
    # the same in every attempt, which exact resume needs (see ml/train/worker.py).
    where = placement.training(stage, train_cfg)
    # Ray Train's own run state only (rayapp keeps its checkpoints itself): beside the first job's
    # outputs, or node-local when they are on an object store (no checkpoint is reported to Ray).
    ray_state = (os.path.join(first.staging_dir, "ray_train") if first.staging_dir
                 else TrainingLayout(first.work_dir).ray_train)
    local_mode = train_cfg.num_workers == 0
    # the watchdog needs Ray Train v2's controller to abort; local mode trains in this process
    from ray.train.v2._internal.constants import is_v2_enabled

    watch = enabled(stall_s) and not local_mode and is_v2_enabled()
    handle_file = None
    if watch:
        handle_file = os.path.join(tempfile.mkdtemp(prefix="rayapp-train-"), "controller.pkl")
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
            **({"callbacks": [_controller_recorder(handle_file)]} if watch else {}),
        ),
    )
    workers = max(1, train_cfg.num_workers)
    log.info("effective batch %d rows (%d per device x %d accumulation steps x %d worker%s; the paper: 128)",
             train_cfg.per_device_batch_size * train_cfg.gradient_accumulation_steps * workers,
             train_cfg.per_device_batch_size, train_cfg.gradient_accumulation_steps, workers, "s" * (workers > 1))
    if local_mode:  # the training function runs in this process: keep its torch settings as they were
        import torch

        threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    stop = threading.Event()
    changes = [0]
    watcher = threading.Thread(target=_watch_progress, args=([(j.label, c.work_dir) for j, c in zip(jobs, worker_cfgs)],
                                                            stop, changes), daemon=True)
    watcher.start()
    try:
        if watch:
            # the fit in a daemon thread, this one polling: it can raise even if the abort never lands
            try:
                result = watched(trainer.fit, stage=stage, stall_s=stall_s, progress=lambda: changes[0],
                                 waiting_for=f"the Ray Train fit ({workers} worker{'s' * (workers > 1)}: "
                                             f"{', '.join(j.label for j in jobs)}; progress is a training step logged)",
                                 committed=lambda: _committed(jobs, worker_cfgs),
                                 on_stall=lambda: _abort_fit(handle_file))
            except KeyboardInterrupt:  # what Ray Train's own Ctrl-C handler does on the main thread
                _abort_fit(handle_file, grace_s=10)
                raise
        else:
            result = trainer.fit()
    finally:
        stop.set()
        watcher.join(timeout=5)
        if handle_file:
            shutil.rmtree(os.path.dirname(handle_file), ignore_errors=True)
        if local_mode:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    if result.error:
        raise RuntimeError(f"{stage}: training failed: {result.error}")
    out = []
    for c in worker_cfgs:
        stats_file = c.files.rank_stats(0)
        out.append(storage.read_json(stats_file) if storage.exists(stats_file) else {})
    return out
