"""The score stage: every reference checkpoint over the full prepared set -> trajectories."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from rayapp.config import RunConfig
from rayapp.core import storage
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import (
    CheckpointRecord,
    PreparedManifest,
    ReferenceManifest,
    ScoresManifest,
    file_digest,
    read_manifest,
    read_prepared,
    reference_checkpoints,
    require_match,
)
from rayapp.core.raycluster import init_ray
from rayapp.core.stage import Stage, StageContext, StageProgress
from rayapp.ml.models.loading import check_same_tokenizer, load_tokenizer
from rayapp.stages.score.engine import score_checkpoints
from rayapp.stages.score.trajectories import build_trajectories

log = get_logger(__name__)


def special_ids(tokenizer) -> tuple[int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(bos), int(pad)


def _target_checkpoint(cfg: RunConfig) -> CheckpointRecord:
    from rayapp.core.artifacts import artifact_uid
    from rayapp.ml.models import registry

    path = registry.model_source(cfg, "target")
    return CheckpointRecord(name="target-init", path=path, uid=artifact_uid(path))


def _with_target_ifd_scores(cfg: RunConfig, layout: RunLayout, prepared, target: CheckpointRecord, traj, bos: int,
                            pad: int, prefix):
    """The untrained target's prompted and response-only NLLs as ``ifd_nll0`` / ``ifd_ro_nll0``
    (the IFD baselines then use them): one scoring pass of the target model, resumable like the rest."""
    import numpy as np

    check_same_tokenizer(target.path, prepared.tokenizer, cfg.models.target.trust_remote_code)
    out_dir = layout.scores("target")
    log.info("IFD from the untrained target (%s): scoring it too", target.path)
    score_checkpoints(layout.prepared, prepared, [target], out_dir,
                      cfg.score.model_copy(update={"modes": ["prompted", "response_only"]}), bos, pad,
                      trust_remote_code=cfg.models.target.trust_remote_code, prefix_ids=prefix,
                      stall_s=cfg.ray.stall_timeout_s)
    t = build_trajectories(out_dir, [target.name])
    order = {rid: i for i, rid in enumerate(t["id"].to_pylist())}
    take = np.asarray([order[rid] for rid in traj["id"].to_pylist()])
    traj = traj.append_column("ifd_nll0", pa.array(np.asarray(t["nll0"])[take]))
    return traj.append_column("ifd_ro_nll0", pa.array(np.asarray(t["ro_nll0"])[take]))


@dataclass(frozen=True)
class ScoreInputs:
    prepared: PreparedManifest
    checkpoints: list[CheckpointRecord]  # the reference's, as they are now (uids from their markers)
    target: CheckpointRecord | None  # the untrained target, when IFD is scored with it


class ScoreStage(Stage):
    name = "score"
    folder = "scores"

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement

        return [placement.scoring(cfg)]

    @classmethod
    def uses_gpus(cls, cfg: RunConfig) -> bool:
        return bool(cfg.score.resources.num_gpus)

    @classmethod
    def disk_need(cls, cfg: RunConfig, hub_params):
        """P0 (the staged reference) and P1..P{epochs} (the reference's epoch exports)."""
        from rayapp.ops.plan.disk import EXPORT_BYTES_PER_PARAM, GB, DiskNeed

        n = 1 + cfg.reference.epochs
        scored = n * EXPORT_BYTES_PER_PARAM * hub_params(cfg.models.reference.name_or_path)
        return DiskNeed(cls.name, kept=scored, parts=[f"{n} reference checkpoints ({scored / GB:.0f} GB)"])

    @classmethod
    def memory_plans(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement
        from rayapp.ops.plan.check import plan_scoring, role_shape

        return [plan_scoring(cfg, cls.name, cfg.score, placement.actor_pool(cls.name, cfg.score.resources),
                             role_shape(cfg, "reference"))]
    help = "per-sample response losses for every checkpoint (Ray Data actor pool)"
    manifest_type = ScoresManifest
    # committed (checkpoint, shard) units resume a cut-off run; --force scores everything again
    reset_on_force = ("reference", "target", "trajectories.parquet")

    def read_inputs(self, cfg: RunConfig, layout: RunLayout) -> ScoreInputs:
        prepared = read_prepared(layout)
        return ScoreInputs(prepared, reference_checkpoints(layout, prepared),
                           _target_checkpoint(cfg) if cfg.score.ifd_model == "target" else None)

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs: ScoreInputs) -> str:
        # what the scores depend on; batch sizes and resources do not change them
        # (the backend only where it is not the default: earlier runs' fingerprints stay valid)
        backend = {} if cfg.score.backend == "torch" else {"backend": cfg.score.backend}
        if cfg.score.response_only_prefix and "response_only" in cfg.score.modes:
            backend["response_only_prefix"] = cfg.score.response_only_prefix
        if cfg.score.token_count != "labelled":
            backend["token_count"] = cfg.score.token_count
        if cfg.score.ifd_model == "target":
            backend["ifd_model"] = inputs.target.uid
        return fingerprint(prepared=inputs.prepared.fingerprint, checkpoints=[c.uid for c in inputs.checkpoints],
                           modes=sorted(cfg.score.modes), dtype=cfg.score.dtype, **backend)

    def outputs_complete(self, m: ScoresManifest, layout: RunLayout) -> bool:
        return storage.exists(m.trajectories) and file_digest(m.trajectories) == m.trajectories_sha256

    def run(self, ctx: StageContext) -> ScoresManifest:
        cfg, layout = ctx.cfg, ctx.layout
        prepared, checkpoints = ctx.inputs.prepared, ctx.inputs.checkpoints
        tokenizer = load_tokenizer(prepared.tokenizer)
        bos, pad = special_ids(tokenizer)
        prefix = tokenizer.encode(cfg.score.response_only_prefix, add_special_tokens=False) \
            if cfg.score.response_only_prefix else []
        out_dir = layout.scores("reference")
        if not cfg.score.local:
            init_ray(cfg)
        stats = score_checkpoints(layout.prepared, prepared, checkpoints, out_dir, cfg.score, bos, pad,
                                  trust_remote_code=cfg.models.reference.trust_remote_code, prefix_ids=prefix,
                                  stall_s=cfg.ray.stall_timeout_s)
        traj = build_trajectories(out_dir, [c.name for c in checkpoints])
        if cfg.score.ifd_model == "target":
            traj = _with_target_ifd_scores(cfg, layout, prepared, ctx.inputs.target, traj, bos, pad, prefix)
        require_match("trajectory rows", layout.trajectories, traj.num_rows, prepared.rows,
                      "the scores do not cover the prepared data: re-run `rayapp score --force`")
        # row groups a select split task reads one at a time (select.workers), not a million rows
        storage.write_parquet(layout.trajectories, traj, row_group_size=65_536)
        log.info("trajectories for %d rows x %d checkpoints: %s", traj.num_rows, len(checkpoints), layout.trajectories)
        return ScoresManifest(
            prepared_fingerprint=prepared.fingerprint, checkpoints=checkpoints, modes=list(cfg.score.modes),
            rows=traj.num_rows, trajectories=layout.trajectories,
            trajectories_sha256=file_digest(layout.trajectories),
            stats={k: v for k, v in stats.items() if isinstance(v, (int, float))},
        )

    def progress(self, layout: RunLayout, started: float | None, now: float) -> StageProgress | None:
        """Committed (checkpoint, shard) units out of all of them."""
        prepared = read_manifest(layout.prepared_manifest, PreparedManifest)
        reference = read_manifest(layout.manifest("reference"), ReferenceManifest)
        if not prepared or not reference or not prepared.shards or not reference.checkpoints:
            return None
        shards = {s.file for s in prepared.shards}
        out = layout.scores("reference")
        done = sum(1 for c in reference.checkpoints for f in storage.list_files(storage.join(out, c.name), ".parquet")
                   if f.rsplit("/", 1)[-1] in shards)
        return StageProgress(done, len(reference.checkpoints) * len(shards), "(checkpoint, shard) units", now)

    def artifacts(self, m: ScoresManifest, layout: RunLayout) -> list[str]:
        return [m.trajectories]  # every row's loss at every checkpoint: what LP is computed from

    def summary(self, m: ScoresManifest, layout: RunLayout) -> list[str]:
        s = m.stats
        if s.get("rows"):
            limit = (f" ({s['forward_flop_fraction']:.0%} of the forward-FLOP limit per busy actor)"
                     if "forward_flop_fraction" in s else "")
            return [f"{s['rows']} row-scores, {s['tokens_per_s']:.0f} tokens/s{limit}, padding "
                    f"{100 * s['padding_fraction']:.1f}% -> {m.trajectories}"]
        return [f"{m.rows} rows x {len(m.checkpoints)} checkpoints -> {m.trajectories}"]
