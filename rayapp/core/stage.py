"""What a pipeline stage is, and the one runner every stage goes through.

A stage has a name, a fingerprint of what its output is made from (its config section and its
upstream manifests), a ``run`` that returns its typed manifest, and the summary lines it
contributes. ``run_stage`` does the rest for every stage alike: the up-to-date check, ``--force``,
claiming the work folder (clearing what the stage says is stale), timing, and writing the
manifest last. ``rayapp run``, the CLI's stage commands and the Ray job entrypoints all call it.

A stage also owns what consumers ask of it (its folder, placements, memory and disk, status,
tracked files, preflight checks): each is a method or class attribute below with a default, and
`rayapp run`, status, plan, check-cluster and tracking loop over the stages. To add a stage: write
its module with a ``Stage`` subclass and list the class in ``rayapp/pipeline.py``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rayapp.config import RunConfig
from rayapp.core import storage
from rayapp.core.layout import RunLayout, register_stage_folder
from rayapp.core.log import get_logger
from rayapp.core.manifests import MANIFEST_TYPES, StageManifest, read_manifest, write_manifest

if TYPE_CHECKING:
    from rayapp.ops.plan.disk import DiskNeed

FINGERPRINT_FILE = "fingerprint.txt"
# A stage's state while it runs, and after it failed: what `rayapp status` reads (the manifest,
# written last, says it is done).
STATE_FILE = "rayapp_state.json"


_DEFINED: dict[str, type] = {}  # stage name -> its class: a name belongs to one stage


@dataclass(frozen=True)
class StageContext:
    """What a stage's ``run`` gets: the config, where things live, the run's fingerprint, and the
    upstream inputs the fingerprint was made from (``Stage.read_inputs``)."""

    cfg: RunConfig
    layout: RunLayout
    fingerprint: str
    force: bool
    inputs: Any = None


class Stage(ABC):
    name: ClassVar[str]
    help: ClassVar[str]
    manifest_type: ClassVar[type[StageManifest]]
    # Its work folder in the run's output dir (default: its name). With a default variant, one
    # folder per variant inside it (finetune: finetune/<subset>, default 'selected').
    folder: ClassVar[str | None] = None
    default_variant: ClassVar[str | None] = None
    # Entries of the work folder removed before a run: on --force, and when the fingerprint
    # changed (e.g. training checkpoints of other inputs must never be resumed from).
    reset_on_force: ClassVar[tuple[str, ...]] = ()
    reset_on_change: ClassVar[tuple[str, ...]] = ()

    variant: str | None = None  # e.g. the finetune subset; one work folder per variant

    def __init_subclass__(cls, **kwargs):
        """A stage is known by being defined: its folder goes into the layout, its manifest type
        into the manifests' table (``require_manifest``)."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            prev = _DEFINED.setdefault(cls.name, cls)
            if (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
                raise TypeError(f"two stages named {cls.name!r}: {prev.__module__}.{prev.__qualname__} and "
                                f"{cls.__module__}.{cls.__qualname__}")
            _DEFINED[cls.name] = cls
            register_stage_folder(cls.name, cls.folder or cls.name, cls.default_variant)
            MANIFEST_TYPES[cls.name] = cls.manifest_type

    @property
    def label(self) -> str:
        return f"{self.name}{_variant(self)}"

    def work_dir(self, layout: RunLayout) -> str:
        return layout.stage_dir(self.name, self.variant)

    def manifest_uri(self, layout: RunLayout) -> str:
        return layout.manifest(self.name, self.variant)

    def read_inputs(self, cfg: RunConfig, layout: RunLayout) -> Any:
        """Read and check the upstream outputs this run is made from (MissingInputError when one
        is absent), once: the runner hands them to ``fingerprint`` and, as ``ctx.inputs``, to
        ``run``, so the fingerprint describes exactly what the run uses. None: no upstream."""
        return None

    @abstractmethod
    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs: Any = None) -> str:
        """Identity of ``inputs`` (``read_inputs``) and of the settings the output depends on."""

    @abstractmethod
    def run(self, ctx: StageContext) -> StageManifest:
        """Do the work; return the manifest (the runner fills in fingerprint, timing, version)."""

    @classmethod
    def run_many(cls, stages: list["Stage"], ctxs: list[StageContext]) -> list[StageManifest]:
        """Run several variants of this stage in one go (e.g. the target trained on the selection
        and on the full set, by one worker group). By default, one after the other."""
        return [stage.run(ctx) for stage, ctx in zip(stages, ctxs)]

    def outputs_complete(self, manifest: StageManifest, layout: RunLayout) -> bool:
        """Whether the files the manifest names are all still there."""
        return True

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        """What this stage asks Ray for (``core.placement.Placement``), read alike by the Ray
        call, `rayapp plan`, `rayapp check-cluster` and `rayapp rehearse`. None: driver only."""
        return []

    @abstractmethod
    def summary(self, manifest: StageManifest, layout: RunLayout) -> list[str]:
        """Lines for the end-of-run summary."""

    def start_ahead(self, cfg: RunConfig, layout: RunLayout) -> None:
        """Start work that needs only the prepared data in the background (`rayapp run` calls this
        once prepare is done), so it overlaps the stages before this one. Optional."""

    def finish_ahead(self, cfg: RunConfig, layout: RunLayout) -> None:
        """Wait for what ``start_ahead`` began, in the process that began it, and leave its result
        where ``run`` finds it (its cache): `rayapp run` calls this just before the stage's step,
        which may run in a driver process of its own. Optional."""

    @classmethod
    def uses_gpus(cls, cfg: RunConfig) -> bool:
        """Whether the stage's work runs on GPUs (then `rayapp run` checks its memory first)."""
        return any(p is not None and p.gpus for p in cls.placements(cfg))

    @classmethod
    def memory_plans(cls, cfg: RunConfig) -> list:
        """Per-GPU memory of each model the stage loads, at the config's shapes (``plan.check.StagePlan``),
        for `rayapp plan`; [] for a stage that loads none of the config's models."""
        return []

    @classmethod
    def disk_need(cls, cfg: RunConfig, hub_params) -> "DiskNeed | None":
        """Local disk on a node the stage runs on (``plan.disk.DiskNeed``), at the config's model
        sizes; ``hub_params(name)``: a hub model's parameters (0 for others). None: nothing to speak of."""
        return None

    @classmethod
    def own_models(cls, cfg: RunConfig) -> list[str]:
        """Models the stage's workers load by name themselves, beyond those the driver stages for
        every stage (tokenizer, reference, target): `rayapp check-cluster` checks their hub access."""
        return []

    @classmethod
    def preflight(cls, cfg: RunConfig) -> None:
        """Checks that must pass before any stage of the run starts (a missing optional package);
        raise a RayappError naming the fix."""

    # ---- what consumers ask of a stage (rayapp run's plan, the CLI, status, tracking) ----------

    @classmethod
    def instances(cls, cfg: RunConfig, planned: list[str]) -> list["Stage"]:
        """This stage's runs in `rayapp run`'s plan; ``planned``: the names of the stages it runs
        (finetune trains every subset evaluate compares, when evaluate is planned)."""
        return [cls()]

    @classmethod
    def for_command(cls, cfg: RunConfig) -> "Stage":
        """The run its own command (`rayapp <name>`) makes."""
        return cls()

    @classmethod
    def found(cls, layout: RunLayout) -> list["Stage"]:
        """The runs an output dir has (`rayapp status` without a config): one folder per variant."""
        if cls.default_variant is None:
            return [cls()]
        found = storage.list_dirs(storage.join(layout.root, cls.folder or cls.name))
        return [cls(v) for v in found] or [cls(cls.default_variant)]  # type: ignore[call-arg]

    def done_detail(self, manifest: StageManifest) -> dict:
        """A finished run's headline numbers for `rayapp status` (name -> value)."""
        return {}

    def progress(self, layout: RunLayout, started: float | None, now: float) -> "StageProgress | None":
        """How far a running run is, where it records that; None where it does not."""
        return None

    def artifacts(self, manifest: StageManifest, layout: RunLayout) -> list[str]:
        """Files of a finished run worth keeping with the run's tracking (reports, plots)."""
        return []

    def uses_ray(self, cfg: RunConfig) -> bool:
        """Whether ``run`` starts Ray work. Under `rayapp run` such a step gets a driver process of
        its own (``ray.stage_processes``); one that does not runs while the cluster starts."""
        return True


