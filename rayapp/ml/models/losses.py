"""Response-token losses with plain torch (no Ray): the math scoring actors run per sample, and
training uses for its batches and its held-out eval loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayapp.core.labels import IGNORE_INDEX


def response_only_sequence(input_ids: Sequence[int], labels: Sequence[int], bos_id: int,
                           prefix_ids: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """The response alone (prompt dropped), for IFD: BOS + ``prefix_ids`` (e.g. Cherry-LLM's
    "### Response:") + the same response token ids, the loss on the response only.

    Reusing the prompted run's token ids (rather than re-tokenizing the response) scores exactly
    the same tokens in both modes, which is what the IFD ratio compares."""
    resp = [int(t) for t, lab in zip(input_ids, labels) if lab != IGNORE_INDEX]
    head = [bos_id, *(int(t) for t in prefix_ids)]
    return head + resp, [IGNORE_INDEX] * len(head) + resp


def pad_batch(seqs: list[Sequence[int]], labs: list[Sequence[int]], pad_id: int):
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, (s, l) in enumerate(zip(seqs, labs)):
        ids[r, : len(s)] = s
        labels[r, : len(l)] = l
        mask[r, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask)


# Model types whose logits are exactly ``output_embeddings(base_model(...).last_hidden_state)``,
# soft-capped by ``config.final_logit_softcapping`` where that is set (Gemma 2 and 3 do it after the
# output layer). Others take the full-logits path, whose memory grows with batch tokens x vocabulary:
# at Gemma's 262k vocabulary that is 3 GiB of fp32 per copy for a 1,024-token batch.
BOUNDED_LOSS_MODEL_TYPES = frozenset({"llama", "opt", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2", "phi3",
                                      "olmo", "olmo2", "smollm3", "gpt_bigcode", "falcon", "gemma", "gemma2",
                                      "gemma3_text"})


def bounded_loss_supported(model_type: str | None) -> bool:
    """Whether the loss of this model type is taken a chunk of labelled positions at a time."""
    return model_type in BOUNDED_LOSS_MODEL_TYPES

# Bytes of one chunk's logits in the output layer's dtype, its fp32 copy and the cross-entropy's
# fp32 log-softmax: the memory the loss needs whatever the batch size (64 MiB of fp32 logits).
LOGIT_CHUNK_FLOATS = 16 * 2**20


def _base_and_head(model):
    """(base model, output layer) when the loss can be taken from hidden states, else None.

    Only for a plain model: a DDP wrapper hides it, and calling an FSDP2 model's base directly
    would skip the root's hooks that gather its embedding and output-layer shards."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or not bounded_loss_supported(
            getattr(getattr(model, "config", None), "model_type", None)):
        return None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if base is None or head is None or base is model:
        return None
    return base, head


def chunk_rows(vocab_size: int) -> int:
    """Scored positions per output-layer chunk."""
    return max(1, LOGIT_CHUNK_FLOATS // max(vocab_size, 1))


def batch_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """Sum of token NLLs (float64) and count of scored tokens per row (labels != -100), as numpy
    arrays: ``device_losses`` copied to the host."""
    s, c = device_losses(model, input_ids, labels, attention_mask)
    return s.double().cpu().numpy(), c.cpu().numpy()


@torch.inference_mode()
def device_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                  count: str = "labelled"):
    """Per-row sum of token NLLs (float32) and count of scored tokens, left on the model's device
    so a caller scoring many batches copies to the host once, not once per batch (a copy waits for
    the GPU to finish).

    Memory is bounded by the response tokens, not by batch tokens x vocabulary: the output layer is
    applied only at labelled positions (their hidden states gathered first), a chunk of positions at
    a time, each chunk's cross-entropy in fp32. The per-row numbers equal the full-logits path's
    (``full_logits_losses``) within fp32 rounding.

    ``count="nonzero"`` counts, as the paper's code does (``torch.count_nonzero`` of the per-token
    loss), only the labelled tokens whose loss is not exactly 0: a token predicted with probability
    1 in the working precision then drops out of the perplexity's denominator."""
    parts = _base_and_head(model)
    if parts is None:
        s, nll, valid = _full_logits_device(model, input_ids, labels, attention_mask, per_token=True)
        return s, (nll != 0).sum(dim=1) if count == "nonzero" else valid.sum(dim=1)
    base, head = parts
    # No KV cache: building one copies every layer's keys and values (torch.cat), ~9 % of an
    # OPT-350M scoring unit on an H100 (benchmarks/results/gpu-h100.json, profile).
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    rows, cols = valid.nonzero(as_tuple=True)
    picked = hidden[rows, cols]  # (scored positions, hidden), row-major
    del hidden
    targets = shift_labels[rows, cols]
    nll = torch.empty(rows.numel(), dtype=torch.float32, device=picked.device)
    step = chunk_rows(head.out_features if hasattr(head, "out_features") else model.config.vocab_size)
    cap = getattr(model.config, "final_logit_softcapping", None)
    for lo in range(0, rows.numel(), step):
        logits = head(picked[lo:lo + step]).float()
        if cap is not None:  # as the model's own forward does after its output layer
            logits = torch.tanh(logits / cap) * cap
        nll[lo:lo + step] = torch.nn.functional.cross_entropy(logits, targets[lo:lo + step], reduction="none")
    per_row = torch.zeros(valid.shape, dtype=torch.float32, device=nll.device)
    per_row[rows, cols] = nll  # summed per row as the full-logits path does
    return per_row.sum(dim=1), (per_row != 0).sum(dim=1) if count == "nonzero" else valid.sum(dim=1)


def full_logits_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """The same numbers from the model's full logits (batch x length x vocabulary): for model types
    with a non-linear head, and as the reference the bounded path is checked against."""
    s, c = _full_logits_device(model, input_ids, labels, attention_mask)
    return s.double().cpu().numpy(), c.cpu().numpy()


@torch.inference_mode()
def _full_logits_device(model, input_ids, labels, attention_mask, per_token: bool = False):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    valid = shift_labels != IGNORE_INDEX
    nll = nll * valid
    if per_token:
        return nll.sum(dim=1), nll, valid
    return nll.sum(dim=1), valid.sum(dim=1)


def one_row_losses(model, rows: list[tuple[Sequence[int], Sequence[int]]], device: str = "cpu"):
    """Reference implementation: one row at a time, no padding. Used to check the engine."""
    out = []
    for ids, labs in rows:
        t_ids = torch.tensor([list(ids)], device=device)
        t_lab = torch.tensor([list(labs)], device=device)
        s, n = batch_losses(model, t_ids, t_lab, torch.ones_like(t_ids))
        out.append((float(s[0]), int(n[0])))
    return out


def mean_response_nll(model, rows: list[dict], pad_id: int, device: str = "cpu", batch_rows: int = 8) -> float:
    """Mean response-token NLL over rows with ``input_ids``/``labels`` (token-weighted)."""
    total, count = 0.0, 0
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo : lo + batch_rows]
        ids, labels, mask = pad_batch([r["input_ids"] for r in chunk], [r["labels"] for r in chunk], pad_id)
        s, n = batch_losses(model, ids.to(device), labels.to(device), mask.to(device))
        total += float(s.sum())
        count += int(n.sum())
    return total / max(count, 1)
