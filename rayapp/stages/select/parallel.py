"""The Ray side of select without a gather (distributed.py drives it): each step is a Ray Data map
over small work items (a block of rows, a partition, a selection), and each item reads its inputs
from and writes its rows to the work folder, returning only a summary (counts, a few keys) to the
driver. Rows never pass through the driver.

Work folder (``select/.work``); ``job.json`` says what every task needs to know:
  labels.parquet, kmeans.pkl  the clusters file's labels (file order), or the k-means model its
                              rows are assigned to centroids with
  split/traj-k.parquet        a block of trajectory rows: pos, id, the scores, partition (sorted by it)
  split/clus-k.parquet        a block of the clusters: id, cluster, partition
  split/prep-k.parquet        a prepared shard's rows: id, prep_pos, chars, truncated, partition
  joined/p.parquet            id-partition p joined, with each stratified selection's candidates and
                              keys (ok<j>, key<j>), sorted by cluster partition (cpart)
  cand/p.parquet              the global selections' candidates in id-partition p: spec (which
                              selection), its key as ``ord``, and the columns a selected row carries
  chosen/<j>/...              selection j's rows: pos and the columns a selected row carries
  sample/p.parquet            the report's sample of id-partition p
"""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp.core import storage, work_items
from rayapp.core.errors import RayappError
from rayapp.core.hashing import seeded_fraction
from rayapp.core.prepared_rows import PreparedRows
from rayapp.selection.methods import Trajectories
from rayapp.selection.metrics import lp_of, metric_columns, no_response_rows
from rayapp.selection.strategies import candidates, orderable, stratified_select

NOTHING_YET = "nothing yet (select writes each selection once every row is chosen)"
ROW_GROUP = 8192
EXAMPLES = 5  # the report's hardest and easiest rows


def work_path(work: str, *parts: str) -> str:
    return storage.join(work, *parts)


def guarded(fn):
    """A task whose RayappError (a bad input, named by file, row and field) comes back as its
    reply, for the driver to raise as it is, rather than wrapped in Ray's task error."""
    @functools.wraps(fn)
    def run(item: dict) -> dict:
        try:
            return fn(item)
        except RayappError as exc:
            return work_items.reply(item, work_items.error_reply(exc))
    return run


def raise_errors(results: list) -> None:
    """The first error a task replied with, raised as the class it was raised as."""
    import importlib

    for r in results:
        if isinstance(r, dict) and r.get("error") and r.get("cls"):
            cls = getattr(importlib.import_module(r["module"]), r["cls"], RayappError)
            raise cls(r["error"])


def _job(work: str) -> dict:
    return storage.read_json(work_path(work, "job.json"))


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables) if tables else None


def _partition_of(work: str, kind: str, p: int) -> pa.Table | None:
    """Partition ``p``'s rows of every split file of this kind."""
    files = storage.list_files(work_path(work, "split"), ".parquet")
    return _concat([storage.read_parquet(f, filters=[("partition", "=", p)]).drop_columns(["partition"])
                    for f in files if f.rsplit("/", 1)[-1].startswith(kind + "-")])


def _write_partitioned(path: str, table: pa.Table, partitions: int) -> None:
    part = work_items.hash_partition(table["id"].to_pylist(), partitions)
    table = table.append_column("partition", pa.array(part, pa.int32())).sort_by("partition")
    storage.write_parquet(path, table, row_group_size=ROW_GROUP)


# 1. the inputs cut into blocks, each row sent to its id's partition ----------------------------------------------

def check_clusters_file(path: str, n_clusters: int, seed: int, fit_rows: int, work: str) -> dict:
    """The clusters file checked and, for embeddings, k-means fitted (``external_clusters``): its
    labels or model written to the work folder. A Ray task: the fit's sample stays off the driver."""
    from rayapp.stages.select.external_clusters import check_clusters

    ids, clusters, model, how = check_clusters(path, n_clusters, seed, fit_rows)
    if clusters is not None:
        storage.write_parquet(work_path(work, "labels.parquet"), pa.table({"cluster": clusters}),
                              row_group_size=ROW_GROUP)
    else:
        storage.write_bytes_atomic(work_path(work, "kmeans.pkl"), pickle.dumps(model))
    return {"rows": len(ids), "how": how}


