"""Build a causal LM with its parameters on the meta device, and fill FSDP2 shards straight from
safetensors, so that no rank ever holds the whole model.

``from_pretrained`` followed by ``fully_shard`` materialises every weight on every rank first: for
OPT-13B in fp32 that is 52 GB per GPU (and eight copies in one node's RAM). Here each rank

1. builds the model from its ``config.json`` with parameters on the meta device (buffers such as
   rotary tables are computed for real: they are small and not all of them are in the checkpoint),
2. shards it with ``fully_shard`` (parameters become meta DTensors),
3. allocates only its own shards (``to_empty``), and
4. reads into them the rows of each tensor its shard holds, straight from the safetensors files
   (plain positioned reads of just those bytes; the safetensors package offers only memory maps,
   whose touched pages would count in every rank's resident memory).

The weights equal ``from_pretrained``'s exactly (same bytes, cast to the training dtype).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside go to the meta device; buffers stay real.

    ``torch.device("meta")`` as a context would also put computed buffers (rotary ``inv_freq``)
    on meta, and those are not in checkpoints. ``nn.Linear`` and friends allocate their weights
    with ``torch.empty`` (no page is touched) before registering them, so nothing of size is
    allocated on the host either."""
    import torch
    import torch.nn as nn

    register = nn.Module.register_parameter
    # With deterministic algorithms on (rayapp's CPU training workers turn them on), torch fills
    # every torch.empty with NaN: building a 13B model would write ~52 GB of host memory (20 s
    # rather than 0.1 s) before the parameters move to meta.
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            cls, extra = type(param), param.__dict__
            module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad, **extra)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        torch.utils.deterministic.fill_uninitialized_memory = fill


def load_config(name_or_path: str, trust_remote_code: bool = False):
    from rayapp.ml.models.imports import lean_transformers

    lean_transformers()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def empty_causal_lm(config, dtype=None, trust_remote_code: bool = False):
    """The model of ``config`` with every parameter on the meta device (no weight memory)."""
    import torch

    from rayapp.ml.models.imports import lean_transformers

    lean_transformers()
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32,
                                                 trust_remote_code=trust_remote_code)
    return model


def real_buffers(model) -> dict:
    """Copies of the module's buffers (``to_empty`` replaces them with uninitialised memory)."""
    return {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str  # a torch dtype name
    shape: tuple[int, ...]
    start: int  # byte offset of the tensor's data in the file

    @property
    def row_bytes(self) -> int:
        import torch

        return math.prod(self.shape[1:]) * getattr(torch, self.dtype).itemsize


def _header(path: str) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file (the format: an 8-byte little-endian header length, a
    JSON header of dtype, shape and data_offsets per tensor, then the data)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which rayapp does not load")
        out[name] = StoredTensor(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                 base + info["data_offsets"][0])
    return out


def safetensors_index(folder: str) -> dict[str, StoredTensor]:
    """Every tensor in ``folder``'s safetensors files: where it is, its dtype and shape."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights (rayapp reads no pickled .bin weights here: a hub "
                                "checkpoint reaches the stages converted, by registry.model_source)")
    out: dict[str, StoredTensor] = {}
    for name in files:
        out.update(_header(os.path.join(folder, name)))
    return out


def read_rows(f, t: StoredTensor, start: int, stop: int, out) -> int:
    """Read rows [start, stop) of ``t`` from the open file ``f`` into ``out`` (a contiguous tensor of
    those rows' shape): straight into it when it is a CPU tensor of the stored dtype, else through a
    buffer of this shard's size. Plain reads, not a memory map, so a rank's resident memory holds
    its shards and nothing of the file."""
    import torch

    dtype = getattr(torch, t.dtype)
    direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    buf = out if direct else torch.empty(out.shape, dtype=dtype)
    f.seek(t.start + start * t.row_bytes if t.shape else t.start)
    view = memoryview(buf.view(torch.uint8).reshape(-1).numpy())
    got = f.readinto(view)
    if got != view.nbytes:
        raise ValueError(f"{t.file}: truncated tensor data")
    if not direct:
        out.copy_(buf.to(out.dtype))
    return got


def local_rows(param) -> tuple[int, int]:
    """[start, stop) of dim 0 that this rank's shard of ``param`` holds.

    FSDP2 shards dim 0 as ``torch.chunk`` does: chunks of ceil(n / world) rows, the last ones
    shorter or empty."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    placements = param.placements
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"expected a dim-0 sharded parameter, got placements {placements}")
    world = param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    n = param.shape[0]
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def load_local_shards(model, folder: str, dtype, buffers: dict | None = None,
                      checkpoint_name: Callable[[str], str | None] | None = None) -> int:
    """Fill this rank's shard of every parameter (and every buffer) from ``folder``'s safetensors,
    reading only the rows the shard holds. Returns the number of bytes read. A tensor missing
    from the checkpoint is an error, except buffers computed at construction (``buffers``).

    ``checkpoint_name`` maps a parameter's name in ``model`` to its key in the checkpoint, or to
    None for a parameter the checkpoint does not hold (LoRA adapters on a wrapped base)."""
    import torch
    from torch.distributed.tensor import DTensor

    index = safetensors_index(folder)
    key = checkpoint_name or (lambda name: name)
    # tied weights (lm_head = embed_tokens) are one Parameter under several names; the checkpoint
    # holds one of them
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if key(name) is not None:
            aliases.setdefault(id(p), []).append(key(name))
    files: dict[str, object] = {}
    read = 0
    try:
        def open_(t: StoredTensor):
            if t.file not in files:
                files[t.file] = open(t.file, "rb", buffering=0)
            return files[t.file]

        with torch.no_grad():
            for name, p in model.named_parameters():
                if id(p) not in aliases:
                    continue  # not in the checkpoint: the caller initialises it
                stored = next((a for a in aliases[id(p)] if a in index), None)
                if stored is None:
                    raise KeyError(f"{folder}: no tensor for parameter {name!r} (nor its aliases {aliases[id(p)]})")
                t = index[stored]
                if t.shape != tuple(p.shape):
                    raise ValueError(f"{folder}: {stored} has shape {t.shape}, the model expects {tuple(p.shape)}")
                local = p.to_local() if isinstance(p, DTensor) else p
                start, stop = local_rows(p) if p.dim() else (0, 1)
                if p.dim() and stop - start != local.shape[0]:
                    raise ValueError(f"{name}: rows [{start}, {stop}) do not match the local shard {tuple(local.shape)}")
                if stop > start:
                    read += read_rows(open_(t), t, start, stop, local)
            for name, b in model.named_buffers():
                stored = key(name)
                if stored in index:
                    read += read_rows(open_(index[stored]), index[stored], 0, b.shape[0] if b.dim() else 1, b)
                elif buffers is not None and name in buffers:
                    b.copy_(buffers[name].to(b.device))
                else:
                    raise KeyError(f"{folder}: no tensor for buffer {name!r}, and it was not computed at construction")
    finally:
        for f in files.values():
            f.close()
    return read
