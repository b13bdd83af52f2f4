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
- ``check_needs``: what those stages need of the node types beyond CPUs and GPUs: the Hugging Face
  token on every node that loads a gated model, disk for model downloads and a staged checkpoint,
  and a disk fast enough to stage the checkpoints of the training stages.

Both cluster formats also state, and the checks read: the NVIDIA driver the image needs (>= 580:
a host-side check on launcher GPU nodes, a node-pool label the KubeRay GPU groups require), the
disk each node type stages models and checkpoints on (launcher: the boot volume or the instance's
NVMe mounted as the cache; KubeRay: the node pool's disk, annotation rayapp.io/node-disk), and
where each container's HF_TOKEN comes from (a Secret; a secrets file the host fetches from the
cloud's secret manager).
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field

from rayapp.ops.deploy.instances import (
    ALL,
    AWS,
    GB,
    GCP,
    KUBE_EVICTION_FREE_FRACTION,
    KUBE_NODE_SYSTEM_BYTES,
    KUBE_RESERVED_FRACTION,
    LAUNCHER_HOST_SYSTEM_BYTES,
    MIN_NVIDIA_DRIVER,
    Disk,
    DiskSpecError,
    ebs_disk,
    instance_store,
    parse_disk,
    pd_disk,
)

STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}
# Actions a head node with its own instance profile needs to run the autoscaler (Ray creates them
# only for the profile it makes itself).
HEAD_ACTIONS = ("ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances",
                "iam:PassRole")


# Where the DLAMI mounts an instance's local NVMe (all devices of it): a cache mounted from here is
# on the instance store, not on the boot volume.
DLAMI_NVME = "/opt/dlami/nvme"
# The node-pool label the KubeRay GPU groups require: the NVIDIA driver's major version, which the
# operator sets on each GPU node pool (cluster/README.md); the autoscaler knows it before a node exists.
DRIVER_LABEL = "rayapp.io/nvidia-driver-major"
# A checkpoint save blocks every training worker: staging one should not take longer than this.
SLOW_CHECKPOINT_SAVE_S = 300


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int
    instance: str | None = None
    labels: dict[str, float] = field(default_factory=dict)
    head: bool = False
    # where the container's HF_TOKEN comes from ("secretKeyRef rayapp-secrets/hf-token"); None: nowhere
    hf_token: str | None = None
    # per instance type the node type may be: the disk RAYAPP_CACHE_DIR and HF_HOME are on
    disks: dict[str, Disk] = field(default_factory=dict)
    # KubeRay: the pod is evicted when its ephemeral storage (the cache volume) passes this
    cache_limit_bytes: int | None = None

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


@dataclass
class RunOptions:
    """What a node's `docker run` options give its container: environment, env files, mounts."""

    env: dict[str, str | None] = field(default_factory=dict)  # None: passed through from the host
    env_files: list[str] = field(default_factory=list)
    mounts: dict[str, str] = field(default_factory=dict)  # container path -> host path


def _parse_run_options(options: list[str]) -> RunOptions:
    out = RunOptions()
    tokens = [tok for opt in options for tok in shlex.split(str(opt))]
    i = 0
    while i < len(tokens):
        tok, value = tokens[i], None
        for flag in ("--env-file", "--env", "-e", "--volume", "-v"):
            if tok == flag and i + 1 < len(tokens):
                value, i = tokens[i + 1], i + 1
            elif tok.startswith(flag + "=") and flag.startswith("--"):
                value = tok[len(flag) + 1:]
            else:
                continue
            if flag == "--env-file":
                out.env_files.append(value)
            elif flag in ("--env", "-e"):
                key, eq, val = value.partition("=")
                out.env[key] = val if eq else None
            else:
                host, _, rest = value.partition(":")
                out.mounts[rest.split(":")[0]] = host
            break
        i += 1
    return out


