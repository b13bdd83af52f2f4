"""What the select stage's two paths share (stage.py's in-process one, distributed.py's spread
over Ray Data): the selections to make, their provenance, their files' metadata, the report and
the log."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rayapp import __version__
from rayapp.config import RunConfig, SelectConfig
from rayapp.core import storage
from rayapp.core.errors import RayappError
from rayapp.core.hashing import short_digest
from rayapp.core.layout import RunLayout
from rayapp.core.log import get_logger
from rayapp.core.manifests import PreparedManifest, ScoresManifest, SelectionRecord, file_digest
from rayapp.core.prepared_rows import PreparedRows
from rayapp.selection import methods
from rayapp.selection.methods import Trajectories
from rayapp.selection.strategies import n_chunks

log = get_logger("rayapp.stages.select.stage")


class SelectError(RayappError):
    """Selection cannot run on these inputs (missing columns, text needed but absent)."""


@dataclass
class SelectionInputs:
    """What a selection is made from: the trajectories, and (unless they came from elsewhere) the
    prepared rows they belong to."""

    traj: Trajectories
    prepared: PreparedManifest | None  # None: external trajectories (select.trajectories)
    scores: ScoresManifest | None
    prepared_rows: PreparedRows | None
    positions: np.ndarray | None  # each trajectory row's position in the prepared shards
    source: dict  # where the trajectories came from, for the provenance
    length_measure: str  # what "longest" measures


# Rows of a selection in memory at once while it is written (with their token ids: ~10 KB a row
# at 512 tokens, so ~160 MB), whatever the selection's size.
SELECTION_WINDOW_ROWS = 16_384


def selection_tag(method: str, chunk: str, budget: float, scope: str = "stratified") -> str:
    """e.g. lp-low-33pct, ppl_high-global-low-5pct (``selection.methods.tag``)."""
    return methods.tag(method, chunk, budget, scope)


def selection_specs(sc: SelectConfig) -> dict[str, tuple[str, str]]:
    """{key: (method, scope)} for the main method and each baseline, in order, without repeats. A
    key is the method's name when it runs in its default scope (its own, else the one
    ``select.stratified`` sets), else METHOD:SCOPE."""
    default = "stratified" if sc.stratified else "global"
    out: dict[str, tuple[str, str]] = {}
    for spec in [sc.method, *sc.baselines]:
        method, scope = methods.parse_selection(spec)
        natural = methods.natural_scope(method, default)
        scope = scope or natural
        out.setdefault(method if scope == natural else f"{method}:{scope}", (method, scope))
    return out


def needs_clusters(specs: dict) -> bool:
    return any(scope == "stratified" for _, scope in specs.values())


def without_stratified(sc: SelectConfig, specs: dict) -> dict:
    """External trajectories come without the rows' text, so nothing can be clustered."""
    if specs[sc.method][1] == "stratified":
        raise SelectError("stratified selection clusters the rows' text, and external trajectories come without "
                          "it: use --set select.stratified=false (the global variant)")
    dropped = [k for k, (_, scope) in specs.items() if scope == "stratified"]
    log.info("%s skipped: external trajectories have no text to cluster", ", ".join(dropped))
    return {k: v for k, v in specs.items() if k not in dropped}


def runnable(sc: SelectConfig, specs: dict, traj: Trajectories) -> dict:
    """The selections these trajectories have the scores for (their columns: ``traj`` may hold no
    rows); the main method must be one."""
    out = dict(specs)
    for key, (m, _) in specs.items():
        why = methods.method_named(m).unrunnable(traj)
        if why:
            del out[key]
            log.info("%s skipped: %s", key, why)
    if sc.method not in out:
        raise SelectError(f"method {sc.method!r} cannot run on these inputs (see above)")
    return out


def matched_size(sc: SelectConfig, key: str, scope: str, main_rows: int | None) -> int | None:
    """The size a global selection is held to: the main selection's (``select.match_size``)."""
    return main_rows if sc.match_size and scope == "global" and key != sc.method else None


def chunk_of(sc: SelectConfig, method: str) -> str:
    return methods.chunk_of(method, sc.chunk)


