"""What a run's stages need of the nodes they run on beyond CPUs and GPUs: the Hugging Face token
where they fetch a gated model from the hub, and local disk for model files and checkpoint staging.

`rayapp check-cluster -c CONFIG` compares these with what each node type of a cluster file has
(rayapp/ops/deploy/checks.py); benchmarks/estimates.py prices the same bytes as time. A stage's work
lands on every node type whose resources fit its placement (rayapp/core/placement.py); the job's
driver, on the head, runs the stages without a placement (local modes), and it is the driver that
fetches hub repositories: the tokenizer and the initial reference and target models are staged
once into the run's model folder (ml/models/registry.py, ml/models/hub.py), and workers read them there.
"""

from __future__ import annotations

from rayapp.ops.plan.disk import GB, HUB_BYTES_PER_PARAM, DiskNeed

# Hub organisations whose models need an accepted licence and a token to download (HF_TOKEN):
# every Meta Llama repository, Google's Gemma and Mistral AI's. A gated model elsewhere is named
# by the config (models.*.gated).
GATED_PREFIXES = ("meta-llama/", "google/gemma", "mistralai/")

def is_hub_name(name: str | None) -> bool:
    """A model the nodes download from the Hugging Face hub (ml/models/hub.py decides, for every reader)."""
    from rayapp.ml.models.hub import is_hub_name as hub_name

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


def hub_models_by_stage(cfg) -> dict[str, list[str]]:
    """The hub repositories each fetches: the driver (tokenizer, reference and target, staged into
    the run's model folder for every stage), and each stage's own (``Stage.own_models``: evaluate's
    generators load the models named directly in evaluate.models)."""
    from rayapp.pipeline import STAGE_TYPES

    out = {DRIVER: [tokenizer_name(cfg), cfg.models.reference.name_or_path, cfg.models.target.name_or_path]}
    out.update({name: stage_type.own_models(cfg) for name, stage_type in STAGE_TYPES.items()})
    return {stage: list(dict.fromkeys(m for m in models if is_hub_name(m))) for stage, models in out.items()}


def gated_by_stage(cfg) -> dict[str, list[str]]:
    return {s: [m for m in models if is_gated(m, cfg)] for s, models in hub_models_by_stage(cfg).items()
            if any(is_gated(m, cfg) for m in models)}


# ---- disk ----------------------------------------------------------------------------------------


def config_params(config: dict) -> int | None:
    """Parameters of an OPT or Llama-family model from its config.json alone, without building it
    (check-cluster stays fast: no torch, no transformers); None for other architectures. Exact for
    the paper's models (tests compare it with ops/plan/shapes.py, which builds them on the meta device)."""
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

        from rayapp.ops.plan.shapes import bundled_config

        path = bundled_config(name)
        counted = config_params(json.load(open(path))) if path else None
        if counted is None:
            from rayapp.ops.plan.shapes import model_shape

            try:
                counted = model_shape(name).params
            except OSError:
                counted = 0  # not sizeable offline (no bundled config, no hub): its bytes go uncounted
        _PARAMS[name] = counted
    return _PARAMS[name]


_PARAMS: dict[str, int] = {}


def disk_needs(cfg) -> dict[str, DiskNeed]:
    """Each stage's disk need at the config's model sizes (``Stage.disk_need``; 0 for models rayapp
    cannot size offline: 'tiny', packaged or local ones are small or already on the node), and the
    driver's. Models the stages read from the run's model folder or the bucket are copied to the
    node's cache (``kept``)."""
    from rayapp.pipeline import STAGE_TYPES

    ref, target = cfg.models.reference.name_or_path, cfg.models.target.name_or_path
    p_ref, p_target = hub_params(ref), hub_params(target)
    # the driver: the hub's files in HF_HOME, and one model's safetensors written before their upload
    hub_bytes = HUB_BYTES_PER_PARAM * (p_ref + p_target)
    convert = HUB_BYTES_PER_PARAM * max(p_ref, p_target)
    out = {DRIVER: DiskNeed(DRIVER, kept=hub_bytes, staged=convert,
                            parts=[f"{ref} and {target} from the hub ({hub_bytes / GB:.0f} GB)",
                                   f"one staged as safetensors before its upload ({convert / GB:.0f} GB)"])}
    for name, stage_type in STAGE_TYPES.items():
        need = stage_type.disk_need(cfg, hub_params)
        if need is not None:
            out[name] = need
    return out


def hub_params(name: str) -> int:
    """Parameters of a hub model (0 for anything else: tiny, packaged and local models)."""
    return _params(name) if is_hub_name(name) else 0
