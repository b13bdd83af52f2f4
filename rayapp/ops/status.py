"""`rayapp status`: where a run stands, read from its output_dir (local or s3://, gs://) alone.

Each stage's work folder says it: ``manifest.json`` (written last) means done; the runner's
``rayapp_state.json`` says running or failed (with the error); nothing means not started. What a
done stage shows (``Stage.done_detail``) and how far a running one is (``Stage.progress``: for
training, rank 0's step of all steps; for scoring, the committed (checkpoint, shard) units) are
the stage's to say. The time left is extrapolated from the stage's start and its progress so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.core.manifests import read_manifest
from rayapp.core.stage import STATE_FILE, Stage, claimed_fingerprint


@dataclass
class StageStatus:
    stage: str
    variant: str | None
    state: str  # done | running | failed | not started
    work_dir: str
    done: int | None = None
    total: int | None = None
    unit: str = ""
    started: float | None = None
    updated: float | None = None
    eta_s: float | None = None
    seconds: float | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.stage} ({self.variant})" if self.variant else self.stage


def _read(uri: str):
    try:
        return storage.read_json(uri)
    except (FileNotFoundError, OSError, ValueError):
        return None


def _stages(layout: RunLayout, cfg=None) -> list[Stage]:
    """The run's stages: the config's plan, or (from the output dir alone) every stage's runs that
    the output dir has (``Stage.found``)."""
    from rayapp import pipeline

    if cfg is not None:
        return pipeline.plan(cfg)
    return [s for stage_type in pipeline.STAGE_TYPES.values() for s in stage_type.found(layout)]


def stage_status(layout: RunLayout, stage: Stage, now: float | None = None) -> StageStatus:
    work = stage.work_dir(layout)
    st = StageStatus(stage.name, stage.variant, "not started", work)
    manifest = read_manifest(stage.manifest_uri(layout), stage.manifest_type)
    state = _read(storage.join(work, STATE_FILE)) or {}
    claimed = claimed_fingerprint(work)
    # done: a manifest for the inputs the folder is claimed for (a newer run re-claims it)
    if manifest and (claimed is None or manifest.fingerprint == claimed) and \
            state.get("fingerprint", manifest.fingerprint) == manifest.fingerprint:
        st.state, st.seconds = "done", manifest.seconds
        st.started = state.get("started")
        st.detail = stage.done_detail(manifest)
        return st
    if not state:
        return st
    st.state, st.started = state["state"], state.get("started")
    st.error = state.get("error")
    if st.state == "running":
        now = now or time.time()
        p = stage.progress(layout, st.started, now)
        if p is not None:
            st.done, st.total, st.unit, st.updated, st.detail = p.done, p.total, p.unit, p.updated, p.detail
        if st.done and st.total and st.started:
            elapsed = (st.updated or now) - st.started
            st.eta_s = max(0.0, elapsed / st.done * (st.total - st.done)) if elapsed > 0 else None
    return st


def run_status(output_dir: str, cfg=None, now: float | None = None) -> list[StageStatus]:
    layout = RunLayout(output_dir)
    return [stage_status(layout, stage, now) for stage in _stages(layout, cfg)]


def _duration(s: float | None) -> str:
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_status(output_dir: str, stages: list[StageStatus], now: float | None = None) -> str:
    now = now or time.time()
    rows = [("stage", "state", "progress", "time", "left")]
    for st in stages:
        progress = ""
        if st.done is not None and st.total:
            progress = f"{st.done}/{st.total} {st.unit} ({100 * st.done / st.total:.0f}%)"
            if "epoch" in st.detail:
                progress += f", epoch {st.detail['epoch']}/{st.detail['epochs']}"
            if "tokens_per_s" in st.detail:
                progress += f", {st.detail['tokens_per_s']:,.0f} tokens/s"
        elif st.state == "done":
            progress = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in st.detail.items() if v is not None)
        elif st.state == "failed":
            progress = (st.error or "").splitlines()[0][:100] if st.error else ""
        spent = st.seconds if st.state == "done" else (now - st.started if st.started and st.state == "running" else None)
        left = f"~{_duration(st.eta_s)}" if st.eta_s is not None else ""
        rows.append((st.label, st.state, progress, _duration(spent), left))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{output_dir}"] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def as_json(output_dir: str, stages: list[StageStatus]) -> str:
    out = []
    for st in stages:
        d = asdict(st)
        d["label"] = st.label
        out.append(d)
    return json.dumps({"output_dir": output_dir, "stages": out}, indent=2)