def _row_range(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    return storage.read_row_groups(path, np.arange(start, stop, dtype=np.int64), columns)


@guarded
def split_block(item: dict) -> dict:
    """One block of an input, its rows written sorted by their id's partition."""
    it = work_items.item_of(item)
    work, kind, k = it["work"], it["kind"], it["k"]
    job = _job(work)
    out = work_path(work, "split", f"{kind}-{k:05d}.parquet")
    if kind == "traj":
        read = _row_range(job["trajectories"], it["start"], it["stop"], list(job["trajectory_columns"].values()))
        # our names (id, P0.., n_tokens, ...), the ids and scores as the in-process path reads them
        t = pa.table({ours: read[theirs] for ours, theirs in job["trajectory_columns"].items()})
        for name in t.column_names:
            if name.startswith("P") or name.endswith("nll0"):
                t = t.set_column(t.column_names.index(name), name, t[name].cast(pa.float64()))
        ids = pa.array([str(x) for x in t["id"].to_pylist()], pa.string())
        t = t.set_column(t.column_names.index("id"), "id", ids)
        t = t.append_column("pos", pa.array(np.arange(it["start"], it["stop"], dtype=np.int64)))
    elif kind == "clus":
        src = job["clusters_source"]
        if src["kind"] == "cache":  # the clusters computed from the prepared rows (clusters.py)
            t = _row_range(src["path"], it["start"], it["stop"], ["id", "cluster"])
        else:
            col = _row_range(src["path"], it["start"], it["stop"], [src["key"]])[src["key"]].combine_chunks()
            ids = col if pa.types.is_string(col.type) else pc.cast(col, pa.string())
            labels = work_path(work, "labels.parquet")
            if storage.exists(labels):
                cluster = _row_range(labels, it["start"], it["stop"], ["cluster"])["cluster"]
            else:
                from rayapp.stages.select.external_clusters import assign, embeddings_at

                model = pickle.loads(storage.read_bytes(work_path(work, "kmeans.pkl")))
                cluster = pa.array(assign(model, embeddings_at(src["path"], it["start"], it["stop"])))
            t = pa.table({"id": ids, "cluster": cluster})
    else:  # a prepared shard: where each row is, and what select reads of its text
        s = storage.read_parquet(it["path"], ["id", "output", "truncated"])
        t = pa.table({"id": s["id"], "prep_pos": pa.array(np.arange(it["start"], it["start"] + s.num_rows)),
                      "chars": pc.utf8_length(s["output"]).cast(pa.int64()), "truncated": s["truncated"]})
    _write_partitioned(out, t, job["partitions"])
    return work_items.reply(item, {"rows": t.num_rows})


# 2. each id partition joined: every selection's candidates and keys ------------------------------------------------

def _missing(ids: pa.ChunkedArray, pos: np.ndarray, at: pa.Array) -> dict | None:
    """How many rows found no match, and the first of them (by position)."""
    miss = np.asarray(at.is_null())
    if not miss.any():
        return None
    first = int(np.argmax(miss))  # rows are in position order
    return {"count": int(miss.sum()), "pos": int(pos[first]), "id": ids[first].as_py()}


def _trajectories(t: pa.Table, job: dict) -> Trajectories:
    def col(name):
        return np.asarray(t[name], dtype=np.float64) if name in t.column_names else None

    P = np.stack([np.asarray(t[f"P{i}"], dtype=np.float64) for i in range(job["checkpoints"])], axis=1)
    n_tok = np.asarray(t["n_tokens"]) if "n_tokens" in t.column_names else None
    return Trajectories(ids=t["id"].to_numpy(zero_copy_only=False), P=P, n_tokens=n_tok,
                        nll_response_only=col("ro_nll0"), ifd_nll=col("ifd_nll0"),
                        ifd_nll_response_only=col("ifd_ro_nll0"),
                        response_length=t["chars"].to_numpy() if "chars" in t.column_names else None,
                        truncated=(t["truncated"].to_numpy(zero_copy_only=False)
                                   if "truncated" in t.column_names else None),
                        positions=t["pos"].to_numpy(), total_rows=job["rows"])


def _ends(order_key: np.ndarray, pos: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` smallest and ``n`` largest (key, pos), or all when there are few."""
    order = np.lexsort((pos, order_key))
    return order.tolist() if len(order) <= 2 * n else np.concatenate([order[:n], order[-n:]]).tolist()


@guarded
def join_partition(item: dict) -> dict:
    """Id partition ``p``: its trajectory rows matched to their cluster and prepared row; each
    selection's candidates and sort keys (``strategies.candidates``); the report's sample."""
    it = work_items.item_of(item)
    work, p = it["work"], it["p"]
    job = _job(work)
    traj = _partition_of(work, "traj", p)
    if traj is None or traj.num_rows == 0:
        return work_items.reply(item, {"rows": 0})
    traj = traj.sort_by("pos")
    pos = traj["pos"].to_numpy()
    missing = {}
    for kind, columns in (("clus", ["cluster"]), ("prep", ["prep_pos", "chars", "truncated"])):
        if kind == "clus" and not job["clusters"] or kind == "prep" and not job["internal"]:
            continue
        other = _partition_of(work, kind, p)
        at = pc.index_in(traj["id"], value_set=other["id"]) if other is not None else pa.nulls(len(traj), pa.int32())
        gap = _missing(traj["id"], pos, at)
        if gap:
            missing[kind] = gap
            continue
        for c in columns:
            traj = traj.append_column(c, other[c].take(at))
    if missing:
        return work_items.reply(item, {"rows": traj.num_rows, "missing": missing})

    t = _trajectories(traj, job)
    carried = ["pos", "id"] + [c for c in ("cluster", "prep_pos") if c in traj.column_names] + \
        [f"P{i}" for i in range(job["checkpoints"])]
    base = traj.select(carried)
    infos, eligible_counts, stratified_cols, global_cands = [], [], {}, []
    for j, (key, method, scope) in enumerate(job["specs"]):
        ok, sort_key, info = candidates(method, t, job["lp_epoch"], job["seed"], job["keep_empty"])
        infos.append(info)
        eligible_counts.append(int(ok.sum()))
        if scope == "stratified":
            stratified_cols[f"ok{j}"], stratified_cols[f"key{j}"] = ok, sort_key
        else:
            keep = np.flatnonzero(ok)
            global_cands.append(base.take(pa.array(keep)).append_column("ord", pa.array(orderable(sort_key[keep])))
                                .append_column("spec", pa.array(np.full(len(keep), j, np.int32))))
    if global_cands:  # every global selection's candidates, for one sort by (spec, key, position)
        storage.write_parquet(work_path(work, "cand", f"{p:05d}.parquet"), pa.concat_tables(global_cands),
                              row_group_size=ROW_GROUP)
    if stratified_cols:
        joined = base
        for name, values in stratified_cols.items():
            joined = joined.append_column(name, pa.array(values))
        cpart = (np.asarray(traj["cluster"], dtype=np.int64) % job["cluster_partitions"]).astype(np.int32)
        joined = joined.append_column("cpart", pa.array(cpart)).sort_by("cpart")
        storage.write_parquet(work_path(work, "joined", f"{p:05d}.parquet"), joined, row_group_size=ROW_GROUP)

    # the report's view: every row's eligibility and LP, summed up or sampled
    eligible = np.ones(len(pos), bool) if job["keep_empty"] else ~no_response_rows(t.P, t.n_tokens)
    lp = lp_of(job["method"], job["lp_epoch"], t.P)
    sizes = np.bincount(np.asarray(traj["cluster"], dtype=np.int64)[eligible]).tolist() \
        if job["clusters"] and eligible.any() else []
    where = np.flatnonzero(eligible)
    ends = where[_ends(orderable(lp[where]), pos[where], EXAMPLES)] if len(where) else np.zeros(0, np.int64)
    examples = [{"ord": int(orderable(lp[i:i + 1])[0]), "pos": int(pos[i]), "lp": float(lp[i]),
                 "prep_pos": int(traj["prep_pos"][i].as_py()) if job["internal"] else None} for i in ends]
    sampled = seeded_fraction(pos, job["seed"]) < job["sample_fraction"]
    sample = {"pos": pos[sampled], "lp": lp[sampled], "eligible": eligible[sampled]}
    sample.update({f"P{i}": t.P[sampled, i] for i in range(t.P.shape[1])})
    if t.response_length is not None:
        sample["length"] = np.asarray(t.response_length)[sampled]
    storage.write_parquet(work_path(work, "sample", f"{p:05d}.parquet"), pa.table(sample))
    clusters = np.unique(np.asarray(traj["cluster"])).tolist() if job["clusters"] else []
    return work_items.reply(item, {"rows": traj.num_rows, "info": infos, "eligible": eligible_counts,
                                   "cluster_sizes": sizes, "clusters": clusters, "examples": examples})


# 3. each cluster partition's stratified selections ---------------------------------------------------------------

@guarded
def select_clusters(item: dict) -> dict:
    """Cluster partition ``q`` (whole clusters, from every id partition): each stratified
    selection's chunk per cluster, by the same ``stratified_select`` the in-process path runs."""
    it = work_items.item_of(item)
    work, q = it["work"], it["q"]
    job = _job(work)
    rows = _concat([storage.read_parquet(f, filters=[("cpart", "=", q)])
                    for f in storage.list_files(work_path(work, "joined"), ".parquet")])
    counts = {}
    if rows is None or rows.num_rows == 0:
        return work_items.reply(item, {"selected": counts})
    rows = rows.sort_by("pos")  # ties in a key keep the rows' order, as in one process
    cluster = rows["cluster"].to_numpy()
    carried = [c for c in rows.column_names if not c.startswith(("ok", "key")) and c != "cpart"]
    for j, (key, method, scope) in enumerate(job["specs"]):
        if scope != "stratified":
            continue
        ok = np.flatnonzero(rows[f"ok{j}"].to_numpy(zero_copy_only=False))
        chosen = ok[stratified_select(rows[f"key{j}"].to_numpy()[ok], cluster[ok], job["budget"], job["chunks"][j])]
        storage.write_parquet(work_path(work, "chosen", str(j), f"{q:05d}.parquet"),
                              rows.select(carried).take(pa.array(chosen)), row_group_size=ROW_GROUP)
        counts[str(j)] = int(len(chosen))
    return work_items.reply(item, {"selected": counts})


# 4. each selection written, and the selections' overlap ----------------------------------------------------------

def _chosen_files(work: str, j: int) -> list[str]:
    folder = work_path(work, "chosen", str(j))
    return storage.list_files(folder, ".parquet") if storage.exists(folder) else []


def _chosen_in(files: list[str], lo: int, hi: int, columns: list[str] | None = None) -> pa.Table | None:
    parts = [storage.read_parquet(f, columns, filters=[("pos", ">=", lo), ("pos", "<", hi)]) for f in files]
    parts = [t for t in parts if t.num_rows]
    return pa.concat_tables(parts).sort_by("pos") if parts else None


def _windows(positions: np.ndarray, window_rows: int) -> list[tuple[int, int]]:
    """Position ranges holding ``window_rows`` of the selected rows each (the last the rest): the
    windows the in-process path writes, so the file's row groups, and its bytes, are the same."""
    positions = np.sort(positions)
    starts = positions[::window_rows]
    ends = np.append(starts[1:], positions[-1] + 1) if len(positions) else starts
    return list(zip(starts.tolist(), ends.tolist()))


@guarded
def write_selection(item: dict) -> dict:
    """Selection ``j``'s rows, in position order, a window at a time: their prepared rows (a join
    by position with the prepared shards) and the scores and cluster they carry."""
    from rayapp.core.hashing import short_digest
    from rayapp.core.manifests import file_digest
    it = work_items.item_of(item)
    work, j = it["work"], it["j"]
    job = _job(work)
    files = _chosen_files(work, j)
    prepared = PreparedRows(job["prepared_paths"], job["prepared_rows"]) if job["internal"] else None
    # the in-process path's types: int64 from the clusters cache, the file's int32 labels otherwise
    cluster_type = pa.int64() if (job["clusters_source"] or {}).get("kind") == "cache" else pa.int32()
    ids: list[pa.Array] = []

    def table_of(chosen: pa.Table | None) -> pa.Table:
        n = 0 if chosen is None else chosen.num_rows
        if prepared is not None:
            rows = prepared.take(np.zeros(0, np.int64) if chosen is None else chosen["prep_pos"].to_numpy())
        else:
            rows = pa.table({"id": pa.array([], pa.string()) if chosen is None else chosen["id"]})
        P = np.zeros((0, job["checkpoints"])) if chosen is None else \
            np.stack([chosen[f"P{i}"].to_numpy() for i in range(job["checkpoints"])], axis=1)
        for k, v in metric_columns(P).items():
            rows = rows.append_column(k, pa.array(v))
        if job["clusters"]:
            cl = pa.array([], cluster_type) if chosen is None else chosen["cluster"].cast(cluster_type)
            rows = rows.append_column("cluster", cl)
        assert rows.num_rows == n
        return rows

    def parts():
        wrote = False
        positions = _concat([storage.read_parquet(f, ["pos"]) for f in files])
        for lo, hi in _windows(np.zeros(0, np.int64) if positions is None else positions["pos"].to_numpy(),
                               it["window_rows"]):
            chosen = _chosen_in(files, lo, hi)
            if chosen is None:
                continue
            ids.append(chosen["id"].combine_chunks())
            wrote = True
            yield table_of(chosen)
        if not wrote:
            yield table_of(None)

    rows = storage.write_parquet_parts(it["out"], parts())
    every = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    digest = short_digest("\n".join(every.sort().to_pylist()).encode())
    return work_items.reply(item, {"rows": rows, "sha256": file_digest(it["out"]), "ids_sha256": digest})


@guarded
def overlap_range(item: dict) -> dict:
    """Rows every pair of selections has in common within a range of positions."""
    it = work_items.item_of(item)
    work, lo, hi = it["work"], it["lo"], it["hi"]
    chosen = []
    for j in it["selections"]:
        t = _chosen_in(_chosen_files(work, j), lo, hi, ["pos"])
        chosen.append(np.zeros(0, np.int64) if t is None else t["pos"].to_numpy())
    common = [[int(len(np.intersect1d(a, b, assume_unique=True))) for b in chosen] for a in chosen]
    return work_items.reply(item, {"common": common})


# 5. the report, from the sample ----------------------------------------------------------------------------------

def draw_report(cfg, layout, work: str, main: int, main_tag: str, cluster_sizes, overlap, examples: list[dict],
                facts: dict, text_lengths: bool) -> str:
    """The report from the rows sampled (every row up to ``REPORT_SAMPLE_ROWS``), with the cluster
    sizes and overlap of every row; a Ray task, so the sample and the plotting stay off the driver."""
    from rayapp.stages.select.common import report_examples, write_selection_report

    job = _job(work)
    sample = pa.concat_tables([storage.read_parquet(f)
                               for f in storage.list_files(work_path(work, "sample"), ".parquet")]).sort_by("pos")
    pos = sample["pos"].to_numpy()
    main_pos = np.concatenate([storage.read_parquet(f, ["pos"])["pos"].to_numpy() for f in _chosen_files(work, main)]
                              or [np.zeros(0, np.int64)])
    selected = np.flatnonzero(np.isin(pos, main_pos))
    P = np.stack([sample[f"P{i}"].to_numpy() for i in range(job["checkpoints"])], axis=1)
    lengths = sample["length"].to_numpy() if "length" in sample.column_names else None
    shown = None
    if job["internal"]:
        prepared = PreparedRows(job["prepared_paths"], job["prepared_rows"])
        shown = report_examples(prepared, np.asarray([e["prep_pos"] for e in examples], np.int64),
                                np.asarray([e["lp"] for e in examples]))
    names, matrix = overlap
    return write_selection_report(cfg, layout, main_tag, P, sample["lp"].to_numpy(), selected,
                                  sample["eligible"].to_numpy(zero_copy_only=False), lengths,
                                  None if cluster_sizes is None else np.asarray(cluster_sizes),
                                  (names, np.asarray(matrix)), shown, facts, text_lengths)
