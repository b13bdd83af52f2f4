"""The selection report: an HTML page with PNG plots, viewable in any browser."""

from __future__ import annotations

import html
import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def overlap_matrix(selections: dict[str, np.ndarray]) -> np.ndarray:
    """Jaccard overlap of every pair of selections (their ids or positions)."""
    return np.array([[jaccard(selections[a], selections[b]) for b in selections] for a in selections])


def jaccard_from_counts(common: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The same matrix from each pair's rows in common and each selection's size."""
    union = sizes[:, None] + sizes[None, :] - common
    return np.where(union > 0, common / np.maximum(union, 1), 1.0)


def write_report(
    out_dir: str,
    title: str,
    P: np.ndarray,
    lp: np.ndarray,
    selected: np.ndarray,
    eligible: np.ndarray,
    response_tokens: np.ndarray | None,
    cluster_sizes: np.ndarray | None,
    overlap: tuple[list[str], np.ndarray] | None,
    examples: list[dict] | None,
    provenance: dict,
    length_label: str = "response tokens",
) -> str:
    """Write report.html and its PNGs into ``out_dir`` (local); returns the HTML path. The rows
    (``P``, ``lp``, ``eligible``, ``response_tokens``; ``selected`` indexes them) may be a sample;
    ``cluster_sizes`` (eligible rows per cluster) and ``overlap`` (the selections' names and their
    Jaccard matrix) are of every row."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    figs: list[tuple[str, str]] = []
    sel_mask = np.zeros(len(P), dtype=bool)
    sel_mask[selected] = True
    rej_mask = eligible & ~sel_mask

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        figs.append((name, caption))

    # 1. LP distribution with the cut
    fig, ax = plt.subplots(figsize=(7, 3.6))
    vals = lp[eligible]
    lo, hi = np.quantile(vals, [0.005, 0.995]) if len(vals) else (0, 1)
    bins = np.linspace(lo, hi, 60) if hi > lo else 30
    ax.hist(np.clip(vals, lo, hi), bins=bins, color="#9db4c0", label="all eligible rows")
    ax.hist(np.clip(lp[sel_mask], lo, hi), bins=bins, color="#c0392b", alpha=0.8, label="selected")
    if sel_mask.any() and rej_mask.any():
        ax.axvline(np.median(lp[sel_mask]), color="#c0392b", ls="--", lw=1, label="median of selected")
    ax.set_xlabel(f"learning percentage LP({provenance.get('lp_epoch', 1)})  (low = learned late = hard)")
    ax.set_ylabel("rows")
    ax.legend()
    save(fig, "lp_hist.png", "Distribution of LP over eligible rows; the selected rows in red.")

    # 2. mean perplexity trajectories
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = np.arange(P.shape[1])
    for mask, name, color in ((sel_mask, "selected", "#c0392b"), (rej_mask, "not selected", "#2c7fb8")):
        if mask.any():
            med = np.median(P[mask], axis=0)
            q1, q3 = np.quantile(P[mask], [0.25, 0.75], axis=0)
            ax.plot(epochs, med, marker="o", color=color, label=f"{name} (median, n={mask.sum()})")
            ax.fill_between(epochs, q1, q3, color=color, alpha=0.15)
    ax.set_yscale("log")
    ax.set_xticks(epochs, [f"P{i}" for i in epochs])
    ax.set_xlabel("checkpoint (P0 = before training, Pi = after epoch i)")
    ax.set_ylabel("perplexity (log)")
    ax.legend()
    save(fig, "trajectories.png", "Perplexity trajectories: median and inter-quartile band.")

    # 3. response lengths
    if response_tokens is not None:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        rt = np.asarray(response_tokens)
        bins = np.linspace(0, np.quantile(rt[eligible], 0.99) if eligible.any() else 1, 50)
        ax.hist(rt[eligible], bins=bins, density=True, alpha=0.6, label=f"all (mean {rt[eligible].mean():.0f})")
        if sel_mask.any():
            ax.hist(rt[sel_mask], bins=bins, density=True, alpha=0.6, color="#c0392b",
                    label=f"selected (mean {rt[sel_mask].mean():.0f})")
        ax.set_xlabel(length_label)
        ax.legend()
        save(fig, "lengths.png", "Response length: LP is known to favour long responses; compare with `longest`.")

    # 4. cluster sizes
    if cluster_sizes is not None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        sizes = np.asarray(cluster_sizes) if len(cluster_sizes) else np.zeros(1)
        ax.hist(sizes, bins=min(40, max(5, len(np.unique(sizes)))), color="#7f8c8d")
        ax.set_xlabel("rows per cluster")
        ax.set_ylabel("clusters")
        save(fig, "clusters.png", f"Cluster sizes ({len(sizes)} k-means clusters).")

    # 5. overlap between methods
    if overlap is not None and len(overlap[0]) > 1:
        names, m = overlap
        fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 0.8 + 0.65 * len(names)))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] < 0.6 else "k", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
        save(fig, "overlap.png", "Jaccard overlap between the selections of each method at the same budget.")

    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in provenance.items()
        if not isinstance(v, (dict, list))
    )
    ex_html = ""
    if examples:
        def turns_html(messages):
            """A conversation turn by turn; the last assistant turn is the response column."""
            return "".join(f"<div class='turn {m['role']}'><b>{m['role'].title()}:</b> "
                           f"{html.escape(m['content'][:300])}</div>" for m in messages[:-1])

        def ex_table(items, heading):
            body = "".join(
                f"<tr><td>{e['lp']:.3f}</td><td>"
                + (turns_html(e["messages"]) if e.get("messages") else html.escape(e["instruction"][:300]))
                + f"</td><td>{html.escape(e['output'][:300])}</td></tr>" for e in items
            )
            return f"<h3>{heading}</h3><table class=ex><tr><th>LP</th><th>instruction</th><th>response</th></tr>{body}</table>"

        k = min(5, len(examples) // 2)
        ex_html = ex_table(examples[:k], "Hardest rows (lowest LP)") + ex_table(examples[-k:][::-1], "Easiest rows (highest LP)")
    imgs = "".join(f"<figure><img src='{n}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}</figcaption></figure>" for n, c in figs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;font-size:14px}}
figure{{display:inline-block;margin:0 1em 1em 0}}figcaption{{font-size:13px;color:#555;max-width:600px}}
table.ex td{{max-width:460px}}.turn{{margin:0 0 .5em}}.turn.assistant{{color:#455a64}}</style></head><body>
<h1>{html.escape(title)}</h1><table>{rows}</table>{imgs}{ex_html}</body></html>"""
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
