"""`rayapp plan`: each stage's per-GPU memory need at the config's shapes, against what its GPU has."""
