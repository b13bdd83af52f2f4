"""Slow against fast tokenizers for the paper's two model families, on every shared Alpaca and Dolly
row (docs/fidelity.md, "The prompt/response boundary: fast-tokenizer offsets", cites these numbers).

The paper authors' code loads *slow* tokenizers (``use_fast=False``) for OPT-350M and Llama-2 and
labels, Alpaca-style, every token after ``len(tokenize(prompt))`` of ``tokenize(prompt + response)``.
rayapp loads *fast* (HF ``tokenizers``) ones and labels the tokens that start at or after the
prompt's last character (``rayapp.ml.tokenize.tokenize_pairs``). Both families' tokenizer files
live on the Hub, which this machine cannot reach; but the llama-cpp-python sdist on PyPI vendors
llama.cpp's vocab-only GGUF files, and they hold everything the tokenizers are made of:

- ``ggml-vocab-llama-spm.gguf``: Llama-2's 32,000-piece SentencePiece BPE (pieces, scores, types).
  From it we rebuild ``tokenizer.model`` (a SentencePiece ModelProto with LLaMA's trainer and
  normalizer settings), byte for byte Meta's file (its published md5 and sha256 are checked);
  the slow path is ``sentencepiece`` itself, called the way transformers 4.x's
  ``LlamaTokenizer`` (legacy) calls it; the fast paths are the ``tokenizer.json`` transformers'
  ``LlamaConverter`` makes from that model (as the Hub's file was made), used two ways: as that
  file's own pipeline (what transformers 4.x ran) and as transformers 5's ``AutoTokenizer`` loads
  it (what rayapp runs); and transformers 5 loading the GGUF itself (``gguf_file=``).
- ``ggml-vocab-gpt-2.gguf``: GPT-2's byte-level BPE (tokens, merges). OPT uses GPT-2's BPE (same
  token strings and merges, fairseq-remapped ids), so we write ``vocab.json`` + ``merges.txt`` (GPT-2
  ids; OPT's four specials appended) and an OPT-like ``tokenizer_config.json`` (``</s>`` as BOS and
  EOS). Transformers 5 has no slow ``GPT2Tokenizer`` any more; the one pure-Python byte-level BPE it
  still ships with GPT-2's pre-tokenizer pattern and merge loop is ``ClvpTokenizer``, which we use
  with its English text normalizer switched off (nothing else in it differs from 4.x's slow
  ``GPT2Tokenizer``). The fast path is ``AutoTokenizer`` on the folder, as rayapp loads OPT.

Every rebuilt tokenizer is first checked against llama.cpp's own test vectors (``.inp``/``.out``
beside the GGUFs, generated with the Hub tokenizers); optionally (``--transformers4-python``) the
slow stand-ins are checked row by row against transformers 4.x's own slow classes. Then, per
family and file, three labelings:
(a) the authors' rule with the slow tokenizer, (b) rayapp's offsets rule with the fast one, (c) the
authors' rule with the fast one, which separates the tokenizer's effect (a vs c) from the rule's
(c vs b).

Run: ``python -m benchmarks.slow_tokenizers [--sdist PATH] [--out benchmarks/results]
[--transformers4-python PYTHON]``. It
downloads the sdist with pip when no path is given (the only network access), runs on one core and
takes a few minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks.report import write_results

SHARED = "../shared/data"  # as benchmarks/fidelity.py: relative to the repository root
PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
MODELS_DIR = "vendor/llama.cpp/models/"
GGUF = {"llama2": "ggml-vocab-llama-spm.gguf", "opt": "ggml-vocab-gpt-2.gguf"}
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp's tests/test-tokenizer-0 format
IGNORE_INDEX = -100  # rayapp.core.labels.IGNORE_INDEX; repeated so this file measures, not imports, rayapp's rule
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's vocab.json has them as ids 0-3 (fairseq's dictionary)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# Step 1: the files


def obtain_sdist(sdist: str | None, work: str) -> str:
    """The sdist at ``sdist``, or a fresh ``pip download`` of it into ``work`` (sdist only: the
    GGUFs are in the source tree, not in the wheels)."""
    if sdist and os.path.exists(sdist):
        return sdist
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", work,
                    f"{PACKAGE}=={VERSION}"], check=True)
    return os.path.join(work, SDIST_NAME)


def extract_vocab_files(sdist: str, dest: str) -> dict[str, str]:
    """Copy the two GGUFs and their .inp/.out test vectors out of the sdist into ``dest``; returns
    file name -> path. Members are read by name and written under their base name only (no path
    from the archive is trusted)."""
    os.makedirs(dest, exist_ok=True)
    wanted = {name + suffix for name in GGUF.values() for suffix in ("", ".inp", ".out")}
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if member.isfile() and base in wanted and member.name.split("/", 1)[-1] == MODELS_DIR + base:
                with tar.extractfile(member) as src, open(os.path.join(dest, base), "wb") as dst:
                    dst.write(src.read())
                out[base] = os.path.join(dest, base)
    missing = wanted - set(out)
    if missing:
        raise FileNotFoundError(f"{sdist} lacks {sorted(missing)}")
    return out


def gguf_tokenizer_fields(path: str) -> dict:
    """The ``tokenizer.ggml.*`` metadata of a vocab-only GGUF, as Python values."""
    from gguf import GGUFReader

    fields = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer.ggml.") or key in ("general.name", "llama.context_length"):
            fields[key] = field.contents()
    return fields


def read_vectors(inp_path: str, out_path: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: texts separated by ``__ggml_vocab_test__`` lines, and one line of
    expected ids (no BOS; made with the Hub's tokenizer, ``add_special_tokens=False``) per text."""
    with open(inp_path, encoding="utf-8") as f:
        texts = f.read().split(VECTOR_SEPARATOR)
    with open(out_path, encoding="utf-8") as f:
        expected = f.read().split("\n")
    if texts and texts[-1] == "" and expected and expected[-1] == "":  # the files end with a separator/newline
        texts, expected = texts[:-1], expected[:-1]
    assert len(texts) == len(expected), (inp_path, len(texts), len(expected))
    return [(t, [int(x) for x in e.split()]) for t, e in zip(texts, expected)]


