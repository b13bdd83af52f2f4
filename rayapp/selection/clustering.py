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


def fit_in_order(ids: np.ndarray, vecs: np.ndarray, how: str, n_clusters: int, seed: int):
    """``fit`` over the rows in the order ``how`` names (select.cluster_order); k-means' seeded start
    depends on it. "id": by id (content hashes), the same clusters whatever order the sources list
    the rows in; "source": as given (the prepared shards' order, the sources'), as the authors'
    code clusters. Returns the model, the ids in that order and their labels."""
    order = np.argsort(ids, kind="stable") if how == "id" else np.arange(len(ids))
    model, labels = fit(vecs[order], n_clusters, seed)
    return model, ids[order], labels
