"""The reference stage: train the small model on the full prepared set; epoch-0 is the untouched model."""

from __future__ import annotations


from rayapp.common import storage
from rayapp.common.hashing import sha256_bytes
from rayapp.common.layout import RunLayout
from rayapp.common.raycluster import init_ray
from rayapp.config import RunConfig
from rayapp.models import registry
from rayapp.common.manifests import read_prepared_manifest
from rayapp.train import checkpoints as ck
from rayapp.train.runner import run_training


def _fingerprint(cfg: RunConfig, prepared: dict, init_model: str) -> str:
    blob = f"{prepared['fingerprint']}|{init_model}|{cfg.reference.model_dump_json()}"
    return sha256_bytes(blob.encode())[:16]


def run_reference(cfg: RunConfig, force: bool = False) -> dict:
    layout = RunLayout(cfg.output_dir)
    prepared = read_prepared_manifest(layout)
    init_model = registry.model_source(cfg, "reference")
    fp = _fingerprint(cfg, prepared, init_model)
    manifest_uri = storage.join(layout.reference, "manifest.json")
    work = storage.local_path(layout.reference)
    if not force and storage.exists(manifest_uri) and storage.read_json(manifest_uri).get("fingerprint") == fp:
        print(f"[reference] up to date: {cfg.reference.epochs} epochs at {work}/exports")
        return storage.read_json(manifest_uri)
    ck.claim_work_dir(work, fp, force)

    init_ray(cfg)
    files = [storage.join(layout.prepared, s["file"]) for s in prepared["shards"]]
    metrics = run_training(
        "reference", cfg.reference, files, prepared["rows"], init_model, prepared["tokenizer"], work,
        export_every_epoch=True, trust_remote_code=cfg.models.reference.trust_remote_code,
    )
    exports = [storage.join(work, "exports", f"epoch-{e}") for e in range(1, cfg.reference.epochs + 1)]
    missing = [p for p in exports if not ck.export_complete(p)]
    if missing:
        raise RuntimeError(f"[reference] training ended without exports {missing}")
    manifest = {
        "stage": "reference",
        "fingerprint": fp,
        "prepared_fingerprint": prepared["fingerprint"],
        "init_model": init_model,
        "epochs": cfg.reference.epochs,
        "checkpoints": [{"name": "epoch-0", "path": init_model}]
        + [{"name": f"epoch-{e}", "path": p} for e, p in enumerate(exports, start=1)],
        "final_metrics": metrics,
    }
    storage.write_json(manifest_uri, manifest)
    print(f"[reference] {cfg.reference.epochs} epochs done; checkpoints epoch-0..{cfg.reference.epochs} in {work}")
    return manifest
