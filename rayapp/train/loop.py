"""The per-worker training function that Ray Train runs on every worker.

One loop serves the reference model and the target: response-only causal-LM loss, AdamW, a
warm-up + cosine/linear schedule, gradient accumulation and clipping, FSDP2 (``fully_shard`` per
decoder layer, then the root) or DDP, sharded DCP checkpoints for resume, and consolidated
``save_pretrained`` exports.

Data order is a pure function of (seed, epoch, rank): torch's ``DistributedSampler`` over the rows
of the training files in their given order. So a resumed run skips exactly the batches the lost
attempt trained on, and a stopped-and-resumed run ends with the same weights as one that never
stopped. (Ray Data's streaming split hands blocks to whichever worker asks first, so which rows a
rank sees would differ between attempts.)
"""

from __future__ import annotations

import math
import os
import signal
import time

# Test hook for fault injection: rank 0's worker process is killed (SIGKILL, as the OOM killer or a
# lost node would) once the run passes this global step (0 = never); once per run, since a marker
# beside the stats records it, so the restarted attempt goes on.
KILL_AT_STEP_ENV = "RAYAPP_TEST_TRAIN_KILL_AT_STEP"


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _decoder_layers(model):
    for attr in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from transformers import get_scheduler

    from rayapp.common import storage
    from rayapp.models.loading import load_causal_lm, load_tokenizer
    from rayapp.train import checkpoints as ck
    from torch.utils.data import DistributedSampler

    from rayapp.train.collate import TrainRows, collate

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = config["train"]
    stage = config["stage"]
    use_gpu = tc["use_gpu"] and torch.cuda.is_available()
    device = f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu"
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(tc["cpus_per_worker"])))
    torch.manual_seed(tc["seed"])
    bf16 = tc["mixed_precision"] == "bf16" or (tc["mixed_precision"] == "auto" and use_gpu)

    model = load_causal_lm(config["init_model"], dtype=torch.float32, trust_remote_code=config["trust_remote_code"])
    tokenizer = load_tokenizer(config["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    if tc["activation_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    sharded = tc["fsdp"] and world > 1 and dist.is_initialized()
    if sharded:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        model.to(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy() if tc["cpu_offload"] else OffloadPolicy()
        for layer in _decoder_layers(model):
            fully_shard(layer, mp_policy=mp, offload_policy=offload)
        fully_shard(model, mp_policy=mp, offload_policy=offload)
        train_model = model
    else:
        train_model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    local_params = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())

    optimizer = torch.optim.AdamW(
        train_model.parameters(), lr=tc["learning_rate"], weight_decay=tc["weight_decay"], betas=(0.9, 0.999)
    )
    bs, accum = tc["per_device_batch_size"], tc["gradient_accumulation_steps"]
    rows_per_worker = config["total_rows"] // world  # DistributedSampler(drop_last=True) gives each rank this many
    batches_per_epoch = max(1, math.ceil(rows_per_worker / bs))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accum))
    total_steps = steps_per_epoch * tc["epochs"]
    scheduler = get_scheduler(
        tc["lr_scheduler"], optimizer, num_warmup_steps=int(math.ceil(tc["warmup_ratio"] * total_steps)),
        num_training_steps=total_steps,
    )

    # ---- resume from the newest complete sharded checkpoint, if any
    ckpt_root = config["checkpoint_dir"]
    start_epoch, start_batch, global_step = 0, 0, 0
    resumed_from = None
    last_loss = float("nan")
    staging = config.get("staging_dir")  # node-local stand-in when the work dir is on an object store
    latest = ck.latest_complete(ckpt_root)
    if latest is not None:
        path, progress = latest
        model_sd, optim_sd = get_state_dict(train_model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ck.load_location(path, rank, staging))
        set_state_dict(train_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start_epoch, start_batch, global_step = progress["epoch"], progress["batch_in_epoch"], progress["global_step"]
        last_loss = progress.get("loss", float("nan"))
        resumed_from = global_step
        for _ in range(global_step):
            scheduler.step()
        where = f"epoch {start_epoch + 1}" if start_epoch < tc["epochs"] else "training done, exporting"
        _log(rank, f"[{stage}] resumed from {path}: {where}, step {global_step}/{total_steps}")

    def save_checkpoint(epoch: int, batch_in_epoch: int) -> None:
        path = ck.step_dir(ckpt_root, global_step)
        model_sd, optim_sd = get_state_dict(train_model, optimizer)
        local = ck.save_location(path, rank, staging)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=local)
        ck.publish(local, path)  # each rank uploads its own shards (object stores only)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            ck.write_json(storage.join(path, ck.PROGRESS),
                          {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
                           "loss": last_loss})
            ck.prune(ckpt_root, keep=config.get("keep_checkpoints", 2))
        if dist.is_initialized():
            dist.barrier()

    def export(path: str, info: dict) -> None:
        """Consolidated safetensors export that from_pretrained and vLLM load (all ranks take part)."""
        full = get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0 and not ck.export_complete(path):
            local = ck.save_location(path, rank, staging)
            model.save_pretrained(local, state_dict=full, safe_serialization=True)
            tokenizer.save_pretrained(local)
            ck.publish(local, path)
            ck.mark_export(path, info)  # last: the export counts as complete from here on
        if dist.is_initialized():
            dist.barrier()

    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
    fault_marker = storage.join(config["stats_dir"], ".fault_injected")
    if kill_at and storage.exists(fault_marker):
        kill_at = 0

    if resumed_from is not None and start_batch == 0 and start_epoch > 0 and config.get("export_every_epoch"):
        # stopped between an epoch's last checkpoint and its export: the restored weights are that
        # epoch's, so export them now (a no-op when the export is already complete)
        export(storage.join(config["export_dir"], f"epoch-{start_epoch}"), {"epoch": start_epoch, "step": global_step})

    rows = TrainRows(config["train_files"])
    if len(rows) != config["total_rows"]:
        raise ValueError(f"[{stage}] the training files hold {len(rows)} rows, their manifest says {config['total_rows']}")
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=tc["seed"], drop_last=True)
    every = config.get("checkpoint_every_steps") or 0
    tokens_seen = 0
    t_log = t_train0 = time.perf_counter()
    tokens_since_log = 0
    train_model.train()
    for epoch in range(start_epoch, tc["epochs"]):
        sampler.set_epoch(epoch)
        order = list(sampler)
        micro = 0
        loss_acc = 0.0
        first = start_batch if epoch == start_epoch else 0  # batches consumed before the checkpoint
        for b_idx in range(first, batches_per_epoch):
            inputs = collate(rows.batch(order[b_idx * bs:(b_idx + 1) * bs]), pad_id, device)
            n_real = int(inputs["attention_mask"].sum())
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16 and use_gpu and not sharded):
                out = train_model(**inputs)
            loss = out.loss / accum
            loss.backward()
            loss_acc += float(loss.detach())
            micro += 1
            tokens_seen += n_real
            tokens_since_log += n_real
            last_batch = b_idx == batches_per_epoch - 1
            if micro % accum and not last_batch:
                continue
            torch.nn.utils.clip_grad_norm_(train_model.parameters(), tc["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            last_loss, loss_acc, micro = loss_acc * accum / micro, 0.0, 0
            if kill_at and global_step >= kill_at and rank == 0:
                storage.write_text(fault_marker, str(global_step))
                print(f"[{stage}] test hook {KILL_AT_STEP_ENV}: killing this worker (pid {os.getpid()}) "
                      f"at step {global_step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if global_step % tc["log_every_steps"] == 0 or global_step == total_steps:
                dt = max(time.perf_counter() - t_log, 1e-9)
                tps = tokens_since_log * world / dt
                metrics = {"epoch": epoch + 1, "step": global_step, "loss": last_loss,
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps}
                if tc.get("peak_flops") and use_gpu:
                    metrics["mfu"] = 6 * n_params * tps / (tc["peak_flops"] * world)
                mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
                _log(rank, f"[{stage}] epoch {epoch + 1}/{tc['epochs']} step {global_step}/{total_steps} "
                           f"loss {last_loss:.4f} lr {metrics['lr']:.2e} {tps:,.0f} tokens/s{mfu}")
                ray.train.report(metrics)
                t_log, tokens_since_log = time.perf_counter(), 0
            if every and global_step % every == 0 and not last_batch:
                save_checkpoint(epoch, b_idx + 1)
        # ---- end of epoch: resumable state, then (optionally) a consolidated export
        save_checkpoint(epoch + 1, 0)
        if config.get("export_every_epoch"):
            export(storage.join(config["export_dir"], f"epoch-{epoch + 1}"), {"epoch": epoch + 1, "step": global_step})
    train_seconds = time.perf_counter() - t_train0  # steps only: no start-up, eval or export
    eval_loss = _eval_loss(train_model, config, tc, pad_id, device) if config.get("eval_file") else None
    final = storage.join(config["export_dir"], "final")
    export(final, {"epoch": tc["epochs"], "step": global_step, "eval_loss": eval_loss})
    ray.train.report({"done": 1, "step": global_step, "loss": last_loss, "eval_loss": eval_loss, "params": n_params,
                      "local_params": local_params, "rank": rank, "tokens_seen": tokens_seen})
    if config.get("stats_dir"):
        storage.write_json(storage.join(config["stats_dir"], f"rank-{rank}.json"),
                           {"rank": rank, "world": world, "params": n_params, "local_params": local_params,
                            "global_step": global_step, "total_steps": total_steps, "last_loss": last_loss,
                            "eval_loss": eval_loss, "resumed_from_step": resumed_from, "sharded": sharded,
                            "tokens_seen": tokens_seen, "train_seconds": train_seconds})


def _eval_loss(model, config: dict, tc: dict, pad_id: int, device: str) -> float:
    """Mean response-token loss over the first ``eval_rows`` rows of ``eval_file``; every rank runs
    the same rows (FSDP forward passes are collective), so every rank gets the same number."""
    from rayapp.common import storage
    from rayapp.score.losses import mean_response_nll

    rows = storage.read_parquet(config["eval_file"], ["input_ids", "labels"]).slice(0, tc["eval_rows"]).to_pylist()
    model.eval()
    loss = mean_response_nll(model, rows, pad_id, device)
    model.train()
    return loss
