"""Paper scale on a CPU: real shapes on the meta device, sharded loading on 2 gloo ranks, scoring
memory bounded by response tokens, object-store resume once per node, and `rayapp plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayapp.config import load_config
from rayapp.ml.models import tiny
from rayapp.ml.models.loading import load_causal_lm
from rayapp.ml.models.losses import batch_losses, full_logits_losses, pad_batch
from rayapp.ops.plan.shapes import bundled_config, model_shape
from rayapp.testing.fsdp_probes import shard_on_meta, sharded_load, train_steps
from rayapp.testing.gloo import run_gloo
from tests.conftest import alpaca_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ["configs/paper-opt350m-to-13b.yaml", "configs/paper-llama2-7b-to-13b.yaml"]


def _tiny_llama(folder, tie=True, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, tie_word_embeddings=tie)).save_pretrained(folder)
    return str(folder)


def _tiny_opt(folder):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)  # word_embed_proj_dim != hidden: project_in/out, tied embeddings
    OPTForCausalLM(OPTConfig(vocab_size=301, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                             word_embed_proj_dim=16, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def _tiny_gemma3(folder):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)  # a soft-capped output layer; a cap of 1 changes every logit a lot
    Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                                       final_logit_softcapping=1.0)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", ["facebook/opt-13b", "meta-llama/Llama-2-13b-hf"])
@pytest.mark.extended  # ~20 s each; CI's 30-minute budget (make test-extended)
def test_13b_models_shard_on_the_meta_device_without_a_full_copy(name):
    results = run_gloo(shard_on_meta, 2, bundled_config(name))
    total = results[0]["total_bytes"]
    assert total > 4 * 12.8e9  # fp32 bytes of a ~13B model: the real shape, real vocabulary
    for r in results:
        assert r["all_on_meta"]  # nothing materialised
        assert abs(r["local_bytes"] - total / 2) / total < 0.01  # each rank holds its half
        assert r["peak_rss_bytes"] < 2e9  # a full fp32 copy would be 52 GB
    assert sum(r["local_bytes"] for r in results) >= total


@pytest.mark.slow
def test_sharded_load_equals_from_pretrained_on_every_rank(tmp_path):
    for folder in (_tiny_llama(tmp_path / "llama"), _tiny_opt(tmp_path / "opt")):
        want = load_causal_lm(folder, dtype=torch.float32).state_dict()
        results = run_gloo(sharded_load, 2, folder)
        for r in results:
            assert set(r["state"]) == set(want)
            for k, v in want.items():
                np.testing.assert_array_equal(r["state"][k], v.numpy(), err_msg=k)
        # each rank read only its own rows: about half the checkpoint
        file_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        assert all(r["bytes_read"] < 0.6 * file_bytes for r in results)


@pytest.mark.slow
def test_training_from_the_sharded_load_matches_the_full_load(tmp_path):
    """Same weights (fp32, CPU) after the same steps, with per-step gradient sync (accumulation 2)."""
    tok = tmp_path / "tok"
    texts = [r["instruction"] + " " + r["output"] for r in alpaca_rows(64)]
    tiny.train_tokenizer(texts, 400, str(tok))
    from rayapp.config import TinyModelConfig

    model_dir = str(tmp_path / "model")
    tiny.build_model(str(tok), TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4), model_dir, 128)
    rng = np.random.default_rng(0)
    ids = [rng.integers(4, 390, size=n).tolist() for n in rng.integers(12, 40, size=16)]
    labels = [[-100] * (len(s) // 2) + s[len(s) // 2:] for s in ids]
    rows = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"input_ids": ids, "labels": labels}), rows)
    new = run_gloo(train_steps, 2, model_dir, rows, str(tmp_path / "a"), True)
    old = run_gloo(train_steps, 2, model_dir, rows, str(tmp_path / "b"), False)
    assert new[0]["steps"] == old[0]["steps"] == 2 and new[0]["deferred_sync"]
    start = load_causal_lm(model_dir, dtype=torch.float32).state_dict()
    for k, v in old[0]["state"].items():
        np.testing.assert_array_equal(new[0]["state"][k], v, err_msg=k)
    assert any(not np.array_equal(v, start[k].numpy()) for k, v in new[0]["state"].items())  # it trained


@pytest.mark.extended  # ~55 s; CI's 30-minute budget (make test-extended)
def test_collectives_per_step_at_the_presets_depths():
    """FSDP2's collectives in one optimizer step on 2 gloo ranks, at the presets' depths and
    accumulation (tiny widths: the counts depend only on the units and micro-batches).

    The OPT-350M reference (24 decoder layers and the root: 25 units; 8 micro-batches; on a 24 GB
    A10G the policy defers the gradient sync and keeps the weights gathered): 400 all-gathers a
    step by FSDP2's default (every unit for every micro-batch's forward and again for its
    backward), 25 kept gathered; 25 reduce-scatters either way. The 13B target (40 layers; 4
    micro-batches; on a 40 GB A100 neither fits): 328 all-gathers and 164 reduce-scatters a step
    with one forward per micro-batch; 164 and 82 with two micro-batches packed into each forward,
    as the plan chooses for it (test_plan_merges_the_presets_micro_batches); 82 and 41 with all
    four in one. The weights after the step depend on none of these."""
    from rayapp.ml.train.policy import defer_gradient_sync, keep_weights_gathered
    from rayapp.testing.fsdp_probes import collectives_per_step

    a10g, a100 = 24 * 2**30, 40 * 2**30
    assert keep_weights_gathered(331_000_000, a10g, True, True) and defer_gradient_sync("auto", 331_000_000, a10g, True)
    assert not keep_weights_gathered(12_900_000_000, a100, True, True)
    assert not defer_gradient_sync("auto", 12_900_000_000, a100, True)

    def opt(layers):
        return dict(model_type="opt", vocab_size=97, hidden_size=16, ffn_dim=32, word_embed_proj_dim=16,
                    num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=64)

    ranks = run_gloo(collectives_per_step, 2, [(opt(24), False, 8, True), (opt(24), True, 8, True),
                                               (opt(40), False, 4, False), (opt(40), False, 4, False, 2),
                                               (opt(40), False, 4, False, 4)])
    for default, kept, target, two, one in ranks:
        assert (default["all_gathers"], default["reduce_scatters"]) == (400, 25)
        assert (kept["all_gathers"], kept["reduce_scatters"]) == (25, 25)
        assert (target["all_gathers"], target["reduce_scatters"]) == (328, 164)
        # micro_batches_per_forward: 2 (the plan's choice for the 13B presets on 40 GB A100s): two
        # forwards of 41 units; 4 (on a larger GPU): one
        assert (two["all_gathers"], two["reduce_scatters"]) == (164, 82)
        assert (one["all_gathers"], one["reduce_scatters"]) == (82, 41)
        for k, v in default["state"].items():
            np.testing.assert_allclose(kept["state"][k], v, rtol=1e-6, atol=1e-7, err_msg=k)
        # AdamW's first step is ~lr x sign(gradient): elements whose gradient is near 0 move by up
        # to ~1e-5 on rounding alone; a wrongly weighted or misplaced token flips signs (2e-3 apart)
        for k, v in target["state"].items():
            np.testing.assert_allclose(two["state"][k], v, rtol=1e-5, atol=5e-5, err_msg=k)
            np.testing.assert_allclose(one["state"][k], v, rtol=1e-5, atol=5e-5, err_msg=k)


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_opt, _tiny_gemma3])
def test_bounded_loss_equals_full_logits_per_row(tmp_path, build):
    from rayapp.ml.models.losses import _base_and_head

    model = load_causal_lm(build(tmp_path / "m"), dtype=torch.float32).eval()
    assert _base_and_head(model) is not None  # the bounded path, not the full-logits fallback
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 300, size=n).tolist() for n in (30, 50, 7, 60, 1)]
    labs = [[-100] * (len(s) // 3) + s[len(s) // 3:] for s in seqs]
    labs[2] = [-100] * 7  # no response tokens
    ids, labels, mask = pad_batch(seqs, labs, 0)
    got, want = batch_losses(model, ids, labels, mask), full_logits_losses(model, ids, labels, mask)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[0][2] == 0 and (got[1] == want[1]).all()
    # chunks smaller than the scored positions give the same numbers
    import rayapp.ml.models.losses as losses

    saved = losses.LOGIT_CHUNK_FLOATS
    losses.LOGIT_CHUNK_FLOATS = 301 * 5
    try:
        np.testing.assert_allclose(batch_losses(model, ids, labels, mask)[0], want[0], rtol=1e-6, atol=1e-6)
    finally:
        losses.LOGIT_CHUNK_FLOATS = saved


def test_paper_model_shapes_are_the_published_sizes():
    counts = {name: model_shape(name).params for name in
              ("facebook/opt-350m", "facebook/opt-1.3b", "facebook/opt-13b", "meta-llama/Llama-2-7b-hf",
               "meta-llama/Llama-2-13b-hf")}
    assert round(counts["facebook/opt-350m"] / 1e6) == 331
    assert round(counts["facebook/opt-1.3b"] / 1e8) == 13
    assert round(counts["facebook/opt-13b"] / 1e8) == 129
    assert round(counts["meta-llama/Llama-2-7b-hf"] / 1e8) == 67
    assert round(counts["meta-llama/Llama-2-13b-hf"] / 1e8) == 130


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "rayapp", "plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_plan_passes_both_paper_presets_on_their_node_types():
    from rayapp.ops.plan.check import FITS
    from rayapp.pipeline import memory_plans as plan_config

    for preset in PRESETS:
        plans = plan_config(load_config(os.path.join(REPO, preset)))
        assert [p.stage for p in plans] == ["reference", "score", "finetune", "evaluate"]
        assert all(p.verdict == FITS for p in plans), [(p.stage, p.verdict) for p in plans]
        finetune = plans[2]
        assert finetune.have == int(39.4 * 2**30) and 0.5 * finetune.have < finetune.need < finetune.have
        # a 40 GB A100 cannot keep a 13B model's unsharded fp32 gradients: per-micro-batch sync
        assert not any("no-sync" in k for k in finetune.parts)
        # nor its whole bf16 copy gathered through a step; the small reference keeps its own
        assert "gathered units" in finetune.parts
        reference = plans[0]
        kept = "gathered weights (kept through the step)" in reference.parts
        assert kept == (reference.shape.params < 1e9), (preset, reference.parts)


def test_plan_merges_the_presets_micro_batches():
    """micro_batches_per_forward: auto. The plan packs as many of a step's micro-batches into one
    forward as leave a tenth of the GPU free at max-length rows (a divisor of the accumulation
    steps); the stages hand the workers that number. CPU workers and unknown GPUs keep one forward
    per micro-batch; a set number is capped at the step's micro-batches."""
    from rayapp.ops.plan.check import AUTO_MERGE_HEADROOM, plan_training, planned_training, role_shape

    chosen = {}
    for preset in PRESETS:
        cfg = load_config(os.path.join(REPO, preset))
        for stage, tc, role in (("reference", cfg.reference, "reference"), ("finetune", cfg.finetune, "target")):
            plan = plan_training(cfg, stage, tc, role_shape(cfg, role))
            chosen[preset, stage] = plan.micro_batches_per_forward
            assert plan.need <= (1 - AUTO_MERGE_HEADROOM) * plan.have
            if plan.micro_batches_per_forward < tc.gradient_accumulation_steps:  # one more would not leave it
                more = tc.model_copy(update={"micro_batches_per_forward": 2 * plan.micro_batches_per_forward})
                assert plan_training(cfg, stage, more, role_shape(cfg, role)).need > \
                    (1 - AUTO_MERGE_HEADROOM) * plan.have
    # OPT-350M on 24 GB A10Gs: all 8 in one forward; the 13B targets on 40 GB A100s: 2 of their 4;
    # Llama-2-7B as the reference on A100s (no activation checkpointing): 1
    assert chosen == {(PRESETS[0], "reference"): 8, (PRESETS[0], "finetune"): 2,
                      (PRESETS[1], "reference"): 1, (PRESETS[1], "finetune"): 2}
    cfg = load_config(os.path.join(REPO, PRESETS[0]))
    finetune = plan_training(cfg, "finetune", cfg.finetune, role_shape(cfg, "target"))
    assert "loss (fused, one chunk of logits)" in finetune.parts and "logits" not in finetune.parts
    assert planned_training(cfg, "finetune", cfg.finetune, "target").micro_batches_per_forward == 2
    # (setting, the plan's number, what the workers are handed: a set number as set, the worker caps it)
    for update, planned, handed in [({"use_gpu": False}, 1, 1), ({"micro_batches_per_forward": 16}, 4, 16),
                                    ({"micro_batches_per_forward": 2}, 2, 2), ({"packing": False}, 1, 1)]:
        tc = cfg.finetune.model_copy(update=update)
        assert plan_training(cfg, "finetune", tc, role_shape(cfg, "target")).micro_batches_per_forward == planned
        assert planned_training(cfg, "finetune", tc, "target").micro_batches_per_forward == handed


