"""The page for blind judging by people, driven in headless Chromium (Playwright on the system's
browser), and `rayapp judge-report --human` reading what it exports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from rayapp.stages.evaluate import human
from tests.conftest import REPO

PROMPTS = [
    {"set": "vicuna", "id": "v1", "question": "Name a fruit."},
    {"set": "vicuna", "id": "v2", "question": "What is 2+2? </script><b>not bold</b>"},
    {"set": "sinstruct", "id": "s1", "question": "Say hi."},
    {"set": "sinstruct", "id": "s2", "question": "Count to three."},
]
ANSWERS = {
    "selected": {"v1": "An apple.", "v2": "4", "s1": "Hi!", "s2": "1, 2, 3"},
    "full": {"v1": "Banana", "v2": "Four.", "s1": "Hello", "s2": "one two three"},
}


def test_choices_map_back_to_models_through_the_key(tmp_path):
    items, key = human.build_items([("selected", "full")], PROMPTS, ANSWERS, seed=3)
    assert {it["item"] for it in items} == set(key["items"]) and len(items) == 4
    assert not any("selected" in json.dumps(it) or "full" in json.dumps(it) for it in items)  # names hidden
    sides = {k["left"] for k in key["items"].values()}
    assert sides == {"a", "b"}  # both orders occur (seeded)
    page = human.write_page(str(tmp_path), "t", items, key)
    choices = tmp_path / "c.jsonl"
    a_left = next(i for i, k in key["items"].items() if k["left"] == "a")
    b_left = next(i for i, k in key["items"].items() if k["left"] == "b")
    choices.write_text("".join(json.dumps({"page_id": key["page_id"], "item": i, "choice": "left"}) + "\n"
                               for i in (a_left, b_left)))
    tallies = human.read_choices(str(choices), str(tmp_path / human.KEY))["selected vs full"]["overall"]
    assert (tallies.win, tallies.lose, tallies.tie, tallies.unjudged) == (1, 1, 0, 2)
    choices.write_text(json.dumps({"page_id": "other", "item": a_left, "choice": "left"}) + "\n")
    with pytest.raises(ValueError, match="c.jsonl:1: field 'page_id'"):
        human.read_choices(str(choices), str(tmp_path / human.KEY))
    assert "</script><b>" not in open(page).read()  # answers cannot end the data block


@pytest.mark.slow
def test_people_judge_in_chromium_and_the_report_counts_them(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (`make test` installs it where it can)")
    from playwright.sync_api import sync_playwright

    items, key = human.build_items([("selected", "full")], PROMPTS, ANSWERS, seed=3)
    page_path = human.write_page(str(tmp_path / "human"), "Which answer is better?", items, key)
    out = tmp_path / "choices.jsonl"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        ctx = browser.new_context(accept_downloads=True)
        page = ctx.new_page()
        page.goto(f"file://{page_path}")
        assert page.inner_text("#progress") == "0 of 4 judged"
        body = page.inner_text("body")
        assert "selected" not in body and "full" not in body  # blind
        assert page.inner_text("#question") == items[0]["question"]
        assert page.inner_text("#left") == items[0]["left"]
        page.click("#choose-left")      # item 0: the left answer
        page.click("#choose-tie")       # item 1: a tie
        page.keyboard.press("b")        # item 2: the right answer, by keyboard
        assert page.inner_text("#progress") == "3 of 4 judged"
        page.reload()                   # kept in the browser's local storage
        assert page.inner_text("#progress") == "3 of 4 judged"
        assert page.inner_text("#question") == items[3]["question"]  # back at the first unjudged prompt
        with page.expect_download() as download:
            page.click("#export")
        download.value.save_as(str(out))
        browser.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["item"], r["choice"]) for r in lines] == [
        (items[0]["item"], "left"), (items[1]["item"], "tie"), (items[2]["item"], "right")]

    proc = subprocess.run([sys.executable, "-m", "rayapp", "judge-report", "--human", str(out),
                           "--key", str(tmp_path / "human" / "key.json")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    k = key["items"]
    verdicts = ["win" if (k[items[0]["item"]]["left"] == "a") else "lose", "tie",
                "win" if (k[items[2]["item"]]["left"] == "b") else "lose"]
    overall = next(line for line in proc.stdout.splitlines() if line.startswith("| **overall**"))
    cells = [c.strip() for c in overall.strip("|").split("|")]
    assert cells[1:5] == [str(verdicts.count("win")), "1", str(verdicts.count("lose")), "3"]
    assert "3 prompts judged by people" in proc.stdout and "1 not yet" in proc.stdout


@pytest.mark.slow
def test_a_conversation_prompt_is_shown_turn_by_turn_in_chromium(tmp_path):
    """A conversation prompt (an eval set of conversations) shows each turn under its speaker's
    name, as text (markup in a turn stays text)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (`make test` installs it where it can)")
    from playwright.sync_api import sync_playwright

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
             {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "<b>Another</b>?"}]
    prompt = {"set": "chats", "id": "c1", "question": "unused for conversations", "turns": turns}
    items, key = human.build_items([("selected", "full")], [prompt],
                                   {"selected": {"c1": "A pear."}, "full": {"c1": "Plum"}}, seed=0)
    page_path = human.write_page(str(tmp_path / "human"), "Which answer is better?", items, key)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"file://{page_path}")
        shown = page.locator("#question .turn").all_inner_texts()
        assert shown == ["System: Be brief.", "User: Name a fruit.", "Assistant: An apple.", "User: <b>Another</b>?"]
        assert page.locator("#question .turn.assistant").count() == 1
        browser.close()
