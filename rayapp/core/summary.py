"""The end-of-run summary: what each stage produced, where, and how long it took."""

from __future__ import annotations

from rayapp.config import RunConfig
from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.core.stage import StageResult


def print_summary(cfg: RunConfig, results: list[StageResult], total_s: float, out=None) -> dict:
    import sys

    out = out or sys.stdout
    layout = RunLayout(cfg.output_dir)
    lines: list[str] = []
    summary: dict = {"run": cfg.name, "output_dir": cfg.output_dir, "seconds": round(total_s, 1), "stages": {}}
    for r in results:
        label = r.stage.label
        took = "up to date" if r.skipped else f"{r.seconds:.0f}s"
        body = r.stage.summary(r.manifest, layout)
        lines.append(f"{label:<20} {took:>10}  {body[0] if body else ''}")
        lines += [f"{'':<32}{line}" for line in body[1:]]
        summary["stages"][label] = {
            "seconds": round(r.seconds, 1), "skipped": r.skipped,
            "manifest": r.stage.manifest_uri(layout),
            "fingerprint": r.manifest.fingerprint,
        }
    width = min(max((len(line) for line in lines), default=40) + 2, 110)
    print("=" * width, file=out)
    print(f"rayapp run '{cfg.name}' finished in {total_s:.0f}s; outputs in {cfg.output_dir}", file=out)
    for line in lines:
        print("  " + line, file=out)
    print("=" * width, file=out, flush=True)
    storage.write_json(layout.summary, summary)
    return summary
