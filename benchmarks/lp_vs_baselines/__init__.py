"""The paper's comparison at the largest scale a machine allows: LP against its peers at equal sizes,
with seeds and confidence intervals.

One rayapp run (``--config``: cpu.yaml on this machine, gpu.yaml on a GPU node) is prepared, its
reference model trained and scored once. Then, for each seed, the select stage makes LP's subset
and its peers' (clust_rand, longest, ppl_high; all as large as LP's) with ``select.seed`` set to it,
which re-draws the k-means clusters and the random baselines, and the target is fine-tuned on each
with ``finetune.seed`` set to it. The full set is trained too (``--full-seeds`` of them), and the
untrained target is measured as it is.

Every model is measured by its response NLL, row by row, on rows no model trained on: the run's
held-out Alpaca rows, Dolly rows (another dataset's answers) and Self-Instruct's reference answers,
scored with rayapp's own scorer. Each arm is compared with LP by a paired bootstrap over those rows
(the same resampled rows for both, each seed's models scored on them; the statistic is the
difference of token-weighted mean NLL, averaged over seeds), with 95 % confidence intervals, per
source and pooled. The spread between seeds is reported beside it.

``--evaluate`` also generates greedy answers to Self-Instruct prompts with the first seed's models
(ROUGE-L, and LP's pairwise win / tie / lose by the configured judge): minutes of generation each.

Results go to ``benchmarks/results/lp-vs-baselines-<name>.json`` and ``.png`` as they come out,
whichever way they point. Run again, it keeps the models that file has already measured (same
config, budget and models) and trains and measures only the rest: a comparison can be finished
over several invocations, or extended with more seeds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

SELECTIONS = ("lp", "clust_rand", "longest:global", "ppl_high")
BUDGET = 0.10
SEEDS = (42, 43, 44)
HELD_OUT_DOLLY = 60
HELD_OUT_SINSTRUCT = 60
SOURCES = ("alpaca-heldout", "dolly", "sinstruct")
BOOTSTRAP_RESAMPLES = 2000


def held_out_sources(run_holdout: str, shared: str, tmp: str) -> list[dict]:
    """The run's held-out Alpaca rows, Dolly rows and Self-Instruct (prompt, reference answer) pairs,
    as Alpaca-style JSONL sources."""
    from rayapp.core import storage
    from rayapp.stages.evaluate.evalsets import load_eval_set, resolve_set

    name, path, field, id_field = resolve_set("sinstruct", os.path.join(shared, "eval"), "prompt")
    rows = [r for r in load_eval_set(name, path, field, id_field) if r.get("reference")][:HELD_OUT_SINSTRUCT]
    sinstruct = os.path.join(tmp, "sinstruct-references.jsonl")
    with open(sinstruct, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": f"sinstruct-{r['id']}", "instruction": r["instruction"], "input": r["input"],
                                "output": r["reference"]}) + "\n")
    alpaca = os.path.join(tmp, "alpaca-heldout.jsonl")
    with open(alpaca, "w", encoding="utf-8") as f:
        for r in storage.read_parquet(run_holdout).select(["instruction", "input", "output"]).to_pylist():
            f.write(json.dumps(r) + "\n")
    return [{"path": alpaca, "name": "alpaca-heldout", "schema": "alpaca"},
            {"path": os.path.join(shared, "dolly-15k.jsonl"), "name": "dolly", "limit": HELD_OUT_DOLLY},
            {"path": sinstruct, "name": "sinstruct", "schema": "alpaca"}]


def held_out_scores(cfg, models: dict[str, str], shared: str) -> dict:
    """Per-row response NLL on rows no model trained on: {"rows": {id: (source, n_tokens)},
    "loss": {model: {id: loss_sum}}}. Rows with no response tokens are left out."""
    from rayapp import pipeline
    from rayapp.config import RunConfig, ScoreConfig
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import CheckpointRecord, read_prepared
    from rayapp.ml.models import registry
    from rayapp.ml.models.loading import load_tokenizer, same_tokenizer
    from rayapp.stages.score.engine import score_checkpoints
    from rayapp.stages.score.stage import special_ids

    tmp = tempfile.mkdtemp(prefix="rayapp-held-out-")
    tree = cfg.model_dump(mode="json", by_alias=True)
    tree.update(name=f"{cfg.name}-held-out", output_dir=os.path.join(cfg.output_dir, "held-out"))
    tree["data"].update(sources=held_out_sources(RunLayout(cfg.output_dir).holdout, shared, tmp), holdout_rows=0)
    # the rows in the measured models' own tokens: the target's, where its family differs from the selector's
    selector_tokens, target = registry.tokenizer_source(cfg), registry.model_source(cfg, "target")
    tree["models"]["tokenizer"] = selector_tokens if same_tokenizer(target, selector_tokens, False) else target
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
    source = dict(zip(*storage.read_parquet_dir(layout.prepared).select(["id", "source"]).to_pydict().values()))
    rows: dict[str, tuple[str, int]] = {}
    loss: dict[str, dict[str, float]] = {}
    for label in models:
        t = storage.read_parquet_dir(os.path.join(out, label)).select(["id", "loss_sum", "n_tokens"]).to_pydict()
        loss[label] = {}
        for rid, s, n in zip(t["id"], t["loss_sum"], t["n_tokens"]):
            if n:
                rows[rid] = (source[rid], int(n))
                loss[label][rid] = float(s)
    return {"rows": rows, "loss": loss}


def _label(arm: str, seed: int) -> str:
    return f"{arm.replace(':', '-')}@{seed}"


def run(config: str, out_dir: str, seeds=SEEDS, budget: float = BUDGET, shared: str = "../shared/data",
        full_seeds: int = 1, evaluate: bool = False, target: str | None = None, arms=SELECTIONS) -> dict:
    from rayapp import pipeline
    from rayapp.config import load_config, subset_folder
    from rayapp.core import storage
    from rayapp.core.layout import RunLayout
    from rayapp.core.log import configure
    from rayapp.core.manifests import FinetuneManifest, read_manifest
    from rayapp.ml.models import registry

    configure()  # the stages' progress lines, as `rayapp run` prints them
    t0 = time.time()
    # another target: the same run's selections (prepare to select do not depend on the target),
    # fine-tuned into the same finetune folders (they replace the first target's there)
    retarget = [f"models.target.name_or_path={target}"] if target else []
    base = load_config(config, retarget)
    name = f"{base.name}-to-{target}" if target else base.name
    layout = RunLayout(base.output_dir)
    result_path = os.path.join(out_dir, f"{name}.json")
    result: dict = {"config": config, "name": name, "budget": budget, "seeds": list(seeds),
                    "reference": base.models.reference.name_or_path, "target": base.models.target.name_or_path,
                    "selections": list(arms), "models": {}, "stages_s": {},
                    "machine": f"{os.cpu_count()} CPU cores", "held_out": {"rows": {}, "loss": {}}}
    same_run = ("config", "budget", "reference", "target")
    if os.path.exists(result_path):  # an earlier invocation of the same comparison: keep what it measured
        with open(result_path) as f:
            earlier = json.load(f)
        if all(earlier.get(k) == result[k] for k in same_run):
            result["models"] = {k: v for k, v in earlier.get("models", {}).items() if "nll" in v}
            result["held_out"] = earlier.get("held_out", result["held_out"])
            result["stages_s_earlier"] = earlier.get("stages_s", {})
            result.update({k: earlier[k] for k in ("pairwise", "judge") if k in earlier})
            print(f"[lp-vs-baselines] resuming {result_path}: {len(result['models'])} models already measured",
                  flush=True)
        else:  # another comparison's results: set aside, never overwritten
            kept = f"{result_path[:-len('.json')]}.earlier-{time.strftime('%Y%m%d-%H%M%S')}.json"
            os.replace(result_path, kept)
            differs = [k for k in same_run if earlier.get(k) != result[k]]
            print(f"[lp-vs-baselines] {result_path} is another comparison ({', '.join(differs)} differ): "
                  f"moved to {kept}", flush=True)
    models, held = result["models"], result["held_out"]

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

    def trained(label: str, arm: str, seed: int, tag: str, overrides: list[str]) -> str:
        timed(f"finetune {label}", lambda: pipeline.run("finetune", load_config(config, [*retarget, *overrides])))
        m = read_manifest(layout.manifest("finetune", subset_folder(tag)), FinetuneManifest)
        models[label] = {"arm": arm, "seed": seed, "rows": m.rows, "train_loss": m.metrics.get("last_loss"),
                         "train_seconds": m.metrics.get("train_seconds")}
        return m.export

    def measure(exports: dict[str, str]) -> None:
        # each seed's models are scored before the next seed's fine-tunes replace their exports
        if not exports:
            return
        got = timed(f"held-out NLL {', '.join(exports)}", lambda: held_out_scores(base, exports, shared))
        held["rows"].update({k: list(v) for k, v in got["rows"].items()})
        held["loss"].update(got["loss"])
        for label in exports:
            models[label]["nll"] = nll_by_source(held, label)
        save()

    for stage in ("prepare", "reference", "score"):
        timed(stage, lambda s=stage: pipeline.run(s, base))
    baselines = "[" + ", ".join(f"'{s}'" for s in SELECTIONS[1:]) + "]"
    for seed in seeds:
        over = [f"select.budget={budget}", f"select.baselines={baselines}", f"select.seed={seed}",
                f"finetune.seed={seed}"]
        todo = [a for a in arms if _label(a, seed) not in models]
        if not todo and not (evaluate and seed == seeds[0] and "pairwise" not in result):
            continue
        sel = timed(f"select seed {seed}", lambda o=over: pipeline.run(
            "select", load_config(config, [*retarget, *o])).manifest)
        exports = {}
        for arm in todo:
            e = sel.selections[arm]
            label = _label(arm, seed)
            exports[label] = trained(label, arm, seed, e.tag, [*over, f"finetune.subset={e.tag}"])
            models[label]["mean_response_chars"] = round(
                float(np.mean(storage.read_parquet(e.path)["output"].to_pandas().str.len())), 1)
        if evaluate and seed == seeds[0] and "pairwise" not in result:
            tags = [sel.selections[a].tag for a in arms]
            ev = timed("evaluate", lambda: pipeline.run("evaluate", load_config(
                config, [*retarget, *over, f"evaluate.models=[{', '.join(tags)}]"])).manifest)
            for arm, tag in zip(arms, tags):
                models[_label(arm, seed)]["rouge_l"] = ev.rouge_l.get(subset_folder(tag), {})
            result["pairwise"] = {k: v.get("overall") for k, v in ev.pairs.items()}
            result["judge"] = ev.judge
        measure(exports)
    for seed in seeds[:full_seeds]:
        label = _label("full", seed)
        if label in models:
            continue
        export = trained(label, "full", seed, "full", ["finetune.subset=full", f"finetune.seed={seed}"])
        models[label]["mean_response_chars"] = round(float(
            storage.read_parquet_dir(layout.prepared)["output"].to_pandas().str.len().mean()), 1)
        measure({label: export})
    if "base" not in models:
        models["base"] = {"arm": "base", "seed": None, "rows": 0}
        measure({"base": registry.model_source(base, "target")})
    result["versus_lp"] = compare(result)
    result["seconds"] = round(time.time() - t0, 1)
    save()
    plot(result, os.path.join(out_dir, f"{name}.png"))
    print(table(result), flush=True)
    print(f"[lp-vs-baselines] results: {result_path}", flush=True)
    return result


def _aligned(held: dict, label: str, ids: list[str]) -> np.ndarray:
    return np.array([held["loss"][label][i] for i in ids])


def nll_by_source(held: dict, label: str) -> dict[str, float]:
    """Token-weighted mean response NLL of one model per held-out source, and over all of them."""
    from benchmarks.lp_vs_baselines.stats import mean_nll

    out = {}
    for source in (*SOURCES, "all"):
        ids = [i for i, (s, _) in held["rows"].items() if source in ("all", s) and i in held["loss"][label]]
        if ids:
            tokens = np.array([held["rows"][i][1] for i in ids], dtype=np.float64)
            out[source] = mean_nll(_aligned(held, label, ids), tokens)
    return out


def compare(result: dict) -> dict:
    """Every arm against LP: the paired bootstrap of the NLL difference (arm minus LP: above 0, LP's
    models predict the held-out answers better), per source and pooled, over the seeds both have."""
    from benchmarks.lp_vs_baselines.stats import paired_difference

    held, models = result["held_out"], result["models"]
    by_arm: dict[str, list[str]] = {}
    for label, info in models.items():
        if "nll" in info:
            by_arm.setdefault(info["arm"], []).append(label)
    lp = by_arm.get("lp", [])
    out: dict = {}
    for arm, labels in by_arm.items():
        if arm == "lp" or not lp:
            continue
        out[arm] = {}
        for source in (*SOURCES, "all"):
            ids = [i for i, (s, _) in held["rows"].items() if source in ("all", s)
                   and all(i in held["loss"][lb] for lb in [*labels, *lp])]
            if not ids:
                continue
            tokens = np.array([held["rows"][i][1] for i in ids], dtype=np.float64)
            out[arm][source] = {"rows": len(ids), **paired_difference(
                [_aligned(held, lb, ids) for lb in labels], [_aligned(held, lb, ids) for lb in lp], tokens,
                resamples=BOOTSTRAP_RESAMPLES)}
    return out


ARM_NAMES = {"lp": "LP (low chunk)", "clust_rand": "clust_rand", "longest:global": "longest (global)",
             "ppl_high": "ppl_high", "full": "full set", "base": "untrained"}


def table(result: dict) -> str:
    """The results as Markdown: each arm's mean NLL (mean over seeds, and the seeds' range), then its
    difference from LP with the 95 % interval."""
    models, versus = result["models"], result.get("versus_lp", {})
    arms: dict[str, list[dict]] = {}
    for info in models.values():
        if "nll" in info:
            arms.setdefault(info["arm"], []).append(info)
    head = ("| arm | seeds | rows | mean response chars | " + " | ".join(f"NLL {s}" for s in (*SOURCES, "all"))
            + " | arm − LP, all held-out rows (95 % CI) |\n|---|---:|---:|---:|" + "---:|" * (len(SOURCES) + 2))
    lines = [head]
    for arm, infos in arms.items():
        cells = []
        for source in (*SOURCES, "all"):
            v = [i["nll"][source] for i in infos if source in i["nll"]]
            cells.append(f"{np.mean(v):.3f}" + (f" ({min(v):.3f}–{max(v):.3f})" if len(v) > 1 else ""))
        d = versus.get(arm, {}).get("all")
        diff = "-" if d is None else f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
        chars = [i["mean_response_chars"] for i in infos if i.get("mean_response_chars") is not None]
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | {len(infos)} | {infos[0]['rows']} | "
                     f"{f'{np.mean(chars):.0f}' if chars else '-'} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versus = result.get("versus_lp", {})
    colors = {"clust_rand": "#7f8c8d", "longest:global": "#2980b9", "ppl_high": "#8e44ad", "full": "#27ae60",
              "base": "#333333"}
    panels = [*SOURCES, "all"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), sharey=False)
    for ax, source in zip(axes, panels):
        arms = [a for a in versus if source in versus[a]]
        for y, arm in enumerate(arms):
            d = versus[arm][source]
            lo, hi = d["ci"]
            ax.errorbar(d["difference"], y, xerr=[[d["difference"] - lo], [hi - d["difference"]]], fmt="o",
                        color=colors.get(arm, "#333"), capsize=3)
            for s in d["per_seed"]:  # each seed's model against LP's mean
                ax.plot(s - np.mean(d["baseline_per_seed"]), y, "x", color=colors.get(arm, "#333"), alpha=0.5)
        ax.axvline(0, color="#c0392b", lw=1)
        ax.set_yticks(range(len(arms)), [ARM_NAMES.get(a, a) for a in arms], fontsize=8)
        ax.set_title(f"held-out {source}", fontsize=9)
        ax.set_xlabel("NLL(arm) − NLL(LP), nats/token", fontsize=8)
    fig.suptitle(f"{result['name']}: arms against LP at {result['budget']:.0%} (right of the red line: LP better; "
                 f"95 % paired bootstrap over rows, seeds {result['seeds']}; x: single seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
