"""The cluster configs as a user applies them (cluster/), read the way the autoscaler and KubeRay
will: every GPU node type declares the GPUs its instance type has, GPU hosts get and await a driver,
AWS nodes name their AMI, the AWS head may launch workers, KubeRay GPU pods get /dev/shm and a
cache and fit their instance types, and each paper preset's stages fit the node types with the
placement they ask for. Each mutation below is one of the ways the configs were broken before."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from rayapp.config import load_config
from rayapp.deploy.checks import (check_kuberay, check_launcher, check_placement, kuberay_node_types,
                                  launcher_node_types, stage_requests)
from rayapp.deploy.instances import ALL
from tests.conftest import REPO

LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]
PRESETS = ["configs/paper-opt350m-to-13b.yaml", "configs/paper-llama2-7b-to-13b.yaml"]
HEAD_POLICY = json.loads((REPO / "cluster/aws-iam/head-policy.json").read_text())


def _load(path):
    return yaml.safe_load((REPO / path).read_text())


@pytest.mark.parametrize("path", LAUNCHER)
def test_every_launcher_gpu_type_declares_the_gpus_its_instance_type_has(path):
    doc = _load(path)
    assert check_launcher(doc, HEAD_POLICY) == []
    gpu_types = 0
    for name, t in doc["available_node_types"].items():
        inst = t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
        gpus = ALL[inst].gpus
        if name != doc["head_node_type"] and gpus:
            gpu_types += 1
            labels = {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU")}
            assert t["resources"]["GPU"] == gpus and list(labels.values()) == [gpus], (name, t["resources"])
    assert gpu_types == 3
    # a GPU type that declares only its label, as gcp.yaml did: the autoscaler sees no GPU on it
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["gpu-small"]["resources"] = {"gpu_small": 1}
    assert any("gpu-small" in e and "declares GPU None" in e for e in check_launcher(bad, HEAD_POLICY))
    bad["available_node_types"]["gpu-8x"]["resources"]["GPU"] = 4
    assert any("gpu-8x" in e and "has 8 GPUs" in e for e in check_launcher(bad, HEAD_POLICY))


def test_gcp_gpu_nodes_install_and_await_the_driver():
    doc = _load("cluster/gcp.yaml")
    bad = copy.deepcopy(doc)
    node = bad["available_node_types"]["gpu-4x"]
    node["node_config"].pop("metadata")
    node["initialization_commands"] = [c for c in node["initialization_commands"] if "nvidia-smi" not in c]
    node["node_config"].pop("scheduling")
    errors = check_launcher(bad)
    assert any("install-nvidia-driver" in e for e in errors) and any("waits for the driver" in e for e in errors)
    assert any("onHostMaintenance" in e for e in errors)
    assert all("gpu-4x" in e for e in errors)


def test_aws_names_its_ami_and_the_head_may_launch_workers():
    doc = _load("cluster/aws.yaml")
    assert all("deeplearning" in t["node_config"]["ImageId"] for t in doc["available_node_types"].values())
    bad = copy.deepcopy(doc)
    del bad["available_node_types"]["gpu-4x"]["node_config"]["ImageId"]
    assert any("gpu-4x" in e and "no ImageId" in e for e in check_launcher(bad, HEAD_POLICY))
    # the head's own profile with bucket access only, as cluster/README used to say
    bucket_only = {"Statement": [s for s in HEAD_POLICY["Statement"] if s["Sid"] == "RunBucket"]}
    errors = check_launcher(doc, bucket_only)
    assert len(errors) == 1 and "ec2:RunInstances" in errors[0] and "iam:PassRole" in errors[0]


@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_runs_the_pinned_image_and_installs_nothing_at_boot(path):
    doc = _load(path)
    assert not doc.get("setup_commands") and "rayapp" in doc["docker"]["image"]
    dockerfile = (REPO / "cluster/Dockerfile").read_text()
    assert "constraints-gpu.txt" in dockerfile and "--no-deps" in dockerfile
    pins = (REPO / "requirements/constraints-gpu.txt").read_text().splitlines()
    versions = dict(line.split("==") for line in pins if "==" in line and not line.startswith(("#", " ")))
    # the GPU set: Ray as the image, vLLM as ray[llm] pins it, and the autoscaler's cloud clients
    assert versions["ray"] == "2.60.0" and versions["vllm"] and versions["boto3"] and versions["google-api-python-client"]
    bad = copy.deepcopy(doc)
    bad["docker"]["image"] = "rayproject/ray:2.60.0-py311-gpu"
    bad["setup_commands"] = ["pip install -q -e '/home/ray/rayapp[vllm]'"]
    errors = check_launcher(bad, HEAD_POLICY)
    assert any("docker.image" in e for e in errors) and any("unpinned" in e for e in errors)


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_gpu_pods_get_shared_memory_a_cache_and_fit_their_nodes(path):
    text = (REPO / path).read_text()
    doc = yaml.safe_load(text)
    assert check_kuberay(doc, text) == []
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    bad = copy.deepcopy(doc)
    bspec = bad["spec"]["rayClusterSpec"] if bad["kind"] == "RayJob" else bad["spec"]
    small, _, big = bspec["workerGroupSpecs"]
    small["template"]["spec"]["volumes"] = [v for v in small["template"]["spec"]["volumes"] if v["name"] != "dshm"]
    # the 900Gi request that did not fit an a2-highgpu-8g (680 GB)
    big["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "900Gi"
    errors = check_kuberay(bad, text)
    assert any("gpu-small" in e and "/dev/shm" in e for e in errors)
    assert any("gpu-8x" in e and "900Gi" in e and "a2-highgpu-8g" in e for e in errors)
    assert not any("p4d.24xlarge" in e for e in errors)  # 1152 GiB holds it; the GCP type does not
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["gpu-small", "gpu-4x", "gpu-8x"]


def test_rayjob_states_the_kuberay_version_backofflimit_needs():
    text = (REPO / "cluster/kuberay/rayjob.yaml").read_text()
    doc = yaml.safe_load(text)
    assert check_kuberay(doc, text.replace("KubeRay >= 1.2", "KubeRay >= 1.1")) == [
        "backoffLimit needs KubeRay >= 1.2: say so where the manifest states its KubeRay version"]
    assert "KubeRay ≥ 1.2" in (REPO / "cluster/README.md").read_text()


def _all_node_types():
    out = {p: launcher_node_types(_load(p)) for p in LAUNCHER}
    out["cluster/kuberay/raycluster.yaml"] = kuberay_node_types(_load("cluster/kuberay/raycluster.yaml"))
    return out


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_place_every_stage_on_its_node_type(preset):
    cfg = load_config(str(REPO / preset))
    requests = {r.stage: r for r in stage_requests(cfg)}
    # small models train on one node, 13B on the 8-GPU type, the scoring pool starts at full size
    assert requests["finetune"].strategy == "STRICT_PACK" and requests["finetune"].bundles[0]["gpu_8x"] == 1
    assert requests["reference"].strategy == "STRICT_PACK"
    assert cfg.ray.autoscaling and cfg.score.resources.min_actors == cfg.score.resources.max_actors
    for where, types in _all_node_types().items():
        assert check_placement(cfg, types, where) == [], where
    aws = launcher_node_types(_load("cluster/aws.yaml"))
    # more scoring actors than gpu-small nodes may start: the full-size pool would never start
    wide = load_config(str(REPO / preset), ["score.resources.max_actors=9"])
    assert any(e.startswith("score: 9 x") and "at most 8" in e for e in check_placement(wide, aws))
    # 8 workers of 16 CPUs do not fit on one gpu-8x node (96 vCPUs)
    fat = load_config(str(REPO / preset), ["finetune.cpus_per_worker=16"])
    assert any(e.startswith("finetune: 8 x") and "STRICT_PACK" in e for e in check_placement(fat, aws))


def test_the_former_accelerator_pins_do_not_place_on_gcp():
    """The presets used to pin by accelerator_type: A10G, which GCP's L4 nodes do not have."""
    cfg = load_config(str(REPO / PRESETS[0]), ["score.resources.resources={}", "score.resources.accelerator_type=A10G"])
    errors = check_placement(cfg, launcher_node_types(_load("cluster/gcp.yaml")), "gcp")
    assert any(e.startswith("score:") and "accelerator_type:A10G" in e for e in errors)
    assert check_placement(cfg, launcher_node_types(_load("cluster/aws.yaml")), "aws") == []


