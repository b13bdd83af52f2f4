"""The pipeline: its stages in order, the plan `rayapp run` follows, and the one loop that runs it.

    prepare -> reference -> score -> select -> finetune (one run per compared subset) -> evaluate

To add a stage, write its module (a ``Stage`` subclass: ``core/stage.py`` says what it declares)
and list its class in ``STAGE_TYPES`` below. `rayapp run`, its own command, `rayapp status`, `rayapp
plan`, `rayapp check-cluster`, tracking and the summary all loop over this list.
"""

from __future__ import annotations

import time

from rayapp.config import RunConfig
from rayapp.core.raycluster import init_ray
from rayapp.core.stage import Stage, StageResult, run_stage, run_stages
from rayapp.stages.evaluate.stage import EvaluateStage
from rayapp.stages.finetune.stage import FinetuneStage
from rayapp.stages.prepare.stage import PrepareStage
from rayapp.stages.reference.stage import ReferenceStage
from rayapp.stages.score.stage import ScoreStage
from rayapp.stages.select.stage import SelectStage

# The pipeline's stages in order, by name: the one list a new stage is added to.
STAGE_TYPES: dict[str, type[Stage]] = {
    s.name: s for s in (PrepareStage, ReferenceStage, ScoreStage, SelectStage, FinetuneStage, EvaluateStage)
}


def stage(name: str, cfg: RunConfig) -> Stage:
    """One stage as its own CLI command runs it (finetune trains ``finetune.subset``)."""
    return STAGE_TYPES[name].for_command(cfg)


def plan(cfg: RunConfig, until: str | None = None) -> list[Stage]:
    """The stages `rayapp run` runs, in order, each as many times as it has runs
    (``Stage.instances``: finetune once per subset evaluation compares)."""
    names = list(STAGE_TYPES)
    names = names if until is None else names[: names.index(until) + 1]
    return [s for name in names for s in STAGE_TYPES[name].instances(cfg, names)]


def steps(stages: list[Stage]) -> list[list[Stage]]:
    """The plan in steps: consecutive runs of one stage (the finetune subsets) form one step, which
    the stage runs together (``Stage.run_many``: one worker group); every other stage is a step of
    its own."""
    out: list[list[Stage]] = []
    for s in stages:
        if out and type(out[-1][-1]) is type(s):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def placements(cfg: RunConfig) -> list:
    """Every placement a run's stages ask Ray for, in pipeline order (``Stage.placements``): what
    `rayapp check-cluster` and `rayapp rehearse` check against the node types."""
    return [p for stage_type in STAGE_TYPES.values() for p in stage_type.placements(cfg) if p is not None]


def memory_plans(cfg: RunConfig) -> list:
    """Every model-loading stage's per-GPU memory at the config's shapes (`rayapp plan`)."""
    from rayapp.ops.plan.check import plan_config

    return plan_config(cfg, STAGE_TYPES.values())


def preflight(cfg: RunConfig, stages: list[Stage], check_fit: bool = True) -> None:
    """What must hold before any stage starts: each stage's own checks (``Stage.preflight``:
    missing optional packages), a reachable tracking backend, and with ``check_fit`` that every
    stage fits its GPUs (what `rayapp plan` says; CPU-only configs have nothing to check)."""
    from rayapp.core import tracking

    for stage_type in dict.fromkeys(type(s) for s in stages):
        stage_type.preflight(cfg)
    tracking.check_available(cfg)
    if check_fit:
        from rayapp.ops.plan.check import check_fits

        check_fits(cfg, list(dict.fromkeys(type(s) for s in stages)))


def run_pipeline(cfg: RunConfig, until: str | None = None, force: bool = False, skip_plan: bool = False,
                 names: list[str] | None = None, out=None) -> list[StageResult]:
    """`rayapp run` (``names`` None: the whole plan up to ``until``) or one stage's own command
    (``names``: that stage): preflight, tracking, the steps (prepare beside Ray's start-up, work
    started ahead), and the summary. The CLI, the Ray job entrypoints, tests and benchmarks all
    call this."""
    from rayapp.core import tracking
    from rayapp.core.summary import print_summary

    stages = plan(cfg, until) if names is None else [stage(n, cfg) for n in names]
    preflight(cfg, stages, check_fit=names is None and not skip_plan)
    tracking.start(cfg)
    t0 = time.perf_counter()
    try:
        results = run_steps(stages, cfg, force, start_ahead=names is None)
    except BaseException:
        tracking.finish(cfg, ok=False)
        raise
    tracking.finish(cfg, ok=True)
    print_summary(cfg, results, time.perf_counter() - t0, out=out)
    return results


