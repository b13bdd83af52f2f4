"""The select stage: trajectories (+ clusters) -> selections for the method and its baselines,
the selected shard with the original rows and ids, selection.json provenance, and the report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayapp.config import RunConfig, SelectConfig
from rayapp.core import storage
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import (
    PreparedManifest,
    ScoresManifest,
    SelectionManifest,
    SelectionRecord,
    file_digest,
    read_prepared,
    reference_checkpoints,
    require_manifest,
    require_match,
    require_same_prepared,
)
from rayapp.core.prepared_rows import PreparedRows, positions_of
from rayapp.core.stage import Stage, StageContext
from rayapp.selection.methods import Trajectories
from rayapp.selection.metrics import lp_of, metric_columns, no_response_rows
from rayapp.selection.strategies import select
from rayapp.stages.select.clusters import clusters_for, finish_ahead, start_ahead, started_ahead
from rayapp.stages.select.common import (
    SELECTION_WINDOW_ROWS,
    SelectError,
    SelectionInputs,
    chunk_of,
    log_selections,
    matched_size,
    needs_clusters,
    provenance,
    report_examples,
    report_facts,
    runnable,
    selected_ids_digest,
    selection_specs,
    selection_tag,
    without_stratified,
    write_selection_json,
    write_selection_report,
)

log = get_logger(__name__)


def load_external_trajectories(path: str, prefix: str) -> tuple[Trajectories, str]:
    """A Parquet with an id (or index) column and {prefix}P0..Pn columns (e.g. the paper's)."""
    return external_trajectories(storage.read_parquet(path), path, prefix), file_digest(path)


def external_trajectories(t: pa.Table, path: str, prefix: str) -> Trajectories:
    """``load_external_trajectories`` of a table read from ``path`` (all of it, some rows, or none:
    its schema, which says what can run)."""
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
    return Trajectories(ids=ids, P=P, n_tokens=n_tok)


def trajectories_from_table(t: pa.Table) -> Trajectories:
    """The score stage's trajectories table (id, n_tokens, P0..Pn, ro_nll0) -> Trajectories."""
    n = 0
    while f"P{n}" in t.column_names:
        n += 1
    P = np.stack([np.asarray(t[f"P{i}"], dtype=np.float64) for i in range(n)], axis=1)
    def column(name):
        return np.asarray(t[name], dtype=np.float64) if name in t.column_names else None

    n_tok = np.asarray(t["n_tokens"])
    return Trajectories(ids=np.asarray(t["id"].to_pylist()), P=P, n_tokens=n_tok, nll_response_only=column("ro_nll0"),
                        response_length=n_tok, ifd_nll=column("ifd_nll0"), ifd_nll_response_only=column("ifd_ro_nll0"))


def _lengths_and_flags(shard: pa.Table) -> pa.Table:
    # a shard's response text reduced to its length before the next shard is read
    return pa.table({"id": shard["id"], "chars": pc.utf8_length(shard["output"]).cast(pa.int64()),
                     "truncated": shard["truncated"]})


def trajectory_positions(rows: PreparedRows, ids: np.ndarray) -> tuple[np.ndarray, pa.Table]:
    """Each trajectory row's prepared position, and the prepared rows' ids, response characters and
    truncation flags (prepared order): three small columns, never the rows' text or tokens."""
    info = rows.columns(["id", "output", "truncated"], per_shard=_lengths_and_flags)
    try:
        return positions_of(ids, info["id"]), info
    except KeyError as exc:
        raise SelectError(f"trajectory {exc.args[0]}") from None


def check_scores(layout: RunLayout, prepared: PreparedManifest) -> ScoresManifest:
    """The score manifest, once the trajectories are shown to be this run's: same prepared data,
    the file the score stage wrote (hash), every prepared row, and the current reference checkpoints."""
    sm: ScoresManifest = require_manifest(layout, "score")  # type: ignore[assignment]
    where = f"scores in {layout.scores_root}"
    require_same_prepared(where, sm.prepared_fingerprint, prepared, "re-run `rayapp score`")
    require_match("rows", where, sm.rows, prepared.rows, "re-run `rayapp score`")
    require_match("content hashes", layout.trajectories,
                  file_digest(layout.trajectories) if storage.exists(layout.trajectories) else None,
                  sm.trajectories_sha256, "the file changed after the score stage wrote it: re-run `rayapp score`")
    if storage.exists(layout.manifest("reference")):
        current = [c.uid for c in reference_checkpoints(layout, prepared)]
        require_match("reference checkpoints", where, [c.uid for c in sm.checkpoints], current,
                      "the reference model was trained again after scoring: re-run `rayapp score`")
    return sm


def _clusters(cfg: RunConfig, layout: RunLayout, prepared: PreparedManifest, ids: np.ndarray,
              force: bool) -> np.ndarray:
    """k-means cluster per trajectory row."""
    clustered = clusters_for(cfg, layout, prepared, force)
    try:
        positions = positions_of(ids, clustered["id"], within="the clustered data")
    except KeyError as exc:
        raise SelectError(f"trajectory {exc.args[0]}") from None
    return clustered["cluster"].to_numpy().astype(np.int64)[positions]


def _clusters_identity(cfg: RunConfig) -> str | None:
    """A clusters file's content: a changed file selects again."""
    path = cfg.select.clusters
    return file_digest(path) if path and storage.exists(path) else None


class SelectStage(Stage):
    name = "select"

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core import placement

        return [placement.embedding(cfg), placement.selecting(cfg)]
    help = "learning-percentage ranking and baselines -> selected shard + report"
    manifest_type = SelectionManifest
    reset_on_force = ("embeddings", "clusters.parquet")  # the cached sentence embeddings and clusters

    def read_inputs(self, cfg: RunConfig, layout: RunLayout) -> SelectionInputs:
        return _read_inputs(cfg, layout)

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, inputs: SelectionInputs) -> str:
        if inputs.prepared is None:
            return fingerprint(trajectories=inputs.source["sha256"], select=cfg.select.content(),
                               clusters=_clusters_identity(cfg))
        return fingerprint(prepared=inputs.prepared.fingerprint, scores=inputs.scores.fingerprint,
                           trajectories=inputs.scores.trajectories_sha256, select=cfg.select.content(),
                           clusters=_clusters_identity(cfg))

    def outputs_complete(self, m: SelectionManifest, layout: RunLayout) -> bool:
        return all(storage.exists(e.path) and file_digest(e.path) == e.sha256 for e in m.selections.values())

    def start_ahead(self, cfg: RunConfig, layout: RunLayout) -> None:
        """The clusters need only the prepared data: start them while earlier stages run."""
        sc = cfg.select
        if sc.trajectories is None and sc.clusters is None and (sc.stratified or "clust_rand" in sc.baselines):
            start_ahead(cfg, layout, read_prepared(layout))

    def finish_ahead(self, cfg: RunConfig, layout: RunLayout) -> None:
        if started_ahead():  # else nothing to wait for (and maybe no prepared data: --trajectories)
            finish_ahead(cfg, layout, read_prepared(layout))

    def run(self, ctx: StageContext) -> SelectionManifest:
        return select_rows(ctx.cfg, ctx.layout, ctx.force, ctx.inputs)

    def done_detail(self, m: SelectionManifest) -> dict:
        return {"main": m.main}

    def artifacts(self, m: SelectionManifest, layout: RunLayout) -> list[str]:
        return [m.report] + [s.path for s in m.selections.values()]

    def summary(self, m: SelectionManifest, layout: RunLayout) -> list[str]:
        main = m.main_selection
        others = ", ".join(f"{k} {e.rows}" for k, e in m.selections.items() if k != m.main)
        return [f"{m.main}: {main.rows} rows -> {main.path}", f"baselines: {others}", f"report: {m.report}"]


