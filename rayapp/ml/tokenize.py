"""Tokenize prompt + response with labels = -100 on prompt tokens (loss on the response only), and
conversations with labels on their assistant turns only.

With a fast tokenizer the prompt/response boundary comes from character offsets of one
tokenization of the full text, which is exact even where BPE merges across the boundary; a slow
tokenizer falls back to the Alpaca code's rule (mask the first len(tokenize(prompt)) tokens).

A conversation is rendered with its chat template (core/chat.py). Its labels cover each assistant
turn's tokens and the end-of-turn token the template puts after it, and nothing else:
- a template with ``{% generation %}`` blocks (rayapp's plain one): transformers' own assistant
  masks (``apply_chat_template(return_assistant_tokens_mask=True)``);
- any other (SmolLM2's, most published ones): each assistant turn's characters are found by
  rendering the conversation up to the turn (with the assistant header) and through it; the text
  must grow by prefixes, which is how these templates render. The first token after the turn's
  text is labelled when it is a special token (``<|im_end|>``, ``</s>``) with only whitespace
  between.

Over-long conversations: ``keep_last_turns`` drops whole exchanges (a user turn and what follows it
up to the next user turn) from the start, keeping a system prompt, until the rest fits; a last
exchange that still does not fit is cut, as ``truncate`` cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.core.labels import IGNORE_INDEX


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation (a conversation: all its turns)
    kept_length: int | None = None  # a conversation with turns dropped: the kept turns' tokens before any cut
    turns_dropped: int = 0  # leading turns dropped to fit (truncation: keep_last_turns)
    prompt: str | None = None  # a conversation: the rendered text its last assistant turn follows
    error: str | None = None  # a conversation its chat template cannot render: the row is rejected with this

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def truncated(self) -> bool:
        """Cut inside a turn (or, for Alpaca rows, anywhere) to fit max_length."""
        return (self.full_length if self.kept_length is None else self.kept_length) > len(self.input_ids)


def tokenize_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[Tokenized]:
    """Tokenize each prompt+response, mask the prompt, and cut to ``max_length`` tokens."""
    texts = [p + r for p, r in zip(prompts, responses)]
    out: list[Tokenized] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
        for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
            boundary = len(prompt)
            labels = [
                IGNORE_INDEX if (start < boundary or start == end == 0) else tok
                for tok, (start, end) in zip(ids, offsets)
            ]
            out.append(Tokenized(list(ids[:max_length]), labels[:max_length], len(ids)))
    else:
        enc_full = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        enc_prompt = tokenizer(prompts, add_special_tokens=True, truncation=False)["input_ids"]
        for ids, pids in zip(enc_full, enc_prompt):
            n_prompt = len(pids)
            labels = [IGNORE_INDEX] * min(n_prompt, len(ids)) + list(ids[n_prompt:])
            out.append(Tokenized(list(ids[:max_length]), labels[:max_length], len(ids)))
    return out


class TemplateShapeError(ValueError):
    """The chat template does not render a conversation by growing prefixes, so the turn
    boundaries cannot be read off the text."""


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    return ids


def assistant_spans(tokenizer, template: str, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns' text in ``text`` (the rendered conversation)."""
    from rayapp.core.chat import render

    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, template, messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise TemplateShapeError(f"the chat template does not render turn {i} as a prefix of the conversation")
        body = m["content"]
        at = through.find(body, len(before))
        if at < 0:  # templates often trim a turn's text
            body = body.strip()
            at = through.find(body, len(before))
        if at < 0:
            raise TemplateShapeError(f"assistant turn {i}'s text is not in its rendering")
        spans.append((at, at + len(body)))
    return spans


