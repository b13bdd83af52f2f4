"""Tiny stand-ins of the paper's hub models, written into a local hub cache in the layout the hub
publishes the real ones in, so that the ordinary hub-name code path (``snapshot_download``,
``AutoConfig.from_pretrained("facebook/opt-350m")``, ``AutoTokenizer``) finds them with
``HF_HUB_OFFLINE=1 HF_HUB_CACHE=<cache>``: for rehearsing a run on one machine, and for tests.

Each stand-in has the real model's architecture and config (the bundled copy of its public
config.json, rayapp/assets/model-configs) with tiny sizes (hidden 64, 2 layers, 2 heads of 32: as
small as vLLM's CPU kernels accept), random weights, and a ~2k-token BPE tokenizer of the same kind,
trained on the packaged Alpaca sample. The files are laid out as the hub publishes them:

- ``facebook/opt-350m``: OPT with ``project_in``/``project_out`` (word_embed_proj_dim < hidden)
  and post-layer-norm, one ``pytorch_model.bin`` and no index;
- other ``facebook/opt-*``: pre-layer-norm OPT, ``pytorch_model-0000k-of-00002.bin`` with
  ``pytorch_model.bin.index.json``; OPT tensors are named as ``OPTModel`` saved them
  (``decoder.layers.0...``: no ``model.`` prefix, no ``lm_head``, which is tied), in fp16; the
  tokenizer is GPT-2's files (vocab.json, merges.txt) with no tokenizer class, as OPT's;
- ``meta-llama/Llama-2-*``: ``model-0000k-of-00002.safetensors`` with
  ``model.safetensors.index.json`` and the same weights as ``.bin`` shards with their index,
  prefixed names (``model.layers.0...``, ``lm_head.weight``) and, as the 2023 conversions have,
  each layer's ``rotary_emb.inv_freq``, in fp16; a LlamaTokenizer ``tokenizer.json`` (the real
  repository also has a sentencepiece ``tokenizer.model``, which the stand-in leaves out).

The cache is huggingface_hub's (file_download.py, _snapshot_download.py): ``blobs/<etag>`` (the
sha256 of an LFS file, the git blob sha1 of another), ``snapshots/<commit>/<file>`` as relative
symlinks to the blobs, ``refs/<revision>`` holding the commit, and the tree listing
``trees/<commit>.json`` that ``snapshot_download`` caches. Everything is deterministic: the same
repository and revision give the same commit hash; another revision gives other weights (and
another commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

from rayapp.core.errors import RayappError

HIDDEN = 64
HEADS = 2  # head_dim 32: vLLM's CPU attention needs at least that
LAYERS = 2
VOCAB = 2000
LFS_SUFFIXES = (".bin", ".safetensors", ".model")  # what the hub stores in LFS (blob named by sha256)
KNOWN = ("facebook/opt-350m (OPT, project_in/project_out, post-LN, one pytorch_model.bin)",
         "facebook/opt-* (OPT, pre-LN, .bin shards with an index)",
         "meta-llama/Llama-2-* (Llama, safetensors and .bin shards with indexes)")


class StandinError(RayappError, ValueError):
    """A repository rayapp has no stand-in for."""


def family(repo_id: str) -> str:
    """'opt-350m', 'opt' or 'llama-2': the architecture and layout of ``repo_id``'s stand-in."""
    if repo_id == "facebook/opt-350m":
        return "opt-350m"
    if re.fullmatch(r"facebook/opt-[0-9.]+[mb]", repo_id):
        return "opt"
    if repo_id.startswith("meta-llama/Llama-2-"):
        return "llama-2"
    raise StandinError(f"no hub stand-in for {repo_id!r}; rayapp has stand-ins of: {'; '.join(KNOWN)}")


# ---- the files of a stand-in ---------------------------------------------------------------------


