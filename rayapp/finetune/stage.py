"""The finetune stage: the target model trains on what the small model chose (or on the full set /
a random subset, for the paper's comparisons). One work folder per training subset."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.artifacts import artifact_uid, export_complete
from rayapp.common.errors import MissingInputError, RayappError
from rayapp.common.hashing import fingerprint
from rayapp.common.layout import RunLayout
from rayapp.common.log import get_logger
from rayapp.common.manifests import (
    FinetuneManifest,
    PreparedManifest,
    SelectionManifest,
    file_digest,
    read_prepared,
    require_manifest,
    require_match,
    require_same_prepared,
)
from rayapp.common.raycluster import init_ray
from rayapp.common.stages import Stage, StageContext
from rayapp.config import FINETUNE_SUBSETS, RunConfig
from rayapp.models import registry
from rayapp.models.loading import load_tokenizer
from rayapp.train.runner import TRAINING_STATE, TrainJob, run_training

log = get_logger(__name__)



def training_data(layout: RunLayout, prepared: PreparedManifest, subset: str) -> tuple[list[str], int, str, str]:
    """(files, rows, description, content identity) of the rows the target trains on."""
    if subset == "full":
        return (prepared.shard_paths(layout), prepared.rows, f"full prepared set ({prepared.rows} rows)",
                prepared.fingerprint)
    sel: SelectionManifest = require_manifest(layout, "select")  # type: ignore[assignment]
    method = sel.main if subset == "selected" else "random"
    if method not in sel.selections:
        raise MissingInputError(f"no '{method}' selection in {layout.manifest('select')}; add it to select.baselines")
    entry = sel.selections[method]
    require_same_prepared(f"the selection in {layout.selection}", sel.prepared_fingerprint, prepared,
                          "re-run `rayapp score` and `rayapp select` on this data")
    require_match("content hashes", entry.path, file_digest(entry.path), entry.sha256,
                  "the shard changed after the select stage wrote it: re-run `rayapp select`")
    return [entry.path], entry.rows, f"{entry.tag} ({entry.rows} rows)", entry.sha256


def check_same_tokenizer(target: str, prepared_tokenizer: str, trust_remote_code: bool) -> None:
    """The prepared token ids are only valid for the target if it uses the same vocabulary."""
    if target == prepared_tokenizer:
        return
    a = load_tokenizer(target, trust_remote_code=trust_remote_code).get_vocab()
    b = load_tokenizer(prepared_tokenizer).get_vocab()
    if a != b:
        raise RayappError(
            f"the target model {target} uses another tokenizer than the prepared data ({prepared_tokenizer}); "
            "set models.tokenizer to the target's tokenizer and re-run prepare (the paper's pairs share one)"
        )


class FinetuneStage(Stage):
    name = "finetune"
    help = "fine-tune the target model on the selection (Ray Train, FSDP2)"
    manifest_type = FinetuneManifest
    reset_on_force = TRAINING_STATE
    reset_on_change = TRAINING_STATE

    def __init__(self, subset: str = "selected"):
        self.variant = subset

    def fingerprint(self, cfg: RunConfig, layout: RunLayout) -> str:
        prepared = read_prepared(layout)
        _, _, _, data_identity = training_data(layout, prepared, self.variant)
        init_model = registry.model_source(cfg, "target")
        train = cfg.finetune.model_copy(update={"subset": "selected"})  # the subset is the variant
        return fingerprint(prepared=prepared.fingerprint, data=data_identity, init_model=artifact_uid(init_model),
                           train=train)

    def outputs_complete(self, m: FinetuneManifest, layout: RunLayout) -> bool:
        return artifact_uid(m.export) == m.export_uid

    def run(self, ctx: StageContext) -> FinetuneManifest:
        return self.run_many([self], [ctx])[0]

    @classmethod
    def run_many(cls, stages: list["FinetuneStage"], ctxs: list[StageContext]) -> list[FinetuneManifest]:
        """Train the target on each subset, one after the other, on one worker group."""
        cfg, layout, fc = ctxs[0].cfg, ctxs[0].layout, ctxs[0].cfg.finetune
        prepared = read_prepared(layout)
        init_model = registry.model_source(cfg, "target")
        check_same_tokenizer(init_model, prepared.tokenizer, cfg.models.target.trust_remote_code)
        holdout = prepared.holdout
        jobs, described = [], []
        for stage in stages:
            files, rows, what, _ = training_data(layout, prepared, stage.variant)
            described.append((rows, what))
            log.info("(%s) target %s on %s; FSDP %s, %d workers", stage.variant, init_model, what,
                     "on" if fc.fsdp else "off", fc.num_workers)
            jobs.append(TrainJob(label=stage.label, init_model=init_model, tokenizer=prepared.tokenizer,
                                 train_files=files, total_rows=rows, work_dir=storage.local_path(layout.finetune(stage.variant)),
                                 eval_file=holdout.path if holdout and fc.eval_rows else None,
                                 trust_remote_code=cfg.models.target.trust_remote_code))
        init_ray(cfg)
        all_metrics = run_training("finetune", fc, jobs)
        out = []
        for stage, job, (rows, what), metrics in zip(stages, jobs, described, all_metrics):
            export = storage.join(job.work_dir, "exports", "final")
            if not export_complete(export):
                raise RuntimeError(f"finetune: training ended without the export {export}")
            out.append(FinetuneManifest(subset=stage.variant, data=what, rows=rows, init_model=init_model,
                                        export=export, export_uid=artifact_uid(export),
                                        eval_rows=min(fc.eval_rows, holdout.rows) if holdout else 0, metrics=metrics))
        return out

    def summary(self, m: FinetuneManifest, layout: RunLayout) -> list[str]:
        ev = f" (held-out loss {m.eval_loss:.3f} on {m.eval_rows} rows)" if m.eval_loss is not None else ""
        return [f"target on {m.data} -> {m.export}{ev}"]


def subsets_to_train(cfg: RunConfig, evaluating: bool) -> list[str]:
    """``finetune.subset``, plus every other subset ``evaluate.models`` compares when the run goes on
    to evaluate (e.g. selected and full), so `rayapp run` ends with all the models evaluation needs."""
    subsets = [cfg.finetune.subset]
    if evaluating:
        subsets += [m for m in cfg.evaluate.models if m in FINETUNE_SUBSETS]
    return list(dict.fromkeys(subsets))