@dataclass
class StageProgress:
    """How far a running stage is: ``done`` of ``total`` ``unit``s, as of ``updated``."""

    done: int
    total: int
    unit: str
    updated: float | None = None
    detail: dict = field(default_factory=dict)  # shown beside the count: epoch, loss, tokens/s


@dataclass
class StageResult:
    stage: Stage
    manifest: StageManifest
    skipped: bool  # up to date: nothing was run
    seconds: float


def claimed_fingerprint(work: str) -> str | None:
    """The fingerprint of the inputs ``work`` was last claimed for (None: never claimed)."""
    try:
        return storage.read_bytes(storage.join(work, FINGERPRINT_FILE)).decode().strip()
    except (FileNotFoundError, OSError):
        return None


def claim_work_dir(work: str, fingerprint: str, force: bool, reset_on_force: tuple[str, ...],
                   reset_on_change: tuple[str, ...]) -> None:
    """Make ``work`` ready for a run with this fingerprint: on --force, or when the work folder
    belongs to other inputs, the stage's stale entries are removed first; otherwise they stay, and
    the stage resumes from them."""
    marker = storage.join(work, FINGERPRINT_FILE)
    claimed = claimed_fingerprint(work)
    changed = claimed is not None and claimed != fingerprint
    stale = set(reset_on_force if force else ()) | set(reset_on_change if (force or changed) else ())
    for entry in sorted(stale):
        storage.remove(storage.join(work, entry))
    storage.write_text(marker, fingerprint)


