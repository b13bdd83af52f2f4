"""The cloud instance types the cluster configs name: GPUs, vCPUs, memory and local NVMe, as the
providers publish them, and the disks a node can stage models and checkpoints on, with the write
rate each gets. The checks compare what a config declares (Ray resources, pod requests, disks) with
these; benchmarks/estimates.py prices checkpoint I/O with the same disk figures."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
GB = 10**9


@dataclass(frozen=True)
class InstanceType:
    gpus: int
    accelerator: str | None  # as Ray labels it (accelerator_type)
    vcpus: int
    memory_bytes: int
    # local NVMe that comes with the instance (AWS instance store; GCP A3/A2-ultra bundled local SSD)
    local_nvme_bytes: int = 0


# AWS: memory in GiB, as EC2 lists it.
AWS = {
    "m6i.2xlarge": InstanceType(0, None, 8, 32 * GIB),
    "m6i.4xlarge": InstanceType(0, None, 16, 64 * GIB),
    "g5.xlarge": InstanceType(1, "A10G", 4, 16 * GIB, 250 * GB),
    "g5.2xlarge": InstanceType(1, "A10G", 8, 32 * GIB, 450 * GB),
    "g5.12xlarge": InstanceType(4, "A10G", 48, 192 * GIB, 3800 * GB),
    "g5.48xlarge": InstanceType(8, "A10G", 192, 768 * GIB, 2 * 3800 * GB),
    "g6.2xlarge": InstanceType(1, "L4", 8, 32 * GIB, 450 * GB),
    "g6.12xlarge": InstanceType(4, "L4", 48, 192 * GIB, 4 * 940 * GB),
    "p4d.24xlarge": InstanceType(8, "A100", 96, 1152 * GIB, 8 * 1000 * GB),
    "p4de.24xlarge": InstanceType(8, "A100-80G", 96, 1152 * GIB, 8 * 1000 * GB),
    "p5.48xlarge": InstanceType(8, "H100", 192, 2048 * GIB, 8 * 3840 * GB),
}

# GCP: memory in GB, as Compute Engine lists it. G2, A2 and A3 machine types come with their GPUs
# attached; N1 types get them through guestAccelerators (gpus 0 here).
GCP = {
    "n2-standard-8": InstanceType(0, None, 8, 32 * GB),
    "n2-standard-16": InstanceType(0, None, 16, 64 * GB),
    "n1-standard-8": InstanceType(0, None, 8, 30 * GB),
    "g2-standard-8": InstanceType(1, "L4", 8, 32 * GB),
    "g2-standard-48": InstanceType(4, "L4", 48, 192 * GB),
    "g2-standard-96": InstanceType(8, "L4", 96, 384 * GB),
    "a2-highgpu-1g": InstanceType(1, "A100", 12, 85 * GB),
    "a2-highgpu-8g": InstanceType(8, "A100", 96, 680 * GB),
    "a2-ultragpu-8g": InstanceType(8, "A100-80G", 96, 1360 * GB, 8 * 375 * GIB),
    "a3-highgpu-8g": InstanceType(8, "H100", 208, 1872 * GB, 16 * 375 * GIB),
}

ALL = {**AWS, **GCP}

# What a node keeps for itself (kubelet, system daemons): a pod's requests must leave this much.
KUBE_RESERVED_FRACTION = 0.05

# ---- disks ---------------------------------------------------------------------------------------

MIB = 2**20
# The NVIDIA driver the image's CUDA 13 wheels need (cluster/Dockerfile).
MIN_NVIDIA_DRIVER = 580
# A Kubernetes node's disk is not all the pods': the kubelet evicts below 10 % free (its default
# hard threshold nodefs.available<10%), and the node's OS and the pulled images sit on it too.
KUBE_EVICTION_FREE_FRACTION = 0.10
# Assumed: the OS, the container runtime and the rayapp image (~15 GB compressed, ~35 GB unpacked)
# on a node's boot disk. A launcher host runs a deep-learning OS image (several CUDA toolkits).
KUBE_NODE_SYSTEM_BYTES = 60 * GB
LAUNCHER_HOST_SYSTEM_BYTES = 120 * GB
# Assumed sequential write rate of an instance's local NVMe (one device; the DLAMI stripes all of
# them at /opt/dlami/nvme, so p4d's 8 devices write faster than this): a conservative floor.
LOCAL_NVME_WRITE_BYTES_PER_S = 1e9
# EBS: gp3 gets 125 MiB/s unless the volume provisions more (Throughput, MiB/s); gp2 up to 250 MiB/s
# from 334 GiB (128 MiB/s below); st1/sc1 are throughput HDDs (per TiB, capped).
GP3_BASELINE_MIBPS = 125
# GCP zonal Persistent Disk: write throughput per GiB of disk, capped per instance (GCP's published
# limits; the Compute Engine API's default disk type, what Ray's GCP provider gets, is pd-standard).
PD_MIBPS_PER_GIB = {"pd-standard": 0.12, "pd-balanced": 0.28, "pd-ssd": 0.48}
PD_MAX_WRITE_MIBPS = {"pd-standard": 400, "pd-balanced": 1200, "pd-ssd": 1200}


@dataclass(frozen=True)
class Disk:
    """The disk a node keeps its model cache and training staging on (RAYAPP_CACHE_DIR, HF_HOME)."""

    kind: str  # gp3, gp2, io2, pd-ssd, ..., instance-store
    size_bytes: int
    write_bytes_per_s: float
    system_bytes: int = 0  # what the OS and the image take on it (a boot disk); the rest is free

    @property
    def free_bytes(self) -> int:
        return max(0, self.size_bytes - self.system_bytes)

    def describe(self) -> str:
        return f"{self.kind} {self.size_bytes / GIB:,.0f} GiB at {self.write_bytes_per_s / MIB:,.0f} MiB/s"


class DiskSpecError(ValueError):
    pass


def ebs_disk(volume_type: str, size_gib: float, throughput_mibps: float | None = None, iops: int | None = None,
             system_bytes: int = 0) -> Disk:
    """An EBS volume as a BlockDeviceMappings entry (or an EKS node group) describes it."""
    kind = (volume_type or "gp2").lower()  # EC2's default VolumeType is gp2
    if kind == "gp3":
        mibps = throughput_mibps or GP3_BASELINE_MIBPS
    elif kind == "gp2":
        mibps = 250 if size_gib >= 334 else 128
    elif kind in ("io1", "io2"):
        mibps = min(4000, (iops or 3000) * 256 / 1024)  # 256 KiB I/Os at the provisioned IOPS
    elif kind in ("st1", "sc1"):
        per_tib, cap = (40, 500) if kind == "st1" else (12, 250)
        mibps = min(cap, per_tib * size_gib / 1024)
    else:
        raise DiskSpecError(f"unknown EBS volume type {volume_type!r} (gp3, gp2, io1, io2, st1, sc1)")
    return Disk(kind, int(size_gib * GIB), mibps * MIB, system_bytes)


def pd_disk(disk_type: str, size_gib: float, system_bytes: int = 0) -> Disk:
    """A GCP zonal Persistent Disk; a bare or missing type is the API's default, pd-standard."""
    kind = (disk_type or "pd-standard").rsplit("/", 1)[-1]  # a zones/.../diskTypes/pd-ssd URL or the name
    if kind not in PD_MIBPS_PER_GIB:
        raise DiskSpecError(f"unknown Persistent Disk type {disk_type!r} ({', '.join(PD_MIBPS_PER_GIB)})")
    mibps = min(PD_MAX_WRITE_MIBPS[kind], PD_MIBPS_PER_GIB[kind] * size_gib)
    return Disk(kind, int(size_gib * GIB), mibps * MIB, system_bytes)


