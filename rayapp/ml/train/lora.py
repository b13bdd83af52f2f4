"""LoRA on the target (finetune.lora), with PEFT: adapters on a frozen base, sharded by FSDP2.

The pieces the training worker calls, in order:

- ``attach``: PEFT wraps the chosen modules of a model, which may still be on the meta device
  (the sharded path attaches before ``fully_shard``, since the wrapped modules are what it shards);
  under mixed precision the frozen base is held in bf16 (it never gets an fp32 master copy, an
  optimizer state or a gradient), and only the adapters stay fp32.
- ``checkpoint_name``: which tensor of the base model's safetensors fills a wrapped parameter
  (``...q_proj.base_layer.weight`` <- ``...q_proj.weight``; the adapters are not in it).
- ``init_adapters``: PEFT's initialisation (A Kaiming-uniform, B zero), from one seeded generator,
  into each rank's shard after ``to_empty`` (the same adapters at any world size).
- ``save_export``: the merged model (PEFT's ``merge_and_unload``) or the adapter alone.

The unwrapped model of an adapter export is read back by ``models.loading.load_causal_lm``.
"""

from __future__ import annotations

ADAPTER_NAME = "default"  # PEFT's name for a model's single adapter


def peft_config(lora):
    """PEFT's LoraConfig from rayapp's (config.LoraConfig, or its dict)."""
    from peft import LoraConfig as PeftLoraConfig

    lora = lora if isinstance(lora, dict) else lora.model_dump()
    return PeftLoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                          target_modules=lora["target_modules"])


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        from rayapp.core.errors import ConfigError

        raise ConfigError("finetune.lora needs PEFT: pip install 'rayapp[lora]'") from None


def attach(model, lora, base_model: str, frozen_dtype=None):
    """``model`` with LoRA adapters on its target modules (a PeftModel); every base parameter is
    frozen, and cast to ``frozen_dtype`` when given (bf16 under mixed precision)."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config(lora))
    # PEFT records the base's name_or_path as the model knew it (a local snapshot, or nothing for a
    # model built on meta); the adapter export points at the base as the config named it
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_model
    if frozen_dtype is not None:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)  # also on meta: the dtype is what to_empty allocates
    return model


def checkpoint_name(name: str) -> str | None:
    """The base checkpoint's key for a parameter of the wrapped base model, None for an adapter's."""
    if ".lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def init_adapters(model, seed: int) -> None:
    """PEFT's initialisation of every adapter (A Kaiming-uniform as PEFT draws it, B = 0: the wrapped
    model starts equal to its base), drawn whole from one seeded generator and copied into each
    rank's shard: the same adapters for any number of workers, sharded or not (DTensor's own random
    ops on a CPU mesh would draw each shard alike)."""
    import math

    import torch

    from rayapp.ml.models.sharded import local_rows

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." not in name and ".lora_B." not in name:
                continue
            full = torch.zeros(tuple(p.shape), dtype=p.dtype)
            if ".lora_A." in name:
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
            local = p.to_local() if hasattr(p, "to_local") else p
            start, stop = local_rows(p)
            local.copy_(full[start:stop].to(local.device))


def save_export(model, full_state: dict, path: str, mode: str, dtype) -> None:
    """Write the trained adapter at ``path``: merged into a plain model (``mode`` merged), or the
    adapter alone (``adapter``: adapter_config.json, whose base_model_name_or_path names the base,
    and adapter_model.safetensors). ``full_state`` is the whole wrapped model's state, gathered
    from the FSDP shards (PEFT names); ``model`` is the wrapped model it came from."""
    import torch
    from peft import get_peft_model

    from rayapp.ml.models import sharded

    full_state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full_state.items()}
    if mode == "adapter":
        model.save_pretrained(path, state_dict=full_state, safe_serialization=True)
        return
    # a second, unsharded wrapped model on the meta device takes the gathered tensors as they are
    # (assign: no copy), and PEFT folds each adapter into its base weight
    config = model.get_base_model().config
    empty = sharded.empty_causal_lm(config, dtype)
    wrapped = get_peft_model(empty, model.peft_config[ADAPTER_NAME])
    missing, unexpected = wrapped.load_state_dict(full_state, strict=False, assign=True)
    params = dict(wrapped.named_parameters())
    missing = [k for k in missing if k in params]  # buffers computed at construction are not in the state
    if missing or unexpected:
        raise RuntimeError(f"LoRA export: the gathered state does not fit the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    merged = wrapped.merge_and_unload()
    with torch.no_grad():
        merged.save_pretrained(path, safe_serialization=True)
