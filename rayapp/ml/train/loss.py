"""The training loss without the batch's logits (no Ray, no pydantic): the output layer and the
cross-entropy a chunk of response positions at a time, each chunk's gradients taken in the same
pass, with a weight per token.

A causal LM's own loss holds the logits of every position of the batch, their fp32 copy and the
log-softmax's gradient: (batch tokens) x (vocabulary) x ~14 bytes. At 8,192 tokens that is 3.6 GiB
for Llama's 32k vocabulary and 29 GiB for Gemma's 262k. Here the output layer runs only where a
label is (the response tokens), a chunk of LOGIT_CHUNK_FLOATS at a time: each chunk's logits are
made, their loss and their gradients for the hidden states and the output weight are taken, and
the chunk's logits are freed before the next. No logits are kept for the backward pass, and no
matmul is done twice. This is what Liger's fused linear cross-entropy does with Triton kernels,
written in plain torch so that it runs on CPUs (the tests) and under FSDP2 (the output weight
gathered by the root's hooks, see ``install``). It was written here rather than taken from Liger
because Liger's loss has no per-token weights, which merged micro-batches need (ml/train/worker.py).

Per-token weights: ``loss = sum_t w_t * nll_t``. With ``w_t = 1 / (labelled tokens)`` it is the
model's own mean loss; merged micro-batches give each token its own micro-batch's weight.
"""

from __future__ import annotations

import torch

from rayapp.core.labels import IGNORE_INDEX
from rayapp.ml.models.losses import bounded_loss_supported, chunk_rows


def supported(model) -> bool:
    """Whether this model's logits are ``output_layer(base(...))`` (soft-capped where its config says),
    with an output layer that has no bias: the model types the scoring path's bounded loss takes."""
    inner = _inner(model)
    config = getattr(inner, "config", None)
    if not bounded_loss_supported(getattr(config, "model_type", None)):
        return False
    head = inner.get_output_embeddings()
    return head is not None and getattr(head, "bias", None) is None and _base(inner) is not None


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the causal LM


def _base(inner):
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return None if base is None or base is inner else base


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(softcap(hidden_t @ weight^T), target_t), its gradients taken chunk by chunk
    in the forward pass and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk: int, softcap: float | None):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # fp32 across chunks (Liger does the same): the sum of many bf16 chunk products would round each time
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            h = hidden[lo:lo + chunk]
            target, w = targets[lo:lo + chunk], token_weights[lo:lo + chunk]
            logits = (h @ weight.t()).float()  # as the model's own loss: output layer in the compute dtype, CE in fp32
            capped = None
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            loss += (w * (lse - picked)).sum()
            if not (want_hidden or want_weight):
                continue
            # d loss / d logits = w * (softmax - onehot), in place of the logits
            grad = logits.sub_(lse[:, None]).exp_().mul_(w[:, None])
            grad[torch.arange(h.shape[0], device=grad.device), target] -= w
            if capped is not None:
                grad.mul_(1 - capped * capped)
            grad = grad.to(hidden.dtype)
            if want_hidden:
                grad_hidden[lo:lo + chunk] = grad @ weight
            if want_weight:
                grad_weight.add_(grad.t() @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # in place (the saved gradients serve this one backward): no second vocabulary x hidden
        # buffer at the backward's start, its memory peak
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor, chunk: int | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """``sum_t token_weights[t] * CE(hidden[t] @ weight.T, targets[t])`` over rows of ``hidden``
    (positions, hidden size), never holding more than ``chunk`` rows' logits."""
    chunk = chunk or chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, token_weights.float(), chunk, softcap)


def weighted_response_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor,
                           chunk: int | None = None, **model_inputs) -> torch.Tensor:
    """``sum_t loss_weights[t] * nll_t`` over the labelled positions of a (packed or padded) batch:
    the model's hidden states, then the output layer and cross-entropy at the labelled positions
    only, a chunk at a time. ``loss_weights`` is aligned with ``labels`` (the weight of predicting
    that label); ``model_inputs`` are what the model's forward takes besides them (positions,
    masks)."""
    inner = _inner(model)
    hidden = _base(inner)(input_ids=input_ids, **model_inputs).last_hidden_state
    shifted = labels[:, 1:]
    valid = shifted != IGNORE_INDEX
    picked = hidden[:, :-1][valid]  # (labelled positions, hidden)
    return linear_cross_entropy(picked, inner.get_output_embeddings().weight, shifted[valid],
                                loss_weights[:, 1:][valid], chunk,
                                getattr(inner.config, "final_logit_softcapping", None))


def install(model, chunk: int | None = None) -> None:
    """Let ``model(..., loss_weights=W)`` return the weighted response loss (``.loss``) with no logits;
    without ``loss_weights`` the model's forward is its own.

    It is the forward itself that changes (on this instance, as Liger patches the class): FSDP2's
    root hooks, which gather the embedding's and the output layer's shards, and DDP's gradient
    hooks run around a module's ``forward``, so the loss must be computed inside it. A bound
    method, so that a deep copy of the model computes with its own weights."""
    import types

    inner = _inner(model)
    inner._fused_loss_chunk = chunk
    inner.forward = types.MethodType(_forward_with_weighted_loss, inner)


class Exact:
    """Loss weights as the forward's input, kept in fp32: FSDP2's mixed precision casts every
    floating-point tensor among the root's forward inputs to the compute dtype (nested in lists,
    tuples, dicts and dataclasses; torch.distributed.utils._apply_to_tensors), and weights in bf16
    would shift each micro-batch's share of the step by up to 0.4 %. This holder is none of those."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _forward_with_weighted_loss(self, *args, loss_weights=None, labels=None, **kwargs):
    if loss_weights is None:
        return type(self).forward(self, *args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if args:
        kwargs["input_ids"] = args[0]
    if isinstance(loss_weights, Exact):
        loss_weights = loss_weights.tensor
    return CausalLMOutputWithPast(loss=weighted_response_loss(self, labels=labels, loss_weights=loss_weights,
                                                              chunk=self._fused_loss_chunk, **kwargs))


def token_weights(labels: list, micro_batch_weight: float) -> list:
    """Per-label weights that make one micro-batch's weighted sum its mean response loss times
    ``micro_batch_weight``: ``micro_batch_weight / (its labelled tokens)`` on each label that is
    predicted (a row's first label never is: nothing precedes it)."""
    import numpy as np

    predicted = [np.asarray(lab) != IGNORE_INDEX for lab in labels]
    for row in predicted:
        row[:1] = False
    each = micro_batch_weight / max(sum(int(row.sum()) for row in predicted), 1)
    return [np.where(row, each, 0.0).astype(np.float32) for row in predicted]
