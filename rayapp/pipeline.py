"""The pipeline: its stages in order, and the plan `rayapp run` follows.

    prepare -> reference -> score -> select -> finetune (one run per compared subset) -> evaluate
"""

from __future__ import annotations

from rayapp.common.stages import Stage, StageResult, run_stage, run_stages
from rayapp.config import RunConfig
from rayapp.evaluate.stage import EvaluateStage
from rayapp.finetune.stage import FinetuneStage, subsets_to_train
from rayapp.prepare.stage import PrepareStage
from rayapp.reference.stage import ReferenceStage
from rayapp.score.stage import ScoreStage
from rayapp.select.stage import SelectStage

STAGE_TYPES: dict[str, type[Stage]] = {
    s.name: s for s in (PrepareStage, ReferenceStage, ScoreStage, SelectStage, FinetuneStage, EvaluateStage)
}
STAGES: list[str] = list(STAGE_TYPES)


def stage(name: str, cfg: RunConfig) -> Stage:
    """One stage as its own CLI command runs it (finetune trains ``finetune.subset``)."""
    if name == "finetune":
        return FinetuneStage(cfg.finetune.subset)
    return STAGE_TYPES[name]()


def plan(cfg: RunConfig, until: str | None = None) -> list[Stage]:
    """The stages `rayapp run` runs, in order; finetune once per subset evaluation compares."""
    names = STAGES if until is None else STAGES[: STAGES.index(until) + 1]
    out: list[Stage] = []
    for name in names:
        if name == "finetune":
            out += [FinetuneStage(s) for s in subsets_to_train(cfg, evaluating="evaluate" in names)]
        else:
            out.append(STAGE_TYPES[name]())
    return out


def steps(stages: list[Stage]) -> list[list[Stage]]:
    """The plan in steps: the finetune runs (one per compared subset) form one step, trained by one
    worker group; every other stage is a step of its own."""
    out: list[list[Stage]] = []
    for s in stages:
        if out and s.name == "finetune" and out[-1][-1].name == "finetune":
            out[-1].append(s)
        else:
            out.append([s])
    return out


def run_together(group: list[Stage], cfg: RunConfig, force: bool = False) -> list[StageResult]:
    """Run one step of the plan: a single stage, or the finetune variants together (one worker
    group trains them one after the other: its processes, imports and process group start once)."""
    return run_stages(group, cfg, force=force)


def prepare_while_ray_starts(group: list[Stage], cfg: RunConfig, force: bool = False) -> list[StageResult]:
    """Prepare needs no Ray, and every later stage does: start the cluster (its processes take
    seconds to come up) while the driver reads and tokenizes the data in a thread."""
    from concurrent.futures import ThreadPoolExecutor

    from rayapp.common.raycluster import existing_cluster_address, init_ray

    # Joining a running cluster takes no time worth hiding, and inside a Ray job ray.init can
    # unpack the job's working_dir again under the driver (see raycluster._init_ray): a thread
    # reading or importing meanwhile finds no current directory. So: Ray first, then prepare.
    # Prepare on Ray (data.workers) needs the cluster first anyway.
    if cfg.data.workers or existing_cluster_address(cfg):
        init_ray(cfg)
        return run_stages(group, cfg, force)
    with ThreadPoolExecutor(1) as pool:
        prepared = pool.submit(run_stages, group, cfg, force)
        init_ray(cfg)  # in the main thread, as Ray wants
        return prepared.result()


def run(name: str, cfg: RunConfig, force: bool = False) -> StageResult:
    """Run one stage through the runner (up-to-date check, --force, manifest)."""
    return run_stage(stage(name, cfg), cfg, force=force)
