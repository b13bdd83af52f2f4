"""Tokenize prompt + response with labels = -100 on prompt tokens (loss on the response only).

With a fast tokenizer the prompt/response boundary comes from character offsets of one
tokenization of the full text, which is exact even where BPE merges across the boundary; a slow
tokenizer falls back to the Alpaca code's rule (mask the first len(tokenize(prompt)) tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from rayapp.core.labels import IGNORE_INDEX


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


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
