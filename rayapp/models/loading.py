"""Load tokenizers and causal LMs with safe defaults: safetensors only, no remote code unless the
config opts in. Hub names, local folders and the tiny models all go through this one path."""

from __future__ import annotations

import os


def _offline_kwargs(revision: str | None = None) -> dict:
    kw: dict = {}
    if revision:
        kw["revision"] = revision
    return kw


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

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
