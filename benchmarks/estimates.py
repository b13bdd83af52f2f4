"""Scoring time and cost on GPUs, on paper: `python -m benchmarks estimates`.

An estimate, not a measurement. For each model (OPT-350M, Llama-2-7B), data set (all of Alpaca,
a 1M-row set) and GPU count (1, 8, 64), on A10G and H100 GPUs:

    time = start-up + checkpoint loads + token-forwards / (GPUs x per-GPU rate)
    cost = GPUs x time x price per GPU-hour

- **token-forwards**: rows x mean tokens per row (Alpaca's, from benchmarks/data/alpaca-lengths.npz)
  x 4 checkpoints (P0..P3, the paper's three epochs).
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

from rayapp.config import ScoreConfig

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CHECKPOINTS = 4
ROWS = {"Alpaca (52,002 rows)": 52_002, "1M rows": 1_000_000}
GPUS = (1, 8, 64)
LOAD_BYTES_PER_S = 1e9
TARGET_EFFICIENCY = {"facebook/opt-350m": 0.45, "meta-llama/Llama-2-7b-hf": 0.60}
# card: assumed on-demand USD per GPU-hour (AWS g5.xlarge, p5.48xlarge / 8); peaks: plan/accelerators.py
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
    from rayapp.plan.accelerators import ACCELERATOR_BF16_FLOPS
    from rayapp.plan.shapes import model_shape

    cards = {card: (ACCELERATOR_BF16_FLOPS[card], price) for card, price in PRICE_PER_GPU_HOUR.items()}
    d = np.load(os.path.join(HERE, "data", "alpaca-lengths.npz"))
    tokens_per_row = float(np.mean(np.minimum(d["prompt_tokens"].astype(int) + d["response_tokens"], 512)))
    startup = json.load(open(os.path.join(RESULTS, "score-cpu2.json")))["current"]["runs"][0]["first_result_s"]
    rows_out = []
    for model, eff in TARGET_EFFICIENCY.items():
        params = model_shape(model).params
        for card, (peak, price) in cards.items():
            measured = _measured_rate(card, model)
            rate = measured or eff * peak / (2 * params)
            load = CHECKPOINTS * 2 * params / LOAD_BYTES_PER_S
            for data, rows in ROWS.items():
                forwards = rows * tokens_per_row * CHECKPOINTS
                for g in GPUS:
                    seconds = startup + load + forwards / (g * rate)
                    rows_out.append({"model": model, "params": params, "card": card, "data": data, "gpus": g,
                                     "rate_tokens_per_s": rate, "rate_source": "measured" if measured else
                                     f"target {eff:.0%} of bf16 peak", "startup_s": startup, "load_s": load,
                                     "seconds": seconds, "usd": g * seconds / 3600 * price})
    out = {"estimate": True, "tokens_per_row": tokens_per_row, "checkpoints": CHECKPOINTS,
           "load_bytes_per_s": LOAD_BYTES_PER_S, "cards": cards, "rows": rows_out}
    with open(os.path.join(out_dir, "score-estimates.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(table_md(out))
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
