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


def gpu_bytes(accelerator_type: str | None) -> int | None:
    if accelerator_type is None:
        return None
    gib = ACCELERATOR_GIB.get(accelerator_type)
    return None if gib is None else int(gib * GIB)
