"""A million instruction rows on this machine: prepare spread over Ray Data (1 and 2 workers), and a
select from external trajectories with clusters from an embeddings file, at 100k and 1M rows.

    python -m benchmarks million [--sizes 100000,1000000]

The rows. Every shared Alpaca and Dolly row (58,587) is used as it is once, then again with
" (variant k)" appended to its instruction for k = 1, 2, ..., until N rows: distinct rows, real text.
Three quarters of them come from Alpaca (an Alpaca-schema JSONL), one quarter from Dolly (a
Dolly-schema JSONL: ``context``, ``response``). Duplicates are planted: every 50th Alpaca-file row
repeats the row 1,000 lines before it, and every 40th Dolly-file row repeats an Alpaca-file row (a
duplicate across files and schemas), so de-duplication has real work whose size is known.

What is measured. Each configuration runs in a process of its own (a fresh local Ray cluster of 2
CPUs), so its peak RSS is its own: the driver's (sampled every 0.2 s, and ``ru_maxrss``) before the
stage and at its peak, and each Ray worker's peak. Prepare uses a 4,096-token BPE trained once
beforehand, so only prepare's own work is timed. The driver path (``data.workers: 0``) runs at 100k
rows only, as the "before": it holds every row.

Select. Scoring a million rows with a model does not fit a 2-core benchmark, so the trajectories
are the paper's published perplexities (opt-350m P0..P3, Alpaca then Dolly), dealt out to the
ids in turn (content-hash-like; select needs no prepared data), and the clusters come from a file
of 384-d embeddings (1,000 well-separated centres plus noise): ``select --trajectories ... --clusters ...``, stratified LP with clust_rand,
ppl_high, and the global ppl_high and random draws at 5 %. Select runs in-process
(``select.workers: 0``: its peak is bounded by the k-means fit's rows of embeddings, plus a few
numbers per row) and spread over Ray Data (1 and 2 workers; at 100k rows 2 only). Every spread run's
selections (rows and ids digest) are checked against the in-process run's.

Results: benchmarks/results/million-cpu<N>.json and .png.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.report import write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")
DIM = 384
CENTRES = 1000
MB = 2**20


# ---------------------------------------------------------------- the rows

def _base_rows() -> tuple[list[dict], list[dict]]:
    def read(name):
        with open(os.path.join(SHARED, name)) as f:
            return [json.loads(line) for line in f if line.strip()]

    return read("alpaca-43k.jsonl"), read("dolly-15k.jsonl")


def _variant(row: dict, k: int) -> dict:
    return row if k == 0 else {**row, "instruction": f"{row['instruction']} (variant {k})"}


def write_rows(n: int, folder: str) -> dict:
    """The two source files of ``n`` rows in all; what was planted."""
    alpaca, dolly = _base_rows()
    n_alpaca = n * 3 // 4
    a_path, d_path = os.path.join(folder, "alpaca-like.jsonl"), os.path.join(folder, "dolly-like.jsonl")
    planted_a = planted_d = 0
    ring: list[str] = []  # the Alpaca file's last 1,000 lines
    alpaca_lines_sample: list[str] = []
    with open(a_path, "w") as f:
        for i in range(n_alpaca):
            if i % 50 == 49 and len(ring) == 1000:
                line = ring[0]
                planted_a += 1
            else:
                line = json.dumps(_variant(alpaca[i % len(alpaca)], i // len(alpaca)), ensure_ascii=False)
            f.write(line + "\n")
            ring.append(line)
            if len(ring) > 1000:
                ring.pop(0)
            if i % 997 == 0:
                alpaca_lines_sample.append(line)
    with open(d_path, "w") as f:
        for i in range(n - n_alpaca):
            if i % 40 == 39:
                r = json.loads(alpaca_lines_sample[(i // 40) % len(alpaca_lines_sample)])
                planted_d += 1
            else:
                r = _variant(dolly[i % len(dolly)], i // len(dolly))
            f.write(json.dumps({"instruction": r["instruction"], "context": r["input"], "response": r["output"]},
                               ensure_ascii=False) + "\n")
    return {"files": [a_path, d_path], "rows": n, "alpaca_rows": n_alpaca, "dolly_rows": n - n_alpaca,
            "planted_duplicates_within_alpaca": planted_a, "planted_duplicates_across_files": planted_d,
            "bytes": os.path.getsize(a_path) + os.path.getsize(d_path)}


def write_tokenizer(folder: str) -> str:
    from rayapp.ml.models import tiny

    alpaca, dolly = _base_rows()
    out = os.path.join(folder, "tokenizer")
    tiny.train_tokenizer((" ".join(r.values()) for r in alpaca + dolly), 4096, out)
    return out


def write_select_inputs(n: int, folder: str) -> dict:
    """Trajectories (the paper's perplexities dealt out to ``n`` ids) and an embeddings file. The
    ids are content-hash-like (sha256 of the row number, 20 hex digits, as prepare's ids look):
    select from external trajectories needs no prepared data, so it is measured on its own."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = pa.array([hashlib.sha256(str(i).encode()).hexdigest()[:20] for i in range(n)])
    cols = [f"opt-350m_P{i}" for i in range(4)]
    paper = pa.concat_tables([pq.read_table(os.path.join(SHARED, "paper-perplexities", f), columns=cols)
                              for f in ("alpaca.parquet", "dolly.parquet")])
    deal = np.arange(n) % paper.num_rows
    traj = pa.table({"id": ids, **{c[len("opt-350m_"):]: paper[c].take(pa.array(deal)) for c in cols}})
    t_path = os.path.join(folder, "trajectories.parquet")
    pq.write_table(traj, t_path)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (CENTRES, DIM)).astype(np.float32)
    e_path = os.path.join(folder, "embeddings.parquet")
    with pq.ParquetWriter(e_path, pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), DIM))])) as w:
        for lo in range(0, n, 65_536):
            m = min(65_536, n - lo)
            vecs = centres[rng.integers(0, CENTRES, m)] + rng.normal(0, 0.3, (m, DIM)).astype(np.float32)
            w.write_table(pa.table({"id": ids.slice(lo, m), "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vecs.reshape(-1)), DIM)}))
    return {"trajectories": t_path, "embeddings": e_path, "rows": n,
            "embeddings_bytes": os.path.getsize(e_path)}


# ---------------------------------------------------------------- one measured configuration

class _Peaks:
    """Peak RSS of this process and of every Ray worker process, sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.driver, self.workers = 0, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            for p in self.psutil.process_iter(["cmdline", "memory_info"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and p.info["memory_info"]:
                    self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.info["memory_info"].rss)
            self.stop.wait(0.2)

    def __enter__(self):
        self.before = self.me.memory_info().rss
        # Linux keeps ru_maxrss across fork and exec: this process starts with its parent's peak
        # (the benchmark's, after writing a million rows), so it counts only once it is exceeded
        self.inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def figures(self) -> dict:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(self.driver, maxrss if maxrss > self.inherited else 0)
        workers = sorted(self.workers.values(), reverse=True)
        return {"driver_rss_before_mb": round(self.before / MB), "driver_peak_rss_mb": round(peak / MB),
                "driver_growth_mb": round((peak - self.before) / MB),
                "worker_peak_rss_mb": [round(w / MB) for w in workers[:4]]}


def _one(spec: dict) -> dict:
    """Runs in its own process: one stage of one configuration, measured."""
    import ray

    from rayapp.config import RunConfig
    from rayapp.pipeline import run as run_stage

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    cfg = RunConfig.model_validate(spec["config"])
    import pyarrow  # noqa: F401  (imported before the "before" reading, as the stage would)

    with _Peaks() as peaks:
        t0 = time.perf_counter()
        m = run_stage(spec["stage"], cfg, force=True).manifest
        wall = time.perf_counter() - t0
    out = {"stage": spec["stage"], "seconds": round(wall, 1), **peaks.figures()}
    if spec["stage"] == "prepare":
        out.update(rows_read=m.rows_read, rows=m.rows, rejected=m.rejected, reject_reasons=m.reject_reasons,
                   rows_per_s=round(m.rows_read / wall), shards=len(m.shards))
    else:  # each selection's rows and ids digest: the in-process and spread paths must agree
        out.update(rows_per_s=round(spec["rows"] / wall), selections={
            k: [s.rows, json.load(open(os.path.join(os.path.dirname(s.path), "selection.json")))["selected_ids_sha256"]]
            for k, s in m.selections.items()})
    ray.shutdown()
    return out


def _measured(stage: str, config: dict, rows: int = 0) -> dict:
    spec = json.dumps({"stage": stage, "config": config, "rows": rows})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.million", "--one", spec], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prepare_config(files: list[str], tokenizer: str, out: str, workers: int) -> dict:
    return {"output_dir": out, "ray": {"num_cpus": 2, "stage_processes": "never"},
            "data": {"sources": [{"path": f} for f in files], "max_length": 512, "shard_rows": 8192,
                     "holdout_rows": 1000, "workers": workers, "block_mb": 16},
            "models": {"reference": {"name_or_path": "tiny"}, "target": {"name_or_path": "tiny"},
                       "tokenizer": tokenizer}}


def _select_config(inputs: dict, out: str, workers: int) -> dict:
    return {"output_dir": out, "ray": {"num_cpus": 2, "stage_processes": "never"},
            "data": {"sources": [{"path": "unused.jsonl"}]},
            "models": {"reference": {"name_or_path": "tiny"}, "target": {"name_or_path": "tiny"}},
            "select": {"trajectories": inputs["trajectories"], "clusters": inputs["embeddings"], "budget": 0.05,
                       "baselines": ["clust_rand", "ppl_high", "ppl_high:global", "random"], "workers": workers}}


# ---------------------------------------------------------------- the run

def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["runs"], key=int)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, growth = [], {s: [] for s in sizes}
    for key in ("prepare/0", "prepare/1", "prepare/2", "select", "select/1", "select/2"):
        if not any(key in results["runs"][s] for s in sizes):
            continue
        labels.append({"prepare/0": "prepare,\ndriver path", "prepare/1": "prepare,\n1 worker",
                       "prepare/2": "prepare,\n2 workers", "select": "select,\nin-process",
                       "select/1": "select,\n1 worker", "select/2": "select,\n2 workers"}[key])
        for s in sizes:
            growth[s].append(results["runs"][s].get(key, {}).get("driver_peak_rss_mb", 0))
    width = 0.8 / len(sizes)
    for k, s in enumerate(sizes):
        xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(labels))]
        ax1.bar(xs, growth[s], width, label=f"{int(s):,} rows")
        for x, v in zip(xs, growth[s]):
            if v:
                ax1.text(x, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(labels)), labels, fontsize=8)
    ax1.set_ylabel("driver peak RSS (MiB)")
    ax1.set_title("driver peak memory by rows (a missing bar: not run at that size)", fontsize=10)
    ax1.legend()
    for stage in ("prepare", "select"):
        for w in (1, 2):
            pts = [(int(s), results["runs"][s][f"{stage}/{w}"]["rows_per_s"]) for s in sizes
                   if "rows_per_s" in results["runs"][s].get(f"{stage}/{w}", {})]
            if pts:
                ax2.plot(*zip(*pts), marker="o" if stage == "prepare" else "s",
                         label=f"{stage}, {w} worker{'s' * (w > 1)}")
    ax2.set_xscale("log")
    ax2.set_xlabel("rows")
    ax2.set_ylabel("rows per second")
    ax2.set_title("throughput with workers (2-core machine)", fontsize=10)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(out_dir: str, sizes: tuple[int, ...] = (100_000, 1_000_000),
        stages: tuple[str, ...] = ("prepare", "select")) -> dict:
    """Measure ``stages`` at ``sizes``; figures already in the results file for other stages are kept
    (each run records the commit it ran at)."""
    from benchmarks.score_bench import _machine

    name = f"million-cpu{os.cpu_count()}"
    path = os.path.join(out_dir, name + ".json")
    result = json.load(open(path)) if os.path.exists(path) else {"runs": {}, "data": {}}
    result["machine"] = _machine()
    runs, data, commit = result["runs"], result["data"], _commit()
    with tempfile.TemporaryDirectory(prefix="rayapp-million-") as tmp:
        tokenizer = write_tokenizer(tmp) if "prepare" in stages else None
        for n in sizes:
            folder = os.path.join(tmp, str(n))
            os.makedirs(folder)
            runs.setdefault(str(n), {})
            if "prepare" in stages:
                t0 = time.perf_counter()
                data.setdefault(str(n), {}).update(write_rows(n, folder))
                print(f"{n:,} rows written in {time.perf_counter() - t0:.0f} s", flush=True)
                for workers in ((0, 1, 2) if n <= 100_000 else (1, 2)):
                    out = os.path.join(folder, f"run-{workers}")
                    r = _measured("prepare", _prepare_config(data[str(n)]["files"], tokenizer, out, workers))
                    runs[str(n)][f"prepare/{workers}"] = {**r, "commit": commit}
                    print(f"{n:,} rows, prepare, {workers} workers: {json.dumps(r)}", flush=True)
                    shutil.rmtree(out)
            if "select" in stages:
                inputs = write_select_inputs(n, folder)
                data.setdefault(str(n), {})["select_inputs"] = {k: v for k, v in inputs.items()
                                                                 if k in ("rows", "embeddings_bytes")}
                for workers in (0, 1, 2) if n > 100_000 else (0, 2):
                    key = f"select/{workers}" if workers else "select"
                    out = os.path.join(folder, f"select-{workers}")
                    r = _measured("select", _select_config(inputs, out, workers), n)
                    runs[str(n)][key] = {**r, "commit": commit}
                    print(f"{n:,} rows, {key}: {json.dumps(r)}", flush=True)
                    shutil.rmtree(out)
                same = {runs[str(n)][k]["selections"] == runs[str(n)]["select"]["selections"]
                        for k in ("select/1", "select/2") if k in runs[str(n)]}
                print(f"{n:,} rows: spread selections equal the in-process ones: {same == {True}}", flush=True)
            write_results(out_dir, name, result, _plot)  # what is done so far
            shutil.rmtree(folder)
    return result


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--one":
    print(json.dumps(_one(json.loads(sys.argv[2]))), flush=True)
