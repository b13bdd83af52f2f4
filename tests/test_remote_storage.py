"""Training on an object store: sharded checkpoints and exports under s3://, a resume from the
bucket after a worker fault, and models loaded back from s3:// (S3 API served locally, see
tests/s3_server.py)."""

from __future__ import annotations

import os

import pytest

from rayapp.common import storage
from rayapp.common.layout import RunLayout
from rayapp.config import FinetuneConfig
from rayapp.models import registry
from rayapp.models.loading import load_causal_lm, materialize
from rayapp.prepare.stage import run_prepare
from rayapp.train import checkpoints as ck
from rayapp.train.loop import KILL_AT_STEP_ENV
from rayapp.train.runner import run_training
from tests.conftest import alpaca_rows, write_jsonl
from tests.s3_server import create_bucket, start_s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    proc, env = start_s3_server()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ["RAYAPP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    create_bucket(env, "rayapp-test")
    yield env
    proc.terminate()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.environ.pop("RAYAPP_CACHE_DIR", None)


def test_storage_round_trip(s3, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(src), "s3://rayapp-test/rt/dir")
    assert storage.list_dirs("s3://rayapp-test/rt/dir") == ["sub"]
    out = storage.download_dir("s3://rayapp-test/rt/dir", str(tmp_path / "dst"))
    assert open(os.path.join(out, "sub", "b.txt")).read() == "b"
    storage.remove_dir("s3://rayapp-test/rt/dir")
    assert not storage.exists("s3://rayapp-test/rt/dir/a.txt")


@pytest.mark.extended  # ~1.5 min: `make test-extended`, not CI
def test_fsdp_training_checkpoints_to_s3_and_resumes(s3, ray_local, tmp_path, make_config):
    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(64)))}], data__shard_rows=32)
    manifest = run_prepare(cfg)
    layout = RunLayout(cfg.output_dir)
    files = [storage.join(layout.prepared, s["file"]) for s in manifest["shards"]]
    init = registry.model_source(cfg, "target")
    tc = FinetuneConfig(epochs=1, learning_rate=3e-3, warmup_ratio=0.0, per_device_batch_size=8, num_workers=2,
                        fsdp=True, checkpoint_every_steps=1, max_failures=1, log_every_steps=1, eval_rows=16)
    work = "s3://rayapp-test/run/finetune/selected"
    ck.claim_work_dir(work, "fp-1", force=False)
    # the local cluster's workers get the bucket's settings the way cluster nodes do: from the env
    metrics = run_training("finetune", tc, files, manifest["rows"], init, manifest["tokenizer"], work,
                           export_every_epoch=False, eval_file=files[0],
                           runtime_env={"env_vars": {**s3, KILL_AT_STEP_ENV: "3"}})
    stats = [storage.read_json(f"{work}/stats/rank-{r}.json") for r in (0, 1)]
    assert all(s["resumed_from_step"] == 2 and s["global_step"] == s["total_steps"] == 4 for s in stats)
    steps = storage.list_dirs(f"{work}/checkpoints")
    assert steps == ["step-000003", "step-000004"]  # older ones pruned in the bucket
    names = {os.path.basename(f) for f in storage.list_files(f"{work}/checkpoints/step-000004")}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", ck.PROGRESS} <= names  # both ranks' shards
    export = f"{work}/exports/final"
    assert ck.export_complete(export)
    local = materialize(export)
    assert local != export and os.path.exists(os.path.join(local, "model.safetensors"))
    assert load_causal_lm(export).config.num_hidden_layers == 2
    assert metrics["eval_loss"] > 0
    # a re-claim with other inputs clears the bucket's old state, so it is never resumed from
    ck.claim_work_dir(work, "fp-2", force=False)
    assert storage.list_dirs(f"{work}/checkpoints") == [] and not ck.export_complete(export)
