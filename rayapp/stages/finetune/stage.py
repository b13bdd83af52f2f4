"""The finetune stage: the target model trains on what the small model chose, or on any other
selection (clust_rand, a global baseline, a selection file) or the full set, for the paper's
comparisons. One work folder per training subset."""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.config import RunConfig, is_finetune_subset, subset_folder
from rayapp.core import storage, tracking
from rayapp.core.artifacts import artifact_uid, export_complete
from rayapp.core.errors import MissingInputError, RayappError
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import (
    FinetuneManifest,
    PreparedManifest,
    SelectionManifest,
    SelectionRecord,
    file_digest,
    read_prepared,
    require_manifest,
    require_match,
    require_same_prepared,
)
from rayapp.core.raycluster import init_ray
from rayapp.core.stage import Stage, StageContext
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_tokenizer, same_tokenizer
from rayapp.ml.train.layout import TRAINING_STATE, TrainingLayout, training_detail, training_progress
from rayapp.ml.train.runner import TrainJob, run_training

log = get_logger(__name__)



def _selection_entry(layout: RunLayout, prepared: PreparedManifest, subset: str) -> SelectionRecord:
    """The select stage's selection a subset names: 'selected' (the main method), a key such as
    clust_rand or ppl_high:global, or a tag such as clust_rand-low-5pct."""
    sel: SelectionManifest = require_manifest(layout, "select")  # type: ignore[assignment]
    key = sel.main if subset == "selected" else subset
    entry = sel.selections.get(key) or next((e for e in sel.selections.values() if e.tag == subset), None)
    if entry is None:
        have = ", ".join(f"{k} ({e.tag})" for k, e in sel.selections.items())
        raise MissingInputError(f"no '{subset}' selection in {layout.manifest('select')} (it has: {have}); "
                                "add it to select.baselines and re-run `rayapp select`")
    require_same_prepared(f"the selection in {layout.selection}", sel.prepared_fingerprint, prepared,
                          "re-run `rayapp score` and `rayapp select` on this data")
    require_match("content hashes", entry.path, file_digest(entry.path), entry.sha256,
                  "the shard changed after the select stage wrote it: re-run `rayapp select`")
    return entry