@pytest.mark.extended  # ~35 s; CI's 30-minute budget (make test-extended)
def test_plan_fails_an_infeasible_config_with_a_suggestion():
    proc = _plan("-c", PRESETS[0], "--set", "finetune.num_workers=4", "--set", "finetune.accelerator_type=A10G")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("finetune: facebook/opt-13b needs"))
    assert "4-way FSDP" in line and "A10G has 22.3 GiB" in line and "GPUs (num_workers:" in line
    out = _plan("-c", PRESETS[0], "--json")
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["fits"] and {s["stage"] for s in doc["stages"]} == {"reference", "score", "finetune", "evaluate"}


OPT13B_ADAPTERS = 40 * 2 * 16 * (5120 + 5120)  # 40 layers x (q_proj, v_proj) x r x (in + out)


@pytest.mark.extended  # ~80 s on 2 cores: `make test-extended`
def test_lora_shards_a_13b_bf16_base_on_the_meta_device():
    """finetune.lora at paper scale: PEFT wraps OPT-13B on the meta device, FSDP2 shards the frozen
    bf16 base with the fp32 adapters, nothing materialised."""
    pytest.importorskip("peft")
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": None, "export": "merged"}
    results = run_gloo(shard_on_meta, 2, bundled_config("facebook/opt-13b"), lora)
    adapters = OPT13B_ADAPTERS
    for r in results:
        assert r["all_on_meta"] and r["peak_rss_bytes"] < 2e9
        assert r["trainable_local_bytes"] == 4 * adapters // 2  # fp32 adapters, half on each rank
        assert abs(r["total_bytes"] - (2 * 12.85e9 + 2 * 4 * adapters)) < 0.01 * r["total_bytes"]  # bf16 base
        assert abs(r["local_bytes"] - r["total_bytes"] / 2) / r["total_bytes"] < 0.01