def _run_options(doc: dict, name: str) -> RunOptions:
    """The node type's docker options as Ray builds them: `run_options` plus `head_run_options` or
    `worker_run_options`; a worker type's own `docker:` section overrides the cluster's keys (the
    head's container uses the cluster's section: `ray up` starts it from there)."""
    head = name == doc.get("head_node_type")
    docker = dict(doc.get("docker", {}))
    if not head:
        docker.update(doc.get("available_node_types", {}).get(name, {}).get("docker", {}))
    options = list(docker.get("run_options", [])) + list(docker.get("head_run_options" if head else
                                                                  "worker_run_options", []))
    return _parse_run_options(options)


def _init_commands(doc: dict, name: str) -> list[str]:
    """The host commands run before the node's container starts: a worker type's own list replaces
    the cluster's; the head always runs the cluster's (`ray up` reads nothing else)."""
    if name == doc.get("head_node_type"):
        return list(doc.get("initialization_commands", []))
    t = doc.get("available_node_types", {}).get(name, {})
    return list(t.get("initialization_commands", doc.get("initialization_commands", [])))


def _host_path(doc: dict, path: str) -> str:
    """A host path as the initialization commands write it (~ is the SSH user's home)."""
    user = doc.get("auth", {}).get("ssh_user", "ubuntu")
    return f"/home/{user}/{path[2:]}" if path.startswith("~/") else path


def launcher_hf_token(doc: dict, name: str) -> str | None:
    """Where a launcher node's container gets HF_TOKEN: an env file on the host that one of the
    node's initialization commands writes HF_TOKEN into (from the cloud's secret manager)."""
    opts = _run_options(doc, name)
    for env_file in opts.env_files:
        target = _host_path(doc, env_file)
        for cmd in _init_commands(doc, name):
            cmd = " ".join(str(cmd).split())
            written = {_host_path(doc, p) for p in re.findall(r"(?:>>?|tee -a|tee)\s*(\S+)", cmd)}
            if target in written and "HF_TOKEN" in cmd:
                return f"--env-file {env_file}, written by an initialization command"
    return None


def launcher_disk(doc: dict, name: str) -> Disk:
    """The disk a launcher node keeps its cache on: the instance's NVMe where RAYAPP_CACHE_DIR is
    mounted from the DLAMI's instance-store mount, else the boot volume (the container's own
    filesystem, or a host folder on it), less what the OS and the image take there."""
    t = doc["available_node_types"][name]
    node_config = t.get("node_config", {})
    inst = _instance(doc, node_config)
    opts = _run_options(doc, name)
    cache = opts.env.get("RAYAPP_CACHE_DIR")
    host = next((h for c, h in opts.mounts.items() if cache and (cache == c or cache.startswith(c.rstrip("/") + "/"))),
                None)
    if host and host.startswith(DLAMI_NVME):
        return instance_store(inst or "")
    if _provider(doc) == "aws":
        mappings = node_config.get("BlockDeviceMappings", [])
        root = next((m for m in mappings if m.get("DeviceName") in ("/dev/sda1", "/dev/xvda")), None)
        if root is None or "VolumeSize" not in root.get("Ebs", {}):
            raise DiskSpecError("no root volume size (BlockDeviceMappings /dev/sda1): the AMI's default root "
                                "volume cannot hold the image, model downloads and checkpoint staging")
        ebs = root["Ebs"]
        return ebs_disk(ebs.get("VolumeType", "gp2"), ebs["VolumeSize"], ebs.get("Throughput"), ebs.get("Iops"),
                        LAUNCHER_HOST_SYSTEM_BYTES)
    boot = next((d for d in node_config.get("disks", []) if d.get("boot")), None)
    params = (boot or {}).get("initializeParams", {})
    if "diskSizeGb" not in params:
        raise DiskSpecError("no boot disk size (disks: boot: true, initializeParams.diskSizeGb)")
    return pd_disk(params.get("diskType", "pd-standard"), float(params["diskSizeGb"]), LAUNCHER_HOST_SYSTEM_BYTES)


def _driver_check_minimum(commands: list[str]) -> int | None:
    """The driver major version a host-side check (nvidia-smi --query-gpu=driver_version ... -ge N)
    requires before the container starts, or None when no command checks it."""
    for cmd in commands:
        cmd = str(cmd)
        if "--query-gpu=driver_version" in cmd:
            found = re.search(r"-ge\s+(\d+)", cmd)
            if found:
                return int(found.group(1))
    return None


