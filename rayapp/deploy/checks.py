"""What Ray's schema check cannot see in a cluster config, and whether a run's stages fit it.

- ``check_launcher``: a cluster-launcher YAML (cluster/aws.yaml, gcp.yaml). Every GPU node type
  declares ``GPU`` equal to its instance type's GPUs (Ray's GCP provider detects none, and an
  undeclared GPU makes every GPU request infeasible), plus one custom resource with a unit per
  GPU (the label stages pin to); GCP GPU nodes install and wait for the NVIDIA driver; AWS nodes
  name their AMI; a head with its own instance profile may launch instances and pass the node
  role; the image is rayapp's own (cluster/Dockerfile), not one that pip-installs at boot.
- ``check_kuberay``: a RayCluster or RayJob manifest: autoscaling on, a private head, secrets by
  reference, memory-backed /dev/shm and a cache volume on GPU pods, requests that fit the instance
  types each group names, and the KubeRay version the fields need.
- ``check_placement``: every stage's actors and workers of a run config fit the node types, with
  the placement strategy they ask for, up to the node types' max_workers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from rayapp.deploy.instances import ALL, AWS, KUBE_RESERVED_FRACTION

STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}
# Actions a head node with its own instance profile needs to run the autoscaler (Ray creates them
# only for the profile it makes itself).
HEAD_ACTIONS = ("ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances",
                "iam:PassRole")


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int
    instance: str | None = None
    labels: dict[str, float] = field(default_factory=dict)

    def capacity(self) -> dict[str, float]:
        out = dict(self.resources)
        spec = ALL.get(self.instance or "")
        if spec and spec.accelerator and out.get("GPU"):
            out[f"accelerator_type:{spec.accelerator}"] = 1.0  # what Ray adds on a real GPU node
        return out


# ----------------------------------------------------------------------------------------------
# cluster launcher


def _provider(doc: dict) -> str:
    return doc.get("provider", {}).get("type", "")


def _instance(doc: dict, node_config: dict) -> str | None:
    return node_config.get("InstanceType") if _provider(doc) == "aws" else node_config.get("machineType")


def launcher_node_types(doc: dict) -> list[NodeType]:
    """Node types as the autoscaler sees them: declared resources, with AWS's own detection of
    CPUs and GPUs from the instance type where the config leaves them out (GCP detects nothing)."""
    out = []
    for name, t in doc.get("available_node_types", {}).items():
        res = dict(t.get("resources", {}))
        inst = _instance(doc, t.get("node_config", {}))
        spec = AWS.get(inst or "") if _provider(doc) == "aws" else None
        if spec:
            res.setdefault("CPU", spec.vcpus)
            res.setdefault("GPU", spec.gpus)
        head = name == doc.get("head_node_type")
        out.append(NodeType(name, res, 1 if head else int(t.get("max_workers", 0)), inst))
    return out


def _gpu_count(doc: dict, node_config: dict) -> tuple[int | None, str | None]:
    inst = _instance(doc, node_config)
    spec = ALL.get(inst or "")
    if spec is None:
        return None, inst
    # G2/A2/A3 types come with their GPUs; N1 types get them as guestAccelerators
    attached = sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators", []))
    return spec.gpus or attached, inst


def check_launcher(doc: dict, head_policy: dict | None = None) -> list[str]:
    errors = []
    provider = _provider(doc)
    head_name = doc.get("head_node_type")
    image = doc.get("docker", {}).get("image", "")
    if not image or image.startswith("rayproject/"):
        errors.append(f"docker.image {image or '(none)'}: use the image built from cluster/Dockerfile (the pinned "
                      "GPU set), not a bare Ray image that installs dependencies at boot")
    for cmd in list(doc.get("setup_commands", [])) + list(doc.get("head_setup_commands", [])) + \
            list(doc.get("worker_setup_commands", [])):
        if "pip install" in cmd and "constraints" not in cmd:
            errors.append(f"setup command {cmd!r} installs unpinned packages at every boot")
    for name, t in doc.get("available_node_types", {}).items():
        node_config = t.get("node_config", {})
        declared = t.get("resources", {})
        gpus, inst = _gpu_count(doc, node_config)
        where = f"{name} ({inst})"
        if gpus is None:
            errors.append(f"{where}: unknown instance type; add it to rayapp/deploy/instances.py")
            continue
        ami = str(node_config.get("ImageId", "")).strip()
        if provider == "aws" and (not ami or ami.lower() == "latest_dlami"):
            errors.append(f"{where}: no ImageId: Ray's default AMI is an old DLAMI whose NVIDIA driver is too old "
                          "for current CUDA wheels")
        if name == head_name:
            continue
        if gpus and declared.get("GPU") != gpus:
            errors.append(f"{where}: declares GPU {declared.get('GPU')} but has {gpus} GPUs; the autoscaler plans "
                          "with declared resources (Ray's GCP provider detects no GPU), so a GPU request may never "
                          "start it")
        if not gpus and declared.get("GPU"):
            errors.append(f"{where}: declares GPU {declared['GPU']} but the instance type has no GPU")
        labels = {k: v for k, v in declared.items() if k not in STANDARD}
        if gpus and (len(labels) != 1 or next(iter(labels.values())) != gpus):
            errors.append(f"{where}: a GPU node type declares one custom resource with one unit per GPU "
                          f"(e.g. {{{name.replace('-', '_')}: {gpus}}}), the label stages pin to; found {labels}")
        spec = ALL[inst]
        if "CPU" in declared and declared["CPU"] > spec.vcpus:
            errors.append(f"{where}: declares CPU {declared['CPU']} but has {spec.vcpus} vCPUs")
        if provider == "gcp" and gpus:
            if "CPU" not in declared:
                errors.append(f"{where}: declare CPU too (GCP detects nothing; the autoscaler would plan with 0)")
            items = {i.get("key"): str(i.get("value")).lower() for i in node_config.get("metadata", {}).get("items", [])}
            if items.get("install-nvidia-driver") != "true":
                errors.append(f"{where}: metadata install-nvidia-driver: True is missing (no NVIDIA driver)")
            if not any(s.get("onHostMaintenance") == "TERMINATE" for s in node_config.get("scheduling", [])):
                errors.append(f"{where}: GPU VMs need scheduling onHostMaintenance: TERMINATE")
            init = t.get("initialization_commands", doc.get("initialization_commands", []))
            if not any("nvidia-smi" in c for c in init):
                errors.append(f"{where}: no initialization command waits for the driver (nvidia-smi) before the "
                              "container starts")
    if provider == "aws":
        head_cfg = doc.get("available_node_types", {}).get(head_name, {}).get("node_config", {})
        if head_cfg.get("IamInstanceProfile"):
            granted = _granted_actions(head_policy or {})
            missing = [a for a in HEAD_ACTIONS if not _allows(granted, a)]
            if missing:
                errors.append(f"head: its own instance profile needs {', '.join(missing)} (Ray creates its "
                              "autoscaler role only when the head names none); see cluster/aws-iam/head-policy.json")
    return errors


def _granted_actions(policy: dict) -> list[str]:
    out = []
    for st in policy.get("Statement", []):
        if st.get("Effect") == "Allow":
            acts = st.get("Action", [])
            out += [acts] if isinstance(acts, str) else list(acts)
    return out


def _allows(granted: list[str], action: str) -> bool:
    return any(re.fullmatch(g.replace("*", ".*"), action) for g in granted)


# ----------------------------------------------------------------------------------------------
# KubeRay


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _quantity(q) -> float:
    """A Kubernetes quantity ("7", "500m", "24Gi", "680G") as a number (bytes, or cores)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    for u, f in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def _worker_labels(group: dict) -> dict[str, float]:
    raw = group.get("rayStartParams", {}).get("resources")
    if not raw:
        return {}
    import json

    return json.loads(json.loads(raw) if raw.startswith('"') else raw)


