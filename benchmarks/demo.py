"""The newcomer's first run, timed: `rayapp run -c configs/tiny.yaml` at a baseline commit and at
this checkout, side by side on the same machine in one invocation.

    python -m benchmarks demo --baseline 2c6cd9d
    python -m benchmarks demo --baseline a9fcb19 --repeats 2 --name demo-stage-processes \
        --variant one-driver:ray.stage_processes=false

``--variant LABEL:KEY=VALUE`` adds an arm: this checkout with that config override. With
``--repeats``, the arms alternate (baseline, this checkout, its variants, baseline, ...), so that a
change of load on the machine falls on all; the medians are compared.

The baseline runs from a git worktree of that commit (removed afterwards) with this checkout's
virtual environment, so both use the same installed packages; each run gets a fresh output dir and
its own local Ray cluster. Per-stage times come from the `[run]` lines of each run's output (the
baseline's format) or from its summary.json (this checkout's). Results: benchmarks/results/
demo-cpu<N>.json and .png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.report import write_results
from benchmarks.score_bench import _machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_seconds(out_dir: str, log: str) -> dict[str, float]:
    summary = os.path.join(out_dir, "summary.json")
    stages: dict[str, float] = {}
    if os.path.exists(summary):
        for name, entry in json.load(open(summary))["stages"].items():
            stages[name] = float(entry.get("seconds", 0.0))
    # the baseline prints "[run] <stage> done in 12.3s"; its finetune line covers every subset
    for name, secs in re.findall(r"\[run\] (\w+) done in ([\d.]+)s", log):
        stages[name] = float(secs)
    return stages


def run_once(code_dir: str, label: str, work: str, runs_dir: str, name: str = "demo",
             overrides: tuple[str, ...] = ()) -> dict:
    out_dir = os.path.join(work, label)
    env = {**os.environ, "PYTHONPATH": code_dir}
    cmd = [sys.executable, "-m", "rayapp", "run", "-c", "configs/tiny.yaml", "--set", f"output_dir={out_dir}"]
    for override in overrides:
        cmd += ["--set", override]
    print(f"[bench] {label}: {' '.join(cmd)} (in {code_dir})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    with open(os.path.join(runs_dir, f"{name}-{label}.log"), "w") as f:
        f.write(log)
    if proc.returncode != 0:
        raise SystemExit(f"{label} run failed ({proc.returncode}):\n{log[-3000:]}")
    lines = [line for line in log.splitlines() if line.strip()]
    return {"label": label, "wall_s": round(wall, 1), "stages_s": _stage_seconds(out_dir, log),
            "output_lines": len(lines), "ray_info_lines": sum(bool(re.search(r"\bINFO\b", line)) for line in lines)}


def run(baseline: str, out: str, repeats: int = 1, name: str = "demo", variants: tuple[str, ...] = ()) -> dict:
    arms = [("current", ())]
    for variant in variants:
        label, sep, override = variant.partition(":")
        if not sep or "=" not in override:
            raise SystemExit(f"--variant {variant!r}: expected LABEL:KEY=VALUE")
        arms.append((f"current+{label}", (override,)))
    work = tempfile.mkdtemp(prefix="rayapp-demo-bench-")
    base_dir = os.path.join(work, "baseline-src")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", base_dir, baseline], cwd=REPO, check=True)
    # the baseline resolves ../shared/data from its working dir: give its worktree the same neighbour
    shared = os.path.join(os.path.dirname(REPO), "shared")
    link = os.path.join(work, "shared")
    if os.path.isdir(shared) and not os.path.exists(link):
        os.symlink(shared, link)
    os.makedirs(out, exist_ok=True)
    runs = []
    try:
        for k in range(repeats):
            tag = f"-{k + 1}" if repeats > 1 else ""
            runs.append({"arm": "baseline", **run_once(base_dir, "baseline" + tag, work, out, name)})
            for label, overrides in arms:
                runs.append({"arm": label, **run_once(REPO, label + tag, work, out, name, overrides)})
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base_dir], cwd=REPO)
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", baseline], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    import statistics

    medians = {arm: statistics.median(r["wall_s"] for r in runs if r["arm"] == arm)
               for arm in ["baseline"] + [label for label, _ in arms]}
    results = {"machine": _machine(), "baseline_commit": commit, "config": "configs/tiny.yaml", "repeats": repeats,
               "variants": {label: list(overrides) for label, overrides in arms[1:]},
               "runs": runs, "median_wall_s": medians,
               "speedup": round(medians["baseline"] / medians["current"], 2)}
    print(json.dumps(results, indent=2))
    write_results(out, f"{name}-cpu{os.cpu_count()}", results, _plot)
    return results


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(name: str) -> str:
        return "finetune" if name.startswith("finetune") else name

    order = ["prepare", "reference", "score", "select", "finetune", "evaluate"]
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.5 * len(results["runs"])))
    colors = plt.get_cmap("tab10").colors
    for y, r in enumerate(results["runs"]):
        per: dict[str, float] = {}
        for name, secs in r["stages_s"].items():
            # the finetune variants of one run share a worker group and report its wall time each
            per[group(name)] = max(per.get(group(name), 0.0), secs) if "(" in name else per.get(group(name), 0.0) + secs
        left = 0.0
        for i, name in enumerate(order):
            secs = per.get(name, 0.0)
            ax.barh(y, secs, left=left, color=colors[i], label=name if y == 0 else None)
            if secs > 12:
                ax.text(left + secs / 2, y, f"{secs:.0f}", ha="center", va="center", fontsize=8, color="white")
            left += secs
        ax.text(r["wall_s"] + 3, y, f"{r['wall_s']:.0f} s wall", va="center", fontsize=9)
    ax.set_yticks(range(len(results["runs"])),
                  [r["label"].replace("baseline", f"baseline {results['baseline_commit']}").replace("current", "this commit")
                   for r in results["runs"]])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (rayapp run -c configs/tiny.yaml, 2-core CPU)")
    ax.set_xlim(0, max(r["wall_s"] for r in results["runs"]) * 1.2)
    ax.legend(ncol=6, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
