"""The fused loss (rayapp/ml/train/loss.py) and merged forwards (micro_batches_per_forward): the
model's own loss and gradients without its logits, and an optimizer step whose micro-batches share
forwards leaves the weights of the step that ran them one by one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rayapp.core.labels import IGNORE_INDEX
from rayapp.ml.models.losses import pad_batch
from rayapp.ml.train import loss as fused
from rayapp.ml.train.packing import PACKABLE_MODEL_TYPES, attention_inputs, pack_batch, pack_layout
from tests.test_packing import _loss_and_grads, _rows, _tiny


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", sorted(PACKABLE_MODEL_TYPES))
def test_the_fused_loss_is_the_models_own_loss_and_gradients(model_type):
    """Padded, fp32, a chunk of 5 positions so that every batch takes several chunks: the weighted
    sum with weights 1/(labelled tokens) is the model's mean loss, with the same gradients."""
    _check_against_the_models_own(_tiny(model_type, "sdpa"), [9, 23, 14, 31], chunk=5)


def _check_against_the_models_own(model, lengths: list[int], chunk: int) -> None:
    """The fused loss of a padded batch, weights 1/(labelled tokens), against the model's own loss:
    the same loss and the same gradients for every parameter."""
    seqs, labs = _rows(lengths)
    ids, labels, mask = pad_batch(seqs, labs, 0)
    own_loss, own = _loss_and_grads(model, {"input_ids": ids, "labels": labels, "attention_mask": mask})
    weights = torch.from_numpy(np.stack([np.pad(w, (0, ids.shape[1] - len(w)))
                                         for w in fused.token_weights(labs, 1.0)]).astype(np.float32))
    model.zero_grad(set_to_none=True)
    loss = fused.weighted_response_loss(model, ids, labels, weights, chunk=chunk, attention_mask=mask,
                                        use_cache=False)
    loss.backward()
    assert float(loss) == pytest.approx(own_loss, rel=1e-5)
    got = _grads(model)
    assert got.keys() == own.keys()
    for name in own:
        torch.testing.assert_close(got[name], own[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_soft_capped_head_and_a_frozen_output_layer():
    """Gemma's final soft cap is applied as its forward applies it; an output layer that does not
    train gets no gradient and costs no accumulator."""
    model = _tiny("gemma3_text", "eager")
    model.config.final_logit_softcapping = 3.0  # small, so the cap bends the logits
    _check_against_the_models_own(model, [12, 20], chunk=7)
    hidden = torch.randn(6, 8, requires_grad=True)
    frozen = torch.randn(11, 8)  # requires no grad
    out = fused.linear_cross_entropy(hidden, frozen, torch.arange(6), torch.full((6,), 0.5), chunk=4)
    out.backward()
    reference = torch.nn.functional.cross_entropy(hidden.detach() @ frozen.t(), torch.arange(6), reduction="sum") * 0.5
    assert float(out) == pytest.approx(float(reference), rel=1e-6)
    assert hidden.grad is not None and frozen.grad is None


@pytest.mark.parametrize("model_type", ["llama", "opt", "gpt2"])
def test_one_forward_of_merged_micro_batches_gives_the_accumulated_steps_gradients(model_type):
    """Three micro-batches of different sizes and token counts, each weighted 1/3 in the step: run
    one by one with the model's own loss, and packed into one forward with each token carrying
    its micro-batch's weight over its labelled tokens. Loss and gradients agree. Through
    ``install``, as the training recipe calls the model; without weights the forward is its own."""
    model = _tiny(model_type, "sdpa")
    groups = [_rows([9, 23], seed=1), _rows([31], seed=2), _rows([5, 14, 11], seed=3)]
    model.zero_grad(set_to_none=True)
    total = 0.0
    for seqs, labs in groups:
        ids, labels, mask = pad_batch(seqs, labs, 0)
        out = model(input_ids=ids, labels=labels, attention_mask=mask, use_cache=False)
        (out.loss / 3).backward()
        total += float(out.loss) / 3
    accumulated = _grads(model)

    merged = copy.deepcopy(model)
    fused.install(merged)
    seqs = [s for g in groups for s in g[0]]
    labs = [lab for g in groups for lab in g[1]]
    weights = [w for g in groups for w in fused.token_weights(g[1], 1 / 3)]
    rows = pack_layout([len(s) for s in seqs], "sdpa", 32, 2, 97)
    batch = pack_batch(seqs, labs, rows, 0, weights)
    batch.update(attention_inputs(merged.config, batch, torch.float32))
    batch.pop("num_tokens")
    merged.zero_grad(set_to_none=True)
    out = merged(**batch, use_cache=False)
    assert out.logits is None
    out.loss.backward()
    assert float(out.loss) == pytest.approx(total, rel=1e-5)
    for name, grad in _grads(merged).items():
        torch.testing.assert_close(grad, accumulated[name], rtol=1e-5, atol=1e-6, msg=name)
    ids, labels, mask = pad_batch(*groups[0], 0)
    plain = merged(input_ids=ids, attention_mask=mask, use_cache=False)
    assert plain.logits.shape == (*ids.shape, 97)


def test_token_weights_count_what_is_predicted():
    labs = [[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [7, 8, IGNORE_INDEX]]  # the second row's 7 is never predicted
    w = fused.token_weights(labs, 0.5)
    np.testing.assert_allclose(w[0], [0, 0, 0.5 / 3, 0.5 / 3])
    np.testing.assert_allclose(w[1], [0, 0.5 / 3, 0])


def _recipe(tmp_path, merge: int, fused_loss: bool = False, accum: int = 4, packing: bool = True,
            compile_layers: bool = False):
    """The training recipe (world size 1, in this process) on 16 rows of random lengths, its
    micro-batches of 2 rows, ``merge`` of them a forward."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.config import TinyModelConfig, TrainConfig
    from rayapp.ml.models import tiny
    from rayapp.ml.train.worker import FineTuneRecipe, WorkerConfig, WorkerEnv
    from tests.conftest import alpaca_rows

    model_dir, rows = tmp_path / "model", tmp_path / "rows.parquet"
    if not model_dir.exists():
        tok = str(tmp_path / "tok")
        tiny.train_tokenizer([r["instruction"] + " " + r["output"] for r in alpaca_rows(64)], 400, tok)
        tiny.build_model(tok, TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4), str(model_dir), 128)
        rng = np.random.default_rng(0)
        ids = [rng.integers(4, 390, size=n).tolist() for n in rng.integers(8, 60, size=16)]
        pq.write_table(pa.table({"input_ids": ids, "labels": [[-100] * (len(s) // 3) + s[len(s) // 3:] for s in ids]}),
                       str(rows))
    tc = TrainConfig(epochs=1, per_device_batch_size=2, gradient_accumulation_steps=accum, warmup_ratio=0.0,
                     fsdp=False, eval_rows=0, micro_batches_per_forward=merge, fused_loss=fused_loss,
                     packing=packing, compile_layers=compile_layers)
    cfg = WorkerConfig(stage="probe", train=tc, init_model=str(model_dir), tokenizer=str(model_dir), total_rows=16,
                       train_files=(str(rows),), work_dir=str(tmp_path / f"w{merge}{fused_loss}{packing}{compile_layers}"), staging_dir=None,
                       export_every_epoch=False, eval_file=None)
    recipe = FineTuneRecipe(cfg, WorkerEnv(rank=0, world=1, local_rank=0, distributed=False))
    recipe.setup_model()
    recipe.setup_data()
    return recipe


def _sgd_step(recipe, micro_rows, weights):
    """One step of ``optimizer_step`` with SGD at learning rate 1 and no clipping: the weights
    move by exactly the step's gradient."""
    from rayapp.ml.train.fsdp import optimizer_step

    sgd = torch.optim.SGD(recipe.model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    batches, batch_weights = recipe.step_batches(micro_rows, weights)
    loss, tokens = optimizer_step(recipe.train_model, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0),
                                  batches, batch_weights, max_grad_norm=1e9)
    return len(batches), loss, tokens, {n: before[n] - p.detach() for n, p in recipe.model.named_parameters()}


def test_the_recipes_merged_forwards_take_the_steps_own_gradient(tmp_path):
    """A step of four micro-batches (the last one short, as an epoch's last group can be) run as
    four forwards with the model's loss, as two forwards of two and as one of four (fused loss),
    and as four forwards through the fused loss: the same loss, tokens and gradient."""
    micro_rows = [[3, 0], [7, 12], [5, 9], [14]]
    weights = [0.25] * 4
    runs = {}
    for name, merge, fused_loss in [("own", 1, False), ("fused", 1, True), ("two", 2, False), ("one", 4, False)]:
        recipe = _recipe(tmp_path, merge, fused_loss)
        recipe.model.eval()  # no dropout: every run computes the same function
        assert recipe.weighted == (name != "own") and recipe.merge == merge
        runs[name] = _sgd_step(recipe, micro_rows, weights)
    forwards, loss, tokens, grads = runs["own"]
    assert forwards == 4 and [runs[n][0] for n in ("fused", "two", "one")] == [4, 2, 1]
    for name in ("fused", "two", "one"):
        assert runs[name][1] == pytest.approx(loss, rel=1e-5) and runs[name][2] == tokens
        for param, grad in grads.items():
            torch.testing.assert_close(runs[name][3][param], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")


def test_merging_is_capped_at_the_steps_micro_batches_and_needs_packing(tmp_path):
    assert _recipe(tmp_path, 8, accum=2).merge == 2
    recipe = _recipe(tmp_path, "auto")
    assert recipe.merge == 1 and not recipe.weighted  # "auto" not resolved by a plan: one forward each
    padded = _recipe(tmp_path, 2, packing=False)
    assert padded.merge == 1 and not padded.weighted


def test_a_copy_of_a_model_with_the_fused_loss_computes_with_its_own_weights():
    model = _tiny("llama", "sdpa")
    fused.install(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    seqs, labs = _rows([9, 12])
    batch = pack_batch(seqs, labs, [[0], [1]], 0, fused.token_weights(labs, 1.0))
    batch.pop("num_tokens")
    assert float(twin(**batch).loss) != pytest.approx(float(model(**batch).loss), rel=1e-3)


@pytest.mark.extended  # inductor compiles on the CPU: ~1 min
def test_compiled_layers_take_the_same_step(tmp_path):
    """compile_layers: each decoder layer under torch.compile gives the step's loss and gradient."""
    micro_rows, weights = [[3, 0], [7, 12]], [0.5, 0.5]
    plain, compiled = _recipe(tmp_path, 2), _recipe(tmp_path, 2, compile_layers=True)
    for r in (plain, compiled):
        r.model.eval()
    _, loss, tokens, grads = _sgd_step(plain, micro_rows, weights)
    _, loss_c, tokens_c, grads_c = _sgd_step(compiled, micro_rows, weights)
    assert loss_c == pytest.approx(loss, rel=1e-5) and tokens_c == tokens
    for param, grad in grads.items():
        torch.testing.assert_close(grads_c[param], grad, rtol=1e-4, atol=1e-6, msg=param)


def test_loss_weights_pass_fsdp2s_bf16_input_cast_in_fp32():
    """FSDP2's mixed precision casts the root's floating-point forward inputs to bf16 with this very
    function; weights held by loss.Exact (as optimizer_step passes them) come through in fp32."""
    import functools

    from torch.distributed.fsdp._fully_shard._fsdp_common import _cast_fp_tensor
    from torch.distributed.utils import _apply_to_tensors

    weights = torch.full((2, 5), 0.25 / 1234)  # not a bf16 number
    cast = functools.partial(_cast_fp_tensor, torch.bfloat16)
    assert _apply_to_tensors(cast, {"loss_weights": weights})["loss_weights"].dtype == torch.bfloat16
    kept = _apply_to_tensors(cast, {"loss_weights": fused.Exact(weights)})["loss_weights"]
    assert kept.tensor.dtype == torch.float32 and torch.equal(kept.tensor, weights)


def test_how_the_objective_is_computed_is_not_part_of_a_runs_identity():
    from rayapp.config import TrainConfig

    plain = TrainConfig()
    other = TrainConfig(micro_batches_per_forward=2, fused_loss=True, compile_layers=True)
    assert plain.content() == other.content()
    assert plain.content() != TrainConfig(learning_rate=1e-4).content()
