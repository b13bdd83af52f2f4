"""The reference stage: train the small model on the full prepared set; epoch-0 is the untouched model."""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.config import RunConfig
from rayapp.core import storage, tracking
from rayapp.core.artifacts import artifact_uid, export_complete
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.manifests import CheckpointRecord, PreparedManifest, ReferenceManifest, read_prepared
from rayapp.core.raycluster import init_ray
from rayapp.core.stage import Stage, StageContext
from rayapp.ml.models import registry
from rayapp.ml.train.layout import TRAINING_STATE, TrainingLayout, training_detail, training_progress
from rayapp.ml.train.runner import TrainJob, run_training


@dataclass(frozen=True)
class ReferenceInputs:
    prepared: PreparedManifest
    init_model: str  # the model it starts from, staged (ml/models/registry.py)


class ReferenceStage(Stage):
    name = "reference"

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement

        return [placement.training(cls.name, cfg.reference)]
    help = "fine-tune the small reference model, checkpoint every epoch"

    @classmethod
    def uses_gpus(cls, cfg: RunConfig) -> bool:
        return cfg.reference.use_gpu  # also in local mode, where the driver trains

    @classmethod
    def disk_need(cls, cfg: RunConfig, hub_params):
        from rayapp.ml.train.policy import epoch_end_saves
        from rayapp.ops.plan.disk import FULL_CHECKPOINT_BYTES_PER_PARAM, GB, HUB_BYTES_PER_PARAM, DiskNeed

        ref = cfg.models.reference.name_or_path
        p_ref = hub_params(ref)
        ckpt, init = FULL_CHECKPOINT_BYTES_PER_PARAM * p_ref, HUB_BYTES_PER_PARAM * p_ref
        return DiskNeed(cls.name, kept=init, staged=ckpt, checkpoint=ckpt, saves=epoch_end_saves(cfg.reference.epochs),
                        parts=[f"the staged {ref} ({init / GB:.0f} GB)",
                               f"one staged checkpoint ({ckpt / GB:.0f} GB: fp32 weights and AdamW moments)"])

    @classmethod
    def memory_plans(cls, cfg: RunConfig) -> list:
        from rayapp.ops.plan.check import plan_training, role_shape

        return [plan_training(cfg, cls.name, cfg.reference, role_shape(cfg, "reference"))]
    manifest_type = ReferenceManifest
    reset_on_force = TRAINING_STATE
    reset_on_change = TRAINING_STATE

    def read_inputs(self, cfg: RunConfig, layout: RunLayout) -> ReferenceInputs:
        return ReferenceInputs(read_prepared(layout), registry.model_source(cfg, "reference"))

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs: ReferenceInputs) -> str:
        return fingerprint(prepared=inputs.prepared.fingerprint, init_model=artifact_uid(inputs.init_model),
                           train=cfg.reference.content())

    def outputs_complete(self, m: ReferenceManifest, layout: RunLayout) -> bool:
        return all(artifact_uid(c.path) == c.uid for c in m.checkpoints[1:])

    def run(self, ctx: StageContext) -> ReferenceManifest:
        cfg, layout = ctx.cfg, ctx.layout
        prepared, init_model = ctx.inputs.prepared, ctx.inputs.init_model
        work = storage.local_path(layout.reference)
        init_ray(cfg)
        job = TrainJob(label="reference", init_model=init_model, tokenizer=prepared.tokenizer,
                       train_files=prepared.shard_paths(layout), total_rows=prepared.rows, work_dir=work,
                       export_every_epoch=True, eval_file=prepared.holdout.path if prepared.holdout else None,
                       trust_remote_code=cfg.models.reference.trust_remote_code)
        from rayapp.ops.plan.check import planned_training

        [metrics] = run_training("reference", planned_training(cfg, self.name, cfg.reference, "reference"), [job],
                                 tracking=tracking.target(cfg), stall_s=cfg.ray.stall_timeout_s)
        exports = [TrainingLayout(work).epoch_export(e) for e in range(1, cfg.reference.epochs + 1)]
        missing = [p for p in exports if not export_complete(p)]
        if missing:
            raise RuntimeError(f"reference: training ended without the exports {missing}")
        paths = [init_model, *exports]
        return ReferenceManifest(
            prepared_fingerprint=prepared.fingerprint, init_model=init_model, epochs=cfg.reference.epochs,
            checkpoints=[CheckpointRecord(name=f"epoch-{e}", path=p, uid=artifact_uid(p)) for e, p in enumerate(paths)],
            metrics=metrics,
        )

    def done_detail(self, m: ReferenceManifest) -> dict:
        return training_detail(m.metrics)

    def progress(self, layout: RunLayout, started: float | None, now: float):
        return training_progress(self.work_dir(layout))

    def summary(self, m: ReferenceManifest, layout: RunLayout) -> list[str]:
        loss = m.metrics.get("last_loss")
        ev = m.metrics.get("eval_loss")
        return [f"{m.epochs} epochs, checkpoints epoch-0..{m.epochs}"
                + (f", final train loss {loss:.3f}" if isinstance(loss, float) else "")
                + (f", held-out loss {ev:.3f}" if isinstance(ev, float) else "")]