def kuberay_node_types(doc: dict) -> list[NodeType]:
    spec = _cluster_spec(doc)
    out = []
    for g in spec.get("workerGroupSpecs", []):
        c = g["template"]["spec"]["containers"][0]
        lim = c.get("resources", {}).get("limits", {})
        res = {"CPU": math.floor(_quantity(lim.get("cpu", 0))), "GPU": int(lim.get("nvidia.com/gpu", 0)),
               **_worker_labels(g)}
        types = g["template"].get("metadata", {}).get("annotations", {}).get("rayapp.io/instance-types", "")
        out.append(NodeType(g.get("groupName", "?"), res, int(g.get("maxReplicas", 0)),
                            types.split(",")[0] if types else None))
    return out


def check_kuberay(doc: dict, text: str = "") -> list[str]:
    """Field checks for RayCluster / RayJob manifests (no CRD schema offline): the mistakes that
    would make KubeRay reject the object, the autoscaler unable to help, or a GPU pod starve.
    ``text``: the file as written, for the KubeRay version it states."""
    errors = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob"):
        return [f"apiVersion/kind: {doc.get('apiVersion')}/{doc.get('kind')}"]
    spec = _cluster_spec(doc)
    for key in ("rayVersion", "headGroupSpec", "workerGroupSpecs"):
        if key not in spec:
            errors.append(f"missing {key}")
    if errors:
        return errors
    if spec.get("enableInTreeAutoscaling") is not True:
        errors.append("enableInTreeAutoscaling must be true")
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        errors.append("head serviceType must stay ClusterIP (the dashboard is never public)")
    if doc["kind"] == "RayJob" and "backoffLimit" in doc["spec"]:
        version = re.search(r"KubeRay\s*>=\s*(\d+)\.(\d+)", text)
        if not version or (int(version.group(1)), int(version.group(2))) < (1, 2):
            errors.append("backoffLimit needs KubeRay >= 1.2: say so where the manifest states its KubeRay version")
    groups = [("head", head)] + [(g.get("groupName", "?"), g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        pod = group.get("template", {}).get("spec", {})
        containers = pod.get("containers", [])
        if not containers:
            errors.append(f"{name}: no containers")
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        types = group.get("template", {}).get("metadata", {}).get("annotations", {}).get("rayapp.io/instance-types")
        for c in containers:
            if not c.get("image"):
                errors.append(f"{name}: container without image")
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits"):
                errors.append(f"{name}: container needs resource requests and limits")
            gpus = {res.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
            if len(gpus) > 1:
                errors.append(f"{name}: GPU requests and limits differ")
            for e in c.get("env", []):
                if "value" in e and any(s in e["name"].upper() for s in ("KEY", "TOKEN", "SECRET")):
                    errors.append(f"{name}: secret {e['name']} written in the manifest (use secretKeyRef)")
            mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts", [])}
            gpu = int(res.get("limits", {}).get("nvidia.com/gpu", 0) or 0)
            if gpu:
                shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir", {})
                if shm.get("medium") != "Memory":
                    errors.append(f"{name}: no memory-backed emptyDir at /dev/shm (a pod gets 64 MiB: too little "
                                  "for NCCL and tensor-parallel vLLM)")
                cache_dir = next((e.get("value") for e in c.get("env", []) if e.get("name") == "RAYAPP_CACHE_DIR"), None)
                if not cache_dir or cache_dir not in mounts:
                    errors.append(f"{name}: no volume for the model cache and training staging (RAYAPP_CACHE_DIR)")
                labels = _worker_labels(group)
                if len(labels) != 1 or next(iter(labels.values())) != gpu:
                    errors.append(f"{name}: declare one custom resource with one unit per GPU in rayStartParams "
                                  f"(the label stages pin to); found {labels}")
            if not types:
                errors.append(f"{name}: name the instance types the pods run on (annotation rayapp.io/instance-types)")
                continue
            for inst in types.split(","):
                spec_i = ALL.get(inst.strip())
                if spec_i is None:
                    errors.append(f"{name}: unknown instance type {inst}; add it to rayapp/deploy/instances.py")
                    continue
                req = res.get("requests", {})
                keep = 1 - KUBE_RESERVED_FRACTION
                if _quantity(req.get("cpu", 0)) > keep * spec_i.vcpus:
                    errors.append(f"{name}: requests {req.get('cpu')} CPUs; {inst} has {spec_i.vcpus} "
                                  f"(less the node's own share)")
                if _quantity(req.get("memory", 0)) > keep * spec_i.memory_bytes:
                    errors.append(f"{name}: requests {req.get('memory')} of memory; {inst} has "
                                  f"{spec_i.memory_bytes / 2**30:.0f} GiB (less the node's own share)")
                if gpu and gpu != spec_i.gpus:
                    errors.append(f"{name}: requests {gpu} GPUs; {inst} has {spec_i.gpus}")
    for name, g in groups[1:]:
        for key in ("groupName", "minReplicas", "maxReplicas"):
            if key not in g:
                errors.append(f"{name}: missing {key}")
        if g.get("minReplicas", 0) > g.get("maxReplicas", 0) or g.get("minReplicas", 0) != 0:
            errors.append(f"{name}: minReplicas must be 0 (autoscale from zero) and <= maxReplicas")
    return errors


# ----------------------------------------------------------------------------------------------
# placement of a run's stages


@dataclass
class Request:
    stage: str
    bundles: list[dict[str, float]]
    strategy: str  # STRICT_PACK: all bundles on one node; else anywhere


def stage_requests(cfg) -> list[Request]:
    """What each stage of a run asks Ray for, as bundles (one per actor or worker): the stages' own
    placements (``Stage.placements``), the same objects their Ray calls are made from."""
    from rayapp.common.placement import run_placements

    out = []
    for p in run_placements(cfg):
        if p.kind == "actor pool":
            # a pool starts with min_count actors; on an autoscaling cluster that is the full pool
            out.append(Request(p.stage, [p.ray_bundle()] * (p.min_count or p.count), "ANY"))
        elif p.kind == "vLLM engines":  # a placement group per engine
            for k in range(p.groups):
                out.append(Request(f"{p.stage} (vLLM engine {k + 1})", [p.ray_bundle()] * p.count, p.strategy))
        else:
            out.append(Request(p.stage, [p.ray_bundle()] * p.count, p.strategy))
    return out


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(v <= node.get(k, 0) + 1e-9 for k, v in bundle.items() if v > 0)


def _per_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    need = {k: v for k, v in bundle.items() if v > 0}
    if not need:
        return 10**6
    return min(int(node.get(k, 0) // v + 1e-9) for k, v in need.items())


def check_placement(cfg, node_types: list[NodeType], where: str = "cluster") -> list[str]:
    """Each stage's bundles against the node types: a STRICT_PACK set on one node of one type,
    other sets across up to max_workers nodes of every type that fits them."""
    errors = []
    for req in stage_requests(cfg):
        bundle = req.bundles[0]
        if req.strategy == "STRICT_PACK":
            total = {k: sum(b.get(k, 0) for b in req.bundles) for k in bundle}
            if not any(_fits(total, t.capacity()) and t.max_workers > 0 for t in node_types):
                errors.append(f"{req.stage}: {len(req.bundles)} x {_show(bundle)} on one node (STRICT_PACK): no node "
                              f"type of {where} holds them")
            continue
        fitting = [t for t in node_types if _fits(bundle, t.capacity()) and t.max_workers > 0]
        if not fitting:
            errors.append(f"{req.stage}: {_show(bundle)}: no node type of {where} has it")
            continue
        room = sum(_per_node(bundle, t.capacity()) * t.max_workers for t in fitting)
        if room < len(req.bundles):
            errors.append(f"{req.stage}: {len(req.bundles)} x {_show(bundle)} but {where}'s node types hold at most "
                          f"{room} ({', '.join(f'{t.name} x {t.max_workers}' for t in fitting)})")
    return errors


def _show(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items() if v > 0) + "}"


# ----------------------------------------------------------------------------------------------
# files


def check_files(paths: list[str], configs: list[str] = (), head_policy: str | None = None) -> list[str]:
    """`rayapp check-cluster`: each cluster file (launcher YAML or KubeRay manifest) on its own,
    then each run config's stages against each file's node types. Errors name the file."""
    import json
    import os

    import yaml

    from rayapp.config import load_config

    errors, node_types = [], {}
    for path in paths:
        with open(path) as f:
            text = f.read()
        doc = yaml.safe_load(text)
        if doc.get("kind") in ("RayCluster", "RayJob"):
            found = check_kuberay(doc, text)
            node_types[path] = kuberay_node_types(doc) if not found else None
        else:
            policy = head_policy or os.path.join(os.path.dirname(path), "aws-iam", "head-policy.json")
            pol = json.load(open(policy)) if _provider(doc) == "aws" and os.path.exists(policy) else {}
            found = check_launcher(doc, pol)
            node_types[path] = launcher_node_types(doc) if not found else None
        errors += [f"{path}: {e}" for e in found]
    for config in configs:
        cfg = load_config(config)
        for path, types in node_types.items():
            if types is not None:
                errors += [f"{config} on {path}: {e}" for e in check_placement(cfg, types, os.path.basename(path))]
    return errors
