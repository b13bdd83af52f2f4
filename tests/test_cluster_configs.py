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
from rayapp.ops.deploy.checks import (
    check_kuberay,
    check_launcher,
    check_placement,
    kuberay_node_types,
    launcher_node_types,
    stage_requests,
)
from rayapp.ops.deploy.instances import ALL
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


# ---- gated models: HF_TOKEN where the hub is read (issue 27, defect 5) -----------------------------

def _spec(doc):
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _node_types(path, doc=None):
    from rayapp.ops.deploy.checks import kuberay_head

    doc = doc or _load(path)
    return [kuberay_head(doc)] + kuberay_node_types(doc) if doc.get("kind") else launcher_node_types(doc)


@pytest.mark.parametrize("path", LAUNCHER + KUBERAY)
def test_every_node_gets_the_hf_token_from_its_own_environment(path):
    """The job's driver (head) stages the gated Llama models from the hub; GPU nodes fetch a model
    named directly in evaluate.models. Before: KubeRay gave the Secret to the head only, and the
    launcher configs passed nothing into any container."""
    from rayapp.ops.deploy.checks import check_needs

    types = _node_types(path)
    assert {t.name: bool(t.hf_token) for t in types} == {t.name: True for t in types}
    for t in types:
        assert "secretKeyRef rayapp-secrets/hf-token" == t.hf_token if path in KUBERAY else "--env-file" in t.hf_token
    llama = load_config(str(REPO / PRESETS[1]))
    assert not [e for e in check_needs(llama, types) if "HF_TOKEN" in e]


