"""The training step's torch pieces (no Ray, no pydantic): FSDP2 sharding per decoder layer and one
optimizer step with gradient accumulation. The Ray Train worker (ml/train/worker.py) and the one-shot
GPU check (``python -m benchmarks gpu``, on a machine with neither Ray nor pydantic) both call them."""

from __future__ import annotations


def decoder_layers(model):
    if hasattr(model, "get_base_model"):  # a PEFT-wrapped model (LoRA): its base model's layers
        model = model.get_base_model()
    for attr in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard_fsdp2(model, bf16: bool, cpu_offload: bool, keep_gathered: bool = False):
    """FSDP2: ``fully_shard`` each decoder layer, then the root (parameters become DTensors).

    ``keep_gathered`` (policy.keep_weights_gathered): no reshard after forward, so a layer's
    weights gathered for the forward serve its backward too; ``optimizer_step`` also keeps them
    between micro-batches, resharding after the step's last backward."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=not keep_gathered)
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=not keep_gathered)
    return model


def micro_batch_weight(batch_index: int, batches_per_epoch: int, accum: int) -> float:
    """The weight of one micro-batch's mean loss in its accumulation group: one over the number
    of micro-batches the group really has (an epoch's last group may be shorter than ``accum``),
    so every optimizer step follows the mean loss of the batches it saw."""
    group_start = (batch_index // accum) * accum
    return 1.0 / min(accum, batches_per_epoch - group_start)


def optimizer_step(model, optimizer, scheduler, micro_batches: list[dict], weights: list[float], *,
                   max_grad_norm: float, autocast_bf16: bool = False, defer_sync: bool = False,
                   keep_gathered: bool = False) -> tuple[float, int]:
    """One optimizer step over ``micro_batches`` (gradient accumulation): each micro-batch's mean
    response-token loss counts with its weight. Returns (the group's mean loss, tokens).

    ``defer_sync`` (FSDP2): reduce-scatter once per step, on the last micro-batch's backward; the
    unsharded gradients accumulate locally until then (see TrainConfig.gradient_sync).
    ``keep_gathered`` (FSDP2, sharded with it): the weights stay gathered between micro-batches and
    are resharded after the last one's backward, before the optimizer updates the shards.
    ``autocast_bf16``: bf16 autocast for an unsharded model on a GPU (FSDP2 casts by its policy).
    A DDP model all-reduces its gradients once a step: every micro-batch but the last runs under
    ``no_sync``."""
    import contextlib

    import torch

    loss_total, tokens = 0.0, 0
    defer_sync = defer_sync and len(micro_batches) > 1
    for k, (inputs, weight) in enumerate(zip(micro_batches, weights)):
        last = k == len(micro_batches) - 1
        if defer_sync:
            model.set_requires_gradient_sync(last)
        if keep_gathered:
            model.set_reshard_after_backward(last)
        # DDP (the non-FSDP path with several workers): gradients accumulate locally until the last
        local_only = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        # real tokens: a packed batch says how many (ml/train/packing.py), a padded one has its mask
        n_tokens = inputs["num_tokens"] if "num_tokens" in inputs else inputs["attention_mask"].sum()
        inputs = {key: value for key, value in inputs.items() if key != "num_tokens"}
        if "loss_weights" in inputs:  # the fused loss's (ml/train/loss.py): past FSDP2's cast to bf16
            from rayapp.ml.train.loss import Exact

            inputs["loss_weights"] = Exact(inputs["loss_weights"])
        with local_only:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast_bf16):
                out = model(**inputs, use_cache=False)  # a training step needs no KV cache (it only copies)
            (out.loss * weight).backward()
        loss_total += float(out.loss.detach()) * weight
        tokens += int(n_tokens)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, tokens
