"""Reading the manifests one stage leaves for the next, and checking that a stage's inputs belong
together: each stage records what it was made from (fingerprints, hashes, counts), and the next
stage refuses inputs made from something else rather than mixing two runs."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.hashing import sha256_bytes
from rayapp.common.layout import RunLayout


class MissingInputError(RuntimeError):
    """A stage's input (an earlier stage's output) is not there yet."""


class InputMismatchError(RuntimeError):
    """A stage's inputs were made from other inputs than the ones beside them."""


def read_prepared_manifest(layout: RunLayout) -> dict:
    if not storage.exists(layout.prepared_manifest):
        raise MissingInputError(f"no prepared data at {layout.prepared}: run `rayapp prepare` first")
    return storage.read_json(layout.prepared_manifest)


def file_digest(uri: str) -> str:
    """The short content hash stages record for the files they hand on."""
    return sha256_bytes(storage.read_bytes(uri))[:16]


def require_match(what: str, where: str, have, want, fix: str) -> None:
    """Refuse ``where`` when its recorded ``what`` (``have``) is not the one expected (``want``)."""
    if have != want:
        raise InputMismatchError(f"{where}: {what} do not match ({have} != {want}); {fix}")


def require_same_prepared(where: str, recorded: str | None, prepared: dict, fix: str) -> None:
    require_match("made from other prepared data: fingerprints", where, recorded, prepared["fingerprint"], fix)
