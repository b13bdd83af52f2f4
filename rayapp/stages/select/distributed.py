"""Select without a gather (``select.workers`` > 0): the same selections as the in-process path,
with the driver holding per-partition, per-cluster and per-selection counts, never a row.

1. Split. Tasks cut the trajectories, the clusters (a file's, or the cache clusters.py writes) and
   the prepared shards into blocks, and send each row to a partition by a hash of its id.
2. Join. Each id partition matches its trajectory rows to their cluster and prepared row
   (``pc.index_in``), computes every selection's candidates and sort keys with the same
   ``strategies.candidates`` the in-process path runs, and returns counts, its cluster sizes and
   its hardest and easiest rows. It writes the stratified selections' keys by cluster partition,
   each global selection's candidates, and a seeded sample of its rows for the report.
3. Stratified selections. Each cluster partition holds whole clusters, so ``stratified_select``
   chooses each cluster's chunk there, exactly as over every row.
4. Global selections. One Ray Data sort by (selection, key, position), and ``split_at_indices``
   takes each selection's ranks, the ones the in-process path takes (``strategies.rank_range``):
   the keys are made integers that sort as numpy sorts the floats (``orderable``), so NaN and -0.0
   fall where numpy puts them.
5. Write. One task per selection joins its rows with the prepared shards by position, a window at
   a time, and hashes its file and its ids; tasks over position ranges count the selections'
   overlap; a task draws the report from the sample.

The work folder, ``select/.work``, is removed on success and on failure.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from rayapp.config import RunConfig
from rayapp.core import storage, work_items
from rayapp.core.errors import RayappError
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import SelectionManifest, SelectionRecord
from rayapp.core.watchdog import watched
from rayapp.selection import methods
from rayapp.selection.strategies import global_size, rank_range, selection_info
from rayapp.stages.select import parallel
from rayapp.stages.select.common import (
    SELECTION_WINDOW_ROWS,
    SelectError,
    SelectionInputs,
    chunk_of,
    log_selections,
    matched_size,
    needs_clusters,
    provenance,
    report_facts,
    runnable,
    selection_specs,
    selection_tag,
    without_stratified,
    write_selection_json,
)

log = get_logger("rayapp.stages.select")

BLOCK_ROWS = 65_536  # rows of an input a split task reads (a block of 384-d embeddings: 96 MiB)
PARTITION_ROWS = 200_000  # about the trajectory rows an id partition joins
REPORT_SAMPLE_ROWS = 100_000  # rows the report plots (every row up to this many)


def select_spread(cfg: RunConfig, layout: RunLayout, force: bool, inputs: SelectionInputs) -> SelectionManifest:
    """The spread path; its work folder is removed whether it succeeds or fails."""
    from rayapp.core.raycluster import init_ray

    init_ray(cfg)
    work = storage.join(layout.selection, ".work")
    storage.remove_dir(work)
    try:
        return _select_spread(cfg, layout, force, inputs, work)
    finally:
        storage.remove_dir(work)


def _blocks(rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + BLOCK_ROWS, rows)) for a in range(0, rows, BLOCK_ROWS)]


def _rows_in(path: str) -> int:
    import pyarrow.parquet as pq

    fs, local = storage.resolve(path)
    with fs.open_input_file(local) as f:
        return pq.read_metadata(f).num_rows


def _remote(fn, *args, what: str, stall_s: float | None):
    """``fn(*args)`` in a Ray task (one CPU), its RayappError raised here as it was raised there."""
    import ray

    ref = ray.remote(num_cpus=1, max_retries=0)(_call_guarded).remote(fn, *args)
    out = watched(lambda: ray.get(ref), stage="select", stall_s=stall_s, waiting_for=what,
                  committed=parallel.NOTHING_YET, on_stall=lambda: ray.cancel(ref, force=True))
    parallel.raise_errors([out])
    return out["ok"]


def _call_guarded(fn, *args):
    try:
        return {"ok": fn(*args)}
    except RayappError as exc:
        return work_items.error_reply(exc)


def _trajectory_columns(cfg: RunConfig, inputs: SelectionInputs) -> dict[str, str]:
    """Our name -> the trajectories file's column, for what select reads of it."""
    sc, traj = cfg.select, inputs.traj
    n = traj.P.shape[1]
    if inputs.prepared is None:
        names = storage.read_schema(sc.trajectories).names
        cols = {"id": "id" if "id" in names else "index"}
        cols.update({f"P{i}": f"{sc.trajectory_prefix}P{i}" for i in range(n)})
        if traj.n_tokens is not None:
            cols["n_tokens"] = f"{sc.trajectory_prefix}n_tokens"
        return cols
    names = storage.read_schema(inputs.source["trajectories"]).names
    return {c: c for c in ["id", "n_tokens", *(f"P{i}" for i in range(n)), "ro_nll0", "ifd_nll0", "ifd_ro_nll0"]
            if c in names}


