"""Entry point: python -m benchmarks score|scaling|demo|memory|prepare ... (see --help)"""

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="which", required=True)
    s = sub.add_parser("score", help="scoring: start-up and 1 vs 2 actors (optionally beside a baseline commit), "
                       "padding inside actor batches on Alpaca and Dolly, full Alpaca against a plain loop")
    s.add_argument("--rows", type=int, default=3000, help="Alpaca rows scored with 1 and 2 actors")
    s.add_argument("--baseline", help="a commit to run the same 1-vs-2-actor probe on first, e.g. f0d60ed")
    s.add_argument("--no-full", action="store_true", help="skip the full-Alpaca run against the plain loop")
    s.add_argument("--out", default="benchmarks/results")
    sc = sub.add_parser("scaling", help="scoring and fine-tuning throughput across node counts, with baselines")
    sc.add_argument("--nodes", default="1,2,4", help="comma-separated node counts")
    sc.add_argument("--rows", type=int, default=1024, help="Alpaca rows")
    sc.add_argument("--cpus-per-node", type=int, default=1)
    sc.add_argument("--address", help="a real cluster's address (otherwise nodes are simulated on this machine)")
    sc.add_argument("--no-vllm", action="store_true", help="skip the vLLM prompt_logprobs backend")
    sc.add_argument("--out", default="benchmarks/results")
    d = sub.add_parser("demo", help="`rayapp run` on the embedded default: a baseline commit and this checkout")
    d.add_argument("--baseline", required=True, help="the commit to compare with, e.g. 2c6cd9d")
    d.add_argument("--repeats", type=int, default=1, help="runs of each, alternating; medians compared")
    d.add_argument("--name", default="demo", help="results go in <out>/<name>-cpu<N>.json and .png")
    d.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE",
                   help="also run this checkout with a config override, e.g. one-driver:ray.stage_processes=false")
    d.add_argument("--out", default="benchmarks/results")
    m = sub.add_parser("memory", help="peak memory at real shapes: FSDP2 sharded load and bounded scoring loss, "
                       "each beside the former path")
    m.add_argument("--out", default="benchmarks/results")
    lm = sub.add_parser("lora", help="LoRA against full fine-tuning: peak memory per FSDP2 worker at a 1.1B shape, "
                        "beside the plan")
    lm.add_argument("--out", default="benchmarks/results")
    pr = sub.add_parser("prepare", help="prepare throughput on the full Alpaca and Dolly files: driver, 1 and 2 workers")
    pr.add_argument("--out", default="benchmarks/results")
    g = sub.add_parser("gpu", help="the one-shot GPU check (no Ray needed): scoring rate against the forward-FLOP "
                       "limit, bf16/fp32 agreement, an FSDP2 step's MFU, peak memory against the plan")
    g.add_argument("--out", default="benchmarks/results")
    g.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU (the default without one)")
    lv = sub.add_parser("lp-vs-baselines", help="the paper's comparison with a real model: LP vs clust_rand, longest "
                        "and ppl_high at equal sizes (5%%, 10%%) and the full set; held-out NLL, ROUGE-L, pairwise")
    lv.add_argument("--config", default="benchmarks/lp_vs_baselines/cpu.yaml", help="cpu.yaml here, gpu.yaml on a GPU node")
    lv.add_argument("--budgets", default="0.05,0.10")
    lv.add_argument("--out", default="benchmarks/results")
    lv.add_argument("--no-full", action="store_true", help="leave out the model trained on the full set (the longest run)")
    fd = sub.add_parser("fidelity", help="measured effects of rayapp's differences from the authors' code "
                        "(tokenizer boundary, duplicates, k-means order, perplexity denominator, bf16)")
    fd.add_argument("--run", help="a finished run of configs/smollm2.yaml, for the denominator and bf16 measurements")
    fd.add_argument("--out", default="benchmarks/results")
    es = sub.add_parser("estimates", help="scoring time and cost on 1, 8 and 64 GPUs, on paper (from the measured "
                        "start-up and the GPU check's rate where there is one)")
    es.add_argument("--paper", action="store_true", help="every line of a paper preset's cluster run, each marked "
                    "measured or estimated (the table in cluster/README.md)")
    args = p.parse_args()
    if args.which == "lora":
        from benchmarks.lora_memory import run as run_lora

        run_lora(args.out)
        return 0
    if args.which == "fidelity":
        from benchmarks.fidelity import run as run_fidelity

        run_fidelity(args.out, args.run)
        return 0
    if args.which == "lp-vs-baselines":
        from benchmarks.lp_vs_baselines import run as run_lp

        run_lp(args.config, args.out, tuple(float(b) for b in args.budgets.split(",")), full=not args.no_full)
        return 0
    if args.which == "estimates":
        from benchmarks.estimates import run as run_estimates
        from benchmarks.estimates import run_paper

        run_paper() if args.paper else run_estimates()
        return 0
    if args.which == "gpu":
        from benchmarks.gpu import run as run_gpu

        run_gpu(args.out, True if args.tiny else None)
        return 0
    if args.which == "prepare":
        from benchmarks.prepare_bench import run as run_prepare

        run_prepare(args.out)
        return 0
    if args.which == "memory":
        from benchmarks.memory import run as run_memory

        run_memory(args.out)
        return 0
    if args.which == "demo":
        from benchmarks.demo import run as run_demo

        run_demo(args.baseline, args.out, args.repeats, args.name, tuple(args.variant))
        return 0
    if args.which == "scaling":
        from benchmarks.scaling import run as run_scaling

        run_scaling([int(x) for x in args.nodes.split(",")], args.rows, args.cpus_per_node, args.out,
                    args.address, not args.no_vllm)
        return 0
    if args.which == "score":
        from benchmarks.score_bench import run

        run(args.rows, args.out, args.baseline, not args.no_full)
    return 0


if __name__ == "__main__":  # vLLM's engine spawns processes that re-import this module
    sys.exit(main())
