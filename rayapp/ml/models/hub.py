"""Stage a hub checkpoint into the run's own model folder, once, as the model class names its
tensors, in safetensors.

The hub publishes checkpoints in several layouts: one ``pytorch_model.bin`` (OPT-350M), pickled
``pytorch_model-0000k-of-0000n.bin`` shards with an index (OPT-13B), ``model-0000k-of-0000n
.safetensors`` shards with an index (Llama-2, which also has ``.bin`` shards), with or without the
base model's prefix (OPT's checkpoints were saved from ``OPTModel``: ``decoder.layers.0...``, not
``model.decoder.layers.0...``). Every reader downstream (FSDP ranks reading their own rows, scoring
actors, vLLM, the tokenizer) would otherwise need to handle them all, and to unpickle ``.bin``
files. Here, on the driver and once per run:

1. the snapshot is fetched at the pinned revision, its safetensors when it has them, else its
   ``.bin`` files (never both);
2. pickled weights are read with ``torch.load(weights_only=True, mmap=True)`` only: a pickle that
   would run code is refused;
3. each tensor is renamed to what the model class expects (the base-model prefix added or
   stripped, by comparison with the state dict of the model built on the meta device), tied
   weights stay one tensor, tensors the model computes itself (old checkpoints' per-layer
   ``rotary_emb.inv_freq``) are left out, and anything else that matches no parameter is an error,
   as is a parameter the checkpoint lacks;
4. the tensors are written, in their stored dtype, one at a time (no whole-model copy in memory),
   to ``model-0000k-of-0000n.safetensors`` shards with a ``model.safetensors.index.json``, beside
   the config, generation config and tokenizer files.

``registry.model_source`` marks the folder (``artifacts.mark_export``) with the repository, the
requested revision and the commit it resolved to; a folder staged from the same repository and
revision is reused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass

from rayapp.core.errors import RayappError
from rayapp.core.log import get_logger

log = get_logger(__name__)

# Everything of a checkpoint but its weights: config, generation config, tokenizer files, chat template.
META_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
# transformers' weight layouts, in the order it prefers them: (index file, single file)
SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
PICKLED = ("pytorch_model.bin.index.json", "pytorch_model.bin")
STAGED_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 * 2**30  # the staged shards: vLLM and from_pretrained read one at a time
STAGED = "hub"  # the marker's "staged" field


class HubCheckpointError(RayappError):
    """A hub checkpoint that cannot be fetched, or whose tensors do not fit the model class."""


def is_hub_name(name: str | None) -> bool:
    """A hub repository id: not 'tiny', a packaged model, an object-store URI or an existing path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from rayapp.core import storage
    from rayapp.ml.models.packaged import is_packaged

    if not name or name == "tiny" or is_packaged(name) or storage.is_remote(name) or os.path.exists(name):
        return False
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_staged(folder: str, repo: str, revision: str | None, kind: str = "model") -> bool:
    """Whether ``folder`` (local or object store) holds ``repo`` at ``revision``, staged complete."""
    from rayapp.core import storage
    from rayapp.core.artifacts import EXPORT_MARKER

    marker = storage.join(folder, EXPORT_MARKER)
    if not storage.exists(marker):
        return False
    info = storage.read_json(marker)
    return (info.get("staged") == STAGED and info.get("kind", "model") == kind and info.get("repo") == repo
            and info.get("revision") == revision)


# ---- fetching ------------------------------------------------------------------------------------


def _where(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision or 'main'}"


def _download(repo: str, revision: str | None, patterns: list[str], what: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        # root files only: some repositories keep other formats' copies in sub-folders
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"])
    except Exception as exc:  # gated, missing, offline without a cached copy: say which repository
        raise HubCheckpointError(f"{_where(repo, revision)}: cannot fetch its {what}: "
                                 f"{type(exc).__name__}: {exc}".strip()) from exc


def fetch_meta(repo: str, revision: str | None, trust_remote_code: bool = False) -> tuple[str, str]:
    """(snapshot folder, resolved commit) with the repository's config and tokenizer files."""
    patterns = META_PATTERNS + (["*.py"] if trust_remote_code else [])  # remote code only when opted in
    folder = _download(repo, revision, patterns, "config and tokenizer files")
    return folder, os.path.basename(os.path.normpath(folder))  # the cache names snapshots by commit


def _repo_files(repo: str, commit: str, folder: str) -> list[str]:
    """The repository's files at ``commit``: the tree listing the hub client cached with the
    snapshot, else the hub's listing, else (offline, no listing cached) what the snapshot holds."""
    from huggingface_hub import HfApi, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(repo, revision=commit)]
    except CachedRepoTreeNotFoundError:
        pass
    try:
        return list(HfApi().list_repo_files(repo, revision=commit))
    except Exception as exc:
        log.info("%s: no file listing (%s); choosing the weights from the cached snapshot", repo, exc)
        return sorted(os.listdir(folder))


