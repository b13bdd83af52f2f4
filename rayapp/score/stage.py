"""The score stage: every reference checkpoint over the full prepared set -> trajectories."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.layout import RunLayout
from rayapp.common.manifests import MissingInputError, read_prepared_manifest
from rayapp.common.raycluster import init_ray
from rayapp.config import RunConfig
from rayapp.models.loading import load_tokenizer
from rayapp.score.engine import Checkpoint, checkpoint_uid, score_checkpoints
from rayapp.score.trajectories import build_trajectories


def reference_checkpoints(layout: RunLayout) -> list[Checkpoint]:
    manifest_uri = storage.join(layout.reference, "manifest.json")
    if not storage.exists(manifest_uri):
        raise MissingInputError(f"no reference checkpoints at {layout.reference}: run `rayapp reference` first")
    manifest = storage.read_json(manifest_uri)
    return [Checkpoint(c["name"], c["path"], checkpoint_uid(c["path"])) for c in manifest["checkpoints"]]


def special_ids(tokenizer) -> tuple[int, int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(bos), int(pad)


def run_score(cfg: RunConfig, force: bool = False, checkpoints: list[Checkpoint] | None = None) -> dict:
    layout = RunLayout(cfg.output_dir)
    manifest = read_prepared_manifest(layout)
    checkpoints = checkpoints or reference_checkpoints(layout)
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
    storage.write_parquet(layout.trajectories, traj)
    storage.write_json(storage.join(out_dir, "manifest.json"), {
        "stage": "score",
        "prepared_fingerprint": manifest["fingerprint"],
        "checkpoints": [c.__dict__ for c in checkpoints],
        "modes": list(cfg.score.modes),
        "rows": traj.num_rows,
        "trajectories": layout.trajectories,
        "last_run": stats,
    })
    print(f"[score] trajectories for {traj.num_rows} rows x {len(checkpoints)} checkpoints: {layout.trajectories}")
    return stats
