"""Ray Train fine-tuning with FSDP2 on 2 CPU workers (gloo): sharding, loss, export, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from rayapp.common import storage
from rayapp.common.layout import RunLayout
from rayapp.config import FinetuneConfig
from rayapp.models import registry
from rayapp.models.loading import load_causal_lm
from rayapp.prepare.stage import run_prepare
from rayapp.score.losses import mean_response_nll
from rayapp.train.loop import KILL_AT_STEP_ENV
from rayapp.train.runner import run_training
from tests.conftest import alpaca_rows, write_jsonl


def _eval_loss(model_path, eval_file, n):
    model = load_causal_lm(model_path).eval()
    return mean_response_nll(model, storage.read_parquet(eval_file, ["input_ids", "labels"]).slice(0, n).to_pylist(), 0)


def _weights(path):
    return {k: v.detach().clone() for k, v in load_causal_lm(path).state_dict().items()}


def test_fsdp_training_shards_learns_exports_and_resumes_exactly(ray_local, tmp_path, make_config):
    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(96)))}], data__shard_rows=48)
    manifest = run_prepare(cfg)
    layout = RunLayout(cfg.output_dir)
    files = [storage.join(layout.prepared, s["file"]) for s in manifest["shards"]]
    init = registry.model_source(cfg, "target")
    tc = FinetuneConfig(epochs=2, learning_rate=3e-3, warmup_ratio=0.0, per_device_batch_size=8,
                        num_workers=2, fsdp=True, checkpoint_every_steps=2, max_failures=1, log_every_steps=2,
                        eval_rows=32, seed=0)
    work = str(tmp_path / "ft")
    # rank 0's worker process is SIGKILLed at step 5, after the step-4 checkpoint; Ray Train sees
    # the dead actor, restarts the group (FailureConfig), and the loop resumes from step 4
    metrics = run_training("finetune", tc, files, manifest["rows"], init, manifest["tokenizer"], work,
                           export_every_epoch=False, eval_file=files[0],
                           runtime_env={"env_vars": {KILL_AT_STEP_ENV: "5"}})
    assert open(os.path.join(work, "stats", ".fault_injected")).read() == "5"  # the kill happened
    stats = [json.load(open(os.path.join(work, "stats", f"rank-{r}.json"))) for r in (0, 1)]
    total = 2 * int(np.ceil(np.ceil(96 / 2 / 8)))  # epochs x batches per rank (accumulation 1)
    for s in stats:
        assert s["sharded"] and s["world"] == 2
        assert abs(s["local_params"] - s["params"] / 2) <= 0.01 * s["params"]  # each rank holds ~half
        assert s["global_step"] == s["total_steps"] == total
        assert s["resumed_from_step"] == 4
    export = os.path.join(work, "exports", "final")
    reloaded = _eval_loss(export, files[0], 32)
    assert abs(reloaded - metrics["eval_loss"]) < 1e-3  # the export is the trained model
    assert reloaded < _eval_loss(init, files[0], 32) - 0.05  # and it learned
    assert sorted(os.listdir(os.path.join(work, "checkpoints")))[-1] == f"step-{total:06d}"

    # the same run without the kill ends with the same weights: the resumed attempt saw exactly
    # the batches the lost one had not trained on
    clean = str(tmp_path / "ft-clean")
    run_training("finetune", tc, files, manifest["rows"], init, manifest["tokenizer"], clean,
                 export_every_epoch=False)
    a, b = _weights(export), _weights(os.path.join(clean, "exports", "final"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], _weights(init)[k]) for k in a)  # and they did train
