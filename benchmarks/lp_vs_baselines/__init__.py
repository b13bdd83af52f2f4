"""The paper's comparison at the largest scale a machine allows: LP against its peers at equal sizes.

One rayapp run (``--config``: cpu.yaml on this machine, gpu.yaml on a GPU node) is prepared, its
reference model trained and scored once; then for each budget the select stage makes LP's subset
and its peers' (clust_rand, longest, ppl_high; all as large as LP's), and the target is fine-tuned
on each, and on the full set. Every model is then measured by

- its response NLL on held-out references nobody trained on: Dolly rows (another dataset's answers)
  and Self-Instruct's reference answers, scored with rayapp's own scorer;
- its held-out Alpaca loss (finetune's eval_loss, on the rows `prepare` holds out);
- ROUGE-L of its greedy answers to Self-Instruct prompts against their references, and the
  pairwise win / tie / lose of LP against each peer, by the configured judge (ROUGE-L pairs where no
  judge endpoint is configured).

Results go to ``benchmarks/results/lp-vs-baselines-<name>.json`` and ``.png`` as they come out,
whichever way they point.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

SELECTIONS = ("lp", "clust_rand", "longest:global", "ppl_high")
BUDGETS = (0.05, 0.10)
HELD_OUT_DOLLY = 60
HELD_OUT_SINSTRUCT = 60


def _rows_of(path: str, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def held_out_sources(shared: str, tmp: str) -> list[dict]:
    """Dolly rows and Self-Instruct (prompt, reference answer) pairs as Alpaca-style JSONL sources."""
    from rayapp.stages.evaluate.evalsets import load_eval_set, resolve_set

    name, path, field, id_field = resolve_set("sinstruct", os.path.join(shared, "eval"), "prompt")
    rows = [r for r in load_eval_set(name, path, field, id_field) if r.get("reference")][:HELD_OUT_SINSTRUCT]
    sinstruct = os.path.join(tmp, "sinstruct-references.jsonl")
    with open(sinstruct, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": f"sinstruct-{r['id']}", "instruction": r["instruction"], "input": r["input"],
                                "output": r["reference"]}) + "\n")
    return [{"path": os.path.join(shared, "dolly-15k.jsonl"), "name": "dolly", "limit": HELD_OUT_DOLLY},
            {"path": sinstruct, "name": "sinstruct", "schema": "alpaca"}]


def held_out_nll(cfg, models: dict[str, str], shared: str) -> dict[str, dict[str, float]]:
    """{model: {source: mean response NLL per token}} on rows no model trained on."""
    from rayapp import pipeline
    from rayapp.config import RunConfig, ScoreConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord, read_prepared
    from rayapp.ml.models.loading import load_tokenizer
    from rayapp.ml.models.registry import tokenizer_source
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids

    tmp = tempfile.mkdtemp(prefix="rayapp-held-out-")
    tree = cfg.model_dump(mode="json", by_alias=True)
    tree.update(name=f"{cfg.name}-held-out", output_dir=os.path.join(cfg.output_dir, "held-out"))
    tree["data"].update(sources=held_out_sources(shared, tmp), holdout_rows=0)
    tree["models"]["tokenizer"] = tokenizer_source(cfg)
    hcfg = RunConfig.model_validate(tree)
    pipeline.run("prepare", hcfg)
    layout = RunLayout(hcfg.output_dir)
    prepared = read_prepared(layout)
    bos, pad = special_ids(load_tokenizer(prepared.tokenizer))
    checkpoints = [CheckpointRecord(name=label, path=path, uid=label) for label, path in models.items()]
    out = os.path.join(hcfg.output_dir, "scores")
    score_checkpoints(layout.prepared, prepared, checkpoints, out,
                      ScoreConfig(local=True, modes=["prompted"], batch_tokens=cfg.score.batch_tokens,
                                  dtype=cfg.score.dtype, resources=cfg.score.resources), bos, pad)
    source = {r["id"]: r["source"] for r in storage.read_parquet_dir(layout.prepared).select(["id", "source"]).to_pylist()}
    result: dict[str, dict[str, float]] = {}
    for label in models:
        t = storage.read_parquet_dir(os.path.join(out, label)).to_pylist()
        per: dict[str, list[float]] = {}
        for r in t:
            if r["n_tokens"]:
                per.setdefault(source[r["id"]], []).append((r["loss_sum"], r["n_tokens"]))
        result[label] = {s: float(sum(a for a, _ in v) / sum(n for _, n in v)) for s, v in per.items()}
    return result


def run(config: str, out_dir: str, budgets=BUDGETS, shared: str = "../shared/data", full: bool = True) -> dict:
    from rayapp import pipeline
    from rayapp.config import load_config
    from rayapp.core import storage
    from rayapp.core.log import configure

    configure()  # the stages' progress lines, as `rayapp run` prints them
    t0 = time.time()
    base = load_config(config)
    name = base.name
    result_path = os.path.join(out_dir, f"{name}.json")
    result: dict = {"config": config, "name": name, "budgets": list(budgets), "selections": list(SELECTIONS),
                    "models": {}, "stages_s": {}, "machine": f"{os.cpu_count()} CPU cores"}

    def save() -> None:
        os.makedirs(out_dir, exist_ok=True)
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)

    def timed(label: str, fn):
        t = time.time()
        out = fn()
        result["stages_s"][label] = round(time.time() - t, 1)
        print(f"[lp-vs-baselines] {label}: {result['stages_s'][label]} s", flush=True)
        save()
        return out

    for stage in ("prepare", "reference", "score"):
        timed(stage, lambda s=stage: pipeline.run(s, base))
    baselines = "[" + ", ".join(f"'{s}'" for s in SELECTIONS[1:]) + "]"
    subsets: dict[str, dict] = {}
    for b in budgets:
        over = [f"select.budget={b}", f"select.baselines={baselines}"]
        sel = timed(f"select {b:.0%}", lambda o=over: pipeline.run("select", load_config(config, o)).manifest)
        for key in SELECTIONS:
            e = sel.selections[key]
            subsets[e.tag] = {"selection": key, "budget": b, "rows": e.rows}
            mean_chars = float(np.mean(storage.read_parquet(e.path)["output"].to_pandas().str.len()))
            subsets[e.tag]["mean_response_chars"] = round(mean_chars, 1)
            timed(f"finetune {e.tag}", lambda t=e.tag: pipeline.run("finetune", load_config(config, [f"finetune.subset={t}"])))
    from rayapp.core.layout import RunLayout

    if full:
        timed("finetune full", lambda: pipeline.run("finetune", load_config(config, ["finetune.subset=full"])))
        subsets["full"] = {"selection": "full", "budget": 1.0}
        outputs = storage.read_parquet_dir(RunLayout(base.output_dir).prepared)["output"].to_pandas()
        subsets["full"]["mean_response_chars"] = round(float(outputs.str.len().mean()), 1)

    from rayapp.config import subset_folder
    from rayapp.core.manifests import FinetuneManifest, read_manifest

    layout = RunLayout(base.output_dir)
    exports = {}
    for tag, info in subsets.items():
        if tag == "base":
            continue
        m = read_manifest(layout.manifest("finetune", subset_folder(tag)), FinetuneManifest)
        info.update(rows=m.rows, train_loss=m.metrics.get("last_loss"), train_seconds=m.metrics.get("train_seconds"),
                    heldout_alpaca_loss=m.metrics.get("eval_loss"))
        exports[tag] = m.export
    result["models"] = subsets
    from rayapp.ml.models import registry

    # the untrained target too: did fine-tuning on a subset help at all?
    exports["base"] = registry.model_source(base, "target")
    subsets["base"] = {"selection": "base", "budget": 0.0, "rows": 0}
    nll = timed("held-out NLL", lambda: held_out_nll(base, exports, shared))
    for tag, per in nll.items():
        subsets[tag]["heldout_nll"] = per
    save()
    for b in budgets:
        tags = [next(t for t, i in subsets.items() if i["selection"] == s and i["budget"] == b) for s in SELECTIONS]
        others = ["full"] if full else []
        models = "[" + ", ".join([*tags, *others]) + "]"
        ev = timed(f"evaluate {b:.0%}", lambda m=models: pipeline.run("evaluate", load_config(config, [f"evaluate.models={m}"])).manifest)
        for tag in [*tags, *others]:
            subsets[tag]["rouge_l"] = ev.rouge_l.get(subset_folder(tag), {})
        result.setdefault("pairwise", {}).update({k: v.get("overall") for k, v in ev.pairs.items()})
        result.setdefault("judge", ev.judge)
    result["seconds"] = round(time.time() - t0, 1)
    save()
    plot(result, os.path.join(out_dir, f"{name}.png"))
    print(table(result), flush=True)
    print(f"[lp-vs-baselines] results: {result_path}", flush=True)
    return result


def table(result: dict) -> str:
    """The results as a Markdown table, one row per model."""
    head = ("| model | rows | mean response chars | held-out Alpaca loss | NLL Dolly | NLL Self-Instruct refs "
            "| ROUGE-L Self-Instruct | LP's pairwise winning score against it |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    lp_tags = {i["budget"]: t for t, i in result["models"].items() if i["selection"] == "lp"}
    pairs = result.get("pairwise", {})

    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    for tag, i in result["models"].items():
        nll = i.get("heldout_nll", {})
        if i["selection"] == "lp":
            versus = "-"
        else:  # LP at the same budget against this model (the full set: LP at every budget)
            against = [lp_tags[i["budget"]]] if i["budget"] in lp_tags else list(lp_tags.values())
            versus = " / ".join(fmt((pairs.get(f"{lp} vs {tag}") or {}).get("winning_score")) for lp in against)
        lines.append(f"| {tag} | {i.get('rows', '-')} | {fmt(i.get('mean_response_chars'), 0)} | "
                     f"{fmt(i.get('heldout_alpaca_loss'))} | {fmt(nll.get('dolly'))} | {fmt(nll.get('sinstruct'))} | "
                     f"{fmt((i.get('rouge_l') or {}).get('sinstruct'))} | {versus} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    panels = [("held-out NLL: Dolly", lambda i: i.get("heldout_nll", {}).get("dolly")),
              ("held-out NLL: Self-Instruct refs", lambda i: i.get("heldout_nll", {}).get("sinstruct")),
              ("held-out Alpaca loss", lambda i: i.get("heldout_alpaca_loss")),
              ("ROUGE-L (Self-Instruct)", lambda i: (i.get("rouge_l") or {}).get("sinstruct"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    colors = {"lp": "#c0392b", "clust_rand": "#7f8c8d", "longest:global": "#2980b9", "ppl_high": "#8e44ad",
              "full": "#27ae60", "base": "#333333"}
    for ax, (title, get) in zip(axes, panels):
        labels, values, cs = [], [], []
        for tag, info in models.items():
            v = get(info)
            if v is None:
                continue
            labels.append(f"{info['selection']}\n{info['budget']:.0%}" if tag not in ("full", "base")
                          else f"{tag}\n{info.get('rows')} rows")
            values.append(v)
            cs.append(colors.get(info["selection"], "#333"))
        ax.bar(range(len(values)), values, color=cs)
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=60)
        if values:
            lo, hi = min(values), max(values)
            ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{result['name']}: LP vs peers at equal size (lower NLL/loss is better; higher ROUGE-L)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
