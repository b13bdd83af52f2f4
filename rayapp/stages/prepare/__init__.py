"""Stage 1, prepare: load, normalise, template, tokenize and shard the instruction data."""
