"""The cloud instance types the cluster configs name: GPUs, vCPUs and memory, as the providers
publish them. The checks compare what a config declares (Ray resources, pod requests) with these."""

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


# AWS: memory in GiB, as EC2 lists it.
AWS = {
    "m6i.2xlarge": InstanceType(0, None, 8, 32 * GIB),
    "m6i.4xlarge": InstanceType(0, None, 16, 64 * GIB),
    "g5.xlarge": InstanceType(1, "A10G", 4, 16 * GIB),
    "g5.2xlarge": InstanceType(1, "A10G", 8, 32 * GIB),
    "g5.12xlarge": InstanceType(4, "A10G", 48, 192 * GIB),
    "g5.48xlarge": InstanceType(8, "A10G", 192, 768 * GIB),
    "g6.2xlarge": InstanceType(1, "L4", 8, 32 * GIB),
    "g6.12xlarge": InstanceType(4, "L4", 48, 192 * GIB),
    "p4d.24xlarge": InstanceType(8, "A100", 96, 1152 * GIB),
    "p4de.24xlarge": InstanceType(8, "A100-80G", 96, 1152 * GIB),
    "p5.48xlarge": InstanceType(8, "H100", 192, 2048 * GIB),
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
    "a2-ultragpu-8g": InstanceType(8, "A100-80G", 96, 1360 * GB),
    "a3-highgpu-8g": InstanceType(8, "H100", 208, 1872 * GB),
}

ALL = {**AWS, **GCP}

# What a node keeps for itself (kubelet, system daemons): a pod's requests must leave this much.
KUBE_RESERVED_FRACTION = 0.05
