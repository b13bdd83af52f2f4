"""`rayapp judge-report`: win / tie / lose from pairwise judgments that already exist.

Reads JSONL files with ``review`` (the judge's text for answers in the order 1, 2) and
``review_reverse`` (order 2, 1) - the format of the GPT-4 judgments in this line of work and of
rayapp's own ``judgments/*.jsonl`` (``review_ab`` / ``review_ba``). The set name is the file stem.
"""

from __future__ import annotations

import os
from collections import Counter

from rayapp.core import storage
from rayapp.stages.evaluate.verdicts import (
    Tally,
    Unparseable,
    format_table,
    tally_by_set,
    unparseable_kind,
    verdict_from_reviews,
)


def _files(path: str) -> list[str]:
    if path.endswith(".jsonl"):
        return [path]
    files = storage.list_files(path, ".jsonl")
    if not files:
        raise FileNotFoundError(f"no .jsonl judgment files in {path}")
    return files


def read_judgments(path: str) -> tuple[dict[str, Tally], dict[str, int]]:
    """Tallies per set (+ 'overall') for the model whose answers are answer_1, and the reasons
    unparseable judgments could not be read."""
    verdicts: list[tuple[str, str]] = []
    reasons: Counter[str] = Counter()
    for f in _files(path):
        set_name = os.path.splitext(os.path.basename(f))[0]
        for lineno, rec in storage.jsonl_records(f, storage.read_bytes(f).decode("utf-8")):
            ab = rec.get("review", rec.get("review_ab"))
            ba = rec.get("review_reverse", rec.get("review_ba"))
            if ab is None and ba is None and rec.get("verdict") == "unjudged":
                verdicts.append((set_name, "unjudged"))
                continue
            if ab is None or ba is None:
                raise ValueError(f"{f}:{lineno}: needs fields 'review' and 'review_reverse'")
            try:
                verdicts.append((set_name, verdict_from_reviews(ab, ba)))
            except Unparseable as exc:
                verdicts.append((set_name, "unparseable"))
                reasons[unparseable_kind(str(exc))] += 1
    return tally_by_set(verdicts), dict(reasons)


def human_main(choices: str, key: str, out: str | None) -> int:
    """The table of people's blind choices, one per compared pair."""
    from rayapp.stages.evaluate.human import read_choices

    pairs = read_choices(choices, key)
    for pair, tallies in pairs.items():
        a, b = pair.split(" vs ")
        print(format_table(tallies, a, b))
        o = tallies["overall"]
        print(f"\n{pair}: {o.judged} prompts judged by people (one random order each), {o.unjudged} not yet"
              + (f"; winning score {o.winning_score:.3f}, win-tie rate {o.win_tie_rate:.3f}" if o.judged else "")
              + "\n")
    if out:
        from rayapp.stages.evaluate.report import plot_tallies

        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "human-report.md"), "w") as f:
            f.write("\n\n".join(format_table(t, *p.split(" vs ")) for p, t in pairs.items()) + "\n")
        plot_tallies(pairs, os.path.join(out, "human-report.png"))
        print(f"table and plot in {out}")
    return 0


def main(path: str, name_a: str, name_b: str, out: str | None) -> int:
    tallies, reasons = read_judgments(path)
    table = format_table(tallies, name_a, name_b)
    print(table)
    o = tallies["overall"]
    print(f"\n{name_a} vs {name_b}: {o.judged} prompts judged in both orders; "
          f"winning score {o.winning_score:.3f}, win-tie rate {o.win_tie_rate:.3f}; {o.unparseable} unparseable"
          if o.judged else f"\nnothing could be judged; {o.unparseable} unparseable")
    for reason, n in reasons.items():
        print(f"  unparseable: {n} x {reason}")
    if out:
        from rayapp.stages.evaluate.report import plot_tallies

        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "judge-report.md"), "w") as f:
            f.write(table + "\n")
        plot_tallies({f"{name_a} vs {name_b}": tallies}, os.path.join(out, "judge-report.png"))
        print(f"table and plot in {out}")
    return 0
