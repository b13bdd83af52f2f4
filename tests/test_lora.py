"""LoRA on the target (finetune.lora, PEFT): 2 FSDP2 workers on CPU (gloo) train adapters on a frozen,
sharded base; the merged export equals base plus (alpha / r) B A from the adapter export of the same
run; the base's other weights are untouched; evaluation loads either export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from rayapp.config import FinetuneConfig, LoraConfig
from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.ml.models import registry
from rayapp.ml.models.loading import adapter_base, load_causal_lm
from rayapp.ml.models.losses import mean_response_nll
from rayapp.ml.train.runner import TrainJob, run_training
from rayapp.testing.faults import TRAIN_KILL_ENV as KILL_AT_STEP_ENV
from tests.conftest import alpaca_rows, run_stage, write_jsonl

pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # not in `make test-fast`: two training runs

TARGETS = ["q_proj", "v_proj", "down_proj"]


# The two trainings run in a process (and a local Ray) of their own. In this test process's
# shared cluster, once a finished run's TrainController actor was reclaimed, the driver never
# again saw a new actor come alive: a later test's Ray Data pool hung (CI, twice, at the same test).
TRAIN_SCRIPT = """
import json, sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
from tests.test_lora import train_both
json.dump(train_both(*json.loads(sys.argv[1])), open(sys.argv[2], "w"))
"""


def train_both(init: str, tokenizer: str, files: list[str], rows: int, tmp: str) -> dict:
    """The same LoRA training twice (same seed, so the same adapters): merged and adapter exports."""
    out = {}
    for mode in ("merged", "adapter"):
        tc = FinetuneConfig(epochs=2, learning_rate=5e-2, warmup_ratio=0.0, per_device_batch_size=8, num_workers=2,
                            fsdp=True, log_every_steps=2, eval_rows=32, seed=0, checkpoint_every_steps=2,
                            max_failures=1, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS,
                                                            export=mode))
        work = os.path.join(tmp, f"ft-{mode}")
        job = TrainJob(label=f"finetune ({mode})", init_model=init, tokenizer=tokenizer, train_files=files,
                       total_rows=rows, work_dir=work, eval_file=files[0])
        # the adapter run loses rank 0 at step 5 and resumes from its step-4 checkpoint (adapters
        # and their optimizer state): it must still train exactly what the merged run trains
        faults = {"env_vars": {KILL_AT_STEP_ENV: "5"}} if mode == "adapter" else None
        [metrics] = run_training("finetune", tc, [job], runtime_env=faults)
        out[mode] = (os.path.join(work, "exports", "final"), metrics, work)
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    import subprocess
    import sys

    from rayapp.config import RunConfig
    from tests.conftest import REPO, tiny_config_dict

    tmp = tmp_path_factory.mktemp("lora")
    cfg = RunConfig.model_validate(tiny_config_dict(tmp, [{"path": str(write_jsonl(tmp / "a.jsonl", alpaca_rows(96)))}],
                                                    data__shard_rows=48))
    manifest = run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)
    files = [storage.join(layout.prepared, s.file) for s in manifest.shards]
    init = registry.model_source(cfg, "target")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster of its own
    args = json.dumps([init, manifest.tokenizer, files, manifest.rows, str(tmp)])
    proc = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, args, str(tmp / "runs.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {mode: tuple(v) for mode, v in json.loads((tmp / "runs.json").read_text()).items()}
    return {**out, "init": init, "eval_file": files[0], "cfg": cfg}


def _eval_loss(model, eval_file, n=32):
    rows = storage.read_parquet(eval_file, ["input_ids", "labels"]).slice(0, n).to_pylist()
    return mean_response_nll(model.eval(), rows, 0)


@pytest.mark.extended  # the two LoRA training runs (~200 s): past CI's 30-minute budget on 2 cores
def test_lora_trains_adapters_on_a_sharded_frozen_base(lora_runs):
    export, metrics, work = lora_runs["merged"]
    stats = [json.load(open(os.path.join(work, "stats", f"rank-{r}.json"))) for r in (0, 1)]
    from rayapp.ops.plan.check import lora_adapter_params

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    for s in stats:
        assert s["sharded"] and s["world"] == 2
        assert 0 < s["trainable_params"] < 0.1 * s["params"]  # adapters only
        assert s["trainable_params"] == lora_adapter_params(lora_runs["cfg"], lora)  # what `rayapp plan` counts
        assert abs(s["local_params"] - s["params"] / 2) <= 0.02 * s["params"]  # the base is sharded too
    base = load_causal_lm(lora_runs["init"])
    merged = load_causal_lm(export)
    before, after = _eval_loss(base, lora_runs["eval_file"]), _eval_loss(merged, lora_runs["eval_file"])
    assert abs(after - metrics["eval_loss"]) < 1e-3  # the export is the trained model
    # and it learned (a random tiny model whose embeddings stay frozen moves little: 6.235 -> 6.201)
    assert after < before - 0.02
    # only the wrapped modules changed; every other weight is the base's, bit for bit
    b, m = base.state_dict(), merged.state_dict()
    assert b.keys() == m.keys()
    changed = {k for k in b if not torch.equal(b[k], m[k])}
    assert changed and all(k.split(".")[-2] in TARGETS for k in changed), sorted(changed)[:5]


@pytest.mark.extended  # the two LoRA training runs (~200 s): past CI's 30-minute budget on 2 cores
def test_merged_export_is_base_plus_adapter_and_evaluation_loads_both(lora_runs, ray_local):
    merged_dir, merged_metrics, _ = lora_runs["merged"]
    adapter_dir, adapter_metrics, _ = lora_runs["adapter"]
    assert adapter_base(adapter_dir) == lora_runs["init"] and adapter_base(merged_dir) is None
    assert not os.path.exists(os.path.join(adapter_dir, "model.safetensors"))  # the adapter alone
    adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    base = load_causal_lm(lora_runs["init"]).state_dict()
    merged = load_causal_lm(merged_dir).state_dict()
    n = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        bmat = adapter[key.replace(".lora_A.", ".lora_B.")]
        weight = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = base[weight] + (8 / 4) * bmat @ a
        torch.testing.assert_close(merged[weight], expected, rtol=1e-5, atol=1e-6, msg=weight)
        n += 1
    assert n == 2 * len(TARGETS)  # 2 decoder layers x the wrapped modules
    # the adapter run trained the same adapters (same seed, deterministic kernels), through a lost
    # worker and a resume from its step-4 checkpoint
    _, _, adapter_work = lora_runs["adapter"]
    assert open(os.path.join(adapter_work, "stats", ".fault_injected")).read() == "5"
    assert json.load(open(os.path.join(adapter_work, "stats", "rank-0.json")))["resumed_from_step"] == 4
    assert adapter_metrics["eval_loss"] == pytest.approx(merged_metrics["eval_loss"], abs=1e-6)
    torch.testing.assert_close(load_causal_lm(adapter_dir).state_dict(), merged, rtol=0, atol=1e-6)

    # evaluation loads the adapter export as base + adapter: the same answers as the merged one
    from rayapp.config import GenerationConfig
    from rayapp.stages.evaluate.generate import generate

    rows = [{"set": "t", "id": str(i), "prompt": f"### Instruction:\nName a colour {i}.\n\n### Response:\n"}
            for i in range(4)]
    gen = GenerationConfig(backend="hf", max_new_tokens=8, temperature=0.0, batch_size=4)
    out = generate(rows, {"merged": merged_dir, "adapter": adapter_dir}, gen)
    assert [r["answer"] for r in out["merged"][0]] == [r["answer"] for r in out["adapter"][0]]
    assert out["merged"][1]["new_tokens"] > 0


def test_adapters_start_the_same_on_one_worker_and_sharded_on_two(tmp_path):
    """The adapters are drawn whole from the run's seed and copied into each rank's shard: the same
    start for any number of workers (DTensor's own random ops on a CPU mesh would draw every shard
    alike), and B = 0, so the wrapped model starts as its base."""
    import numpy as np

    from rayapp.config import TinyModelConfig
    from rayapp.ml.models import tiny
    from rayapp.testing.fsdp_probes import lora_adapters_at_start
    from rayapp.testing.gloo import run_gloo

    tiny.train_tokenizer((r["instruction"] + " " + r["output"] for r in alpaca_rows(100)), 512, str(tmp_path / "tok"))
    tiny.build_model(str(tmp_path / "tok"), TinyModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2),
                     str(tmp_path / "m"), max_positions=256)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}
    one = lora_adapters_at_start(0, 1, str(tmp_path / "m"), lora)
    two = run_gloo(lora_adapters_at_start, 2, str(tmp_path / "m"), lora)
    assert len(one) == 2 * 2 * len(TARGETS)  # A and B, 2 layers x the wrapped modules
    for rank in two:
        assert rank.keys() == one.keys()
        for name, a in one.items():
            np.testing.assert_array_equal(rank[name], a, err_msg=name)
    assert all(not a.any() for n, a in one.items() if ".lora_B." in n)
    a_mats = [a for n, a in one.items() if ".lora_A." in n]
    assert all(a.std() > 0 and not np.array_equal(a[:2], a[2:]) for a in a_mats)  # shard halves differ