def test_check_cluster_cli_passes_the_shipped_files_and_names_the_broken_one(tmp_path):
    files = LAUNCHER + KUBERAY
    ok = subprocess.run([sys.executable, "-m", "rayapp", "check-cluster", *files, "-c", PRESETS[0], "-c", PRESETS[1]],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ok: 4 cluster file(s), 2 config(s) placed" in ok.stdout, ok.stdout + ok.stderr
    doc = _load("cluster/gcp.yaml")
    doc["available_node_types"]["gpu-8x"]["resources"] = {"gpu_8x": 8}
    broken = tmp_path / "gcp.yaml"
    broken.write_text(yaml.safe_dump(doc))
    bad = subprocess.run([sys.executable, "-m", "rayapp", "check-cluster", str(broken)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and f"{broken}: gpu-8x (a2-highgpu-8g): declares GPU None" in bad.stdout


def test_autoscaling_starts_gpu_pools_at_full_size_and_leaves_cpu_pools_alone():
    """ray.autoscaling: a pool that needs GPUs or a node-type label starts at max_actors (Ray Data
    does not grow it on a cluster whose GPU nodes start at zero, ray#59144); others keep min_actors."""
    base = ["ray.autoscaling=true", "score.resources.max_actors=6", "score.resources.min_actors=1"]
    gpu = load_config(str(REPO / "configs/tiny.yaml"), base + ["score.resources.num_gpus=1"])
    assert (gpu.score.resources.min_actors, gpu.score.resources.max_actors) == (6, 6)
    cpu = load_config(str(REPO / "configs/tiny.yaml"), base)
    assert cpu.score.resources.min_actors == 1
    fixed = load_config(str(REPO / "configs/tiny.yaml"), base[1:] + ["score.resources.num_gpus=1"])
    assert fixed.score.resources.min_actors == 1  # a cluster of fixed size: the pool grows as Ray Data likes
