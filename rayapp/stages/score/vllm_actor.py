"""``score.backend: vllm``: the same work units scored by a vLLM engine's ``prompt_logprobs``.

vLLM batches by its own scheduler (continuous batching over a paged KV cache, no padding) and
returns, for every prompt position, the log-probability of the token that is there; the loss of a
row is the negative sum at its labelled positions, as the torch actor computes it. The engine is
built per checkpoint, one at a time (an engine holds most of the GPU's memory for its KV cache).
"""

from __future__ import annotations

import numpy as np

from rayapp.core.labels import IGNORE_INDEX
from rayapp.stages.score.actor import LossScorer


class VllmLossScorer(LossScorer):
    """A ``LossScorer`` whose models are vLLM engines: units, rows and outputs as there."""

    def __init__(self, *args, engine_kwargs: dict | None = None, **kwargs):
        self.engine_kwargs = dict(engine_kwargs or {})
        kwargs["cache_size"] = 1
        kwargs["first_checkpoint"] = None  # an engine is built on the main thread (it sets signal handlers)
        super().__init__(*args, **kwargs)

    def _load(self, name: str):
        import gc

        from vllm import LLM

        from rayapp.ml.models.loading import materialize

        while self.models:  # one engine at a time: drop the last before building the next
            self.models.popitem(last=False)
            gc.collect()
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
        config, shape = _config_and_shape(self.checkpoints[name], self.trust_remote_code)
        # room for the longest row and the one token generate() must produce, within the model's positions
        limit = getattr(config, "max_position_embeddings", None)
        kwargs = dict(dtype=str(self.dtype).removeprefix("torch."),
                      max_model_len=min(self.max_length + 1, limit) if limit else self.max_length + 1,
                      seed=0, load_format="safetensors", trust_remote_code=self.trust_remote_code,
                      enable_prefix_caching=False)  # every prompt position's logprob is computed, none reused
        kwargs.update(self.engine_kwargs)
        llm = LLM(model=materialize(self.checkpoints[name]), **kwargs)
        self.models[name] = llm
        self.params[name] = shape.params
        if self.batch_tokens is None:
            self.batch_tokens = 0  # unused: vLLM's scheduler sizes its own batches
        return llm

    def _score(self, llm, seqs, labs):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": [int(t) for t in s]} for s in seqs], params, use_tqdm=False)
        n = len(seqs)
        loss, count = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64)
        for r, (out, y) in enumerate(zip(outs, labs)):
            # position t holds {token: Logprob} for the token at t given those before it (None at 0)
            lps = out.prompt_logprobs
            for t in np.nonzero(np.asarray(y[1:]) != IGNORE_INDEX)[0] + 1:
                lp = lps[t][int(y[t])].logprob
                loss[r] -= lp
                count[r] += 1 if (self.token_count == "labelled" or lp != 0) else 0
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n)
        return loss, count, np.zeros(n, dtype=np.int64), lengths


def _config_and_shape(path: str, trust_remote_code: bool):
    """The model's config and shape (parameters for the FLOP rate), built on the meta device."""
    from rayapp.ml.models.loading import materialize
    from rayapp.ops.plan.shapes import find_config, shape_of

    config, source = find_config(materialize(path, weights=False), trust_remote_code)
    return config, shape_of(config, path, source)
