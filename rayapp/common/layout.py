"""Where each stage writes inside a run's output_dir (local path or object-store URI)."""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.common import storage


@dataclass(frozen=True)
class RunLayout:
    root: str

    def _p(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # prepare
    @property
    def prepared(self) -> str:
        return self._p("prepared")

    @property
    def prepared_manifest(self) -> str:
        return self._p("prepared", "manifest.json")

    @property
    def rejects(self) -> str:
        return self._p("prepared", "rejects.jsonl")

    # reference
    @property
    def reference(self) -> str:
        return self._p("reference")

    def reference_checkpoint(self, epoch: int) -> str:
        return self._p("reference", "checkpoints", f"epoch-{epoch}")

    # score
    def scores(self, name: str = "reference") -> str:
        return self._p("scores", name)

    @property
    def trajectories(self) -> str:
        return self._p("scores", "trajectories.parquet")

    # select
    @property
    def embeddings(self) -> str:
        return self._p("select", "embeddings.parquet")

    @property
    def selection(self) -> str:
        return self._p("select")

    # finetune / evaluate
    def finetune(self, subset: str) -> str:
        return self._p("finetune", subset)

    @property
    def evaluation(self) -> str:
        return self._p("evaluate")

    @property
    def summary(self) -> str:
        return self._p("summary.json")
