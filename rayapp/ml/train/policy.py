"""Training's choices that `rayapp plan` budgets memory for: decided here, below both the training
worker (which applies them) and ops/plan/memory.py (which sizes them), so neither imports the other.
"""

from __future__ import annotations

# The caching allocator's setting for training workers (ml/train/runner.py puts it in their env):
# freed blocks' pages are unmapped and remapped where a new allocation needs them, so the gap
# between reserved and allocated memory stays small.
ALLOCATOR_CONF = "expandable_segments:True"


def adamw_fused(device_type: str) -> bool:
    """Whether rayapp's AdamW runs fused (ml/train/worker.py asks, the plan assumes it): on CUDA, where
    torch's default is the foreach implementation, whose step allocates a copy of every local
    parameter at once; the fused kernel updates in place. Elsewhere torch's default stays (on a CPU,
    the for-loop implementation: the numerics of every CPU run are unchanged)."""
    return device_type == "cuda"


def defer_gradient_sync(setting: str, params: int, gpu_total: int | None, sharded: bool) -> bool:
    """Whether FSDP2 reduce-scatters once per optimizer step (``TrainConfig.gradient_sync``): always
    for "step", never for "micro_batch" or an unsharded model; for "auto", when the unsharded fp32
    gradients it keeps in between take at most a quarter of the GPU (``gpu_total`` None: on CPU,
    always)."""
    if not sharded or setting == "micro_batch":
        return False
    return setting == "step" or gpu_total is None or 4 * params <= gpu_total // 4
