"""The training worker: one recipe for the reference model and the target, in named steps.

``FineTuneRecipe`` runs on every Ray Train worker (and on its own, without Ray, for benchmarks):
``setup_model`` (load, activation checkpointing, FSDP2 ``fully_shard`` per decoder layer or DDP),
``setup_optimizer`` (AdamW with warm-up and a cosine/linear schedule), ``setup_data`` (a seeded
``DistributedSampler`` over the training files), ``resume`` (the newest complete sharded
checkpoint), ``train`` (response-only loss, gradient accumulation, clipping), ``save_checkpoint``
(DCP shards), ``export`` (consolidated safetensors) and ``evaluate`` (held-out loss).

Data order is a pure function of (seed, epoch, rank), so a resumed run skips exactly the batches
the lost attempt trained on and ends with the same weights as one that never stopped. (Ray Data's
streaming split hands blocks to whichever worker asks first, so which rows a rank sees would
differ between attempts.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from rayapp.config import LoraConfig, TrainConfig
from rayapp.core import metrics as ray_metrics
from rayapp.core import storage, tracking
from rayapp.core.log import get_logger
from rayapp.ml.train.fsdp import decoder_layers, micro_batch_weight, optimizer_step, shard_fsdp2  # noqa: F401  (re-exported)
from rayapp.ml.train.layout import TrainingLayout
from rayapp.ml.train.policy import epoch_end_saves, keep_weights_gathered


class WorkerConfig(BaseModel):
    """Everything a worker needs, typed and frozen (Ray passes it as a dict)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage: str
    train: TrainConfig
    init_model: str
    tokenizer: str
    total_rows: int
    train_files: tuple[str, ...]
    work_dir: str  # checkpoints/, exports/ and stats/ live here (local, shared or object store)
    staging_dir: str | None  # node-local stand-in while writing to an object store
    export_every_epoch: bool
    eval_file: str | None  # held-out rows for the eval loss
    trust_remote_code: bool = False
    log_level: int = 20
    tracking: dict | None = None  # where the run's tracking goes (core/tracking.target): rank 0 logs each step
    tracking_label: str = ""  # e.g. "finetune (full)"
    lora: LoraConfig | None = None  # adapters on a frozen base (finetune.lora) rather than every weight

    @property
    def files(self) -> TrainingLayout:
        return TrainingLayout(self.work_dir)

    @property
    def checkpoint_dir(self) -> str:
        return self.files.checkpoints

    @property
    def export_dir(self) -> str:
        return self.files.exports

    @property
    def stats_dir(self) -> str:
        return self.files.stats


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world: int
    local_rank: int
    distributed: bool  # a process group is up (world > 1 under Ray Train)


@dataclass
class Progress:
    epoch: int = 0  # epochs completed when a checkpoint was taken
    batch_in_epoch: int = 0
    global_step: int = 0
    last_loss: float = float("nan")
    resumed_from: int | None = None


