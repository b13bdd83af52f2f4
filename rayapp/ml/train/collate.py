"""Batches of prepared rows -> padded tensors for causal-LM training with response-only labels."""

from __future__ import annotations

import numpy as np
import torch

from rayapp.ml.models.losses import pad_batch


class TrainRows:
    """The training rows (``input_ids``, ``labels``) of a list of prepared Parquet files, in file
    order, kept as one Arrow table: a sampler picks indices, ``batch`` gathers them."""

    def __init__(self, files: list[str]):
        import pyarrow as pa

        from rayapp.core import storage

        self.table = pa.concat_tables([storage.read_parquet(f, ["input_ids", "labels"]) for f in files])

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, indices: list[int]) -> dict[str, np.ndarray]:
        import pyarrow as pa

        t = self.table.take(pa.array(indices, pa.int64()))
        return {c: t[c].to_numpy(zero_copy_only=False) for c in ("input_ids", "labels")}


def collate(batch: dict[str, np.ndarray], pad_id: int, device: str, weights: list | None = None) -> dict[str, torch.Tensor]:
    """Padded tensors; ``weights`` (per label of each row) adds their ``loss_weights``, padded with 0."""
    ids, labels, mask = pad_batch(list(batch["input_ids"]), list(batch["labels"]), pad_id)
    out = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    if weights is not None:
        padded = np.zeros(labels.shape, dtype=np.float32)
        for r, w in enumerate(weights):
            padded[r, :len(w)] = w
        out["loss_weights"] = torch.from_numpy(padded).to(device)
    return out


def collate_packed(batch: dict[str, np.ndarray], pad_id: int, device: str, config, compute_dtype,
                   weights: list | None = None) -> dict[str, torch.Tensor]:
    """The same rows packed without padding (ml/train/packing.py), laid out by the model's shape
    and attention kernel; ``weights`` (per label of each row) adds their ``loss_weights``."""
    from rayapp.ml.train.packing import attention_inputs, pack_batch, pack_layout

    seqs, labs = list(batch["input_ids"]), list(batch["labels"])
    rows = pack_layout([len(s) for s in seqs], getattr(config, "_attn_implementation", None), config.hidden_size,
                       config.num_hidden_layers, config.vocab_size)
    packed = {k: v.to(device) for k, v in pack_batch(seqs, labs, rows, pad_id, weights).items()}
    packed.update(attention_inputs(config, packed, compute_dtype))
    return packed