def launcher_node_types(doc: dict) -> list[NodeType]:
    """Node types as the autoscaler sees them: declared resources, with AWS's own detection of
    CPUs and GPUs from the instance type where the config leaves them out (GCP detects nothing),
    plus where each one's container gets HF_TOKEN and the disk its cache is on."""
    out = []
    for name, t in doc.get("available_node_types", {}).items():
        res = dict(t.get("resources", {}))
        inst = _instance(doc, t.get("node_config", {}))
        spec = AWS.get(inst or "") if _provider(doc) == "aws" else None
        if spec:
            res.setdefault("CPU", spec.vcpus)
            res.setdefault("GPU", spec.gpus)
        head = name == doc.get("head_node_type")
        try:
            disks = {inst: launcher_disk(doc, name)} if inst else {}
        except DiskSpecError:
            disks = {}  # check_launcher says why
        out.append(NodeType(name, res, 1 if head else int(t.get("max_workers", 0)), inst, head=head,
                            hf_token=launcher_hf_token(doc, name), disks=disks))
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
            errors.append(f"{where}: unknown instance type; add it to rayapp/ops/deploy/instances.py")
            continue
        ami = str(node_config.get("ImageId", "")).strip()
        if provider == "aws" and (not ami or ami.lower() == "latest_dlami"):
            errors.append(f"{where}: no ImageId: Ray's default AMI is an old DLAMI whose NVIDIA driver is too old "
                          "for current CUDA wheels")
        for key, value in _run_options(doc, name).env.items():
            if value and any(w in key.upper() for w in ("KEY", "TOKEN", "SECRET")):
                errors.append(f"{where}: secret {key} written in docker run options (fetch it on the host into "
                              "an --env-file from the cloud's secret manager)")
        try:
            launcher_disk(doc, name)
        except DiskSpecError as exc:
            errors.append(f"{where}: {exc}")
        if gpus:
            errors += [f"{where}: {e}" for e in _launcher_driver_errors(doc, name, node_config)]
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


def _launcher_driver_errors(doc: dict, name: str, node_config: dict) -> list[str]:
    """A GPU node's driver is checked before its container starts (the AMI or image resolves at
    launch, so only the host knows the driver), and a GCP image family that names its driver
    (...-nvidia-580) names one new enough."""
    errors = []
    minimum = _driver_check_minimum(_init_commands(doc, name))
    if minimum is None or minimum < MIN_NVIDIA_DRIVER:
        errors.append(f"no initialization command checks the NVIDIA driver >= {MIN_NVIDIA_DRIVER} (nvidia-smi "
                      f"--query-gpu=driver_version ... -ge {MIN_NVIDIA_DRIVER}) before the container starts: the "
                      "image's CUDA 13 wheels fail on an older driver only once a stage uses the GPU"
                      + (f" (the check there asks for {minimum})" if minimum is not None else ""))
    for d in node_config.get("disks", []):
        image = str(d.get("initializeParams", {}).get("sourceImage", ""))
        named = re.search(r"nvidia-(\d+)", image)
        if named and int(named.group(1)) < MIN_NVIDIA_DRIVER:
            errors.append(f"boot image {image} has NVIDIA driver {named.group(1)}; the image's CUDA 13 wheels need "
                          f">= {MIN_NVIDIA_DRIVER}")
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


def _annotation(group: dict, key: str) -> str | None:
    return group.get("template", {}).get("metadata", {}).get("annotations", {}).get(key)


def group_disks(group: dict) -> dict[str, Disk]:
    """The disk each instance type's node pool gives its pods' ephemeral storage (emptyDir volumes,
    container layers), from the group's annotation rayapp.io/node-disk:
    ``p4d.24xlarge: instance-store; a2-highgpu-8g: pd-ssd 2500Gi``."""
    spec = _annotation(group, "rayapp.io/node-disk")
    if not spec:
        return {}
    out = {}
    for part in spec.split(";"):
        inst, sep, disk = part.partition(":")
        if not sep:
            raise DiskSpecError(f"rayapp.io/node-disk {part.strip()!r}: write INSTANCE-TYPE: DISK")
        out[inst.strip()] = parse_disk(disk.strip(), inst.strip(), KUBE_NODE_SYSTEM_BYTES)
    return out