def weight_files(repo: str, revision: str | None, folder: str, files: list[str]) -> tuple[str, list[str]]:
    """("safetensors" or "bin", the weight files to fetch): the safetensors when the repository
    has them, else the pickled ones, by index when there is one, as transformers chooses."""
    for fmt, (index, single) in (("safetensors", SAFETENSORS), ("bin", PICKLED)):
        if index in files:
            path = os.path.join(folder, index)
            try:
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise HubCheckpointError(f"{_where(repo, revision)}: {index}: not a weight index ({exc})") from None
            return fmt, sorted(set(weight_map.values()))
        if single in files:
            return fmt, [single]
    raise HubCheckpointError(
        f"{_where(repo, revision)}: no weights in a layout rayapp reads ({SAFETENSORS[1]}, {PICKLED[1]}, or their "
        f"shards with {SAFETENSORS[0]} / {PICKLED[0]}); the repository holds {sorted(files)[:20]}")


# ---- reading the checkpoint's tensors -------------------------------------------------------------


@dataclass
class Source:
    """One tensor of the checkpoint and where it goes in the staged folder."""
    file: str  # the weight file's name in the snapshot
    key: str  # the tensor's name there
    name: str  # its name in the staged folder (the model's)
    dtype: str  # safetensors dtype code (F16, BF16, ...)
    shape: tuple[int, ...]
    nbytes: int


def load_pickled(path: str, where: str):
    """The tensors of a pickled checkpoint, memory-mapped, unpickled with weights_only (plain
    tensors and containers only: a pickle that would call anything else is refused)."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # a checkpoint saved in torch's legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubCheckpointError(f"{where}: {os.path.basename(path)}: refused to unpickle it: it holds more than "
                                 f"tensors (read with torch.load(weights_only=True)): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HubCheckpointError(f"{where}: {os.path.basename(path)}: not a flat state dict of tensors "
                                 f"(found {type(state).__name__})")
    return state


def _stored_tensors(folder: str, file: str, where: str) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(key, safetensors dtype code, shape, bytes) of each tensor of one weight file, in its order;
    no tensor data is read."""
    import math

    import torch

    from rayapp.ml.models import sharded

    path = os.path.join(folder, file)
    if file.endswith(".safetensors"):
        codes = {v: k for k, v in sharded.SAFETENSORS_DTYPES.items()}
        try:
            header = sharded._header(path)
        except (OSError, ValueError) as exc:
            raise HubCheckpointError(f"{where}: {file}: not a readable safetensors file ({exc})") from None
        return [(k, codes[t.dtype], t.shape, math.prod(t.shape) * getattr(torch, t.dtype).itemsize)
                for k, t in sorted(header.items(), key=lambda kv: kv[1].start)]
    out = []
    for k, t in load_pickled(path, where).items():
        out.append((k, _dtype_code(t.dtype, where, file, k), tuple(t.shape), t.numel() * t.element_size()))
    return out


def _dtype_code(dtype, where: str, file: str, key: str) -> str:
    from rayapp.ml.models import sharded

    name = str(dtype).removeprefix("torch.")
    codes = {v: k for k, v in sharded.SAFETENSORS_DTYPES.items()}
    if name not in codes:
        raise HubCheckpointError(f"{where}: {file}: tensor {key!r} has dtype {name}, which rayapp does not stage")
    return codes[name]