@dataclass
class Chosen:
    """One selection: the rows' positions in the trajectories and how they were chosen."""

    method: str
    scope: str
    idx: np.ndarray
    info: dict


def select_rows(cfg: RunConfig, layout: RunLayout, force: bool = False,
                inputs: SelectionInputs | None = None) -> SelectionManifest:
    """The select stage's work, in order: the inputs (read now unless given), the selections that
    can run, the clusters, a pure ``choose``, each selection written with its provenance, the
    report, the log. With ``select.workers`` it is spread over Ray Data (distributed.py)."""
    sc = cfg.select
    inputs = inputs or _read_inputs(cfg, layout)
    if sc.workers > 0:
        from rayapp.stages.select.distributed import select_spread

        return select_spread(cfg, layout, force, inputs)
    specs = selection_specs(sc)
    clusters, cluster_source = None, None
    if needs_clusters(specs):
        if sc.clusters is not None:
            from rayapp.stages.select.external_clusters import clusters_for_ids, read_clusters

            table, cluster_source = read_clusters(sc.clusters, sc.n_clusters, sc.seed, sc.kmeans_fit_rows)
            clusters = clusters_for_ids(sc.clusters, table, inputs.traj.ids)
            log.info("clusters from %s: %d (%s)", sc.clusters, len(np.unique(clusters)), cluster_source["kind"])
        elif inputs.prepared is None:
            specs = without_stratified(sc, specs)
        else:
            clusters = _clusters(cfg, layout, inputs.prepared, inputs.traj.ids, force)
    specs = runnable(sc, specs, inputs.traj)
    chosen = choose(sc, inputs.traj, specs, clusters)
    metric_cols = metric_columns(inputs.traj.P)
    common = provenance(cfg, layout, inputs, None if clusters is None else len(np.unique(clusters)), cluster_source)
    records = {key: _write_selection(cfg, layout, inputs, key, c, clusters, metric_cols, common)
               for key, c in chosen.items()}
    report = _write_selection_report(cfg, layout, inputs, chosen, records, clusters, metric_cols, common)
    log_selections(sc, len(inputs.traj.ids), chosen, records, common, report)
    return SelectionManifest(prepared_fingerprint=inputs.prepared.fingerprint if inputs.prepared else None,
                             main=sc.method, selections=records, report=report)


