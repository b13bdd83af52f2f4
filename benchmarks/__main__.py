"""Entry point: python -m benchmarks score|scaling|demo|memory|prepare ... (see --help)

Each benchmark is one entry of ``BENCHMARKS``: its module, its help, its own arguments (every one
also takes ``--out``) and how its ``run`` is called. Results go through ``benchmarks.results.write``.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str  # imported only when this benchmark runs
    help: str
    call: Callable  # (module, parsed args) -> None
    args: list = field(default_factory=list)  # (flags, argparse keyword arguments)
    out: bool = True  # takes --out (the results folder)


BENCHMARKS = [
    Benchmark("score", "benchmarks.score_bench",
              "scoring: start-up and 1 vs 2 actors (optionally beside a baseline commit), padding inside actor "
              "batches on Alpaca and Dolly, full Alpaca against a plain loop",
              lambda m, a: m.run(a.rows, a.out, a.baseline, not a.no_full),
              [(["--rows"], dict(type=int, default=3000, help="Alpaca rows scored with 1 and 2 actors")),
               (["--baseline"], dict(help="a commit to run the same 1-vs-2-actor probe on first, e.g. f0d60ed")),
               (["--no-full"], dict(action="store_true", help="skip the full-Alpaca run against the plain loop"))]),
    Benchmark("scaling", "benchmarks.scaling",
              "scoring and fine-tuning throughput across node counts, with baselines",
              lambda m, a: m.run([int(x) for x in a.nodes.split(",")], a.rows, a.cpus_per_node, a.out, a.address,
                                 not a.no_vllm),
              [(["--nodes"], dict(default="1,2,4", help="comma-separated node counts")),
               (["--rows"], dict(type=int, default=1024, help="Alpaca rows")),
               (["--cpus-per-node"], dict(type=int, default=1)),
               (["--address"], dict(help="a real cluster's address (otherwise nodes are simulated on this machine)")),
               (["--no-vllm"], dict(action="store_true", help="skip the vLLM prompt_logprobs backend"))]),
    Benchmark("demo", "benchmarks.demo",
              "`rayapp run` on the embedded default: a baseline commit and this checkout",
              lambda m, a: m.run(a.baseline, a.out, a.repeats, a.name, tuple(a.variant)),
              [(["--baseline"], dict(required=True, help="the commit to compare with, e.g. 2c6cd9d")),
               (["--repeats"], dict(type=int, default=1, help="runs of each, alternating; medians compared")),
               (["--name"], dict(default="demo", help="results go in <out>/<name>-cpu<N>.json and .png")),
               (["--variant"], dict(action="append", default=[], metavar="LABEL:KEY=VALUE",
                                    help="also run this checkout with a config override, e.g. "
                                         "one-driver:ray.stage_processes=never"))]),
    Benchmark("memory", "benchmarks.memory",
              "peak memory at real shapes: FSDP2 sharded load and bounded scoring loss, each beside the former path",
              lambda m, a: m.run(a.out)),
    Benchmark("lora", "benchmarks.lora_memory",
              "LoRA against full fine-tuning: peak memory per FSDP2 worker at a 1.1B shape, beside the plan",
              lambda m, a: m.run(a.out)),
    Benchmark("prepare", "benchmarks.prepare_bench",
              "prepare throughput on the full Alpaca and Dolly files: driver, 1 and 2 workers",
              lambda m, a: m.run(a.out)),
    Benchmark("kmeans", "benchmarks.kmeans_bench",
              "k-means for stratified selection at 50k, 200k and 1M rows (synthetic 384-d embeddings, 1,000 "
              "clusters): fitted on a 200k-row sample above 200k rows, beside a fit on every row at 400k",
              lambda m, a: m.run(a.out)),
    Benchmark("million", "benchmarks.million",
              "a million rows: prepare spread over Ray Data (1 and 2 workers, and the driver path at 100k) and a "
              "select from external trajectories and an embeddings file, at 100k and 1M rows; driver and worker RSS",
              lambda m, a: m.run(a.out, tuple(int(x) for x in a.sizes.split(",")), tuple(a.stages.split(","))),
              [(["--sizes"], dict(default="100000,1000000", help="comma-separated row counts")),
               (["--stages"], dict(default="prepare,select", help="prepare, select or both; the other's figures "
                                                                    "in the results file are kept"))]),
    Benchmark("train", "benchmarks.train_bench",
              "training batches, padded against packed: padding at the presets' shapes on Alpaca, and optimizer "
              "steps measured side by side (OPT-125M's shape and the tiny model, on this CPU)",
              lambda m, a: m.run(a.out, a.steps),
              [(["--steps"], dict(type=int, default=3, help="measured steps of each kind, per model"))]),
    Benchmark("gpu", "benchmarks.gpu",
              "the one-shot GPU check (no Ray needed): scoring rate against the forward-FLOP limit, bf16/fp32 "
              "agreement, an FSDP2 step's MFU, peak memory against the plan",
              lambda m, a: m.run(a.out, True if a.tiny else None),
              [(["--tiny"], dict(action="store_true", help="tiny shapes even on a GPU (the default without one)"))]),
    Benchmark("lp-vs-baselines", "benchmarks.lp_vs_baselines",
              "the paper's comparison with a real model: LP vs clust_rand, longest, ppl_high and the full set at "
              "equal sizes, over seeds; held-out NLL row by row with paired bootstrap intervals",
              lambda m, a: m.run(a.config, a.out, tuple(int(s) for s in a.seeds.split(",")), a.budget,
                                 full_seeds=a.full_seeds, evaluate=a.evaluate, target=a.target,
                                 arms=tuple(a.arms.split(","))),
              [(["--config"], dict(default="benchmarks/lp_vs_baselines/cpu.yaml",
                                   help="cpu.yaml here, gpu.yaml on a GPU node")),
               (["--seeds"], dict(default="42,43,44", help="select.seed and finetune.seed of each replicate")),
               (["--budget"], dict(type=float, default=0.10)),
               (["--full-seeds"], dict(type=int, default=1,
                                       help="how many seeds train on the full set (0: none; the longest runs)")),
               (["--evaluate"], dict(action="store_true",
                                     help="also generate and judge Self-Instruct answers with the first seed's "
                                          "models (minutes of generation each on a CPU)")),
               (["--target"], dict(help="fine-tune another target on the same run's selections (e.g. "
                                        "gemma3-270m: SmolLM2-135M selects for another family); results "
                                        "go to <name>-to-<target>")),
               (["--arms"], dict(default=",".join(("lp", "clust_rand", "longest:global", "ppl_high")),
                                 help="the selections compared (LP first)"))]),
    Benchmark("fidelity", "benchmarks.fidelity",
              "measured effects of rayapp's differences from the authors' code (tokenizer boundary, duplicates, "
              "k-means order, perplexity denominator, bf16)",
              lambda m, a: m.run(a.out, a.run),
              [(["--run"], dict(help="a finished run of configs/smollm2.yaml, for the denominator and bf16 "
                                     "measurements"))]),
    Benchmark("slow-tokenizers", "benchmarks.slow_tokenizers",
              "the authors' slow tokenizers (use_fast=False) against rayapp's fast ones for Llama-2 and OPT, "
              "rebuilt from the GGUF vocab files llama-cpp-python's sdist vendors: tokens and labels on every "
              "shared Alpaca and Dolly row",
              lambda m, a: m.run(a.out, a.sdist, transformers4_python=a.transformers4_python),
              [(["--sdist"], dict(help="a downloaded llama_cpp_python-0.3.36.tar.gz (otherwise pip downloads it)")),
               (["--transformers4-python"], dict(help="a Python with transformers 4.x, sentencepiece and protobuf: "
                                                      "also compare with the authors' own tokenizer classes"))]),
    Benchmark("estimates", "benchmarks.estimates",
              "scoring time and cost on 1, 8 and 64 GPUs, on paper (from the measured start-up and the GPU "
              "check's rate where there is one)",
              lambda m, a: m.run_paper() if a.paper else m.run(),
              [(["--paper"], dict(action="store_true", help="every line of a paper preset's cluster run, each "
                                  "marked measured or estimated (the table in cluster/README.md)"))], out=False),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="which", required=True)
    for b in BENCHMARKS:
        parser = sub.add_parser(b.name, help=b.help)
        for flags, kwargs in b.args:
            parser.add_argument(*flags, **kwargs)
        if b.out:
            parser.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    bench = next(b for b in BENCHMARKS if b.name == args.which)
    bench.call(importlib.import_module(bench.module), args)
    return 0


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import this module
    sys.exit(main())
