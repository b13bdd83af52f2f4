"""Stage 6: generate answers with each model, judge them pairwise, report win / tie / lose."""
