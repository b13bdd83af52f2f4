"""Pure math of pairwise judging: parse a judge's two scores, combine the two presentation
orders into one verdict per prompt, and aggregate (win / tie / lose, winning score, win-tie rate).

The protocol of this line of work (Vicuna/AlpaGasus-style GPT-4 review): the judge rates both
answers 1-10 and writes the two scores on its first line. Every prompt is judged twice, as (A, B)
and as (B, A), to cancel the judge's position bias.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# a number, optionally "/10" after it (e.g. "8/10"); scores outside [0, 10] are not scores
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*10(?![\d.]))?(?![\w.])")
SCORE_MIN, SCORE_MAX = 0.0, 10.0


class Unparseable(ValueError):
    """A judgment whose scores cannot be read without guessing."""


def parse_scores(text: str | None) -> tuple[float, float]:
    """The two scores on the first non-empty line of a judgment.

    Accepts "8 9", "8, 9", "8.5 9", "8/10 9/10", "Assistant 1: 8  Assistant 2: 9" and
    "Scores: 8 and 9". Anything else - no line, one number, three numbers, a score outside
    0..10 - raises Unparseable: a verdict is never guessed.
    """
    if not text or not text.strip():
        raise Unparseable("empty judgment")
    first = next(line for line in text.strip().splitlines() if line.strip()).strip()
    # "Assistant 1: 8" names the assistant with a number that is not a score
    cleaned = re.sub(r"(?i)\bassistant\s*[12]\b\s*[:=-]?", " ", first)
    cleaned = cleaned.replace("**", " ")
    numbers = [float(m.group(1)) for m in _NUMBER.finditer(cleaned)]
    if len(numbers) != 2:
        raise Unparseable(f"expected two scores on the first line, found {len(numbers)}: {first[:80]!r}")
    a, b = numbers
    for s in (a, b):
        if not SCORE_MIN <= s <= SCORE_MAX:
            raise Unparseable(f"score {s:g} outside {SCORE_MIN:g}..{SCORE_MAX:g}: {first[:80]!r}")
    return a, b


def unparseable_kind(reason: str) -> str:
    """What kind of unreadable judgment a reason names, without the quoted text (for counting)."""
    return reason.split(":", 1)[0]


def order_outcome(score_first: float, score_second: float) -> int:
    """+1 if the first-presented answer scored higher, 0 on a tie, -1 otherwise."""
    return (score_first > score_second) - (score_first < score_second)


def combine_orders(a_in_first_order: int, a_in_second_order: int) -> str:
    """One verdict for model A from its outcome in both presentation orders.

    A wins if it wins both orders, or wins one and ties the other; it loses symmetrically;
    anything else (the orders disagree, or both tie) is a tie.
    """
    total = a_in_first_order + a_in_second_order
    if total > 0:
        return "win"
    if total < 0:
        return "lose"
    return "tie"


def verdict_from_reviews(review_ab: str | None, review_ba: str | None) -> str:
    """Verdict for model A given the judge's text for order (A, B) and for order (B, A).
    Raises Unparseable if either order cannot be read."""
    a1, b1 = parse_scores(review_ab)
    b2, a2 = parse_scores(review_ba)
    return combine_orders(order_outcome(a1, b1), order_outcome(a2, b2))


@dataclass
class Tally:
    win: int = 0
    tie: int = 0
    lose: int = 0
    unparseable: int = 0
    unjudged: int = 0  # prompts the judge could not be asked about (e.g. no reference answer)

    @property
    def judged(self) -> int:
        return self.win + self.tie + self.lose

    @property
    def winning_score(self) -> float | None:
        """(W - L) / N + 1: 1 means as good as the other model, above 1 better (range 0..2)."""
        return (self.win - self.lose) / self.judged + 1 if self.judged else None

    @property
    def win_tie_rate(self) -> float | None:
        """(W + T) / N."""
        return (self.win + self.tie) / self.judged if self.judged else None

    def add(self, verdict: str) -> None:
        if verdict not in ("win", "tie", "lose", "unparseable", "unjudged"):
            raise ValueError(f"unknown verdict {verdict!r}")
        setattr(self, verdict, getattr(self, verdict) + 1)

    def merged(self, other: "Tally") -> "Tally":
        return Tally(self.win + other.win, self.tie + other.tie, self.lose + other.lose,
                     self.unparseable + other.unparseable, self.unjudged + other.unjudged)

    def as_dict(self) -> dict:
        return {"win": self.win, "tie": self.tie, "lose": self.lose, "judged": self.judged,
                "unparseable": self.unparseable, "unjudged": self.unjudged,
                "winning_score": self.winning_score, "win_tie_rate": self.win_tie_rate}


def tally_by_set(rows: Iterable[tuple[str, str]]) -> dict[str, Tally]:
    """(set, verdict) pairs -> one Tally per set plus 'overall'."""
    per: dict[str, Tally] = {}
    for set_name, verdict in rows:
        per.setdefault(set_name, Tally()).add(verdict)
    overall = Tally()
    for t in per.values():
        overall = overall.merged(t)
    per["overall"] = overall
    return per


def with_rows(model: str, rows: int | None) -> str:
    """A model's name with the rows it was fine-tuned on, e.g. 'selected [125 rows]'."""
    return model if rows is None else f"{model} [{rows} rows]"


def format_table(tallies: dict[str, Tally], model_a: str, model_b: str, rows_a: int | None = None,
                 rows_b: int | None = None) -> str:
    """A Markdown table of A's results against B, one row per set and 'overall' last; the header
    gives each model's training rows when known (a comparison at unequal sizes shows it)."""
    head = (f"| set ({with_rows(model_a, rows_a)} vs {with_rows(model_b, rows_b)}) | win | tie | lose | N | winning score | win-tie rate | unparseable |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    names = [n for n in tallies if n != "overall"] + (["overall"] if "overall" in tallies else [])
    for name in names:
        t = tallies[name]
        ws = f"{t.winning_score:.3f}" if t.winning_score is not None else "-"
        wt = f"{t.win_tie_rate:.3f}" if t.win_tie_rate is not None else "-"
        label = f"**{name}**" if name == "overall" else name
        lines.append(f"| {label} | {t.win} | {t.tie} | {t.lose} | {t.judged} | {ws} | {wt} | "
                     f"{t.unparseable}{f' (+{t.unjudged} unjudged)' if t.unjudged else ''} |")
    return "\n".join(lines)
