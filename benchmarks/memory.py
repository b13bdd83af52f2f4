"""Memory at real shapes on a CPU, side by side with the former code paths, in one run:

    python -m benchmarks memory

(a) Loading a ~1B-parameter Llama (TinyLlama-1.1B's shape, random weights saved as fp32
    safetensors) into FSDP2 on 2 gloo workers: peak resident memory per worker when every rank
    loads the whole model and then shards it (the former path) and with the sharded load (meta
    build, each rank reads its own rows), against a worker that only imports and builds on meta.
(b) One scoring batch of 16,384 tokens at OPT's 50,272-token vocabulary with a small hidden size:
    peak memory of the full-logits loss (the former path) and of the bounded loss.
(c) AdamW's step on FSDP2 shards (OPT-125m and OPT-350m shapes, 2 gloo workers): what the step
    allocates beyond its state, for torch's foreach implementation (its default on CUDA), the
    fused one (what rayapp uses on CUDA) and the for-loop one (its default on a CPU).
(d) One scoring batch of a real large-vocabulary model, Gemma-3-270M (262,144 tokens, a soft-capped
    output layer): full logits against the bounded loss, memory, time and per-row losses.

Each figure is compared with `rayapp plan`'s arithmetic (rayapp/ops/plan/memory.py) for the same shapes.
Results: benchmarks/results/memory-cpu<N>.json and .png; (c) alone: adamw-step-cpu<N>.json
(``python -c "from benchmarks.memory import run_adamw_step; run_adamw_step('benchmarks/results')"``);
(d) alone: scoring-memory-gemma3-270m-cpu<N>.json (``run_real_vocab_scoring``, needs ``rayapp[gemma3]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.report import write_results
from benchmarks.score_bench import _machine

GIB = 2**30
TINYLLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                    tie_word_embeddings=False)


def _save_random_llama(folder: str) -> int:
    """A ~1.1B Llama with random weights, written as fp32 safetensors one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from rayapp.ml.models import sharded

    config = LlamaConfig(**TINYLLAMA_1B)
    model = sharded.empty_causal_lm(config)
    gen = torch.Generator().manual_seed(0)
    state, params = {}, 0
    for name, p in model.named_parameters():
        state[name] = (torch.randn(p.shape, generator=gen) * 0.02).contiguous()
        params += p.numel()
    config.save_pretrained(folder)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return params


def _write_model(folder: str) -> int:
    """In a child process, so this one stays small (the workers and scorers are spawned from it)."""
    code = "import sys; from benchmarks.memory import _save_random_llama as s; print(s(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def _load_side_by_side(folder: str) -> dict:
    from rayapp.testing.fsdp_probes import full_load_then_shard, shard_on_meta, sharded_load
    from rayapp.testing.gloo import run_gloo

    out = {}
    for label, fn, args in (("imports and meta build only", shard_on_meta, (os.path.join(folder, "config.json"),)),
                            ("full load, then shard (before)", full_load_then_shard, (folder,)),
                            ("sharded load (now)", sharded_load, (folder, False))):
        t0 = time.perf_counter()
        res = run_gloo(fn, 2, *args)
        out[label] = {"peak_rss_bytes": [r["peak_rss_bytes"] for r in res],
                      "local_param_bytes": [r["local_bytes"] for r in res],
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  {label}: peak RSS per worker {[round(b / GIB, 2) for b in out[label]['peak_rss_bytes']]} GiB "
              f"({out[label]['seconds']} s)", flush=True)
    return out


SCORING_CHILD = r"""
import json, resource, sys, numpy as np, torch
from transformers import OPTConfig, OPTForCausalLM
from rayapp.ml.models.losses import batch_losses, full_logits_losses, pad_batch
torch.set_num_threads(2)
path, rows, width, labelled = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.manual_seed(0)
model = OPTForCausalLM(OPTConfig(vocab_size=50272, hidden_size=128, ffn_dim=512, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=128, max_position_embeddings=width + 2)).eval()
rng = np.random.default_rng(0)
seqs = [rng.integers(3, 50000, size=width).tolist() for _ in range(rows)]
cut = int(width * (1 - labelled))
labs = [[-100] * cut + s[cut:] for s in seqs]
ids, labels, mask = pad_batch(seqs, labs, 1)
fn = full_logits_losses if path == "full" else batch_losses
from rayapp.testing.fsdp_probes import peak_rss_bytes
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before, peak_before = rss(), peak_rss_bytes()
sums, counts = fn(model, ids, labels, mask)
peak = peak_rss_bytes()
print(json.dumps({"before": before, "peak_before": peak_before, "peak": peak, "increment": peak - max(before, peak_before),
                  "loss_sum_total": float(sums.sum()), "scored_tokens": int(counts.sum())}))
"""


