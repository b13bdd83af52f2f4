"""Judging math: score parsing, the two-order protocol, tallies - and the real GPT-4 judgments."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rayapp.stages.evaluate.judge_report import read_judgments
from rayapp.stages.evaluate.verdicts import (
    Tally,
    Unparseable,
    combine_orders,
    format_table,
    order_outcome,
    parse_scores,
    tally_by_set,
    verdict_from_reviews,
)
from tests.conftest import SHARED


@pytest.mark.parametrize("text, expected", [
    ("8 9", (8, 9)),
    ("8, 9\nBecause ...", (8, 9)),
    ("8.5 9", (8.5, 9)),
    ("  \n9 8.5\nreasons", (9, 8.5)),
    ("8/10 9/10", (8, 9)),
    ("Assistant 1: 7  Assistant 2: 10", (7, 10)),
    ("Scores: 6 and 4", (6, 4)),
    ("**7** **3**", (7, 3)),
    ("0 10", (0, 10)),
])
def test_parse_scores_formats(text, expected):
    assert parse_scores(text) == expected


@pytest.mark.parametrize("text", [
    "", "   \n  ", None, "Both answers are good.", "9", "8 9 7", "11 3", "8 -", "the scores are 1, 2 and 3",
    "Assistant 1 is better",
])
def test_unparseable_is_never_guessed(text):
    with pytest.raises(Unparseable):
        parse_scores(text)


def test_combine_orders_table():
    # (A in order AB, A in order BA) -> verdict for A
    table = {(1, 1): "win", (1, 0): "win", (0, 1): "win", (0, 0): "tie", (1, -1): "tie", (-1, 1): "tie",
             (-1, 0): "lose", (0, -1): "lose", (-1, -1): "lose"}
    for (x, y), verdict in table.items():
        assert combine_orders(x, y) == verdict


def test_position_bias_cancels():
    # a judge that always prefers whatever it sees first: A wins order AB, loses order BA -> tie
    assert verdict_from_reviews("9 5", "9 5") == "tie"
    assert verdict_from_reviews("9 5", "5 9") == "win"  # second text is (B, A): A scored 9 there too
    assert verdict_from_reviews("5 5", "6 5") == "lose"


@given(st.floats(0, 10), st.floats(0, 10), st.floats(0, 10), st.floats(0, 10))
def test_swapping_models_mirrors_the_verdict(a1, b1, b2, a2):
    forward = combine_orders(order_outcome(a1, b1), order_outcome(a2, b2))
    backward = combine_orders(order_outcome(b2, a2), order_outcome(b1, a1))
    assert {"win": "lose", "lose": "win", "tie": "tie"}[forward] == backward


def test_tally_scores():
    t = tally_by_set([("s", "win")] * 5 + [("s", "tie")] * 3 + [("s", "lose")] * 2 + [("s", "unparseable")])
    s = t["s"]
    assert (s.win, s.tie, s.lose, s.judged, s.unparseable) == (5, 3, 2, 10, 1)
    assert s.winning_score == pytest.approx((5 - 2) / 10 + 1)
    assert s.win_tie_rate == pytest.approx(0.8)
    assert Tally().winning_score is None
    assert "| s | 5 | 3 | 2 | 10 | 1.300 | 0.800 | 1 |" in format_table(t, "A", "B")


def test_real_gpt4_judgments_corpus():
    """The 1,030 real GPT-4 judgments: every prompt counted once, in both orders."""
    tallies, reasons = read_judgments(str(SHARED / "judge-reviews"))
    sizes = {"vicuna": 80, "koala": 180, "wizardlm": 218, "sinstruct": 252, "lima": 300}
    for name, n in sizes.items():
        t = tallies[name]
        assert t.judged + t.unparseable == n
    overall = tallies["overall"]
    assert overall.judged + overall.unparseable == 1030
    assert overall.unparseable == sum(reasons.values())
    assert 0 <= overall.winning_score <= 2 and 0 <= overall.win_tie_rate <= 1
    # recount the first set by hand from the raw texts
    w = t_ = l_ = 0
    for line in (SHARED / "judge-reviews" / "vicuna.jsonl").read_text().splitlines():
        r = json.loads(line)
        a1, b1 = map(float, r["review"].split("\n")[0].replace(",", " ").split())
        b2, a2 = map(float, r["review_reverse"].split("\n")[0].replace(",", " ").split())
        s = (a1 > b1) - (a1 < b1) + (a2 > b2) - (a2 < b2)
        w, t_, l_ = w + (s > 0), t_ + (s == 0), l_ + (s < 0)
    assert (tallies["vicuna"].win, tallies["vicuna"].tie, tallies["vicuna"].lose) == (w, t_, l_)


def test_judge_report_cli(tmp_path, capsys):
    from rayapp.cli import main

    bad = tmp_path / "mine.jsonl"
    bad.write_text(json.dumps({"review": "8 9\nok", "review_reverse": "no scores here"}) + "\n"
                   + json.dumps({"review": "9 2", "review_reverse": "3 8"}) + "\n")
    assert main(["judge-report", "--judgments", str(bad), "--names", "lp,full", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| mine | 1 | 0 | 0 | 1 | 2.000 | 1.000 | 1 |" in out and "unparseable: 1 x" in out
    assert (tmp_path / "o" / "judge-report.png").stat().st_size > 1000
    assert main(["judge-report", "--judgments", str(tmp_path / "none")]) == 1