def instance_store(instance: str, system_bytes: int = 0) -> Disk:
    """The instance's own NVMe, all devices together (what /opt/dlami/nvme or a RAID0 of them holds)."""
    spec = ALL.get(instance)
    if spec is None:
        raise DiskSpecError(f"unknown instance type {instance!r}; add it to rayapp/ops/deploy/instances.py")
    if not spec.local_nvme_bytes:
        raise DiskSpecError(f"{instance} has no local NVMe (instance store)")
    return Disk("instance-store", spec.local_nvme_bytes, LOCAL_NVME_WRITE_BYTES_PER_S, system_bytes)


def parse_disk(spec: str, instance: str, system_bytes: int = 0) -> Disk:
    """A disk as the KubeRay manifests state a node pool's (annotation rayapp.io/node-disk):
    ``instance-store``, ``gp3 300Gi``, ``gp3 1000Gi 1000MiBps``, ``pd-ssd 2500Gi``."""
    parts = spec.split()
    if not parts:
        raise DiskSpecError("empty disk description")
    kind, rest = parts[0].lower(), parts[1:]
    if kind == "instance-store":
        if rest:
            raise DiskSpecError(f"{spec!r}: instance-store takes no size (it is the instance type's)")
        return instance_store(instance, system_bytes)
    size = next((p for p in rest if p.endswith(("Gi", "GiB", "Ti", "TiB"))), None)
    rate = next((p for p in rest if p.lower().endswith("mibps")), None)
    if size is None or len(rest) != (1 if rate is None else 2):
        raise DiskSpecError(f"{spec!r}: write TYPE SIZE [THROUGHPUT], e.g. 'gp3 1000Gi 1000MiBps' or 'pd-ssd 2500Gi'")
    num = float(size.rstrip("BiGT"))
    gib = num * 1024 if "T" in size else num
    if kind in PD_MIBPS_PER_GIB:
        if rate:
            raise DiskSpecError(f"{spec!r}: a Persistent Disk's throughput follows from its size")
        return pd_disk(kind, gib, system_bytes)
    return ebs_disk(kind, gib, float(rate[:-5]) if rate else None, system_bytes=system_bytes)
