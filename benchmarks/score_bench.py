"""Scoring benchmark: `python -m benchmarks score [--rows 3000] [--baseline COMMIT] [--no-full]`.

Three parts, on this machine, with the tiny reference model from configs/tiny.yaml (so the numbers
are about the engine's overheads, padding and scaling, not about a production model):

1. **Actors** (benchmarks/score_probe.py, a fresh process and local Ray cluster per checkout): N
   real Alpaca rows at the default data settings, scored with 1 and then 2 actors. Time to the
   first result, end-to-end and steady tokens/s, padding inside the actors' batches. With
   ``--baseline COMMIT`` the same probe first runs on that commit (a git worktree, this checkout's
   virtual environment), side by side.
2. **Padding** on all of Alpaca and Dolly prepared at the default settings: the share of computed
   tokens that are padding, per unit of work as the actors cut it (consecutive rows, the former
   engine; rows in each shard's length order, this one) and for the whole set sorted at once.
3. **Full Alpaca end to end**: rayapp (2 actors) against a plain single-process transformers loop
   (benchmarks/plain_score.py: fixed batches in file order, both cores), each timed from its start
   to its last score, start-up included.

Writes benchmarks/results/score-cpu<N>.json and .png.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.report import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
ALPACA = os.path.join(SHARED, "alpaca-43k.jsonl")
DOLLY = os.path.join(SHARED, "dolly-15k.jsonl")


def _machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()}


# ---- 1. actors: 1 vs 2, this checkout and a baseline ------------------------------------------------


def probe(code_dir: str, rows: int, actors: str = "1,2") -> dict:
    env = {**os.environ, "PYTHONPATH": code_dir}
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "score_probe.py"), ALPACA, "--rows", str(rows),
           "--actors", actors]
    print(f"[bench] score probe in {code_dir}", flush=True)
    proc = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"probe failed in {code_dir} ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(line[0][len("PROBE "):])


def probe_baseline(commit: str, rows: int) -> dict:
    work = tempfile.mkdtemp(prefix="rayapp-score-bench-")
    src = os.path.join(work, "baseline-src")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", src, commit], cwd=REPO, check=True)
    try:
        out = probe(src, rows)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", src], cwd=REPO)
        shutil.rmtree(work, ignore_errors=True)
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True,
                                   text=True).stdout.strip()
    return out


# ---- 2. padding at the default settings ----------------------------------------------------------------


def _prepared_full(source: str, work: str, tokenizer: str | None = None):
    from rayapp.config import load_config
    from rayapp.pipeline import run as run_stage

    sets = [f"output_dir={work}", f"data.sources=[{{path: {source}}}]", "data.shard_rows=2048", "data.max_length=512"]
    if tokenizer:
        sets.append(f"models.tokenizer={tokenizer}")
    cfg = load_config("configs/tiny.yaml", sets)
    return cfg, run_stage("prepare", cfg).manifest


def shard_lengths(prepared_dir: str) -> list[np.ndarray]:
    from rayapp.core import storage

    return [storage.read_parquet(f, ["n_tokens"])["n_tokens"].to_numpy()
            for f in storage.list_files(prepared_dir, ".parquet")]


def padding_by_unit_order(shards: list[np.ndarray], rows_per_unit: int, batch_tokens: int, max_rows: int,
                          max_padding: float) -> dict:
    """Padding share of computed tokens when every unit is batched by token budget: units of
    consecutive rows (the former engine), units in each shard's length order, the same with batches
    bounded to ``max_padding`` (this engine), and the whole set batched at once (the floor)."""
    from rayapp.stages.score.batching import length_ordered_units, padding_stats, token_budget_batches

    def share(units_per_shard, bound: float = 1.0) -> float:
        real = padded = 0
        for lengths, units in units_per_shard:
            for u in units:
                r, p = padding_stats(lengths[u], token_budget_batches(lengths[u], batch_tokens, max_rows, bound))
                real, padded = real + r, padded + p
        return 1 - real / padded

    consecutive = [(x, [np.arange(lo, min(lo + rows_per_unit, len(x))) for lo in range(0, len(x), rows_per_unit)])
                   for x in shards]
    ordered = [(x, length_ordered_units(x, rows_per_unit)) for x in shards]
    everything = np.concatenate(shards)
    return {"rows": int(len(everything)), "shards": len(shards), "rows_per_unit": rows_per_unit,
            "batch_tokens": batch_tokens, "max_batch_padding": max_padding,
            "consecutive_units": share(consecutive), "length_ordered_units": share(ordered),
            "length_ordered_bounded": share(ordered, max_padding),
            "whole_set": share([(everything, [np.arange(len(everything))])])}


# ---- 3. full Alpaca: rayapp against a plain loop --------------------------------------------------------


def full_alpaca(cfg, manifest, work: str) -> dict:
    import ray

    from rayapp.config import ScoreConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.ml.models import registry
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids

    prepared = RunLayout(cfg.output_dir).prepared
    bos, pad = special_ids(load_tokenizer(manifest.tokenizer))
    model = registry.model_source(cfg, "reference")
    lengths = np.concatenate(shard_lengths(prepared))
    batch_rows = max(1, int(8192 // lengths.mean()))  # fixed batches: 8,192 tokens at the mean length
    threads = os.cpu_count()
    print(f"[bench] plain loop over {manifest.rows} rows ({batch_rows}-row batches, {threads} threads)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plain_score", prepared, model, "--pad-id", str(pad),
                           "--batch-rows", str(batch_rows), "--threads", str(threads)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{proc.stderr[-3000:]}")
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    plain["wall_s"] = time.perf_counter() - t0

    print(f"[bench] rayapp over {manifest.rows} rows (2 actors)", flush=True)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        sc = ScoreConfig(modes=["prompted"], resources={"num_cpus": 1, "min_actors": 2, "max_actors": 2})
        stats = score_checkpoints(prepared, manifest, [CheckpointRecord(name="epoch-0", path=model, uid="full")],
                                  storage.join(work, "scores-full"), sc, bos, pad)
    finally:
        ray.shutdown()
    stats["wall_s"] = time.perf_counter() - t0  # Ray's start included, as the plain loop's process start is
    return {"rows": manifest.rows, "plain": plain, "rayapp": stats,
            "speedup_end_to_end": plain["wall_s"] / stats["wall_s"]}


def run(rows: int, out_dir: str, baseline: str | None = None, full: bool = True) -> dict:
    work = tempfile.mkdtemp(prefix="rayapp-bench-")
    results: dict = {"machine": _machine(), "model": "tiny (configs/tiny.yaml reference)", "rows": rows}
    if baseline:
        results["baseline"] = probe_baseline(baseline, rows)
    results["current"] = probe(REPO, rows, "1,2,0")
    from rayapp.config import ScoreConfig

    defaults = ScoreConfig()
    results["padding"] = {}
    alpaca_cfg = None
    for name, source in (("alpaca", ALPACA), ("dolly", DOLLY)):
        print(f"[bench] preparing all of {name}", flush=True)
        cfg, manifest = _prepared_full(source, os.path.join(work, name),
                                       alpaca_cfg and alpaca_cfg[1].tokenizer)
        if name == "alpaca":
            alpaca_cfg = (cfg, manifest)
        from rayapp.core.layout import RunLayout

        results["padding"][name] = padding_by_unit_order(shard_lengths(RunLayout(cfg.output_dir).prepared),
                                                          defaults.rows_per_task, 8192, defaults.max_rows_per_batch,
                                                          defaults.max_batch_padding)
    if full:
        results["full_alpaca"] = full_alpaca(*alpaca_cfg, work)
    shutil.rmtree(work, ignore_errors=True)

    print(summary_md(results))
    write_results(out_dir, f"score-cpu{os.cpu_count()}", results, _plot)
    return results


def summary_md(results: dict) -> str:
    lines = ["| engine | actors | first result | wall | tokens/s end to end | tokens/s steady | padding in batches |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key in ("baseline", "current"):
        if key not in results:
            continue
        label = f"baseline `{results[key]['commit']}`" if key == "baseline" else "this commit"
        for r in results[key]["runs"]:
            lines.append(f"| {label} | {r['actors'] or 'none (score.local)'} | {r['first_result_s']:.1f} s | {r['wall_s']:.1f} s | "
                         f"{r['tokens_per_s']:,.0f} | {r['steady_tokens_per_s']:,.0f} | {r['padding_fraction']:.1%} |")
    for key in ("baseline", "current"):
        if key in results:
            one, two = results[key]["runs"][:2]  # 1 and 2 actors
            lines.append(f"\n{key}: 2 actors / 1 actor = x{one['wall_s'] / two['wall_s']:.2f} end to end, "
                         f"x{two['steady_tokens_per_s'] / one['steady_tokens_per_s']:.2f} steady")
    for name, p in results["padding"].items():
        lines.append(f"padding on all of {name} ({p['rows']} rows): consecutive units {p['consecutive_units']:.1%}, "
                     f"length-ordered units {p['length_ordered_units']:.2%}, and bounded "
                     f"{p['length_ordered_bounded']:.2%}, whole set {p['whole_set']:.2%}")
    f = results.get("full_alpaca")
    if f:
        lines.append(f"full Alpaca ({f['rows']} rows): rayapp {f['rayapp']['wall_s']:.0f} s, plain loop "
                     f"{f['plain']['wall_s']:.0f} s: x{f['speedup_end_to_end']:.2f}")
    return "\n".join(lines)


def replot(json_path: str) -> None:
    with open(json_path) as f:
        _plot(json.load(f), json_path[: -len(".json")] + ".png")


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = results.get("full_alpaca")
    fig, axes = plt.subplots(1, 3 if full else 2, figsize=(14 if full else 10, 3.9))
    a, b = axes[0], axes[1]
    groups = [(k, results[k]) for k in ("baseline", "current") if k in results]
    labels, first, rest = [], [], []
    for key, g in groups:
        for r in g["runs"]:
            who = f"{r['actors']} actor(s)" if r["actors"] else "score.local (no actor)"
            labels.append(f"{'baseline ' + g['commit'] if key == 'baseline' else 'this commit'}\n{who}")
            first.append(r["first_result_s"])
            rest.append(r["wall_s"] - r["first_result_s"])
    y = np.arange(len(labels))
    a.barh(y, first, color="#c0392b", label="until the first result (start-up)")
    a.barh(y, rest, left=first, color="#2c7fb8", label="the rest")
    a.set_yticks(y, labels, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("seconds")
    a.set_title(f"Scoring {results['current']['rows']} Alpaca rows, {results['machine']['cpus']} CPUs")
    a.legend(fontsize=7, loc="lower right")
    names = list(results["padding"])
    x = np.arange(len(names))
    bars = (("consecutive_units", "#c0392b", "units of consecutive rows (before)"),
            ("length_ordered_units", "#8fb9d8", "units in length order"),
            ("length_ordered_bounded", "#2c7fb8", "... and batches <= 10% padding (now)"),
            ("whole_set", "#7f8c8d", "whole set sorted (floor)"))
    for i, (k, color, lab) in enumerate(bars):
        b.bar(x + (i - 1.5) * 0.2, [100 * results["padding"][n][k] for n in names], 0.2, color=color, label=lab)
    b.set_xticks(x, [f"{n} ({results['padding'][n]['rows']:,} rows)" for n in names])
    b.set_ylabel("padding, % of computed tokens")
    b.set_title("Padding inside actor batches (default settings)")
    b.legend(fontsize=7)
    if full:
        c = axes[2]
        c.bar(["plain loop\n(1 process, fixed batches)", "rayapp\n(2 actors)"],
              [full["plain"]["wall_s"], full["rayapp"]["wall_s"]], color=["#7f8c8d", "#2c7fb8"])
        c.set_ylabel("seconds, start-up included")
        c.set_title(f"All {full['rows']:,} Alpaca rows: x{full['speedup_end_to_end']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
