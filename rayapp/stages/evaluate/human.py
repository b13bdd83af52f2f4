"""Blind pairwise judging by people: one self-contained HTML page, and its results read back.

The page shows one prompt at a time with two answers side by side, in a seeded random order per
prompt, and no model names: which side is which model lives only in ``key.json`` beside it (keep
it from the judges). Choices (left / right / tie) stay in the browser's local storage, so a judge
can close the page and come back; "Export" downloads them as JSONL. ``rayapp judge-report
--human CHOICES.jsonl --key key.json`` turns them into the win / tie / lose table of the automatic
judges (the same Tally: winning score, win-tie rate; prompts left unjudged are counted as such).
Each prompt is judged once, in one order; the random order is what cancels position bias here.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random

from rayapp.stages.evaluate.verdicts import Tally, tally_by_set

PAGE = "index.html"
KEY = "key.json"


def build_items(pairs: list[tuple[str, str]], prompts: list[dict], answers: dict[str, dict[str, str]],
                seed: int = 0) -> tuple[list[dict], dict]:
    """Page items (no model names) and the key that maps each item back to its models."""
    rng = random.Random(seed)
    items, key = [], {}
    for p_index, (a, b) in enumerate(pairs):
        for p in prompts:
            item = f"{p_index}-{p['id']}"
            a_left = rng.random() < 0.5
            left, right = (answers[a][p["id"]], answers[b][p["id"]])
            if not a_left:
                left, right = right, left
            items.append({"item": item, "set": p["set"], "question": p["question"], "left": left, "right": right})
            if len(p.get("turns") or []) > 1:  # a conversation: shown turn by turn
                items[-1]["turns"] = p["turns"]
            key[item] = {"model_a": a, "model_b": b, "set": p["set"], "prompt_id": p["id"],
                         "left": "a" if a_left else "b"}
    rng.shuffle(items)  # the same prompt's pairs, and the pairs' order, are not told by position
    page_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return items, {"page_id": page_id, "items": key}


def write_page(out_dir: str, title: str, items: list[dict], key: dict) -> str:
    """``index.html`` (self-contained: no network, no external script) and ``key.json``."""
    os.makedirs(out_dir, exist_ok=True)
    data = json.dumps({"page_id": key["page_id"], "items": items}, ensure_ascii=False).replace("</", "<\\/")
    page = _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    path = os.path.join(out_dir, PAGE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    with open(os.path.join(out_dir, KEY), "w", encoding="utf-8") as f:
        json.dump(key, f, indent=1, ensure_ascii=False)
    return path


def read_choices(choices_path: str, key_path: str) -> dict[str, dict[str, Tally]]:
    """{'A vs B': tallies per set (+ overall)} for model A of each pair, from an exported JSONL."""
    with open(key_path, encoding="utf-8") as f:
        key = json.load(f)
    from rayapp.core.storage import jsonl_records

    chosen: dict[str, str] = {}
    with open(choices_path, encoding="utf-8") as f:
        text = f.read()
    for lineno, rec in jsonl_records(choices_path, text):
        if rec.get("page_id") != key["page_id"]:
            raise ValueError(f"{choices_path}:{lineno}: field 'page_id': {rec.get('page_id')!r} is another "
                             f"page's (this key is for {key['page_id']!r})")
        if rec.get("item") not in key["items"]:
            raise ValueError(f"{choices_path}:{lineno}: field 'item': {rec.get('item')!r} is not on the page")
        if rec.get("choice") not in ("left", "right", "tie"):
            raise ValueError(f"{choices_path}:{lineno}: field 'choice': {rec.get('choice')!r} is not "
                             "left, right or tie")
        chosen[rec["item"]] = rec["choice"]  # a later line is a changed mind
    rows: dict[str, list[tuple[str, str]]] = {}
    for item, k in key["items"].items():
        pair = f"{k['model_a']} vs {k['model_b']}"
        choice = chosen.get(item)
        if choice is None:
            verdict = "unjudged"
        elif choice == "tie":
            verdict = "tie"
        else:
            verdict = "win" if (choice == "left") == (k["left"] == "a") else "lose"
        rows.setdefault(pair, []).append((k["set"], verdict))
    return {pair: tally_by_set(v) for pair, v in rows.items()}


_TEMPLATE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{display:flex;gap:1em;align-items:center;padding:.6em 1.2em;background:#263238;color:#fff}
header h1{font-size:1.05em;margin:0;flex:1}
main{max-width:1200px;margin:1em auto;padding:0 1em}
.q{background:#fff;border:1px solid #ddd;padding:1em;white-space:pre-wrap;border-radius:6px}
.turn{margin:.3em 0 .8em}.turn.assistant{color:#37474f;padding-left:1em;border-left:3px solid #90a4ae}
.answers{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin-top:1em}
.answer{background:#fff;border:2px solid #ddd;padding:1em;white-space:pre-wrap;border-radius:6px;min-height:6em}
.answer.chosen{border-color:#2e7d32}.tie .answer{border-color:#f9a825}
.controls{display:flex;gap:.6em;justify-content:center;margin:1em 0}
button{font-size:1em;padding:.5em 1.1em;border-radius:5px;border:1px solid #888;background:#fff;cursor:pointer}
button.primary{background:#1565c0;color:#fff;border-color:#1565c0}
.muted{color:#777;font-size:.9em}
</style></head><body>
<header><h1>__TITLE__</h1><span id="progress"></span>
<button id="export">Export choices (JSONL)</button></header>
<main>
<p class="muted">Which answer follows the instruction better? The answers come from two anonymous
models, in random order. Keys: <b>A</b> or &larr; left, <b>B</b> or &rarr; right, <b>T</b> tie,
<b>N</b>/<b>P</b> next/previous. Choices are kept in this browser until you export them.</p>
<div class="muted" id="where"></div>
<div class="q" id="question"></div>
<div class="answers" id="answers"><div class="answer" id="left"></div><div class="answer" id="right"></div></div>
<div class="controls">
<button id="prev">&larr; Previous (P)</button>
<button class="primary" id="choose-left">A is better</button>
<button class="primary" id="choose-tie">Tie</button>
<button class="primary" id="choose-right">B is better</button>
<button id="next">Next (N) &rarr;</button>
</div>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const STORE = "rayapp-human-" + DATA.page_id;
let choices = {};
try { choices = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) { choices = {}; }
let at = DATA.items.findIndex(it => !(it.item in choices));
if (at < 0) at = 0;
function save() { localStorage.setItem(STORE, JSON.stringify(choices)); }
function show() {
  const it = DATA.items[at];
  document.getElementById("where").textContent = "prompt " + (at + 1) + " of " + DATA.items.length + " (" + it.set + ")";
  const q = document.getElementById("question");
  q.replaceChildren();
  if (it.turns) {
    for (const t of it.turns) {
      const turn = document.createElement("div");
      turn.className = "turn " + t.role;
      const who = document.createElement("b");
      who.textContent = t.role.charAt(0).toUpperCase() + t.role.slice(1) + ": ";
      turn.append(who, document.createTextNode(t.content));
      q.append(turn);
    }
  } else {
    q.textContent = it.question;
  }
  document.getElementById("left").textContent = it.left;
  document.getElementById("right").textContent = it.right;
  const c = choices[it.item] ? choices[it.item].choice : null;
  document.getElementById("left").classList.toggle("chosen", c === "left");
  document.getElementById("right").classList.toggle("chosen", c === "right");
  document.getElementById("answers").classList.toggle("tie", c === "tie");
  const done = DATA.items.filter(x => x.item in choices).length;
  document.getElementById("progress").textContent = done + " of " + DATA.items.length + " judged";
}
function choose(choice) {
  choices[DATA.items[at].item] = {choice: choice, at: new Date().toISOString()};
  save();
  const next = DATA.items.findIndex((x, i) => i > at && !(x.item in choices));
  if (next >= 0) at = next; else if (at < DATA.items.length - 1) at += 1;
  show();
}
function move(step) { at = Math.min(DATA.items.length - 1, Math.max(0, at + step)); show(); }
function exportChoices() {
  const lines = DATA.items.filter(it => it.item in choices).map(it => JSON.stringify(
    {page_id: DATA.page_id, item: it.item, choice: choices[it.item].choice, at: choices[it.item].at}));
  const blob = new Blob([lines.join("\\n") + (lines.length ? "\\n" : "")], {type: "application/jsonl"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "rayapp-human-" + DATA.page_id + ".jsonl";
  document.body.appendChild(a); a.click(); a.remove();
}
document.getElementById("choose-left").onclick = () => choose("left");
document.getElementById("choose-right").onclick = () => choose("right");
document.getElementById("choose-tie").onclick = () => choose("tie");
document.getElementById("prev").onclick = () => move(-1);
document.getElementById("next").onclick = () => move(1);
document.getElementById("export").onclick = exportChoices;
document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  if (k === "a" || k === "arrowleft") choose("left");
  else if (k === "b" || k === "arrowright") choose("right");
  else if (k === "t") choose("tie");
  else if (k === "n") move(1);
  else if (k === "p") move(-1);
});
show();
</script></body></html>
"""
