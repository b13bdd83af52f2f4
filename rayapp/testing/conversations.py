"""Multi-turn conversations built from real single-turn rows, for tests and the conversation demo.

No conversation set ships with rayapp's data, so this builds one from the shared Dolly rows by a
fixed rule, the same on every machine:

1. Each Dolly row (in file order) gets a topic: the longest alphabetic word of its instruction,
   lowercased (the first such word on ties). Rows with the same topic are related.
2. Related rows are chained in file order, up to three at a time: each becomes one exchange, the
   user turn being its instruction (and its context after a blank line, where it has one), the
   assistant turn its response. A topic's leftover single row makes no conversation.
3. Every third conversation opens with a system prompt (one of ``SYSTEM_PROMPTS``, in turn).
4. Conversations alternate between the OpenAI ``messages`` format and ShareGPT's
   ``conversations`` (``from``: system/human/gpt); the two go to separate files.

``python -m rayapp.testing.conversations [N]`` writes the first N (default 160) as
``rayapp/assets/conversations-messages.jsonl`` and ``conversations-sharegpt.json``, and the next
``EVAL_ROWS`` as an evaluation set, ``conversations-eval.jsonl``: each conversation's last assistant
turn is the reference answer to the turns before it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import OrderedDict

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a knowledgeable assistant. Answer accurately and concisely.",
    "You are a friendly tutor who explains things clearly.",
)
EVAL_ROWS = 24
SHAREGPT_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}
_WORD = re.compile(r"[A-Za-z]+")


def topic(instruction: str) -> str | None:
    words = _WORD.findall(instruction)
    return max(words, key=len).lower() if words else None


def build(rows: list[dict], n: int | None = None) -> list[list[dict]]:
    """Conversations (lists of ``{role, content}``) from Alpaca-field rows, by the rule above."""
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        t = topic(r["instruction"])
        if t:
            groups.setdefault(t, []).append(r)
    chains = []
    for members in groups.values():
        for lo in range(0, len(members) - 1, 3):
            chain = members[lo:lo + 3]
            if len(chain) >= 2:
                chains.append(chain)
    # conversations in the file order of their first row
    order = {id(r): i for i, r in enumerate(rows)}
    chains.sort(key=lambda c: order[id(c[0])])
    out = []
    for k, chain in enumerate(chains[:n] if n else chains):
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[(k // 3) % len(SYSTEM_PROMPTS)]}] if k % 3 == 0 else []
        for r in chain:
            ask = r["instruction"] + (f"\n\n{r['input']}" if r.get("input", "").strip() else "")
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": r["output"]}]
        out.append(messages)
    return out


def as_sharegpt(messages: list[dict]) -> dict:
    return {"conversations": [{"from": SHAREGPT_SPEAKER[m["role"]], "value": m["content"]} for m in messages]}


def write(out_dir: str, dolly: str, n: int) -> tuple[str, str, str]:
    with open(dolly, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    convs = build(rows, n + EVAL_ROWS)
    openai, sharegpt = convs[:n][0::2], convs[:n][1::2]
    a = os.path.join(out_dir, "conversations-messages.jsonl")
    b = os.path.join(out_dir, "conversations-sharegpt.json")
    with open(a, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in openai)
    with open(b, "w", encoding="utf-8") as f:
        json.dump([as_sharegpt(m) for m in sharegpt], f, ensure_ascii=False, indent=1)
        f.write("\n")
    c = os.path.join(out_dir, "conversations-eval.jsonl")
    with open(c, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "messages": m}, ensure_ascii=False) + "\n" for i, m in enumerate(convs[n:]))
    return a, b, c


if __name__ == "__main__":
    from rayapp import ASSETS

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 160
    for path in write(str(ASSETS), "../shared/data/dolly-15k.jsonl", n):
        print(path)
