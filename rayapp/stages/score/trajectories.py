"""Pivot per-checkpoint scores into one row per sample: P0..Pn (perplexity), NLLs, token counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayapp.core import storage


def build_trajectories(scores_dir: str, checkpoint_names: list[str]) -> pa.Table:
    """``checkpoint_names`` in epoch order -> columns id, n_tokens, nll{i}, P{i}, ro_nll{i}."""
    base = None
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate(checkpoint_names):
        t = storage.read_parquet_dir(storage.join(scores_dir, name))
        if base is None:
            base = t["id"].to_pylist()
            index = {rid: j for j, rid in enumerate(base)}
            cols["n_tokens"] = np.asarray(t["n_tokens"], dtype=np.int32)
            order = np.arange(len(base))
        else:
            ids = t["id"].to_pylist()
            if len(ids) != len(base) or set(ids) != set(index):
                raise ValueError(f"{scores_dir}/{name}: ids differ from {checkpoint_names[0]}")
            order = np.argsort([index[r] for r in ids])
        nll = np.asarray(t["mean_nll"], dtype=np.float64)[order]
        cols[f"nll{i}"] = nll
        cols[f"P{i}"] = np.exp(nll)
        ro = np.asarray(t["response_only_mean_nll"].fill_null(np.nan), dtype=np.float64)[order]
        if not np.all(np.isnan(ro)):
            cols[f"ro_nll{i}"] = ro
    return pa.table({"id": pa.array(base, pa.string()), **cols})
