"""Clusters for stratified selection: sentence embeddings of every prepared row, then k-means.

They depend on the prepared data alone, not on the scores, so `rayapp run` starts them as soon
as prepare is done (``start_ahead``), in a Ray task beside the reference training and the
scoring, and select then only reads the cache. The embeddings stay in files, one beside each
prepared shard (``select/embeddings/``, keyed by the prepared data and the encoder), so another
seed, cluster count or order re-clusters them instead of embedding again, and a run cut off keeps
the shards it embedded. The clusters go in ``select/clusters.parquet`` (id, cluster), keyed by the
prepared data and the clustering settings. No process holds every row's embedding: k-means is
fitted on at most ``select.kmeans_fit_rows`` of them and the rows are assigned where they are read.
"""

from __future__ import annotations

import time

import pyarrow as pa

from rayapp.config import RunConfig
from rayapp.core import keyed
from rayapp.core.errors import StallError
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import PreparedManifest
from rayapp.core.watchdog import watched

log = get_logger("rayapp.stages.select")

_AHEAD: dict[str, object] = {}  # cache key -> the Ray task computing it


def clusters_key(cfg: RunConfig, prepared: PreparedManifest) -> str:
    sc = cfg.select
    order = {"order": "source"} if sc.cluster_order == "source" else {}  # the default's key is as before
    # the sample bound changes the clusters only when there are more rows than it
    sampled = {"fit_rows": sc.kmeans_fit_rows} if prepared.rows > sc.kmeans_fit_rows else {}
    return fingerprint(prepared=prepared.fingerprint, model=sc.embedding_model, max_tokens=sc.embed_max_tokens,
                       n_clusters=sc.n_clusters, seed=sc.seed, **order, **sampled)


def embeddings_key(cfg: RunConfig, prepared: PreparedManifest) -> str:
    sc = cfg.select
    return fingerprint(prepared=prepared.fingerprint, model=sc.embedding_model, max_tokens=sc.embed_max_tokens)


def cached(layout: RunLayout, key: str) -> pa.Table | None:
    """Each row's ``id`` and ``cluster``, if the cache holds this clustering."""
    return keyed.read_table(layout.clusters, {"rayapp.key": key}, ["id", "cluster"])


def compute(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, key: str,
            watch: bool = True) -> pa.Table:
    """Embed the prepared rows not embedded yet (a Ray Data actor pool writes one embeddings file
    per prepared shard), fit k-means on every row, or on a seeded sample above
    ``select.kmeans_fit_rows``, and assign every row to its nearest centroid in Ray Data actors; write
    the clusters. This process holds at most ``kmeans_fit_rows`` embeddings. ``watch``: the pools'
    progress watchdog (ray.stall_timeout_s); off in the task started ahead, whose pool may wait for
    CPUs while training and scoring hold them: select bounds its wait for that task."""
    from rayapp.core import placement
    from rayapp.core.prepared_rows import PreparedRows
    from rayapp.core.raycluster import init_ray, pool_size_leaving_a_cpu
    from rayapp.selection.clustering import fit_in_order, fit_sample
    from rayapp.stages.select.embed import assign_clusters, embed_prepared, embedding_matrix

    sc, where = cfg.select, placement.embedding(cfg)
    stall_s = cfg.ray.stall_timeout_s if watch else None
    t0 = time.perf_counter()
    ekey = {"rayapp.embeddings_key": embeddings_key(cfg, prepared)}
    sources = prepared.shard_paths(layout)
    outs = [layout.embedding_file(s.file) for s in prepared.shards]
    # the same rows and encoder: a shard embedded before (by another clustering, or a run cut off) is kept
    todo = [i for i, (out, s) in enumerate(zip(outs, prepared.shards)) if not keyed.is_current(out, ekey, s.rows)]
    if todo:
        init_ray(cfg)
        actors = pool_size_leaving_a_cpu(cfg, where.cpus, min(where.count, len(todo)))
        embed_prepared([sources[i] for i in todo], [outs[i] for i in todo], ekey, sc.embedding_model,
                       sc.embed_batch_size, where, sc.embed_max_tokens, max_actors=actors, stall_s=stall_s,
                       committed=f"the shards embedded so far, in {layout.embeddings_dir}")
    t1 = time.perf_counter()
    embedded = PreparedRows(outs, [s.rows for s in prepared.shards])
    sample = fit_sample(embedded.rows, sc.kmeans_fit_rows, sc.seed)  # None: every row
    rows = embedded.columns(["id", "embedding"]) if sample is None else embedded.take(sample, ["id", "embedding"])
    ids = rows["id"].to_numpy(zero_copy_only=False)
    vecs = embedding_matrix(rows["embedding"])
    del rows
    model, ordered_ids, labels = fit_in_order(ids, vecs, sc.cluster_order, sc.n_clusters, sc.seed)
    del vecs
    if sample is None:
        clustered = pa.table({"id": pa.array(ordered_ids, pa.string()), "cluster": pa.array(labels, pa.int32())})
    else:  # every row to its nearest centroid, where its embeddings are read
        init_ray(cfg)
        clustered = assign_clusters(outs, model, pool_size_leaving_a_cpu(cfg, 1, len(outs)), stall_s)
    log.info("%s %d rows in %.1fs; k-means (%d clusters, fitted on %d rows) in %.1fs",
             "embedded" if todo else "reused the embeddings of", embedded.rows, t1 - t0, model.n_clusters,
             len(ids), time.perf_counter() - t1)
    keyed.write_table(layout.clusters, clustered, {"rayapp.key": key})
    return clustered