def _select_spread(cfg: RunConfig, layout: RunLayout, force: bool, inputs: SelectionInputs,
                   work: str) -> SelectionManifest:
    sc, stall = cfg.select, cfg.ray.stall_timeout_s
    run = functools.partial(work_items.run_items, workers=sc.workers, stall_s=stall, stage="select",
                            committed=parallel.NOTHING_YET)
    done = work_items.step_timer(log, "select")

    # the clusters: a file's (checked, k-means fitted in a task), or the prepared rows' (the cache)
    specs = selection_specs(sc)
    clusters_source, cluster_how = None, None
    if needs_clusters(specs):
        if sc.clusters is not None:
            checked = _remote(parallel.check_clusters_file, sc.clusters, sc.n_clusters, sc.seed, sc.kmeans_fit_rows,
                              work, what=f"checking {sc.clusters} (and fitting k-means)", stall_s=stall)
            cluster_how = checked["how"]
            names = storage.read_schema(sc.clusters).names
            clusters_source = {"kind": "file", "path": sc.clusters, "key": "id" if "id" in names else "index",
                               "rows": checked["rows"]}
        elif inputs.prepared is None:
            specs = without_stratified(sc, specs)
        else:
            from rayapp.stages.select.clusters import ensure_clusters

            path = ensure_clusters(cfg, layout, inputs.prepared, force)
            clusters_source = {"kind": "cache", "path": path, "rows": _rows_in(path)}
        done("clusters ready")
    specs = runnable(sc, specs, inputs.traj)
    spec_list = [[key, m, scope] for key, (m, scope) in specs.items()]
    traj_path = inputs.source["trajectories"]
    rows = _rows_in(traj_path)
    partitions = max(2 * sc.workers, -(-rows // PARTITION_ROWS))
    internal = inputs.prepared is not None
    job = {
        "trajectories": traj_path, "trajectory_columns": _trajectory_columns(cfg, inputs),
        "clusters_source": clusters_source, "clusters": clusters_source is not None, "internal": internal,
        "rows": rows, "checkpoints": int(inputs.traj.P.shape[1]), "partitions": partitions,
        "cluster_partitions": partitions, "specs": spec_list, "chunks": [chunk_of(sc, m) for _, m, _ in spec_list],
        "budget": sc.budget, "lp_epoch": sc.lp_epoch, "seed": sc.seed, "keep_empty": sc.keep_empty_responses,
        "method": sc.method, "sample_fraction": min(1.0, REPORT_SAMPLE_ROWS / max(rows, 1)),
        "prepared_paths": inputs.prepared_rows.paths if internal else None,
        "prepared_rows": [s.rows for s in inputs.prepared.shards] if internal else None,
    }
    storage.write_json(storage.join(work, "job.json"), job)

    # 1. every input cut into blocks, its rows sent to their id's partition
    items = [{"work": work, "kind": "traj", "k": k, "start": a, "stop": b} for k, (a, b) in enumerate(_blocks(rows))]
    if clusters_source is not None:
        items += [{"work": work, "kind": "clus", "k": k, "start": a, "stop": b}
                  for k, (a, b) in enumerate(_blocks(clusters_source["rows"]))]
    if internal:
        starts = inputs.prepared_rows.starts
        items += [{"work": work, "kind": "prep", "k": k, "path": path, "start": int(starts[k])}
                  for k, path in enumerate(inputs.prepared_rows.paths)]
    parallel.raise_errors(run(parallel.split_block, items, what="the tasks splitting the inputs"))
    done(f"{len(items)} blocks split into {partitions} partitions")

    # 2. each id partition joined: candidates, keys, counts
    joined = run(parallel.join_partition, [{"work": work, "p": p} for p in range(partitions)],
                 what="the tasks joining each partition")
    parallel.raise_errors(joined)
    _raise_missing(cfg, joined, rows, clusters_source)
    summary = _summed(joined, len(spec_list))
    done(f"{rows} rows joined")
    if clusters_source is not None:
        log.info("clusters from %s: %d (%s)", sc.clusters or clusters_source["path"], summary["n_clusters"],
                 cluster_how["kind"] if cluster_how else "the prepared rows' embeddings")

    # 3. the stratified selections, a cluster partition at a time
    selected: dict[int, int] = {}
    if any(scope == "stratified" for _, _, scope in spec_list):
        chosen = run(parallel.select_clusters, [{"work": work, "q": q} for q in range(partitions)],
                     what="the tasks choosing each cluster's chunk")
        parallel.raise_errors(chosen)
        for r in chosen:
            for j, n in r["selected"].items():
                selected[int(j)] = selected.get(int(j), 0) + n
    # 4. the global selections, all in one Ray Data sort; the main selection (first) sets their size
    infos: list[dict] = []
    ranges: dict[int, tuple[int, int, int]] = {}  # global selection -> (its candidates' offset, lo, hi)
    offset = 0
    for j, (key, method, scope) in enumerate(spec_list):
        info, eligible = summary["info"][j], summary["eligible"][j]
        if scope == "stratified":
            infos.append(selection_info(method, info, selected.get(j, 0), sc.budget, True, None))
            continue
        size = matched_size(sc, key, scope, infos[0]["selected"] if infos else None)
        lo, hi = (0, eligible) if methods.method_named(method).key is None else \
            rank_range(eligible, sc.budget, chunk_of(sc, method), global_size(method, eligible, sc.budget, size))
        ranges[j] = (offset, lo, hi)
        offset += eligible
        infos.append(selection_info(method, info, hi - lo, sc.budget, False, size))
    if ranges:
        _sort_globals(work, ranges, offset, sc.workers, stall)
    done("selections chosen")

    # 5. each selection written, the overlap counted, the report drawn
    common = provenance(cfg, layout, inputs, summary["n_clusters"] if clusters_source else None, cluster_how)
    tags = [selection_tag(m, chunk_of(sc, m), sc.budget, scope) for _, m, scope in spec_list]
    outs = [storage.join(layout.selection_dir(tag), "selected.parquet") for tag in tags]
    written = run(parallel.write_selection, [
        {"work": work, "j": j, "out": out, "selected": infos[j]["selected"], "window_rows": SELECTION_WINDOW_ROWS}
        for j, out in enumerate(outs)], what="the tasks writing each selection")
    parallel.raise_errors(written)
    records = {}
    for j, ((key, method, _), tag, out, w) in enumerate(zip(spec_list, tags, outs, written)):
        write_selection_json(cfg, layout, inputs, key, method, tag, infos[j], common, w["ids_sha256"])
        records[key] = SelectionRecord(method=method, tag=tag, rows=w["rows"], path=out, sha256=w["sha256"])
    done("selections written")
    sizes = np.asarray([i["selected"] for i in infos], dtype=np.int64)
    common_rows = np.zeros((len(spec_list), len(spec_list)), dtype=np.int64)
    edges = np.linspace(0, rows, max(1, min(4 * sc.workers, -(-rows // PARTITION_ROWS))) + 1).astype(np.int64)
    overlap_items = [{"work": work, "lo": int(a), "hi": int(b), "selections": list(range(len(sizes)))}
                     for a, b in zip(edges[:-1], edges[1:])]
    counted = run(parallel.overlap_range, overlap_items, what="the overlap tasks")
    parallel.raise_errors(counted)
    for r in counted:
        common_rows += np.asarray(r["common"], dtype=np.int64)
    from rayapp.stages.select.report import jaccard_from_counts

    overlap = ([key for key, _, _ in spec_list], jaccard_from_counts(common_rows, sizes).tolist())
    main_info = infos[0]
    facts = report_facts(sc, rows, main_info["selected"], main_info, common)
    if job["sample_fraction"] < 1:
        facts["report plots"] = f"a seeded sample of about {REPORT_SAMPLE_ROWS:,} of the {rows:,} rows"
    report = _remote(parallel.draw_report, cfg, layout, work, 0, tags[0],
                     summary["cluster_sizes"] if clusters_source else None, overlap,
                     summary["examples"], facts, internal, what="the task drawing the report", stall_s=stall)
    done("report drawn")
    log_selections(sc, rows, {key: SimpleNamespace(info=infos[j]) for j, (key, _, _) in enumerate(spec_list)},
                   records, common, report)
    return SelectionManifest(prepared_fingerprint=inputs.prepared.fingerprint if internal else None,
                             main=sc.method, selections=records, report=report)


def _raise_missing(cfg: RunConfig, joined: list[dict], rows: int, clusters_source: dict | None) -> None:
    """The rows no prepared row or cluster matched, all partitions together, as the in-process path
    words it: how many, and the first (by position)."""
    from rayapp.stages.select.external_clusters import ClustersFileError

    for kind in ("prep", "clus"):
        gaps = [r["missing"][kind] for r in joined if kind in r.get("missing", {})]
        if not gaps:
            continue
        count, first = sum(g["count"] for g in gaps), min(gaps, key=lambda g: g["pos"])["id"]
        if kind == "prep":
            raise SelectError(f"trajectory {count} ids are not in the prepared data (e.g. {first})")
        if clusters_source["kind"] == "cache":
            raise SelectError(f"trajectory {count} ids are not in the clustered data (e.g. {first})")
        raise ClustersFileError(f"{cfg.select.clusters}: {count} of the {rows} rows to select from have no cluster "
                                f"(e.g. id {first!r}); every row needs one")


def _summed(joined: list[dict], n_specs: int) -> dict:
    """The partitions' counts added up, their cluster sizes and clusters merged, and the report's
    examples: the 5 hardest and 5 easiest eligible rows of all (every one when there are 10 or fewer)."""
    infos: list[dict] = [{} for _ in range(n_specs)]
    eligible = [0] * n_specs
    sizes = np.zeros(0, dtype=np.int64)
    clusters: set[int] = set()
    examples: list[dict] = []
    for r in joined:
        if not r["rows"]:
            continue
        for j in range(n_specs):
            for k, v in r["info"][j].items():
                infos[j][k] = infos[j].get(k, 0) + v
            eligible[j] += r["eligible"][j]
        s = np.asarray(r["cluster_sizes"], dtype=np.int64)
        if len(s) > len(sizes):
            sizes = np.pad(sizes, (0, len(s) - len(sizes)))
        sizes[:len(s)] += s
        clusters.update(r["clusters"])
        examples += r["examples"]
    examples.sort(key=lambda e: (e["ord"], e["pos"]))
    n = parallel.EXAMPLES
    if len(examples) > 2 * n:
        examples = examples[:n] + examples[-n:]
    return {"info": infos, "eligible": eligible, "cluster_sizes": sizes.tolist() if len(sizes) else [0],
            "n_clusters": len(clusters), "examples": examples}


def _sort_globals(work: str, ranges: dict[int, tuple[int, int, int]], candidates: int, workers: int,
                  stall_s: float | None) -> None:
    """Every global selection at once: the candidates sorted by (selection, key, position) with Ray
    Data's sort (range-partitioned on a sample of the keys), each selection's ranks [lo, hi) cut
    out by ``split_at_indices`` and written to ``chosen/<j>``. One sort, not one per selection:
    each Ray Data execution costs seconds whatever its size."""
    import ray.data

    cand = parallel.work_path(work, "cand")
    files = storage.list_files(cand, ".parquet") if storage.exists(cand) else []
    if not files or not any(hi > lo for _, lo, hi in ranges.values()):
        return
    fs, _ = storage.resolve(work)
    cuts = [c for off, lo, hi in ranges.values() for c in (off + lo, off + hi)]
    ctx = ray.data.DataContext.get_current()
    before = ctx.default_hash_shuffle_parallelism
    # the sort's partitions (else 200 on a read of unknown size: 200 map and 200 reduce tasks)
    ctx.default_hash_shuffle_parallelism = max(1, workers, -(-candidates // PARTITION_ROWS))

    def sort_and_write():
        ds = ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=fs)
        pieces = ds.sort(["spec", "ord", "pos"]).split_at_indices(cuts)
        for i, (j, (_, lo, hi)) in enumerate(ranges.items()):
            if hi > lo:
                out = storage.resolve(parallel.work_path(work, "chosen", str(j)))[1]
                pieces[2 * i + 1].write_parquet(out, filesystem=fs)

    try:
        watched(sort_and_write, stage="select", stall_s=stall_s, committed=parallel.NOTHING_YET,
                waiting_for="Ray Data's sort of the global selections' candidates")
    finally:
        ctx.default_hash_shuffle_parallelism = before
