"""Hardness transfer between two models' trajectories: rank correlations of LP(1) and LP_app, and
overlap of the selected sets at each budget (global variant: no text is needed)."""

from __future__ import annotations

import numpy as np

from rayapp.selection.methods import Trajectories
from rayapp.selection.metrics import learning_percentage, learning_percentage_approx, no_response_rows
from rayapp.selection.strategies import select

BUDGETS = (0.01, 0.03, 0.05, 0.10, 0.25, 0.33)


def _take(t: Trajectories, idx: np.ndarray) -> Trajectories:
    return Trajectories(ids=t.ids[idx], P=t.P[idx], n_tokens=None if t.n_tokens is None else t.n_tokens[idx])


def align_by_id(a: Trajectories, b: Trajectories) -> tuple[Trajectories, Trajectories, int]:
    """Both trajectories on the rows they share, in ``a``'s order, and how many rows only one has.
    Rows are matched by id (a hash of their text), so runs with different tokenizers, models of
    different families, compare row for row."""
    pos_b = {rid: i for i, rid in enumerate(b.ids)}
    ia = np.asarray([i for i, rid in enumerate(a.ids) if rid in pos_b], dtype=np.int64)
    ib = np.asarray([pos_b[rid] for rid in a.ids[ia]], dtype=np.int64)
    return _take(a, ia), _take(b, ib), len(a.ids) + len(b.ids) - 2 * len(ia)


def compare_pair(a: Trajectories, b: Trajectories, budgets=BUDGETS, response_length: np.ndarray | None = None) -> dict:
    from scipy.stats import kendalltau, spearmanr

    if len(a.ids) != len(b.ids) or not np.array_equal(a.ids, b.ids):
        raise ValueError("trajectories must cover the same ids in the same order")
    keep = ~(no_response_rows(a.P, a.n_tokens) | no_response_rows(b.P, b.n_tokens))
    row = {"rows": int(keep.sum()), "excluded_no_response": int((~keep).sum())}
    for name, fa, fb in (
        ("lp1", learning_percentage(a.P, 1), learning_percentage(b.P, 1)),
        ("lp_app", learning_percentage_approx(a.P[:, 0], a.P[:, 1]), learning_percentage_approx(b.P[:, 0], b.P[:, 1])),
    ):
        row[f"{name}_spearman"] = float(spearmanr(fa[keep], fb[keep]).statistic)
        row[f"{name}_kendall"] = float(kendalltau(fa[keep], fb[keep]).statistic)
    for budget in budgets:
        sa, _ = select("lp", a, budget)
        sb, _ = select("lp", b, budget)
        inter = len(np.intersect1d(sa, sb))
        row[f"overlap@{budget:.0%}"] = inter / max(1, len(sa))  # share of A's picks that B picks too
        if response_length is not None:
            row[f"mean_len_a@{budget:.0%}"] = float(np.mean(response_length[sa]))
            row[f"mean_len_b@{budget:.0%}"] = float(np.mean(response_length[sb]))
    return row


def format_table(rows: dict[str, dict], budgets=BUDGETS) -> str:
    head = ["model", "LP(1) Spearman", "LP(1) Kendall", "LP_app Spearman"] + [f"overlap@{b:.0%}" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        vals = [name, f"{r['lp1_spearman']:.3f}", f"{r['lp1_kendall']:.3f}", f"{r['lp_app_spearman']:.3f}"]
        vals += [f"{r[f'overlap@{b:.0%}']:.3f}" for b in budgets]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_overlap(rows: dict[str, dict], reference: str, path: str, budgets=BUDGETS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, r in rows.items():
        ax1.plot([b * 100 for b in budgets], [r[f"overlap@{b:.0%}"] for b in budgets], marker="o", label=name)
    ax1.set_xlabel("budget (% of rows, hardest by LP(1))")
    ax1.set_ylabel(f"share also picked by {reference}")
    ax1.set_title("Overlap of LP selections")
    ax1.legend(fontsize=8)
    names = list(rows)
    ax2.bar(np.arange(len(names)) - 0.2, [rows[n]["lp1_spearman"] for n in names], 0.4, label="LP(1)")
    ax2.bar(np.arange(len(names)) + 0.2, [rows[n]["lp_app_spearman"] for n in names], 0.4, label="LP_app")
    ax2.set_xticks(range(len(names)), names, rotation=20)
    ax2.set_ylabel(f"Spearman vs {reference}")
    ax2.set_title("Rank correlation of hardness")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
