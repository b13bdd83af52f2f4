"""Throughput across node counts: `python -m benchmarks scaling --nodes 1,2,4`.

For each N, a real Ray cluster of N worker nodes is started (on one machine:
``ray.cluster_utils.Cluster`` nodes with a fixed CPU share each; pass ``--address`` to use a real
cluster's nodes instead), and the same prepared Alpaca rows are
  - scored by one LossScorer actor per node (pinned by a per-node custom resource), and
  - fine-tuned for one epoch by one Ray Train worker per node (DDP).
Reported per N: rows/s, tokens/s (end to end, start-up included, and steady state), scaling
efficiency against N=1, padding fraction; MFU where a GPU and its peak are known.

The same run measures two baselines on the same rows, each a single process without Ray:
  - plain scoring: a transformers model, fixed-size batches in file order (what one writes by hand);
  - plain fine-tuning: the same model, AdamW, fixed-size batches.
and compares scoring backends on 1 node: rayapp's torch actor and ``score.backend: vllm`` (vLLM's
``prompt_logprobs``, when vLLM is installed), with their per-row losses' agreement.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from benchmarks.plain_score import plain_scoring
from benchmarks.report import write_results
from benchmarks.score_bench import ALPACA, _machine
from rayapp.config import FinetuneConfig, ScoreConfig, load_config
from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_causal_lm, load_tokenizer
from rayapp.pipeline import run as run_stage
from rayapp.stages.score.stage import special_ids


def _prepared(rows: int, work: str):
    cfg = load_config("configs/tiny.yaml", [f"output_dir={work}", f"data.sources=[{{path: {ALPACA}, limit: {rows}}}]",
                                              "data.shard_rows=64", "data.max_length=256"])
    manifest = run_stage("prepare", cfg).manifest
    files = [storage.join(RunLayout(cfg.output_dir).prepared, s.file) for s in manifest.shards]
    table = storage.read_parquet_dir(RunLayout(cfg.output_dir).prepared, ["id", "input_ids", "labels"])
    return cfg, manifest, files, table


# ---- baselines: one process, no Ray ---------------------------------------------------------------


def plain_finetune(model_path: str, table, pad_id: int, batch_rows: int, threads: int, lr: float) -> dict:
    import torch

    from rayapp.ml.train.collate import collate

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_causal_lm(model_path).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t_loaded = time.perf_counter()
    ids, labels = table["input_ids"].to_pylist(), table["labels"].to_pylist()
    tokens = 0
    for lo in range(0, len(ids), batch_rows):
        batch = {"input_ids": np.array(ids[lo:lo + batch_rows], dtype=object),
                 "labels": np.array(labels[lo:lo + batch_rows], dtype=object)}
        inputs = collate(batch, pad_id, "cpu")
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(inputs["attention_mask"].sum())
    end = time.perf_counter()
    return {"rows": len(ids), "tokens": tokens, "seconds": end - t0, "tokens_per_s": tokens / (end - t0),
            "steady_tokens_per_s": tokens / (end - t_loaded), "batch_rows": batch_rows, "threads": threads}


# ---- rayapp on N nodes ----------------------------------------------------------------------------


def rayapp_on_nodes(n: int, cpus_per_node: int, cfg, manifest, files, work: str, bos: int, pad: int,
                    address: str | None, backend: str = "torch", train: bool = True) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from rayapp.core.manifests import CheckpointRecord
    from rayapp.ml.train.runner import TrainJob, run_training
    from rayapp.stages.score.engine import score_checkpoints

    cluster = None
    if address is None:
        # the head holds no CPUs: stage work lands only on the N worker nodes
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(n):
            cluster.add_node(num_cpus=cpus_per_node, resources={"bench_node": 1})
        cluster.wait_for_nodes()
        address = cluster.address
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        model = registry.model_source(cfg, "reference")
        engine = {"engine_kwargs": {"gpu_memory_utilization": 0.15, "enforce_eager": True}} if backend == "vllm" else {}
        sc = ScoreConfig(batch_tokens=8192, rows_per_task=64, modes=["prompted"], backend=backend, **engine,
                         resources={"num_cpus": cpus_per_node, "min_actors": n, "max_actors": n,
                                    "resources": {"bench_node": 1}})
        t0 = time.perf_counter()
        score = score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, [CheckpointRecord(name="epoch-0", path=model, uid=f"n{n}")],
                                  storage.join(work, f"scores-{backend}-n{n}"), sc, bos, pad)
        score["wall_with_startup_s"] = time.perf_counter() - t0
        if not train:
            return {"nodes": n, "cpus_per_node": cpus_per_node, "score": score}
        tc = FinetuneConfig(epochs=1, learning_rate=1e-3, per_device_batch_size=16, num_workers=n,
                            cpus_per_worker=cpus_per_node, fsdp=False, eval_rows=0, log_every_steps=5)
        t0 = time.perf_counter()
        run_training("finetune", tc, [TrainJob(label="finetune", init_model=model, tokenizer=manifest.tokenizer,
                                               train_files=files, total_rows=manifest.rows,
                                               work_dir=os.path.join(work, f"train-n{n}"))])
        train_wall = time.perf_counter() - t0
        stats = [storage.read_json(os.path.join(work, f"train-n{n}", "stats", f"rank-{r}.json")) for r in range(n)]
        tokens = sum(int(s["tokens_seen"]) for s in stats)
        steps_s = max(s["train_seconds"] for s in stats)
        train = {"seconds": train_wall, "tokens": tokens, "tokens_per_s": tokens / train_wall,
                 "steady_tokens_per_s": tokens / steps_s, "workers": n}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return {"nodes": n, "cpus_per_node": cpus_per_node, "score": score, "finetune": train}


# ---- vLLM prompt_logprobs as a scoring backend -------------------------------------------------------


def nll_agreement(work: str) -> dict:
    """Per-row mean NLL of the vLLM backend against the torch actor's (1 node each)."""
    a = storage.read_parquet_dir(storage.join(work, "scores-torch-n1", "epoch-0")).to_pandas().set_index("id")
    b = storage.read_parquet_dir(storage.join(work, "scores-vllm-n1", "epoch-0")).to_pandas().set_index("id")
    diff = np.abs(a["mean_nll"] - b.loc[a.index, "mean_nll"])
    return {"max_abs_nll_diff": float(diff.max()), "mean_abs_nll_diff": float(diff.mean())}


