"""Clusters made elsewhere (``select.clusters``): a Parquet of each row's cluster, or of each row's
embedding to cluster here, keyed like the trajectories (``id``, or ``index`` as the authors'
published perplexities are). With them, stratified selection also runs on external trajectories,
so the paper's method can be rebuilt from the authors' perplexities and a clustering.

Embeddings are clustered with the authors' recipe: scikit-learn ``KMeans(n_clusters,
random_state=select.seed, n_init="auto")`` over the rows in the file's order (their source order),
fitted on a sample above ``select.kmeans_fit_rows`` rows (rayapp/selection/clustering.py). The file
is read a batch of rows at a time, twice: once to check it and keep the rows the fit uses, once to
assign every row to its nearest centroid; this process holds at most the fit's rows of embeddings.
Every problem names the file, the row and the field.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayapp.core import storage
from rayapp.core.errors import RayappError
from rayapp.core.manifests import file_digest
from rayapp.core.repeats import repeats
from rayapp.selection.clustering import DEFAULT_FIT_ROWS, fit, fit_sample

BATCH_ROWS = 65_536


class ClustersFileError(RayappError):
    """A bad clusters file; the message names the file, row and field."""


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _check_ids(path: str, key: str, col: pa.ChunkedArray) -> pa.Array:
    """The key column as strings (an ``index`` as its decimal text), none null, none repeated."""
    col = col.combine_chunks()
    row = _first(np.asarray(col.is_null()))
    if row is not None:
        raise ClustersFileError(f"{path}: row {row}: field '{key}' is null")
    ids = col if pa.types.is_string(col.type) else pc.cast(col, pa.string())
    rows = np.arange(len(ids), dtype=np.int64)
    found = repeats(pa.table({"id": ids, "order": rows, "row": rows}))
    if found.num_rows:  # the first row (in file order) whose id came before, and the row it repeats
        row, before = found["order"][0].as_py(), found["first_row"][0].as_py()
        raise ClustersFileError(f"{path}: row {row}: field '{key}': {ids[row].as_py()!r} repeats row {before}")
    return ids


def _embedding_batches(path: str, pf: pq.ParquetFile):
    """(first row, float32 matrix) for each batch of the ``embedding`` column, checked row by row."""
    dim, start = None, 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["embedding"]):
        col = batch.column(0)
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        lengths = np.where(np.isnan(lengths.astype(float)), 0, lengths).astype(np.int64)
        if dim is None and len(lengths):
            dim = int(lengths[0]) or None
        empty = lengths == 0
        wrong = (lengths != dim) & ~empty if dim else np.zeros(len(lengths), bool)
        row = _first(empty | wrong)
        if row is not None:
            what = "is empty" if empty[row] else f"has {lengths[row]} dimensions, not {dim}"
            raise ClustersFileError(f"{path}: row {start + row}: field 'embedding' {what}")
        x = np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), dim)
        row = _first(~np.isfinite(x).all(1))
        if row is not None:
            raise ClustersFileError(f"{path}: row {start + row}: field 'embedding' is not finite")
        yield start, x
        start += len(col)


def check_clusters(path: str, n_clusters: int, seed: int, fit_rows: int | None = DEFAULT_FIT_ROWS):
    """The clusters file checked, every problem naming its row and field: its ids (strings, in the
    file's order), each row's cluster where the file gives it or k-means is fitted on every row
    (else None), the k-means model where the rows are still to be assigned to its centroids (a
    fit on a sample, above ``fit_rows`` rows), and what was read (for the provenance)."""
    if not storage.exists(path):
        raise ClustersFileError(f"select.clusters: {path}: file not found")
    fs, local = storage.resolve(path)
    try:
        # pre_buffer off: with it, iter_batches keeps every row group it has read (pyarrow 26): the whole file
        pf = pq.ParquetFile(fs.open_input_file(local), pre_buffer=False)
        names = pf.schema_arrow.names
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ClustersFileError(f"select.clusters: {path}: not a readable Parquet file: {exc}") from None
    key = "id" if "id" in names else "index" if "index" in names else None
    if key is None:
        raise ClustersFileError(f"{path}: needs an 'id' or 'index' column (has: {', '.join(names)})")
    ids = _check_ids(path, key, pf.read(columns=[key])[key])
    model = None
    if "cluster" in names:
        col = pf.read(columns=["cluster"])["cluster"].combine_chunks()
        if not pa.types.is_integer(col.type):
            raise ClustersFileError(f"{path}: field 'cluster' must hold integers, not {col.type}")
        row = _first(np.asarray(col.is_null()))
        if row is not None:
            raise ClustersFileError(f"{path}: row {row}: field 'cluster' is null")
        clusters = col.cast(pa.int32())
        how = {"clusters_file": path, "kind": "clusters", "n_clusters": len(pc.unique(clusters))}
    elif "embedding" in names:
        sample = fit_sample(len(ids), fit_rows, seed)  # None: every row
        kept, dim = [], None
        for start, x in _embedding_batches(path, pf):
            dim = x.shape[1]
            if sample is None:
                kept.append(x)
            else:
                lo, hi = np.searchsorted(sample, [start, start + len(x)])
                kept.append(x[sample[lo:hi] - start])
        model, labels = fit(np.concatenate(kept), n_clusters, seed)
        del kept
        clusters = None if sample is not None else pa.array(labels.astype(np.int32))
        how = {"clusters_file": path, "kind": "embeddings", "n_clusters": model.n_clusters, "random_state": seed,
               "dim": dim}
        if sample is not None:
            how["fitted_on_rows"] = len(sample)
        else:
            model = None  # every row has its label already
    else:
        raise ClustersFileError(f"{path}: needs a 'cluster' column (each row's cluster) or an 'embedding' column "
                                f"(to cluster here); has: {', '.join(names)}")
    how["sha256"] = file_digest(path)
    return ids, clusters, model, how


def assign(model, x: np.ndarray) -> np.ndarray:
    """Each embedding's nearest centroid (KMeans.predict), as int32."""
    return model.predict(x).astype(np.int32)


def read_clusters(path: str, n_clusters: int, seed: int,
                  fit_rows: int | None = DEFAULT_FIT_ROWS) -> tuple[pa.Table, dict]:
    """Each row's cluster from ``path`` as a table (id: string, cluster: int32) in the file's order,
    and what was read (for the provenance)."""
    ids, clusters, model, how = check_clusters(path, n_clusters, seed, fit_rows)
    if clusters is None:  # every row to its nearest centroid, a batch at a time
        fs, local = storage.resolve(path)
        pf = pq.ParquetFile(fs.open_input_file(local), pre_buffer=False)
        clusters = pa.array(np.concatenate([assign(model, x) for _, x in _embedding_batches(path, pf)]))
    return pa.table({"id": ids, "cluster": clusters}), how


def embeddings_at(path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the file's ``embedding`` column as a float32 matrix (checked already)."""
    col = storage.read_row_groups(path, np.arange(start, stop), ["embedding"])["embedding"].combine_chunks()
    return np.asarray(pc.list_flatten(col).to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), -1)


def clusters_for_ids(path: str, clusters: pa.Table, ids: np.ndarray) -> np.ndarray:
    """The cluster of each of ``ids`` (the trajectories' rows), matched column-wise."""
    at = pc.index_in(pa.array(ids, pa.string()), value_set=clusters["id"])
    missing = np.asarray(at.is_null())
    if missing.any():
        raise ClustersFileError(f"{path}: {int(missing.sum())} of the {len(ids)} rows to select from have no cluster "
                                f"(e.g. id {str(ids[_first(missing)])!r}); every row needs one")
    return clusters["cluster"].combine_chunks().take(at).to_numpy()