def _read_inputs(cfg: RunConfig, layout: RunLayout) -> SelectionInputs:
    """The trajectories and what they belong to. With ``select.workers`` only their schema is read
    here (what can run): the rows are read where they are selected."""
    sc = cfg.select
    spread = sc.workers > 0
    if sc.trajectories is not None:
        if not storage.exists(sc.trajectories):
            raise SelectError(f"select.trajectories: file not found: {sc.trajectories}")
        if spread:
            schema_only = storage.read_schema(sc.trajectories).empty_table()
            traj, traj_digest = external_trajectories(schema_only, sc.trajectories, sc.trajectory_prefix), \
                file_digest(sc.trajectories)
        else:
            traj, traj_digest = load_external_trajectories(sc.trajectories, sc.trajectory_prefix)
        return SelectionInputs(traj, None, None, None, None, {"trajectories": sc.trajectories,
                               "prefix": sc.trajectory_prefix, "sha256": traj_digest},
                               "response tokens scored (after truncation)")
    prepared = read_prepared(layout)
    sm = check_scores(layout, prepared)
    rows = PreparedRows.of(prepared, layout)
    source = {"trajectories": layout.trajectories, "prepared_fingerprint": prepared.fingerprint,
              "trajectories_sha256": sm.trajectories_sha256, "score_checkpoints": [c.name for c in sm.checkpoints]}
    if spread:
        traj = trajectories_from_table(storage.read_schema(layout.trajectories).empty_table())
        traj.response_length, traj.truncated = np.zeros(0, np.int64), np.zeros(0, bool)
        return SelectionInputs(traj, prepared, sm, rows, None, source, "characters of the response text")
    traj = trajectories_from_table(storage.read_parquet(layout.trajectories))
    positions, info = trajectory_positions(rows, traj.ids)
    # "Long Is More": the response text's length, not what truncation left of its tokens
    traj.response_length = info["chars"].to_numpy()[positions]
    traj.truncated = info["truncated"].to_numpy(zero_copy_only=False)[positions]
    return SelectionInputs(traj, prepared, sm, rows, positions, source, "characters of the response text")


