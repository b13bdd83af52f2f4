"""LoRA against full fine-tuning, per worker, at a real shape on this CPU, beside `rayapp plan`:

    python -m benchmarks lora

A ~1.1B Llama (TinyLlama-1.1B's shape, random fp32 weights) trains on 2 gloo workers with FSDP2,
through the training recipe itself (rayapp/ml/train/worker.py): the sharded load, the optimizer, then
two steps on one micro-batch (AdamW allocates its state at the first). Peak resident memory per
worker, above a worker that only imports and builds on the meta device, is compared with the
plan's arithmetic for the same run (rayapp/ops/plan/memory.py, no GPU parts). On a CPU the frozen
base stays fp32 (bf16 is the GPU's mixed precision); on GPUs it halves again.
Results: benchmarks/results/lora-memory-cpu<N>.json and .png.
"""

from __future__ import annotations

import os
import tempfile

from benchmarks.memory import GIB, _write_model
from benchmarks.report import write_results
from benchmarks.score_bench import _machine

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": None, "export": "merged"}
SEQ, MICRO_BATCH = 128, 2


def _rows(path: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 31999, size=SEQ).tolist() for _ in range(8)]
    labels = [[-100] * (SEQ // 2) + r[SEQ // 2:] for r in ids]
    pq.write_table(pa.table({"input_ids": ids, "labels": labels}), path)


def _plan(folder: str, lora_params: int | None) -> dict:
    from rayapp.ml.models import sharded
    from rayapp.ops.plan import memory
    from rayapp.ops.plan.shapes import shape_of

    shape = shape_of(sharded.load_config(folder), "tinyllama-1.1b-shape", folder)
    return memory.training_memory(shape, world=2, sharded=True, micro_batch_tokens=MICRO_BATCH * SEQ, bf16=False,
                                  activation_checkpointing=False, defer_gradient_sync=False, gpu=False,
                                  lora_params=lora_params)


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["runs"])
    measured = [result["runs"][k]["above_bare_worker_bytes"] / GIB for k in labels]
    planned = [result["runs"][k]["plan_bytes"] / GIB for k in labels]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = range(len(labels))
    ax.bar([i - 0.18 for i in x], measured, 0.36, label="measured (peak RSS above a bare worker)", color="#3b7dd8")
    ax.bar([i + 0.18 for i in x], planned, 0.36, label="rayapp plan", color="#bbbbbb")
    for i, (m, p) in enumerate(zip(measured, planned)):
        ax.text(i - 0.18, m, f"{m:.2f}", ha="center", va="bottom", fontsize=9)
        ax.text(i + 0.18, p, f"{p:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GiB per worker")
    ax.set_title(f"FSDP2 training, {result['params'] / 1e9:.2f}B Llama, 2 gloo workers, fp32 on CPU", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(out_dir: str) -> dict:
    from rayapp.ml.models import tiny
    from rayapp.testing.fsdp_probes import shard_on_meta, training_step_memory
    from rayapp.testing.gloo import run_gloo

    os.makedirs(out_dir, exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="rayapp-lora-mem-") as folder:
        print("writing a ~1.1B Llama (random fp32 weights) ...", flush=True)
        params = _write_model(folder)
        tiny.train_tokenizer((f"row {i} of words" for i in range(200)), 300, folder)  # only its pad id is used
        rows = os.path.join(folder, "rows.parquet")
        _rows(rows)
        bare = max(r["peak_rss_bytes"] for r in run_gloo(shard_on_meta, 2, os.path.join(folder, "config.json")))
        for label, lora in (("full fine-tuning", None), (f"LoRA r={LORA['r']}", LORA)):
            res = run_gloo(training_step_memory, 2, folder, rows, os.path.join(folder, "work"), lora, MICRO_BATCH)
            peak = max(r["peaks"]["two steps"] for r in res)
            plan = _plan(folder, res[0]["trainable_params"] if lora else None)
            runs[label] = {"peaks_per_rank": [r["peaks"] for r in res], "peak_bytes": peak,
                           "above_bare_worker_bytes": peak - bare, "plan_bytes": sum(plan.values()), "plan_parts": plan,
                           "plan_over_measured": sum(plan.values()) / (peak - bare),
                           "trainable_params": res[0]["trainable_params"], "loss": res[0]["loss"]}
            print(f"  {label}: {res[0]['trainable_params']:,} trainable; peak {peak / GIB:.2f} GiB per worker, "
                  f"{(peak - bare) / GIB:.2f} above a bare worker; plan {sum(plan.values()) / GIB:.2f} GiB", flush=True)
    full, lora = runs["full fine-tuning"], runs[f"LoRA r={LORA['r']}"]
    result = {"machine": _machine(), "params": params, "bare_worker_peak_bytes": bare, "seq": SEQ,
              "micro_batch": MICRO_BATCH, "lora": LORA, "runs": runs,
              "lora_over_full_measured": lora["above_bare_worker_bytes"] / full["above_bare_worker_bytes"],
              "lora_over_full_plan": lora["plan_bytes"] / full["plan_bytes"]}
    write_results(out_dir, f"lora-memory-cpu{os.cpu_count()}", result, _plot)
    return result