def _labels_from_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool):
    """(input_ids, labels) of ``text``: tokens that start inside a span, and the special token right
    after each span (whitespace between allowed), keep their ids; every other one is IGNORE_INDEX."""
    special = _special_ids(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        starts = [s if e > s else None for s, e in offsets]  # added specials have (0, 0) only when inserted
    else:  # no offsets: count tokens of growing prefixes
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        starts = None
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in spans:
        if starts is None:
            n_lo = len(tokenizer(text[:lo], add_special_tokens=add_special_tokens)["input_ids"])
            n_hi = len(tokenizer(text[:hi], add_special_tokens=add_special_tokens)["input_ids"])
            inside = range(n_lo, n_hi)
            after = n_hi
        else:
            inside = [k for k, st in enumerate(starts) if st is not None and lo <= st < hi]
            after = next((k for k, st in enumerate(starts) if st is not None and st >= hi), len(ids))
            if after < len(ids) and text[hi:starts[after]].strip():
                after = len(ids)  # text, not whitespace, before the next token: no end-of-turn token
        for k in inside:
            labels[k] = ids[k]
        if after < len(ids) and ids[after] in special:
            labels[after] = ids[after]
    return ids, labels


def _exchange_starts(messages: list[dict]) -> list[int]:
    """Where each exchange starts: its user turn (a conversation may open with the assistant)."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    starts = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= first]
    return starts if starts and starts[0] == first else [first, *starts]


def _encode_conversation(tokenizer, template: str, messages: list[dict], masks_from_template: bool,
                         add_special_tokens: bool):
    from rayapp.core.chat import render, template_kwargs

    if masks_from_template:
        enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **template_kwargs(tokenizer))
        ids = list(enc["input_ids"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, enc["assistant_masks"])]
    text = render(tokenizer, template, messages)
    return _labels_from_spans(tokenizer, text, assistant_spans(tokenizer, template, messages, text),
                              add_special_tokens)


def tokenize_conversation(tokenizer, template: str, messages: list[dict], max_length: int, truncation: str,
                          masks_from_template: bool | None = None) -> Tokenized:
    """One conversation's ids and labels, fitted to ``max_length`` by ``truncation``."""
    from jinja2 import TemplateError

    from rayapp.core.chat import generation_prompt, has_generation_blocks

    if masks_from_template is None:
        masks_from_template = has_generation_blocks(template)
    try:
        ids, labels = _encode_conversation(tokenizer, template, messages, masks_from_template, False)
        full = len(ids)
        dropped = 0
        if full > max_length and truncation == "keep_last_turns":
            head = messages[:1] if messages[0]["role"] == "system" else []
            for start in _exchange_starts(messages)[1:]:
                ids, labels = _encode_conversation(tokenizer, template, head + messages[start:],
                                                   masks_from_template, False)
                dropped = start - len(head)
                if len(ids) <= max_length:
                    break
        prompt = generation_prompt(tokenizer, template, messages[:-1])
    except (TemplateError, TemplateShapeError, ValueError) as exc:
        return Tokenized([], [], 0, error=f"chat template: {exc}")
    return Tokenized(ids[:max_length], labels[:max_length], full, len(ids) if dropped else None, dropped, prompt)


def tokenize_rows(tokenizer, rows: list[dict], max_length: int, truncation: str, chat_template: str | None
                  ) -> list[Tokenized]:
    """Alpaca rows (``{prompt, response}``) and conversations (``{messages}``) in their order."""
    out: list[Tokenized | None] = [None] * len(rows)
    pairs = [i for i, r in enumerate(rows) if r.get("messages") is None]
    for lo in range(0, len(pairs), 1024):
        part = pairs[lo:lo + 1024]
        done = tokenize_pairs(tokenizer, [rows[i]["prompt"] for i in part], [rows[i]["response"] for i in part],
                              max_length)
        for i, tk in zip(part, done):
            out[i] = tk
    if len(pairs) < len(rows):
        from rayapp.core.chat import has_generation_blocks

        masks = has_generation_blocks(chat_template)
        for i, r in enumerate(rows):
            if out[i] is None:
                out[i] = tokenize_conversation(tokenizer, chat_template, r["messages"], max_length, truncation, masks)
    return out  # type: ignore[return-value]
