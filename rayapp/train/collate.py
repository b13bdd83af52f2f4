"""Batches of prepared rows -> padded tensors for causal-LM training with response-only labels."""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


class TrainRows:
    """The training rows (``input_ids``, ``labels``) of a list of prepared Parquet files, in file
    order, kept as one Arrow table: a sampler picks indices, ``batch`` gathers them."""

    def __init__(self, files: list[str]):
        import pyarrow as pa

        from rayapp.common import storage

        self.table = pa.concat_tables([storage.read_parquet(f, ["input_ids", "labels"]) for f in files])

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, indices: list[int]) -> dict[str, np.ndarray]:
        import pyarrow as pa

        t = self.table.take(pa.array(indices, pa.int64()))
        return {c: t[c].to_numpy(zero_copy_only=False) for c in ("input_ids", "labels")}


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
