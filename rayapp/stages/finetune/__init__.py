"""Stage 5, finetune: train the target model on the selection (Ray Train, FSDP2)."""
