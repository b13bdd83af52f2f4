"""The score stage: every reference checkpoint over the full prepared set -> trajectories."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.layout import RunLayout
from rayapp.common.manifests import (
    MissingInputError,
    file_digest,
    read_prepared_manifest,
    require_match,
    require_same_prepared,
)
from rayapp.common.raycluster import init_ray
from rayapp.config import RunConfig
from rayapp.models.loading import load_tokenizer
from rayapp.score.engine import Checkpoint, checkpoint_uid, score_checkpoints
from rayapp.score.trajectories import build_trajectories


def reference_checkpoints(layout: RunLayout, prepared: dict | None = None) -> list[Checkpoint]:
    """The reference run's checkpoints, refused if they were trained on other prepared data."""
    manifest_uri = storage.join(layout.reference, "manifest.json")
    if not storage.exists(manifest_uri):
        raise MissingInputError(f"no reference checkpoints at {layout.reference}: run `rayapp reference` first")
    manifest = storage.read_json(manifest_uri)
    if prepared is not None:
        require_same_prepared(f"reference checkpoints in {layout.reference}", manifest.get("prepared_fingerprint"),
                              prepared, "re-run `rayapp reference` on this data")
    return [Checkpoint(c["name"], c["path"], checkpoint_uid(c["path"])) for c in manifest["checkpoints"]]


def special_ids(tokenizer) -> tuple[int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(bos), int(pad)


def run_score(cfg: RunConfig, force: bool = False, checkpoints: list[Checkpoint] | None = None) -> dict:
    layout = RunLayout(cfg.output_dir)
    manifest = read_prepared_manifest(layout)
    checkpoints = checkpoints or reference_checkpoints(layout, manifest)
    tokenizer = load_tokenizer(manifest["tokenizer"])
    bos, pad = special_ids(tokenizer)
    out_dir = layout.scores("reference")
    if force and storage.exists(out_dir):
        fs, p = storage.resolve(out_dir)
        fs.delete_dir_contents(p)
    init_ray(cfg)
    stats = score_checkpoints(
        layout.prepared, manifest, checkpoints, out_dir, cfg.score, bos, pad,
        trust_remote_code=cfg.models.reference.trust_remote_code,
    )
    traj = build_trajectories(out_dir, [c.name for c in checkpoints])
    require_match("trajectory rows", layout.trajectories, traj.num_rows, manifest["rows"],
                  "the scores do not cover the prepared data: re-run `rayapp score --force`")
    storage.write_parquet(layout.trajectories, traj)
    storage.write_json(storage.join(out_dir, "manifest.json"), {
        "stage": "score",
        "prepared_fingerprint": manifest["fingerprint"],
        "checkpoints": [c.__dict__ for c in checkpoints],
        "modes": list(cfg.score.modes),
        "rows": traj.num_rows,
        "trajectories": layout.trajectories,
        "trajectories_sha256": file_digest(layout.trajectories),
        "last_run": stats,
    })
    print(f"[score] trajectories for {traj.num_rows} rows x {len(checkpoints)} checkpoints: {layout.trajectories}")
    return stats
