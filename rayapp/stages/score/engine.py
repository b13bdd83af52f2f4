"""Ray plumbing for scoring: prepared shards -> Ray Data -> actor pool -> per-shard atomic commits.

Work is (checkpoint, prepared shard). The driver streams results with ``iter_batches`` and
commits a shard's scores for a checkpoint the moment all of its rows are in, as one atomically
renamed Parquet file whose metadata records the row count and the inputs it came from. A re-run
skips every committed (checkpoint, shard) whose metadata still matches, so a killed run resumes
where it stopped and never scores a row twice.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rayapp.config import ScoreConfig
from rayapp.core import keyed, storage
from rayapp.core.datapools import DrivenStream
from rayapp.core.log import get_logger
from rayapp.core.manifests import CheckpointRecord, PreparedManifest
from rayapp.core.progress import ProgressLine
from rayapp.core.watchdog import watched_iter

log = get_logger(__name__)

SCORE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("checkpoint", pa.string()),
        ("loss_sum", pa.float64()),
        ("n_tokens", pa.int32()),
        ("mean_nll", pa.float64()),
        ("response_only_loss_sum", pa.float64()),
        ("response_only_mean_nll", pa.float64()),
    ]
)


# Keys a unit carries only where its setting is not the default (so older units stay valid): a
# unit scored with one of them set is not current for a lookup that leaves it at the default.
OPTIONAL_KEYS = ("rayapp.response_only_prefix", "rayapp.token_count", "rayapp.dtype")


def _keys(fingerprint: str, ck: CheckpointRecord, modes: list[str], rows: int,
          response_only_prefix: str = "", token_count: str = "labelled", dtype: str = "auto") -> dict[str, str]:
    """What a committed (checkpoint, shard) unit was scored from (core/keyed.py)."""
    keys = {
        "rayapp.prepared_fingerprint": fingerprint,
        "rayapp.checkpoint_uid": ck.uid,
        "rayapp.modes": ",".join(sorted(modes)),
        "rayapp.rows": str(rows),
    }
    if response_only_prefix and "response_only" in modes:  # absent when empty: older units stay valid
        keys["rayapp.response_only_prefix"] = response_only_prefix
    if token_count != "labelled":
        keys["rayapp.token_count"] = token_count
    if dtype != "auto":
        keys["rayapp.dtype"] = dtype
    return keys


def modes_by_checkpoint(checkpoints: list[CheckpointRecord], modes: list[str]) -> dict[str, list[str]]:
    """The modes each checkpoint is scored in. Selection reads the response-only scores of the
    first checkpoint alone (IFD's ``ro_nll0``), so with ``prompted`` also asked for, the later
    checkpoints score ``prompted`` only: at 3 epochs that is a quarter of the scoring work."""
    if "prompted" not in modes:
        return {ck.name: list(modes) for ck in checkpoints}
    later = [m for m in modes if m != "response_only"]
    return {ck.name: list(modes) if k == 0 else later for k, ck in enumerate(checkpoints)}


def is_committed(uri: str, keys: dict[str, str]) -> bool:
    return keyed.is_current(uri, keys, rows=int(keys["rayapp.rows"]),
                            absent=[k for k in OPTIONAL_KEYS if k not in keys])


def _mean(loss: np.ndarray, n: np.ndarray) -> np.ndarray:
    # n == 0 (prompt filled max_length): mean NLL 0, perplexity 1, as the paper's code gives;
    # the select stage excludes such rows unless asked to reproduce the original behaviour.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, loss / np.maximum(n, 1), 0.0)


def _commit(uri: str, parts: list[pa.Table], keys: dict[str, str], expected_ids: list[str]) -> int:
    """Write one (checkpoint, shard) file, in the prepared shard's row order, after checking that
    it holds exactly the shard's ids: none missing, none twice."""
    t = pa.concat_tables(parts)
    got = t["id"].to_pylist()
    pos = {rid: i for i, rid in enumerate(got)}
    if len(pos) != len(got) or set(pos) != set(expected_ids):
        dup = len(got) - len(pos)
        miss = len(set(expected_ids) - set(pos))
        raise RuntimeError(f"{uri}: ids do not match the prepared shard ({dup} repeated, {miss} missing)")
    t = t.take(pa.array([pos[rid] for rid in expected_ids]))
    loss = np.asarray(t["loss_sum"], dtype=np.float64)
    n = np.asarray(t["n_tokens"], dtype=np.int64)
    ro_loss = np.asarray(t["response_only_loss_sum"], dtype=np.float64)
    ro_n = np.asarray(t["response_only_n_tokens"], dtype=np.int64)
    out = pa.table(
        {
            "id": t["id"].cast(pa.string()),
            "checkpoint": t["checkpoint"].cast(pa.string()),
            "loss_sum": loss,
            "n_tokens": n.astype(np.int32),
            "mean_nll": _mean(loss, n),
            "response_only_loss_sum": ro_loss,
            "response_only_mean_nll": np.where(np.isnan(ro_loss), np.nan, _mean(ro_loss, ro_n)),
        },
        schema=SCORE_SCHEMA,
    )
    keyed.write_table(uri, out, keys)
    return out.num_rows


@dataclass
class ScoringStats:
    """What a scoring run did and how fast, counted as its batches arrive (``add``); the manifest
    keeps ``as_dict()``."""

    work_units: int
    skipped_units: int
    rows: int = 0
    tokens: int = 0
    real_tokens: int = 0
    pad_tokens: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0  # the actors' own seconds in their calls: start-up and waiting excluded
    forward_flop: float = 0.0
    first_result_s: float = 0.0
    first_tokens: int = 0  # real tokens of the first batch (steady-state rates leave it out)
    steady_tokens_per_s: float = 0.0
    peak_flops: float | None = None
    ran: bool = False

    def add(self, batch: pa.Table) -> None:
        real = int(np.asarray(batch["real_tokens"]).sum())
        self.real_tokens += real
        self.pad_tokens += int(np.asarray(batch["pad_tokens"]).sum())
        self.tokens += int(np.asarray(batch["n_tokens"]).sum())
        self.busy_seconds += float(np.asarray(batch["seconds"]).sum())
        self.forward_flop += 2.0 * float(np.dot(np.asarray(batch["model_params"], dtype=np.float64),
                                                np.asarray(batch["real_tokens"], dtype=np.float64)))

    def finish(self, seconds: float, first_result_s: float | None, steady_s: float) -> None:
        self.ran = True
        self.seconds = seconds
        self.first_result_s = first_result_s or 0.0
        self.steady_tokens_per_s = (self.real_tokens - self.first_tokens) / steady_s if steady_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / max(self.seconds, 1e-9)

    @property
    def padding_fraction(self) -> float:
        padded = self.real_tokens + self.pad_tokens
        return self.pad_tokens / padded if padded else 0.0

    def as_dict(self) -> dict:
        out = {"work_units": self.work_units, "skipped_units": self.skipped_units, "rows": self.rows,
               "tokens": self.tokens, "real_tokens": self.real_tokens, "pad_tokens": self.pad_tokens,
               "seconds": self.seconds, "busy_seconds": self.busy_seconds, "forward_flop": self.forward_flop}
        if self.ran:
            out.update(rows_per_s=self.rows_per_s, tokens_per_s=self.tokens_per_s,
                       padding_fraction=self.padding_fraction, steady_tokens_per_s=self.steady_tokens_per_s,
                       first_result_s=self.first_result_s)
            out.update(scoring_rates(out, self.peak_flops))
        return out


def score_checkpoints(
    prepared_dir: str,
    prepared_manifest: PreparedManifest,
    checkpoints: list[CheckpointRecord],
    out_dir: str,
    score_cfg: ScoreConfig,
    bos_id: int,
    pad_id: int,
    trust_remote_code: bool = False,
    runtime_env: dict | None = None,
    prefix_ids: list[int] | None = None,
    stall_s: float | None = None,
) -> dict:
    """Score every prepared row with every checkpoint; ``stall_s`` (ray.stall_timeout_s): no batch
    from the actor pool for that long is a StallError (core/watchdog.py). In order: the (checkpoint,
    shard) units not yet committed, the scorers' settings, the scores as they arrive (a shard is
    committed once all its rows are in), the rates. Returns ``ScoringStats.as_dict()``."""
    shards = {s.file: s.rows for s in prepared_manifest.shards}
    modes = modes_by_checkpoint(checkpoints, list(score_cfg.modes))

    def unit_keys(ck: CheckpointRecord, rows: int) -> dict[str, str]:
        return _keys(prepared_manifest.fingerprint, ck, modes[ck.name], rows, score_cfg.response_only_prefix,
                     score_cfg.token_count, score_cfg.dtype)

    pending = _pending(checkpoints, shards, out_dir, unit_keys)
    n_total = len(checkpoints) * len(shards)
    n_todo = sum(len(v) for v in pending.values())
    stats = ScoringStats(work_units=n_total, skipped_units=n_total - n_todo, peak_flops=score_cfg.peak_flops)
    if not pending:
        log.info("all %d (checkpoint, shard) units already committed in %s", n_total, out_dir)
        return stats.as_dict()
    log.info("%d of %d (checkpoint, shard) units to score; %d already committed", n_todo, n_total,
             stats.skipped_units)

    # A work unit: ``rows_per_task`` rows of one prepared shard, taken in the shard's length order
    # (batching.length_ordered_units), for one checkpoint; the scorer reads them itself. Each call
    # gets exactly one unit, so every row is scored in the same batch, with the same padding, on
    # every run: the scores, and the selections made from them, are deterministic. A shard's
    # scores reach the driver, and are committed, as its units finish.
    step = score_cfg.rows_per_task
    units = [{"path": storage.join(prepared_dir, f), "checkpoint": name, "unit": k}
             for name, files in pending.items() for f in files for k in range(-(-shards[f] // step))]
    scorer, scorer_kwargs = _scorer(score_cfg, checkpoints, pending, prepared_manifest, bos_id, pad_id,
                                    prefix_ids, trust_remote_code)
    committed = [0]
    if score_cfg.local:
        results = _in_this_process(scorer, scorer_kwargs, units)
    else:
        # each batch from the pool is progress; what is committed is said when it stalls
        pool = DrivenStream(_on_actor_pool, scorer, scorer_kwargs, units, score_cfg.resources, runtime_env)
        results = watched_iter(
            pool, stage="score", on_stall=pool.close,
            waiting_for=f"the scoring actor pool (Ray Data, {score_cfg.backend} scorers)", stall_s=stall_s,
            committed=lambda: f"{stats.skipped_units + committed[0]} of {n_total} (checkpoint, shard) units under "
                              f"{out_dir}")
    by_name = {ck.name: ck for ck in checkpoints}
    rows_todo = sum(shards[f] for files in pending.values() for f in files)
    buffers: dict[tuple[str, str], list[pa.Table]] = defaultdict(list)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    line = ProgressLine("score", unit="row-scores")
    t0 = time.perf_counter()
    t_first = None
    for batch in results:
        if t_first is None:
            t_first = time.perf_counter()
            stats.first_tokens = int(np.asarray(batch["real_tokens"]).sum())
        stats.add(batch)
        keys = [(n, os.path.basename(p)) for n, p in zip(batch["checkpoint"].to_pylist(), batch["path"].to_pylist())]
        for key in dict.fromkeys(keys):
            part = batch.filter(pa.array([k == key for k in keys]))
            buffers[key].append(part)
            counts[key] += part.num_rows
            name, shard = key
            if counts[key] > shards[shard]:
                raise RuntimeError(f"{name}/{shard}: got {counts[key]} rows, expected {shards[shard]}")
            if counts[key] == shards[shard]:  # the shard is complete for this checkpoint: commit it
                ids = storage.read_parquet(storage.join(prepared_dir, shard), ["id"])["id"].to_pylist()
                stats.rows += _commit(storage.join(out_dir, name, shard), buffers.pop(key),
                                      unit_keys(by_name[name], shards[shard]), ids)
                committed[0] += 1
                elapsed = max(time.perf_counter() - t0, 1e-9)
                line.update(stats.rows, rows_todo, f"{stats.real_tokens / elapsed:,.0f} tokens/s")
    line.close()
    if committed[0] != n_todo or buffers:
        raise RuntimeError(f"incomplete: committed {committed[0]} of {n_todo} units; partial: {list(buffers)}")
    # after the first result: actors are up and models loaded (start-up excluded)
    stats.finish(time.perf_counter() - t0, (t_first - t0) if t_first else None,
                 time.perf_counter() - t_first if t_first else 0.0)
    out = stats.as_dict()
    limit = (f", {out['forward_flop_fraction']:.0%} of the forward-FLOP limit per actor"
             if "forward_flop_fraction" in out else "")
    log.info("%d row-scores (%d checkpoints) in %.1fs: %.1f rows/s, %.0f tokens/s (%.0f per busy actor%s), "
             "padding %.1f%%, first result after %.1fs", stats.rows, len(pending), stats.seconds, stats.rows_per_s,
             stats.tokens_per_s, out["actor_tokens_per_s"], limit, 100 * stats.padding_fraction,
             stats.first_result_s)
    return out


def _pending(checkpoints: list[CheckpointRecord], shards: dict[str, int], out_dir: str, unit_keys) -> dict[str, list[str]]:
    """checkpoint name -> its shards whose scores are not committed yet (a rerun resumes here)."""
    pending: dict[str, list[str]] = {}
    for ck in checkpoints:
        todo = [f for f, rows in shards.items() if not is_committed(storage.join(out_dir, ck.name, f), unit_keys(ck, rows))]
        if todo:
            pending[ck.name] = todo
    return pending


def _scorer(score_cfg: ScoreConfig, checkpoints: list[CheckpointRecord], pending: dict[str, list[str]],
            prepared_manifest: PreparedManifest, bos_id: int, pad_id: int, prefix_ids: list[int] | None,
            trust_remote_code: bool) -> tuple[type, dict]:
    """The scorer class of the configured backend, and its constructor's arguments."""
    if score_cfg.backend == "vllm":
        from rayapp.stages.score.vllm_actor import VllmLossScorer as scorer

        backend_kwargs = {"engine_kwargs": score_cfg.engine_kwargs}
    else:
        from rayapp.stages.score.actor import LossScorer as scorer

        backend_kwargs = {}
    return scorer, dict(
        **backend_kwargs,
        checkpoints={ck.name: ck.path for ck in checkpoints},
        modes=list(score_cfg.modes),
        modes_by_checkpoint=modes_by_checkpoint(checkpoints, list(score_cfg.modes)),
        batch_tokens=score_cfg.batch_tokens,
        max_rows_per_batch=score_cfg.max_rows_per_batch,
        max_batch_padding=score_cfg.max_batch_padding,
        dtype=score_cfg.dtype,
        bos_id=bos_id,
        pad_id=pad_id,
        prefix_ids=list(prefix_ids or []),
        token_count=score_cfg.token_count,
        num_threads=max(1, int(score_cfg.resources.num_cpus)),
        trust_remote_code=trust_remote_code,
        cache_size=score_cfg.cached_models,
        max_length=prepared_manifest.max_length,
        rows_per_unit=score_cfg.rows_per_task,
        first_checkpoint=next(iter(pending)),  # the first units' checkpoint: loaded as the scorer starts
    )


def _on_actor_pool(scorer, scorer_kwargs: dict, units: list[dict], res, runtime_env: dict | None):
    """Ray Data: one block per unit, an actor pool of scorers; results stream back as they finish
    (runs in the pool's driving actor: core/datapools.py)."""
    import ray
    import ray.data

    from rayapp.core.placement import actor_pool

    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        scorer,
        fn_constructor_kwargs=scorer_kwargs,
        # one unit (one row) per call, never re-bundled in arrival order (see score_checkpoints); Ray
        # Data refuses batch_size=None for actors that ask for GPUs
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        **actor_pool("score", res).actor_options(),
        runtime_env=runtime_env,
    )
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _in_this_process(scorer, scorer_kwargs: dict, units: list[dict]):
    """score.local: the same scorer, units and batches, one unit after another in this process. No
    actor process starts and imports torch and transformers (most of a small run's time)."""
    import torch

    threads = torch.get_num_threads()  # the scorer sets its own; the caller's come back after
    try:
        s = scorer(**scorer_kwargs)
        for u in units:
            yield pa.table(s.score_unit(u["path"], u["checkpoint"], u["unit"]))
    finally:
        torch.set_num_threads(threads)


def scoring_rates(stats: dict, peak_flops: float | None) -> dict:
    """Per-actor rates while actors work (their busy seconds; start-up and waiting excluded): tokens
    per second, and with the device's peak the fraction of the forward-FLOP limit
    (2 x params x tokens per second over the peak), as training reports MFU."""
    busy = stats["busy_seconds"]
    out = {"actor_tokens_per_s": stats["real_tokens"] / busy if busy > 0 else 0.0,
           "actor_flop_per_s": stats["forward_flop"] / busy if busy > 0 else 0.0}
    if peak_flops:
        out["forward_flop_fraction"] = out["actor_flop_per_s"] / peak_flops
    return out
