"""The one-shot GPU check (`python -m benchmarks gpu`) stays runnable where it will run: a machine
with torch and transformers but no Ray, no vLLM and no pydantic. Here it runs its tiny CPU shapes
with those three packages made unimportable, through the same scoring actor and training step code
the pipeline uses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLOCKED = ("pydantic", "ray", "vllm")


@pytest.mark.slow
def test_gpu_check_runs_without_ray_vllm_or_pydantic(tmp_path):
    code = ("import sys, runpy\n"
            f"for m in {BLOCKED!r}: sys.modules[m] = None  # import raises ImportError\n"
            f"sys.argv = ['benchmarks', 'gpu', '--tiny', '--out', {str(tmp_path)!r}]\n"
            "runpy.run_module('benchmarks', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("gpu-*.json")
    r = json.loads(result.read_text())
    assert r["tiny_shapes"] and (tmp_path / result.name.replace(".json", ".png")).exists()
    assert [s["model"] for s in r["scoring"]] == ["facebook/opt-350m", "facebook/opt-1.3b"]
    for s in r["scoring"]:
        assert s["tokens"] > 0 and s["tokens_per_s"] > 0 and 0 <= s["padding_fraction"] < 0.5
        assert s["plan_memory_bytes"] > 0 and s["fraction_of_measured_matmul"] > 0
    agree = r["bf16_vs_fp32"]
    assert agree["rows"] == 64 and 0 < agree["max_relative_error"] < 0.05  # bf16 is close to, not equal to, fp32
    runs = r["training"]
    assert [(x["packing"], x["activation_checkpointing"], x["fused_loss"]) for x in runs] == [
        (False, False, False), (False, True, False), (True, False, False), (True, True, False), (True, False, True),
        (True, True, True)]
    assert all(x["tokens_per_s"] > 0 and x["params"] == runs[0]["params"] for x in runs)
    # the same rows each way: the same real tokens, never more computed when packed
    assert runs[0]["tokens_per_step"] == runs[2]["tokens_per_step"]
    assert runs[2]["padded_tokens_per_step"] <= runs[0]["padded_tokens_per_step"]
    assert runs[4]["tokens_per_step"] == runs[2]["tokens_per_step"]  # the fused loss: the same rows
    assert r["vllm"]["measured"] is False and "vLLM" in r["vllm"]["why"]


def test_device_names_map_to_their_accelerator_type():
    from rayapp.ops.plan.accelerators import accelerator_in

    assert accelerator_in("NVIDIA H100 80GB HBM3") == "H100" and accelerator_in("NVIDIA H200") == "H200"
    assert accelerator_in("NVIDIA A10G") == "A10G" and accelerator_in("NVIDIA A100-SXM4-40GB") == "A100"
    assert accelerator_in("NVIDIA L40S") == "L40S"  # not "L4", which it also contains
    assert accelerator_in("cpu") is None
