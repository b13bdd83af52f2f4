"""Per-GPU memory of each stage, from the model's shape and the config (pure arithmetic, in bytes).

Each estimate is a dict of named parts, so `rayapp plan` can show where the memory goes. The
activation counts are per token and per decoder layer, counting the tensors a layer keeps for
its backward pass (training) or holds at its peak (inference), with SDPA/flash attention (no
length x length score matrix). ``benchmarks/memory.py`` measures the parts it can on CPU and
compares them with these numbers.
"""

from __future__ import annotations

# one chunk of logits in the bounded loss, and the model types that take it
from rayapp.ml.models.losses import LOGIT_CHUNK_FLOATS, bounded_loss_supported, chunk_rows
from rayapp.ml.train.policy import (  # noqa: F401  (what the plan budgets for)
    ALLOCATOR_CONF,
    adamw_fused,
    defer_gradient_sync,
    keep_weights_gathered,
)
from rayapp.ops.plan.shapes import ModelShape

GIB = 2**30
CUDA_CONTEXT = int(1.0 * GIB)  # CUDA context, cuBLAS workspaces and allocator slack, per process
NCCL_BUFFERS = int(0.5 * GIB)  # per process in a process group


def _qkv(s: ModelShape) -> int:
    return s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim


def saved_per_token_layer(s: ModelShape) -> int:
    """Elements one decoder layer keeps per token for its backward pass: the two norms' inputs and
    outputs, q/k/v, the attention output, and the MLP's inner tensors (gate, up, activation and
    their product for a gated MLP; fc1's output and the activation otherwise)."""
    attn = 2 * s.hidden + _qkv(s) + 2 * s.hidden
    mlp = 2 * s.hidden + (4 * s.intermediate if s.gated_mlp else 2 * s.intermediate)
    return attn + mlp


def live_per_token_layer(s: ModelShape) -> int:
    """Elements alive per token at a decoder layer's peak in inference: the residual stream, the
    normed input and the widest inner tensors (gate, up and activation at once for a gated MLP)."""
    mlp = (3 if s.gated_mlp else 2) * s.intermediate
    return 2 * s.hidden + max(_qkv(s) + s.hidden, mlp)


# That gap, as a share of what the allocator hands out to training, with expandable segments: an
# estimate, not a measurement (no GPU run has recorded reserved beside allocated memory for rayapp
# yet; the GPU check should). Training counts it as its own part; scoring and vLLM do not.
FRAGMENTATION = 0.05

ADAMW_IMPLS = ("fused", "foreach", "for-loop")


def adamw_step_temporaries(impl: str, trained_local: int, largest_local: int) -> int:
    """Bytes AdamW's step allocates beyond its state, for fp32 parameters (torch/optim/adam.py):
    foreach: ``_foreach_sqrt`` of every second moment (one fp32 copy of the local parameters; the
    rest runs in place); for-loop: ``exp_avg_sq.sqrt() / c`` per parameter (two copies of the
    largest tensor, briefly); fused: none (one kernel updates each tensor in place)."""
    if impl == "fused":
        return 0
    if impl == "foreach":
        return 4 * trained_local
    if impl == "for-loop":
        return 8 * largest_local
    raise ValueError(f"unknown AdamW implementation {impl!r} (one of {', '.join(ADAMW_IMPLS)})")


