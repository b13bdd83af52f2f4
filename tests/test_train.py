"""Ray Train fine-tuning with FSDP2 on 2 CPU workers (gloo): sharding, loss, export, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rayapp.config import FinetuneConfig
from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_causal_lm
from rayapp.ml.models.losses import mean_response_nll
from rayapp.ml.train.runner import TrainJob, run_training
from rayapp.testing.faults import TRAIN_KILL_ENV as KILL_AT_STEP_ENV
from tests.conftest import alpaca_rows, run_stage, write_jsonl


def _eval_loss(model_path, eval_file, n):
    model = load_causal_lm(model_path).eval()
    return mean_response_nll(model, storage.read_parquet(eval_file, ["input_ids", "labels"]).slice(0, n).to_pylist(), 0)


def _weights(path):
    return {k: v.detach().clone() for k, v in load_causal_lm(path).state_dict().items()}


@pytest.mark.slow
def test_fsdp_training_shards_learns_exports_and_resumes_exactly(ray_local, tmp_path, make_config):
    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(96)))}], data__shard_rows=48)
    manifest = run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)
    files = [storage.join(layout.prepared, s.file) for s in manifest.shards]
    init = registry.model_source(cfg, "target")
    tc = FinetuneConfig(epochs=2, learning_rate=3e-3, warmup_ratio=0.0, per_device_batch_size=8,
                        num_workers=2, fsdp=True, checkpoint_every_steps=2, max_failures=1, log_every_steps=2,
                        eval_rows=32, seed=0)
    work = str(tmp_path / "ft")
    # rank 0's worker process is SIGKILLed at step 5, after the step-4 checkpoint; Ray Train sees
    # the dead actor, restarts the group (FailureConfig), and the loop resumes from step 4
    def job(work_dir, rows=manifest.rows, train_files=files):
        return TrainJob(label="finetune", init_model=init, tokenizer=manifest.tokenizer, train_files=train_files,
                        total_rows=rows, work_dir=work_dir, eval_file=files[0])

    [metrics] = run_training("finetune", tc, [job(work)], runtime_env={"env_vars": {KILL_AT_STEP_ENV: "5"}})
    assert open(os.path.join(work, "stats", ".fault_injected")).read() == "5"  # the kill happened
    stats = [json.load(open(os.path.join(work, "stats", f"rank-{r}.json"))) for r in (0, 1)]
    total = 2 * int(np.ceil(np.ceil(96 / 2 / 8)))  # epochs x batches per rank (accumulation 1)
    for s in stats:
        assert s["sharded"] and s["world"] == 2
        assert abs(s["local_params"] - s["params"] / 2) <= 0.01 * s["params"]  # each rank holds ~half
        assert s["global_step"] == s["total_steps"] == total
        assert s["resumed_from_step"] == 4
        assert s["background_saves"] > 0  # written while training went on (a filesystem path)
    export = os.path.join(work, "exports", "final")
    reloaded = _eval_loss(export, files[0], 32)
    assert abs(reloaded - metrics["eval_loss"]) < 1e-3  # the export is the trained model
    assert reloaded < _eval_loss(init, files[0], 32) - 0.05  # and it learned
    # the newest save is the last mid-epoch one: none after the last epoch, whose export follows
    assert sorted(os.listdir(os.path.join(work, "checkpoints")))[-1] == f"step-{total - 2:06d}"

    # the same run without the kill ends with the same weights: the resumed attempt saw exactly
    # the batches the lost one had not trained on. It runs here as the second job of a worker group
    # whose first job trains on other rows: nothing of one job leaks into the next
    clean = str(tmp_path / "ft-clean")
    other, _ = run_training("finetune", tc, [job(str(tmp_path / "ft-other"), 48, files[:1]), job(clean)])
    assert other["global_step"] == 2 * 3 and os.path.isdir(os.path.join(clean, "exports", "final"))
    a, b = _weights(export), _weights(os.path.join(clean, "exports", "final"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], _weights(init)[k]) for k in a)  # and they did train


def test_an_epochs_short_last_accumulation_group_gets_its_full_weight(tmp_path, make_config):
    """Defect: with 5 micro-batches per epoch and 4 accumulation steps, the last optimizer step of
    an epoch saw one micro-batch but divided its loss by 4 (a quarter of the gradient). Each step
    must follow the mean loss of the micro-batches it really accumulated. Runs the training
    recipe itself, in this process (world size 1, no Ray)."""
    import copy

    from rayapp.ml.train.collate import collate
    from rayapp.ml.train.worker import FineTuneRecipe, WorkerConfig, WorkerEnv, micro_batch_weight

    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40)))}])
    manifest = run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)
    tc = FinetuneConfig(epochs=1, per_device_batch_size=8, gradient_accumulation_steps=4, max_grad_norm=1e9,
                        warmup_ratio=0.0, fsdp=False)
    worker = WorkerConfig(stage="finetune", train=tc, init_model=registry.model_source(cfg, "target"),
                          tokenizer=manifest.tokenizer, total_rows=manifest.rows,
                          train_files=tuple(manifest.shard_paths(layout)), work_dir=str(tmp_path / "w"),
                          staging_dir=None, export_every_epoch=False, eval_file=None)
    recipe = FineTuneRecipe(worker, WorkerEnv(rank=0, world=1, local_rank=0, distributed=False))
    recipe.setup_model()
    recipe.setup_data()
    recipe.setup_optimizer()
    assert recipe.batches_per_epoch == 5 and recipe.steps_per_epoch == 2
    assert [micro_batch_weight(b, 5, 4) for b in range(5)] == [0.25] * 4 + [1.0]

    last = collate(recipe.rows.batch(list(range(32, 40))), recipe.pad_id, "cpu")
    reference = copy.deepcopy(recipe.model)
    reference(**last).loss.backward()  # the gradient of the last group's mean loss
    seen = {}
    step = recipe.optimizer.step

    def capture(*a, **k):
        seen.update({n: p.grad.clone() for n, p in recipe.model.named_parameters()})
        return step(*a, **k)

    recipe.optimizer.step = capture
    recipe.train_step([last], [micro_batch_weight(4, recipe.batches_per_epoch, 4)])
    for name, p in reference.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
