"""Load tokenizers and causal LMs with safe defaults: safetensors only, no remote code unless the
config opts in. Hub names, local folders and the tiny models all go through this one path."""

from __future__ import annotations

import os


def _offline_kwargs(revision: str | None = None) -> dict:
    kw: dict = {}
    if revision:
        kw["revision"] = revision
    return kw


def materialize(name_or_path: str) -> str:
    """A local folder for a model or tokenizer: an ``s3://``/``gs://`` folder (a checkpoint the
    pipeline wrote to an object store) is downloaded once per node into the rayapp cache, its
    marker file checked; hub names and local paths are returned unchanged."""
    from rayapp.common import storage
    from rayapp.train.checkpoints import EXPORT_MARKER

    if not storage.is_remote(name_or_path):
        return name_or_path
    local = storage.local_cache_dir(name_or_path, "models")
    marker = EXPORT_MARKER  # written last by every export; its uid changes per export
    remote_marker = storage.join(name_or_path, marker)
    want = storage.read_bytes(remote_marker) if storage.exists(remote_marker) else None
    have = open(os.path.join(local, marker), "rb").read() if os.path.exists(os.path.join(local, marker)) else None
    if not os.path.isdir(local) or (want is not None and want != have):
        storage.download_dir(name_or_path, local)
    return local


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    name_or_path = materialize(name_or_path)
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
):
    from transformers import AutoModelForCausalLM

    name_or_path = materialize(name_or_path)
    kwargs = dict(
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        **_offline_kwargs(revision),
    )
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def is_local_model_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
