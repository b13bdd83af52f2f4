"""Where every output of a run lives inside its output_dir (a local path or an object-store URI).

Stages ask the layout for paths; none joins a file name by hand. Each stage's work folder holds
its ``manifest.json``, written last, which says what the folder holds and what it was made from.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.common import storage

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunLayout:
    root: str

    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def stage_dir(self, stage: str, variant: str | None = None) -> str:
        """The work folder of a stage (finetune has one per training subset)."""
        return {
            "prepare": lambda: self.prepared,
            "reference": lambda: self.reference,
            "score": lambda: self.scores_root,
            "select": lambda: self.selection,
            "finetune": lambda: self.finetune(variant or "selected"),
            "evaluate": lambda: self.evaluation,
        }[stage]()

    def manifest(self, stage: str, variant: str | None = None) -> str:
        return storage.join(self.stage_dir(stage, variant), MANIFEST)

    # models built for the run (tiny tokenizer and models)
    @property
    def models(self) -> str:
        return self._p("models")

    # prepare
    @property
    def prepared(self) -> str:
        return self._p("prepared")

    @property
    def prepared_manifest(self) -> str:
        return self.manifest("prepare")

    def prepared_file(self, name: str) -> str:
        return self._p("prepared", name)

    @property
    def rejects(self) -> str:
        return self._p("prepared", "rejects.jsonl")

    @property
    def holdout(self) -> str:
        return self._p("prepared", "holdout", "holdout.parquet")

    # reference
    @property
    def reference(self) -> str:
        return self._p("reference")

    # score
    @property
    def scores_root(self) -> str:
        return self._p("scores")

    def scores(self, name: str = "reference") -> str:
        return self._p("scores", name)

    @property
    def trajectories(self) -> str:
        return self._p("scores", "trajectories.parquet")

    # select
    @property
    def selection(self) -> str:
        return self._p("select")

    @property
    def embeddings(self) -> str:
        return self._p("select", "embeddings.parquet")

    def selection_dir(self, tag: str) -> str:
        return self._p("select", tag)

    @property
    def selection_report(self) -> str:
        return self._p("select", "report")

    # finetune
    def finetune(self, subset: str) -> str:
        return self._p("finetune", subset)

    # evaluate
    @property
    def evaluation(self) -> str:
        return self._p("evaluate")

    def generations(self, label: str) -> str:
        return self._p("evaluate", "generations", f"{label}.parquet")

    def judgments(self, a: str, b: str) -> str:
        return self._p("evaluate", "judgments", f"{a}-vs-{b}.jsonl")

    @property
    def results(self) -> str:
        return self._p("evaluate", "results.json")

    @property
    def summary(self) -> str:
        return self._p("summary.json")