def _rows_of_file(layout: RunLayout, prepared: PreparedManifest, path: str, out: str) -> int:
    """The prepared training rows a selection file names by id, written to ``out`` in the file's
    order. An id that is not a prepared training row (a typo, another dataset, a held-out row) is
    an error naming the file and row: nothing is trained on silently less than was asked."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chosen = storage.read_parquet(path)
    if "id" not in chosen.column_names:
        raise RayappError(f"{path}: a selection file needs an 'id' column (has: {', '.join(chosen.column_names)})")
    ids = [str(i) for i in chosen["id"].to_pylist()]
    seen: dict[str, int] = {}
    for row, rid in enumerate(ids):
        if rid in seen:
            raise RayappError(f"{path}: row {row}: field 'id': {rid!r} repeats row {seen[rid]}")
        seen[rid] = row
    table = storage.read_parquet_dir(layout.prepared)
    rows = table.filter(pc.is_in(table["id"], value_set=pa.array(ids, pa.string())))
    have = set(rows["id"].to_pylist())
    missing = [(r, i) for r, i in enumerate(ids) if i not in have]
    if missing:
        row, rid = missing[0]
        held = " (a held-out row: those are never trained on)" if prepared.holdout and rid in set(
            storage.read_parquet(prepared.holdout.path)["id"].to_pylist()) else ""
        raise RayappError(f"{path}: row {row}: field 'id': {rid!r} is not a prepared training row{held}; "
                          f"{len(missing)} of {len(ids)} ids are not")
    rows = rows.take(pa.array(sorted(range(rows.num_rows), key=lambda j: seen[rows["id"][j].as_py()])))
    storage.write_parquet(out, rows)
    return rows.num_rows


def training_data(layout: RunLayout, prepared: PreparedManifest, subset: str,
                  write: bool = False) -> tuple[list[str], int, str, str]:
    """(files, rows, description, content identity) of the rows the target trains on. A selection
    file's rows are joined with the prepared data when ``write`` (in the subset's work folder)."""
    if subset == "full":
        return (prepared.shard_paths(layout), prepared.rows, f"full prepared set ({prepared.rows} rows)",
                prepared.fingerprint)
    if subset.endswith(".parquet"):
        if not storage.exists(subset):
            raise MissingInputError(f"finetune.subset: selection file not found: {subset}")
        digest = file_digest(subset)
        out = storage.join(layout.finetune(subset_folder(subset)), "data", "selected.parquet")
        if write:
            rows = _rows_of_file(layout, prepared, subset, out)
        else:
            rows = storage.read_parquet(subset).num_rows
        return [out], rows, f"{subset} ({rows} rows)", fingerprint(file=digest, prepared=prepared.fingerprint)
    entry = _selection_entry(layout, prepared, subset)
    return [entry.path], entry.rows, f"{entry.tag} ({entry.rows} rows)", entry.sha256


@dataclass(frozen=True)
class FinetuneInputs:
    prepared: PreparedManifest
    init_model: str  # the target it starts from, staged (ml/models/registry.py)
    files: list[str]  # the rows it trains on (training_data)
    rows: int
    data: str  # what they are, in words
    data_identity: str  # their content identity


class FinetuneStage(Stage):
    name = "finetune"
    default_variant = "selected"  # one folder per training subset: finetune/<subset>
    help = "fine-tune the target model on the selection (Ray Train, FSDP2)"
    manifest_type = FinetuneManifest
    reset_on_force = TRAINING_STATE
    reset_on_change = TRAINING_STATE

    def __init__(self, subset: str = "selected"):
        self.subset = subset
        self.variant = subset_folder(subset)

    @classmethod
    def instances(cls, cfg: RunConfig, planned: list[str]) -> list[Stage]:
        return [cls(s) for s in subsets_to_train(cfg, evaluating="evaluate" in planned)]

    @classmethod
    def for_command(cls, cfg: RunConfig) -> Stage:
        return cls(cfg.finetune.subset)

    @classmethod
    def uses_gpus(cls, cfg: RunConfig) -> bool:
        return cfg.finetune.use_gpu

    @classmethod
    def disk_need(cls, cfg: RunConfig, hub_params):
        from rayapp.ml.train.policy import epoch_end_saves
        from rayapp.ops.plan.disk import (
            FULL_CHECKPOINT_BYTES_PER_PARAM,
            GB,
            HUB_BYTES_PER_PARAM,
            LORA_CHECKPOINT_BYTES_PER_PARAM,
            DiskNeed,
        )

        target = cfg.models.target.name_or_path
        p_target = hub_params(target)
        lora = cfg.finetune.lora is not None
        ckpt = (LORA_CHECKPOINT_BYTES_PER_PARAM if lora else FULL_CHECKPOINT_BYTES_PER_PARAM) * p_target
        init = HUB_BYTES_PER_PARAM * p_target
        return DiskNeed(cls.name, kept=init, staged=ckpt, checkpoint=ckpt,
                        saves=epoch_end_saves(cfg.finetune.epochs) * len(subsets_to_train(cfg, evaluating=True)),
                        parts=[f"the staged {target} ({init / GB:.0f} GB)",
                               f"one staged checkpoint ({ckpt / GB:.0f} GB"
                               + (": bf16 base and adapters)" if lora else ": fp32 weights and AdamW moments)")])

    @classmethod
    def memory_plans(cls, cfg: RunConfig) -> list:
        from rayapp.ops.plan.check import plan_training, role_shape

        return [plan_training(cfg, cls.name, cfg.finetune, role_shape(cfg, "target"))]

    @classmethod
    def preflight(cls, cfg: RunConfig) -> None:
        if cfg.finetune.lora is not None:
            from rayapp.ml.train.lora import require_peft

            require_peft()

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement

        return [placement.training(cls.name, cfg.finetune)]

    def read_inputs(self, cfg: RunConfig, layout: RunLayout) -> FinetuneInputs:
        prepared = read_prepared(layout)
        return FinetuneInputs(prepared, registry.model_source(cfg, "target"),
                              *training_data(layout, prepared, self.subset))

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs: FinetuneInputs) -> str:
        train = cfg.finetune.model_copy(update={"subset": "selected"}).content()  # the subset is the variant
        return fingerprint(prepared=inputs.prepared.fingerprint, data=inputs.data_identity,
                           init_model=artifact_uid(inputs.init_model), train=train)

    def outputs_complete(self, m: FinetuneManifest, layout: RunLayout) -> bool:
        return artifact_uid(m.export) == m.export_uid

    def run(self, ctx: StageContext) -> FinetuneManifest:
        return self.run_many([self], [ctx])[0]

    @classmethod
    def run_many(cls, stages: list["FinetuneStage"], ctxs: list[StageContext]) -> list[FinetuneManifest]:
        """Train the target on each subset, one after the other, on one worker group."""
        cfg, layout, fc = ctxs[0].cfg, ctxs[0].layout, ctxs[0].cfg.finetune
        prepared, init_model = ctxs[0].inputs.prepared, ctxs[0].inputs.init_model
        trc = cfg.models.target.trust_remote_code
        # a target of another family: the rows in its own tokens (stages/finetune/retokenize.py)
        own_tokens = not same_tokenizer(init_model, prepared.tokenizer, trc)
        tokenizer = init_model if own_tokens else prepared.tokenizer
        holdout = prepared.holdout
        eval_file = holdout.path if holdout and fc.eval_rows else None
        if own_tokens:
            from rayapp.stages.finetune.retokenize import retokenize_files

            target_tok = load_tokenizer(init_model, trust_remote_code=trc)
            log.info("the target %s has another tokenizer than the selector's (%s): its rows are tokenized again "
                     "with its own (%d tokens)", init_model, prepared.tokenizer, len(target_tok))
        jobs, described, retokenized = [], [], []
        for stage, ctx in zip(stages, ctxs):
            files, rows, what = ctx.inputs.files, ctx.inputs.rows, ctx.inputs.data
            if stage.subset.endswith(".parquet"):  # a selection file: its rows joined with the prepared data
                files, rows, what, _ = training_data(layout, prepared, stage.subset, write=True)
            counts, job_eval = None, eval_file
            if own_tokens:
                data_dir = storage.join(layout.finetune(stage.variant), "data")
                if eval_file:
                    job_eval = storage.join(data_dir, "holdout-target-tokens.parquet")
                    held = retokenize_files([eval_file], job_eval, storage.join(data_dir, "holdout-target-rejects.jsonl"),
                                            target_tok, cfg.data)
                    log.info("(%s) held-out rows in the target's tokens: %d of %d", stage.subset, held["rows"],
                             held["rows_in"])
                out = storage.join(data_dir, "target-tokens.parquet")
                counts = retokenize_files(files, out, storage.join(data_dir, "target-rejects.jsonl"), target_tok,
                                          cfg.data)
                files, rows = [out], counts["rows"]
                left = counts["rows_in"] - counts["rows"]
                what += (f"; {rows} in the target's tokens" + (f", {left} left out (see {data_dir}/"
                                                                "target-rejects.jsonl)" if left else ""))
                log.info("(%s) %s", stage.subset, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            retokenized.append(dict(counts, tokenizer=init_model) if counts is not None else None)
            described.append((rows, what))
            log.info("(%s) target %s on %s; FSDP %s, %d workers%s", stage.subset, init_model, what,
                     "on" if fc.fsdp else "off", fc.num_workers,
                     f"; LoRA r={fc.lora.r} ({fc.lora.export} export)" if fc.lora else "")
            jobs.append(TrainJob(label=stage.label, init_model=init_model, tokenizer=tokenizer,
                                 train_files=files, total_rows=rows, work_dir=storage.local_path(layout.finetune(stage.variant)),
                                 eval_file=job_eval, trust_remote_code=trc))
        init_ray(cfg)
        from rayapp.ops.plan.check import planned_training

        all_metrics = run_training("finetune", planned_training(cfg, cls.name, fc, "target"), jobs,
                                   tracking=tracking.target(cfg), stall_s=cfg.ray.stall_timeout_s)
        out = []
        for stage, job, (rows, what), metrics, counts in zip(stages, jobs, described, all_metrics, retokenized):
            export = TrainingLayout(job.work_dir).final_export
            if not export_complete(export):
                raise RuntimeError(f"finetune: training ended without the export {export}")
            out.append(FinetuneManifest(subset=stage.subset, data=what, rows=rows, init_model=init_model,
                                        export=export, export_uid=artifact_uid(export),
                                        eval_rows=min(fc.eval_rows, holdout.rows) if holdout else 0, metrics=metrics,
                                        retokenized=counts))
        return out

    def done_detail(self, m: FinetuneManifest) -> dict:
        return training_detail(m.metrics)

    def progress(self, layout: RunLayout, started: float | None, now: float):
        return training_progress(self.work_dir(layout))

    def summary(self, m: FinetuneManifest, layout: RunLayout) -> list[str]:
        ev = f" (held-out loss {m.eval_loss:.3f} on {m.eval_rows} rows)" if m.eval_loss is not None else ""
        return [f"target on {m.data} -> {m.export}{ev}"]


def subsets_to_train(cfg: RunConfig, evaluating: bool) -> list[str]:
    """``finetune.subset``, plus every other subset ``evaluate.models`` compares when the run goes on
    to evaluate (e.g. selected and full), so `rayapp run` ends with all the models evaluation needs."""
    subsets = [cfg.finetune.subset]
    if evaluating:
        subsets += [m for m in cfg.evaluate.models if is_finetune_subset(m)]
    return list(dict.fromkeys(subsets))
