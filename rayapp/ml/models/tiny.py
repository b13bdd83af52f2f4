"""Build a small causal LM with no hub: a BPE tokenizer trained locally on the training text plus a
Llama config, both saved with ``save_pretrained`` so later stages load them exactly like hub models."""

from __future__ import annotations

import os
from collections.abc import Iterable

from rayapp.config import TinyModelConfig

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    hf_tok.padding_side = "right"
    hf_tok.save_pretrained(out_dir)


def llama_config(cfg: TinyModelConfig, vocab_size: int, max_positions: int, **token_ids):
    """The tiny model's transformers config (``rayapp plan`` sizes it before a tokenizer exists)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **token_ids,
    )


def build_model(tokenizer_dir: str, cfg: TinyModelConfig, out_dir: str, max_positions: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(cfg, len(tok), max_positions, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
