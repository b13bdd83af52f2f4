"""Shared Ray Train fine-tuning loop (response-only loss, FSDP2 or DDP), used by reference and finetune."""