def choose(sc: SelectConfig, traj: Trajectories, specs: dict, clusters: np.ndarray | None) -> dict[str, Chosen]:
    """Every selection (pure: numpy only), the main method first. Equal sizes: a global selection
    keeps as many rows as the main one (stratified ones already do: the same per-cluster chunks)."""
    chosen: dict[str, Chosen] = {}
    for key, (m, scope) in specs.items():
        size = matched_size(sc, key, scope, len(chosen[sc.method].idx) if chosen else None)
        idx, info = select(
            m, traj, sc.budget, clusters=clusters if scope == "stratified" else None,
            chunk=chunk_of(sc, m), lp_epoch=sc.lp_epoch, seed=sc.seed,
            keep_empty_responses=sc.keep_empty_responses, size=size,
        )
        chosen[key] = Chosen(m, scope, idx, info)
    return chosen


def _write_selection(cfg: RunConfig, layout: RunLayout, inputs: SelectionInputs, key: str, c: Chosen,
                     clusters: np.ndarray | None, metric_cols: dict, common: dict) -> SelectionRecord:
    """One selection's folder: the chosen rows (all their prepared columns, in selection order, with
    their scores and cluster) and selection.json."""
    traj = inputs.traj
    tag = selection_tag(c.method, chunk_of(cfg.select, c.method), cfg.select.budget, c.scope)
    folder = layout.selection_dir(tag)
    chosen_ids = traj.ids[c.idx]
    extra = {k: v[c.idx] for k, v in metric_cols.items()}
    if clusters is not None:
        extra["cluster"] = clusters[c.idx]

    def parts():
        """The chosen rows, a window at a time in selection order, each read from the shards
        holding it (selections come in prepared order, so the shards are read about once)."""
        for lo in range(0, max(1, len(chosen_ids)), SELECTION_WINDOW_ROWS):
            window = slice(lo, lo + SELECTION_WINDOW_ROWS)
            if inputs.prepared_rows is not None:
                rows = inputs.prepared_rows.take(inputs.positions[c.idx[window]])
            else:
                rows = pa.table({"id": pa.array(chosen_ids[window], pa.string())})
            for k, v in extra.items():
                rows = rows.append_column(k, pa.array(v[window]))
            yield rows

    shard = storage.join(folder, "selected.parquet")
    storage.write_parquet_parts(shard, parts())
    write_selection_json(cfg, layout, inputs, key, c.method, tag, c.info, common, selected_ids_digest(chosen_ids))
    return SelectionRecord(method=c.method, tag=tag, rows=int(len(c.idx)), path=shard, sha256=file_digest(shard))


def _write_selection_report(cfg: RunConfig, layout: RunLayout, inputs: SelectionInputs, chosen: dict[str, Chosen],
                            records: dict[str, SelectionRecord], clusters: np.ndarray | None, metric_cols: dict,
                            common: dict) -> str:
    """The HTML report: LP's distribution, the selections' overlap, and the rows learned earliest and latest."""
    from rayapp.stages.select.report import overlap_matrix

    sc, traj = cfg.select, inputs.traj
    main = chosen[sc.method]
    eligible = np.ones(len(traj.ids), dtype=bool) if sc.keep_empty_responses \
        else ~no_response_rows(traj.P, traj.n_tokens)
    lp = lp_of(sc.method, sc.lp_epoch, traj.P)
    examples = None
    if inputs.prepared_rows is not None:
        order = np.argsort(lp[eligible], kind="stable")
        pos = np.nonzero(eligible)[0][order]
        pick = np.concatenate([pos[:5], pos[-5:]]) if len(pos) > 10 else pos
        examples = report_examples(inputs.prepared_rows, inputs.positions[pick], lp[pick])
    sizes = (np.bincount(clusters[eligible]) if eligible.any() else np.zeros(1)) if clusters is not None else None
    overlap = (list(chosen), overlap_matrix({k: traj.ids[c.idx] for k, c in chosen.items()}))
    return write_selection_report(cfg, layout, records[sc.method].tag, traj.P, lp, main.idx, eligible,
                                  traj.response_length, sizes, overlap, examples,
                                  report_facts(sc, len(traj.ids), len(main.idx), main.info, common),
                                  inputs.prepared_rows is not None)


