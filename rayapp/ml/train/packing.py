"""Padding-free training batches (no Ray, no pydantic): a micro-batch's rows packed end to end,
``position_ids`` restarting at every row, and attention that never crosses rows.

The objective does not change. A packed micro-batch holds exactly the rows its padded twin holds,
and the loss is still the mean over their response tokens. Each row's first label is ignored: in
a packed sequence, the token before it is the previous row's last one (in a padded batch nothing
precedes it). A test checks that packed and padded micro-batches give the same loss and gradients
for every model type listed here.

The attention that keeps rows apart is transformers' own:
- The decoders in PACKS_BY_POSITION_IDS build their mask from ``position_ids``: masking_utils
  finds where the positions restart and makes a block-causal mask (sdpa, eager, flex). Flash
  attention turns the same positions into variable-length sequences.
- OPT reads ``position_ids`` for its learned position embeddings but not for its mask. For OPT,
  the mask comes from transformers' ``create_causal_mask`` given those positions, and is passed
  in 4-D.

Layout (``pack_layout``): flash attention takes the whole micro-batch as one sequence, at no
extra cost. sdpa and eager compute a dense mask's every position pair, so one long sequence costs
(sum of lengths)^2 in attention. The micro-batch is therefore either one sequence, or its rows
first-fit into rows as wide as the longest one, whichever costs fewer multiply-adds for the
model's width and depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayapp.core.labels import IGNORE_INDEX

# Checked against padded batches in tests/test_packing.py (loss and gradients).
PACKS_BY_POSITION_IDS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_neox", "gpt2",
                                   "olmo2"})
PACKS_WITH_EXPLICIT_MASK = frozenset({"opt"})
PACKABLE_MODEL_TYPES = PACKS_BY_POSITION_IDS | PACKS_WITH_EXPLICIT_MASK
FLASH = ("flash_attention_2", "flash_attention_3")


def can_pack(config) -> bool:
    """Whether rows of this model can be packed with the attention kept apart (see above)."""
    return getattr(config, "model_type", None) in PACKABLE_MODEL_TYPES


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows (indices into ``lengths``) filled first-fit, longest first: each row's lengths sum to
    at most ``capacity`` (a row longer than it sits alone). Deterministic for equal lengths."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def layout_cost(lengths: Sequence[int], rows: list[list[int]], hidden: int, layers: int, vocab: int) -> float:
    """Forward multiply-adds of a batch laid out as ``rows`` (every row padded to the widest):
    per token and layer ~12·hidden² in the projections and MLP; per position pair and layer
    2·hidden in a dense-mask attention (scores and values); 1·hidden·vocab per token in the
    output layer. Constant factors shared by every layout are left out."""
    width = max(sum(lengths[i] for i in row) for row in rows)
    tokens = len(rows) * width
    return tokens * (12 * hidden * hidden * layers + hidden * vocab) + len(rows) * width * width * 2 * hidden * layers


def pack_layout(lengths: Sequence[int], attn_implementation: str | None, hidden: int, layers: int,
                vocab: int) -> list[list[int]]:
    """How one micro-batch's rows are packed: a list of packed rows, each a list of row indices."""
    whole = [list(range(len(lengths)))]
    if attn_implementation in FLASH or len(lengths) == 1:
        return whole
    fitted = first_fit(lengths, max(lengths))
    if layout_cost(lengths, whole, hidden, layers, vocab) <= layout_cost(lengths, fitted, hidden, layers, vocab):
        return whole
    return fitted


def pack_batch(seqs: Sequence[Sequence[int]], labs: Sequence[Sequence[int]], rows: list[list[int]],
               pad_id: int, weights: Sequence[Sequence[float]] | None = None) -> dict[str, torch.Tensor]:
    """The packed tensors: ``input_ids``, ``labels`` and ``position_ids`` of shape (packed rows,
    width), and ``num_tokens`` (the real tokens). A packed row's tail is padding: its labels are
    ignored and its positions restart at 0, so it attends only to itself. ``weights`` (per label,
    ml/train/loss.token_weights) adds ``loss_weights`` laid out as the labels."""
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    loss_weights = np.zeros((len(rows), width), dtype=np.float32) if weights is not None else None
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            ids[r, at:at + n] = seqs[i]
            labels[r, at:at + n] = labs[i]
            labels[r, at] = IGNORE_INDEX  # predicted from the previous row's last token
            positions[r, at:at + n] = np.arange(n)
            if loss_weights is not None:
                loss_weights[r, at:at + n] = weights[i]
                loss_weights[r, at] = 0.0
            at += n
        positions[r, at:] = np.arange(width - at)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
           "position_ids": torch.from_numpy(positions), "num_tokens": torch.tensor(sum(len(s) for s in seqs))}
    if loss_weights is not None:
        out["loss_weights"] = torch.from_numpy(loss_weights)
    return out


def attention_inputs(config, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The 4-D mask for a decoder that does not build one from ``position_ids`` (OPT), made by
    transformers' ``create_causal_mask`` from the packed positions; nothing for the others."""
    if getattr(config, "model_type", None) not in PACKS_WITH_EXPLICIT_MASK:
        return {}
    from transformers.masking_utils import create_causal_mask

    positions = batch["position_ids"]
    shape_only = torch.empty((*positions.shape, 0), dtype=dtype, device=positions.device)
    mask = create_causal_mask(config=config, inputs_embeds=shape_only, attention_mask=None, past_key_values=None,
                              position_ids=positions)
    return {} if mask is None else {"attention_mask": mask}
