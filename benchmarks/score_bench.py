"""Scoring benchmark: tokens/s and padding for 1 and 2 actors side by side, and token-budget
versus fixed-size batching (padding fraction) on the real Alpaca rows.

Writes benchmarks/results/score-<machine>.json and .png. Measures one run per configuration on
this machine; the model is the tiny one from configs/tiny.yaml, so the numbers are about the
engine's overheads and scaling, not about a production model.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time

import numpy as np

from rayapp.common import storage
from rayapp.common.layout import RunLayout
from rayapp.config import ScoreConfig, load_config
from rayapp.models import registry
from rayapp.models.loading import load_tokenizer
from rayapp.pipeline import run as run_stage
from rayapp.score.batching import fixed_size_batches, padding_stats, token_budget_batches
from rayapp.common.manifests import CheckpointRecord
from rayapp.score.engine import score_checkpoints
from rayapp.score.stage import special_ids

ALPACA = "../shared/data/alpaca-43k.jsonl"


def _machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}


def padding_comparison(lengths: list[int], batch_tokens: int, batch_rows: int) -> dict:
    real_b, pad_b = padding_stats(lengths, token_budget_batches(lengths, batch_tokens, 10_000))
    real_f, pad_f = padding_stats(lengths, fixed_size_batches(len(lengths), batch_rows))
    return {"rows": len(lengths), "batch_tokens": batch_tokens, "fixed_batch_rows": batch_rows,
            "token_budget_padding_fraction": 1 - real_b / pad_b, "fixed_batch_padding_fraction": 1 - real_f / pad_f}


def run(rows: int, out_dir: str) -> dict:
    import ray

    work = tempfile.mkdtemp(prefix="rayapp-bench-")
    cfg = load_config("configs/tiny.yaml", [f"output_dir={work}", f"data.sources=[{{path: {ALPACA}, limit: {rows}}}]",
                                              "data.shard_rows=250", "data.max_length=512"])
    manifest = run_stage("prepare", cfg).manifest
    tok = load_tokenizer(manifest.tokenizer)
    bos, pad = special_ids(tok)
    ck = [CheckpointRecord(name="epoch-0", path=registry.model_source(cfg, "reference"), uid="bench")]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    results = {"machine": _machine(), "rows": manifest.rows, "model": "tiny (configs/tiny.yaml reference)",
               "runs": []}
    for actors in (1, 2):
        sc = ScoreConfig(batch_tokens=8192, rows_per_task=250, modes=["prompted"],
                         resources={"num_cpus": 1, "min_actors": actors, "max_actors": actors})
        t0 = time.perf_counter()
        stats = score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, ck,
                                  storage.join(work, f"scores-{actors}"), sc, bos, pad)
        stats["wall_with_startup_s"] = time.perf_counter() - t0
        stats["actors"] = actors
        results["runs"].append(stats)
    ray.shutdown()
    one, two = results["runs"]
    results["speedup_2_vs_1"] = two["tokens_per_s"] / one["tokens_per_s"]

    # padding: token budget vs fixed batches on all Alpaca rows (real lengths, this tokenizer)
    full = load_config("configs/tiny.yaml", [f"output_dir={work}/full", f"data.sources=[{{path: {ALPACA}}}]",
                                               "data.max_length=512", "data.shard_rows=8192",
                                               f"models.tokenizer={manifest.tokenizer}"])
    m_full = run_stage("prepare", full).manifest
    lengths = [int(x) for f in storage.list_files(RunLayout(full.output_dir).prepared, ".parquet")
               for x in storage.read_parquet(f, ["n_tokens"])["n_tokens"].to_pylist()]
    # fixed batches: as many rows as fit 8192 tokens at the mean length, in file order
    fixed_rows = max(1, int(8192 // np.mean(lengths)))
    results["padding_alpaca"] = padding_comparison(lengths, 8192, fixed_rows)
    results["padding_alpaca"]["prepared_rows"] = m_full.rows

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"score-cpu{os.cpu_count()}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, stem + ".png")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    for r in results["runs"]:
        print(f"actors={r['actors']}: {r['tokens_per_s']:.0f} tokens/s, {r['rows_per_s']:.1f} rows/s, "
              f"padding {r['padding_fraction']:.1%}, wall incl. start-up {r['wall_with_startup_s']:.1f}s")
    print(f"results: {stem}.json, {stem}.png")
    return results


def replot(json_path: str) -> None:
    with open(json_path) as f:
        _plot(json.load(f), json_path[: -len(".json")] + ".png")


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    runs = results["runs"]
    x = np.arange(len(runs))
    a.bar(x - 0.2, [r["tokens_per_s"] for r in runs], 0.4, color="#7f8c8d", label="end to end (start-up included)")
    a.bar(x + 0.2, [r.get("steady_tokens_per_s", 0) for r in runs], 0.4, color="#2c7fb8", label="steady state")
    a.set_xticks(x, [f"{r['actors']} actor{'s' if r['actors'] > 1 else ''}" for r in runs])
    a.set_ylabel("scored tokens / s")
    steady = runs[-1].get("steady_tokens_per_s", 0) / max(runs[0].get("steady_tokens_per_s", 1), 1e-9)
    a.set_title(f"Scoring, {results['machine']['cpus']} CPUs: x{results['speedup_2_vs_1']:.2f} end to end, x{steady:.2f} steady")
    a.legend(fontsize=8)
    p = results["padding_alpaca"]
    b.bar(["token budget\n(sorted, 8192 tok)", f"fixed batches\n({p['fixed_batch_rows']} rows)"],
          [100 * p["token_budget_padding_fraction"], 100 * p["fixed_batch_padding_fraction"]], color=["#2c7fb8", "#c0392b"])
    b.set_ylabel("padding (% of padded tokens)")
    b.set_title(f"Padding on Alpaca ({p['prepared_rows']} rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
