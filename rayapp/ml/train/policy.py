"""Training's choices that `rayapp plan` budgets memory for: decided here, below both the training
worker (which applies them) and ops/plan/memory.py (which sizes them), so neither imports the other.
"""

from __future__ import annotations

# The caching allocator's setting for training workers (ml/train/runner.py puts it in their env):
# freed blocks' pages are unmapped and remapped where a new allocation needs them, so the gap
# between reserved and allocated memory stays small.
ALLOCATOR_CONF = "expandable_segments:True"


def epoch_end_saves(epochs: int) -> int:
    """Sharded checkpoints a training run saves at epoch ends (the worker's cadence, which the plan's
    disk and I/O estimates count): none after the last epoch, whose final export supersedes it."""
    return epochs - 1


def keep_weights_gathered(params: int, gpu_total: int | None, sharded: bool, bf16: bool) -> bool:
    """Whether FSDP2 keeps a small model's weights gathered through an optimizer step: gathered once
    at the step's first forward and resharded after its last backward, instead of re-gathered in
    every micro-batch's forward and again in its backward (``shard_fsdp2(keep_gathered=True)``;
    OPT-350M: 25 all-gathers a step instead of 400 at 8 micro-batches). When the whole model's
    compute-dtype copy takes at most a tenth of the GPU (on CPU, always)."""
    if not sharded:
        return False
    return gpu_total is None or (2 if bf16 else 4) * params <= gpu_total // 10


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
