"""The Ray Data callable class: one actor holds model checkpoints, reads its work units' rows and
scores them. A plain class: Ray Data makes actors of it, and the one-shot GPU check
(``python -m benchmarks gpu``) calls it directly, without Ray."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from rayapp.core import metrics
from rayapp.core.hooks import hook
from rayapp.core.labels import IGNORE_INDEX
from rayapp.ml.models.losses import device_losses, pad_batch, response_only_sequence
from rayapp.stages.score.batching import length_ordered_units, token_budget_batches

CPU_BATCH_TOKENS = 8192  # batch_tokens unset on CPU


class LossScorer:
    """Scores work units: ``rows_per_unit`` rows of one prepared shard, in the shard's length order
    (``length_ordered_units``), for one checkpoint. The actor reads the rows itself (the last
    shards read stay cached), so no read stage, and no worker processes of its own, stand between
    the driver and the first result, and token ids never pass through the object store.

    Models load on first use straight onto the device (``loading.load_onto``: no copy of the whole
    model in host memory) and stay cached (``cache_size`` models),
    so an actor loads each checkpoint once even when blocks of several checkpoints interleave. The
    oldest is evicted before the next one loads, so at most ``cache_size`` are ever resident. Left
    unset, the cache size and the token budget are sized from the device once the first model is
    in (ops/plan/memory.py: the same arithmetic `rayapp plan` shows).

    Given ``first_checkpoint``, the actor starts importing transformers and loading that model on a
    thread as it is constructed, so the load overlaps Ray Data handing it its first unit and the
    reading of that unit's rows."""

    def __init__(
        self,
        checkpoints: dict[str, str],
        modes: list[str],
        batch_tokens: int | None,
        max_rows_per_batch: int,
        dtype: str,
        bos_id: int,
        pad_id: int,
        num_threads: int | None = None,
        cache_size: int | None = None,
        trust_remote_code: bool = False,
        max_length: int = 2048,
        rows_per_unit: int = 512,
        first_checkpoint: str | None = None,
        max_batch_padding: float = 1.0,
        prefix_ids: Sequence[int] = (),
        token_count: str = "labelled",
        modes_by_checkpoint: dict[str, list[str]] | None = None,
    ):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        from rayapp.ml.models.loading import resolve_dtype

        self.dtype = resolve_dtype(dtype, self.device)
        self.checkpoints = checkpoints
        self.modes = modes
        self.modes_by_checkpoint = modes_by_checkpoint or {}  # engine.modes_by_checkpoint
        self.batch_tokens = batch_tokens
        self.max_rows = max_rows_per_batch
        self.max_padding = max_batch_padding
        self.bos_id = bos_id
        self.prefix_ids = list(prefix_ids)  # before the response in response_only mode
        self.token_count = token_count  # the perplexity's denominator: labelled or nonzero-loss tokens
        self.pad_id = pad_id
        metrics.gauge("rayapp_actors_alive", 1, pool="score")
        self.cache_size = cache_size
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.rows_per_unit = rows_per_unit
        self.models: OrderedDict[str, object] = OrderedDict()
        self.params: dict[str, int] = {}
        self.shards: OrderedDict[str, tuple] = OrderedDict()  # path -> (table, units)
        self.batches_done = 0
        self.fault = hook("score_fault_hook")  # tests only (core/hooks.py): None in a real run
        self.loading = None
        if first_checkpoint is not None:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1, thread_name_prefix="rayapp-load")
            self.loading = pool.submit(self._load, first_checkpoint)
            pool.shutdown(wait=False)  # its one thread ends with the load

    def _model(self, name: str):
        if self.loading is not None:
            loading, self.loading = self.loading, None
            loading.result()  # the first checkpoint, loaded while the actor started (its errors raise here)
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        return self._load(name)

    def _load(self, name: str):
        from rayapp.ml.models.loading import load_causal_lm

        while self.models and len(self.models) >= self.cache_size:  # set by the first load
            self.models.popitem(last=False)  # before loading: never one model more than the cache holds
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        # straight onto the device, a tensor at a time: never the whole model in the pod's host memory
        model = load_causal_lm(self.checkpoints[name], dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                               device=self.device)
        self.models[name] = model
        self.params[name] = sum(p.numel() for p in model.parameters())
        if self.cache_size is None or self.batch_tokens is None:
            self._size_for(model)
        return model

    def _size_for(self, model) -> None:
        """The cache size and token budget left unset, from the model's shape and the GPU."""
        if self.device != "cuda":
            self.cache_size = self.cache_size or 2
            self.batch_tokens = self.batch_tokens or CPU_BATCH_TOKENS
            return
        from rayapp.ops.plan import memory
        from rayapp.ops.plan.shapes import shape_of_model

        shape = shape_of_model(model, "scored model", "loaded")
        b = self.torch.finfo(self.dtype).bits // 8
        free, total = self.torch.cuda.mem_get_info()
        if self.cache_size is None:
            self.cache_size = memory.cached_models(shape, total, b)
        if self.batch_tokens is None:
            room = free - (self.cache_size - 1) * shape.params * b  # for the next checkpoint
            self.batch_tokens = memory.auto_batch_tokens(shape, room, b, self.max_length)

    def _unit_rows(self, path: str, unit: int):
        """(ids, token id arrays, label arrays) of one work unit, in the shard's row order."""
        from rayapp.core import storage

        if path not in self.shards:
            if len(self.shards) >= 2:
                self.shards.popitem(last=False)
            table = storage.read_parquet(path, ["id", "input_ids", "labels", "n_tokens"])
            self.shards[path] = (table, length_ordered_units(table["n_tokens"].to_numpy(), self.rows_per_unit))
        table, units = self.shards[path]
        rows = units[unit]
        part = table.select(["id", "input_ids", "labels"]).take(rows)
        return part["id"].to_numpy(zero_copy_only=False), _split(part["input_ids"]), _split(part["labels"])

    def _to_device(self, t):
        if self.device == "cuda":  # pinned: the copy overlaps the GPU's work, no host wait
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _score(self, model, seqs, labs):
        """Per-row loss sums and counts: batches cut from the rows by a token budget, the results
        kept on the device and copied to the host once for the whole unit."""
        torch = self.torch
        n = len(seqs)
        lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=n)
        loss = torch.zeros(n, dtype=torch.float64, device=self.device)
        count = torch.zeros(n, dtype=torch.int64, device=self.device)
        pad = np.zeros(n, dtype=np.int64)
        for b in token_budget_batches(lengths, self.batch_tokens, self.max_rows, self.max_padding):
            ids, labels, mask = pad_batch([seqs[i] for i in b], [labs[i] for i in b], self.pad_id)
            s, c = device_losses(model, self._to_device(ids), self._to_device(labels), self._to_device(mask),
                                 count=self.token_count)
            where = self._to_device(torch.as_tensor(b))
            loss[where], count[where] = s.double(), c
            pad[b] = ids.shape[1] - lengths[b]
        return loss.cpu().numpy(), count.cpu().numpy(), pad, lengths

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data's call: one work unit (a one-row batch: ``path``, ``checkpoint``, ``unit``)."""
        if len(batch["unit"]) != 1:
            raise ValueError(f"LossScorer takes one work unit per call, got {len(batch['unit'])}")
        return self.score_unit(str(batch["path"][0]), str(batch["checkpoint"][0]), int(batch["unit"][0]))

    def score_unit(self, path: str, name: str, unit: int) -> dict[str, np.ndarray]:
        """Work unit ``unit`` of the shard at ``path``, scored with checkpoint ``name``: one entry
        per row of it."""
        t0 = time.perf_counter()
        ids, seqs, labs = self._unit_rows(path, unit)  # while the first model may still be loading
        model = self._model(name)
        n = len(ids)
        out = {
            "id": ids,
            "checkpoint": np.full(n, name, dtype=object),
            "path": np.full(n, path, dtype=object),
            "loss_sum": np.full(n, np.nan),
            "n_tokens": np.zeros(n, dtype=np.int64),
            "response_only_loss_sum": np.full(n, np.nan),
            "response_only_n_tokens": np.zeros(n, dtype=np.int64),
            "real_tokens": np.zeros(n, dtype=np.int64),
            "pad_tokens": np.zeros(n, dtype=np.int64),
        }
        modes = self.modes_by_checkpoint.get(name, self.modes)
        if "prompted" in modes:
            s, c, pad, lens = self._score(model, seqs, labs)
            out["loss_sum"], out["n_tokens"] = s, c
            out["pad_tokens"] += pad
            out["real_tokens"] += lens
        if self.fault:
            self.fault(self.batches_done)  # mid-unit: some of it is scored, none of it returned
        if "response_only" in modes:
            pairs = [response_only_sequence(i, l, self.bos_id, self.prefix_ids) for i, l in zip(seqs, labs)]
            s, c, pad, lens = self._score(model, [p[0] for p in pairs], [p[1] for p in pairs])
            out["response_only_loss_sum"], out["response_only_n_tokens"] = s, c
            out["pad_tokens"] += pad
            out["real_tokens"] += lens
        if "prompted" not in modes:
            out["n_tokens"] = np.array([int((l != IGNORE_INDEX).sum()) for l in labs], dtype=np.int64)
        # for the forward-FLOP rate: 2 x params x tokens over the seconds this call took
        out["model_params"] = np.full(n, self.params[name], dtype=np.int64)
        out["seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        self.batches_done += 1
        metrics.count("rayapp_score_rows", n, checkpoint=name)
        metrics.count("rayapp_score_tokens", int(out["real_tokens"].sum()), checkpoint=name)
        return out


def _split(column) -> list[np.ndarray]:
    """A Parquet list column -> one numpy view per row (no Python lists of ints)."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]
