"""Entry point: python -m benchmarks score [--rows N] [--out benchmarks/results]"""

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="which", required=True)
    s = sub.add_parser("score", help="scoring throughput: 1 vs 2 actors; token-budget vs fixed batches")
    s.add_argument("--rows", type=int, default=1500, help="Alpaca rows scored per configuration")
    s.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.which == "score":
        from benchmarks.score_bench import run

        run(args.rows, args.out)
    return 0


sys.exit(main())
