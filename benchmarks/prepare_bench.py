"""Prepare throughput on the full Alpaca and Dolly files: the driver alone, and Ray Data with 1
and 2 workers, in one run on one local Ray cluster.

    python -m benchmarks prepare

Each configuration prepares one file from scratch (fresh output dir) with the same tokenizer, a
4,096-token BPE trained once beforehand from the file, so that only prepare's own work is timed:
reading, normalising, templating, tokenizing, de-duplicating and writing the shards. The Ray
cluster is started before the clock starts. The outputs of every configuration are checked to be
the same. Results: benchmarks/results/prepare-cpu<N>.json and .png.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from benchmarks.report import write_results
from benchmarks.score_bench import _machine

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
FILES = {"alpaca": "alpaca-43k.jsonl", "dolly": "dolly-15k.jsonl"}
WORKERS = (0, 1, 2)


def _config(path: str, tokenizer: str, out: str, workers: int):
    from rayapp.config import RunConfig

    return RunConfig.model_validate({
        "output_dir": out, "ray": {"num_cpus": os.cpu_count()},
        "data": {"sources": [{"path": path}], "max_length": 512, "shard_rows": 8192, "holdout_rows": 0,
                 "workers": workers, "block_mb": 2},
        "models": {"reference": {"name_or_path": "tiny"}, "target": {"name_or_path": "tiny"}, "tokenizer": tokenizer},
    })


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["driver only", "Ray Data, 1 worker", "Ray Data, 2 workers"]
    width = 0.38
    for k, (name, res) in enumerate(results.items()):
        rates = [res[str(w)]["rows_per_s"] for w in WORKERS]
        xs = [i + (k - 0.5) * width for i in range(len(WORKERS))]
        ax.bar(xs, rates, width, label=f"{name} ({res['0']['rows_read']:,} rows)")
        for x, v in zip(xs, rates):
            ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(WORKERS)), labels)
    ax.set_ylabel("rows prepared per second")
    ax.set_title("prepare: read, normalise, template, tokenize, write (2-core machine)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(out_dir: str) -> dict:
    import ray

    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.ml.models import tiny
    from rayapp.pipeline import run as run_stage
    from rayapp.stages.prepare.readers import iter_jsonl

    os.makedirs(out_dir, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="rayapp-prep-") as tmp:
        for name, fname in FILES.items():
            path = os.path.abspath(os.path.join(SHARED, fname))
            tok = os.path.join(tmp, f"tok-{name}")
            texts = (" ".join(str(v) for v in r.data.values()) for r in iter_jsonl(path) if r.data)
            tiny.train_tokenizer(texts, 4096, tok)
            results[name] = {}
            tables = {}
            for workers in WORKERS:
                cfg = _config(path, tok, os.path.join(tmp, f"{name}-{workers}"), workers)
                t0 = time.perf_counter()
                m = run_stage("prepare", cfg).manifest
                wall = time.perf_counter() - t0
                tables[workers] = storage.read_parquet_dir(RunLayout(cfg.output_dir).prepared)
                results[name][str(workers)] = {"seconds": round(wall, 2), "rows_read": m.rows_read, "rows": m.rows,
                                               "rejected": m.rejected, "rows_per_s": round(m.rows_read / wall, 1)}
                print(f"{name}: workers={workers}: {m.rows_read:,} rows in {wall:.1f} s "
                      f"({m.rows_read / wall:,.0f} rows/s)", flush=True)
            assert all(t.equals(tables[0]) for t in tables.values()), f"{name}: outputs differ"
    ray.shutdown()
    result = {"machine": _machine(), "block_mb": 2, "results": results,
              "speedup_2_workers_over_driver": {n: r["0"]["seconds"] / r["2"]["seconds"] for n, r in results.items()},
              "speedup_2_over_1_worker": {n: r["1"]["seconds"] / r["2"]["seconds"] for n, r in results.items()}}
    print(json.dumps({k: result[k] for k in ("speedup_2_workers_over_driver", "speedup_2_over_1_worker")}, indent=2))
    write_results(out_dir, f"prepare-cpu{os.cpu_count()}", result, _plot, plot_data=results)
    return result