def _compute_in_task(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, key: str,
                     watch: bool) -> int:
    """``compute`` in a Ray task: the clusters go to the cache, only their count comes back."""
    return compute(cfg, layout, prepared, key, watch).num_rows


def start_ahead(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest) -> None:
    """Start computing the clusters in the background (a Ray task), unless they are cached."""
    import ray

    from rayapp.core.raycluster import init_ray

    key = clusters_key(cfg, prepared)
    if key in _AHEAD or is_cached(layout, key):
        return
    init_ray(cfg)
    # num_cpus=0: the task only drives Ray Data; the embedding actor asks for its own CPU
    _AHEAD[key] = ray.remote(num_cpus=0, max_retries=0)(_compute_in_task).remote(cfg, layout, prepared, key, False)
    log.info("clustering the prepared rows in the background")


def _await_ahead(cfg: RunConfig, layout: RunLayout, ahead, what: str = "the clustering started ahead") -> None:
    import ray

    # no progress to probe from here: the whole wait, from now on, is bounded by ray.stall_timeout_s
    watched(lambda: ray.get(ahead), stage="select", stall_s=cfg.ray.stall_timeout_s,
            waiting_for=f"{what} (a Ray task embedding every prepared row)",
            committed=f"no clusters yet (they go in {layout.clusters} when done)",
            on_stall=lambda: ray.cancel(ahead, force=True))


def started_ahead() -> bool:
    return bool(_AHEAD)


def _finished_ahead(cfg: RunConfig, layout: RunLayout, key: str) -> bool:
    """Whether a clustering this process started ahead has put its clusters in the cache (False:
    none was started, or it failed, loudly)."""
    ahead = _AHEAD.pop(key, None)
    if ahead is None:
        return False
    try:
        _await_ahead(cfg, layout, ahead)
        return True
    except StallError:
        raise
    except Exception as exc:  # the background attempt failed: the caller computes them, loudly
        log.warning("background clustering failed (%s); computing it now", exc)
        return False


def finish_ahead(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest) -> None:
    """Wait for the clustering this process started ahead: when it is done, its clusters are in the
    cache, where select (in a driver process of its own, under `rayapp run`) reads them. If it
    failed, select computes them itself."""
    _finished_ahead(cfg, layout, clusters_key(cfg, prepared))


def is_cached(layout: RunLayout, key: str) -> bool:
    return keyed.is_current(layout.clusters, {"rayapp.key": key})


def _reuse(cfg: RunConfig, layout: RunLayout, key: str, force: bool) -> bool:
    """Whether the cache holds this clustering and may be used: made just now by the task started
    ahead, or before, unless ``force``."""
    fresh = _finished_ahead(cfg, layout, key)
    if (fresh or not force) and is_cached(layout, key):
        if not fresh:
            log.info("reusing %d clusters from %s", cfg.select.n_clusters, layout.clusters)
        return True
    return False


def clusters_for(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, force: bool) -> pa.Table:
    """Each row's ``id`` and ``cluster``: from the task started ahead, the cache, or computed now."""
    key = clusters_key(cfg, prepared)
    if _reuse(cfg, layout, key, force):
        hit = cached(layout, key)
        if hit is not None:
            return hit
    return compute(cfg, layout, prepared, key)


def ensure_clusters(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, force: bool) -> str:
    """The clusters in the cache (``layout.clusters``), computed in a Ray task unless they are
    there already; they never come to this process. Returns the cache's path."""
    import ray

    from rayapp.core.raycluster import init_ray

    key = clusters_key(cfg, prepared)
    if not _reuse(cfg, layout, key, force):
        init_ray(cfg)
        ahead = ray.remote(num_cpus=0, max_retries=0)(_compute_in_task).remote(cfg, layout, prepared, key, True)
        _await_ahead(cfg, layout, ahead, "the clustering")
    return layout.clusters
