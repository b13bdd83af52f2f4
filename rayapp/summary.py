"""The end-of-run summary: what each stage produced, where, and how fast."""

from __future__ import annotations

from rayapp.common import storage
from rayapp.common.layout import RunLayout
from rayapp.config import RunConfig


def print_summary(cfg: RunConfig, results: dict, timings: dict, total_s: float) -> dict:
    layout = RunLayout(cfg.output_dir)
    lines = []
    summary: dict = {"run": cfg.name, "output_dir": cfg.output_dir, "seconds": round(total_s, 1), "stages": {}}
    if "prepare" in results:
        m = results["prepare"]
        lines.append(f"prepare    {m['rows']} rows kept, {m['rejected']} rejected ({layout.rejects}), "
                     f"{m['truncated']} truncated, {m['no_response_tokens']} with no response tokens")
        summary["stages"]["prepare"] = {k: m[k] for k in ("rows", "rejected", "truncated", "no_response_tokens", "tokens")}
    if "reference" in results:
        m = results["reference"]
        loss = m.get("final_metrics", {}).get("last_loss")
        lines.append(f"reference  {m['epochs']} epochs, checkpoints epoch-0..{m['epochs']}"
                     + (f", final train loss {loss:.3f}" if isinstance(loss, float) else ""))
        summary["stages"]["reference"] = {"epochs": m["epochs"], "checkpoints": [c["path"] for c in m["checkpoints"]]}
    if "score" in results:
        m = results["score"]
        if m.get("rows"):
            lines.append(f"score      {m['rows']} row-scores, {m['tokens_per_s']:.0f} tokens/s, "
                         f"padding {100 * m['padding_fraction']:.1f}% -> {layout.trajectories}")
        else:
            lines.append(f"score      up to date -> {layout.trajectories}")
        summary["stages"]["score"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    if "select" in results:
        m = results["select"]
        main = m["selections"][m["main"]]
        lines.append(f"select     {m['main']}: {main['rows']} rows -> {main['path']}")
        lines.append(f"           report: {m['report']}")
        summary["stages"]["select"] = {"main": m["main"], "rows": main["rows"], "report": m["report"]}
    if "finetune" in results:
        m = results["finetune"]
        ev = m["metrics"].get("eval_loss")
        lines.append(f"finetune   target on {m['data']} -> {m['export']}"
                     + (f" (eval loss {ev:.3f})" if isinstance(ev, float) else ""))
        summary["stages"]["finetune"] = {"export": m["export"], "eval_loss": ev, "subset": m["subset"]}
        for subset, other in m.get("also", {}).items():
            ev = other["metrics"].get("eval_loss")
            lines.append(f"           target on {other['data']} -> {other['export']}"
                         + (f" (eval loss {ev:.3f})" if isinstance(ev, float) else ""))
            summary["stages"]["finetune"][subset] = {"export": other["export"], "eval_loss": ev}
    if "evaluate" in results:
        from rayapp.evaluate.verdicts import Tally, format_table

        m = results["evaluate"]
        lines.append(f"evaluate   {m['prompts']} prompts ({', '.join(m['sets'])}); judge: {m['judge']}")
        for pair, tallies in m["pairs"].items():
            a, b = pair.split(" vs ")
            t = {s: Tally(v["win"], v["tie"], v["lose"], v["unparseable"], v["unjudged"]) for s, v in tallies.items()}
            lines.extend(format_table(t, a, b).splitlines())
        if m.get("report"):
            lines.append(f"           report: {m['report']}")
        summary["stages"]["evaluate"] = {"pairs": m["pairs"], "judge": m["judge"], "report": m.get("report")}
    for name, t in timings.items():
        summary["stages"].setdefault(name, {})["seconds"] = round(t, 1)
    width = max((len(l) for l in lines), default=40)
    print("=" * min(width, 110))
    print(f"rayapp run '{cfg.name}' finished in {total_s:.0f}s; outputs in {cfg.output_dir}")
    for line in lines:
        print("  " + line)
    print("=" * min(width, 110))
    storage.write_json(layout.summary, summary)
    return summary
