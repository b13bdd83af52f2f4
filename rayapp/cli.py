"""`rayapp` command line: one subcommand per pipeline stage, plus `run` which chains them.

    rayapp prepare --config configs/tiny.yaml --set data.max_length=512
    rayapp run --config configs/tiny.yaml [-v | -q]

Exit codes: 0 done, 1 a runtime problem the user can fix (missing input, bad data), 2 a usage or
config error, 130 interrupted. Anything else is a bug in rayapp and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rayapp.core.errors import ConfigError, RayappError
from rayapp.pipeline import STAGE_TYPES


def _verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug lines, and Ray's and the workers' own output")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set score.batch_tokens=8192 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are complete")
    _verbosity(p, argparse.SUPPRESS)


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
    _verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, stage in STAGE_TYPES.items():
        _add_common(sub.add_parser(name, help=stage.help, description=stage.help))
    run = sub.add_parser("run", help="run the stages in order (each skips work already complete)")
    _add_common(run)
    run.add_argument("--until", choices=list(STAGE_TYPES), help="stop after this stage")
    run.add_argument("--skip-plan", action="store_true",
                     help="start even if `rayapp plan` says a stage will not fit its GPUs")
    pl = sub.add_parser("plan", help="per-GPU memory each stage needs at the config's shapes, and whether it fits",
                        description="For each stage: the model's parameters (from its config.json, built on the "
                        "meta device), the memory per GPU it needs, the GPU it is placed on, and a verdict. "
                        "Exits 1 when a stage does not fit.")
    pl.add_argument("--config", "-c", required=True)
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    _verbosity(pl, argparse.SUPPRESS)
    sel = sub.choices["select"]
    sel.add_argument("--trajectories", help="select from trajectories produced elsewhere (Parquet: id/index, P0..Pn)")
    sel.add_argument("--model", help="column prefix model name in --trajectories, e.g. opt-350m")
    sel.add_argument("--clusters", help="a clustering made elsewhere (Parquet: id/index and cluster, or embedding "
                                        "to cluster here); stratified selection then runs on --trajectories too")
    cmp_ = sub.add_parser("compare", help="hardness transfer between models' trajectories (LP correlations, overlap)")
    cmp_.add_argument("--trajectories", help="Parquet with <model>_P0..Pn columns (e.g. the paper's)")
    cmp_.add_argument("--run", action="append", default=[], metavar="NAME=PATH",
                      help="a run's trajectories (its output_dir, or scores/trajectories.parquet), repeatable: runs "
                           "with different models or tokenizers are matched row by row by id")
    cmp_.add_argument("--reference", required=True, help="the model others are compared against, e.g. opt-13b")
    cmp_.add_argument("--models", help="comma-separated models, e.g. opt-350m,opt-1.3b (default: every --run)")
    cmp_.add_argument("--out", help="write the table (Markdown) and plot (PNG) here")
    jr = sub.add_parser("judge-report", help="win / tie / lose from existing pairwise judgments (JSONL)")
    jr.add_argument("--judgments",
                    help="a .jsonl file or a folder of them (one per set): fields review, review_reverse")
    jr.add_argument("--human", help="choices exported from evaluate/human/index.html (JSONL); needs --key")
    jr.add_argument("--key", help="the page's key.json (which side is which model), beside index.html")
    jr.add_argument("--names", default="model 1,model 2", help="names of the answer_1 and answer_2 models")
    jr.add_argument("--out", help="write the table (Markdown) and plot (PNG) here")
    sb = sub.add_parser("submit", help="submit a command as a Ray job, stream its logs, exit with its status",
                        description="rayapp submit [--address URL] -- python jobs/run_pipeline.py --config FILE")
    sb.add_argument("--address", default=None,
                    help="the cluster's dashboard (job) address; default $RAY_ADDRESS or http://127.0.0.1:8265")
    sb.add_argument("--working-dir", default=".", help="uploaded to the cluster (build outputs excluded); '' for none")
    sb.add_argument("--runtime-env-json", help="extra runtime_env as JSON (no secrets: they belong in the cluster env)")
    sb.add_argument("--submission-id", help="job id to use (re-submitting the same id is refused by Ray)")
    sb.add_argument("--no-wait", action="store_true", help="return after submitting")
    sb.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command to run")
    cc = sub.add_parser("check-cluster", help="check cluster files (launcher YAML, KubeRay) and whether a run's "
                        "stages fit their node types", description="What Ray's schema check cannot see: declared "
                        "GPUs against the instance types, drivers, AMIs, head permissions, /dev/shm, requests "
                        "that fit the nodes; with -c, every stage's actors and workers against the node types. "
                        "Exits 1 on any problem.")
    cc.add_argument("files", nargs="+", help="cluster/aws.yaml, cluster/gcp.yaml, cluster/kuberay/*.yaml")
    cc.add_argument("--config", "-c", dest="configs", action="append", default=[], help="a run config (repeatable)")
    cc.add_argument("--head-policy", help="the AWS head's IAM policy (default: aws-iam/head-policy.json beside it)")
    st = sub.add_parser("status", help="where a run stands: each stage done, running (how far, time left), "
                        "failed or not started", description="Reads the run's output_dir (local, s3://, gs://): "
                        "manifests, the runner's state markers, training progress and committed scoring units.")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", "-c", help="the run's config (its output_dir and its plan of stages)")
    where.add_argument("--output-dir", help="a run's output_dir, without its config")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    rh = sub.add_parser("rehearse", help="run a config's pipeline end to end on a local cluster of its node types, "
                        "with tiny stand-ins of its models in the hub's layout", description="A cluster run on one "
                        "machine: every placement group, bundle, pool size and Ray Train scaling of the config is "
                        "created and scheduled by Ray on local nodes that declare the cluster file's node types "
                        "(logical GPUs). Lists what differs on a CPU, checks the secrets the nodes need, and says "
                        "per stage what was placed where and how it ended. Exits 1 unless every stage finished.")
    rh.add_argument("--config", "-c", required=True)
    rh.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rh.add_argument("--cluster", default="cluster/aws.yaml",
                    help="the cluster file whose node types the local nodes declare (launcher YAML or KubeRay)")
    rh.add_argument("--workdir", help="where the rehearsal's hub cache, cluster logs and outputs go "
                    "(default runs/rehearsal/<name>)")
    rh.add_argument("--until", help="stop after this stage")
    _verbosity(rh, argparse.SUPPRESS)
    show = sub.add_parser("config", help="print the validated config with overrides applied")
    show.add_argument("--config", "-c", required=True)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _plan(cfg, as_json: bool, verbose: bool) -> int:
    import json

    from rayapp.ops.plan.check import format_plans, infeasible
    from rayapp.pipeline import memory_plans

    try:
        plans = memory_plans(cfg)
    except OSError as exc:
        raise RayappError(str(exc)) from None
    if as_json:
        print(json.dumps({"config": cfg.name, "fits": not infeasible(plans), "stages": [p.as_dict() for p in plans]},
                         indent=2))
    else:
        print(format_plans(plans, verbose))
    return 1 if infeasible(plans) else 0


def _compare(args) -> int:
    import os

    from rayapp.stages.select.compare import align_by_id, compare_pair, format_table, plot_overlap
    from rayapp.stages.select.stage import load_external_trajectories

    if bool(args.trajectories) == bool(args.run):
        raise RayappError("compare: give --trajectories FILE (models as column prefixes) or --run NAME=PATH (twice "
                          "or more)")
    try:
        if args.trajectories:
            def load(name):
                return load_external_trajectories(args.trajectories, f"{name}_")[0]
            names = [m.strip() for m in (args.models or "").split(",") if m.strip()]
            if not names:
                raise RayappError("compare --trajectories needs --models")
        else:
            runs = {}
            for spec in args.run:
                name, sep, path = spec.partition("=")
                if not sep or not name or not path:
                    raise RayappError(f"compare --run {spec!r}: expected NAME=PATH")
                if not path.endswith(".parquet"):
                    path = os.path.join(path, "scores", "trajectories.parquet")
                runs[name] = path

            def load(name):
                if name not in runs:
                    raise RayappError(f"compare: no --run named {name!r} (have: {', '.join(runs)})")
                return load_external_trajectories(runs[name], "")[0]
            names = [m.strip() for m in args.models.split(",")] if args.models else \
                [n for n in runs if n != args.reference]
        ref = load(args.reference)
        rows = {}
        for m in names:
            other, ref_m, unmatched = align_by_id(load(m), ref)
            if unmatched:
                print(f"{m} vs {args.reference}: {unmatched} rows are in only one of them (compared on the "
                      f"{len(ref_m.ids)} they share)")
            rows[m] = compare_pair(other, ref_m)
    except (FileNotFoundError, ValueError) as exc:
        raise RayappError(str(exc)) from None
    table = format_table(rows)
    first = next(iter(rows.values()))
    print(f"Hardness transfer vs {args.reference} ({first['rows']} rows; "
          f"{first['excluded_no_response']} with no response tokens excluded)")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(table + "\n")
        plot_overlap(rows, args.reference, os.path.join(args.out, "compare.png"))
        print(f"table and plot in {args.out}")
    return 0


def _submit(args) -> int:
    import os

    from rayapp.ops.submit import DEFAULT_ADDRESS, submit

    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return submit(address, entry, args.working_dir or None, args.runtime_env_json, not args.no_wait,
                      args.submission_id)
    except (ConnectionError, RuntimeError) as exc:
        raise RayappError(f"cannot submit to {address}: {exc}") from None


def _judge_report(args) -> int:
    from rayapp.stages.evaluate.judge_report import main as judge_report

    if args.human:
        from rayapp.stages.evaluate.judge_report import human_main

        if not args.key:
            raise ConfigError("--human needs --key: the key.json beside the page the choices came from")
        try:
            return human_main(args.human, args.key, args.out)
        except (FileNotFoundError, ValueError) as exc:
            raise RayappError(str(exc)) from None
    if not args.judgments:
        raise ConfigError("give --judgments (a judge's reviews) or --human with --key (people's choices)")
    names = [n.strip() for n in args.names.split(",")]
    if len(names) != 2:
        raise ConfigError("--names takes two names, e.g. --names lp-selected,full")
    try:
        return judge_report(args.judgments, names[0], names[1], args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise RayappError(str(exc)) from None


def _status(output_dir: str, cfg, as_json: bool) -> int:
    from rayapp.ops.status import as_json as status_json
    from rayapp.ops.status import format_status, run_status

    try:
        stages = run_status(output_dir, cfg)
    except OSError as exc:
        raise RayappError(f"cannot read {output_dir}: {exc}") from None
    print(status_json(output_dir, stages) if as_json else format_status(output_dir, stages))
    return 0


def _check_cluster(args) -> int:
    from rayapp.ops.deploy.checks import check_files

    try:
        errors = check_files(args.files, args.configs, args.head_policy)
    except (OSError, ValueError) as exc:
        raise RayappError(str(exc)) from None
    for e in errors:
        print(e)
    if not errors:
        print(f"ok: {len(args.files)} cluster file(s)" + (f", {len(args.configs)} config(s) placed" if args.configs else ""))
    return 1 if errors else 0


def _rehearse(args) -> int:
    from rayapp.ops.rehearse import RehearsalError, rehearse

    try:
        report = rehearse(args.config, args.overrides, args.cluster, args.workdir, args.until)
    except RehearsalError as exc:
        raise RayappError(str(exc)) from None
    print(f"rehearsal {'passed' if report['ok'] else 'FAILED'}: {report['workdir']}/rehearsal.json")
    return 0 if report["ok"] else 1


def _dispatch(args) -> int:
    if args.command == "compare":
        return _compare(args)
    if args.command == "submit":
        return _submit(args)
    if args.command == "judge-report":
        return _judge_report(args)
    if args.command == "check-cluster":
        return _check_cluster(args)
    if args.command == "rehearse":
        return _rehearse(args)
    if args.command == "status" and args.output_dir:
        return _status(args.output_dir, None, args.json)
    from rayapp.config import dump_config, load_config

    if args.command == "select" and args.trajectories:
        args.overrides = [f"select.trajectories={args.trajectories}",
                          f"select.trajectory_prefix={args.model + '_' if args.model else ''}"] + args.overrides
    if args.command == "select" and args.clusters:
        args.overrides = [f"select.clusters={args.clusters}"] + args.overrides
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command == "plan":
        return _plan(cfg, args.json, getattr(args, "verbose", False))
    if args.command == "status":
        return _status(cfg.output_dir, cfg, args.json)
    from rayapp.pipeline import run_pipeline

    if args.command == "run":
        run_pipeline(cfg, args.until, args.force, args.skip_plan)
    else:
        run_pipeline(cfg, force=args.force, names=[args.command])
    return 0


def main(argv: list[str] | None = None) -> int:
    from rayapp.core import log as logs

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logs.configure(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if not verbose:
        # transformers' and the hub's own progress bars and advisories (loading and writing
        # weights), also in the processes a local Ray cluster starts from this one
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return _dispatch(args)
    except RayappError as exc:  # a problem the user can fix: one line, no traceback
        print(f"rayapp {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rayapp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