def _track(cfg: RunConfig, stage: Stage, manifest: StageManifest, layout: RunLayout) -> None:
    from rayapp.core import tracking

    try:
        tracking.log_manifest(cfg, stage.label, manifest.model_dump(mode="json"), stage.artifacts(manifest, layout))
    except Exception as exc:  # tracking is for watching the run; a missing writer was caught at start
        get_logger(f"rayapp.{stage.name}").warning("tracking: %s", exc)


def _failed(exc: BaseException, **known) -> dict:
    return {"state": "failed", **known, "ended": time.time(), "error": f"{type(exc).__name__}: {exc}"[:2000]}


def _write_state(stage: Stage, layout: RunLayout, state: dict) -> None:
    try:
        storage.write_json(storage.join(stage.work_dir(layout), STATE_FILE), state)
    except Exception as exc:  # the marker is for watching a run; never the reason it fails
        get_logger(f"rayapp.{stage.name}").warning("cannot write %s: %s", STATE_FILE, exc)


def run_stage(stage: Stage, cfg: RunConfig, force: bool = False) -> StageResult:
    return run_stages([stage], cfg, force)[0]


def run_stages(stages: list[Stage], cfg: RunConfig, force: bool = False) -> list[StageResult]:
    """Run variants of one stage (all of one type) through the contract; those up to date are
    skipped, the rest run together (``Stage.run_many``) and each gets its manifest."""
    layout = RunLayout(cfg.output_dir)
    t0 = time.perf_counter()
    results: dict[int, StageResult] = {}
    todo: list[tuple[int, Stage, StageContext]] = []
    for i, stage in enumerate(stages):
        slog = get_logger(f"rayapp.{stage.name}")
        try:
            inputs = stage.read_inputs(cfg, layout)  # a missing one fails here
            fp = stage.fingerprint(cfg, layout, inputs)
        except Exception as exc:
            _write_state(stage, layout, _failed(exc))
            raise
        if not force:
            done = read_manifest(stage.manifest_uri(layout), stage.manifest_type)
            if done is not None and done.fingerprint == fp and stage.outputs_complete(done, layout):
                slog.info("up to date%s (%s)", _variant(stage), stage.work_dir(layout))
                results[i] = StageResult(stage, done, skipped=True, seconds=time.perf_counter() - t0)
                continue
        claim_work_dir(stage.work_dir(layout), fp, force, stage.reset_on_force, stage.reset_on_change)
        todo.append((i, stage, StageContext(cfg, layout, fp, force, inputs)))
    if todo:
        started = time.time()
        for _, stage, ctx in todo:
            _write_state(stage, ctx.layout, {"state": "running", "started": started, "fingerprint": ctx.fingerprint})
        try:
            manifests = type(todo[0][1]).run_many([s for _, s, _ in todo], [c for _, _, c in todo])
        except BaseException as exc:  # also a stop (KeyboardInterrupt, SystemExit): it did not finish
            for _, stage, ctx in todo:
                _write_state(stage, ctx.layout, _failed(exc, started=started, fingerprint=ctx.fingerprint))
            raise
        seconds = time.perf_counter() - t0
        for (i, stage, ctx), manifest in zip(todo, manifests):
            manifest.fingerprint = ctx.fingerprint
            manifest.config_digest = cfg.digest()
            manifest.seconds = round(seconds, 2)
            write_manifest(stage.manifest_uri(layout), manifest)  # last: the stage counts as done from here on
            _write_state(stage, layout, {"state": "done", "started": started, "ended": time.time(),
                                         "fingerprint": ctx.fingerprint})
            _track(cfg, stage, manifest, layout)
            get_logger(f"rayapp.{stage.name}").info("done%s in %.1fs", _variant(stage), seconds)
            results[i] = StageResult(stage, manifest, skipped=False, seconds=seconds)
    return [results[i] for i in range(len(stages))]


def _variant(stage: Stage) -> str:
    return f" ({stage.variant})" if stage.variant else ""
