"""`rayapp status`: where a run stands, read from its output_dir (local or s3://, gs://) alone.

Each stage's work folder says it: ``manifest.json`` (written last) means done; the runner's
``rayapp_state.json`` says running or failed (with the error); nothing means not started. A running
stage shows how far along it is where it records it: training's ``stats/progress.json`` (step of
total steps, written by rank 0), scoring's committed (checkpoint, shard) files out of all of them.
The time left is extrapolated from the stage's start and its progress so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from rayapp.common import storage
from rayapp.common.layout import MANIFEST, RunLayout
from rayapp.common.stages import STATE_FILE, claimed_fingerprint


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


def _stage_list(layout: RunLayout, cfg=None) -> list[tuple[str, str | None]]:
    """The run's stages: the config's plan, or (from the output dir alone) the standard stages and
    every finetune subset that has a folder."""
    from rayapp import pipeline

    if cfg is not None:
        return [(s.name, s.variant) for s in pipeline.plan(cfg)]
    out: list[tuple[str, str | None]] = []
    for name in pipeline.STAGES:
        if name == "finetune":
            variants = storage.list_dirs(storage.join(layout.root, "finetune")) or ["selected"]
            out += [("finetune", v) for v in variants]
        else:
            out.append((name, None))
    return out


def stage_status(layout: RunLayout, name: str, variant: str | None, now: float | None = None) -> StageStatus:
    work = layout.stage_dir(name, variant)
    st = StageStatus(name, variant, "not started", work)
    manifest = _read(storage.join(work, MANIFEST))
    state = _read(storage.join(work, STATE_FILE)) or {}
    claimed = claimed_fingerprint(work)
    # done: a manifest for the inputs the folder is claimed for (a newer run re-claims it)
    if manifest and (claimed is None or manifest.get("fingerprint") == claimed) and \
            state.get("fingerprint", manifest.get("fingerprint")) == manifest.get("fingerprint"):
        st.state, st.seconds = "done", manifest.get("seconds")
        st.started = state.get("started")
        _done_detail(st, name, manifest)
        return st
    if not state:
        return st
    st.state, st.started = state["state"], state.get("started")
    st.error = state.get("error")
    if st.state == "running":
        _progress(st, layout, name, work, now or time.time())
    return st


def _done_detail(st: StageStatus, name: str, manifest: dict) -> None:
    if name == "prepare":
        st.detail = {"rows": manifest.get("rows"), "rejected": manifest.get("rejected")}
    elif name in ("reference", "finetune"):
        m = manifest.get("metrics") or {}
        st.detail = {k: m[k] for k in ("global_step", "eval_loss", "last_loss") if m.get(k) is not None}
    elif name == "select":
        st.detail = {"main": manifest.get("main")}
    elif name == "evaluate":
        pairs = manifest.get("pairs") or {}
        st.detail = {"pairs": ", ".join(pairs)} if pairs else {}


def _progress(st: StageStatus, layout: RunLayout, name: str, work: str, now: float) -> None:
    if name in ("reference", "finetune"):
        p = _read(storage.join(work, "stats", "progress.json"))
        if p:
            st.done, st.total, st.unit, st.updated = p.get("step"), p.get("total_steps"), "steps", p.get("time")
            st.detail = {k: p[k] for k in ("epoch", "epochs", "loss", "tokens_per_s") if k in p}
    elif name == "score":
        prepared = _read(layout.prepared_manifest) or {}
        reference = _read(layout.manifest("reference")) or {}
        shards = [s["file"] for s in prepared.get("shards", [])]
        checkpoints = [c["name"] for c in reference.get("checkpoints", [])]
        if shards and checkpoints:
            out = layout.scores("reference")
            st.done = sum(1 for ck in checkpoints for f in storage.list_files(storage.join(out, ck), ".parquet")
                          if f.rsplit("/", 1)[-1] in shards)
            st.total, st.unit, st.updated = len(checkpoints) * len(shards), "(checkpoint, shard) units", now
    if st.done and st.total and st.started:
        elapsed = (st.updated or now) - st.started
        st.eta_s = max(0.0, elapsed / st.done * (st.total - st.done)) if elapsed > 0 else None


def run_status(output_dir: str, cfg=None, now: float | None = None) -> list[StageStatus]:
    layout = RunLayout(output_dir)
    return [stage_status(layout, name, variant, now) for name, variant in _stage_list(layout, cfg)]


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
