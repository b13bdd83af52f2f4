"""Where every output of a run lives inside its output_dir (a local path or an object-store URI).

Stages ask the layout for paths; none joins a file name by hand. Each stage's work folder holds
its ``manifest.json``, written last, which says what the folder holds and what it was made from.
A stage declares its folder (``Stage.folder``); defining the class registers it here, so the
layout knows every stage without a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayapp.core import storage

MANIFEST = "manifest.json"

# stage name -> (its folder, and for a stage with one folder per variant, the default variant)
_STAGE_FOLDERS: dict[str, tuple[str, str | None]] = {}


def register_stage_folder(stage: str, folder: str, default_variant: str | None = None) -> None:
    """Called when a Stage class is defined (``Stage.__init_subclass__``)."""
    _STAGE_FOLDERS[stage] = (folder, default_variant)


@dataclass(frozen=True)
class RunLayout:
    root: str
    # The stages' folders as registered where the layout is made. A layout sent to a Ray worker
    # (the clustering started ahead, an actor pool) knows them there, where no stage module is imported.
    folders: dict[str, tuple[str, str | None]] = field(default_factory=lambda: dict(_STAGE_FOLDERS), repr=False,
                                                        compare=False)

    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def stage_dir(self, stage: str, variant: str | None = None) -> str:
        """The work folder of a stage (one per variant where the stage declares a default variant,
        as finetune does: one per training subset)."""
        known = self.folders if stage in self.folders else _STAGE_FOLDERS  # (a stage defined later)
        try:
            folder, default_variant = known[stage]
        except KeyError:
            raise KeyError(f"no stage named {stage!r} is defined (known: {', '.join(known)}); "
                           "import the module that defines it") from None
        return self._p(folder) if default_variant is None else self._p(folder, variant or default_variant)

    def manifest(self, stage: str, variant: str | None = None) -> str:
        return storage.join(self.stage_dir(stage, variant), MANIFEST)

    # models built for the run (tiny tokenizer and models)
    @property
    def models(self) -> str:
        return self._p("models")

    # prepare
    @property
    def prepared(self) -> str:
        return self.stage_dir("prepare")

    @property
    def prepared_manifest(self) -> str:
        return self.manifest("prepare")

    def prepared_file(self, name: str) -> str:
        return storage.join(self.prepared, name)

    @property
    def rejects(self) -> str:
        return storage.join(self.prepared, "rejects.jsonl")

    @property
    def holdout(self) -> str:
        return storage.join(self.prepared, "holdout", "holdout.parquet")

    # reference
    @property
    def reference(self) -> str:
        return self.stage_dir("reference")

    # score
    @property
    def scores_root(self) -> str:
        return self.stage_dir("score")

    def scores(self, name: str = "reference") -> str:
        return storage.join(self.scores_root, name)

    @property
    def trajectories(self) -> str:
        return storage.join(self.scores_root, "trajectories.parquet")

    # select
    @property
    def selection(self) -> str:
        return self.stage_dir("select")

    @property
    def embeddings_dir(self) -> str:
        """One Parquet file of sentence embeddings per prepared shard (same name, same rows)."""
        return storage.join(self.selection, "embeddings")

    def embedding_file(self, shard_file: str) -> str:
        return storage.join(self.embeddings_dir, shard_file)

    @property
    def clusters(self) -> str:
        """Each prepared row's ``id`` and k-means ``cluster``."""
        return storage.join(self.selection, "clusters.parquet")

    def selection_dir(self, tag: str) -> str:
        return storage.join(self.selection, tag)

    @property
    def selection_report(self) -> str:
        return storage.join(self.selection, "report")

    # finetune
    def finetune(self, subset: str) -> str:
        return self.stage_dir("finetune", subset)

    # evaluate
    @property
    def evaluation(self) -> str:
        return self.stage_dir("evaluate")

    def generations(self, label: str) -> str:
        return storage.join(self.evaluation, "generations", f"{label}.parquet")

    def judgments(self, a: str, b: str) -> str:
        return storage.join(self.evaluation, "judgments", f"{a}-vs-{b}.jsonl")

    @property
    def results(self) -> str:
        return storage.join(self.evaluation, "results.json")

    @property
    def summary(self) -> str:
        return self._p("summary.json")