def run_steps(stages: list[Stage], cfg: RunConfig, force: bool = False, start_ahead: bool = True) -> list[StageResult]:
    """Run a plan step by step (``steps``). Steps that use Ray run in a driver process of their own
    (``core.isolation``) as ``ray.stage_processes`` says: under ``auto``, every step after one that
    lost a worker or a node, so that what the loss left behind in a driver cannot stall the next
    stage. With ``start_ahead``, work that needs only the prepared data starts once prepare is done
    (``Stage.start_ahead``), in this process, which outlives the steps."""
    from rayapp.core import isolation
    from rayapp.core.layout import RunLayout
    from rayapp.core.log import get_logger
    from rayapp.core.raycluster import step_back_into

    log = get_logger("rayapp.run")
    isolation.remember_run_dir()
    plan_steps = steps(stages)
    mode = cfg.ray.stage_processes if len(plan_steps) > 1 else "never"
    isolate = mode == "always"
    layout = RunLayout(cfg.output_dir)
    results: list[StageResult] = []
    for i, group in enumerate(plan_steps, start=1):
        if len(plan_steps) > 1:
            log.info("(%d/%d) %s", i, len(plan_steps), ", ".join(s.label for s in group))
        first = group[0]
        for s in group:
            s.finish_ahead(cfg, layout)
        watch = None
        if not first.uses_ray(cfg) and len(plan_steps) > 1:
            results += _while_ray_starts(group, cfg, force, isolate)
        elif isolate:
            _ray_for_steps(cfg)
            results += isolation.run_step(group, cfg, force)
        else:
            if mode == "auto":
                init_ray(cfg)
                watch = isolation.LossWatch()
            results += run_stages(group, cfg, force)
        step_back_into(isolation.run_dir())  # inside a Ray job, the run's folder may have been unpacked again
        if watch is not None and i < len(plan_steps):
            lost = watch.losses()
            if lost:
                log.warning("%s lost %s; each later step runs in a driver process of its own",
                            ", ".join(s.label for s in group), "; ".join(lost[:5]) + (
                                f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""))
                isolate = True
        if start_ahead and not force and first.name == "prepare":
            for later in stages:  # in the background, while the next stages run
                later.start_ahead(cfg, layout)
    return results


def _ray_for_steps(cfg: RunConfig) -> None:
    """Ray up in this process (it starts a local cluster, or joins the configured one, and owns the
    work started ahead), and the forkserver the step processes come from."""
    from rayapp.core import isolation

    init_ray(cfg)
    isolation.start_forkserver()


def _while_ray_starts(group: list[Stage], cfg: RunConfig, force: bool, isolate: bool) -> list[StageResult]:
    """A step that needs no Ray (prepare without data.workers), while every later one does: start
    the cluster (its processes take seconds to come up), and the step processes' forkserver, while
    this process reads and tokenizes the data in a thread."""
    from concurrent.futures import ThreadPoolExecutor

    from rayapp.core.raycluster import existing_cluster_address

    up = (lambda: _ray_for_steps(cfg)) if isolate else (lambda: init_ray(cfg))
    # Joining a running cluster takes no time worth hiding, and inside a Ray job ray.init can
    # unpack the job's working_dir again under the driver (see raycluster._init_ray): a thread
    # reading or importing meanwhile finds no current directory. So: Ray first, then the step.
    if existing_cluster_address(cfg):
        up()
        return run_stages(group, cfg, force)
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(run_stages, group, cfg, force)
        up()  # in the main thread, as Ray wants
        return done.result()


def run(name: str, cfg: RunConfig, force: bool = False) -> StageResult:
    """Run one stage through the runner (up-to-date check, --force, manifest)."""
    return run_stage(stage(name, cfg), cfg, force=force)