def check_vectors(encode, vectors: list[tuple[str, list[int]]]) -> dict:
    """How many of llama.cpp's vectors ``encode`` (text -> ids, no special tokens) reproduces; the
    ones it does not, with whether they start with whitespace (the one known v5 difference)."""
    bad = [(i, text) for i, (text, ids) in enumerate(vectors) if encode(text) != ids]
    return {"vectors": len(vectors), "agree": len(vectors) - len(bad),
            "disagree": [{"index": i, "text": text[:40], "starts_with_whitespace": text[:1].isspace()}
                         for i, text in bad]}


# ---------------------------------------------------------------------------------------------
# Llama-2


# Meta's LLaMA tokenizer.model (shipped unchanged with Llama-2: tokenizer_checklist.chk's md5, the Hub's sha256)
META_TOKENIZER_MODEL = {"bytes": 499723, "md5": "eeec4125e9c7560836b4873b6f8e3025",
                        "sha256": "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"}


def build_llama_model(fields: dict, path: str) -> dict:
    """Meta's ``tokenizer.model`` rebuilt: a SentencePiece ModelProto with the GGUF's pieces, scores
    and types (GGUF's type codes are SentencePiece's: 1 normal, 2 unknown, 3 control, 6 byte) and
    the trainer and normalizer specs as Meta's file prints them (BPE, byte fallback, digits split,
    whitespace-only pieces allowed, unk/bos/eos 0/1/2, no pad; identity normalization with a dummy
    prefix and extra whitespace kept). Fields are set exactly where Meta's file sets them (a piece's
    type only when not NORMAL), so the bytes can be, and are, checked against Meta's file's hashes:
    that proves the pieces, scores, types and settings, not just the tokenization of some texts.
    Returns the file's path, size and hashes, and whether they match."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == 32000
    assert (fields["tokenizer.ggml.unknown_token_id"], fields["tokenizer.ggml.bos_token_id"],
            fields["tokenizer.ggml.eos_token_id"]) == (0, 1, 2)
    m = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        if kind != pb.ModelProto.SentencePiece.NORMAL:
            p.type = kind
    t = m.trainer_spec  # in field order; strings as in Meta's file (they only describe its training run)
    t.input.append("/large_experiments/theorem/datasets/MERGED/all.test1.merged")
    t.model_prefix = "spm_model_32k_200M_charcov099995_allowWSO__v2"
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = 32000
    t.self_test_sample_size = 0
    t.input_format = "text"
    t.character_coverage = 0.99995
    t.input_sentence_size = 200000000
    t.seed_sentencepiece_size = 1000000
    t.shrinking_factor = 0.75
    t.num_threads = 80
    t.num_sub_iterations = 2
    t.max_sentence_length = 4192
    t.shuffle_input_sentence = True
    t.max_sentencepiece_length = 16
    t.split_by_unicode_script = t.split_by_whitespace = t.split_by_number = True
    t.treat_whitespace_as_suffix = False
    t.split_digits = t.allow_whitespace_only_pieces = True
    t.vocabulary_output_piece_score = t.hard_vocab_limit = True
    t.use_all_vocab = False
    t.byte_fallback = True
    t.required_chars = ""
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_surface = " \u2047 "
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.train_extremely_large_corpus = t.enable_differential_privacy = False
    t.differential_privacy_noise_level = 0
    t.differential_privacy_clipping_threshold = 0
    n = m.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.normalization_rule_tsv = ""
    data = m.SerializeToString()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    got = {"bytes": len(data), "md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    return {"path": path, **got, "byte_identical_to_meta_tokenizer_model": got == META_TOKENIZER_MODEL}


def _special_splitter(specials: list[str]):
    """Split text on special-token strings, keeping them, as transformers' slow tokenizers do
    (their added-token trie) before the model sees the pieces between. With these tokens' AddedToken
    settings (lstrip/rstrip false) nothing around them is stripped."""
    pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
    return lambda text: [chunk for chunk in pattern.split(text) if chunk]


class LlamaSlow:
    """transformers 4.x ``LlamaTokenizer`` (legacy): split on <unk>/<s>/</s>, ``sp.encode`` each
    chunk between (SentencePiece adds its dummy-prefix space to each), BOS first.

    Non-legacy 4.x differs only for text that follows a special token or contains U+2581; the
    shared rows have neither (the only special token is the EOS that ends each text; counted in
    the results)."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
        self.split = _special_splitter(list(self.specials))
        self.bos = 1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [self.bos] if bos else []
        for chunk in self.split(text):
            ids.extend([self.specials[chunk]] if chunk in self.specials else self.sp.encode(chunk))
        return ids