def _texts() -> list[str]:
    """A few hundred fixed strings (the packaged Alpaca sample) to train the tokenizer on."""
    from importlib.resources import files

    rows = files("rayapp").joinpath("assets/alpaca-sample.jsonl").read_text(encoding="utf-8").splitlines()
    out = []
    for line in rows:
        row = json.loads(line)
        out.append(" ".join(row[k] for k in ("instruction", "input", "output") if row.get(k)))
    return out


def _opt_tokenizer(out: str) -> int:
    """GPT-2 byte-level BPE files as OPT's repositories have them (vocab.json, merges.txt; the
    class comes from config.json's model_type); ids 0-3 are <s>, <pad>, </s>, <unk> as in OPT,
    whose tokenizer starts every text with </s>. Returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(), trainer=trainer)
    tok.model.save(out)
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {"errors": "replace", **special, "add_prefix_space": False, "add_bos_token": True})
    _write_json(os.path.join(out, "special_tokens_map.json"), special)
    return tok.get_vocab_size()


def _llama_tokenizer(out: str) -> int:
    """A Llama tokenizer.json: BPE over sentencepiece-style pieces (▁ for a space) with byte
    fallback; ids 0-2 are <unk>, <s>, </s> and 3-258 the byte tokens, as in Llama-2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 256, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=200, show_progress=False)
    tok.train_from_iterator(_texts(), trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, legacy=False) \
        .save_pretrained(out)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    # the fields of Llama-2's own tokenizer_config.json
    config.update(add_bos_token=True, add_eos_token=False, legacy=False, pad_token=None, padding_side="right")
    _write_json(path, config)
    _write_json(os.path.join(out, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return len(vocab)


def _config(repo_id: str, fam: str, vocab: int) -> dict:
    """The real model's public config.json (the bundled copy; OPT-13B's or Llama-2-7B's for a
    size rayapp has none of) with tiny sizes."""
    from rayapp.ops.plan.shapes import bundled_config

    base = bundled_config(repo_id) or bundled_config("facebook/opt-13b" if fam == "opt" else
                                                     "meta-llama/Llama-2-7b-hf")
    with open(base) as f:
        config = json.load(f)
    config["_name_or_path"] = repo_id
    sizes = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    if fam.startswith("opt"):
        # OPT pads its vocabulary (50272 for 50265 tokens); 350M projects embeddings of half the width
        sizes.update(ffn_dim=4 * HIDDEN, vocab_size=-(-vocab // 64) * 64,
                     word_embed_proj_dim=HIDDEN // 2 if fam == "opt-350m" else HIDDEN)
    else:
        sizes.update(intermediate_size=172, num_key_value_heads=HEADS, vocab_size=vocab)
    config.update(sizes)
    return config


def _generation_config(fam: str) -> dict:
    if fam.startswith("opt"):
        return {"_from_model_config": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}
    return {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
            "temperature": 0.6, "top_p": 0.9}


def standin_weights(folder: str, seed: int) -> dict:
    """Random weights of the model of ``folder``'s config.json, fp16, under the model class's
    own names."""
    import torch

    from rayapp.ml.models.imports import lean_transformers

    lean_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}


def _split(names: list[str], sizes: dict[str, int], parts: int) -> list[list[str]]:
    """``names`` in order, cut into ``parts`` runs of about equal bytes."""
    total = sum(sizes.values())
    out: list[list[str]] = [[] for _ in range(parts)]
    done = 0
    for n in names:
        out[min(parts - 1, done * parts // total)].append(n)
        done += sizes[n]
    return [p for p in out if p]


def _write_shards(state: dict, folder: str, fmt: str, parts: int) -> None:
    """``state`` as the hub's sharded files with their index (one unindexed file when parts is 1)."""
    import torch
    from safetensors.torch import save_file

    names = list(state)
    sizes = {n: state[n].numel() * state[n].element_size() for n in names}
    stem, ext, index = (("pytorch_model", "bin", "pytorch_model.bin.index.json") if fmt == "bin"
                        else ("model", "safetensors", "model.safetensors.index.json"))
    shards = _split(names, sizes, parts)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{stem}.{ext}" if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        part = {n: state[n] for n in shard}
        if fmt == "bin":
            torch.save(part, os.path.join(folder, file))
        else:
            save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        _write_json(os.path.join(folder, index), {"metadata": {"total_size": sum(sizes.values())},
                                                  "weight_map": weight_map})


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def standin_files(repo_id: str, revision: str, out: str) -> None:
    """Write the files of ``repo_id``'s stand-in at ``revision`` into the folder ``out``."""
    from rayapp.ml.models.imports import lean_transformers

    lean_transformers()
    fam = family(repo_id)
    vocab = _opt_tokenizer(out) if fam.startswith("opt") else _llama_tokenizer(out)
    config = _config(repo_id, fam, vocab)
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"), _generation_config(fam))
    seed = int(hashlib.sha256(f"{repo_id}@{revision}".encode()).hexdigest()[:8], 16)
    state = standin_weights(out, seed)
    if fam.startswith("opt"):
        # as OPTModel saved them: no "model." prefix, and no lm_head (tied to the embeddings)
        state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
        _write_shards(state, out, "bin", 1 if fam == "opt-350m" else 2)
    else:
        import torch

        # the per-layer rotary tables the 2023 conversions saved (models compute them now)
        head_dim = HIDDEN // HEADS
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        with_rotary = {}
        for k, v in state.items():
            with_rotary[k] = v
            m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", k)
            if m:
                with_rotary[f"model.layers.{m.group(1)}.self_attn.rotary_emb.inv_freq"] = inv_freq.half()
        _write_shards(with_rotary, out, "safetensors", 2)
        _write_shards(with_rotary, out, "bin", 2)


# ---- the hub's cache layout ----------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_standin(repo_id: str, hub_cache: str, revision: str = "main") -> str:
    """Write ``repo_id``'s stand-in at ``revision`` into the hub cache ``hub_cache`` (as
    ``HF_HUB_CACHE`` names it) and return its commit hash. ``revision`` is a branch or tag name
    (``refs/<revision>`` then points at the commit) or a 40-hex commit hash (the snapshot's name)."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name

    storage = os.path.join(hub_cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    os.makedirs(storage, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".standin-", dir=storage)
    try:
        standin_files(repo_id, revision, tmp)
        tree: dict[str, dict] = {}
        etags: dict[str, str] = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            if name.endswith(LFS_SUFFIXES):  # an LFS file: the blob is named by its sha256
                sha256 = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
                etags[name] = sha256
                tree[name] = {"size": len(data), "blob_id": _git_blob_sha1(pointer.encode()),
                              "lfs_sha256": sha256, "lfs_size": len(data)}
            else:
                etags[name] = _git_blob_sha1(data)
                tree[name] = {"size": len(data), "blob_id": etags[name]}
        if REGEX_COMMIT_HASH.fullmatch(revision):
            commit = revision
        else:
            listing = "".join(f"{n} {tree[n]['blob_id']}\n" for n in sorted(tree))
            commit = hashlib.sha1(f"stand-in of {repo_id}\n{listing}".encode()).hexdigest()
        blobs = os.path.join(storage, "blobs")
        snapshot = os.path.join(storage, "snapshots", commit)
        os.makedirs(blobs, exist_ok=True)
        os.makedirs(snapshot, exist_ok=True)
        for name, etag in etags.items():
            blob = os.path.join(blobs, etag)
            if not os.path.exists(blob):
                os.replace(os.path.join(tmp, name), blob)
            link = os.path.join(snapshot, name)
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)  # relative, as the hub client links
        if revision != commit:
            ref = os.path.join(storage, "refs", revision)
            os.makedirs(os.path.dirname(ref), exist_ok=True)
            with open(ref, "w") as f:
                f.write(commit)  # no newline: the client reads the file as the hash
        trees = os.path.join(storage, "trees")
        os.makedirs(trees, exist_ok=True)
        with open(os.path.join(trees, f"{commit}.json"), "w", encoding="utf-8") as f:
            json.dump({"format_version": 1, "files": tree}, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return commit
