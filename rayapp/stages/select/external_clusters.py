"""Clusters made elsewhere (``select.clusters``): a Parquet of each row's cluster, or of each row's
embedding to cluster here, keyed like the trajectories (``id``, or ``index`` as the authors'
published perplexities are). With them, stratified selection also runs on external trajectories,
so the paper's method can be rebuilt from the authors' perplexities and a clustering.

Embeddings are clustered with the authors' recipe: scikit-learn ``KMeans(n_clusters,
random_state=select.seed, n_init="auto")`` over the rows in the file's order (their source order),
fitted on a sample above ``select.kmeans_fit_rows`` rows (rayapp/selection/clustering.py).
Every problem names the file, the row and the field.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayapp.core import storage
from rayapp.core.errors import RayappError
from rayapp.core.hashing import short_digest
from rayapp.selection.clustering import DEFAULT_FIT_ROWS, kmeans


class ClustersFileError(RayappError):
    """A bad clusters file; the message names the file, row and field."""


def read_clusters(path: str, n_clusters: int, seed: int,
                  fit_rows: int | None = DEFAULT_FIT_ROWS) -> tuple[dict[str, int], dict]:
    """{row id: cluster} from ``path``, and what was read (for the provenance)."""
    t = storage.read_parquet_or_raise(path, ClustersFileError, "select.clusters")
    key = "id" if "id" in t.column_names else "index" if "index" in t.column_names else None
    if key is None:
        raise ClustersFileError(f"{path}: needs an 'id' or 'index' column (has: {', '.join(t.column_names)})")
    ids = t[key].to_pylist()
    seen: dict[str, int] = {}
    for row, rid in enumerate(ids):
        if rid is None:
            raise ClustersFileError(f"{path}: row {row}: field '{key}' is null")
        rid = str(rid)
        if rid in seen:
            raise ClustersFileError(f"{path}: row {row}: field '{key}': {rid!r} repeats row {seen[rid]}")
        seen[rid] = row
    if "cluster" in t.column_names:
        col = t["cluster"]
        if not pa.types.is_integer(col.type):
            raise ClustersFileError(f"{path}: field 'cluster' must hold integers, not {col.type}")
        values = col.to_pylist()
        for row, v in enumerate(values):
            if v is None:
                raise ClustersFileError(f"{path}: row {row}: field 'cluster' is null")
        clusters = np.asarray(values, dtype=np.int64)
        how = {"clusters_file": path, "kind": "clusters", "n_clusters": int(len(np.unique(clusters)))}
    elif "embedding" in t.column_names:
        vecs = t["embedding"].to_pylist()
        dim = None
        for row, v in enumerate(vecs):
            if v is None or not len(v):
                raise ClustersFileError(f"{path}: row {row}: field 'embedding' is empty")
            if dim is None:
                dim = len(v)
            elif len(v) != dim:
                raise ClustersFileError(f"{path}: row {row}: field 'embedding' has {len(v)} dimensions, not {dim}")
        x = np.asarray(vecs, dtype=np.float32)
        if not np.isfinite(x).all():
            row = int(np.nonzero(~np.isfinite(x).all(1))[0][0])
            raise ClustersFileError(f"{path}: row {row}: field 'embedding' is not finite")
        k = max(1, min(n_clusters, len(x)))
        clusters = kmeans(x, n_clusters, seed, fit_rows)
        how = {"clusters_file": path, "kind": "embeddings", "n_clusters": k, "random_state": seed, "dim": dim}
        if fit_rows is not None and len(x) > fit_rows:
            how["fitted_on_rows"] = fit_rows
    else:
        raise ClustersFileError(f"{path}: needs a 'cluster' column (each row's cluster) or an 'embedding' column "
                                f"(to cluster here); has: {', '.join(t.column_names)}")
    how["sha256"] = short_digest(storage.read_bytes(path))
    return {str(i): int(c) for i, c in zip(ids, clusters)}, how


def clusters_for_ids(path: str, by_id: dict[str, int], ids: np.ndarray) -> np.ndarray:
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ClustersFileError(f"{path}: {len(missing)} of the {len(ids)} rows to select from have no cluster "
                                f"(e.g. id {missing[0]!r}); every row needs one")
    return np.asarray([by_id[i] for i in ids])
