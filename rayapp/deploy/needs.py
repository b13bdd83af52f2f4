"""What a run's stages need of the nodes they run on beyond CPUs and GPUs: the Hugging Face token
where they load a gated model, and local disk for model downloads and checkpoint staging.

`rayapp check-cluster -c CONFIG` compares these with what each node type of a cluster file has
(rayapp/deploy/checks.py); benchmarks/estimates.py prices the same bytes as time. A stage's work
lands on every node type whose resources fit its placement (rayapp/common/placement.py); stages
without a placement (local modes, prepare without data.workers) run in the job's driver, on the head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Hub organisations whose models need an accepted licence and a token to download (HF_TOKEN):
# every Meta Llama repository, Google's Gemma and Mistral AI's. A gated model elsewhere is not
# recognised by name; RunConfig has no field to say so (see cluster/README.md).
GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/")

# Bytes per parameter of what a stage writes or keeps (the estimates use the same figures).
HUB_BYTES_PER_PARAM = 2  # checkpoints on the hub are fp16/bf16
# A full fine-tune's sharded checkpoint: fp32 weights plus AdamW's two fp32 moments.
FULL_CHECKPOINT_BYTES_PER_PARAM = 12
# LoRA (finetune.lora): the frozen base in bf16 is in the model state; the adapters' state is small.
LORA_CHECKPOINT_BYTES_PER_PARAM = 2
EXPORT_BYTES_PER_PARAM = 2  # consolidated exports in bf16


def is_hub_name(name: str | None) -> bool:
    """A model the nodes download from the Hugging Face hub (not 'tiny', a packaged model, a local
    folder or an object-store path)."""
    from rayapp.common import storage
    from rayapp.models.packaged import is_packaged

    return bool(name) and name != "tiny" and not is_packaged(name) and not storage.is_remote(name) \
        and not os.path.exists(name) and name.count("/") == 1 and not name.startswith((".", "/"))


def is_gated(name: str | None) -> bool:
    return is_hub_name(name) and name.startswith(GATED_PREFIXES)


def tokenizer_name(cfg) -> str:
    return cfg.models.tokenizer or cfg.models.reference.name_or_path


def stage_hub_models(cfg) -> dict[str, list[str]]:
    """The hub models (and tokenizers) each stage downloads, by stage name."""
    from rayapp.config import is_finetune_subset

    tok, ref, target = tokenizer_name(cfg), cfg.models.reference.name_or_path, cfg.models.target.name_or_path
    evaluate = []  # fine-tuned exports carry their own tokenizer
    lora_adapters = cfg.finetune.lora is not None and cfg.finetune.lora.export == "adapter"
    if "base" in cfg.evaluate.models or lora_adapters:
        evaluate.append(target)  # the untrained target, or the base vLLM serves the adapters on
    evaluate += [m for m in cfg.evaluate.models if m != "base" and not is_finetune_subset(m)]
    out = {"prepare": [tok], "score": [ref, tok], "select": [cfg.select.embedding_model],
           "reference": [ref, tok], "finetune": [target, tok], "evaluate": evaluate}
    return {stage: list(dict.fromkeys(m for m in models if is_hub_name(m))) for stage, models in out.items()}


def gated_by_stage(cfg) -> dict[str, list[str]]:
    return {s: [m for m in models if is_gated(m)] for s, models in stage_hub_models(cfg).items()
            if any(is_gated(m) for m in models)}


# ---- disk ----------------------------------------------------------------------------------------


@dataclass
class DiskNeed:
    """One stage's local disk on a node it runs on: ``kept`` stays for the node's life (hub downloads
    in HF_HOME, models fetched from the bucket), ``staged`` is written and removed again (a
    checkpoint staged before its upload, one at a time), ``checkpoint`` is one save's bytes."""

    stage: str
    kept: int = 0
    staged: int = 0
    checkpoint: int = 0
    saves: int = 0  # checkpoints the stage writes in a run (all its training runs)
    parts: list[str] = field(default_factory=list)  # what the bytes are, for people