def run(nodes: list[int], rows: int, cpus_per_node: int, out_dir: str, address: str | None, with_vllm: bool) -> dict:
    work = tempfile.mkdtemp(prefix="rayapp-scaling-")
    cfg, manifest, files, table = _prepared(rows, work)
    tok = load_tokenizer(manifest.tokenizer)
    bos, pad = special_ids(tok)
    model = registry.model_source(cfg, "reference")
    threads = cpus_per_node
    results = {"machine": _machine(), "rows": manifest.rows, "cpus_per_node": cpus_per_node,
               "model": "tiny reference (configs/tiny.yaml)", "max_length": 256, "runs": []}
    print(f"[bench] plain single-process baselines ({threads} thread(s), fixed batches of 16 rows)", flush=True)
    base = plain_scoring(model, table, pad, 16, threads)
    base.pop("_losses")
    results["baseline_score"] = base
    results["baseline_finetune"] = plain_finetune(model, table, pad, 16, threads, 1e-3)
    for n in nodes:
        print(f"[bench] rayapp on {n} node(s) x {cpus_per_node} CPU", flush=True)
        results["runs"].append(rayapp_on_nodes(n, cpus_per_node, cfg, manifest, files, work, bos, pad, address))
    if with_vllm and _has_vllm():  # last: its engine processes should not share the machine with the Ray runs
        print("[bench] rayapp on 1 node, score.backend: vllm (prompt_logprobs)", flush=True)
        v = rayapp_on_nodes(1, cpus_per_node, cfg, manifest, files, work, bos, pad, address, "vllm", train=False)
        results["vllm_score"] = {**v["score"], **nll_agreement(work)}
    one = results["runs"][0]
    for r in results["runs"]:
        k = r["nodes"] / one["nodes"]
        for stage in ("score", "finetune"):
            for key in ("tokens_per_s", "steady_tokens_per_s"):
                if r[stage].get(key) and one[stage].get(key):
                    r[stage][f"efficiency_{key}"] = r[stage][key] / (one[stage][key] * k)
        r["score"]["vs_plain_steady"] = r["score"]["steady_tokens_per_s"] / base["steady_tokens_per_s"]
        r["finetune"]["vs_plain_steady"] = ((r["finetune"]["steady_tokens_per_s"] or 0)
                                            / results["baseline_finetune"]["steady_tokens_per_s"])
    print(table_md(results))
    write_results(out_dir, f"scaling-cpu{os.cpu_count()}", results, _plot)
    return results


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def table_md(results: dict) -> str:
    b, bf = results["baseline_score"], results["baseline_finetune"]
    lines = ["| run | score rows/s | score tokens/s (e2e) | score tokens/s (steady) | efficiency (steady) | "
             "vs plain (steady) | padding | finetune tokens/s (e2e) | finetune tokens/s (steady) | efficiency (steady) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| plain loop, 1 process | {b['rows_per_s']:.1f} | {b['tokens_per_s']:,.0f} | "
                 f"{b['steady_tokens_per_s']:,.0f} | - | 1.00 | {b['padding_fraction']:.1%} | "
                 f"{bf['tokens_per_s']:,.0f} | {bf['steady_tokens_per_s']:,.0f} | - |")
    v = results.get("vllm_score")
    if v:
        lines.append(f"| rayapp, 1 node, score.backend vllm | {v['rows'] / v['seconds']:.1f} | {v['tokens_per_s']:,.0f} | "
                     f"{v['steady_tokens_per_s']:,.0f} | - | {v['steady_tokens_per_s'] / b['steady_tokens_per_s']:.2f} | "
                     f"{v['padding_fraction']:.1%} | - | - | - |")
    for r in results["runs"]:
        s, t = r["score"], r["finetune"]
        lines.append(
            f"| rayapp, {r['nodes']} node(s) | {s['rows_per_s']:.1f} | {s['tokens_per_s']:,.0f} | "
            f"{s['steady_tokens_per_s']:,.0f} | {s.get('efficiency_steady_tokens_per_s', 1):.2f} | "
            f"{s['vs_plain_steady']:.2f} | {s['padding_fraction']:.1%} | {t['tokens_per_s']:,.0f} | "
            f"{(t['steady_tokens_per_s'] or 0):,.0f} | {t.get('efficiency_steady_tokens_per_s', 1):.2f} |")
    return "\n".join(lines)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    n = [r["nodes"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, color in (("score", "#2c7fb8"), ("finetune", "#c0392b")):
        a.plot(n, [r[stage]["steady_tokens_per_s"] or 0 for r in runs], marker="o", color=color, label=f"{stage} (steady)")
        a.plot(n, [r[stage]["tokens_per_s"] for r in runs], marker="o", ls="--", color=color, label=f"{stage} (end to end)")
        b.plot(n, [r[stage].get("efficiency_steady_tokens_per_s", 1) for r in runs], marker="o", color=color, label=stage)
    a.axhline(results["baseline_score"]["steady_tokens_per_s"], color="#2c7fb8", ls=":", lw=1, label="plain scoring loop")
    a.axhline(results["baseline_finetune"]["steady_tokens_per_s"], color="#c0392b", ls=":", lw=1, label="plain training loop")
    if results.get("vllm_score"):
        a.axhline(results["vllm_score"]["steady_tokens_per_s"], color="#555", ls="-.", lw=1, label="vLLM prompt_logprobs")
    a.set_xlabel("worker nodes")
    a.set_ylabel("tokens / s")
    a.set_xticks(n)
    a.legend(fontsize=7)
    a.set_title(f"Throughput, {results['cpus_per_node']} CPU per node, {results['machine']['cpus']}-core machine")
    b.axhline(1.0, color="#999", lw=1)
    b.set_ylim(0, 1.2)
    b.set_xticks(n)
    b.set_xlabel("worker nodes")
    b.set_ylabel("scaling efficiency vs 1 node")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
