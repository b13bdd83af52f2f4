"""Where a run's models live. 'tiny' models are built once into the run's models/ folder; every
other name is passed to from_pretrained unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rayapp.common import storage
from rayapp.common.artifacts import mark_export
from rayapp.config import RunConfig
from rayapp.models import tiny

TINY = "tiny"


def models_dir(cfg: RunConfig) -> str:
    from rayapp.common.layout import RunLayout

    return storage.local_path(RunLayout(cfg.output_dir).models)


def tokenizer_source(cfg: RunConfig) -> str:
    name = cfg.models.tokenizer or cfg.models.reference.name_or_path
    return storage.join(models_dir(cfg), "tokenizer") if name == TINY else name


def _build_in_place(target: str, build: Callable[[str], None], marker: str) -> None:
    """Build into ``target``; on an object store, build in a local temp folder and upload it."""
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
    assert storage.exists(storage.join(target, marker))


def ensure_tokenizer(cfg: RunConfig, texts: Callable[[], Iterable[str]] | None = None) -> str:
    """Return the tokenizer's name/path, training the tiny one from ``texts()`` if needed."""
    src = tokenizer_source(cfg)
    name = cfg.models.tokenizer or cfg.models.reference.name_or_path
    if name == TINY and not storage.exists(storage.join(src, "tokenizer.json")):
        if texts is None:
            raise RuntimeError(f"tiny tokenizer not built yet at {src}: run `rayapp prepare` first")
        _build_in_place(src, lambda out: tiny.train_tokenizer(texts(), cfg.models.reference.tiny.vocab_size, out),
                        "tokenizer.json")
    return src


def model_source(cfg: RunConfig, role: str) -> str:
    """Name/path of the *initial* reference or target model; builds a tiny one on first use."""
    spec = getattr(cfg.models, role)
    if spec.name_or_path != TINY:
        return spec.name_or_path
    out = storage.join(models_dir(cfg), f"{role}-init")
    if not storage.exists(storage.join(out, "config.json")):
        tok = ensure_tokenizer(cfg)
        from rayapp.models.loading import materialize

        _build_in_place(out, lambda o: tiny.build_model(materialize(tok), spec.tiny, o,
                                                        max_positions=tiny_max_positions(cfg)), "config.json")
        mark_export(out, {"built": "tiny", "role": role})  # a uid of its own, like every export
    return out


def tiny_max_positions(cfg: RunConfig) -> int:
    return max(cfg.data.max_length, 512)


def trust_remote_code(cfg: RunConfig, role: str) -> bool:
    return getattr(cfg.models, role).trust_remote_code