def test_check_cluster_names_each_node_type_without_the_token():
    from rayapp.ops.deploy.checks import check_needs, kuberay_head

    llama, opt = load_config(str(REPO / PRESETS[1])), load_config(str(REPO / PRESETS[0]))
    doc = _load("cluster/kuberay/raycluster.yaml")
    for group in [_spec(doc)["headGroupSpec"]] + _spec(doc)["workerGroupSpecs"]:
        c = group["template"]["spec"]["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != "HF_TOKEN"]
    types = [kuberay_head(doc)] + kuberay_node_types(doc)
    errors = [e for e in check_needs(llama, types) if "HF_TOKEN" in e]
    # the driver on the head fetches both gated models; the workers read the run's staged copies
    assert len(errors) == 1 and errors[0].startswith("head: HF_TOKEN missing: the job's driver fetches the gated "
                                                     "meta-llama/Llama-2-13b-hf, meta-llama/Llama-2-7b-hf")
    assert check_needs(opt, types) == []  # OPT needs no token
    # a gated model named directly in evaluate.models: the vLLM engines on gpu-8x fetch it
    direct = load_config(str(REPO / PRESETS[1]), ["evaluate.models=[selected,meta-llama/Llama-2-13b-hf]"])
    missing = [e.split(":")[0] for e in check_needs(direct, types) if "HF_TOKEN" in e]
    assert missing == ["head", "gpu-8x"]
    # the launcher: the head's secrets file is written without the token
    aws = _load("cluster/aws.yaml")
    aws["initialization_commands"] = [c for c in aws["initialization_commands"] if "hf-token" not in c]
    errors = [e for e in check_needs(llama, launcher_node_types(aws)) if "HF_TOKEN" in e]
    assert [e.split(":")[0] for e in errors] == ["head"]


@pytest.mark.parametrize("path", LAUNCHER)
def test_a_token_in_docker_run_options_is_refused(path):
    doc = _load(path)
    doc["docker"]["run_options"].append("-e HF_TOKEN=hf_notarealtoken")
    assert any("secret HF_TOKEN written in docker run options" in e for e in check_launcher(doc, HEAD_POLICY))


def _command(doc, node, needle):
    cmds = doc["available_node_types"][node].get("initialization_commands", doc["initialization_commands"])
    return next(c for c in cmds if needle in c)


def _fake_bin(tmp_path, name, script):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/sh\n" + script)
    (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("path,cli", [("cluster/aws.yaml", "aws"), ("cluster/gcp.yaml", "gcloud")])
def test_the_hosts_secrets_command_writes_the_env_file_docker_reads(tmp_path, path, cli):
    """The launcher's initialization command, run in bash with a stand-in for the cloud CLI: it
    writes HF_TOKEN into the file `docker run --env-file` names, and a missing secret leaves an
    empty file and a message, not a failed node (the OPT preset has no token)."""
    import os

    doc = _load(path)
    cmd = _command(doc, "gpu-8x", "hf-token")
    env_file = next(o.split()[1] for o in doc["docker"]["run_options"] if o.startswith("--env-file"))
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = _fake_bin(tmp_path, cli, 'case "$*" in *hf-token*) echo hf_fromthemanager ;; *) exit 1 ;; esac\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home)}
    done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    written = home / env_file.removeprefix("/home/ubuntu/")
    assert done.returncode == 0 and written.read_text() == "HF_TOKEN=hf_fromthemanager\n"
    assert oct(written.stat().st_mode & 0o777) == "0o600"  # umask 077: the host's other users cannot read it
    bin_dir = _fake_bin(tmp_path, cli, "exit 254\n")  # no such secret, or no permission
    done = subprocess.run(["bash", "-c", cmd], env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and written.read_text() == "" and "hf-token not readable" in done.stderr


def test_the_aws_policies_let_each_host_read_the_secrets_it_fetches():
    import fnmatch

    doc = _load("cluster/aws.yaml")
    node = json.loads((REPO / "cluster/aws-iam/node-policy.json").read_text())

    def readable(policy, secret):
        arn = f"arn:aws:secretsmanager:us-west-2:YOUR-ACCOUNT:secret:{secret}-AbCdEf"  # AWS adds 6 characters
        for st in policy["Statement"]:
            res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            if "secretsmanager:GetSecretValue" in str(st["Action"]) and any(fnmatch.fnmatch(arn, r) for r in res):
                return True
        return False

    import re

    head_secrets = re.findall(r"--secret-id (\S+)", " ".join(doc["initialization_commands"]))
    worker_secrets = re.findall(r"--secret-id (\S+)", _command(doc, "gpu-8x", "secret-id"))
    assert head_secrets == ["rayapp/hf-token", "rayapp/openai-api-key"] and worker_secrets == ["rayapp/hf-token"]
    assert all(readable(HEAD_POLICY, s) for s in head_secrets) and readable(node, "rayapp/hf-token")
    assert not readable(node, "rayapp/openai-api-key")  # the judge's key stays on the head


# ---- disks: size, and how fast a checkpoint stages (defect 6) --------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("path", LAUNCHER + KUBERAY)
def test_the_presets_fit_each_node_types_disk_and_stage_checkpoints_fast(path, preset):
    from rayapp.ops.deploy.checks import SLOW_CHECKPOINT_SAVE_S, check_needs, stages_on
    from rayapp.ops.deploy.needs import disk_needs

    cfg = load_config(str(REPO / preset))
    types = _node_types(path)
    assert check_needs(cfg, types) == []
    # the 13B checkpoint (fp32 weights and AdamW moments) stages in minutes where finetune runs
    needs = disk_needs(cfg)
    assert 150e9 < needs["finetune"].checkpoint < 160e9 and needs["finetune"].saves == 6  # 3 subsets x 2 epoch ends (none after the last)
    trainer = next(t for t in types if "finetune" in stages_on(cfg, types)[t.name])
    assert all(needs["finetune"].checkpoint / d.write_bytes_per_s < SLOW_CHECKPOINT_SAVE_S for d in trainer.disks.values())


def test_slow_or_small_disks_are_named_per_node_type():
    """The disks as they were: gp3 at its 125 MiB/s baseline on p4d, GCP's default pd-standard:
    ~20 min a 13B save; and a KubeRay cache too small for what the stages keep there."""
    from rayapp.ops.deploy.checks import check_needs, kuberay_head

    cfg = load_config(str(REPO / PRESETS[0]))
    aws = _load("cluster/aws.yaml")
    aws["docker"]["worker_run_options"] = []  # the cache back on the boot volume
    aws["available_node_types"]["gpu-8x"]["node_config"]["BlockDeviceMappings"][0]["Ebs"] = {"VolumeSize": 1000,
                                                                                               "VolumeType": "gp3"}
    errors = check_needs(cfg, launcher_node_types(aws))
    assert errors == ["gpu-8x (p4d.24xlarge): finetune stages each checkpoint (154 GB) on gp3 1,000 GiB at 125 MiB/s: "
                      "20 min a save, 6 saves, every training worker waiting; use a faster disk (gp3 Throughput, "
                      "pd-ssd, or the instance's NVMe)"]
    gcp = _load("cluster/gcp.yaml")
    params = gcp["available_node_types"]["gpu-8x"]["node_config"]["disks"][0]["initializeParams"]
    params.pop("diskType")
    params["diskSizeGb"] = 1000
    errors = check_needs(cfg, launcher_node_types(gcp))
    assert len(errors) == 1 and "pd-standard 1,000 GiB at 120 MiB/s: 20 min a save" in errors[0]
    doc = _load("cluster/kuberay/raycluster.yaml")
    big = _spec(doc)["workerGroupSpecs"][2]["template"]["spec"]
    next(v for v in big["volumes"] if v["name"] == "cache")["emptyDir"]["sizeLimit"] = "150Gi"
    errors = check_needs(cfg, [kuberay_head(doc)] + kuberay_node_types(doc))
    assert len(errors) == 2 and all(e.startswith("gpu-8x (") and "need 257 GB of local disk" in e and
                                    "its cache volume's limit (150 GiB) holds less" in e for e in errors)


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_ephemeral_storage_fits_the_node_pools_disk(path):
    """The gpu-8x pod asked for 700Gi on an 800 GB boot disk: less than that is allocatable once
    the kubelet keeps 10 % free and the OS and images take theirs."""
    text = (REPO / path).read_text()
    doc = yaml.safe_load(text)
    big = _spec(doc)["workerGroupSpecs"][2]
    res = big["template"]["spec"]["containers"][0]["resources"]
    res["requests"]["ephemeral-storage"] = res["limits"]["ephemeral-storage"] = "700Gi"
    big["template"]["metadata"]["annotations"]["rayapp.io/node-disk"] = \
        "p4d.24xlarge: gp3 800Gi; a2-highgpu-8g: pd-balanced 800Gi"
    errors = check_kuberay(doc, text)
    assert [e.split(";")[0] for e in errors] == ["gpu-8x: requests 700Gi of ephemeral storage"] * 2
    assert "allows pods 664 GiB" in errors[0]
    # a pool whose disk is not stated, and a cache over the pod's own limit
    del big["template"]["metadata"]["annotations"]["rayapp.io/node-disk"]
    next(v for v in big["template"]["spec"]["volumes"] if v["name"] == "cache")["emptyDir"]["sizeLimit"] = "800Gi"
    errors = check_kuberay(doc, text)
    assert any("state the disk of the p4d.24xlarge node pool" in e and "'p4d.24xlarge: instance-store'" in e for e in errors)
    assert any("cache volume sizeLimit 800Gi is over the container's ephemeral-storage limit 700Gi" in e for e in errors)


def test_disk_descriptions_parse_to_their_write_rates():
    from rayapp.ops.deploy.instances import MIB, DiskSpecError, parse_disk

    assert parse_disk("gp3 1000Gi", "p4d.24xlarge").write_bytes_per_s == 125 * MIB
    assert parse_disk("gp3 1000Gi 1000MiBps", "p4d.24xlarge").write_bytes_per_s == 1000 * MIB
    assert parse_disk("pd-standard 1000Gi", "a2-highgpu-8g").write_bytes_per_s == 120 * MIB
    assert parse_disk("pd-ssd 2500Gi", "a2-highgpu-8g").write_bytes_per_s == 1200 * MIB  # the per-VM cap
    assert parse_disk("instance-store", "p4d.24xlarge").size_bytes == 8000 * 10**9
    for bad, why in (("instance-store", "has no local NVMe"), ("gp9 100Gi", "unknown EBS volume type"),
                     ("pd-ssd 100Gi 900MiBps", "follows from its size"), ("gp3", "TYPE SIZE")):
        with pytest.raises(DiskSpecError, match=why):
            parse_disk(bad, "m6i.2xlarge" if bad == "instance-store" else "g5.2xlarge")


def test_parameter_counts_from_config_match_the_models_built_on_the_meta_device():
    """check-cluster counts parameters from config.json alone (no torch import); ops/plan/shapes.py
    builds the model: they agree on the paper's models."""
    from rayapp.ops.deploy.needs import config_params
    from rayapp.ops.plan.shapes import bundled_config, model_shape

    for name in ("facebook/opt-350m", "facebook/opt-13b", "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf"):
        assert config_params(json.load(open(bundled_config(name)))) == model_shape(name).params, name


# ---- the NVIDIA driver the image needs (defect 9) ---------------------------------------------------

@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_gpu_hosts_check_the_driver_before_the_container_starts(path):
    doc = _load(path)
    assert check_launcher(doc, HEAD_POLICY) == []
    bad = copy.deepcopy(doc)
    for t in bad["available_node_types"].values():
        if "initialization_commands" in t:
            t["initialization_commands"] = [c for c in t["initialization_commands"] if "driver_version" not in c]
    errors = check_launcher(bad, HEAD_POLICY)
    assert sorted(e.split(" (")[0] for e in errors) == ["gpu-4x", "gpu-8x", "gpu-small"]
    assert all("checks the NVIDIA driver >= 580" in e for e in errors)
    old = copy.deepcopy(doc)
    node = old["available_node_types"]["gpu-8x"]
    node["initialization_commands"] = [c.replace("-ge 580", "-ge 550") for c in node["initialization_commands"]]
    assert any(e.startswith("gpu-8x") and "asks for 550" in e for e in check_launcher(old, HEAD_POLICY))
    if path == "cluster/gcp.yaml":
        fam = copy.deepcopy(doc)
        fam["available_node_types"]["gpu-small"]["node_config"]["disks"][0]["initializeParams"]["sourceImage"] = \
            "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
        assert any(e.startswith("gpu-small") and "has NVIDIA driver 570" in e for e in check_launcher(fam, HEAD_POLICY))


@pytest.mark.parametrize("driver,ok", [("575.57.08", False), ("580.95.05", True), ("595.91.07", True), ("", False)])
def test_the_driver_check_command_refuses_an_old_driver(tmp_path, driver, ok):
    """The host command of aws.yaml and gcp.yaml, run in bash against a stand-in nvidia-smi."""
    import os

    for path in LAUNCHER:
        cmd = _command(_load(path), "gpu-4x", "driver_version")
        bin_dir = _fake_bin(tmp_path, "nvidia-smi", f"echo '{driver}'\necho '{driver}'\n")
        done = subprocess.run(["bash", "-c", cmd], env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
                              capture_output=True, text=True, timeout=30)
        assert (done.returncode == 0) == ok, (path, done.stderr)
        if not ok:
            assert "need >= 580" in done.stderr


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_gpu_groups_require_a_new_enough_driver(path):
    text = (REPO / path).read_text()
    doc = yaml.safe_load(text)
    assert check_kuberay(doc, text) == []
    bad = copy.deepcopy(doc)
    for g in _spec(bad)["workerGroupSpecs"]:
        del g["template"]["spec"]["affinity"]
    errors = check_kuberay(bad, text)
    assert sorted(e.split(":")[0] for e in errors) == ["gpu-4x", "gpu-8x", "gpu-small"]
    assert all("rayapp.io/nvidia-driver-major" in e for e in errors)
    older = copy.deepcopy(doc)
    term = _spec(older)["workerGroupSpecs"][2]["template"]["spec"]["affinity"]["nodeAffinity"]
    expr = term["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    expr.update(operator="In", values=["570", "580"])
    assert [e for e in check_kuberay(older, text) if "driver" in e] == [
        "gpu-8x: GPU pods must require NVIDIA driver >= 580 (the image's CUDA 13 wheels): a required node affinity "
        "on the node-pool label rayapp.io/nvidia-driver-major, e.g. Gt 579 (it admits 570)"]


def test_the_readmes_node_pool_table_matches_the_manifests():
    """cluster/README.md step 0 tells the operator each node pool's disk; the manifests state the
    same disks (rayapp.io/node-disk) and ephemeral-storage requests."""
    import re

    readme = (REPO / "cluster/README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^   \| (head|gpu-small|gpu-4x|gpu-8x) \|.*\| (\d+Gi) \|$",
                                                         readme, re.M)}
    for path in KUBERAY:
        spec = _spec(_load(path))
        for name, group in [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]:
            requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
            assert rows[name] == requests["ephemeral-storage"], (path, name)
            stated = group["template"]["metadata"]["annotations"]["rayapp.io/node-disk"]
            line = next(line for line in readme.splitlines() if line.startswith(f"   | {name} |"))
            for part in stated.split(";"):
                kind = part.split(":")[1].split()[0]
                assert (kind if kind != "instance-store" else "instance store") in line, (name, part)
