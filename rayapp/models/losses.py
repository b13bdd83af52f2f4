"""Response-token losses with plain torch (no Ray): the math scoring actors run per sample, and
training uses for its batches and its held-out eval loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rayapp.common.labels import IGNORE_INDEX


def response_only_sequence(input_ids: Sequence[int], labels: Sequence[int], bos_id: int) -> tuple[list[int], list[int]]:
    """The response alone (prompt dropped), for IFD: BOS + the same response token ids.

    Reusing the prompted run's token ids (rather than re-tokenizing the response) scores exactly
    the same tokens in both modes, which is what the IFD ratio compares."""
    resp = [int(t) for t, lab in zip(input_ids, labels) if lab != IGNORE_INDEX]
    return [bos_id] + resp, [IGNORE_INDEX] + resp


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


@torch.inference_mode()
def batch_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """Sum of token NLLs and count of scored tokens per row (labels != -100), in float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    valid = shift_labels != IGNORE_INDEX
    return (nll * valid).sum(dim=1).double().cpu().numpy(), valid.sum(dim=1).cpu().numpy()


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
