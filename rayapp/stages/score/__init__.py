"""Stage 3, score: per-sample response losses for many checkpoints over Ray Data actor pools."""
