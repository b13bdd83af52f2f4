"""The evaluation report: results table (Markdown + HTML), a win/tie/lose bar chart, and a few
answers side by side."""

from __future__ import annotations

import html
import os

from rayapp.stages.evaluate.verdicts import Tally, format_table, with_rows


def plot_tallies(pairs: dict[str, dict[str, Tally]], path: str) -> None:
    """One horizontal stacked bar (win / tie / lose shares) per set, one panel per model pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pairs)
    rows = max(len(t) for t in pairs.values())
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 0.9 + 0.45 * rows * n), squeeze=False)
    colors = {"win": "#2e7d32", "tie": "#bdbdbd", "lose": "#c62828"}
    for ax, (pair, tallies) in zip(axes[:, 0], pairs.items()):
        names = [k for k in tallies if k != "overall"] + ["overall"]
        for y, name in enumerate(names):
            t = tallies[name]
            left = 0.0
            for part in ("win", "tie", "lose"):
                share = getattr(t, part) / t.judged if t.judged else 0.0
                ax.barh(y, share, left=left, color=colors[part], label=part if y == 0 else None)
                if share >= 0.08:
                    ax.text(left + share / 2, y, str(getattr(t, part)), ha="center", va="center", fontsize=8)
                left += share
            if not t.judged:
                ax.text(0.5, y, "nothing judged", ha="center", va="center", fontsize=8, color="#555")
        ax.set_yticks(range(len(names)), [f"{n} (N={tallies[n].judged})" for n in names])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(pair, fontsize=10)
        ax.legend(ncol=3, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("share of judged prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str, title: str, judge_name: str, pairs: dict[str, dict[str, Tally]],
                 model_info: dict[str, dict], rouge: dict[str, dict[str, float]], examples: list[dict]) -> str:
    """report.html, results.md and results.png in ``out_dir`` (local); returns the HTML path."""
    os.makedirs(out_dir, exist_ok=True)
    plot_tallies(pairs, os.path.join(out_dir, "results.png"))
    def rows(model: str) -> int | None:  # what each model was fine-tuned on, stated in every table
        return model_info.get(model, {}).get("rows")

    md = [f"# {title}", "", f"Judge: {judge_name}", ""]
    for pair, tallies in pairs.items():
        a, b = pair.split(" vs ")
        md += [format_table(tallies, a, b, rows(a), rows(b)), ""]
    if rouge:
        sets = sorted({s for per in rouge.values() for s in per})
        md += ["ROUGE-L F1 against reference answers (sets that have them):", "",
               "| model | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
        md += [f"| {m} | " + " | ".join(f"{per.get(s, float('nan')):.3f}" for s in sets) + " |" for m, per in rouge.items()]
        md.append("")
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    def table_html(tallies: dict[str, Tally]) -> str:
        head = "<tr><th>set</th><th>win</th><th>tie</th><th>lose</th><th>N</th><th>winning score</th><th>win-tie rate</th><th>unparseable</th><th>unjudged</th></tr>"
        body = ""
        for name in [k for k in tallies if k != "overall"] + ["overall"]:
            t = tallies[name]
            ws = f"{t.winning_score:.3f}" if t.winning_score is not None else "-"
            wt = f"{t.win_tie_rate:.3f}" if t.win_tie_rate is not None else "-"
            body += (f"<tr><th>{html.escape(name)}</th><td>{t.win}</td><td>{t.tie}</td><td>{t.lose}</td><td>{t.judged}</td>"
                     f"<td>{ws}</td><td>{wt}</td><td>{t.unparseable}</td><td>{t.unjudged}</td></tr>")
        return f"<table>{head}{body}</table>"

    models = "".join(f"<tr><th>{html.escape(m)}</th><td>{html.escape(str(i.get('path')))}</td>"
                     f"<td>{html.escape(str(i.get('data', '')))}</td>"
                     f"<td>{'' if i.get('rows') is None else i['rows']}</td></tr>" for m, i in model_info.items())

    def pair_title(pair: str) -> str:
        a, b = pair.split(" vs ")
        return html.escape(f"{with_rows(a, rows(a))} vs {with_rows(b, rows(b))}")

    tables = "".join(f"<h2>{pair_title(p)}</h2>{table_html(t)}" for p, t in pairs.items())
    ex = "".join(
        f"<tr><td>{html.escape(e['set'])}</td><td>{html.escape(e['question'][:400])}</td>"
        f"<td>{html.escape(e['answer_a'][:400])}</td><td>{html.escape(e['answer_b'][:400])}</td>"
        f"<td>{html.escape(e['verdict'])}</td></tr>" for e in examples)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}}
td{{max-width:380px}}</style></head><body>
<h1>{html.escape(title)}</h1><p>Judge: {html.escape(judge_name)}. A model wins a prompt if it wins both
presentation orders, or wins one and ties the other; winning score = (W&minus;L)/N + 1, win-tie rate = (W+T)/N.</p>
<table><tr><th>model</th><th>path</th><th>trained on</th><th>rows</th></tr>{models}</table>
{tables}<figure><img src="results.png" alt="win / tie / lose per set"></figure>
<h2>Some answers side by side</h2><table><tr><th>set</th><th>prompt</th><th>A</th><th>B</th><th>verdict for A</th></tr>{ex}</table>
</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