def training_memory(s: ModelShape, *, world: int, sharded: bool, micro_batch_tokens: int, bf16: bool,
                    activation_checkpointing: bool, defer_gradient_sync: bool, gpu: bool = True,
                    lora_params: int | None = None, adamw: str | None = None,
                    keep_gathered: bool = False, fused_loss: bool = False) -> dict[str, int]:
    """One training worker: fp32 master weights, fp32 gradients and AdamW's two fp32 moments
    (sharded over ``world`` under FSDP), the unsharded compute copies of the units FSDP has
    gathered (the root and two layers: the current one and the prefetched one), the activations of
    one micro-batch, and the loss's logits.

    Under FSDP2 the backward pass also holds unsharded gradients in the compute dtype (the output
    layer's, from the first backward op until the root's reduce-scatter at the end, and the current
    layer's) and one unit's reduce-scatter input in the reduce dtype (fp32: FSDP2 copies a unit's
    gradients into a new flat buffer, upcast under bf16, and keeps it until the next unit's
    reduce-scatter; torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py, foreach_reduce).
    The optimizer step adds its temporaries (``adamw``: the implementation; default, what rayapp
    uses: fused on a GPU, torch's for-loop on a CPU), and on a GPU the caching allocator keeps a
    share of what it hands out in blocks it cannot reuse (fragmentation).

    The parts are summed as if they were all alive at once; the step's temporaries come after the
    backward pass has freed activations and logits, so where they are large (foreach) the sum is
    an upper bound.

    ``lora_params``: only that many (adapter) parameters train; the frozen base has no gradient
    and no optimizer state, and is held in the compute dtype (bf16 under mixed precision). The
    activations stay: the backward pass still goes through every layer to reach the adapters.

    ``keep_gathered`` (policy.keep_weights_gathered, a small model): the whole model's compute
    copy stays gathered through the step, in place of the root and two layers.

    ``fused_loss`` (ml/train/loss.py): in place of the batch's logits, one chunk's, the hidden
    states at the labelled positions and their gradient (every token counted as labelled), and
    the output layer's fp32 gradient accumulator."""
    P = s.params
    shards = world if sharded else 1
    c = 2 if bf16 else 4  # compute dtype bytes
    T = micro_batch_tokens
    trained = P if lora_params is None else lora_params
    if lora_params is None:
        parts = {"weights (fp32)": 4 * P // shards}
    else:
        parts = {f"frozen base ({'bf16' if bf16 else 'fp32'})": c * P // shards,
                 "adapter weights (fp32)": 4 * trained // shards}
    parts["gradients (fp32)"] = 4 * trained // shards
    parts["AdamW state (fp32)"] = 8 * trained // shards
    if sharded:
        if keep_gathered:
            parts["gathered weights (kept through the step)"] = c * P
        else:
            parts["gathered units"] = c * (s.root_params + 2 * s.layer_params)
        if defer_gradient_sync:
            # FSDP2 keeps unsharded gradients, in its reduce dtype (fp32), until the step's reduce-scatter
            parts["unsharded gradients (no-sync accumulation)"] = 4 * trained
        # what trains in one layer and in the root (LoRA: adapters sit in the layers, the output layer is frozen)
        layer_trained = s.layer_params if lora_params is None else -(-lora_params // s.layers)
        root_trained = s.root_params if lora_params is None else 0
        output_trained = (s.output_params or s.vocab * s.hidden) if lora_params is None else 0
        parts[f"unsharded gradients ({'bf16' if bf16 else 'fp32'}, output + 1 layer)"] = \
            c * (output_trained + layer_trained)
        parts["reduce-scatter input (fp32, one unit)"] = 4 * max(layer_trained, root_trained)
    elif bf16 and lora_params is None:
        parts["bf16 compute copies (autocast)"] = c * P
    layer = saved_per_token_layer(s) * c * T
    if activation_checkpointing:
        parts["activations"] = s.layers * T * s.hidden * c + layer  # layer inputs + one layer recomputed
    else:
        parts["activations"] = s.layers * layer
    if fused_loss:
        parts["loss (fused, one chunk of logits)"] = fused_loss_bytes(s, T, c, trains_output=lora_params is None)
    else:
        # logits in the compute dtype, their fp32 upcast, the saved log-softmax and its gradient
        parts["logits"] = T * s.vocab * (c + 12)
    impl = adamw or ("fused" if adamw_fused("cuda" if gpu else "cpu") else "for-loop")
    largest = (s.largest_param or max(s.vocab * s.hidden, s.intermediate * s.hidden)) if lora_params is None \
        else -(-lora_params // s.layers)  # LoRA: at most one layer's adapters
    parts[f"AdamW step temporaries ({impl})"] = adamw_step_temporaries(impl, trained // shards, -(-largest // shards))
    if gpu:
        parts[f"fragmentation (expandable segments, ~{FRAGMENTATION:.0%})"] = \
            int(FRAGMENTATION * total(parts))
        parts["CUDA context"] = CUDA_CONTEXT
        if sharded:
            parts["NCCL buffers"] = NCCL_BUFFERS
    return parts


def fused_loss_bytes(s: ModelShape, tokens: int, c: int, trains_output: bool = True) -> int:
    """The fused loss's memory (ml/train/loss.py): one chunk's logits in the compute dtype, in fp32
    and its gradient in the compute dtype; the picked hidden states and their gradient; when the
    output layer trains, its fp32 gradient accumulator and one compute-dtype vocabulary x hidden
    product (each chunk's, added to it; the accumulator's cast at the end)."""
    chunk = min(tokens, chunk_rows(s.vocab))
    output = (4 + c) * s.vocab * s.hidden if trains_output else 0
    return chunk * s.vocab * (c + 4 + c) + 2 * tokens * s.hidden * c + output


def scoring_memory(s: ModelShape, *, dtype_bytes: int, batch_tokens: int, max_length: int, resident_models: int,
                   bounded_logits: bool = True, gpu: bool = True) -> dict[str, int]:
    """One scoring actor: its cached models, one batch's forward peak, and the loss's logits
    (``bounded_logits``: only labelled positions, a chunk at a time; else the full batch x vocab)."""
    T, b = batch_tokens, dtype_bytes
    parts = {
        "weights": resident_models * s.params * b,
        "activations": T * (live_per_token_layer(s) + s.hidden) * b + T * max_length,  # + the last hidden state, mask
    }
    if bounded_logits:
        chunk = min(T, chunk_rows(s.vocab))
        parts["logits"] = chunk * s.vocab * (b + 8) + T * s.hidden * b  # chunk + the gathered hidden states
    else:
        parts["logits"] = T * s.vocab * (b + 8)  # logits, their fp32 copy, the fp32 log-softmax
    if gpu:
        parts["CUDA context"] = CUDA_CONTEXT
    return parts


def auto_batch_tokens(s: ModelShape, free_bytes: int, dtype_bytes: int, max_length: int, share: float = 0.7) -> int:
    """A scoring token budget that fits ``share`` of the free device memory once the model is loaded."""
    per_token = (live_per_token_layer(s) + 2 * s.hidden) * dtype_bytes + max_length
    logits = LOGIT_CHUNK_FLOATS * (dtype_bytes + 8)
    if not bounded_loss_supported(s.model_type):  # every position's logits, their fp32 copy and log-softmax
        per_token, logits = per_token + s.vocab * (dtype_bytes + 8), 0
    tokens = (int(free_bytes * share) - logits) // max(per_token, 1)
    return int(max(max_length, min(tokens // 1024 * 1024, 262_144)))


def cached_models(s: ModelShape, gpu_total: int | None, dtype_bytes: int) -> int:
    """Checkpoints a scoring actor keeps loaded: two when two take at most half the GPU (so blocks
    of two checkpoints can interleave without reloading), else one."""
    if gpu_total is None:
        return 2
    return 2 if 2 * s.params * dtype_bytes <= gpu_total // 2 else 1


def vllm_memory(s: ModelShape, *, tensor_parallel: int, max_model_len: int, batch_size: int,
                gpu_total: int, utilization: float) -> dict[str, int]:
    """One vLLM engine's GPU: its share of the fp16/bf16 weights, the activations of the profiling
    forward pass (max(8192, max_model_len) tokens), the sampler's logits, and the KV cache, which
    gets whatever is left of ``utilization`` x the GPU. The minimum need holds one sequence of
    ``max_model_len`` tokens."""
    tp = tensor_parallel
    batched = max(8192, max_model_len)
    parts = {
        "weights (bf16)": 2 * s.params // tp,
        "activations": batched * (live_per_token_layer(s) + s.hidden) * 2 // tp,
        "logits": batch_size * s.vocab * 4,
        "CUDA context and graphs": CUDA_CONTEXT + (NCCL_BUFFERS if tp > 1 else 0),
    }
    kv_per_token = kv_bytes_per_token(s, tp)
    parts["KV cache (one full-length sequence)"] = kv_per_token * max_model_len
    return parts


def kv_bytes_per_token(s: ModelShape, tensor_parallel: int) -> int:
    return 2 * s.layers * s.kv_heads * s.head_dim * 2 // tensor_parallel  # K and V, bf16


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())
