"""GPU memory by Ray accelerator type (what ``torch.cuda.mem_get_info`` reports as total)."""

from __future__ import annotations

GIB = 2**30

# Ray labels a node with the GPU's model ("A100", not its memory size), so a bare "A100" is
# planned as the 40 GB card (the cloud configs' p4d.24xlarge / a2-highgpu-8g); name "A100-80G"
# (a label Ray does not add by itself) to plan for the larger one.
ACCELERATOR_GIB: dict[str, float] = {
    "T4": 14.6,
    "V100": 15.8,
    "A10G": 22.3,
    "A10": 22.1,
    "L4": 22.0,
    "L40S": 44.4,
    "A100": 39.4,
    "A100-40G": 39.4,
    "A100-80G": 79.1,
    "H100": 79.1,
    "H200": 139.8,
}


# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s): what MFU and scoring's
# forward-FLOP share are measured against (the A10G, AWS's variant of the A10, has 70 of the A10's 125).
ACCELERATOR_BF16_FLOPS: dict[str, float] = {
    "A10G": 70e12,
    "L4": 121e12,
    "L40S": 362e12,
    "A100": 312e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
}


def accelerator_in(device_name: str) -> str | None:
    """The accelerator type a device name (``torch.cuda.get_device_name()``) names, e.g. "H100" in
    "NVIDIA H100 80GB HBM3": the longest known type it contains, so "L40S" is not taken for "L4"."""
    found = [k for k in ACCELERATOR_BF16_FLOPS if k in device_name.upper()]
    return max(found, key=len) if found else None


def gpu_bytes(accelerator_type: str | None) -> int | None:
    if accelerator_type is None:
        return None
    gib = ACCELERATOR_GIB.get(accelerator_type)
    return None if gib is None else int(gib * GIB)
