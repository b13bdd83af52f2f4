"""The score stage: every reference checkpoint over the full prepared set -> trajectories."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.hashing import fingerprint
from rayapp.common.layout import RunLayout
from rayapp.common.log import get_logger
from rayapp.common.manifests import (
    ScoresManifest,
    file_digest,
    read_prepared,
    reference_checkpoints,
    require_match,
)
from rayapp.common.raycluster import init_ray
from rayapp.common.stages import Stage, StageContext
from rayapp.config import RunConfig
from rayapp.models.loading import load_tokenizer
from rayapp.score.engine import score_checkpoints
from rayapp.score.trajectories import build_trajectories

log = get_logger(__name__)


def special_ids(tokenizer) -> tuple[int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(bos), int(pad)


class ScoreStage(Stage):
    name = "score"
    help = "per-sample response losses for every checkpoint (Ray Data actor pool)"
    manifest_type = ScoresManifest
    # committed (checkpoint, shard) units resume a cut-off run; --force scores everything again
    reset_on_force = ("reference", "trajectories.parquet")

    def fingerprint(self, cfg: RunConfig, layout: RunLayout) -> str:
        prepared = read_prepared(layout)
        # what the scores depend on; batch sizes and resources do not change them
        # (the backend only where it is not the default: earlier runs' fingerprints stay valid)
        backend = {} if cfg.score.backend == "torch" else {"backend": cfg.score.backend}
        if cfg.score.response_only_prefix and "response_only" in cfg.score.modes:
            backend["response_only_prefix"] = cfg.score.response_only_prefix
        if cfg.score.token_count != "labelled":
            backend["token_count"] = cfg.score.token_count
        return fingerprint(prepared=prepared.fingerprint, checkpoints=[c.uid for c in reference_checkpoints(layout, prepared)],
                           modes=sorted(cfg.score.modes), dtype=cfg.score.dtype, **backend)

    def outputs_complete(self, m: ScoresManifest, layout: RunLayout) -> bool:
        return storage.exists(m.trajectories) and file_digest(m.trajectories) == m.trajectories_sha256

    def run(self, ctx: StageContext) -> ScoresManifest:
        cfg, layout = ctx.cfg, ctx.layout
        prepared = read_prepared(layout)
        checkpoints = reference_checkpoints(layout, prepared)
        tokenizer = load_tokenizer(prepared.tokenizer)
        bos, pad = special_ids(tokenizer)
        prefix = tokenizer.encode(cfg.score.response_only_prefix, add_special_tokens=False) \
            if cfg.score.response_only_prefix else []
        out_dir = layout.scores("reference")
        if not cfg.score.local:
            init_ray(cfg)
        stats = score_checkpoints(layout.prepared, prepared, checkpoints, out_dir, cfg.score, bos, pad,
                                  trust_remote_code=cfg.models.reference.trust_remote_code, prefix_ids=prefix)
        traj = build_trajectories(out_dir, [c.name for c in checkpoints])
        require_match("trajectory rows", layout.trajectories, traj.num_rows, prepared.rows,
                      "the scores do not cover the prepared data: re-run `rayapp score --force`")
        storage.write_parquet(layout.trajectories, traj)
        log.info("trajectories for %d rows x %d checkpoints: %s", traj.num_rows, len(checkpoints), layout.trajectories)
        return ScoresManifest(
            prepared_fingerprint=prepared.fingerprint, checkpoints=checkpoints, modes=list(cfg.score.modes),
            rows=traj.num_rows, trajectories=layout.trajectories,
            trajectories_sha256=file_digest(layout.trajectories),
            stats={k: v for k, v in stats.items() if isinstance(v, (int, float))},
        )

    def summary(self, m: ScoresManifest, layout: RunLayout) -> list[str]:
        s = m.stats
        if s.get("rows"):
            limit = (f" ({s['forward_flop_fraction']:.0%} of the forward-FLOP limit per busy actor)"
                     if "forward_flop_fraction" in s else "")
            return [f"{s['rows']} row-scores, {s['tokens_per_s']:.0f} tokens/s{limit}, padding "
                    f"{100 * s['padding_fraction']:.1f}% -> {m.trajectories}"]
        return [f"{m.rows} rows x {len(m.checkpoints)} checkpoints -> {m.trajectories}"]
