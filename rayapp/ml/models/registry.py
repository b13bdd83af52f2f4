"""Where a run's models live. 'tiny' models are built once into the run's models/ folder; a hub
name is staged once into the same folder (ml/models/hub.py: fetched at the pinned revision, converted
to safetensors with the model class's tensor names), and so is a hub tokenizer; local folders,
object-store exports and packaged models are used as they are."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rayapp.config import RunConfig
from rayapp.core import storage
from rayapp.core.artifacts import mark_export
from rayapp.ml.models import hub, tiny

TINY = "tiny"


def models_dir(cfg: RunConfig) -> str:
    from rayapp.core.layout import RunLayout

    return storage.local_path(RunLayout(cfg.output_dir).models)


def _tokenizer_name(cfg: RunConfig) -> str:
    return cfg.models.tokenizer or cfg.models.reference.name_or_path


def tokenizer_revision(cfg: RunConfig) -> str | None:
    """The revision pinned for the tokenizer: that of the model whose name it is (models.tokenizer
    naming another repository has no revision of its own: the default branch)."""
    name = _tokenizer_name(cfg)
    for spec in (cfg.models.reference, cfg.models.target):
        if spec.name_or_path == name:
            return spec.revision
    return None


def tokenizer_source(cfg: RunConfig) -> str:
    """The tokenizer every stage loads: the run's models/tokenizer folder for the tiny one and for
    a hub name (its files staged at the pinned revision by ``ensure_tokenizer``), else the name."""
    name = _tokenizer_name(cfg)
    return storage.join(models_dir(cfg), "tokenizer") if name == TINY or hub.is_hub_name(name) else name


def _build_in_place(target: str, build: Callable[[str], None], marker: str | None) -> None:
    """Build into ``target``; on an object store, build in a local temp folder and upload it (and
    check that ``marker``, a file the build always writes, arrived)."""
    if not storage.is_remote(target):
        build(target)
        return
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rayapp-tiny-")
    try:
        build(tmp)
        storage.upload_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert marker is None or storage.exists(storage.join(target, marker))


def _stage(target: str, repo: str, revision: str | None, kind: str, role: str, stage: Callable[[str], dict],
           marker: str | None) -> None:
    """Stage ``repo`` at ``revision`` into ``target`` unless it is there already; the export marker
    (written last: a half-staged folder has none) records the repository, revision and commit."""
    if hub.is_staged(target, repo, revision, kind):
        return
    storage.remove(target)  # another repository or revision (or a tiny model) before: no file of it stays
    info: dict = {}
    _build_in_place(target, lambda out: info.update(stage(out)), marker)
    mark_export(target, {**info, "role": role})


def _from_hub(folder: str) -> bool:
    """Whether ``folder`` holds something staged from the hub (not a tiny build)."""
    from rayapp.core.artifacts import EXPORT_MARKER

    marker = storage.join(folder, EXPORT_MARKER)
    return storage.exists(marker) and storage.read_json(marker).get("staged") == hub.STAGED


def ensure_tokenizer(cfg: RunConfig, texts: Callable[[], Iterable[str]] | None = None) -> str:
    """Return the tokenizer's name/path, training the tiny one from ``texts()``, or staging a hub
    tokenizer's files, if needed."""
    src = tokenizer_source(cfg)
    name = _tokenizer_name(cfg)
    if name == TINY and (not storage.exists(storage.join(src, "tokenizer.json")) or _from_hub(src)):
        if texts is None:
            raise RuntimeError(f"tiny tokenizer not built yet at {src}: run `rayapp prepare` first")
        storage.remove(src)  # a hub tokenizer staged there before
        _build_in_place(src, lambda out: tiny.train_tokenizer(texts(), cfg.models.reference.tiny.vocab_size, out),
                        "tokenizer.json")
    elif name != TINY and hub.is_hub_name(name):
        trust = cfg.models.reference.trust_remote_code
        _stage(src, name, tokenizer_revision(cfg), "tokenizer", "tokenizer",
               lambda out: hub.stage_tokenizer(name, tokenizer_revision(cfg), out, trust), None)
    return src


def model_source(cfg: RunConfig, role: str) -> str:
    """Path of the *initial* reference or target model: a tiny one built on first use, a hub
    checkpoint staged on first use (both in ``<output_dir>/models/<role>-init``), or the
    configured local folder, object-store export or packaged model itself."""
    spec = getattr(cfg.models, role)
    out = storage.join(models_dir(cfg), f"{role}-init")
    if spec.name_or_path != TINY:
        if not hub.is_hub_name(spec.name_or_path):
            return spec.name_or_path
        _stage(out, spec.name_or_path, spec.revision, "model", role,
               lambda o: hub.stage_model(spec.name_or_path, spec.revision, o, spec.trust_remote_code,
                                         destination=out), "config.json")
        return out
    if not storage.exists(storage.join(out, "config.json")) or _from_hub(out):
        storage.remove(out)  # a hub checkpoint staged there before
        tok = ensure_tokenizer(cfg)
        from rayapp.ml.models.loading import materialize

        _build_in_place(out, lambda o: tiny.build_model(materialize(tok), spec.tiny, o,
                                                        max_positions=tiny_max_positions(cfg)), "config.json")
        mark_export(out, {"built": "tiny", "role": role})  # a uid of its own, like every export
    return out


def tiny_max_positions(cfg: RunConfig) -> int:
    return max(cfg.data.max_length, 512)


def trust_remote_code(cfg: RunConfig, role: str) -> bool:
    return getattr(cfg.models, role).trust_remote_code
