"""`rayapp` command line: one subcommand per pipeline stage, plus `run` which chains them.

    rayapp prepare --config configs/tiny.yaml --set data.max_length=512
    rayapp run --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from rayapp.config import ConfigError, RunConfig, dump_config, load_config

STAGES = ["prepare", "reference", "score", "select", "finetune", "evaluate"]


def _stage_fn(name: str) -> Callable[[RunConfig, bool], dict]:
    if name == "prepare":
        from rayapp.prepare.stage import run_prepare

        return lambda cfg, force: run_prepare(cfg, force=force)
    if name == "reference":
        from rayapp.reference.stage import run_reference

        return lambda cfg, force: run_reference(cfg, force=force)
    if name == "score":
        from rayapp.score.stage import run_score

        return lambda cfg, force: run_score(cfg, force=force)
    if name == "select":
        from rayapp.select.stage import run_select

        return lambda cfg, force: run_select(cfg, force=force)
    if name == "finetune":
        from rayapp.finetune.stage import run_finetune

        return lambda cfg, force: run_finetune(cfg, force=force)
    if name == "evaluate":
        from rayapp.evaluate.stage import run_evaluate

        return lambda cfg, force: run_evaluate(cfg, force=force)
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML run config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set score.batch_tokens=8192 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are complete")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayapp",
        description=(
            "A small model picks instruction-tuning data for a large one (learning percentage), on Ray.\n"
            "Stages: prepare -> reference -> score -> select -> finetune -> evaluate; `run` chains them."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rayapp {__import__('rayapp').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {
        "prepare": "load, normalise, template and tokenize the data into Parquet shards",
        "reference": "fine-tune the small reference model, checkpoint every epoch",
        "score": "per-sample response losses for every checkpoint (Ray Data actor pool)",
        "select": "learning-percentage ranking and baselines -> selected shard + report",
        "finetune": "fine-tune the target model on the selection (Ray Train, FSDP2)",
        "evaluate": "generate answers and judge models pairwise (win / tie / lose)",
    }
    for name in STAGES:
        _add_common(sub.add_parser(name, help=helps[name], description=helps[name]))
    run = sub.add_parser("run", help="run the stages in order (each skips work already complete)")
    _add_common(run)
    run.add_argument("--until", choices=STAGES, help="stop after this stage")
    sel = sub.choices["select"]
    sel.add_argument("--trajectories", help="select from trajectories produced elsewhere (Parquet: id/index, P0..Pn)")
    sel.add_argument("--model", help="column prefix model name in --trajectories, e.g. opt-350m")
    cmp_ = sub.add_parser("compare", help="hardness transfer between models' trajectories (LP correlations, overlap)")
    cmp_.add_argument("--trajectories", required=True, help="Parquet with <model>_P0..Pn columns")
    cmp_.add_argument("--reference", required=True, help="the model others are compared against, e.g. opt-13b")
    cmp_.add_argument("--models", required=True, help="comma-separated models, e.g. opt-350m,opt-1.3b")
    cmp_.add_argument("--out", help="write the table (Markdown) and plot (PNG) here")
    jr = sub.add_parser("judge-report", help="win / tie / lose from existing pairwise judgments (JSONL)")
    jr.add_argument("--judgments", required=True,
                    help="a .jsonl file or a folder of them (one per set): fields review, review_reverse")
    jr.add_argument("--names", default="model 1,model 2", help="names of the answer_1 and answer_2 models")
    jr.add_argument("--out", help="write the table (Markdown) and plot (PNG) here")
    sb = sub.add_parser("submit", help="submit a command as a Ray job, stream its logs, exit with its status",
                        description="rayapp submit [--address URL] -- python jobs/run_pipeline.py --config FILE")
    sb.add_argument("--address", default=None,
                    help=f"the cluster's dashboard (job) address; default $RAY_ADDRESS or {'http://127.0.0.1:8265'}")
    sb.add_argument("--working-dir", default=".", help="uploaded to the cluster (build outputs excluded); '' for none")
    sb.add_argument("--runtime-env-json", help="extra runtime_env as JSON (no secrets: they belong in the cluster env)")
    sb.add_argument("--submission-id", help="job id to use (re-submitting the same id is refused by Ray)")
    sb.add_argument("--no-wait", action="store_true", help="return after submitting")
    sb.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command to run")
    show = sub.add_parser("config", help="print the validated config with overrides applied")
    show.add_argument("--config", "-c", required=True)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _run_stages(cfg: RunConfig, names: list[str], force: bool) -> int:
    from rayapp.summary import print_summary

    results: dict = {}
    timings: dict = {}
    t_all = time.perf_counter()
    for name in names:
        fn = _stage_fn(name)
        t0 = time.perf_counter()
        print(f"[run] === {name} ===", flush=True)
        if name == "finetune" and "evaluate" in names:
            from rayapp.finetune.stage import run_finetune_subsets

            results[name] = run_finetune_subsets(cfg, force)
        else:
            results[name] = fn(cfg, force)
        timings[name] = time.perf_counter() - t0
        print(f"[run] {name} done in {timings[name]:.1f}s", flush=True)
    print_summary(cfg, results, timings, time.perf_counter() - t_all)
    return 0


def _compare(args) -> int:
    import os

    from rayapp.select.compare import compare_pair, format_table, plot_overlap
    from rayapp.select.stage import SelectError, load_external_trajectories

    try:
        ref, _ = load_external_trajectories(args.trajectories, f"{args.reference}_")
        rows = {}
        for m in [m.strip() for m in args.models.split(",") if m.strip()]:
            other, _ = load_external_trajectories(args.trajectories, f"{m}_")
            rows[m] = compare_pair(other, ref)
    except (SelectError, FileNotFoundError, ValueError) as exc:
        print(f"rayapp compare: error: {exc}", file=sys.stderr)
        return 1
    table = format_table(rows)
    print(f"Hardness transfer vs {args.reference} ({next(iter(rows.values()))['rows']} rows; "
          f"{next(iter(rows.values()))['excluded_no_response']} with no response tokens excluded)")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(table + "\n")
        plot_overlap(rows, args.reference, os.path.join(args.out, "compare.png"))
        print(f"table and plot in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if args.command == "compare":
        return _compare(args)
    if args.command == "submit":
        import os

        from rayapp.submit import DEFAULT_ADDRESS, SubmitError, submit

        entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
        address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        try:
            return submit(address, entry, args.working_dir or None, args.runtime_env_json, not args.no_wait,
                          args.submission_id)
        except SubmitError as exc:
            print(f"rayapp submit: error: {exc}", file=sys.stderr)
            return 2
        except (ConnectionError, RuntimeError) as exc:
            print(f"rayapp submit: error: cannot submit to {address}: {exc}", file=sys.stderr)
            return 1
    if args.command == "judge-report":
        from rayapp.evaluate.judge_report import main as judge_report

        names = [n.strip() for n in args.names.split(",")]
        if len(names) != 2:
            print("rayapp judge-report: error: --names takes two names, e.g. --names lp-selected,full", file=sys.stderr)
            return 2
        try:
            return judge_report(args.judgments, names[0], names[1], args.out)
        except (FileNotFoundError, ValueError) as exc:
            print(f"rayapp judge-report: error: {exc}", file=sys.stderr)
            return 1
    if args.command == "select" and args.trajectories:
        args.overrides = [f"select.trajectories={args.trajectories}",
                          f"select.trajectory_prefix={args.model + '_' if args.model else ''}"] + args.overrides
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"rayapp: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    try:
        if args.command == "run":
            stages = STAGES if not args.until else STAGES[: STAGES.index(args.until) + 1]
            return _run_stages(cfg, stages, args.force)
        _stage_fn(args.command)(cfg, args.force)
        return 0
    except KeyboardInterrupt:
        print("rayapp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for users; the traceback is behind RAYAPP_DEBUG=1
        import os

        if os.environ.get("RAYAPP_DEBUG"):
            raise
        print(f"rayapp {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
