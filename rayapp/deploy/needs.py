"""What a run's stages need of the nodes they run on beyond CPUs and GPUs: the Hugging Face token
where they fetch a gated model from the hub, and local disk for model files and checkpoint staging.

`rayapp check-cluster -c CONFIG` compares these with what each node type of a cluster file has
(rayapp/deploy/checks.py); benchmarks/estimates.py prices the same bytes as time. A stage's work
lands on every node type whose resources fit its placement (rayapp/common/placement.py); the job's
driver, on the head, runs the stages without a placement (local modes), and it is the driver that
fetches hub repositories: the tokenizer and the initial reference and target models are staged
once into the run's model folder (models/registry.py, models/hub.py), and workers read them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Hub organisations whose models need an accepted licence and a token to download (HF_TOKEN):
# every Meta Llama repository, Google's Gemma and Mistral AI's. A gated model elsewhere is named
# by the config (models.*.gated).
GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/")

# Bytes per parameter of what a stage writes or keeps (the estimates use the same figures).
HUB_BYTES_PER_PARAM = 2  # checkpoints on the hub are fp16/bf16
# A full fine-tune's sharded checkpoint: fp32 weights plus AdamW's two fp32 moments.
FULL_CHECKPOINT_BYTES_PER_PARAM = 12
# LoRA (finetune.lora): the frozen base in bf16 is in the model state; the adapters' state is small.
LORA_CHECKPOINT_BYTES_PER_PARAM = 2
EXPORT_BYTES_PER_PARAM = 2  # consolidated exports in bf16


def is_hub_name(name: str | None) -> bool:
    """A model the nodes download from the Hugging Face hub (models/hub.py decides, for every reader)."""
    from rayapp.models.hub import is_hub_name as hub_name

    return hub_name(name)


def is_gated(name: str | None, cfg=None) -> bool:
    """Whether fetching ``name`` needs a token: the config says so for its models
    (models.*.gated), else the organisation decides."""
    if not is_hub_name(name):
        return False
    if cfg is not None:
        for spec in (cfg.models.reference, cfg.models.target):
            if spec.name_or_path == name and spec.gated is not None:
                return spec.gated
    return name.startswith(GATED_PREFIXES)


# The job's driver (on the head): it stages hub repositories for every stage.
DRIVER = "driver"


def tokenizer_name(cfg) -> str:
    return cfg.models.tokenizer or cfg.models.reference.name_or_path


def _direct_models(cfg) -> list[str]:
    """evaluate.models entries given as a model name rather than training data or 'base': the
    evaluation's generators load these themselves."""
    from rayapp.config import is_finetune_subset

    return [m for m in cfg.evaluate.models if m != "base" and not is_finetune_subset(m)]


def hub_models_by_stage(cfg) -> dict[str, list[str]]:
    """The hub repositories each fetches: the driver (tokenizer, reference and target, staged into
    the run's model folder for every stage), and evaluate's generators for models named directly."""
    out = {DRIVER: [tokenizer_name(cfg), cfg.models.reference.name_or_path, cfg.models.target.name_or_path],
           "evaluate": _direct_models(cfg)}
    return {stage: list(dict.fromkeys(m for m in models if is_hub_name(m))) for stage, models in out.items()}


def gated_by_stage(cfg) -> dict[str, list[str]]:
    return {s: [m for m in models if is_gated(m, cfg)] for s, models in hub_models_by_stage(cfg).items()
            if any(is_gated(m, cfg) for m in models)}


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

            try:
                counted = model_shape(name).params
            except OSError:
                counted = 0  # not sizeable offline (no bundled config, no hub): its bytes go uncounted
        _PARAMS[name] = counted
    return _PARAMS[name]


_PARAMS: dict[str, int] = {}


def disk_needs(cfg) -> dict[str, DiskNeed]:
    """Each stage's disk need at the config's model sizes (0 for models rayapp cannot size offline:
    'tiny', packaged or local ones are small or already on the node). Models the stages read from
    the run's model folder or the bucket are copied to the node's cache (``kept``)."""
    from rayapp.config import is_finetune_subset

    def params(name: str) -> int:
        return _params(name) if is_hub_name(name) else 0

    gb = 1e9
    ref, target = cfg.models.reference.name_or_path, cfg.models.target.name_or_path
    p_ref, p_target = params(ref), params(target)
    out = {}
    # the driver: the hub's files in HF_HOME, and one model's safetensors written before their upload
    hub_bytes = HUB_BYTES_PER_PARAM * (p_ref + p_target)
    convert = HUB_BYTES_PER_PARAM * max(p_ref, p_target)
    out[DRIVER] = DiskNeed(DRIVER, kept=hub_bytes, staged=convert,
                           parts=[f"{ref} and {target} from the hub ({hub_bytes / gb:.0f} GB)",
                                  f"one staged as safetensors before its upload ({convert / gb:.0f} GB)"])
    # score: P0 (the staged reference) and P1..P{epochs} (the reference's epoch exports)
    epochs = cfg.reference.epochs
    scored = (1 + epochs) * EXPORT_BYTES_PER_PARAM * p_ref
    out["score"] = DiskNeed("score", kept=scored, parts=[f"{1 + epochs} reference checkpoints ({scored / gb:.0f} GB)"])
    ref_ckpt = FULL_CHECKPOINT_BYTES_PER_PARAM * p_ref
    ref_init = HUB_BYTES_PER_PARAM * p_ref
    out["reference"] = DiskNeed("reference", kept=ref_init, staged=ref_ckpt, checkpoint=ref_ckpt, saves=epochs,
                                parts=[f"the staged {ref} ({ref_init / gb:.0f} GB)",
                                       f"one staged checkpoint ({ref_ckpt / gb:.0f} GB: fp32 weights and AdamW moments)"])
    from rayapp.finetune.stage import subsets_to_train

    subsets = subsets_to_train(cfg, evaluating=True)
    per_param = LORA_CHECKPOINT_BYTES_PER_PARAM if cfg.finetune.lora else FULL_CHECKPOINT_BYTES_PER_PARAM
    ckpt = per_param * p_target
    target_init = HUB_BYTES_PER_PARAM * p_target
    out["finetune"] = DiskNeed("finetune", kept=target_init, staged=ckpt, checkpoint=ckpt,
                               saves=cfg.finetune.epochs * len(subsets),
                               parts=[f"the staged {target} ({target_init / gb:.0f} GB)",
                                      f"one staged checkpoint ({ckpt / gb:.0f} GB"
                                      + (": bf16 base and adapters)" if cfg.finetune.lora else
                                         ": fp32 weights and AdamW moments)")])
    trained = [m for m in cfg.evaluate.models if is_finetune_subset(m)]
    lora_adapters = cfg.finetune.lora is not None and cfg.finetune.lora.export == "adapter"
    exports = 0 if lora_adapters else len(trained) * EXPORT_BYTES_PER_PARAM * p_target
    base = target_init if ("base" in cfg.evaluate.models or lora_adapters) else 0
    direct = sum(HUB_BYTES_PER_PARAM * params(m) for m in _direct_models(cfg) if m.count("/") == 1)
    out["evaluate"] = DiskNeed("evaluate", kept=exports + base + direct,
                               parts=[f"{len(trained)} fine-tuned exports ({exports / gb:.0f} GB)"]
                               + ([f"the staged {target} ({base / gb:.0f} GB)"] if base else [])
                               + ([f"models named in evaluate.models ({direct / gb:.0f} GB)"] if direct else []))
    return out
