"""k-means for stratified selection as the rows grow: fitted on every row up to
``select.kmeans_fit_rows`` (200k by default), on a seeded sample of that many above it.

    python -m benchmarks kmeans

Embeddings are synthetic (MiniLM's 384 dimensions, unit length, drawn around 1,000 centres; embedding
a million rows with the encoder is hours on this CPU) and clustered into 1,000 clusters, the paper's
count. Each size runs in a process of its own so its peak RSS is its own. For each size: the fit's
time, the assignment's time (every row to its nearest centroid), and peak RSS. At one size above the
bound, the sampled fit is compared with fitting every row: time, memory, and how alike the two
clusterings are (adjusted Rand index). Results: benchmarks/results/kmeans-cpu<N>.json and .png.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks.report import write_results
from benchmarks.score_bench import _machine

DIM, CLUSTERS, SEED = 384, 1000, 42


def embeddings(rows: int, seed: int = 0):
    """``rows`` unit vectors around ``CLUSTERS`` random centres (the same rows for the same seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
    out = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, 100_000):  # in blocks: no float64 noise array of every row
        n = min(100_000, rows - start)
        block = centres[rng.integers(0, CLUSTERS, n)] + rng.normal(scale=0.9, size=(n, DIM)).astype(np.float32)
        out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def measure(rows: int, fit_rows: int | None, labels_path: str | None = None) -> dict:
    """One size, in this process: the fit, the assignment and peak RSS; the labels saved to
    ``labels_path`` (.npy) when given."""
    import numpy as np

    from rayapp.selection.clustering import fit, fit_sample

    vecs = embeddings(rows)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    sample = fit_sample(rows, fit_rows, SEED)
    model, labels = fit(vecs if sample is None else vecs[sample], CLUSTERS, SEED)
    t1 = time.perf_counter()
    if len(labels) != rows:
        labels = model.predict(vecs)
    t2 = time.perf_counter()
    out = {"rows": rows, "fit_rows": min(rows, fit_rows) if fit_rows else rows, "fit_s": round(t1 - t0, 1),
           "fit_iterations": int(model.n_iter_), "assign_s": round(t2 - t1, 1),
           "embeddings_gib": round(vecs.nbytes / 2**30, 3), "rss_after_embeddings_gib": round(data_rss / 2**30, 2),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)}
    if labels_path:
        np.save(labels_path, labels)
    return out


def _child(rows: int, fit_rows: int | None, labels_path: str | None = None) -> dict:
    code = (f"import json; from benchmarks.kmeans_bench import measure; "
            f"print('RESULT', json.dumps(measure({rows}, {fit_rows!r}, {labels_path!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def agreement(a_path: str, b_path: str) -> float:
    """Adjusted Rand index between two clusterings of the same rows (saved labels)."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.load(a_path), np.load(b_path)))


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sampled"]
    rows = [r["rows"] for r in sizes]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rows, [r["fit_s"] for r in sizes], "o-", label="fit (sample above the bound)")
    a.plot(rows, [r["assign_s"] for r in sizes], "s-", label="assign every row")
    full = results["every_row"]
    a.plot([full["rows"]], [full["fit_s"]], "x", color="red", ms=10, label="fit on every row")
    a.set_xscale("log")
    a.set_xlabel("rows")
    a.set_ylabel("seconds")
    a.legend(fontsize=8)
    a.set_title(f"k-means, {CLUSTERS} clusters, bound {results['fit_rows']:,} rows", fontsize=10)
    b.plot(rows, [r["peak_rss_gib"] - r["rss_after_embeddings_gib"] for r in sizes], "o-",
           label="peak RSS beyond the embeddings")
    b.plot(rows, [r["embeddings_gib"] for r in sizes], "s--", label="the embeddings themselves")
    b.plot([full["rows"]], [full["peak_rss_gib"] - full["rss_after_embeddings_gib"]], "x", color="red", ms=10,
           label="fit on every row")
    b.set_xscale("log")
    b.set_xlabel("rows")
    b.set_ylabel("GiB")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(out: str, sizes: tuple[int, ...] = (50_000, 200_000, 1_000_000), compare_at: int = 400_000,
        fit_rows: int = 200_000) -> dict:
    from rayapp.selection.clustering import DEFAULT_FIT_ROWS

    assert fit_rows == DEFAULT_FIT_ROWS, "the benchmark measures the default bound"
    t = time.time()
    sampled = []
    for rows in sizes:
        sampled.append(_child(rows, fit_rows))
        print("sampled", sampled[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        full_labels, sampled_labels = os.path.join(tmp, "full.npy"), os.path.join(tmp, "sampled.npy")
        every_row = _child(compare_at, None, full_labels)
        print("every row", every_row, flush=True)
        at = _child(compare_at, fit_rows, sampled_labels)
        print("sampled", at, flush=True)
        ari = agreement(full_labels, sampled_labels)
    results = {"machine": _machine(), "dim": DIM, "clusters": CLUSTERS, "fit_rows": fit_rows, "sampled": sampled,
               "every_row": every_row, "sampled_at_compare": at, "adjusted_rand_index_at_compare": round(ari, 4),
               "seconds": round(time.time() - t, 1),
               "notes": "synthetic unit-length embeddings around 1,000 centres (benchmarks/kmeans_bench.py); "
                        "each size in a process of its own; peak RSS includes the embeddings themselves"}
    cpus = os.cpu_count()
    write_results(out, f"kmeans-cpu{cpus}", results, _plot)
    return results
