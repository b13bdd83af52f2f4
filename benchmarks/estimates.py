"""Scoring time and cost on GPUs, on paper: `python -m benchmarks estimates`; and every line of a
paper preset's run on a cloud cluster (cluster/README.md's table): `python -m benchmarks.estimates paper`
(below, "A paper run on a cloud cluster").

An estimate, not a measurement. For each model (OPT-350M, Llama-2-7B), data set (all of Alpaca,
a 1M-row set) and GPU count (1, 8, 64), on A10G and H100 GPUs:

    time = start-up + checkpoint loads + token-forwards / (GPUs x per-GPU rate)
    cost = GPUs x time x price per GPU-hour

- **token-forwards**: rows x mean tokens per row (Alpaca's, from benchmarks/data/alpaca-lengths.npz)
  x 4 checkpoints (P0..P3, the paper's three epochs), plus the response-only pass (IFD's
  denominator: BOS, "### Response:" and the response), which is scored at P0 alone.
- **per-GPU rate**: measured by the one-shot GPU check (results/gpu-<card>.json) when there is one
  for that card and model; otherwise the issue's targets, 45 % (OPT-350M) and 60 % (7B) of the
  card's dense bf16 peak, i.e. rate = efficiency x peak / (2 x params).
- **start-up**: the measured time to the first result of a scoring actor on this machine
  (results/score-cpu2.json: processes, imports, Ray Data, one tiny model load), plus loading each
  checkpoint (bf16 bytes at an assumed 1 GB/s from the object store or local disk).
- **prices**: assumed on-demand list prices per GPU-hour (below); check your provider's.

Writes results/score-estimates.json and prints the table for benchmarks/README.md.
"""

from __future__ import annotations

import json
import os

import numpy as np

from benchmarks.report import write_results
from rayapp.config import ScoreConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CHECKPOINTS = 4
ROWS = {"Alpaca (52,002 rows)": 52_002, "1M rows": 1_000_000}
GPUS = (1, 8, 64)
LOAD_BYTES_PER_S = 1e9
RESPONSE_ONLY_HEAD_TOKENS = 5  # BOS and "### Response:" before the response in the response-only pass


def scored_tokens_per_row(lengths, max_length: int, checkpoints: int = CHECKPOINTS) -> float:
    """Tokens a row costs the score stage: its prompted pass at every checkpoint and its
    response-only pass at the first only (stages/score/engine.modes_by_checkpoint)."""
    prompted = np.minimum(lengths["prompt_tokens"].astype(int) + lengths["response_tokens"], max_length).mean()
    response_only = np.minimum(lengths["response_tokens"].astype(int) + RESPONSE_ONLY_HEAD_TOKENS, max_length).mean()
    return float(prompted * checkpoints + response_only)
TARGET_EFFICIENCY = {"facebook/opt-350m": 0.45, "meta-llama/Llama-2-7b-hf": 0.60}
# card: assumed on-demand USD per GPU-hour (AWS g5.xlarge, p5.48xlarge / 8); peaks: ops/plan/accelerators.py
PRICE_PER_GPU_HOUR = {"A10G": 1.01, "H100": 6.88}


def _measured_rate(card: str, model: str) -> float | None:
    path = os.path.join(RESULTS, f"gpu-{card.lower()}.json")
    if not os.path.exists(path):
        return None
    r = json.load(open(path))
    if r.get("tiny_shapes"):
        return None
    runs = [s for s in r["scoring"] + [r.get("scoring_rows_cap_lifted") or {}] if s.get("model") == model]
    # The run at the config's default rows-per-batch cap where there is one (older results have no cap field).
    default = ScoreConfig.model_fields["max_rows_per_batch"].default
    at_default = [s for s in runs if s.get("max_rows_per_batch") == default]
    return (at_default or runs or [{}])[0].get("tokens_per_s")