def _ignored_unexpected(model) -> re.Pattern | None:
    """Checkpoint tensors the model class does not load and computes itself, as transformers
    leaves them out (modeling_utils: ``_adjust_missing_and_unexpected_keys``): the class's own
    patterns, per-layer ``rotary_emb.inv_freq`` of old Llama checkpoints, ``position_ids``."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def plan_tensors(model, folder: str, files: list[str], where: str) -> tuple[list[Source], dict]:
    """Every checkpoint tensor the staged folder keeps, under the model's name for it, and what was
    renamed or left out. Errors name the repository, the file and the tensor."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    expected = dict(model.state_dict(keep_vars=True))  # parameters and persistent buffers, by name
    shapes = {n: tuple(t.shape) for n, t in expected.items()}
    # tied weights (lm_head = embed_tokens) are one Parameter under several names: stage it once,
    # under the first name (the one save_pretrained keeps)
    canonical: dict[str, str] = {}
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    for names in groups.values():
        for n in names:
            canonical[n] = names[0]
    ignore = _ignored_unexpected(model)

    def model_name(key: str) -> str | None:
        if key in expected:
            return key
        if prefix and f"{prefix}.{key}" in expected:  # saved from the base model (OPT: decoder.*)
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:]
        return None

    kept: dict[str, Source] = {}  # by canonical name
    notes = {"renamed": 0, "dropped_computed": [], "dropped_tied": []}
    unmatched: list[str] = []
    for file in files:
        for key, code, shape, nbytes in _stored_tensors(folder, file, where):
            name = model_name(key)
            if name is None:
                if ignore is not None and ignore.search(key):
                    notes["dropped_computed"].append(key)
                    continue
                unmatched.append(f"{file}: {key}")
                continue
            if shape != shapes[name]:
                raise HubCheckpointError(f"{where}: {file}: tensor {key!r} has shape {list(shape)}, the model's "
                                         f"{name} is {list(shapes[name])}")
            notes["renamed"] += name != key
            c = canonical.get(name, name)
            src = Source(file, key, c, code, shape, nbytes)
            if c in kept:
                old = kept[c]
                if old.key == key or (model_name(old.key) == name):
                    raise HubCheckpointError(f"{where}: tensors {old.file}: {old.key!r} and {file}: {key!r} are both "
                                             f"the model's {name}")
                if name == c:  # the tied weight's own name wins over its alias
                    notes["dropped_tied"].append(old.key)
                    kept[c] = src
                else:
                    notes["dropped_tied"].append(key)
                continue
            kept[c] = src
    if unmatched:
        raise HubCheckpointError(f"{where}: {len(unmatched)} checkpoint tensor(s) match no parameter of "
                                 f"{type(model).__name__} (with or without the {prefix!r} prefix): "
                                 f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}")
    missing = [names[0] for names in groups.values() if names[0] not in kept]
    if missing:
        raise HubCheckpointError(f"{where}: the checkpoint ({', '.join(files)}) has no tensor for the parameter(s) "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} of "
                                 f"{type(model).__name__}")
    return list(kept.values()), notes


# ---- writing -------------------------------------------------------------------------------------


class _Reader:
    """Tensors of the checkpoint's files, one file open at a time (sources come in file order)."""

    def __init__(self, folder: str, where: str):
        self.folder, self.where = folder, where
        self.file: str | None = None
        self.handle = None

    def get(self, file: str, key: str):
        if file != self.file:
            self.handle = None  # drop the previous file's memory map first
            path = os.path.join(self.folder, file)
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self.handle = safe_open(path, framework="pt")
            else:
                self.handle = load_pickled(path, self.where)
            self.file = file
        return self.handle.get_tensor(key) if file.endswith(".safetensors") else self.handle[key]


def _tensor_bytes(t):
    """A tensor's bytes as a buffer, without a copy when it is contiguous (a memory-mapped tensor
    stays file-backed)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(path: str, sources: list[Source], reader: _Reader) -> None:
    """One safetensors file, written a tensor at a time (the format: an 8-byte little-endian
    header length, a JSON header padded to 8 bytes, then the tensors' bytes back to back)."""
    import struct

    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for s in sources:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in sources:
            data = _tensor_bytes(reader.get(s.file, s.key))
            if data.nbytes != s.nbytes:
                raise HubCheckpointError(f"{reader.where}: {s.file}: tensor {s.key!r} holds {data.nbytes} bytes, "
                                         f"its header says {s.nbytes}")
            f.write(memoryview(data))
    os.replace(tmp, path)


def shard_sources(sources: list[Source], max_bytes: int) -> list[list[Source]]:
    shards: list[list[Source]] = [[]]
    size = 0
    for s in sources:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _copy_meta(snapshot: str, out: str, files: list[str], trust_remote_code: bool) -> list[str]:
    """Copy the config, generation config and tokenizer files (not the weight indexes: the staged
    folder has its own)."""
    patterns = META_PATTERNS + (["*.py"] if trust_remote_code else [])
    copied = []
    for name in sorted(files):
        if "/" in name or name in (SAFETENSORS[0], PICKLED[0]):
            continue
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        src = os.path.join(snapshot, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))  # the content, not the cache's symlink
            copied.append(name)
    return copied


