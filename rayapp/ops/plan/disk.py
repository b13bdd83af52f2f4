"""Local disk a stage needs on a node, in bytes per parameter of the models it keeps or stages:
the arithmetic each stage's ``Stage.disk_need`` composes, and `rayapp check-cluster`
(ops/deploy/needs.py) and benchmarks/estimates.py read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
# Bytes per parameter of what a stage writes or keeps (the estimates use the same figures).
HUB_BYTES_PER_PARAM = 2  # checkpoints on the hub are fp16/bf16
# A full fine-tune's sharded checkpoint: fp32 weights plus AdamW's two fp32 moments.
FULL_CHECKPOINT_BYTES_PER_PARAM = 12
# LoRA (finetune.lora): the frozen base in bf16 is in the model state; the adapters' state is small.
LORA_CHECKPOINT_BYTES_PER_PARAM = 2
EXPORT_BYTES_PER_PARAM = 2  # consolidated exports in bf16


@dataclass
class DiskNeed:
    """One stage's local disk on a node it runs on: ``kept`` stays for the node's life (hub downloads
    in HF_HOME, models fetched from the bucket), ``staged`` is written and removed again (a
    checkpoint staged before its upload, one at a time), ``checkpoint`` is one save's bytes."""

    stage: str
    kept: int = 0
    staged: int = 0
    checkpoint: int = 0
    saves: int = 0  # checkpoints the stage writes in a run (all its training runs)
    parts: list[str] = field(default_factory=list)  # what the bytes are, for people