def allocatable_ephemeral(disk: Disk) -> int:
    """What the kubelet lets pods use of a node's disk: less its hard eviction threshold, the OS
    and the pulled images."""
    return max(0, int(disk.size_bytes * (1 - KUBE_EVICTION_FREE_FRACTION)) - disk.system_bytes)


def _container_hf_token(container: dict, pod: dict) -> str | None:
    """Where a pod's container gets HF_TOKEN: a Secret by reference (env, envFrom, or a secret
    volume that HF_TOKEN_PATH points into)."""
    env = {e.get("name"): e for e in container.get("env", [])}
    ref = env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    if ref:
        return f"secretKeyRef {ref.get('name')}/{ref.get('key')}"
    for src in container.get("envFrom", []):
        if src.get("secretRef"):
            return f"envFrom secret {src['secretRef'].get('name')} (its HF_TOKEN key)"
    path = env.get("HF_TOKEN_PATH", {}).get("value")
    secrets = {v.get("name") for v in pod.get("volumes", []) if v.get("secret")}
    for m in container.get("volumeMounts", []):
        if path and m.get("name") in secrets and path.startswith(m.get("mountPath", "").rstrip("/") + "/"):
            return f"HF_TOKEN_PATH in secret volume {m.get('name')}"
    return None


def _cache_limit(container: dict, pod: dict) -> int | None:
    """The bytes the pod's cache may hold before the kubelet evicts it: the cache volume's
    sizeLimit, within the container's ephemeral-storage limit."""
    limits = []
    eph = container.get("resources", {}).get("limits", {}).get("ephemeral-storage")
    if eph:
        limits.append(_quantity(eph))
    cache_dir = next((e.get("value") for e in container.get("env", []) if e.get("name") == "RAYAPP_CACHE_DIR"), None)
    mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts", [])}
    vol = next((v for v in pod.get("volumes", []) if v.get("name") == mounts.get(cache_dir)), {})
    if vol.get("emptyDir", {}).get("sizeLimit"):
        limits.append(_quantity(vol["emptyDir"]["sizeLimit"]))
    return int(min(limits)) if limits else None


def _group_node_type(group: dict, name: str, max_workers: int, head: bool = False) -> NodeType:
    pod = group["template"]["spec"]
    c = pod["containers"][0]
    lim = c.get("resources", {}).get("limits", {})
    res = {"CPU": math.floor(_quantity(lim.get("cpu", 0))), "GPU": int(lim.get("nvidia.com/gpu", 0)),
           **_worker_labels(group)}
    if head:
        res["CPU"] = float(group.get("rayStartParams", {}).get("num-cpus", res["CPU"]))
    types = [t.strip() for t in (_annotation(group, "rayapp.io/instance-types") or "").split(",") if t.strip()]
    try:
        disks = group_disks(group)
    except DiskSpecError:
        disks = {}  # check_kuberay says why
    return NodeType(name, res, max_workers, types[0] if types else None, head=head,
                    hf_token=_container_hf_token(c, pod), disks=disks, cache_limit_bytes=_cache_limit(c, pod))


def kuberay_node_types(doc: dict) -> list[NodeType]:
    """The worker groups as node types (the head: ``kuberay_head``)."""
    return [_group_node_type(g, g.get("groupName", "?"), int(g.get("maxReplicas", 0)))
            for g in _cluster_spec(doc).get("workerGroupSpecs", [])]


def kuberay_head(doc: dict) -> NodeType:
    """The head group as a node type: no stage's actors land there (num-cpus 0), the job's driver does."""
    return _group_node_type(_cluster_spec(doc)["headGroupSpec"], "head", 1, head=True)