def run(out_dir: str = RESULTS) -> dict:
    from rayapp.ops.plan.accelerators import ACCELERATOR_BF16_FLOPS
    from rayapp.ops.plan.shapes import model_shape

    cards = {card: (ACCELERATOR_BF16_FLOPS[card], price) for card, price in PRICE_PER_GPU_HOUR.items()}
    d = np.load(os.path.join(HERE, "data", "alpaca-lengths.npz"))
    tokens_per_row = float(np.mean(np.minimum(d["prompt_tokens"].astype(int) + d["response_tokens"], 512)))
    scored_per_row = scored_tokens_per_row(d, 512)
    startup = json.load(open(os.path.join(RESULTS, "score-cpu2.json")))["current"]["runs"][0]["first_result_s"]
    rows_out = []
    for model, eff in TARGET_EFFICIENCY.items():
        params = model_shape(model).params
        for card, (peak, price) in cards.items():
            measured = _measured_rate(card, model)
            rate = measured or eff * peak / (2 * params)
            load = CHECKPOINTS * 2 * params / LOAD_BYTES_PER_S
            for data, rows in ROWS.items():
                forwards = rows * scored_per_row
                for g in GPUS:
                    seconds = startup + load + forwards / (g * rate)
                    rows_out.append({"model": model, "params": params, "card": card, "data": data, "gpus": g,
                                     "rate_tokens_per_s": rate, "rate_source": "measured" if measured else
                                     f"target {eff:.0%} of bf16 peak", "startup_s": startup, "load_s": load,
                                     "seconds": seconds, "usd": g * seconds / 3600 * price})
    out = {"estimate": True, "tokens_per_row": tokens_per_row, "scored_tokens_per_row": scored_per_row,
           "checkpoints": CHECKPOINTS,
           "load_bytes_per_s": LOAD_BYTES_PER_S, "cards": cards, "rows": rows_out}
    print(table_md(out))
    write_results(out_dir, "score-estimates", out)
    return out


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def table_md(out: dict) -> str:
    lines = ["| model | GPU | per-GPU rate (tokens/s) | data | 1 GPU | 8 GPUs | 64 GPUs |", "|---|---|---:|---|---|---|---|"]
    keys = dict.fromkeys((r["model"], r["card"], r["data"]) for r in out["rows"])
    for model, card, data in keys:
        rs = {r["gpus"]: r for r in out["rows"] if (r["model"], r["card"], r["data"]) == (model, card, data)}
        one = rs[1]
        cells = [f"{_dur(rs[g]['seconds'])}, ${rs[g]['usd']:,.2f}" for g in GPUS]
        lines.append(f"| {model.split('/')[-1]} | {card} | {one['rate_tokens_per_s']:,.0f} ({one['rate_source']}) | "
                     f"{data} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



# ==================================================================================================
# A paper run on a cloud cluster, on paper: `python -m benchmarks estimates --paper`
#
# The time and cost table of cluster/README.md: every line of a run of a paper preset on the node
# types of cluster/aws.yaml. Start-up, the hub downloads the job's driver stages into the bucket,
# training, scoring, checkpoint I/O (each save staged on the node's disk, then uploaded: the disks
# and bytes are check-cluster's, rayapp/ops/deploy/), model copies to the nodes, generation, the GPT-4
# judge, nodes idling before scale-down, the head for the whole run, and the bucket. Every line
# says how it is known. Writes results/paper-run-estimates.json; the README's tables are
# table_paper() of it (tests/test_cost_table.py keeps them equal).

PAPER_PRESETS = ("configs/paper-opt350m-to-13b.yaml", "configs/paper-llama2-7b-to-13b.yaml")
CLUSTER_FILE = "cluster/aws.yaml"
# Assumed on-demand list prices, USD per hour (AWS us-west-2): check your own.
NODE_PRICE = {"m6i.2xlarge": 0.384, "g5.2xlarge": 1.212, "g5.12xlarge": 5.672, "p4d.24xlarge": 32.7726}
BUCKET_USD_PER_GB_MONTH = 0.023  # S3 Standard
ALPACA_ROWS = 52_002
# Assumed transfer rates: the hub to the head, and a node to or from the bucket (pyarrow's
# multi-threaded S3 client; a node's ranks upload their own shards in parallel).
HUB_BYTES_PER_S = 150e6
BUCKET_BYTES_PER_S = 1e9
# Training's rate on the tokens it computes, measured on an H100 (results/gpu-h100.json: a padded
# 1.1B step ran at 27.7 % of the bf16 peak counting its padding, 22.6 % with activation
# checkpointing, both at 6 FLOPs a parameter and token; 9.7 % on the real tokens alone, with 65 %
# of them padding). Packed micro-batches (the default) compute the real tokens and little else, so
# the same rate is assumed for their real tokens, and on the A10G and A100 here: an estimate until
# the GPU check measures a packed step.
TRAIN_MFU = {False: 0.277, True: 0.226}  # by activation checkpointing
# vLLM was never measured here (the GPU check's machine had no CUDA vLLM): an assumed decode rate of
# one 13B engine on two A100s at batch 64, and an engine's start (weights from local disk, CUDA graphs).
VLLM_ENGINE_TOKENS_PER_S = 1500
VLLM_ENGINE_START_S = 120
# The judge: OpenAI's list price for gpt-4 (8K context) as published since its launch in March 2023,
# USD per million tokens (check the current one); ~4 characters of English a token (OpenAI's rule
# of thumb); ~20 s for a call that writes a review.
GPT4_USD_PER_M_INPUT, GPT4_USD_PER_M_OUTPUT = 30.0, 60.0
CHARS_PER_TOKEN = 4.0
JUDGE_CALL_S = 20.0
JUDGE_REVIEW_TOKENS_LOW = 150  # the score line and a few sentences of reasons
# Minutes from experience with these tools, not measured here: (low, high).
MINUTES = {"image": (20, 30), "ray_up": (5, 10), "node_join": (5, 10), "prepare": (5, 5), "select": (5, 5)}
IDLE_TIMEOUT_S = 10 * 60  # cluster/aws.yaml's idle_timeout_minutes


def eval_prompt_stats(cfg) -> dict:
    """Measured: the evaluation prompts the judge reads (instruction and input), from the eval sets."""
    from rayapp.stages.evaluate.evalsets import load_eval_set, resolve_set
    from rayapp.stages.evaluate.stage import _question

    ec, chars, sets = cfg.evaluate, [], {}
    eval_dir = ec.eval_dir if os.path.isabs(ec.eval_dir) else os.path.join(os.path.dirname(HERE), ec.eval_dir)
    for entry in ec.sets:
        name, path, field, id_field = resolve_set(entry, eval_dir, ec.prompt_field)
        rows = load_eval_set(name, path, field, id_field, ec.max_prompts)
        sets[name] = len(rows)
        chars += [len(_question({**r, "set": name})) for r in rows]
    return {"sets": sets, "prompts": len(chars), "mean_chars": float(np.mean(chars)), "max_chars": int(max(chars))}


def judge_estimate(cfg, prompts: dict) -> dict:
    """The judge's calls, tokens and price: prompts x pairs (the first model against each other one)
    x 2 orders; a call's input is the system prompt, the pairwise template, the question and both
    answers. Low: answers as long as Alpaca's responses (measured) and short reviews; high: every
    answer at max_new_tokens and every review at the judge's max_tokens."""
    from rayapp.stages.evaluate.judge import JUDGE_SYSTEM, judge_prompt

    jc, gen = cfg.evaluate.judge, cfg.evaluate.generation
    pairs = len(cfg.evaluate.models) - 1
    calls = prompts["prompts"] * pairs * 2
    template = judge_prompt(jc).template.format(question="", answer_1="", answer_2="")
    fixed = (len(jc.system_prompt or JUDGE_SYSTEM) + len(template)) / CHARS_PER_TOKEN
    question = prompts["mean_chars"] / CHARS_PER_TOKEN
    d = np.load(os.path.join(HERE, "data", "alpaca-lengths.npz"))
    out = {"calls": calls, "pairs": pairs, "model": jc.model, "max_concurrency": jc.max_concurrency,
           "fixed_tokens": fixed, "question_tokens": question,
           "answer_tokens": {"low": float(np.mean(d["response_tokens"])), "high": float(gen.max_new_tokens)},
           "review_tokens": {"low": JUDGE_REVIEW_TOKENS_LOW, "high": jc.max_tokens},
           "seconds": calls * JUDGE_CALL_S / jc.max_concurrency}
    for end in ("low", "high"):
        tokens_in = calls * (fixed + question + 2 * out["answer_tokens"][end])
        tokens_out = calls * out["review_tokens"][end]
        out[f"input_tokens_{end}"], out[f"output_tokens_{end}"] = tokens_in, tokens_out
        out[f"usd_{end}"] = tokens_in / 1e6 * GPT4_USD_PER_M_INPUT + tokens_out / 1e6 * GPT4_USD_PER_M_OUTPUT
    return out


def _train_seconds(params: int, tokens: float, epochs: int, gpus: int, card: str, recompute: bool) -> float:
    from rayapp.ops.plan.accelerators import ACCELERATOR_BF16_FLOPS

    return 6 * params * tokens * epochs / (gpus * ACCELERATOR_BF16_FLOPS[card] * TRAIN_MFU[recompute])


def paper_run(preset: str, prompts: dict | None = None, overrides: list[str] = ()) -> dict:
    """Every line of a run of ``preset`` on cluster/aws.yaml's node types, each with how it is known.
    A line's ``seconds`` is [low, high] (equal when there is one figure); ``usd`` likewise; None
    where the line costs nothing on the cluster's bill or its time is not on the run's path."""
    import yaml

    from rayapp.config import load_config
    from rayapp.ops.deploy.checks import launcher_node_types, stages_on
    from rayapp.ops.deploy.instances import ALL
    from rayapp.ops.deploy.needs import DRIVER, _params, disk_needs
    from rayapp.ops.plan.accelerators import ACCELERATOR_BF16_FLOPS
    from rayapp.ops.plan.disk import EXPORT_BYTES_PER_PARAM, HUB_BYTES_PER_PARAM
    from rayapp.stages.finetune.stage import subsets_to_train

    repo = os.path.dirname(HERE)
    cfg = load_config(os.path.join(repo, preset), list(overrides))
    types = launcher_node_types(yaml.safe_load(open(os.path.join(repo, CLUSTER_FILE))))
    where = stages_on(cfg, types)
    node = {s: t for t in types for s in where[t.name]}  # a stage's node type (the presets pin each to one)
    head = next(t for t in types if t.head)
    price = {t.name: NODE_PRICE[t.instance] for t in types}
    card = {t.name: ALL[t.instance].accelerator for t in types}
    disk = {t.name: t.disks[t.instance] for t in types}
    needs = disk_needs(cfg)
    prompts = prompts or eval_prompt_stats(cfg)
    ref, target = cfg.models.reference.name_or_path, cfg.models.target.name_or_path
    p_ref, p_target = _params(ref), _params(target)
    d = np.load(os.path.join(HERE, "data", "alpaca-lengths.npz"))
    tokens_per_row = float(np.mean(np.minimum(d["prompt_tokens"].astype(int) + d["response_tokens"],
                                              cfg.data.max_length)))
    rows = []

    def line(step, where_, basis, seconds=None, usd=None):
        def pair(v):
            return None if v is None else [float(v[0]), float(v[1])] if isinstance(v, tuple) else [float(v)] * 2
        rows.append({"step": step, "where": where_, "seconds": pair(seconds), "usd": pair(usd), "basis": basis})

    def minutes(key):
        return tuple(60 * x for x in MINUTES[key])

    def on(t, seconds, n=1):
        return seconds / 3600 * price[t] * n

    line("build and push the image", "laptop / CI", "estimated; no Docker builder on the development machine (its "
         "dependency step, `pip install -r` of the pinned set, resolves against PyPI in ~1 min: measured)",
         minutes("image"))
    line("`ray up`: the head starts, pulls the image", head.name, "estimated", minutes("ray_up"))
    used = list(dict.fromkeys(node[s].name for s in ("reference", "score", "finetune", "evaluate")))
    join = minutes("node_join")
    line(f"GPU nodes join ({', '.join(used)}): boot, driver check, NVMe, image pull", "each new node",
         "estimated; billed while they start, once per node type on the run's path",
         (join[0] * len(used), join[1] * len(used)),
         tuple(j / 3600 * sum(price[t] * (cfg.score.resources.max_actors if t == node["score"].name else 1)
                              for t in used) for j in join))
    drv = needs[DRIVER]
    hub_s = drv.kept / HUB_BYTES_PER_S + drv.kept / disk[head.name].write_bytes_per_s + drv.kept / BUCKET_BYTES_PER_S
    line(f"hub downloads by the driver: {ref} and {target}, staged as safetensors into the bucket", head.name,
         f"estimated: {drv.kept / 1e9:,.0f} GB from the hub at {HUB_BYTES_PER_S / 1e6:.0f} MB/s (assumed), rewritten "
         f"on the head's {disk[head.name].describe()}, uploaded at {BUCKET_BYTES_PER_S / 1e9:.0f} GB/s (assumed)", hub_s)
    line("prepare: Alpaca downloaded and tokenized", head.name, "estimated", minutes("prepare"))
    tokens_full = ALPACA_ROWS * tokens_per_row
    rt = node["reference"].name
    r_s = _train_seconds(p_ref, tokens_full, cfg.reference.epochs, cfg.reference.num_workers, card[rt],
                         cfg.reference.activation_checkpointing)
    line(f"reference: {cfg.reference.epochs} epochs of {ref.split('/')[-1]} on {cfg.reference.num_workers} GPUs", rt,
         f"estimated: 6 FLOPs a parameter and real token at {TRAIN_MFU[cfg.reference.activation_checkpointing]:.0%} "
         f"of the bf16 peak (an H100's measured rate on the tokens a padded step computes, assumed for packed "
         f"steps and on {card[rt]})", r_s, on(rt, r_s))
    st, pool = node["score"].name, cfg.score.resources.max_actors
    rate = _measured_rate(card[st], ref) or TARGET_EFFICIENCY.get(ref, 0.45) * ACCELERATOR_BF16_FLOPS[card[st]] / (2 * p_ref)
    startup = json.load(open(os.path.join(RESULTS, "score-cpu2.json")))["current"]["runs"][0]["first_result_s"]
    sc_s = startup + CHECKPOINTS * 2 * p_ref / LOAD_BYTES_PER_S + ALPACA_ROWS * scored_tokens_per_row(d, cfg.data.max_length) / (pool * rate)
    line(f"score: P0..P{CHECKPOINTS - 1} on {ALPACA_ROWS:,} rows", f"{pool} x {st}",
         f"estimated: {rate:,.0f} tokens/s a GPU ({TARGET_EFFICIENCY.get(ref, 0.45):.0%} of the {card[st]}'s bf16 "
         f"peak), plus an actor's start-up ({startup:.0f} s, measured on CPU) and checkpoint loads: the scoring "
         "estimate of benchmarks/README.md", sc_s, on(st, sc_s, pool))
    sel = minutes("select")
    line("select: embedding and k-means", f"{st} + {head.name}", "estimated", sel, on(st, sel[0], pool))
    ft = node["finetune"].name
    subsets = subsets_to_train(cfg, evaluating=True)
    for subset in subsets:
        n = ALPACA_ROWS if subset == "full" else ALPACA_ROWS * cfg.select.budget
        f_s = _train_seconds(p_target, n * tokens_per_row, cfg.finetune.epochs, cfg.finetune.num_workers, card[ft],
                             cfg.finetune.activation_checkpointing)
        line(f"finetune: {target.split('/')[-1]} on {subset} ({n:,.0f} rows, {cfg.finetune.epochs} epochs)", ft,
             f"estimated: 6 FLOPs a parameter and real token at "
             f"{TRAIN_MFU[cfg.finetune.activation_checkpointing]:.0%} of the bf16 peak (an H100's measured rate on "
             f"the tokens a padded step computes, activation checkpointing as the preset sets it; assumed for "
             f"packed steps and on {card[ft]})", f_s, on(ft, f_s))
    # checkpoint I/O: each save staged on the node's disk (every worker waits), then uploaded
    ck_s = ck_usd = 0.0
    parts = []
    for stage, exports, export_bytes in (("reference", cfg.reference.epochs, EXPORT_BYTES_PER_PARAM * p_ref),
                                         ("finetune", len(subsets), EXPORT_BYTES_PER_PARAM * p_target)):
        t, n = node[stage].name, needs[stage]
        per_byte = 1 / disk[t].write_bytes_per_s + 1 / BUCKET_BYTES_PER_S
        s = (n.saves * n.checkpoint + exports * export_bytes) * per_byte
        ck_s, ck_usd = ck_s + s, ck_usd + on(t, s)
        parts.append(f"{stage}: {n.saves} saves of {n.checkpoint / 1e9:,.0f} GB and {exports} exports on {t}'s "
                     f"{disk[t].describe()}")
    line("checkpoint I/O: saves and exports staged on local disk, then uploaded", ", ".join(dict.fromkeys((rt, ft))),
         f"estimated: {'; '.join(parts)}; uploads at {BUCKET_BYTES_PER_S / 1e9:.0f} GB/s (assumed)", ck_s, ck_usd)
    copies = {"score": needs["score"].kept, "reference": needs["reference"].kept,
              "finetune": len(subsets) * needs["finetune"].kept, "evaluate": needs["evaluate"].kept}
    cp_s = sum(copies.values()) / BUCKET_BYTES_PER_S
    cp_usd = sum(on(node[s].name, b / BUCKET_BYTES_PER_S, pool if s == "score" else 1) for s, b in copies.items())
    total_copied = sum(b * (pool if s == "score" else 1) for s, b in copies.items())
    line("model copies from the bucket to the GPU nodes", "GPU nodes",
         f"estimated: {total_copied / 1e9:,.0f} GB at {BUCKET_BYTES_PER_S / 1e9:.0f} GB/s a node (assumed)", cp_s, cp_usd)
    et, gen = node["evaluate"].name, cfg.evaluate.generation
    engines, models = gen.resources.max_actors, len(cfg.evaluate.models)
    g_s = models * prompts["prompts"] * gen.max_new_tokens / (engines * VLLM_ENGINE_TOKENS_PER_S) \
        + models * VLLM_ENGINE_START_S
    line(f"evaluate: {models} models x {prompts['prompts']:,} prompts, vLLM ({engines} engines x TP "
         f"{gen.tensor_parallel_size})", et, f"estimated: every answer at {gen.max_new_tokens:,} new tokens (an upper "
         f"bound), {VLLM_ENGINE_TOKENS_PER_S:,} tokens/s an engine (assumed: vLLM was never measured here)",
         g_s, on(et, g_s))
    j = judge_estimate(cfg, prompts)
    line(f"judge: {j['calls']:,} {j['model']} calls ({prompts['prompts']:,} prompts x {j['pairs']} pairs x 2 orders)",
         f"{head.name} + API", f"estimated: ${GPT4_USD_PER_M_INPUT:.0f} / ${GPT4_USD_PER_M_OUTPUT:.0f} per million input "
         f"/ output tokens (gpt-4 list price); prompts measured ({prompts['mean_chars']:,.0f} characters on average); "
         f"answers {j['answer_tokens']['low']:.0f} (Alpaca's mean response) to {j['answer_tokens']['high']:.0f} tokens "
         f"each, reviews {j['review_tokens']['low']} to {j['review_tokens']['high']}: "
         f"{j['input_tokens_low'] / 1e6:.1f}-{j['input_tokens_high'] / 1e6:.1f} M tokens in, "
         f"{j['output_tokens_low'] / 1e6:.1f}-{j['output_tokens_high'] / 1e6:.1f} M out; {j['max_concurrency']} calls "
         f"at once, ~{JUDGE_CALL_S:.0f} s each", j["seconds"], (j["usd_low"], j["usd_high"]))
    idle_usd = on(st, IDLE_TIMEOUT_S, pool) + sum(on(t, IDLE_TIMEOUT_S) for t in dict.fromkeys((rt, ft, et)))
    line("GPU nodes idle before scale-down", "GPU nodes", "estimated: idle_timeout_minutes (10) after each node "
         "type's last stage", usd=idle_usd)
    path = [r["seconds"] for r in rows if r["seconds"] is not None and r["where"] != "laptop / CI"]
    run_s = (sum(s[0] for s in path), sum(s[1] for s in path))
    line("the head, for the whole run", head.name, "estimated: the run's time (the head's own lines above are "
         "priced here)", usd=tuple(on(head.name, s) for s in run_s))
    kept = (cfg.finetune.keep_checkpoints * len(subsets) * needs["finetune"].checkpoint
            + cfg.reference.keep_checkpoints * needs["reference"].checkpoint
            + (len(subsets) * EXPORT_BYTES_PER_PARAM * p_target) + cfg.reference.epochs * EXPORT_BYTES_PER_PARAM * p_ref
            + HUB_BYTES_PER_PARAM * (p_ref + p_target))
    line("bucket: checkpoints kept, exports, staged models, a month", "S3",
         f"estimated: {kept / 1e9:,.0f} GB at ${BUCKET_USD_PER_GB_MONTH}/GB-month", usd=kept / 1e9 * BUCKET_USD_PER_GB_MONTH)
    usd = [r["usd"] for r in rows if r["usd"] is not None]
    return {"preset": preset, "overrides": list(overrides), "cluster": CLUSTER_FILE, "estimate": True, "rows": rows,
            "judge": j, "prompts": prompts,
            "tokens_per_row": tokens_per_row, "total_seconds": list(run_s),
            "total_usd": [sum(u[0] for u in usd), sum(u[1] for u in usd)],
            "judge_usd": [j["usd_low"], j["usd_high"]]}


def _span(v: list | None, fmt) -> str:
    if v is None:
        return "—"
    return fmt(v[0]) if abs(v[1] - v[0]) < 1e-9 * max(1.0, v[1]) or fmt(v[0]) == fmt(v[1]) else f"{fmt(v[0])}–{fmt(v[1])}"


def _usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 10 else f"${x:,.2f}"


def table_paper(out: dict) -> str:
    """The README table of one paper run: step, where, time, cost, how it is known."""
    lines = [f"| step ({out['preset'].split('/')[-1]}, {out['cluster']}) | where | time | cost | how it is known |",
             "|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['step']} | {r['where']} | {_span(r['seconds'], _dur)} | {_span(r['usd'], _usd)} | "
                     f"{r['basis']} |")
    lines.append(f"| **total** (the image build aside; a month of the bucket) | | **{_span(out['total_seconds'], _dur)}** | "
                 f"**{_span(out['total_usd'], _usd)}**, of which the judge {_span(out['judge_usd'], _usd)} | |")
    return "\n".join(lines)


# The cheaper run the README offers: the paper's comparison without the model trained on the full set.
WITHOUT_FULL = ["evaluate.models=[selected,clust_rand]"]


def readme_block(runs: dict) -> str:
    """What cluster/README.md shows between its paper-run-estimates markers."""
    lean = runs["without-full"]
    return "\n\n".join([table_paper(runs[p]) for p in PAPER_PRESETS] + [
        f"Leave out the full-set model (`{WITHOUT_FULL[0]}` with the OPT preset) to bring the total to "
        f"{_span(lean['total_seconds'], _dur)} and {_span(lean['total_usd'], _usd)} (the judge: "
        f"{_span(lean['judge_usd'], _usd)} for {lean['judge']['calls']:,} calls). Idle nodes go away after "
        "`idle_timeout_minutes` (10)."])


def run_paper(out_dir: str = RESULTS) -> dict:
    runs = {p: paper_run(p) for p in PAPER_PRESETS}
    runs["without-full"] = paper_run(PAPER_PRESETS[0], runs[PAPER_PRESETS[0]]["prompts"], WITHOUT_FULL)
    print(readme_block(runs))
    write_results(out_dir, "paper-run-estimates", runs)
    return runs


if __name__ == "__main__":
    # `python -m benchmarks.estimates paper`: the paper runs' tables (cluster/README.md); else scoring
    import sys

    run_paper() if sys.argv[1:] == ["paper"] else run()
