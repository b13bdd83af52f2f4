"""k-means for cluster-stratified selection (numpy and scikit-learn; no Ray).

The authors' recipe: scikit-learn ``KMeans(n_clusters, random_state=seed, n_init="auto")`` over the
rows in a given order (its seeded start depends on the order). Up to ``fit_rows`` rows it is fitted on
every row, exactly as the authors do. Above that it is fitted on a seeded sample of ``fit_rows`` rows
(kept in their order) and every row goes to its nearest centroid, so the fit's time and memory stop
growing with the rows: at 1,000 clusters a few hundred thousand rows place every centroid well,
and the assignment is one pass that splits across workers.
"""

from __future__ import annotations

import numpy as np

# the default bound: the paper's sets (Alpaca 52k, Dolly 15k) are fitted on every row
DEFAULT_FIT_ROWS = 200_000


def fit_sample(rows: int, fit_rows: int | None, seed: int) -> np.ndarray | None:
    """Positions (ascending) of the rows k-means is fitted on; None: every row."""
    if fit_rows is None or rows <= fit_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(rows, size=fit_rows, replace=False))


def fit(vecs: np.ndarray, n_clusters: int, seed: int):
    """scikit-learn's KMeans, the authors' recipe, fitted on every row of ``vecs`` in their order:
    the model, and those rows' labels."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=max(1, min(n_clusters, len(vecs))), random_state=seed, n_init="auto")
    return model, model.fit_predict(vecs)


def kmeans(vecs: np.ndarray, n_clusters: int, seed: int, fit_rows: int | None = DEFAULT_FIT_ROWS) -> np.ndarray:
    """Each row's cluster: fitted on every row up to ``fit_rows`` rows, else on the seeded sample
    ``fit_sample`` draws, with every row then assigned to its nearest centroid (KMeans.predict, in
    scikit-learn's chunks)."""
    sample = fit_sample(len(vecs), fit_rows, seed)
    model, labels = fit(vecs if sample is None else vecs[sample], n_clusters, seed)
    return labels if sample is None else model.predict(vecs)


def kmeans_in_order(ids: list[str], vecs: np.ndarray, order: list[str], n_clusters: int, seed: int,
                    fit_rows: int | None = DEFAULT_FIT_ROWS) -> np.ndarray:
    """k-means over the rows taken in ``order`` (ids; the authors' code clusters in dataset order,
    and k-means' seeded start depends on it); the labels come back in ``ids``' order."""
    order, ids = np.asarray(order), np.asarray(ids)
    by_id = np.argsort(order, kind="stable")
    perm = np.argsort(by_id[np.searchsorted(order, ids, sorter=by_id)], kind="stable")  # ids' places in order
    labels = np.empty(len(ids), dtype=np.int64)
    labels[perm] = kmeans(vecs[perm], n_clusters, seed, fit_rows)
    return labels
