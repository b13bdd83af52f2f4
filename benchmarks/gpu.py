"""The one-shot GPU check: `python -m benchmarks gpu [--out benchmarks/results] [--tiny]`.

A GPU machine is lent now and then for a few minutes, with torch and transformers but no Ray, no
vLLM, no pydantic and no registry. This script runs rayapp's own code there without Ray: the
scoring actor class (``LossScorer``, called as a plain object) and the training step's torch
pieces (``rayapp.ml.train.fsdp``: FSDP2 sharding and one optimizer step, what the Ray Train worker
calls). It measures, in under five minutes on one H100/H200:

- scoring tokens/s and the fraction of the forward-FLOP limit (2 x params x tokens/s against the
  device's bf16 peak, and against a measured bf16 matmul rate) for OPT-350M- and OPT-1.3B-shaped
  models (random weights from their public configs: the shapes are what matter), over Alpaca's
  real length distribution (benchmarks/data/alpaca-lengths.npz);
- the agreement of bf16 and fp32 per-row NLL (relative error) on the same weights;
- one FSDP2 training step's MFU for a ~1.1B Llama on one GPU, with and without activation
  checkpointing;
- peak GPU memory in each case, beside the `rayapp plan` estimate (rayapp.ops.plan.memory).

Without a GPU (or with --tiny) the same code runs tiny shapes on the CPU in about a minute, so a
test keeps it working until a GPU is there. Writes ``gpu-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np

from benchmarks.report import write_results

HERE = os.path.dirname(os.path.abspath(__file__))
LENGTHS = os.path.join(HERE, "data", "alpaca-lengths.npz")
MAX_LENGTH = 512  # rayapp's default data.max_length
# The paper presets' scoring settings (configs/paper-*.yaml): 8,192-row shards, 4,096-row work units.
SHARD_ROWS, ROWS_PER_UNIT = 8192, 4096
# A ~1.1B Llama (TinyLlama's shape): the largest Llama that trains unsharded in one GPU's memory
# with fp32 AdamW state and still says something about a 7B/13B layer's kernels.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY_OPT = dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=2048,
                max_position_embeddings=MAX_LENGTH + 2, word_embed_proj_dim=64)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, max_position_embeddings=MAX_LENGTH)


def write_lengths(alpaca_jsonl: str, out: str = LENGTHS) -> None:
    """benchmarks/data/alpaca-lengths.npz from the shared Alpaca rows, in the Alpaca template.

    There is no GPT-2/OPT tokenizer on these machines (no hub), so token counts are characters / 4,
    the usual rate of GPT-2's BPE on English prose, plus BOS and EOS; only the distribution's shape
    matters here. (rayapp's own tokenizer trained on these rows gives 150 tokens a row on average,
    this file 136.)"""
    import math

    from rayapp.config import PROMPT_TEMPLATES

    t = PROMPT_TEMPLATES["alpaca"]
    prompt, response = [], []
    with open(alpaca_jsonl) as f:
        for line in f:
            o = json.loads(line)
            inst, inp, resp = (o.get(k) or "" for k in ("instruction", "input", "output"))
            if not inst.strip() or not resp.strip():
                continue
            text = (t["with_input"] if inp.strip() else t["no_input"]).format(instruction=inst, input=inp)
            prompt.append(1 + math.ceil(len(text) / 4))
            response.append(1 + math.ceil(len(resp) / 4))
    np.savez_compressed(out, prompt_tokens=np.array(prompt, np.uint16), response_tokens=np.array(response, np.uint16))


def alpaca_lengths(rows: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) token counts of the first ``rows`` Alpaca rows, cut to MAX_LENGTH as
    prepare truncates (the response first, the prompt kept)."""
    d = np.load(LENGTHS)
    p, r = d["prompt_tokens"].astype(np.int64), d["response_tokens"].astype(np.int64)
    if rows is not None:
        p, r = p[:rows], r[:rows]
    p = np.minimum(p, MAX_LENGTH - 1)
    return p, np.minimum(r, MAX_LENGTH - p)


