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


def collate(batch: dict[str, np.ndarray], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    ids, labels, mask = pad_batch(list(batch["input_ids"]), list(batch["labels"]), pad_id)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def collate_packed(batch: dict[str, np.ndarray], pad_id: int, device: str, config, compute_dtype) -> dict[str, torch.Tensor]:
    """The same rows packed without padding (ml/train/packing.py), laid out by the model's shape
    and attention kernel."""
    from rayapp.ml.train.packing import attention_inputs, pack_batch, pack_layout

    seqs, labs = list(batch["input_ids"]), list(batch["labels"])
    rows = pack_layout([len(s) for s in seqs], getattr(config, "_attn_implementation", None), config.hidden_size,
                       config.num_hidden_layers, config.vocab_size)
    packed = {k: v.to(device) for k, v in pack_batch(seqs, labs, rows, pad_id).items()}
    packed.update(attention_inputs(config, packed, compute_dtype))
    return packed
