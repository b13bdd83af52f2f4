"""The typed manifests stages hand each other, read and written in one place.

Each stage's output folder ends with a ``manifest.json`` (written last) that says what the folder
holds and what it was made from: its fingerprint (config + upstream manifests), counts, hashes and
paths. The next stage loads it as the model below and refuses inputs made from something else
rather than mixing two runs.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayapp import __version__
from rayapp.core import storage
from rayapp.core.errors import InputMismatchError, MissingInputError
from rayapp.core.hashing import SHORT
from rayapp.core.layout import RunLayout


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageManifest(_Record):
    stage: str
    fingerprint: str = ""
    rayapp_version: str = __version__
    config_digest: str = ""
    seconds: float = 0.0


# ---- prepare -----------------------------------------------------------------------------------


class SourceRecord(_Record):
    path: str
    name: str
    schema_: str = Field(alias="schema")
    identity: str  # content hash, object ETag/size/mtime, or the HF dataset's resolved revision
    rows_read: int
    rows_ok: int
    rejected: dict[str, int]

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ShardRecord(_Record):
    file: str
    rows: int
    first_id: str


class HoldoutRecord(_Record):
    path: str
    rows: int
    ids_sha256: str


class PreparedManifest(StageManifest):
    stage: Literal["prepare"] = "prepare"
    tokenizer: str
    vocab_size: int
    eos_token: str | None
    template: dict[str, Any]
    max_length: int
    truncation: str
    sources: list[SourceRecord]
    rows_read: int
    rows: int  # training rows (in the shards): every later stage works on these
    rejected: int
    reject_reasons: dict[str, int]
    truncated: int
    conversations: int = 0  # rows that are conversations (the rest are Alpaca-style)
    chat_template: str | None = None  # what formatted them: model (the tokenizer's own) or plain (core/chat.py)
    chat_template_sha256: str | None = None
    turns_dropped: int = 0  # conversations whose earliest exchanges were dropped to fit (keep_last_turns)
    no_response_tokens: int
    tokens: int
    response_tokens: int
    shards: list[ShardRecord]
    holdout: HoldoutRecord | None  # rows kept out of selection and training, for eval loss
    ids_sha256: str
    tokenize_seconds: float

    def shard_paths(self, layout: RunLayout) -> list[str]:
        return [layout.prepared_file(s.file) for s in self.shards]


# ---- reference ---------------------------------------------------------------------------------


class CheckpointRecord(_Record):
    name: str  # epoch-0 .. epoch-n
    path: str  # anything from_pretrained accepts
    uid: str  # changes whenever the weights do


class ReferenceManifest(StageManifest):
    stage: Literal["reference"] = "reference"
    prepared_fingerprint: str
    init_model: str
    epochs: int
    checkpoints: list[CheckpointRecord]
    metrics: dict[str, Any]


# ---- score -------------------------------------------------------------------------------------


class ScoresManifest(StageManifest):
    stage: Literal["score"] = "score"
    prepared_fingerprint: str
    checkpoints: list[CheckpointRecord]
    modes: list[str]
    rows: int
    trajectories: str
    trajectories_sha256: str
    stats: dict[str, float | int]


# ---- select ------------------------------------------------------------------------------------


class SelectionRecord(_Record):
    method: str
    tag: str
    rows: int
    path: str
    sha256: str


class SelectionManifest(StageManifest):
    stage: Literal["select"] = "select"
    prepared_fingerprint: str | None  # None: trajectories from elsewhere (no prepared data)
    main: str
    selections: dict[str, SelectionRecord]
    report: str

    @property
    def main_selection(self) -> SelectionRecord:
        return self.selections[self.main]


# ---- finetune ----------------------------------------------------------------------------------


class FinetuneManifest(StageManifest):
    stage: Literal["finetune"] = "finetune"
    subset: str
    data: str  # what the target trained on, in words
    rows: int
    init_model: str
    export: str
    export_uid: str
    eval_rows: int  # held-out rows the eval loss is measured on (0: none)
    metrics: dict[str, Any]
    # a target with another tokenizer than the prepared data's: what tokenizing the rows again for
    # it did (rows_in, rows, dropped_too_long, no_response_tokens, template_errors, truncated, ...)
    retokenized: dict[str, Any] | None = None

    @property
    def eval_loss(self) -> float | None:
        value = self.metrics.get("eval_loss")
        return float(value) if isinstance(value, (int, float)) else None


# ---- evaluate ----------------------------------------------------------------------------------


class EvaluationManifest(StageManifest):
    stage: Literal["evaluate"] = "evaluate"
    judge: str
    sets: list[str]
    judged_sets: list[str]
    prompts: int
    models: dict[str, dict[str, Any]]
    pairs: dict[str, dict[str, dict[str, Any]]]
    unparseable_reasons: dict[str, dict[str, int]]
    rouge_l: dict[str, dict[str, float]]
    report: str | None
    human_page: str | None = None  # the blind pairwise page for people (its key.json beside it)


# stage name -> its manifest type; a Stage class fills in its own entry when it is defined
MANIFEST_TYPES: dict[str, type[StageManifest]] = {}

M = TypeVar("M", bound=StageManifest)


def read_manifest(uri: str, kind: type[M]) -> M | None:
    """The manifest at ``uri``, or None when there is none or it is not a valid ``kind`` (an
    interrupted or older run): the stage then counts as not done."""
    if not storage.exists(uri):
        return None
    try:
        return kind.model_validate(storage.read_json(uri))
    except (ValidationError, ValueError):
        return None


def require_manifest(layout: RunLayout, stage: str, variant: str | None = None,
                     subset: str | None = None) -> StageManifest:
    """An upstream stage's manifest, or a MissingInputError that says which command makes it
    (``subset``: the finetune subset whose work folder ``variant`` is)."""
    uri = layout.manifest(stage, variant)
    m = read_manifest(uri, MANIFEST_TYPES[stage])
    if m is None:
        what = f"{stage} ({variant})" if variant else stage
        extra = f" --set finetune.subset={subset or variant}" if stage == "finetune" and variant else ""
        raise MissingInputError(f"no complete {what} output at {layout.stage_dir(stage, variant)}: "
                                f"run `rayapp {stage} --config ...{extra}` first")
    return m


def read_prepared(layout: RunLayout) -> PreparedManifest:
    return require_manifest(layout, "prepare")  # type: ignore[return-value]


def write_manifest(uri: str, manifest: StageManifest) -> None:
    storage.write_json(uri, manifest.model_dump(mode="json", by_alias=True))


def file_digest(uri: str) -> str:
    """The short content hash stages record for the files they hand on (``short_digest`` of the
    file's bytes, read a chunk at a time)."""
    import hashlib

    h = hashlib.sha256()
    for chunk in storage.iter_chunks(uri):
        h.update(chunk)
    return h.hexdigest()[:SHORT]


def require_match(what: str, where: str, have, want, fix: str) -> None:
    """Refuse ``where`` when its recorded ``what`` (``have``) is not the one expected (``want``)."""
    if have != want:
        raise InputMismatchError(f"{where}: {what} do not match ({have} != {want}); {fix}")


def require_same_prepared(where: str, recorded: str | None, prepared: PreparedManifest, fix: str) -> None:
    require_match("made from other prepared data: fingerprints", where, recorded, prepared.fingerprint, fix)


def reference_checkpoints(layout: RunLayout, prepared: PreparedManifest) -> list[CheckpointRecord]:
    """The reference run's checkpoints as they are now (uids read from their markers, on local
    paths and object stores alike), refused if they were trained on other prepared data."""
    from rayapp.core.artifacts import artifact_uid

    ref: ReferenceManifest = require_manifest(layout, "reference")  # type: ignore[assignment]
    require_same_prepared(f"reference checkpoints in {layout.reference}", ref.prepared_fingerprint, prepared,
                          "re-run `rayapp reference` on this data")
    return [CheckpointRecord(name=c.name, path=c.path, uid=artifact_uid(c.path)) for c in ref.checkpoints]
