"""Batches of prepared rows -> padded tensors for causal-LM training with response-only labels."""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def collate(batch: dict[str, np.ndarray], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    seqs = batch["input_ids"]
    labs = batch["labels"]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for r in range(n):
        k = len(seqs[r])
        ids[r, :k] = seqs[r]
        labels[r, :k] = labs[r]
        mask[r, :k] = 1
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "labels": torch.from_numpy(labels).to(device),
        "attention_mask": torch.from_numpy(mask).to(device),
    }