class _ScoreOrderedExtractor:
    """transformers 5.19's ``SpmConverter.tokenizer`` calls ``SentencePieceExtractor.extract`` with
    the (piece, score) list where that method now expects a model class, and fails for every BPE
    model. This stands in for the extractor the converter was written against (transformers 4.x's):
    the vocab in piece order and the merges ordered by the merged piece's score, highest first, from
    transformers' own ``generate_merges``. The ordering matters for LLaMA: its whitespace-run pieces
    (``▁▁`` ...) have score -1e9, so they merge last, as in SentencePiece."""

    def __init__(self, model_file: str):
        self.model_file = model_file

    def extract(self, vocab_scores):
        from transformers.tokenization_utils_base import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(vocab_scores)}
        return vocab, generate_merges(vocab, vocab_scores)


LLAMA2_TOKENIZER_CONFIG = {  # meta-llama/Llama-2-7b-hf's tokenizer_config.json (what AutoTokenizer reads)
    "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
    "model_max_length": 1000000000000000019884624838656, "pad_token": None, "padding_side": "right",
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    **{key: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False}
       for key, content in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))},
}


def build_llama_fast(model_path: str, folder: str) -> str:
    """``tokenizer.json`` from ``LlamaConverter`` (legacy, as the Hub's Llama-2 file was made:
    normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, byte-fallback BPE; BOS added by a
    template post-processor, as ``LlamaTokenizerFast.update_post_processor`` set it), and Llama-2's
    tokenizer_config.json beside it."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import LlamaConverter

    class Converter(LlamaConverter):
        SpmExtractor = _ScoreOrderedExtractor

    class Original:  # the few attributes LlamaConverter reads from a slow LlamaTokenizer
        vocab_file, legacy, add_prefix_space = model_path, True, True

        @staticmethod
        def convert_ids_to_tokens(i):
            return ["<unk>", "<s>", "</s>"][i]

    tok = Converter(Original()).converted()
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(LLAMA2_TOKENIZER_CONFIG, f, indent=1)
    return folder


# ---------------------------------------------------------------------------------------------
# OPT (GPT-2's BPE)


OPT_TOKENIZER_CONFIG = {  # facebook/opt-350m's tokenizer_config.json, plus the class its config.json implies
    "add_bos_token": True, "add_prefix_space": False, "errors": "replace",
    "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": "GPT2Tokenizer",
    **{key: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
             "single_word": False}
       for key, content in (("bos_token", "</s>"), ("eos_token", "</s>"), ("unk_token", "</s>"),
                            ("pad_token", "<pad>"))},
}


def build_opt_files(fields: dict, folder: str) -> str:
    """vocab.json (the GGUF's token strings at GPT-2's ids, then OPT's four specials) and
    merges.txt (the GGUF's 50,000 merges, in order, under the usual ``#version`` line)."""
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert len(tokens) == 50257 and len(merges) == 50000
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    for s in OPT_SPECIALS:
        assert s not in vocab
        vocab[s] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(OPT_TOKENIZER_CONFIG, f, indent=1)
    return folder


class OptSlow:
    """The slow GPT-2 BPE that transformers 5 still ships (``ClvpTokenizer``: GPT-2's regex
    pre-tokenizer, byte-to-unicode map and merge loop, on the PythonBackend that splits off added
    tokens first) with CLVP's English normalizer replaced by the identity; ``</s>`` first, as OPT's
    ``add_bos_token`` does."""

    def __init__(self, folder: str):
        from transformers.models.clvp.tokenization_clvp import ClvpTokenizer

        self.tok = ClvpTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                 unk_token="</s>", bos_token="</s>", eos_token="</s>", pad_token="<pad>")
        self.tok._normalizer = lambda text: text  # CLVP spells out numbers etc.; GPT-2 does not
        # Only </s> and <pad> are special, as in OPT's special_tokens_map (<s> and <unk> are plain vocab entries there).
        self.bos = self.tok.encoder["</s>"]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos] if bos else []) + self.tok.convert_tokens_to_ids(self.tok.tokenize(text))