def _driver_affinity_minimum(pod: dict) -> int | None:
    """The lowest NVIDIA driver major version the pod's required node affinity admits through the
    node-pool label rayapp.io/nvidia-driver-major (Gt N admits N + 1; In admits its values), or None."""
    terms = (pod.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    lows = []
    for term in terms:  # terms are ORed: the weakest one decides
        low = None
        for e in term.get("matchExpressions", []):
            if e.get("key") != DRIVER_LABEL:
                continue
            values = [int(v) for v in e.get("values", []) if str(v).isdigit()]
            if e.get("operator") == "Gt" and values:
                low = max(low or 0, values[0] + 1)
            elif e.get("operator") == "In" and values:
                low = max(low or 0, min(values))
        lows.append(low)
    selector = pod.get("nodeSelector", {}).get(DRIVER_LABEL)
    if selector is not None and str(selector).isdigit():
        lows = [max(low or 0, int(selector)) for low in lows] or [int(selector)]
    return None if not lows or None in lows else min(lows)


def _kuberay_disk_errors(group: dict, container: dict, pod: dict, types: str) -> list[str]:
    """A pod's ephemeral storage against the disk of each node pool it may land on, and its cache
    volume within its ephemeral-storage limit (the kubelet evicts a pod over either)."""
    try:
        disks = group_disks(group)
    except DiskSpecError as exc:
        return [str(exc)]
    res = container.get("resources", {})
    req = res.get("requests", {}).get("ephemeral-storage")
    if req is None:
        return []
    errors = []
    for inst in [t.strip() for t in types.split(",") if t.strip()]:
        disk = disks.get(inst)
        if disk is None:
            example = "instance-store" if ALL.get(inst) and ALL[inst].local_nvme_bytes else \
                "pd-balanced 300Gi" if inst in GCP else "gp3 300Gi 500MiBps"
            errors.append(f"requests {req} of ephemeral storage: state the disk of the {inst} node pool (annotation "
                          f"rayapp.io/node-disk, e.g. '{inst}: {example}')")
            continue
        room = allocatable_ephemeral(disk)
        if _quantity(req) > room:
            errors.append(f"requests {req} of ephemeral storage; a {inst} node with {disk.describe()} allows pods "
                          f"{room / 2**30:.0f} GiB (less {KUBE_EVICTION_FREE_FRACTION:.0%} eviction reserve, the OS "
                          f"and images: {disk.system_bytes / GB:.0f} GB)")
    limit = res.get("limits", {}).get("ephemeral-storage")
    cache_dir = next((e.get("value") for e in container.get("env", []) if e.get("name") == "RAYAPP_CACHE_DIR"), None)
    mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts", [])}
    vol = next((v for v in pod.get("volumes", []) if v.get("name") == mounts.get(cache_dir)), {})
    size = vol.get("emptyDir", {}).get("sizeLimit")
    if limit and size and _quantity(size) > _quantity(limit):
        errors.append(f"cache volume sizeLimit {size} is over the container's ephemeral-storage limit {limit}: the "
                      "pod is evicted before the cache is full")
    return errors


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
            errors += [f"{name}: {e}" for e in _kuberay_disk_errors(group, c, pod, types)]
            if gpu:
                low = _driver_affinity_minimum(pod)
                if low is None or low < MIN_NVIDIA_DRIVER:
                    errors.append(f"{name}: GPU pods must require NVIDIA driver >= {MIN_NVIDIA_DRIVER} (the image's CUDA "
                                  f"13 wheels): a required node affinity on the node-pool label {DRIVER_LABEL}, e.g. "
                                  f"Gt {MIN_NVIDIA_DRIVER - 1}" + (f" (it admits {low})" if low is not None else ""))
            for inst in types.split(","):
                spec_i = ALL.get(inst.strip())
                if spec_i is None:
                    errors.append(f"{name}: unknown instance type {inst}; add it to rayapp/ops/deploy/instances.py")
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
    from rayapp.pipeline import placements as run_placements

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
# what a run needs of its nodes beyond CPUs and GPUs


def _lands_on(p, t: NodeType) -> bool:
    """Whether a stage's placement can put work on node type ``t`` (as check_placement reads it)."""
    if t.max_workers <= 0:
        return False
    bundle = p.ray_bundle()
    if p.strategy == "STRICT_PACK":
        bundle = {k: v * p.count for k, v in bundle.items()}
    return _fits(bundle, t.capacity())


def stages_on(cfg, node_types: list[NodeType]) -> dict[str, list[str]]:
    """What may run on each node type: the stages whose placement fits it; on the head, the job's
    driver (needs.DRIVER: it stages the hub's repositories for every stage) and the stages without a
    placement, which the driver runs itself."""
    from rayapp.ops.deploy.needs import DRIVER
    from rayapp.pipeline import STAGE_TYPES
    from rayapp.pipeline import placements as run_placements

    placements = run_placements(cfg)
    placed = {p.stage for p in placements}
    out = {}
    for t in node_types:
        if t.head:
            out[t.name] = [DRIVER] + [s for s in STAGE_TYPES if s not in placed]
        else:
            out[t.name] = list(dict.fromkeys(p.stage for p in placements if _lands_on(p, t)))
    return out


def check_needs(cfg, node_types: list[NodeType], where: str = "cluster") -> list[str]:
    """Per node type, what the stages that may run there need: HF_TOKEN in the container where they
    load a gated model, disk for what they download and stage, and a disk that stages a training
    checkpoint in under SLOW_CHECKPOINT_SAVE_S."""
    from rayapp.ops.deploy.needs import DRIVER, disk_needs, gated_by_stage

    errors = []
    gated = gated_by_stage(cfg)
    needs = disk_needs(cfg)
    where_stages = stages_on(cfg, node_types)
    for t, stages in ((t, where_stages[t.name]) for t in node_types):
        loads = {s: gated[s] for s in stages if s in gated}
        if loads and not t.hf_token:
            models = sorted({m for ms in loads.values() for m in ms})
            who = ", ".join("the job's driver" if s == DRIVER else s for s in loads)
            errors.append(f"{t.name}: HF_TOKEN missing: {who} fetch{'es' if len(loads) == 1 else ''} the gated "
                          f"{', '.join(models)} from the hub here, and the node's container has no token (KubeRay: "
                          "a secretKeyRef on every group; launcher: an --env-file the host writes from the secret "
                          "manager; cluster/README.md)")
        here = [needs[s] for s in stages if s in needs]
        if not here:
            continue
        kept = sum(n.kept for n in here)
        staged = max(n.staged for n in here)
        total = kept + staged
        for inst, disk in t.disks.items():
            room = t.cache_limit_bytes if t.cache_limit_bytes is not None else disk.free_bytes
            what = (f"its cache volume's limit ({room / 2**30:,.0f} GiB)" if t.cache_limit_bytes is not None else
                    f"{disk.describe()} ({room / GB:,.0f} GB free of the OS and image)")
            if total > room:
                parts = "; ".join(f"{n.stage}: {', '.join(n.parts)}" for n in here if n.kept or n.staged)
                errors.append(f"{t.name} ({inst}): the stages here need {total / GB:,.0f} GB of local disk ({parts}) "
                              f"but {what} holds less")
            for n in here:
                if not n.checkpoint:
                    continue
                save_s = n.checkpoint / disk.write_bytes_per_s
                if save_s > SLOW_CHECKPOINT_SAVE_S:
                    errors.append(f"{t.name} ({inst}): {n.stage} stages each checkpoint ({n.checkpoint / GB:,.0f} GB) on "
                                  f"{disk.describe()}: {save_s / 60:,.0f} min a save, {n.saves} saves, every training "
                                  f"worker waiting; use a faster disk (gp3 Throughput, pd-ssd, or the instance's NVMe)")
    return errors


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
            node_types[path] = [kuberay_head(doc)] + kuberay_node_types(doc) if not found else None
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
                name = os.path.basename(path)
                errors += [f"{config} on {path}: {e}" for e in check_placement(cfg, types, name)]
                errors += [f"{config} on {path}: {e}" for e in check_needs(cfg, types, name)]
    return errors
