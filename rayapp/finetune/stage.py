"""The finetune stage: the target model trains on what the small model chose (or on the full set /
a random subset of the same size, for the paper's comparisons)."""

from __future__ import annotations


from rayapp.common import storage
from rayapp.common.hashing import sha256_bytes
from rayapp.common.layout import RunLayout
from rayapp.common.raycluster import init_ray
from rayapp.config import RunConfig
from rayapp.models import registry
from rayapp.models.loading import load_tokenizer
from rayapp.common.manifests import (
    MissingInputError,
    file_digest,
    read_prepared_manifest,
    require_match,
    require_same_prepared,
)
from rayapp.train import checkpoints as ck
from rayapp.train.runner import run_training


def training_data(cfg: RunConfig, layout: RunLayout, prepared: dict, subset: str) -> tuple[list[str], int, str]:
    """(files, rows, description) of the rows the target trains on."""
    if subset == "full":
        files = [storage.join(layout.prepared, s["file"]) for s in prepared["shards"]]
        return files, prepared["rows"], f"full prepared set ({prepared['rows']} rows)"
    manifest_uri = storage.join(layout.selection, "manifest.json")
    if not storage.exists(manifest_uri):
        raise MissingInputError(f"no selection at {layout.selection}: run `rayapp select` first")
    sel = storage.read_json(manifest_uri)
    method = sel["main"] if subset == "selected" else "random"
    if method not in sel["selections"]:
        raise MissingInputError(f"no '{method}' selection in {manifest_uri}; add it to select.baselines")
    entry = sel["selections"][method]
    require_same_prepared(f"the selection in {layout.selection}", sel.get("prepared_fingerprint"), prepared,
                          "re-run `rayapp score` and `rayapp select` on this data")
    require_match("content hashes", entry["path"], file_digest(entry["path"]), entry.get("sha256"),
                  "the shard changed after the select stage wrote it: re-run `rayapp select`")
    return [entry["path"]], entry["rows"], f"{entry['tag']} ({entry['rows']} rows)"


def check_same_tokenizer(target: str, prepared_tokenizer: str, trust_remote_code: bool) -> None:
    """The prepared token ids are only valid for the target if it uses the same vocabulary."""
    if target == prepared_tokenizer:
        return
    a = load_tokenizer(target, trust_remote_code=trust_remote_code).get_vocab()
    b = load_tokenizer(prepared_tokenizer).get_vocab()
    if a != b:
        raise ValueError(
            f"the target model {target} uses another tokenizer than the prepared data ({prepared_tokenizer}); "
            "set models.tokenizer to the target's tokenizer and re-run prepare (the paper's pairs share one)"
        )


def run_finetune(cfg: RunConfig, force: bool = False, runtime_env: dict | None = None) -> dict:
    fc = cfg.finetune
    layout = RunLayout(cfg.output_dir)
    prepared = read_prepared_manifest(layout)
    files, rows, what = training_data(cfg, layout, prepared, fc.subset)
    init_model = registry.model_source(cfg, "target")
    check_same_tokenizer(init_model, prepared["tokenizer"], cfg.models.target.trust_remote_code)
    work = storage.local_path(layout.finetune(fc.subset))
    digest_parts = [prepared["fingerprint"], init_model, fc.model_dump_json()]
    for f in files:
        digest_parts.append(file_digest(f) if f.endswith("selected.parquet") else f)
    fp = sha256_bytes("|".join(digest_parts).encode())[:16]
    manifest_uri = storage.join(layout.finetune(fc.subset), "manifest.json")
    if not force and storage.exists(manifest_uri) and storage.read_json(manifest_uri).get("fingerprint") == fp:
        m = storage.read_json(manifest_uri)
        print(f"[finetune] up to date: {m['export']}")
        return m
    ck.claim_work_dir(work, fp, force)
    print(f"[finetune] target {init_model} on {what}; FSDP={'on' if fc.fsdp else 'off'}, {fc.num_workers} workers")
    init_ray(cfg)
    eval_file = storage.join(layout.prepared, prepared["shards"][-1]["file"])
    metrics = run_training(
        "finetune", fc, files, rows, init_model, prepared["tokenizer"], work, export_every_epoch=False,
        trust_remote_code=cfg.models.target.trust_remote_code, eval_file=eval_file if fc.eval_rows else None,
        runtime_env=runtime_env,
    )
    export = storage.join(work, "exports", "final")
    if not ck.export_complete(export):
        raise RuntimeError(f"[finetune] training ended without the export {export}")
    manifest = {"stage": "finetune", "fingerprint": fp, "subset": fc.subset, "data": what, "rows": rows,
                "init_model": init_model, "export": export, "eval_file": eval_file, "metrics": metrics}
    storage.write_json(manifest_uri, manifest)
    print(f"[finetune] done: {export} (eval loss {metrics.get('eval_loss')})")
    return manifest


def run_finetune_subsets(cfg: RunConfig, force: bool = False) -> dict:
    """Train ``finetune.subset`` and every other subset ``evaluate.models`` compares against it
    (e.g. selected and full), so `rayapp run` ends with all the models evaluation needs."""
    subsets = [cfg.finetune.subset] + [m for m in cfg.evaluate.models
                                       if m in ("selected", "full", "random") and m != cfg.finetune.subset]
    results = {}
    for subset in dict.fromkeys(subsets):
        sub_cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"subset": subset})})
        results[subset] = run_finetune(sub_cfg, force=force)
    main = dict(results[cfg.finetune.subset])
    main["also"] = {k: v for k, v in results.items() if k != cfg.finetune.subset}
    return main