class FineTuneRecipe:
    def __init__(self, cfg: WorkerConfig, env: WorkerEnv, report: Callable[[dict], None] = lambda m: None,
                 wrap_ddp: Callable | None = None, fault_hook: Callable[[int, int], None] | None = None):
        import torch

        self.cfg, self.tc, self.env = cfg, cfg.train, env
        self.report, self.wrap_ddp, self.fault_hook = report, wrap_ddp, fault_hook
        self._background_save = None  # (future, step folder, progress) of a save being written
        self._save_group = None  # the gloo group background saves coordinate over
        self.background_saves = 0
        self.use_gpu = self.tc.use_gpu and torch.cuda.is_available()
        self.device = f"cuda:{env.local_rank}" if self.use_gpu else "cpu"
        if self.use_gpu:
            torch.cuda.set_device(self.device)
        else:
            # a fixed thread count and deterministic kernels: the same run gives the same weights
            torch.set_num_threads(max(1, int(self.tc.cpus_per_worker)))
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(self.tc.seed)
        self.bf16 = self.tc.mixed_precision == "bf16" or (self.tc.mixed_precision == "auto" and self.use_gpu)
        self.progress = Progress()
        self._tracker = None  # rank 0's tracking writer, opened at the first logged step

    # ---- set-up --------------------------------------------------------------------------------

    def setup_model(self) -> None:
        import torch

        from rayapp.ml.models.loading import load_causal_lm, load_tokenizer

        cfg, tc = self.cfg, self.tc
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.sharded = tc.fsdp and self.env.world > 1 and self.env.distributed
        self.keep_gathered = False  # decided in _sharded_model (policy.keep_weights_gathered)
        if self.sharded:
            self.model = self._sharded_model()
        else:
            self.model = self._with_adapters(
                load_causal_lm(cfg.init_model, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code))
            self._checkpoint_activations()
            self.train_model = self.wrap_ddp(self.model) if self.wrap_ddp is not None else self.model.to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if cfg.lora:
            self._log(f"LoRA r={cfg.lora.r}: {self.n_trainable:,} trainable of {self.n_params:,} parameters "
                      f"({self.n_trainable / self.n_params:.2%})")
        self.defer_sync = self._defer_gradient_sync()
        self.packing = self._packing()
        self.merge = self._micro_batches_per_forward()
        # token-weighted loss batches (ml/train/loss.py): merged forwards need each row's weight
        self.weighted = self._weighted_loss()
        if self.merge > 1:
            self._log(f"{self.merge} micro-batches packed into each forward pass (fused loss; each row keeps its "
                      "micro-batch's weight)")
        self.local_params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                for p in self.model.parameters())

    def _defer_gradient_sync(self) -> bool:
        """Reduce-scatter once per optimizer step rather than after every micro-batch (FSDP2)."""
        import torch

        from rayapp.ml.train.policy import defer_gradient_sync

        total = torch.cuda.mem_get_info()[1] if self.use_gpu else None
        # the unsharded gradients it keeps are those of what trains (the adapters only, with LoRA)
        return defer_gradient_sync(self.tc.gradient_sync, self.n_trainable, total, self.sharded)

    def _packing(self) -> bool:
        """Padding-free micro-batches (TrainConfig.packing) where the model's attention is known to
        keep packed rows apart (ml/train/packing.py); padded ones otherwise, said once."""
        from rayapp.ml.train.packing import PACKABLE_MODEL_TYPES, can_pack

        if not self.tc.packing:
            return False
        if can_pack(self.model.config):
            return True
        self._log(f"packing off: model type {getattr(self.model.config, 'model_type', None)!r} is not one whose "
                  f"packed attention is checked ({', '.join(sorted(PACKABLE_MODEL_TYPES))}); padded micro-batches")
        return False

    def _micro_batches_per_forward(self) -> int:
        """Micro-batches a forward pass takes (TrainConfig.micro_batches_per_forward, resolved by the
        stage from `rayapp plan`; "auto" left unresolved is 1)."""
        merge = self.tc.micro_batches_per_forward
        merge = 1 if merge == "auto" else min(merge, self.tc.gradient_accumulation_steps)
        if merge > 1 and not self.packing:
            self._log("micro_batches_per_forward: merged forwards need packed rows; one forward per micro-batch")
            return 1
        return merge

    def _weighted_loss(self) -> bool:
        """Whether batches carry per-token loss weights and the fused loss computes them (merged
        forwards, or TrainConfig.fused_loss); installs that loss on the model."""
        from rayapp.ml.train import loss

        if self.merge == 1 and not self.tc.fused_loss:
            return False
        if not loss.supported(self.model):
            self._log(f"fused loss off: model type {getattr(self.model.config, 'model_type', None)!r} is not one "
                      "whose logits are its output layer's alone; the model's own loss, one forward per micro-batch")
            self.merge = 1
            return False
        loss.install(self.model)
        return True

    def micro_batch(self, indices: list[int], weights: list | None = None, rows: dict | None = None) -> dict:
        """One micro-batch's tensors on this worker's device: packed or padded (the same rows and
        the same loss either way); ``weights`` (per label of each row) adds its loss weights.
        ``rows``: ``indices``' rows when the caller has read them already."""
        import torch

        from rayapp.ml.train.collate import collate, collate_packed

        rows = self.rows.batch(indices) if rows is None else rows
        if self.packing:
            return collate_packed(rows, self.pad_id, self.device, self.model.config,
                                  torch.bfloat16 if self.bf16 else torch.float32, weights)
        return collate(rows, self.pad_id, self.device, weights)

    def step_batches(self, micro_rows: list[list[int]], weights: list[float]) -> tuple[list[dict], list[float]]:
        """One optimizer step's forward batches and their weights. Unweighted: a batch per
        micro-batch, each with its weight. Weighted (``self.weighted``): each micro-batch's weight
        is folded into its tokens' loss weights (its mean response loss x its weight), and
        ``self.merge`` consecutive micro-batches share one packed forward. Every rank runs the same
        number of forwards (FSDP2's collectives pair up across ranks): it depends only on the
        step's micro-batch count, never on the rows' lengths."""
        if not self.weighted:
            return [self.micro_batch(rows) for rows in micro_rows], weights
        from rayapp.ml.train.loss import token_weights

        batches = []
        for lo in range(0, len(micro_rows), self.merge):
            group = micro_rows[lo:lo + self.merge]
            indices = [i for rows in group for i in rows]
            rows = self.rows.batch(indices)  # read once: the weights and the tensors both come from it
            labels, at, per_label = list(rows["labels"]), 0, []
            for micro, weight in zip(group, weights[lo:lo + self.merge]):
                per_label += token_weights(labels[at:at + len(micro)], weight)
                at += len(micro)
            batches.append(self.micro_batch(indices, per_label, rows))
        return batches, [1.0] * len(batches)

    def _with_adapters(self, model):
        """The model with LoRA adapters when finetune.lora is set (its base frozen, in bf16 under
        mixed precision), else the model itself."""
        if self.cfg.lora is None:
            return model
        import torch

        from rayapp.ml.train import lora

        model = lora.attach(model, self.cfg.lora, self.cfg.init_model, torch.bfloat16 if self.bf16 else None)
        if not any(p.is_meta for p in model.parameters()):
            lora.init_adapters(model, self.tc.seed)  # the sharded path draws them after to_empty
        return model

    def _checkpoint_activations(self) -> None:
        if self.tc.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        if self.tc.compile_layers:
            # each decoder layer on its own, before sharding (torchtitan's order): small graphs,
            # one per layer shape (dynamo leaves FSDP2's hooks out of them: skip_fsdp_hooks)
            for layer in decoder_layers(self.model):
                layer.compile()

    def _sharded_model(self):
        """FSDP2 without a full copy on any rank: build on the meta device, shard, allocate this
        rank's shards and read only their rows from the safetensors (ml/models/sharded.py). The
        weights equal from_pretrained's in fp32; the optimizer keeps fp32 master weights and
        compute runs in bf16 under mixed precision."""
        import torch

        from rayapp.ml.models import sharded
        from rayapp.ml.models.loading import local_model_dir

        folder = local_model_dir(self.cfg.init_model)  # an export (once per node) or a hub snapshot
        config = sharded.load_config(folder, self.cfg.trust_remote_code)
        # LoRA: the adapters are attached before sharding (fully_shard takes the wrapped modules)
        self.model = self._with_adapters(sharded.empty_causal_lm(config, torch.float32, self.cfg.trust_remote_code))
        self._checkpoint_activations()
        base = self.model.get_base_model() if self.cfg.lora else self.model
        buffers = sharded.real_buffers(base)
        total = torch.cuda.mem_get_info()[1] if self.use_gpu else None
        self.keep_gathered = not self.tc.cpu_offload and keep_weights_gathered(
            sum(p.numel() for p in self.model.parameters()), total, True, self.bf16)
        self.train_model = shard_fsdp2(self.model, self.bf16, self.tc.cpu_offload, self.keep_gathered)
        self.model.to_empty(device="cpu" if self.tc.cpu_offload else self.device)
        if self.cfg.lora:
            from rayapp.ml.train import lora

            sharded.load_local_shards(base, folder, torch.float32, buffers, checkpoint_name=lora.checkpoint_name)
            lora.init_adapters(self.model, self.tc.seed)
        else:
            sharded.load_local_shards(self.model, folder, torch.float32, buffers)
        return self.model

    def setup_data(self) -> None:
        from torch.utils.data import DistributedSampler

        from rayapp.ml.train.collate import TrainRows

        cfg, env = self.cfg, self.env
        self.rows = TrainRows(list(cfg.train_files))
        if len(self.rows) != cfg.total_rows:
            raise ValueError(f"the training files hold {len(self.rows)} rows, their manifest says {cfg.total_rows}")
        self.sampler = DistributedSampler(self.rows, num_replicas=env.world, rank=env.rank, shuffle=True,
                                          seed=self.tc.seed, drop_last=True)
        rows_per_worker = cfg.total_rows // env.world  # what DistributedSampler(drop_last=True) gives a rank
        self.batches_per_epoch = max(1, math.ceil(rows_per_worker / self.tc.per_device_batch_size))
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / self.tc.gradient_accumulation_steps))
        self.total_steps = self.steps_per_epoch * self.tc.epochs

    def setup_optimizer(self) -> None:
        import torch
        from transformers import get_scheduler

        from rayapp.ml.train.policy import adamw_fused

        tc = self.tc
        # only what trains: with LoRA the frozen base has no optimizer state (nor gradients)
        params = [p for p in self.train_model.parameters() if p.requires_grad]
        # fused on CUDA (DTensor shards included): torch's default there, foreach, allocates a copy of
        # every local parameter during the step, which `rayapp plan` does not budget; None elsewhere
        # keeps torch's default (the for-loop on a CPU: its numerics unchanged)
        fused = bool(params) and all(adamw_fused(p.device.type) for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay,
                                           betas=(0.9, 0.999), fused=True if fused else None)
        self.scheduler = get_scheduler(tc.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(math.ceil(tc.warmup_ratio * self.total_steps)),
                                       num_training_steps=self.total_steps)

    # ---- checkpoints ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the newest complete sharded checkpoint, if there is one."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from rayapp.ml.train import checkpoints as ck

        latest = ck.latest_complete(self.cfg.checkpoint_dir)
        if latest is None:
            return
        path, saved = latest
        model_sd, optim_sd = get_state_dict(self.train_model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        local = ck.fetch_step(path, self.cfg.staging_dir)
        dcp.load(state, checkpoint_id=local, no_dist=not self.env.distributed)
        if self.env.distributed:
            dist.barrier()  # every rank of the node has read the shared copy
        if self.env.local_rank == 0:
            ck.drop_fetched(local, path)
        set_state_dict(self.train_model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        # the param groups come back with the saving run's settings: a checkpoint from before fused
        # AdamW would step with foreach again (its ~one shard of temporaries, which the plan omits)
        for group in self.optimizer.param_groups:
            group["fused"] = self.optimizer.defaults.get("fused")
            if group["fused"]:
                group["foreach"] = None
        p = self.progress
        p.epoch, p.batch_in_epoch, p.global_step = saved["epoch"], saved["batch_in_epoch"], saved["global_step"]
        p.last_loss = saved.get("loss", float("nan"))
        p.resumed_from = p.global_step
        for _ in range(p.global_step):
            self.scheduler.step()
        where = f"epoch {p.epoch + 1}" if p.epoch < self.tc.epochs else "training done, exporting"
        self._log(f"resumed from {path}: {where}, step {p.global_step}/{self.total_steps}")
        if p.batch_in_epoch == 0 and p.epoch > 0 and self.cfg.export_every_epoch:
            # stopped between an epoch's last checkpoint and its export: the restored weights are
            # that epoch's, so export them now (a no-op when the export is already complete)
            self.export(self.epoch_export(p.epoch), {"epoch": p.epoch, "step": p.global_step})

    def save_checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        """A sharded checkpoint of this step: written in the background on a filesystem path
        (TrainConfig.async_checkpoints), else now. It counts as complete once its marker is
        written, after every rank's files (``finish_checkpoint``)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from rayapp.ml.train import checkpoints as ck

        self.finish_checkpoint()  # the previous one, if still being written
        path = ck.step_dir(self.cfg.checkpoint_dir, self.progress.global_step)
        progress = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": self.progress.global_step,
                    "loss": self.progress.last_loss}
        model_sd, optim_sd = get_state_dict(self.train_model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.tc.async_checkpoints and not storage.is_remote(path):
            if self.env.distributed and self._save_group is None:
                # its own group: the background writer's collectives must not interleave with
                # training's on the default one (NCCL on GPUs)
                self._save_group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, checkpoint_id=path, process_group=self._save_group,
                                    no_dist=not self.env.distributed)
            self._background_save = (future, path, progress)
            self.background_saves += 1
            return
        local = ck.save_location(path, self.env.rank, self.cfg.staging_dir)
        dcp.save(state, checkpoint_id=local, no_dist=not self.env.distributed)
        ck.publish(local, path)  # each rank uploads its own shards (object stores only)
        self._mark_saved(path, progress)

    def finish_checkpoint(self) -> None:
        """Wait for the background save, then mark it complete (no-op without one)."""
        if self._background_save is None:
            return
        future, path, progress = self._background_save
        self._background_save = None
        future.result()
        self._mark_saved(path, progress)

    def _mark_saved(self, path: str, progress: dict) -> None:
        import torch.distributed as dist

        from rayapp.ml.train import checkpoints as ck

        if self.env.distributed:
            dist.barrier()  # every rank's files are written
        if self.env.rank == 0:
            storage.write_json(storage.join(path, ck.PROGRESS), progress)
            ck.prune(self.cfg.checkpoint_dir, keep=self.tc.keep_checkpoints)
        if self.env.distributed:
            dist.barrier()

    def epoch_export(self, epoch: int) -> str:
        return self.cfg.files.epoch_export(epoch)

    def export(self, path: str, info: dict) -> None:
        """Consolidated safetensors export that from_pretrained and vLLM load (all ranks take part)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from rayapp.ml.train import checkpoints as ck

        full = get_model_state_dict(self.train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.rank == 0 and not ck.export_complete(path):
            local = ck.save_location(path, self.env.rank, self.cfg.staging_dir)
            dtype = self.export_dtype()
            if self.cfg.lora:
                from rayapp.ml.train import lora

                lora.save_export(self.model, full, local, self.cfg.lora.export, dtype)
            else:
                full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
                self.model.save_pretrained(local, state_dict=full, safe_serialization=True)
            if not (self.cfg.lora and self.cfg.lora.export == "adapter"):
                ck.set_config_dtype(local, dtype)  # save_pretrained records the fp32 master weights' dtype
            self.tokenizer.save_pretrained(local)
            ck.publish(local, path)
            ck.mark_export(path, info)  # last: the export counts as complete from here on
        if self.env.distributed:
            dist.barrier()

    def export_dtype(self):
        """The dtype exports are written in: the training compute dtype unless set (bf16 under
        mixed precision: half the bytes to upload, load and serve, and what vLLM serves anyway)."""
        import torch

        from rayapp.ml.models.loading import resolve_dtype

        if self.tc.export_dtype == "auto":
            return torch.bfloat16 if self.bf16 else torch.float32
        return resolve_dtype(self.tc.export_dtype, self.device)

    # ---- training ------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict], weights: list[float]) -> tuple[float, int]:
        """One optimizer step over ``micro_batches`` (train/fsdp.optimizer_step)."""
        return optimizer_step(self.train_model, self.optimizer, self.scheduler, micro_batches, weights,
                              max_grad_norm=self.tc.max_grad_norm,
                              autocast_bf16=self.bf16 and self.use_gpu and not self.sharded,
                              defer_sync=self.defer_sync, keep_gathered=self.keep_gathered)

    def train(self) -> dict:
        tc, p, env = self.tc, self.progress, self.env
        accum = tc.gradient_accumulation_steps
        every = tc.checkpoint_every_steps or 0
        bs = tc.per_device_batch_size
        tokens_seen = tokens_since_log = 0
        t_log = t0 = time.perf_counter()
        self.train_model.train()
        for epoch in range(p.epoch, tc.epochs):
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            first = p.batch_in_epoch if epoch == p.epoch else 0  # batches consumed before the checkpoint
            for group_start in range(first, self.batches_per_epoch, accum):
                group = range(group_start, min(group_start + accum, self.batches_per_epoch))
                micro, weights = self.step_batches([order[b * bs:(b + 1) * bs] for b in group],
                                                   [micro_batch_weight(b, self.batches_per_epoch, accum) for b in group])
                p.last_loss, n_tok = self.train_step(micro, weights)
                p.global_step += 1
                tokens_seen += n_tok
                tokens_since_log += n_tok
                if self.fault_hook:
                    # tests kill a worker here; the save before it counts as written by then
                    self.finish_checkpoint()
                    self.fault_hook(p.global_step, env.rank)
                if p.global_step % tc.log_every_steps == 0 or p.global_step == self.total_steps:
                    dt = max(time.perf_counter() - t_log, 1e-9)
                    self._log_step(epoch, tokens_since_log * env.world / dt)
                    t_log, tokens_since_log = time.perf_counter(), 0
                end = group[-1] + 1
                if every and p.global_step % every == 0 and end < self.batches_per_epoch:
                    self.save_checkpoint(epoch, end)
            # end of epoch: resumable state, then (optionally) a consolidated export. Not after the
            # last epoch: the final export follows at once and supersedes it (a 13B save is ~150 GB;
            # a loss between the two redoes the steps since the previous save)
            if epoch < epoch_end_saves(tc.epochs):
                self.save_checkpoint(epoch + 1, 0)
            if self.cfg.export_every_epoch:
                self.export(self.epoch_export(epoch + 1), {"epoch": epoch + 1, "step": p.global_step})
        self.finish_checkpoint()
        return {"tokens_seen": tokens_seen, "train_seconds": time.perf_counter() - t0,
                "background_saves": self.background_saves}

    def evaluate(self) -> float | None:
        """Mean response-token loss over the first ``eval_rows`` held-out rows; every rank runs the
        same rows (FSDP forward passes are collective), so every rank gets the same number."""
        from rayapp.ml.models.losses import mean_response_nll

        if not self.cfg.eval_file or not self.tc.eval_rows:
            return None
        rows = storage.read_parquet(self.cfg.eval_file, ["input_ids", "labels"]).slice(0, self.tc.eval_rows).to_pylist()
        self.train_model.eval()
        loss = mean_response_nll(self.train_model, rows, self.pad_id, self.device)
        if self.keep_gathered:  # forward-only passes leave the weights gathered: back to the shards
            self.train_model.reshard()
        self.train_model.train()
        return loss

    # ---- the whole run ---------------------------------------------------------------------------

    def run(self) -> dict:
        self.setup_model()
        self.setup_data()
        self.setup_optimizer()
        self.resume()
        stats = self.train()
        eval_loss = self.evaluate()
        p = self.progress
        if self._tracker is not None:
            self._tracker.scalars(tracking.tag(self.cfg.tracking_label or self.cfg.stage), {"eval_loss": eval_loss},
                                  p.global_step)
            self._tracker.close()
            self._tracker = None
        self.export(self.cfg.files.final_export,
                    {"epoch": self.tc.epochs, "step": p.global_step, "eval_loss": eval_loss})
        final = {"rank": self.env.rank, "world": self.env.world, "params": self.n_params,
                 "trainable_params": self.n_trainable,
                 "local_params": self.local_params, "global_step": p.global_step, "total_steps": self.total_steps,
                 "last_loss": p.last_loss, "eval_loss": eval_loss, "resumed_from_step": p.resumed_from,
                 "sharded": self.sharded, "packing": self.packing, "micro_batches_per_forward": self.merge,
                 "fused_loss": self.weighted, **stats}
        self.report({"done": 1, "step": p.global_step, "loss": p.last_loss, "eval_loss": eval_loss})
        storage.write_json(self.cfg.files.rank_stats(self.env.rank), final)
        return final

    def _log(self, msg: str) -> None:
        if self.env.rank == 0:
            get_logger(f"rayapp.{self.cfg.stage}").info("%s", msg)

    def _log_step(self, epoch: int, tokens_per_s: float) -> None:
        p, tc = self.progress, self.tc
        metrics = {"epoch": epoch + 1, "epochs": tc.epochs, "step": p.global_step, "total_steps": self.total_steps,
                   "loss": p.last_loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
        if tc.peak_flops and self.use_gpu:
            # a frozen weight needs no weight gradient: 4 FLOPs per parameter and token, not 6
            flops_per_token = 6 * self.n_trainable + 4 * (self.n_params - self.n_trainable)
            metrics["mfu"] = flops_per_token * tokens_per_s / (tc.peak_flops * self.env.world)
        if self.env.rank == 0:
            stage = self.cfg.stage
            ray_metrics.gauge("rayapp_train_step", p.global_step, stage=stage)
            ray_metrics.gauge("rayapp_train_total_steps", self.total_steps, stage=stage)
            ray_metrics.gauge("rayapp_train_tokens_per_s", tokens_per_s, stage=stage)
            ray_metrics.gauge("rayapp_train_loss", p.last_loss, stage=stage)
            if self.cfg.tracking:  # Ray Train's guidance: log from rank 0 inside the training function
                if self._tracker is None:
                    self._tracker = tracking.open_writer(self.cfg.tracking)
                self._tracker.scalars(tracking.tag(self.cfg.tracking_label or stage),
                                      {k: metrics[k] for k in tracking.STEP_METRICS if k in metrics}, p.global_step)
            # the driver draws its progress line from this file (and `rayapp status` can read it)
            storage.write_json(self.cfg.files.progress, {**metrics, "time": time.time()})
            mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            get_logger(f"rayapp.{self.cfg.stage}").debug("epoch %d/%d step %d/%d loss %.4f lr %.2e %s tokens/s%s", epoch + 1,
                      tc.epochs, p.global_step, self.total_steps, p.last_loss, metrics["lr"],
                      f"{tokens_per_s:,.0f}", mfu)
        self.report(metrics)


def train_loop_per_worker(config: dict) -> None:
    """The function Ray Train runs on every worker: each job of the run in turn (e.g. the target
    on the selection, then on the full set), on one worker group. A job whose final export is
    complete was done by an earlier attempt and is skipped."""
    import gc

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from rayapp.core import log as logs
    from rayapp.core.hooks import hook

    jobs = [WorkerConfig.model_validate(job) for job in config["jobs"]]
    logs.configure(jobs[0].log_level)
    ctx = ray.train.get_context()
    env = WorkerEnv(rank=ctx.get_world_rank(), world=ctx.get_world_size(), local_rank=ctx.get_local_rank(),
                    distributed=dist.is_available() and dist.is_initialized())
    wrap_ddp = (lambda m: ray.train.torch.prepare_model(m, parallel_strategy="ddp" if env.world > 1 else None))
    for cfg in jobs:
        if job_done(cfg, env.rank):
            continue
        FineTuneRecipe(cfg, env, report=ray.train.report, wrap_ddp=wrap_ddp,
                       fault_hook=hook("train_kill_hook", cfg.stats_dir)).run()  # tests only
        gc.collect()  # the next job's model replaces this one's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def job_done(cfg: WorkerConfig, rank: int) -> bool:
    from rayapp.core.artifacts import export_complete

    return export_complete(cfg.files.final_export) and storage.exists(cfg.files.rank_stats(rank))