def config_params(config: dict) -> int | None:
    """Parameters of an OPT or Llama-family model from its config.json alone, without building it
    (check-cluster stays fast: no torch, no transformers); None for other architectures. Exact for
    the paper's models (tests compare it with plan/shapes.py, which builds them on the meta device)."""
    h, vocab, layers = config.get("hidden_size"), config.get("vocab_size"), config.get("num_hidden_layers")
    if config.get("model_type") == "opt":
        proj, ffn = config.get("word_embed_proj_dim", h), config["ffn_dim"]
        n = vocab * proj + (config["max_position_embeddings"] + 2) * h  # OPT's learned positions start at 2
        n += 2 * proj * h if proj != h else 0  # project_in / project_out (OPT-350M)
        final_norm = config.get("do_layer_norm_before", True) and not config.get("_remove_final_layer_norm", False)
        n += 2 * h if final_norm else 0
        # per layer: q, k, v, out (with biases), two layer norms, fc1 and fc2 (with biases)
        return n + layers * (4 * (h * h + h) + 4 * h + 2 * h * ffn + ffn + h)
    if config.get("model_type") in ("llama", "mistral"):
        heads = config["num_attention_heads"]
        kv, head_dim = config.get("num_key_value_heads") or heads, config.get("head_dim") or h // heads
        per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * config["intermediate_size"] + 2 * h
        lm_head = 0 if config.get("tie_word_embeddings", False) else vocab * h
        return vocab * h + h + layers * per_layer + lm_head
    return None


def _params(name: str) -> int:
    if name not in _PARAMS:
        import json

        from rayapp.plan.shapes import bundled_config

        path = bundled_config(name)
        counted = config_params(json.load(open(path))) if path else None
        if counted is None:
            from rayapp.plan.shapes import model_shape

            counted = model_shape(name).params
        _PARAMS[name] = counted
    return _PARAMS[name]


_PARAMS: dict[str, int] = {}


def disk_needs(cfg) -> dict[str, DiskNeed]:
    """Each stage's disk need at the config's model sizes (0 for models rayapp cannot size offline:
    'tiny', packaged or local ones are small or already on the node)."""
    from rayapp.config import is_finetune_subset

    def params(name: str) -> int:
        return _params(name) if is_hub_name(name) else 0

    def hub(name: str) -> int:
        # the hub's files, plus rayapp's one-time conversion of pickled .bin weights to safetensors
        # in the run's model folder (an upper bound: repositories with safetensors need no copy)
        return 2 * HUB_BYTES_PER_PARAM * params(name)

    ref, target = cfg.models.reference.name_or_path, cfg.models.target.name_or_path
    p_ref, p_target = params(ref), params(target)
    gb = 1e9
    out = {}
    # score: P0 from the hub, P1..P{epochs} (the reference's epoch exports) from the bucket
    epochs = cfg.reference.epochs
    out["score"] = DiskNeed("score", kept=hub(ref) + epochs * EXPORT_BYTES_PER_PARAM * p_ref,
                            parts=[f"{ref} from the hub ({hub(ref) / gb:.0f} GB with its safetensors copy)",
                                   f"{epochs} reference exports ({epochs * EXPORT_BYTES_PER_PARAM * p_ref / gb:.0f} GB)"])
    ref_ckpt = FULL_CHECKPOINT_BYTES_PER_PARAM * p_ref
    out["reference"] = DiskNeed("reference", kept=hub(ref), staged=ref_ckpt, checkpoint=ref_ckpt, saves=epochs,
                                parts=[f"{ref} from the hub ({hub(ref) / gb:.0f} GB)",
                                       f"one staged checkpoint ({ref_ckpt / gb:.0f} GB: fp32 weights and AdamW moments)"])
    from rayapp.finetune.stage import subsets_to_train

    subsets = subsets_to_train(cfg, evaluating=True)
    per_param = LORA_CHECKPOINT_BYTES_PER_PARAM if cfg.finetune.lora else FULL_CHECKPOINT_BYTES_PER_PARAM
    ckpt = per_param * p_target
    out["finetune"] = DiskNeed("finetune", kept=hub(target), staged=ckpt, checkpoint=ckpt,
                               saves=cfg.finetune.epochs * len(subsets),
                               parts=[f"{target} from the hub ({hub(target) / gb:.0f} GB)",
                                      f"one staged checkpoint ({ckpt / gb:.0f} GB"
                                      + (": bf16 base and adapters)" if cfg.finetune.lora else
                                         ": fp32 weights and AdamW moments)")])
    trained = [m for m in cfg.evaluate.models if is_finetune_subset(m)]
    lora_adapters = cfg.finetune.lora is not None and cfg.finetune.lora.export == "adapter"
    exports = 0 if lora_adapters else len(trained) * EXPORT_BYTES_PER_PARAM * p_target
    base = hub(target) if ("base" in cfg.evaluate.models or lora_adapters) else 0
    out["evaluate"] = DiskNeed("evaluate", kept=exports + base,
                               parts=[f"{len(trained)} fine-tuned exports ({exports / gb:.0f} GB)"]
                               + ([f"{target} from the hub ({base / gb:.0f} GB)"] if base else []))
    return out
