"""Conversations: the chat template a tokenizer formats them with, and prompts rendered from it.

A tokenizer that ships a chat template (SmolLM2-Instruct, Llama-2-chat, ...) is used as published.
One without (the tiny models, base OPT and Llama-2) gets ``PLAIN_CHAT_TEMPLATE``: ``### System:`` /
``### User:`` / ``### Assistant:`` headers, the tokenizer's EOS closing each assistant turn (as the
Alpaca path closes its response), and ``{% generation %}`` blocks so that transformers' own
assistant-token masks (``return_assistant_tokens_mask``) label it. The template starts with the
BOS token only where the tokenizer would add one itself, so a conversation starts the way an
Alpaca row does.
"""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "user", "assistant")

CONVERSATION_FIELDS: dict[str, tuple[str, str, str]] = {
    # schema: (the list's field, each turn's role key, each turn's text key)
    "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
}

# ShareGPT speakers (FastChat's, LLaMA-Factory's and OpenAI's names) and OpenAI roles -> ours
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant",
}

PLAIN_CHAT_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_blocks(template: str) -> bool:
    """Whether transformers can mask the assistant tokens itself (``{% generation %}`` in the template)."""
    return bool(_GENERATION_BLOCK.search(template))


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def chat_template(tokenizer, choice: str) -> tuple[str, str]:
    """The template conversations are formatted with, and which it is: ``model`` (the tokenizer's
    own) or ``plain`` (rayapp's). ``choice``: auto (the model's where it ships one), model, plain."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if choice == "plain" or (choice == "auto" and not own):
        return PLAIN_CHAT_TEMPLATE, "plain"
    if not own:
        from rayapp.core.errors import ConfigError

        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise ConfigError(f"data.template.chat: model, but {name} ships no chat template; use auto or plain")
    return own, "model"


def template_kwargs(tokenizer) -> dict[str, Any]:
    """What rayapp passes to every template it renders (the plain one reads ``add_bos``)."""
    return {"add_bos": adds_bos(tokenizer)}


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs(tokenizer))


def generation_prompt(tokenizer, template: str, messages: list[dict]) -> str:
    """The text a generator is given to answer ``messages``: the conversation and the template's
    assistant header. A leading BOS is left out where the tokenizer adds its own (HF generate and
    vLLM both tokenize prompts with special tokens), so the model sees one BOS, as in training."""
    text = render(tokenizer, template, messages, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and adds_bos(tokenizer) and text.startswith(bos):
        text = text[len(bos):]
    return text