def _synthetic_shards(folder: str, prompt: np.ndarray, response: np.ndarray, vocab: int, shard_rows: int = 8192):
    """Prepared-style Parquet shards (id, input_ids, labels, n_tokens) of random token ids with
    these lengths: what the scoring actor reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    paths = []
    for s, lo in enumerate(range(0, len(prompt), shard_rows)):
        ids, labels, n = [], [], []
        for p, r in zip(prompt[lo:lo + shard_rows], response[lo:lo + shard_rows]):
            x = rng.integers(4, vocab, size=p + r)
            ids.append(x)
            labels.append(np.concatenate([np.full(p, -100), x[p:]]))
            n.append(p + r)
        path = os.path.join(folder, f"shard-{s:05d}.parquet")
        pq.write_table(pa.table({"id": [f"{s}-{i}" for i in range(len(ids))],
                                 "input_ids": pa.array(ids, pa.list_(pa.int32())),
                                 "labels": pa.array(labels, pa.list_(pa.int32())), "n_tokens": n}), path)
        paths.append((path, len(ids)))
    return paths


def _device():
    import torch

    from rayapp.ops.plan.accelerators import ACCELERATOR_BF16_FLOPS, accelerator_in

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        kind = accelerator_in(name)
        return "cuda", name, kind, ACCELERATOR_BF16_FLOPS.get(kind)
    return "cpu", platform.processor() or "cpu", None, None


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _peak_reserved() -> int | None:
    """What the caching allocator held at its peak: allocated plus fragmentation, which the plan
    estimates at ~5 % under expandable segments."""
    import torch

    return int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None


def matmul_rate(tiny: bool) -> float:
    """A measured bf16 matmul rate (FLOP/s): what the device really reaches on a large GEMM."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 512 if tiny else 8192
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    reps = 5 if tiny else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _random_model(config, folder: str, dtype):
    """Random weights of this shape, saved as a safetensors export the actor loads like any other."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def _config(name: str, tiny: bool):
    from transformers import LlamaConfig, OPTConfig

    from rayapp.ops.plan.shapes import find_config

    if tiny:
        return OPTConfig(**TINY_OPT) if name.startswith("facebook/opt") else LlamaConfig(**TINY_LLAMA)
    return find_config(name)[0] if name.startswith("facebook/opt") else LlamaConfig(**LLAMA_1B)


def score_shape(name: str, tiny: bool, rows: int | None, work: str, peak: float | None, measured: float,
                max_rows_per_batch: int = 256, profile: bool = False) -> dict:
    """Scoring throughput of one model shape through the scoring actor's own code (256 rows a batch
    is the config's default cap; ``profile`` adds the top operators of one work unit)."""
    import torch

    from rayapp.ml.models.imports import lean_transformers
    from rayapp.ops.plan import memory
    from rayapp.ops.plan.shapes import shape_of_model
    from rayapp.stages.score.actor import LossScorer

    lean_transformers()
    config = _config(name, tiny)
    folder = os.path.join(work, name.replace("/", "--"))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    params = _random_model(config, folder, dtype)
    prompt, response = alpaca_lengths(rows)
    shards = _synthetic_shards(tempfile.mkdtemp(dir=work), prompt, response, config.vocab_size, SHARD_ROWS)
    _peak_memory_reset()
    scorer = LossScorer({"m": folder}, ["prompted"], batch_tokens=None, max_rows_per_batch=max_rows_per_batch,
                        dtype="auto", bos_id=2, pad_id=1, max_length=MAX_LENGTH, rows_per_unit=ROWS_PER_UNIT,
                        max_batch_padding=0.1, num_threads=os.cpu_count())
    t0 = time.perf_counter()
    scorer._model("m")
    _sync()
    load_s = time.perf_counter() - t0
    real = pad = 0
    t0 = time.perf_counter()
    for path, n in shards:
        for k in range(-(-n // ROWS_PER_UNIT)):
            out = scorer.score_unit(path, "m", k)
            real += int(out["real_tokens"].sum())
            pad += int(out["pad_tokens"].sum())
    seconds = time.perf_counter() - t0
    tokens_per_s = real / seconds
    shape = shape_of_model(scorer.models["m"], name, "random weights")
    b = torch.finfo(scorer.dtype).bits // 8
    plan = memory.total(memory.scoring_memory(shape, dtype_bytes=b, batch_tokens=scorer.batch_tokens,
                                              max_length=MAX_LENGTH, resident_models=1,
                                              gpu=torch.cuda.is_available()))
    flop_rate = 2 * params * tokens_per_s
    out = {"model": name, "params": params, "max_rows_per_batch": max_rows_per_batch, "rows": int(len(prompt)),
           "tokens": real,
           "padding_fraction": pad / (real + pad), "batch_tokens": scorer.batch_tokens, "dtype": str(scorer.dtype),
           "load_s": load_s, "seconds": seconds, "tokens_per_s": tokens_per_s, "forward_flop_per_s": flop_rate,
           "fraction_of_measured_matmul": flop_rate / measured, "peak_memory_bytes": _peak_memory(),
           "plan_memory_bytes": plan}
    if peak:
        out["fraction_of_peak"] = flop_rate / peak
    if profile:
        out["profile"] = _profile_unit(scorer, shards[0][0])
    del scorer
    return out


def _profile_unit(scorer, path: str, top: int = 15) -> list[dict]:
    """The operators that took the most device (or CPU) time in one scoring work unit: where the
    time goes when the forward-FLOP share is low."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        scorer.score_unit(path, "m", 0)
        _sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key, 0) / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3} for e in events]


def bf16_agreement(name: str, tiny: bool, rows: int, work: str) -> dict:
    """Per-row mean NLL in bf16 against fp32, on the same (bf16-saved) weights and rows."""
    from rayapp.stages.score.actor import LossScorer

    folder = os.path.join(work, name.replace("/", "--"))  # written by score_shape
    prompt, response = alpaca_lengths(rows)
    (path, n), = _synthetic_shards(tempfile.mkdtemp(dir=work), prompt, response, _config(name, tiny).vocab_size,
                                   shard_rows=rows)
    nll = {}
    for dtype in ("bfloat16", "float32"):
        scorer = LossScorer({"m": folder}, ["prompted"], batch_tokens=None, max_rows_per_batch=256, dtype=dtype,
                            bos_id=2, pad_id=1, max_length=MAX_LENGTH, rows_per_unit=n, num_threads=os.cpu_count())
        out = scorer.score_unit(path, "m", 0)
        nll[dtype] = out["loss_sum"] / np.maximum(out["n_tokens"], 1)
        del scorer
    rel = np.abs(nll["bfloat16"] - nll["float32"]) / np.abs(nll["float32"])
    return {"model": name, "rows": int(n), "median_relative_error": float(np.median(rel)),
            "p99_relative_error": float(np.percentile(rel, 99)), "max_relative_error": float(rel.max()),
            "mean_nll_fp32": float(nll["float32"].mean())}


def train_step_mfu(tiny: bool, activation_checkpointing: bool, peak: float | None, batch_rows: int, steps: int,
                   packing: bool = False, fused_loss: bool = False, compile_layers: bool = False) -> dict:
    """One FSDP2 training step (world of one) through rayapp.ml.train.fsdp, as the Ray Train worker runs it;
    ``packing``: the same rows packed without padding (ml/train/packing.py), as the worker does by default;
    ``fused_loss``: the loss without logits (ml/train/loss.py), as merged forwards take it;
    ``compile_layers``: each decoder layer under torch.compile (TrainConfig.compile_layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayapp.ml.models.imports import lean_transformers
    from rayapp.ml.train import loss
    from rayapp.ml.train.collate import collate, collate_packed
    from rayapp.ml.train.fsdp import decoder_layers, optimizer_step, shard_fsdp2
    from rayapp.ops.plan import memory
    from rayapp.ops.plan.shapes import shape_of_model

    lean_transformers()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    config = _config("llama", tiny)
    _peak_memory_reset()
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    shape = shape_of_model(model, "llama-1.1b", "random weights")
    params = shape.params
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile()
    if fused_loss:
        loss.install(model)
    model = shard_fsdp2(model, bf16=cuda, cpu_offload=False)
    # as the trainer does: fused AdamW on CUDA (ml/train/worker.py), which the plan counts
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if memory.adamw_fused(dev) else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    prompt, response = alpaca_lengths(None)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        pick = rng.choice(len(prompt), size=batch_rows, replace=False)
        ids = [rng.integers(4, config.vocab_size, size=prompt[i] + response[i]) for i in pick]
        labels = [np.concatenate([np.full(prompt[i], -100), x[prompt[i]:]]) for i, x in zip(pick, ids)]
        rows = {"input_ids": np.array(ids, dtype=object), "labels": np.array(labels, dtype=object)}
        weights = loss.token_weights(labels, 1.0) if fused_loss else None
        batches.append(collate_packed(rows, 0, dev, model.config, torch.bfloat16 if cuda else torch.float32, weights)
                       if packing else collate(rows, pad_id=0, device=dev, weights=weights))
    model.train()
    # Warm-up over the very batches timed: each padded length is a new set of GEMM shapes, whose
    # first run pays for kernel selection (a first run timed cold measured a third of the rate),
    # and compiled layers compile for each new shape.
    t_warm = time.perf_counter()
    for b in batches:
        optimizer_step(model, optimizer, scheduler, [b], [1.0], max_grad_norm=1.0)
    _sync()
    warm_s = time.perf_counter() - t_warm
    tokens = padded = 0
    t0 = time.perf_counter()
    for b in batches:
        _, n = optimizer_step(model, optimizer, scheduler, [b], [1.0], max_grad_norm=1.0)
        tokens += n
        padded += b["input_ids"].numel()  # computed tokens, padding included
    _sync()
    seconds = time.perf_counter() - t0
    micro_tokens = max(b["input_ids"].numel() for b in batches)
    plan = memory.total(memory.training_memory(shape, world=1, sharded=True, micro_batch_tokens=micro_tokens,
                                               bf16=cuda, activation_checkpointing=activation_checkpointing,
                                               defer_gradient_sync=False, gpu=cuda, fused_loss=fused_loss))
    out = {"model": f"llama {params / 1e9:.2f}B" if not tiny else "tiny llama", "params": params,
           "packing": packing, "fused_loss": fused_loss, "compile_layers": compile_layers, "warm_up_s": warm_s,
           "activation_checkpointing": activation_checkpointing, "batch_rows": batch_rows, "steps": steps,
           "tokens_per_step": tokens / steps, "padded_tokens_per_step": padded / steps,
           "step_s": seconds / steps, "tokens_per_s": tokens / seconds,
           "peak_memory_bytes": _peak_memory(), "peak_reserved_bytes": _peak_reserved(), "plan_memory_bytes": plan}
    if peak:
        out["mfu"] = 6 * params * out["tokens_per_s"] / peak
        out["mfu_padded_tokens"] = 6 * params * (padded / seconds) / peak
    del model, optimizer
    return out


def vllm_backend() -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"measured": False, "why": "vLLM is not installed on this machine (its CUDA wheels are far over "
                "the 64 MiB that can travel with the tree), so only the torch backend was measured here"}
    return {"measured": False, "why": "vLLM is installed, but this check measures the torch backend only; "
            "benchmarks/scaling.py compares the two backends"}


def run(out_dir: str, tiny: bool | None = None) -> dict:
    # as rayapp's GPU training workers run (ml/train/runner.py), before CUDA's allocator starts
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    import torch.distributed as dist
    import transformers

    dev, name, kind, peak = _device()
    tiny = dev == "cpu" if tiny is None else tiny
    work = tempfile.mkdtemp(prefix="rayapp-gpu-check-")
    t_start = time.perf_counter()
    results = {"device": name, "kind": kind or dev, "peak_bf16_flops": peak, "tiny_shapes": tiny,
               "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
               "lengths": "Alpaca rows in the Alpaca template, characters / 4 (benchmarks/data/alpaca-lengths.npz)",
               "max_length": MAX_LENGTH}
    results["measured_matmul_flops"] = matmul_rate(tiny)
    print(f"[gpu] {name}: matmul {results['measured_matmul_flops'] / 1e12:.2f} TFLOP/s", flush=True)
    rows = 256 if tiny else None  # all 43.6k Alpaca lengths on a GPU
    results["scoring"] = []
    for model in ("facebook/opt-350m", "facebook/opt-1.3b"):
        r = score_shape(model, tiny, rows, work, peak, results["measured_matmul_flops"], profile=True)
        results["scoring"].append(r)
        print(f"[gpu] score {model}: {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r.get('fraction_of_peak', r['fraction_of_measured_matmul']):.1%} of the limit", flush=True)
    # The same 350M scoring with the rows-per-batch cap lifted: does the 256-row default starve the GPU?
    r = score_shape("facebook/opt-350m", tiny, rows, work, peak, results["measured_matmul_flops"],
                    max_rows_per_batch=2048)
    results["scoring_rows_cap_lifted"] = r
    print(f"[gpu] score opt-350m, 2048 rows a batch: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    results["bf16_vs_fp32"] = bf16_agreement("facebook/opt-350m", tiny, 64 if tiny else 1024, work)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if dev == "cuda" else "gloo", rank=0, world_size=1)
    try:
        # padded as before, then packed (the default since issue 29), side by side on the same rows;
        # then packed with the fused loss (what merged forwards run) and with compiled layers
        runs = [(False, False, False, False), (True, False, False, False), (False, True, False, False),
                (True, True, False, False), (False, True, True, False), (True, True, True, False)]
        results["training"] = [
            train_step_mfu(tiny, ac, peak, batch_rows=4 if tiny else 32, steps=2 if tiny else 6, packing=packing,
                           fused_loss=fused) for ac, packing, fused, _ in runs]
        if not tiny:  # compiled layers: on a GPU only (inductor's CPU compile of the tiny shapes takes minutes)
            try:
                results["training"].append(train_step_mfu(tiny, False, peak, batch_rows=32, steps=6, packing=True,
                                                           fused_loss=True, compile_layers=True))
            except Exception as exc:  # the figures above still count
                results["compile_layers_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"[gpu] compiled layers failed: {results['compile_layers_error']}", flush=True)
    finally:
        dist.destroy_process_group()
    for r in results["training"]:
        print(f"[gpu] train step ({_train_label(r)}): {r['tokens_per_s']:,.0f} tokens/s, "
              f"mfu {r.get('mfu', float('nan')):.1%}, warm-up {r['warm_up_s']:.0f} s", flush=True)
    results["vllm"] = vllm_backend()
    results["seconds"] = time.perf_counter() - t_start
    write_results(out_dir, f"gpu-{(kind or dev).lower()}", results, _plot)
    print(f"({results['seconds']:.0f} s)")
    return results


def _train_label(r: dict) -> str:
    return (f"train {'packed' if r.get('packing') else 'padded'}{' fused' if r.get('fused_loss') else ''}"
            f"{' compiled' if r.get('compile_layers') else ''} AC={'on' if r['activation_checkpointing'] else 'off'}")


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    key = "fraction_of_peak" if results["peak_bf16_flops"] else "fraction_of_measured_matmul"
    tag = " (tiny)" if results["tiny_shapes"] else ""
    bars = [(r["model"].split("/")[-1] + tag + " score", 100 * r[key]) for r in results["scoring"]]
    bars += [(_train_label(r),
              100 * r.get("mfu", 6 * r["params"] * r["tokens_per_s"] / results["measured_matmul_flops"]))
             for r in results["training"]]
    a.bar([x for x, _ in bars], [y for _, y in bars], color=["#2c7fb8"] * len(results["scoring"]) + ["#c0392b"] * len(results["training"]))
    limit = "bf16 peak" if results["peak_bf16_flops"] else "measured matmul rate"
    a.set_ylabel(f"% of the {limit}")
    a.set_title(f"{results['device']}{' (tiny shapes)' if results['tiny_shapes'] else ''}")
    a.tick_params(axis="x", labelsize=8)
    mem = [(r["model"].split("/")[-1] + " score", r) for r in results["scoring"]]
    mem += [(_train_label(r), r)
            for r in results["training"]]
    if all(r["peak_memory_bytes"] for _, r in mem):
        x = np.arange(len(mem))
        b.bar(x - 0.2, [r["peak_memory_bytes"] / 2**30 for _, r in mem], 0.4, color="#2c7fb8", label="measured peak")
        b.bar(x + 0.2, [r["plan_memory_bytes"] / 2**30 for _, r in mem], 0.4, color="#7f8c8d", label="rayapp plan")
        b.set_xticks(x, [n for n, _ in mem], fontsize=8)
        b.set_ylabel("GiB")
        b.legend(fontsize=8)
        b.set_title("Peak GPU memory against the plan")
    else:
        b.axis("off")
        b.text(0.5, 0.5, "GPU memory: measured on a GPU only", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
