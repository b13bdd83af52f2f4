"""Model and tokenizer loading (one from_pretrained path for hub, local and tiny models)."""
