"""Where a run's models live. 'tiny' models are built once into the run's models/ folder; every
other name is passed to from_pretrained unchanged."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from rayapp.common import storage
from rayapp.config import RunConfig
from rayapp.models import tiny

TINY = "tiny"


def models_dir(cfg: RunConfig) -> str:
    return storage.local_path(storage.join(cfg.output_dir, "models"))


def tokenizer_source(cfg: RunConfig) -> str:
    name = cfg.models.tokenizer or cfg.models.reference.name_or_path
    return os.path.join(models_dir(cfg), "tokenizer") if name == TINY else name


def ensure_tokenizer(cfg: RunConfig, texts: Callable[[], Iterable[str]] | None = None) -> str:
    """Return the tokenizer's name/path, training the tiny one from ``texts()`` if needed."""
    src = tokenizer_source(cfg)
    name = cfg.models.tokenizer or cfg.models.reference.name_or_path
    if name == TINY and not os.path.exists(os.path.join(src, "tokenizer.json")):
        if texts is None:
            raise RuntimeError(f"tiny tokenizer not built yet at {src}: run `rayapp prepare` first")
        tiny.train_tokenizer(texts(), cfg.models.reference.tiny.vocab_size, src)
    return src


def model_source(cfg: RunConfig, role: str) -> str:
    """Name/path of the *initial* reference or target model; builds a tiny one on first use."""
    spec = getattr(cfg.models, role)
    if spec.name_or_path != TINY:
        return spec.name_or_path
    out = os.path.join(models_dir(cfg), f"{role}-init")
    if not os.path.exists(os.path.join(out, "config.json")):
        tiny.build_model(ensure_tokenizer(cfg), spec.tiny, out, max_positions=max(cfg.data.max_length, 512))
    return out


def trust_remote_code(cfg: RunConfig, role: str) -> bool:
    return getattr(cfg.models, role).trust_remote_code