def provenance(cfg: RunConfig, layout: RunLayout, inputs: SelectionInputs, n_clusters: int | None,
               cluster_source: dict | None) -> dict:
    """What every selection.json (and the report) records about how the selections were made."""
    sc = cfg.select
    n_ck = inputs.traj.P.shape[1]
    return {
        "rayapp_version": __version__,
        "budget": sc.budget,
        "chunks": n_chunks(sc.budget),
        "chunk": sc.chunk,
        "stratified": sc.stratified,
        "n_clusters": int(n_clusters) if n_clusters is not None else None,
        "cluster_settings": cluster_source if cluster_source is not None else
        {"embedding_model": sc.embedding_model, "n_clusters": sc.n_clusters,
         "random_state": sc.seed} if n_clusters is not None else None,
        "seed": sc.seed,
        "lp_epoch": sc.lp_epoch,
        "lp_app_p1_from": "a 1-epoch reference run" if n_ck == 2 else f"epoch 1 of a {n_ck - 1}-epoch reference run",
        "keep_empty_responses": sc.keep_empty_responses,
        "config_digest": cfg.digest(),
        "input_manifest_sha256": file_digest(layout.prepared_manifest) if inputs.prepared else None,
        **inputs.source,
    }


def write_selection_json(cfg: RunConfig, layout: RunLayout, inputs: SelectionInputs, key: str, method: str,
                         tag: str, info: dict, common: dict, ids_digest: str) -> None:
    """A selection's selection.json: how it was chosen, from what, and the digest of its ids."""
    traj = inputs.traj
    prov = {"method": method, "selection": key, "tag": tag, **common, **info, "selected_ids_sha256": ids_digest}
    if method in ("ifd", "ifd_cherry"):
        prefix = cfg.score.response_only_prefix
        prov["ifd_unconditioned_text"] = ("BOS + the response's tokens" if not prefix
                                          else f"{prefix!r} + the response's tokens")
        prov["ifd_scored_by"] = ("the untrained target model" if traj.ifd_nll is not None
                                 else "the reference model before training (epoch 0)")
    if method == "longest":
        prov["length_measure"] = inputs.length_measure
    storage.write_json(storage.join(layout.selection_dir(tag), "selection.json"), prov)


def selected_ids_digest(ids) -> str:
    """The digest of a selection's ids, whatever their order."""
    return short_digest("\n".join(sorted(ids)).encode())


def report_examples(rows: PreparedRows, positions: np.ndarray, lp: np.ndarray) -> list[dict]:
    """The report's example rows (their text, not their tokens), with their LP."""
    columns = [c for c in ("id", "instruction", "output", "messages") if c in rows.column_names]
    return [{"lp": float(v), **r} for v, r in zip(lp, rows.take(positions, columns).to_pylist())]


def report_facts(sc: SelectConfig, rows: int, selected: int, main_info: dict, common: dict) -> dict:
    return {"method": sc.method, "rows": rows, "selected": int(selected),
            "no_response_rows (excluded)": main_info["excluded_no_response"], **common}


def write_selection_report(cfg: RunConfig, layout: RunLayout, main_tag: str, P, lp, selected, eligible, lengths,
                           cluster_sizes, overlap, examples, facts: dict, text_lengths: bool) -> str:
    """``report.write_report`` into the run's report folder (drawn locally, uploaded beside the
    other outputs when output_dir is remote)."""
    from rayapp.stages.select.report import write_report

    report_uri = layout.selection_report
    report_dir = storage.local_path(report_uri)
    if storage.is_remote(report_uri):
        import tempfile

        report_dir = tempfile.mkdtemp(prefix="rayapp-report-")
    html_path = write_report(
        report_dir, f"rayapp selection: {main_tag} ({cfg.name})", P, lp, selected, eligible, lengths, cluster_sizes,
        overlap, examples, facts, length_label="response characters" if text_lengths else "response tokens")
    if storage.is_remote(report_uri):
        storage.upload_dir(report_dir, report_uri)
        html_path = storage.join(report_uri, "report.html")
    return html_path


def log_selections(sc: SelectConfig, rows: int, chosen: dict, records: dict[str, SelectionRecord], common: dict,
                   report: str) -> None:
    """``chosen``: each selection's scope and size (a ``Chosen``, or its info dict's)."""
    main = chosen[sc.method].info
    where = f"stratified over {common['n_clusters']} clusters" if main["scope"] == "stratified" else "global"
    log.info("%s: kept %d of %d rows (budget %.0f%%, %s; %d rows with no response tokens excluded)", sc.method,
             main["selected"], rows, 100 * sc.budget, where, main["excluded_no_response"])
    for key in list(chosen)[1:]:
        info = chosen[key].info
        log.info("  baseline %-16s %d rows (%s) -> %s", key, info["selected"], info["scope"], records[key].tag)
    log.info("report: %s", report)