def _scoring_side_by_side(rows: int, width: int, labelled: float) -> dict:
    out = {}
    for label, path in (("full logits (before)", "full"), ("labelled positions, chunked (now)", "bounded")):
        proc = subprocess.run([sys.executable, "-c", SCORING_CHILD, path, str(rows), str(width), str(labelled)],
                              capture_output=True, text=True, check=True)
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {label}: peak increment {out[label]['increment'] / GIB:.2f} GiB", flush=True)
    return out


def _estimates(params: int, batch_tokens: int, width: int, labelled: float) -> dict:
    from rayapp.ops.plan import memory
    from rayapp.ops.plan.shapes import ModelShape

    opt_small = ModelShape(name="opt-vocab-small", model_type="opt", params=0, layer_params=0, layers=2, hidden=128,
                           intermediate=512, vocab=50272, heads=4, kv_heads=4, head_dim=32, max_positions=width,
                           gated_mlp=False, source="benchmark")
    kw = dict(dtype_bytes=4, batch_tokens=batch_tokens, max_length=width, resident_models=0, gpu=False)
    full = memory.scoring_memory(opt_small, bounded_logits=False, **kw)
    bounded = memory.scoring_memory(opt_small, bounded_logits=True, **kw)
    return {
        "full load per worker (fp32 model)": 4 * params,
        "sharded load per worker (fp32 shard)": 4 * params // 2,
        "scoring batch, full logits": memory.total(full),
        "scoring batch, bounded": memory.total(bounded),
    }


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load, score = result["load"], result["scoring"]
    base = max(load["imports and meta build only"]["peak_rss_bytes"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = ["full load,\nthen shard (before)", "sharded load\n(now)"]
    peaks = [max(load["full load, then shard (before)"]["peak_rss_bytes"]) / GIB,
             max(load["sharded load (now)"]["peak_rss_bytes"]) / GIB]
    a.bar(labels, peaks, color=["#bbbbbb", "#3b7dd8"])
    a.axhline(result["model_fp32_bytes"] / GIB, color="k", ls="--", lw=1)
    a.text(1.45, result["model_fp32_bytes"] / GIB, " model fp32", va="bottom", ha="right", fontsize=8)
    a.axhline(base / GIB, color="#888", ls=":", lw=1)
    a.text(1.45, base / GIB, " no weights", va="bottom", ha="right", fontsize=8)
    a.set_ylabel("peak resident memory per worker (GiB)")
    a.set_title(f"(a) FSDP2 load, {result['params'] / 1e9:.2f}B Llama, 2 gloo workers", fontsize=10)
    inc = [score["full logits (before)"]["increment"] / GIB, score["labelled positions, chunked (now)"]["increment"] / GIB]
    b.bar(["full logits\n(before)", "labelled positions,\nchunked (now)"], inc, color=["#bbbbbb", "#3b7dd8"])
    b.set_ylabel("peak memory of one batch (GiB)")
    b.set_title(f"(b) scoring {result['batch_tokens']:,} tokens, vocabulary 50,272", fontsize=10)
    for ax, vals in ((a, peaks), (b, inc)):
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


ADAMW_SHAPES = ("facebook/opt-125m", "facebook/opt-350m")


def run_adamw_step(out_dir: str, tokens: int = 128) -> dict:
    """(c): for each shape, the step's growth of resident memory per rank, per implementation,
    beside the plan's adamw_step_temporaries for that rank's shard."""
    from rayapp.ops.plan import memory
    from rayapp.ops.plan.shapes import bundled_config
    from rayapp.testing.gloo import run_gloo
    from rayapp.testing.optimizer_probe import adamw_step_growth

    impls = list(memory.ADAMW_IMPLS)
    result = {"machine": _machine(), "world": 2, "tokens": tokens, "shapes": {}}
    for name in ADAMW_SHAPES:
        with open(bundled_config(name)) as f:
            config = json.load(f)
        t0 = time.perf_counter()
        ranks = run_gloo(adamw_step_growth, 2, config, impls, tokens)
        rows = {}
        for impl in impls:
            measured = max(r["impls"][impl]["step_growth_bytes"] for r in ranks)
            plan = max(memory.adamw_step_temporaries(impl, r["local_params"], r["largest_local"]) for r in ranks)
            rows[impl] = {"measured_bytes": measured, "plan_bytes": plan,
                          "plan_over_measured": plan / measured if measured > 0 else None}
            print(f"  {name} {impl}: step allocates {measured / 2**20:,.1f} MiB per rank, plan "
                  f"{plan / 2**20:,.1f} MiB", flush=True)
        result["shapes"][name] = {"local_params": [r["local_params"] for r in ranks],
                                  "local_fp32_bytes": max(4 * r["local_params"] for r in ranks),
                                  "seconds": round(time.perf_counter() - t0, 1), "impls": rows}
    write_results(out_dir, f"adamw-step-cpu{os.cpu_count()}", result)
    return result


REAL_VOCAB_CHILD = r"""
import json, resource, sys, time, numpy as np, torch
from rayapp.ml.models.loading import load_causal_lm
from rayapp.ml.models.losses import _base_and_head, batch_losses, full_logits_losses, pad_batch
from rayapp.testing.fsdp_probes import peak_rss_bytes
torch.set_num_threads(2)
name, path, rows, width, labelled = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
model = load_causal_lm(name, dtype=torch.float32).eval()
vocab = model.config.vocab_size
rng = np.random.default_rng(0)
seqs = [rng.integers(3, vocab, size=width).tolist() for _ in range(rows)]
cut = int(width * (1 - labelled))
ids, labels, mask = pad_batch(seqs, [[-100] * cut + s[cut:] for s in seqs], 0)
with torch.inference_mode():  # the weights' pages (the load maps the file) are touched before measuring
    model(input_ids=ids[:1, :8], use_cache=False)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before, peak_before = rss(), peak_rss_bytes()
t0 = time.perf_counter()
sums, counts = (full_logits_losses if path == "full" else batch_losses)(model, ids, labels, mask)
print(json.dumps({"model_type": model.config.model_type, "vocab": vocab, "bounded": _base_and_head(model) is not None,
                  "softcap": getattr(model.config, "final_logit_softcapping", None),
                  "seconds": time.perf_counter() - t0, "increment": peak_rss_bytes() - max(before, peak_before),
                  "loss_sums": sums.tolist(), "scored_tokens": int(counts.sum())}))
"""


def run_real_vocab_scoring(out_dir: str, name: str = "gemma3-270m", rows: int = 4, width: int = 512,
                           labelled: float = 0.5) -> dict:
    """(d): one scoring batch of a real large-vocabulary model (Gemma-3-270M: 262,144 tokens, a
    soft-capped output layer), full logits against the bounded loss, each in its own process:
    peak memory, time, and the per-row losses of the two side by side."""
    import numpy as np

    from rayapp.ops.plan import memory
    from rayapp.ops.plan.shapes import model_shape

    out = {}
    for label, path in (("full logits", "full"), ("labelled positions, chunked", "bounded")):
        proc = subprocess.run([sys.executable, "-c", REAL_VOCAB_CHILD, name, path, str(rows), str(width),
                               str(labelled)], capture_output=True, text=True, check=True)
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {name} {label}: peak increment {out[label]['increment'] / GIB:.2f} GiB, "
              f"{out[label]['seconds']:.1f} s", flush=True)
    full, bounded = (np.array(out[k]["loss_sums"]) for k in ("full logits", "labelled positions, chunked"))
    shape = model_shape(name)
    kw = dict(dtype_bytes=4, batch_tokens=rows * width, max_length=width, resident_models=0, gpu=False)
    plan = {k: memory.total(memory.scoring_memory(shape, bounded_logits=b, **kw))
            for k, b in (("full logits", False), ("labelled positions, chunked", True))}
    result = {"machine": _machine(), "model": name, "batch_tokens": rows * width, "labelled_share": labelled,
              "paths": out, "max_relative_row_difference": float(np.max(np.abs(full - bounded) / np.abs(full))),
              "bounded_over_full_memory": out["labelled positions, chunked"]["increment"]
              / out["full logits"]["increment"],
              "plan_bytes": plan}
    write_results(out_dir, f"scoring-memory-{name}-cpu{os.cpu_count()}", result)
    print(f"bounded loss: {result['bounded_over_full_memory']:.1%} of the full-logits memory; rows differ by at most "
          f"{result['max_relative_row_difference']:.1e} (relative)", flush=True)
    return result


def run(out_dir: str, rows: int = 32, width: int = 512, labelled: float = 0.5) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rayapp-mem-") as folder:
        print("writing a ~1.1B Llama (random fp32 weights) ...", flush=True)
        params = _write_model(folder)
        print(f"(a) FSDP2 load of {params / 1e9:.2f}B parameters on 2 gloo workers", flush=True)
        load = _load_side_by_side(folder)
    print(f"(b) one scoring batch: {rows} x {width} tokens, {labelled:.0%} labelled, vocabulary 50,272", flush=True)
    scoring = _scoring_side_by_side(rows, width, labelled)
    est = _estimates(params, rows * width, width, labelled)
    base = max(load["imports and meta build only"]["peak_rss_bytes"])
    full = max(load["full load, then shard (before)"]["peak_rss_bytes"])
    shard = max(load["sharded load (now)"]["peak_rss_bytes"])
    measured = {
        "full load per worker (fp32 model)": full - base,
        "sharded load per worker (fp32 shard)": shard - base,
        "scoring batch, full logits": scoring["full logits (before)"]["increment"],
        "scoring batch, bounded": scoring["labelled positions, chunked (now)"]["increment"],
    }
    fp32 = 4 * params
    result = {
        "machine": _machine(), "params": params, "model_fp32_bytes": fp32, "batch_tokens": rows * width,
        "labelled_share": labelled, "load": load, "scoring": scoring,
        "ratios": {
            "sharded_peak_rss_over_fp32_model": shard / fp32,
            "sharded_above_bare_worker_over_fp32_model": (shard - base) / fp32,
            "full_load_peak_rss_over_fp32_model": full / fp32,
            "bounded_over_full_scoring_memory": measured["scoring batch, bounded"] / measured["scoring batch, full logits"],
        },
        "plan_vs_measured": {k: {"plan_bytes": est[k], "measured_bytes": measured[k],
                                 "plan_over_measured": est[k] / measured[k] if measured[k] else None} for k in est},
        "same_losses": abs(scoring["full logits (before)"]["loss_sum_total"]
                           - scoring["labelled positions, chunked (now)"]["loss_sum_total"])
                       <= 1e-5 * abs(scoring["full logits (before)"]["loss_sum_total"]),
    }
    write_results(out_dir, f"memory-cpu{os.cpu_count()}", result, _plot)
    r = result["ratios"]
    print(f"sharded load: peak RSS {shard / GIB:.2f} GiB per worker = {r['sharded_peak_rss_over_fp32_model']:.2f} x the "
          f"fp32 model ({r['sharded_above_bare_worker_over_fp32_model']:.2f} x above a worker holding no weights); "
          f"before: {r['full_load_peak_rss_over_fp32_model']:.2f} x")
    print(f"scoring batch: bounded loss {r['bounded_over_full_scoring_memory']:.1%} of the full-logits loss's memory")
    for k, v in result["plan_vs_measured"].items():
        ratio = f"{v['plan_over_measured']:.2f} x" if v["plan_over_measured"] else "-"
        print(f"  plan vs measured, {k}: {v['plan_bytes'] / GIB:.2f} vs {v['measured_bytes'] / GIB:.2f} GiB ({ratio})")
    print("(c) AdamW's step on FSDP2 shards: foreach, fused and for-loop", flush=True)
    result["adamw_step"] = run_adamw_step(out_dir)
    return result
