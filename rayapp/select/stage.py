"""The select stage: trajectories (+ clusters) -> selections for the method and its baselines,
the selected shard with the original rows and ids, selection.json provenance, and the report."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp import __version__
from rayapp.common import storage
from rayapp.common.hashing import sha256_bytes
from rayapp.common.layout import RunLayout
from rayapp.common.manifests import (
    MissingInputError,
    file_digest,
    read_prepared_manifest,
    require_match,
    require_same_prepared,
)
from rayapp.config import RunConfig, SelectConfig
from rayapp.select.report import write_report
from rayapp.select.metrics import learning_percentage, learning_percentage_approx, no_response_rows
from rayapp.select.strategies import Trajectories, n_chunks, select


class SelectError(RuntimeError):
    pass


def selection_tag(method: str, chunk: str, budget: float) -> str:
    return f"{method}-{chunk}-{round(budget * 100, 2):g}pct" if method != "full" else "full"


def load_external_trajectories(path: str, prefix: str) -> tuple[Trajectories, str]:
    """A Parquet with an id (or index) column and {prefix}P0..Pn columns (e.g. the paper's)."""
    t = storage.read_parquet(path)
    id_col = "id" if "id" in t.column_names else "index" if "index" in t.column_names else None
    if id_col is None:
        raise SelectError(f"{path}: needs an 'id' or 'index' column")
    cols = []
    i = 0
    while f"{prefix}P{i}" in t.column_names:
        cols.append(f"{prefix}P{i}")
        i += 1
    if len(cols) < 2:
        have = sorted({c.split("_P")[0] + "_" for c in t.column_names if "_P" in c})
        raise SelectError(f"{path}: no columns {prefix}P0..Pn (prefixes present: {have})")
    P = np.stack([np.asarray(t[c], dtype=np.float64) for c in cols], axis=1)
    ids = np.asarray([str(x) for x in t[id_col].to_pylist()])
    n_tok = np.asarray(t[f"{prefix}n_tokens"]) if f"{prefix}n_tokens" in t.column_names else None
    return Trajectories(ids=ids, P=P, n_tokens=n_tok), sha256_bytes(storage.read_bytes(path))[:16]


def load_run_trajectories(layout: RunLayout) -> Trajectories:
    if not storage.exists(layout.trajectories):
        raise SelectError(f"no trajectories at {layout.trajectories}: run `rayapp score` first")
    return trajectories_from_table(storage.read_parquet(layout.trajectories))


def trajectories_from_table(t: pa.Table) -> Trajectories:
    """The score stage's trajectories table (id, n_tokens, P0..Pn, ro_nll0) -> Trajectories."""
    n = 0
    while f"P{n}" in t.column_names:
        n += 1
    P = np.stack([np.asarray(t[f"P{i}"], dtype=np.float64) for i in range(n)], axis=1)
    ro = np.asarray(t["ro_nll0"], dtype=np.float64) if "ro_nll0" in t.column_names else None
    n_tok = np.asarray(t["n_tokens"])
    return Trajectories(ids=np.asarray(t["id"].to_pylist()), P=P, n_tokens=n_tok, nll_response_only=ro,
                        response_length=n_tok)


def check_scores(layout: RunLayout, prepared: dict) -> dict:
    """The score manifest, once the trajectories are shown to be this run's: same prepared data,
    the file the score stage wrote (hash), every prepared row, and the current reference checkpoints."""
    from rayapp.score.stage import reference_checkpoints

    uri = storage.join(layout.scores("reference"), "manifest.json")
    if not storage.exists(uri) or not storage.exists(layout.trajectories):
        raise MissingInputError(f"no scores at {layout.scores('reference')}: run `rayapp score` first")
    sm = storage.read_json(uri)
    where = f"scores in {layout.scores('reference')}"
    require_same_prepared(where, sm.get("prepared_fingerprint"), prepared, "re-run `rayapp score`")
    require_match("rows", where, sm.get("rows"), prepared["rows"], "re-run `rayapp score`")
    require_match("content hashes", layout.trajectories, file_digest(layout.trajectories), sm.get("trajectories_sha256"),
                  "the file changed after the score stage wrote it: re-run `rayapp score`")
    if storage.exists(storage.join(layout.reference, "manifest.json")):
        current = [c.uid for c in reference_checkpoints(layout, prepared)]
        require_match("reference checkpoints", where, [c.get("uid") for c in sm["checkpoints"]], current,
                      "the reference model was trained again after scoring: re-run `rayapp score`")
    return sm


def _clusters(cfg: RunConfig, layout: RunLayout, prepared: dict, ids: np.ndarray) -> np.ndarray:
    """k-means cluster per row (cached beside the embeddings, keyed by inputs and settings)."""
    from rayapp.common.raycluster import init_ray
    from rayapp.select.embed import embed_prepared, embeddings_table, kmeans

    sc = cfg.select
    key = f"{prepared['fingerprint']}|{sc.embedding_model}|{sc.embed_max_tokens}|{sc.n_clusters}|{sc.seed}"
    if storage.exists(layout.embeddings):
        t = storage.read_parquet(layout.embeddings)
        if (t.schema.metadata or {}).get(b"rayapp.key") == key.encode():
            by_id = dict(zip(t["id"].to_pylist(), np.asarray(t["cluster"])))
            print(f"[select] reusing embeddings and {sc.n_clusters} clusters from {layout.embeddings}")
            return np.asarray([by_id[i] for i in ids])
    init_ray(cfg)
    files = [storage.join(layout.prepared, s["file"]) for s in prepared["shards"]]
    t0 = time.perf_counter()
    res = cfg.score.resources
    from rayapp.common.raycluster import pool_size_leaving_a_cpu

    actors = pool_size_leaving_a_cpu(cfg, res.num_cpus, res.max_actors)
    emb_ids, vecs = embed_prepared(files, sc.embedding_model, sc.embed_batch_size, res.num_cpus, actors,
                                   res.num_gpus, sc.embed_max_tokens, res.resources)
    t1 = time.perf_counter()
    labels = kmeans(vecs, sc.n_clusters, sc.seed)
    print(f"[select] embedded {len(emb_ids)} rows in {t1 - t0:.1f}s; k-means ({min(sc.n_clusters, len(vecs))} "
          f"clusters) in {time.perf_counter() - t1:.1f}s")
    table = embeddings_table(emb_ids, vecs, labels).replace_schema_metadata({b"rayapp.key": key.encode()})
    storage.write_parquet(layout.embeddings, table)
    by_id = dict(zip(emb_ids, labels))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SelectError(f"{len(missing)} trajectory ids are not in the prepared data (e.g. {missing[0]})")
    return np.asarray([by_id[i] for i in ids])


def _metrics_columns(t: Trajectories, sc: SelectConfig) -> dict[str, np.ndarray]:
    cols = {f"P{i}": t.P[:, i] for i in range(t.P.shape[1])}
    for i in range(1, t.P.shape[1]):
        cols[f"lp{i}"] = learning_percentage(t.P, i)
    cols["lp_app"] = learning_percentage_approx(t.P[:, 0], t.P[:, 1])
    return cols


def run_select(cfg: RunConfig, force: bool = False) -> dict:
    sc = cfg.select
    layout = RunLayout(cfg.output_dir)
    t_start = time.perf_counter()
    external = sc.trajectories is not None
    if external:
        traj, traj_digest = load_external_trajectories(sc.trajectories, sc.trajectory_prefix)
        prepared = None
        source = {"trajectories": sc.trajectories, "prefix": sc.trajectory_prefix, "sha256": traj_digest}
    else:
        prepared = read_prepared_manifest(layout)
        sm = check_scores(layout, prepared)
        traj = load_run_trajectories(layout)
        source = {"trajectories": layout.trajectories, "prepared_fingerprint": prepared["fingerprint"],
                  "trajectories_sha256": sm["trajectories_sha256"],
                  "score_checkpoints": [c["name"] for c in sm["checkpoints"]]}

    methods = [sc.method] + [m for m in sc.baselines if m != sc.method]
    needs_clusters = sc.stratified or "clust_rand" in methods
    clusters = None
    if needs_clusters:
        if external:
            if sc.stratified:
                raise SelectError(
                    "stratified selection clusters the rows' text, and external trajectories come without it: "
                    "use --set select.stratified=false (the global variant)"
                )
            methods = [m for m in methods if m != "clust_rand"]
            print("[select] clust_rand skipped: external trajectories have no text to cluster")
        else:
            clusters = _clusters(cfg, layout, prepared, traj.ids)
    for m in list(methods):
        if m == "ifd" and traj.nll_response_only is None:
            methods.remove(m)
            print("[select] ifd skipped: no response-only scores (add response_only to score.modes)")
        if m == "longest" and traj.response_length is None:
            methods.remove(m)
            print("[select] longest skipped: no response lengths in these trajectories")
    if sc.method not in methods:
        raise SelectError(f"method {sc.method!r} cannot run on these inputs (see above)")

    selections: dict[str, np.ndarray] = {}
    infos: dict[str, dict] = {}
    for m in methods:
        idx, info = select(
            m, traj, sc.budget, clusters=clusters if (sc.stratified or m == "clust_rand") else None,
            chunk=sc.chunk if m not in ("random", "clust_rand") else "low", lp_epoch=sc.lp_epoch, seed=sc.seed,
            keep_empty_responses=sc.keep_empty_responses,
        )
        selections[m], infos[m] = idx, info

    metric_cols = _metrics_columns(traj, sc)
    n_ck = traj.P.shape[1]
    provenance_common = {
        "rayapp_version": __version__,
        "budget": sc.budget,
        "chunks": n_chunks(sc.budget),
        "chunk": sc.chunk,
        "stratified": sc.stratified,
        "n_clusters": int(len(np.unique(clusters))) if clusters is not None else None,
        "cluster_settings": {"embedding_model": sc.embedding_model, "n_clusters": sc.n_clusters,
                             "random_state": sc.seed} if clusters is not None else None,
        "seed": sc.seed,
        "lp_epoch": sc.lp_epoch,
        "lp_app_p1_from": "a 1-epoch reference run" if n_ck == 2 else f"epoch 1 of a {n_ck - 1}-epoch reference run",
        "keep_empty_responses": sc.keep_empty_responses,
        "config_digest": cfg.digest(),
        "input_manifest_sha256": sha256_bytes(storage.read_bytes(layout.prepared_manifest))[:16] if prepared else None,
        **source,
    }
    out = {"main": None, "prepared_fingerprint": prepared["fingerprint"] if prepared else None, "selections": {}}
    prepared_table = None
    if prepared is not None:
        prepared_table = storage.read_parquet_dir(layout.prepared)
    for m in methods:
        tag = selection_tag(m, sc.chunk if m not in ("random", "clust_rand") else "low", sc.budget)
        folder = storage.join(layout.selection, tag)
        idx = selections[m]
        chosen_ids = traj.ids[idx]
        extra = {k: v[idx] for k, v in metric_cols.items()}
        if clusters is not None:
            extra["cluster"] = clusters[idx]
        if prepared_table is not None:
            rows = prepared_table.filter(pc.is_in(prepared_table["id"], value_set=pa.array(chosen_ids)))
            order = {rid: i for i, rid in enumerate(chosen_ids)}
            rows = rows.take(pa.array(np.argsort([order[r] for r in rows["id"].to_pylist()])))
            if rows.num_rows != len(chosen_ids):
                raise SelectError(f"{tag}: {len(chosen_ids) - rows.num_rows} selected ids are missing from the prepared data")
        else:
            rows = pa.table({"id": pa.array(chosen_ids, pa.string())})
        for k, v in extra.items():
            rows = rows.append_column(k, pa.array(v))
        shard = storage.join(folder, "selected.parquet")
        storage.write_parquet(shard, rows)
        prov = {"method": m, "tag": tag, **provenance_common, **infos[m],
                "selected_ids_sha256": sha256_bytes("\n".join(sorted(chosen_ids)).encode())[:16]}
        storage.write_json(storage.join(folder, "selection.json"), prov)
        out["selections"][m] = {"tag": tag, "rows": int(len(idx)), "path": shard, "sha256": file_digest(shard)}
    out["main"] = sc.method

    # report (local folder; copied as files when output_dir is remote)
    eligible = np.ones(len(traj.ids), dtype=bool) if sc.keep_empty_responses else ~no_response_rows(traj.P, traj.n_tokens)
    lp = learning_percentage(traj.P, sc.lp_epoch) if sc.method != "lp_app" else metric_cols["lp_app"]
    examples = None
    if prepared_table is not None:
        order = np.argsort(lp[eligible], kind="stable")
        pos = np.nonzero(eligible)[0][order]
        pick = np.concatenate([pos[:5], pos[-5:]]) if len(pos) > 10 else pos
        wanted = set(traj.ids[pick])
        text = {r["id"]: r for r in prepared_table.select(["id", "instruction", "output"]).to_pylist()
                if r["id"] in wanted}
        examples = [{"lp": float(lp[i]), **text[traj.ids[i]]} for i in pick]
    report_uri = storage.join(layout.selection, "report")
    report_dir = storage.local_path(report_uri)
    if storage.is_remote(report_uri):  # drawn locally, then uploaded beside the other outputs
        import tempfile

        report_dir = tempfile.mkdtemp(prefix="rayapp-report-")
    main_tag = out["selections"][sc.method]["tag"]
    html_path = write_report(
        report_dir, f"rayapp selection: {main_tag} ({cfg.name})", traj.P, lp, selections[sc.method], eligible,
        traj.response_length, clusters, {m: traj.ids[i] for m, i in selections.items()}, examples,
        {"method": sc.method, "rows": len(traj.ids), "selected": int(len(selections[sc.method])),
         "no_response_rows (excluded)": infos[sc.method]["excluded_no_response"], **provenance_common},
    )
    if storage.is_remote(report_uri):
        storage.upload_dir(report_dir, report_uri)
        html_path = storage.join(report_uri, "report.html")
    out["report"] = html_path
    out["seconds"] = round(time.perf_counter() - t_start, 2)
    storage.write_json(storage.join(layout.selection, "manifest.json"), out)
    print(f"[select] {sc.method}: kept {len(selections[sc.method])} of {len(traj.ids)} rows "
          f"(budget {sc.budget:.0%}, {'stratified over ' + str(provenance_common['n_clusters']) + ' clusters' if clusters is not None and sc.stratified else 'global'}; "
          f"{infos[sc.method]['excluded_no_response']} rows with no response tokens excluded)")
    for m in methods[1:]:
        print(f"[select]   baseline {m:<10} {len(selections[m])} rows -> {out['selections'][m]['tag']}")
    print(f"[select] shard: {out['selections'][sc.method]['path']}")
    print(f"[select] report: {html_path}  ({out['seconds']:.1f}s)")
    return out
