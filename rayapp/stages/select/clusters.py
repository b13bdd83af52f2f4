"""Clusters for stratified selection: sentence embeddings of every prepared row, then k-means.

They depend on the prepared data alone, not on the scores, so `rayapp run` starts them as soon
as prepare is done (``start_ahead``), in a Ray task beside the reference training and the
scoring, and select then only reads the cache. Cached in ``select/embeddings.parquet``, keyed by
the prepared data and the clustering settings; another seed, cluster count or order re-clusters the
cached embeddings (keyed by the prepared data and the encoder alone) instead of embedding again.
"""

from __future__ import annotations

import time

import numpy as np
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
    return keyed.read_table(layout.embeddings, {"rayapp.key": key}, ["id", "cluster"])


def compute(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, key: str,
            watch: bool = True) -> pa.Table:
    """Embed every prepared row (Ray Data actor pool), cluster, and write the cache. ``watch``: the
    pool's progress watchdog (ray.stall_timeout_s); off in the task started ahead, whose pool may
    wait for CPUs while training and scoring hold them: select bounds its wait for that task."""
    from rayapp.core import placement
    from rayapp.core.raycluster import init_ray, pool_size_leaving_a_cpu
    from rayapp.selection.clustering import kmeans, kmeans_in_order
    from rayapp.stages.select.embed import embed_prepared, embeddings_table

    sc, where = cfg.select, placement.embedding(cfg)
    t0 = time.perf_counter()
    ekey = embeddings_key(cfg, prepared)
    reused = keyed.read_table(layout.embeddings, {"rayapp.embeddings_key": ekey}, ["id", "embedding"])
    if reused is not None:  # the same rows and encoder: only the clustering settings changed
        ids = reused["id"].to_pylist()
        vecs = np.asarray(reused["embedding"].combine_chunks().flatten()).reshape(len(ids), -1)
    else:
        init_ray(cfg)
        actors = pool_size_leaving_a_cpu(cfg, where.cpus, where.count)
        ids, vecs = embed_prepared(prepared.shard_paths(layout), sc.embedding_model, sc.embed_batch_size, where,
                                   sc.embed_max_tokens, max_actors=actors,
                                   stall_s=cfg.ray.stall_timeout_s if watch else None,
                                   committed=f"no embeddings yet (all of them go in {layout.embeddings} at once)")
    t1 = time.perf_counter()
    if sc.cluster_order == "source":  # the prepared shards keep the sources' order
        from rayapp.core import storage

        order = np.concatenate([storage.read_parquet(f, ["id"])["id"].to_numpy(zero_copy_only=False)
                                for f in prepared.shard_paths(layout)])
        labels = kmeans_in_order(ids, vecs, order, sc.n_clusters, sc.seed, sc.kmeans_fit_rows)
    else:
        labels = kmeans(vecs, sc.n_clusters, sc.seed, sc.kmeans_fit_rows)
    log.info("%s %d rows in %.1fs; k-means (%d clusters) in %.1fs",
             "reused the cached embeddings of" if reused is not None else "embedded", len(ids), t1 - t0,
             min(sc.n_clusters, len(vecs)), time.perf_counter() - t1)
    table = embeddings_table(ids, vecs, labels)
    keyed.write_table(layout.embeddings, table, {"rayapp.key": key, "rayapp.embeddings_key": ekey})
    return table.select(["id", "cluster"])


def start_ahead(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest) -> None:
    """Start computing the clusters in the background (a Ray task), unless they are cached."""
    import ray

    from rayapp.core.raycluster import init_ray

    key = clusters_key(cfg, prepared)
    if key in _AHEAD or cached(layout, key) is not None:
        return
    init_ray(cfg)
    # num_cpus=0: the task only drives Ray Data; the embedding actor asks for its own CPU
    _AHEAD[key] = ray.remote(num_cpus=0, max_retries=0)(compute).remote(cfg, layout, prepared, key, False)
    log.info("clustering the prepared rows in the background")


def _await_ahead(cfg: RunConfig, layout: RunLayout, ahead) -> pa.Table:
    import ray

    # no progress to probe from here: the whole wait, from now on, is bounded by ray.stall_timeout_s
    return watched(lambda: ray.get(ahead), stage="select", stall_s=cfg.ray.stall_timeout_s,
                   waiting_for="the clustering started ahead (a Ray task embedding every prepared row)",
                   committed=f"no clusters yet (they go in {layout.embeddings} when done)",
                   on_stall=lambda: ray.cancel(ahead, force=True))


def started_ahead() -> bool:
    return bool(_AHEAD)


def finish_ahead(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest) -> None:
    """Wait for the clustering this process started ahead: when it is done, its clusters are in the
    cache, where select (in a driver process of its own, under `rayapp run`) reads them. If it
    failed, select computes them itself."""
    ahead = _AHEAD.pop(clusters_key(cfg, prepared), None)
    if ahead is None:
        return
    try:
        _await_ahead(cfg, layout, ahead)
    except StallError:
        raise
    except Exception as exc:
        log.warning("background clustering failed (%s); select computes it now", exc)


def clusters_for(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, force: bool) -> pa.Table:
    """Each row's ``id`` and ``cluster``: from the task started ahead, the cache, or computed now."""
    key = clusters_key(cfg, prepared)
    ahead = _AHEAD.pop(key, None)
    if ahead is not None:
        try:
            return _await_ahead(cfg, layout, ahead)
        except StallError:
            raise
        except Exception as exc:  # the background attempt failed: compute in the foreground, loudly
            log.warning("background clustering failed (%s); computing it now", exc)
    elif not force:
        hit = cached(layout, key)
        if hit is not None:
            log.info("reusing embeddings and %d clusters from %s", cfg.select.n_clusters, layout.embeddings)
            return hit
    return compute(cfg, layout, prepared, key)
