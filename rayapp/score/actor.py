"""The Ray Data callable class: one actor holds model checkpoints and scores batches of rows."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from rayapp.common.labels import IGNORE_INDEX
from rayapp.models.losses import batch_losses, pad_batch, response_only_sequence
from rayapp.score.batching import token_budget_batches
from rayapp.testing.faults import score_fault_hook


CPU_BATCH_TOKENS = 8192  # batch_tokens unset on CPU


class LossScorer:
    """Scores rows for the checkpoint named in each row's ``checkpoint`` column.

    Models load through ``from_pretrained`` on first use and stay cached (``cache_size`` models),
    so an actor loads each checkpoint once even when blocks of several checkpoints interleave. The
    oldest is evicted before the next one loads, so at most ``cache_size`` are ever resident. Left
    unset, the cache size and the token budget are sized from the device once the first model is
    in (plan/memory.py: the same arithmetic `rayapp plan` shows)."""

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
    ):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        from rayapp.models.loading import resolve_dtype

        self.dtype = resolve_dtype(dtype, self.device)
        self.checkpoints = checkpoints
        self.modes = modes
        self.batch_tokens = batch_tokens
        self.max_rows = max_rows_per_batch
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.cache_size = cache_size
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.models: OrderedDict[str, object] = OrderedDict()
        self.batches_done = 0
        self.fault = score_fault_hook()  # tests only: None unless RAYAPP_TEST_SCORE_FAULT is set

    def _model(self, name: str):
        if name in self.models:
            self.models.move_to_end(name)
            return self.models[name]
        from rayapp.models.loading import load_causal_lm

        while self.models and len(self.models) >= self.cache_size:  # set by the first load
            self.models.popitem(last=False)  # before loading: never one model more than the cache holds
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        model = load_causal_lm(self.checkpoints[name], dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        model.to(self.device).eval()
        self.models[name] = model
        if self.cache_size is None or self.batch_tokens is None:
            self._size_for(model)
        return model

    def _size_for(self, model) -> None:
        """The cache size and token budget left unset, from the model's shape and the GPU."""
        if self.device != "cuda":
            self.cache_size = self.cache_size or 2
            self.batch_tokens = self.batch_tokens or CPU_BATCH_TOKENS
            return
        from rayapp.plan import memory
        from rayapp.plan.shapes import shape_of_model

        shape = shape_of_model(model, "scored model", "loaded")
        b = self.torch.finfo(self.dtype).bits // 8
        free, total = self.torch.cuda.mem_get_info()
        if self.cache_size is None:
            self.cache_size = memory.cached_models(shape, total, b)
        if self.batch_tokens is None:
            room = free - (self.cache_size - 1) * shape.params * b  # for the next checkpoint
            self.batch_tokens = memory.auto_batch_tokens(shape, room, b, self.max_length)

    def _score(self, model, seqs, labs):
        n = len(seqs)
        loss_sum = np.zeros(n, dtype=np.float64)
        n_tok = np.zeros(n, dtype=np.int64)
        pad = np.zeros(n, dtype=np.int64)
        lengths = [len(s) for s in seqs]
        for b in token_budget_batches(lengths, self.batch_tokens, self.max_rows):
            ids, labels, mask = pad_batch([seqs[i] for i in b], [labs[i] for i in b], self.pad_id)
            s, c = batch_losses(model, ids.to(self.device), labels.to(self.device), mask.to(self.device))
            width = ids.shape[1]
            for j, i in enumerate(b):
                loss_sum[i], n_tok[i], pad[i] = s[j], c[j], width - lengths[i]
        return loss_sum, n_tok, pad, np.asarray(lengths)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        names = batch["checkpoint"]
        n = len(names)
        out = {
            "id": batch["id"],
            "checkpoint": names,
            "path": batch["path"],
            "loss_sum": np.full(n, np.nan),
            "n_tokens": np.zeros(n, dtype=np.int64),
            "response_only_loss_sum": np.full(n, np.nan),
            "response_only_n_tokens": np.zeros(n, dtype=np.int64),
            "real_tokens": np.zeros(n, dtype=np.int64),
            "pad_tokens": np.zeros(n, dtype=np.int64),
        }
        units = np.char.add(np.asarray(names, dtype=str), np.char.add("\x1f", np.asarray(batch["path"], dtype=str)))
        for unit in np.unique(units):  # one (checkpoint, shard) unit per call, but never mix two in a batch
            rows = np.nonzero(units == unit)[0]
            name = str(names[rows[0]])
            model = self._model(name)
            ids = [batch["input_ids"][i] for i in rows]
            labs = [batch["labels"][i] for i in rows]
            if "prompted" in self.modes:
                s, c, pad, lens = self._score(model, ids, labs)
                out["loss_sum"][rows], out["n_tokens"][rows] = s, c
                out["pad_tokens"][rows] += pad
                out["real_tokens"][rows] += lens
            if self.fault:
                self.fault(self.batches_done)  # mid-block: some of this batch is scored, none of it returned
            if "response_only" in self.modes:
                pairs = [response_only_sequence(i, l, self.bos_id) for i, l in zip(ids, labs)]
                s, c, pad, lens = self._score(model, [p[0] for p in pairs], [p[1] for p in pairs])
                out["response_only_loss_sum"][rows], out["response_only_n_tokens"][rows] = s, c
                out["pad_tokens"][rows] += pad
                out["real_tokens"][rows] += lens
        if "prompted" not in self.modes:
            out["n_tokens"] = np.array([int((np.asarray(l) != IGNORE_INDEX).sum()) for l in batch["labels"]])
        out["seconds"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        self.batches_done += 1
        return out