# ---------------------------------------------------------------------------------------------
# Step 2: labels on the shared rows


def _fast_encoder(tok, bos: int | None = None):
    """texts -> (ids, offsets) lists, special tokens added: a transformers tokenizer (``is_fast``) or
    a bare ``tokenizers.Tokenizer``. With ``bos``, a BOS (offsets (0, 0)) is put first where the
    tokenizer left it out (transformers 5's GGUF loader ignores the GGUF's add_bos_token)."""
    if hasattr(tok, "encode_batch"):
        def encode_all(texts):
            encs = tok.encode_batch(texts)
            return [e.ids for e in encs], [e.offsets for e in encs]
    else:
        def encode_all(texts):
            enc = tok(texts, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
            return enc["input_ids"], enc["offset_mapping"]
    if bos is None:
        return encode_all

    def encode(texts):
        ids, offsets = encode_all(texts)
        missing = [i for i, x in enumerate(ids) if x[:1] != [bos]]
        for i in missing:
            ids[i], offsets[i] = [bos] + list(ids[i]), [(0, 0)] + list(offsets[i])
        return ids, offsets
    return encode


def by_length(ids: list[int], prompt_ids: list[int]) -> list[int]:
    """The authors' (Alpaca) rule: mask the first len(tokenize(prompt)) tokens."""
    return [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + list(ids[len(prompt_ids):])


def by_offsets(ids: list[int], offsets, prompt: str) -> list[int]:
    """rayapp's rule (tokenize_pairs, fast branch; benchmarks/fidelity.py's boundary_and_empty):
    mask tokens that start inside the prompt and zero-width ones (BOS)."""
    return [IGNORE_INDEX if (s < len(prompt) or s == e == 0) else t for t, (s, e) in zip(ids, offsets)]


def _differing(x: list[int], y: list[int]) -> int:
    return sum(a != b for a, b in zip(x, y)) + abs(len(x) - len(y))


def _first_difference(x: list[int], y: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))


def _digest(ids) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()


def compare_family(slow, fasts: dict, piece, rows: list[dict], eos: str, max_length: int,
                   examples: int = 3, hashes: dict | None = None) -> dict:
    """(a) slow + length rule, and per fast tokenizer (b) offsets rule and (c) length rule, on
    every row; counts of rows/tokens that differ and of rows left without response tokens."""
    from rayapp.config import TemplateConfig
    from rayapp.core.template import PromptFormatter

    fmt = PromptFormatter(TemplateConfig())
    prompts = [fmt.prompt(r["instruction"], r.get("input", "")) for r in rows]
    texts = [p + fmt.response(r["output"], eos) for p, r in zip(prompts, rows)]
    t0 = time.time()
    slow_full = [slow.encode(t) for t in texts]
    slow_prompt = [slow.encode(p) for p in prompts]
    a = [by_length(ids, pids) for ids, pids in zip(slow_full, slow_prompt)]
    seconds = {"slow": round(time.time() - t0, 1)}
    if hashes is not None:  # for the transformers 4.x cross-check
        hashes["slow"] = {"texts": [_digest(x) for x in slow_full], "prompts": [_digest(x) for x in slow_prompt]}
    empty = lambda labels: all(x == IGNORE_INDEX for x in labels[:max_length])  # noqa: E731
    out = {"rows": len(rows), "no_response_tokens_at_max_length": {"a_slow_length_rule": sum(map(empty, a))},
           "max_length": max_length, "fast": {}}
    for name, tok in fasts.items():
        t0 = time.time()
        encode = _fast_encoder(*tok) if isinstance(tok, tuple) else _fast_encoder(tok)
        full, offsets = encode(texts)
        alone, _ = encode(prompts)
        seconds[name] = round(time.time() - t0, 1)
        if hashes is not None:
            hashes[name] = {"texts": [_digest(x) for x in full], "prompts": [_digest(x) for x in alone]}
        b = [by_offsets(ids, offs, p) for ids, offs, p in zip(full, offsets, prompts)]
        c = [by_length(ids, pids) for ids, pids in zip(full, alone)]
        res = {"bos_added_here": isinstance(tok, tuple),
               "bos_first_in_every_row": all(ids[:1] == s[:1] for ids, s in zip(full, slow_full)),
               "full_sequences_differ_slow_vs_fast": sum(x != y for x, y in zip(slow_full, full)),
               "prompt_sequences_differ_slow_vs_fast": sum(x != y for x, y in zip(slow_prompt, alone))}
        for pair, (x, y) in {"a_vs_b": (a, b), "a_vs_c": (a, c), "c_vs_b": (c, b)}.items():
            rows_differ = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
            res[pair] = {"rows_differ": len(rows_differ),
                         "tokens_differ": sum(_differing(x[i], y[i]) for i in rows_differ),
                         "labelled_tokens_differ_as_sequences": sum(
                             [t for t in x[i] if t != IGNORE_INDEX] != [t for t in y[i] if t != IGNORE_INDEX]
                             for i in rows_differ)}
            shown = []
            for i in rows_differ[:examples]:
                at = _first_difference(x[i], y[i])
                window = slice(max(0, at - 3), at + 4)
                ids_x = slow_full[i] if pair[0] == "a" else full[i]
                ids_y = full[i]
                shown.append({"row": i, "position": at,
                              "text_at_boundary": prompts[i][-25:] + " | " + texts[i][len(prompts[i]):][:25],
                              "tokens_" + pair[0]: [piece(t) for t in ids_x[window]],
                              "labels_" + pair[0]: [t if t == IGNORE_INDEX else piece(t) for t in x[i][window]],
                              "tokens_" + pair[-1]: [piece(t) for t in ids_y[window]],
                              "labels_" + pair[-1]: [t if t == IGNORE_INDEX else piece(t) for t in y[i][window]]})
            if shown:
                res[pair]["examples"] = shown
        out["no_response_tokens_at_max_length"][f"b_{name}_offsets"] = sum(map(empty, b))
        out["no_response_tokens_at_max_length"][f"c_{name}_length_rule"] = sum(map(empty, c))
        out["fast"][name] = res
        print(f"[slow-tokenizers]   {name}: " + json.dumps({k: (v if not isinstance(v, dict) else
                                                                {kk: vv for kk, vv in v.items() if kk != "examples"})
                                                                for k, v in res.items()}), flush=True)
    out["seconds"] = seconds
    return out


def _text_conditions(rows: list[dict], specials: list[str]) -> dict:
    """Counts behind the legacy/AddedToken caveats: special-token strings and U+2581 inside the
    rows' own text, and outputs ending in whitespace (old transformers stripped it before a
    special token given as a plain string)."""
    text = lambda r: r["instruction"] + r.get("input", "") + r["output"]  # noqa: E731
    return {"rows_with_special_token_strings": sum(any(s in text(r) for s in specials) for r in rows),
            "rows_with_U+2581": sum("\u2581" in text(r) for r in rows),
            "outputs_ending_in_whitespace": sum(r["output"] != r["output"].rstrip() for r in rows),
            "outputs_starting_with_whitespace": sum(r["output"] != r["output"].lstrip() for r in rows)}


# ---------------------------------------------------------------------------------------------
# Optional: the authors' own classes. transformers 5 has no slow GPT2Tokenizer and its LlamaTokenizer
# is fast-only, so the slow paths above are stand-ins; given a Python with transformers 4.x,
# sentencepiece and protobuf (e.g. ``uv venv /tmp/tf4 && uv pip install --python /tmp/tf4/bin/python
# transformers==4.46.3 sentencepiece protobuf``), this runs 4.x's slow LlamaTokenizer (legacy and
# not), slow GPT2Tokenizer (OPT's settings) and the fast tokenizers 4.x converts from the same files,
# on the same texts, and compares token ids row by row (as digests).

_TRANSFORMERS4_SCRIPT = r"""
import hashlib, json, os, sys
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import transformers
from transformers import AutoTokenizer, GPT2Tokenizer, GPT2TokenizerFast, LlamaTokenizer, LlamaTokenizerFast
llama_model, opt_folder, texts_path, out_path = sys.argv[1:5]
digest = lambda ids: hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()
cfg = json.load(open(os.path.join(opt_folder, "tokenizer_config.json")))
special = {k: cfg[k]["content"] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
toks = {
    "llama2": {"slow_legacy": LlamaTokenizer(llama_model, legacy=True),
               "slow_nonlegacy": LlamaTokenizer(llama_model, legacy=False),
               # add_prefix_space=True: left as None, 4.4x's converter drops the Prepend("▁") the Hub's file has
               "fast_converted_legacy": LlamaTokenizerFast(vocab_file=llama_model, legacy=True, add_prefix_space=True,
                                                           from_slow=True)},
    "opt": {"slow": GPT2Tokenizer(os.path.join(opt_folder, "vocab.json"), os.path.join(opt_folder, "merges.txt"),
                                  add_bos_token=True, **special),
            "fast_converted": GPT2TokenizerFast(os.path.join(opt_folder, "vocab.json"),
                                                os.path.join(opt_folder, "merges.txt"), add_bos_token=True, **special)},
}
out = {"transformers": transformers.__version__,
       "classes": {f: {k: type(t).__name__ for k, t in v.items()} for f, v in toks.items()}}
data = json.load(open(texts_path))
for name, per_family in data.items():
    for family, kinds in per_family.items():
        for variant, tok in toks[family].items():
            out.setdefault(name, {}).setdefault(family, {})[variant] = {
                kind: [digest(tok(t)["input_ids"]) for t in texts] for kind, texts in kinds.items()}
json.dump(out, open(out_path, "w"))
"""


def cross_check_transformers4(python: str, llama_model: str, opt_folder: str, texts: dict, ours: dict,
                              work_dir: str) -> dict:
    """Rows whose token ids under transformers 4.x's classes differ from ours (``ours``: digests
    from ``compare_family``), per file, family and 4.x variant, against our slow path and our first
    fast one."""
    texts_path, out_path = os.path.join(work_dir, "texts.json"), os.path.join(work_dir, "transformers4.json")
    with open(texts_path, "w") as f:
        json.dump(texts, f)
    subprocess.run([python, "-c", _TRANSFORMERS4_SCRIPT, llama_model, opt_folder, texts_path, out_path], check=True)
    with open(out_path) as f:
        theirs = json.load(f)
    result = {"transformers": theirs.pop("transformers"), "classes": theirs.pop("classes")}
    for name, per_family in theirs.items():
        for family, variants in per_family.items():
            mine = ours[name][family]
            fast = next(k for k in mine if k != "slow")
            for variant, kinds in variants.items():
                against = "slow" if variant.startswith("slow") else fast
                result.setdefault(name, {}).setdefault(family, {})[variant] = {
                    "compared_with": against,
                    **{f"{kind}_rows_differ": sum(x != y for x, y in zip(digests, mine[against][kind]))
                       for kind, digests in kinds.items()}}
    return result


# ---------------------------------------------------------------------------------------------


def run(out_dir: str, sdist: str | None = None, work_dir: str | None = None, data_dir: str = SHARED,
        max_length: int = 512, transformers4_python: str | None = None) -> dict:
    """Steps 1-2; writes ``<out_dir>/fidelity-slow-tokenizers.json``. ``work_dir`` keeps the
    extracted and rebuilt files (default: a temporary folder). ``transformers4_python``: a Python
    with transformers 4.x to cross-check against the authors' own classes (optional)."""
    # One core: the batch encoders would otherwise use every core, and the numbers do not depend on it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gguf
    import sentencepiece
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    started = time.time()
    timings = {}
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="slow-tokenizers-")
        work_dir = tmp.name
    os.makedirs(work_dir, exist_ok=True)

    t0 = time.time()
    sdist = obtain_sdist(sdist, work_dir)
    files = extract_vocab_files(sdist, os.path.join(work_dir, "gguf"))
    timings["extract"] = round(time.time() - t0, 1)

    t0 = time.time()
    llama_fields = gguf_tokenizer_fields(files[GGUF["llama2"]])
    opt_fields = gguf_tokenizer_fields(files[GGUF["opt"]])
    llama_model_check = build_llama_model(llama_fields, os.path.join(work_dir, "llama2", "tokenizer.model"))
    llama_model = llama_model_check.pop("path")
    print(f"[slow-tokenizers] rebuilt tokenizer.model: {llama_model_check}", flush=True)
    llama_folder = build_llama_fast(llama_model, os.path.join(work_dir, "llama2"))
    opt_folder = build_opt_files(opt_fields, os.path.join(work_dir, "opt"))
    gguf_folder = os.path.dirname(files[GGUF["llama2"]])

    llama_slow = LlamaSlow(llama_model)
    llama_fast = {
        # what rayapp runs: transformers 5's AutoTokenizer on the Hub-style folder (it rebuilds the
        # pipeline as LlamaTokenizer: no normalizer, Metaspace(prepend_scheme="first"))
        "transformers5_autotokenizer": AutoTokenizer.from_pretrained(llama_folder),
        # the tokenizer.json's own pipeline, as transformers 4.x's LlamaTokenizerFast ran it
        "tokenizer_json_pipeline": tokenizers.Tokenizer.from_file(os.path.join(llama_folder, "tokenizer.json")),
        # transformers 5 reading the GGUF directly (it adds no BOS: put here, to compare the rest)
        "transformers5_gguf_file": (AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF["llama2"]), 1),
    }
    opt_slow = OptSlow(opt_folder)
    opt_fast = {"transformers5_autotokenizer": AutoTokenizer.from_pretrained(opt_folder)}
    timings["build"] = round(time.time() - t0, 1)

    def pipeline(tok) -> dict:
        tok = tok[0] if isinstance(tok, tuple) else tok
        backend = getattr(tok, "backend_tokenizer", tok)
        return {"class": type(tok).__name__, "normalizer": str(backend.normalizer),
                "pre_tokenizer": str(backend.pre_tokenizer), "post_processor": str(backend.post_processor)[:200]}

    # llama.cpp's vectors (made with the Hub tokenizers: Llama-2-7b-hf's tokenizer.json, GPT-2's files)
    t0 = time.time()
    llama_vectors = read_vectors(files[GGUF["llama2"] + ".inp"], files[GGUF["llama2"] + ".out"])
    opt_vectors = read_vectors(files[GGUF["opt"] + ".inp"], files[GGUF["opt"] + ".out"])
    def no_special(tok):  # text -> ids without BOS, as llama.cpp's vectors were made
        tok = tok[0] if isinstance(tok, tuple) else tok
        if hasattr(tok, "encode_batch"):
            return lambda s: tok.encode(s, add_special_tokens=False).ids
        return lambda s: tok(s, add_special_tokens=False)["input_ids"]
    vectors = {
        "llama2": {"slow_sentencepiece": check_vectors(lambda s: llama_slow.encode(s, bos=False), llama_vectors),
                   **{name: check_vectors(no_special(tok), llama_vectors) for name, tok in llama_fast.items()}},
        "opt": {"slow_python_bpe": check_vectors(lambda s: opt_slow.encode(s, bos=False), opt_vectors),
                **{name: check_vectors(no_special(tok), opt_vectors) for name, tok in opt_fast.items()}},
    }
    timings["vectors"] = round(time.time() - t0, 1)
    for family, checks in vectors.items():
        print(f"[slow-tokenizers] llama.cpp vectors, {family}: "
              + ", ".join(f"{k} {v['agree']}/{v['vectors']}" for k, v in checks.items()), flush=True)

    llama_piece = llama_slow.sp.id_to_piece
    opt_inverse = {i: t for t, i in opt_slow.tok.encoder.items()}
    families = {"llama2": (llama_slow, llama_fast, llama_piece, "</s>"),
                "opt": (opt_slow, opt_fast, opt_inverse.get, "</s>")}
    comparison, digests, texts = {}, {}, {}
    from rayapp.config import TemplateConfig
    from rayapp.core.template import PromptFormatter

    fmt = PromptFormatter(TemplateConfig())
    for name in ("alpaca-43k", "dolly-15k"):
        rows = _rows(os.path.join(data_dir, f"{name}.jsonl"))
        specials = ["<s>", "</s>", "<unk>", "<pad>", "<|endoftext|>"]
        comparison[name] = {"text_conditions": _text_conditions(rows, specials)}
        for family, (slow, fasts, piece, eos) in families.items():
            print(f"[slow-tokenizers] {name}, {family} ({len(rows)} rows)", flush=True)
            t0 = time.time()
            hashes = digests.setdefault(name, {}).setdefault(family, {})
            comparison[name][family] = compare_family(slow, fasts, piece, rows, eos, max_length, hashes=hashes)
            timings[f"{name}/{family}"] = round(time.time() - t0, 1)
            prompts = [fmt.prompt(r["instruction"], r.get("input", "")) for r in rows]
            texts.setdefault(name, {})[family] = {
                "prompts": prompts, "texts": [p + fmt.response(r["output"], eos) for p, r in zip(prompts, rows)]}
    transformers4 = None
    if transformers4_python:
        print(f"[slow-tokenizers] cross-check with {transformers4_python}", flush=True)
        t0 = time.time()
        transformers4 = cross_check_transformers4(transformers4_python, llama_model, opt_folder, texts, digests,
                                                  work_dir)
        timings["transformers4_cross_check"] = round(time.time() - t0, 1)
        print(f"[slow-tokenizers] transformers 4.x: {json.dumps(transformers4)}", flush=True)

    rebuilt = {os.path.relpath(p, work_dir): _sha256(p) for p in (
        llama_model, os.path.join(llama_folder, "tokenizer.json"),
        os.path.join(opt_folder, "vocab.json"), os.path.join(opt_folder, "merges.txt"))}
    timings["total"] = round(time.time() - started, 1)
    result = {
        "what": "slow (authors': use_fast=False) against fast (rayapp's) tokenizers for Llama-2 and OPT, rebuilt from "
                "llama.cpp's vocab GGUFs; labels by the Alpaca len(tokenize(prompt)) rule and by rayapp's offsets",
        "rules": {"a": "slow tokenizer, authors' length rule", "b": "fast tokenizer, rayapp's offsets rule",
                  "c": "fast tokenizer, authors' length rule"},
        "source": {"package": PACKAGE, "version": VERSION, "sdist": os.path.basename(sdist),
                   "sdist_sha256": _sha256(sdist),
                   "files": {name: {"member": MODELS_DIR + name, "sha256": _sha256(path)}
                             for name, path in sorted(files.items())},
                   "gguf_general_name": {"llama2": llama_fields.get("general.name"),
                                         "opt": opt_fields.get("general.name")},
                   "llama_gguf_context_length": llama_fields.get("llama.context_length")},
        "rebuilt_sha256": rebuilt,
        "llama2_tokenizer_model": {**llama_model_check, "expected": META_TOKENIZER_MODEL},
        "tokenizers_used": {"llama2": {"slow": "sentencepiece.SentencePieceProcessor on the rebuilt tokenizer.model, "
                                               "split on special tokens, BOS first (transformers 4.x LlamaTokenizer, "
                                               "legacy)",
                                       **{k: pipeline(v) for k, v in llama_fast.items()}},
                            "opt": {"slow": "transformers ClvpTokenizer (GPT-2's python BPE) with identity normalizer, "
                                            "</s> first",
                                    **{k: pipeline(v) for k, v in opt_fast.items()}}},
        "llama_cpp_vectors": vectors,
        "comparison": comparison,
        "transformers4_cross_check": transformers4,
        "versions": {"python": platform.python_version(), "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "sentencepiece": sentencepiece.__version__,
                     "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf")},
        "machine": f"{os.cpu_count()} CPU cores (run on one)",
        "seconds": timings,
    }
    write_results(out_dir, "fidelity-slow-tokenizers", result, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return result


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sdist", help=f"a downloaded {SDIST_NAME} (otherwise pip downloads it)")
    parser.add_argument("--work-dir", help="keep the extracted and rebuilt files here")
    parser.add_argument("--transformers4-python", help="a Python with transformers 4.x, sentencepiece and protobuf: "
                        "also compare with the authors' own (4.x) tokenizer classes")
    args = parser.parse_args()
    run(args.out, args.sdist, args.work_dir, transformers4_python=args.transformers4_python)