def stage_model(repo: str, revision: str | None, out: str, trust_remote_code: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES, destination: str | None = None) -> dict:
    """Fetch ``repo`` at ``revision`` and write it into the local folder ``out`` as safetensors
    shards with the model class's tensor names. Returns what the export marker records.
    ``destination``: where ``out`` is uploaded to (an object store), for the log."""
    from rayapp.ml.models import sharded

    where = _where(repo, revision)
    meta, commit = fetch_meta(repo, revision, trust_remote_code)
    files = _repo_files(repo, commit, meta)
    fmt, weights = weight_files(repo, revision, meta, files)
    # the weights of the same commit, even if the branch moved since
    snapshot = _download(repo, commit, weights, f"{fmt} weights ({len(weights)} file(s))")
    absent = [w for w in weights if not os.path.isfile(os.path.join(snapshot, w))]
    if absent:
        raise HubCheckpointError(f"{where}: weight file(s) {absent} are not in the fetched snapshot {snapshot}")
    where = f"{repo}@{revision or 'main'} ({commit[:12]})"
    try:
        config = sharded.load_config(snapshot, trust_remote_code)
    except Exception as exc:
        raise HubCheckpointError(f"{where}: config.json: cannot read it: {exc}") from exc
    model = sharded.empty_causal_lm(config, trust_remote_code=trust_remote_code)  # names and shapes only
    sources, notes = plan_tensors(model, snapshot, weights, where)
    os.makedirs(out, exist_ok=True)
    shards = shard_sources(sources, max_shard_bytes)
    reader = _Reader(snapshot, where)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out, name), shard, reader)
        weight_map.update({s.name: name for s in shard})
    reader.handle = None
    total = sum(s.nbytes for s in sources)
    with open(os.path.join(out, STAGED_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copied = _copy_meta(snapshot, out, files if files else os.listdir(snapshot), trust_remote_code)
    if "config.json" not in copied:
        raise HubCheckpointError(f"{where}: the repository has no config.json")
    log.info("staged %s from %d %s file(s) into %s: %d tensors, %.2f GB in %d shard(s)%s%s%s", where, len(weights),
             fmt, destination or out, len(sources), total / 1e9, len(shards),
             f"; {notes['renamed']} renamed to {type(model).__name__}'s names" if notes["renamed"] else "",
             f"; left out {len(notes['dropped_computed'])} the model computes" if notes["dropped_computed"] else "",
             f"; left out tied copies {notes['dropped_tied']}" if notes["dropped_tied"] else "")
    return {"staged": STAGED, "kind": "model", "repo": repo, "revision": revision, "commit": commit,
            "source_format": fmt, "source_files": weights, "renamed": notes["renamed"],
            "left_out": notes["dropped_computed"] + notes["dropped_tied"]}


TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "*.model", "*.tiktoken", "chat_template.*", "config.json"]


def stage_tokenizer(repo: str, revision: str | None, out: str, trust_remote_code: bool = False) -> dict:
    """Fetch only the tokenizer files of ``repo`` at ``revision`` into the local folder ``out``
    (with config.json: AutoTokenizer reads the model type from it when tokenizer_config.json names
    no class). Returns what the export marker records."""
    meta, commit = fetch_meta(repo, revision, trust_remote_code)
    names = [n for n in os.listdir(meta) if any(fnmatch.fnmatch(n, p) for p in TOKENIZER_FILES)
             and n not in (SAFETENSORS[0], PICKLED[0])]
    if trust_remote_code:
        names += [n for n in os.listdir(meta) if n.endswith(".py")]
    if not any(n.startswith("tokenizer") or n in ("vocab.json", "merges.txt") for n in names):
        raise HubCheckpointError(f"{_where(repo, revision)} ({commit[:12]}): no tokenizer files in the repository")
    os.makedirs(out, exist_ok=True)
    for n in sorted(names):
        shutil.copyfile(os.path.join(meta, n), os.path.join(out, n))
    return {"staged": STAGED, "kind": "tokenizer", "repo": repo, "revision": revision, "commit": commit,
            "files": sorted(names)}
