"""The hand-written baseline for scoring: one process, no Ray, a transformers model over fixed-size
batches of rows in file order, per-row losses from the full logits (what one writes by hand).

Run as a script it scores a prepared folder and prints one JSON line; the parent times the whole
process (interpreter start, imports and model load included), as rayapp's end-to-end time
includes its actors' start-up:

    python -m benchmarks.plain_score PREPARED_DIR MODEL --batch-rows 53 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time


def plain_scoring(model_path: str, table, pad_id: int, batch_rows: int, threads: int) -> dict:
    import torch

    from rayapp.ml.models.loading import load_causal_lm
    from rayapp.ml.models.losses import full_logits_losses, pad_batch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_causal_lm(model_path).eval()
    t_loaded = time.perf_counter()
    ids, labels, row_ids = table["input_ids"].to_pylist(), table["labels"].to_pylist(), table["id"].to_pylist()
    losses, real, padded = {}, 0, 0
    for lo in range(0, len(ids), batch_rows):
        x, y, m = pad_batch(ids[lo:lo + batch_rows], labels[lo:lo + batch_rows], pad_id)
        s, c = full_logits_losses(model, x, y, m)
        for rid, ls, n in zip(row_ids[lo:lo + batch_rows], s, c):
            losses[rid] = (float(ls), int(n))
        real += int(m.sum())
        padded += m.numel()
    end = time.perf_counter()
    return {"rows": len(ids), "tokens": real, "seconds": end - t0, "tokens_per_s": real / (end - t0),
            "steady_tokens_per_s": real / (end - t_loaded), "rows_per_s": len(ids) / (end - t0),
            "padding_fraction": 1 - real / padded, "batch_rows": batch_rows, "threads": threads,
            "_losses": losses}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("prepared_dir")
    p.add_argument("model")
    p.add_argument("--pad-id", type=int, required=True)
    p.add_argument("--batch-rows", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from rayapp.core import storage

    table = storage.read_parquet_dir(a.prepared_dir, ["id", "input_ids", "labels"])
    out = plain_scoring(a.model, table, a.pad_id, a.batch_rows, a.threads)
    out.pop("_losses")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