def test_plan_fits_a_13b_lora_on_4_a10g_where_full_fine_tuning_needs_16_gpus():
    pytest.importorskip("peft")
    from rayapp.ops.plan.check import FITS, TOO_BIG
    from rayapp.pipeline import memory_plans as plan_config

    adapters = OPT13B_ADAPTERS
    four_a10g = ["finetune.num_workers=4", "finetune.resources_per_worker={gpu_4x: 1}"]
    full = plan_config(load_config(os.path.join(REPO, PRESETS[0]), four_a10g))[2]
    with_lora = plan_config(load_config(os.path.join(REPO, PRESETS[0]), four_a10g + ["finetune.lora={r: 16}"]))[2]
    assert full.verdict == TOO_BIG and "finetune.lora" in full.advice
    assert with_lora.verdict == FITS and with_lora.need < full.need / 4
    assert f"{adapters:,} adapter parameters" in with_lora.detail
    assert with_lora.parts["frozen base (bf16)"] == 2 * with_lora.shape.params // 4
    assert with_lora.parts["AdamW state (fp32)"] == 8 * adapters // 4


@pytest.mark.slow
def test_run_refuses_to_start_a_config_that_does_not_fit(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rayapp", "run", "-c", PRESETS[0], "--set",
                           f"output_dir={tmp_path}/out", "--set", "finetune.accelerator_type=T4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "will not fit" in proc.stderr and "finetune: facebook/opt-13b needs" in proc.stderr
    assert not os.path.exists(tmp_path / "out")  # nothing started


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_opt])
def test_nonzero_token_count_reproduces_the_papers_denominator(tmp_path, build):
    """score.token_count: nonzero counts, as the paper's torch.count_nonzero(loss) does, only the
    labelled tokens whose loss is not exactly 0; tokens the model is certain of drop out of the
    perplexity's denominator (the loss sum is the same)."""
    from rayapp.ml.models.losses import device_losses

    model = load_causal_lm(build(tmp_path / "m"), dtype=torch.float32).eval()
    certain = 7
    with torch.no_grad():  # make the model certain of one token: its loss is exactly 0 in fp32
        model.get_output_embeddings().weight[certain] *= 1e4
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias[certain] = 1e6
    seqs = [[5, 9, 11, certain, certain, 12, 13], [4, 6, 8, 10, 14, 15, 16]]
    labs = [[-100, -100, -100, certain, certain, 12, 13], [-100, -100, 8, 10, 14, 15, 16]]
    ids, labels, mask = pad_batch(seqs, labs, 0)
    s_all, n_all = device_losses(model, ids, labels, mask)
    s_nz, n_nz = device_losses(model, ids, labels, mask, count="nonzero")
    assert n_all.tolist() == [4, 5] and torch.equal(s_all, s_nz)
    assert int(n_nz[1]) == 5 and int(n_nz[0]) < 4  # the certain tokens drop out of row 0 only
