"""The scoring engine on a real local Ray cluster (2 CPUs) with tiny models built here."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayapp.config import ScoreConfig
from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.core.manifests import CheckpointRecord
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_causal_lm, load_tokenizer
from rayapp.ml.models.losses import one_row_losses, response_only_sequence
from rayapp.selection.strategies import select
from rayapp.stages.score.batching import fixed_size_batches, length_ordered_units, padding_stats, token_budget_batches
from rayapp.stages.score.engine import score_checkpoints
from rayapp.stages.score.stage import special_ids
from rayapp.stages.score.trajectories import build_trajectories
from rayapp.stages.select.stage import trajectories_from_table
from rayapp.testing.faults import SCORE_FAULT_ENV as FAULT_ENV
from tests.bad_rows import mixed_corpus
from tests.conftest import alpaca_rows, run_stage, wait_for_idle_cpus


def test_token_budget_batches_fit_and_cover():
    lengths = [5, 50, 7, 300, 12, 49, 51, 8]
    batches = token_budget_batches(lengths, batch_tokens=100, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100  # oversize rows ride alone
    real, padded = padding_stats(lengths, batches)
    real_f, padded_f = padding_stats(lengths, fixed_size_batches(len(lengths), 3))
    assert real == real_f == sum(lengths) and padded < padded_f
    # a padding bound splits batches the token budget alone would keep: no batch is over 10% padding
    bounded = token_budget_batches(lengths, batch_tokens=10_000, max_rows=8, max_padding=0.1)
    assert sorted(i for b in bounded for i in b) == list(range(len(lengths)))
    assert all(min(lengths[i] for i in b) >= 0.9 * max(lengths[i] for i in b) for b in bounded)
    assert len(bounded) > len(token_budget_batches(lengths, batch_tokens=10_000, max_rows=8))


def test_length_ordered_units_cover_every_row_once_and_cut_padding():
    lengths = alpaca_like_lengths = np.random.default_rng(0).lognormal(5.0, 0.6, size=2000).astype(int) + 8

    def padding(units):
        real = padded = 0
        for u in units:
            r, p = padding_stats(lengths[u], token_budget_batches(lengths[u], 8192, 256))
            real, padded = real + r, padded + p
        return 1 - real / padded

    units = length_ordered_units(alpaca_like_lengths, 512)
    rows = np.concatenate(units)
    assert len(rows) == len(lengths) and len(set(rows.tolist())) == len(lengths)  # every row, once
    assert [len(u) for u in units] == [512, 512, 512, 464] and all((np.diff(u) > 0).all() for u in units)
    assert units[0].tolist() == sorted(np.argsort(-lengths, kind="stable")[:512].tolist())  # the longest first
    consecutive = [np.arange(lo, min(lo + 512, len(lengths))) for lo in range(0, len(lengths), 512)]
    assert padding(units) < 0.05 and padding(units) < padding(consecutive) / 2


@pytest.fixture(scope="module")
def scored_setup(tmp_path_factory, make_config_module):
    """150 real Alpaca rows with 30 generated malformed ones mixed in (tests/bad_rows.py)."""
    tmp = tmp_path_factory.mktemp("score")
    path = tmp / "a.jsonl"
    _, good_ids = mixed_corpus(path, alpaca_rows(150), n_bad=30, seed=3, max_chars=10_000)
    cfg = make_config_module(tmp, [{"path": str(path)}], data__shard_rows=32, data__max_length=96,
                             data__max_chars=10_000)
    manifest = run_stage("prepare", cfg)
    assert manifest.rows == len(good_ids) and manifest.rejected == 30
    ckpts = [CheckpointRecord(name="epoch-0", path=registry.model_source(cfg, "reference"), uid="a"),
             CheckpointRecord(name="other", path=registry.model_source(cfg, "target"), uid="b")]
    tok = load_tokenizer(manifest.tokenizer)
    bos, pad = special_ids(tok)
    return cfg, manifest, ckpts, bos, pad, good_ids


@pytest.fixture(scope="module")
def make_config_module():
    from rayapp.config import RunConfig
    from tests.conftest import tiny_config_dict

    def _make(tmp, sources, **overrides):
        return RunConfig.model_validate(tiny_config_dict(tmp, sources, **overrides))

    return _make


def _run(setup, out, runtime_env=None, **score_kw):
    cfg, manifest, ckpts, bos, pad, _ = setup
    sc = ScoreConfig(modes=["prompted", "response_only"], rows_per_task=32,
                     resources={"num_cpus": 1, "min_actors": 1, "max_actors": 1}, **score_kw)
    return score_checkpoints(RunLayout(cfg.output_dir).prepared, manifest, ckpts, out, sc, bos, pad,
                             runtime_env=runtime_env)


def test_response_only_is_scored_with_the_first_checkpoint_alone():
    """Selection reads response-only scores at P0 only (IFD's ro_nll0): the later checkpoints
    score the prompted mode alone, unless prompted is not asked for at all."""
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.stages.score.engine import modes_by_checkpoint

    cks = [CheckpointRecord(name=f"epoch-{i}", path=f"/c/{i}", uid=str(i)) for i in range(4)]
    both = modes_by_checkpoint(cks, ["prompted", "response_only"])
    assert both == {"epoch-0": ["prompted", "response_only"], "epoch-1": ["prompted"], "epoch-2": ["prompted"],
                    "epoch-3": ["prompted"]}
    assert set(map(tuple, modes_by_checkpoint(cks, ["prompted"]).values())) == {("prompted",)}
    assert set(map(tuple, modes_by_checkpoint(cks, ["response_only"]).values())) == {("response_only",)}


def _load(out, name):
    return storage.read_parquet_dir(storage.join(out, name)).to_pandas().set_index("id")


@pytest.fixture(scope="module")
def clean_scores(ray_local, scored_setup, tmp_path_factory):
    """An uninterrupted run: what every faulted run must end up with."""
    out = str(tmp_path_factory.mktemp("clean") / "scores")
    return out, _run(scored_setup, out, batch_tokens=4096)


@pytest.mark.slow
def test_engine_matches_one_row_loop_and_is_batch_invariant(ray_local, scored_setup, clean_scores, tmp_path):
    cfg, manifest, ckpts, bos, pad, good_ids = scored_setup
    small = str(tmp_path / "small")
    big, s_big = clean_scores
    s_small = _run(scored_setup, small, batch_tokens=64, max_rows_per_batch=2)
    assert s_small["padding_fraction"] < s_big["padding_fraction"] or s_small["padding_fraction"] < 0.2

    prepared = storage.read_parquet_dir(RunLayout(cfg.output_dir).prepared).to_pandas()
    for k, ck in enumerate(ckpts):
        a, b = _load(small, ck.name), _load(big, ck.name)
        # exactly one score per id and checkpoint, for every prepared row
        assert sorted(a.index) == sorted(prepared["id"]) == sorted(good_ids) and a.index.is_unique
        np.testing.assert_allclose(a.loss_sum, b.loc[a.index, "loss_sum"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.response_only_loss_sum, b.loc[a.index, "response_only_loss_sum"], rtol=1e-4, atol=1e-4)

        model = load_causal_lm(ck.path).eval()
        sample = prepared.sample(12, random_state=0)
        rows = [(r.input_ids.tolist(), r.labels.tolist()) for r in sample.itertuples()]
        ref = one_row_losses(model, rows)
        np.testing.assert_allclose(a.loc[sample.id, "loss_sum"], [x[0] for x in ref], rtol=1e-4, atol=1e-4)
        assert a.loc[sample.id, "n_tokens"].tolist() == [x[1] for x in ref]
        assert a.loc[sample.id, "n_tokens"].tolist() == sample.n_response_tokens.tolist()
        if k == 0:
            ro = one_row_losses(model, [response_only_sequence(i, l, bos) for i, l in rows])
            np.testing.assert_allclose(a.loc[sample.id, "response_only_loss_sum"], [x[0] for x in ro], rtol=1e-4,
                                       atol=1e-4)
        else:  # read at the first checkpoint only (IFD's ro_nll0): not scored again
            assert a.response_only_loss_sum.isna().all()
        np.testing.assert_allclose(a.mean_nll, np.where(a.n_tokens > 0, a.loss_sum / a.n_tokens.clip(lower=1), 0.0))
    # the two checkpoints really are different models
    assert not np.allclose(_load(big, "epoch-0").loss_sum, _load(big, "other").loss_sum)


@pytest.mark.slow
def test_local_scoring_in_this_process_matches_the_actor_pool(scored_setup, clean_scores, tmp_path):
    """score.local: the same units and batches in the driver's process, with no actor: the same
    scores, bit for bit (one thread each), and the driver's torch thread count is left as it was."""
    import torch

    cfg, manifest, ckpts, bos, pad, good_ids = scored_setup
    threads = torch.get_num_threads()
    out = str(tmp_path / "local")
    stats = _run(scored_setup, out, batch_tokens=4096, local=True)
    assert torch.get_num_threads() == threads
    assert stats["rows"] == len(good_ids) * len(ckpts) and stats["first_result_s"] < stats["seconds"]
    _assert_same_scores(out, clean_scores[0], ckpts, good_ids)


def _assert_same_scores(out, clean, ckpts, good_ids):
    """One score per good row and checkpoint, bit for bit the uninterrupted actor run's."""
    for ck in ckpts:
        a, b = _load(out, ck.name), _load(clean, ck.name)
        assert a.index.is_unique and set(a.index) == good_ids
        for col in ("loss_sum", "n_tokens", "response_only_loss_sum"):
            np.testing.assert_array_equal(a[col], b.loc[a.index, col])


def _selections(out, ckpts):
    traj = trajectories_from_table(build_trajectories(out, [ck.name for ck in ckpts]))
    return {m: sorted(traj.ids[select(m, traj, 0.3)[0]]) for m in ("ppl_high", "ifd", "random")}


@pytest.mark.slow
def test_killed_actor_mid_block_is_restarted_and_the_scores_match(ray_local, scored_setup, clean_scores, tmp_path):
    """SIGKILL of the scoring actor's process halfway through a block: Ray restarts the actor and
    re-runs the block; the driver commits each (checkpoint, shard) once, so every good row gets
    exactly one score per checkpoint, the same as the uninterrupted run, and the same selections."""
    cfg, manifest, ckpts, bos, pad, good_ids = scored_setup
    out, marker = str(tmp_path / "killed"), tmp_path / "actor-killed"
    stats = _run(scored_setup, out, batch_tokens=4096, runtime_env={"env_vars": {FAULT_ENV: f"kill:3:{marker}"}})
    killed_pid = json.loads(marker.read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)  # that actor process is gone
    assert stats["skipped_units"] == 0 and stats["rows"] == len(good_ids) * len(ckpts)
    clean, _ = clean_scores
    _assert_same_scores(out, clean, ckpts, good_ids)  # the re-run unit is batched exactly as in the clean run
    assert _selections(out, ckpts) == _selections(clean, ckpts)


@pytest.mark.slow
def test_interrupted_run_resumes_without_rescoring(ray_local, scored_setup, tmp_path):
    cfg, manifest, ckpts, bos, pad, _ = scored_setup
    out = str(tmp_path / "resume")
    # The only actor raises on its 8th batch (of 10: 5 shards x 2 checkpoints): the run fails part-way.
    with pytest.raises(Exception, match="injected scoring fault"):
        _run(scored_setup, out, batch_tokens=4096, runtime_env={"env_vars": {FAULT_ENV: "raise:7"}})
    wait_for_idle_cpus(ray_local, timeout=60)
    done_first = {(ck.name, f.rsplit("/", 1)[-1]) for ck in ckpts for f in storage.list_files(storage.join(out, ck.name), ".parquet")}
    total = len(ckpts) * len(manifest.shards)
    assert 0 < len(done_first) < total
    mtimes = {k: storage.resolve(storage.join(out, *k))[0].get_file_info(storage.resolve(storage.join(out, *k))[1]).mtime for k in done_first}

    stats = _run(scored_setup, out, batch_tokens=4096)
    assert stats["skipped_units"] == len(done_first) and stats["work_units"] == total
    for k, mt in mtimes.items():  # committed files were not rewritten
        fs, p = storage.resolve(storage.join(out, *k))
        assert fs.get_file_info(p).mtime == mt
    prepared_ids = sorted(storage.read_parquet_dir(RunLayout(cfg.output_dir).prepared)["id"].to_pylist())
    for ck in ckpts:
        t = storage.read_parquet_dir(storage.join(out, ck.name))
        assert sorted(t["id"].to_pylist()) == prepared_ids  # exactly one score per (id, checkpoint)
        for f in storage.list_files(storage.join(out, ck.name), ".parquet"):
            meta = pq.read_metadata(f).metadata
            assert meta[b"rayapp.prepared_fingerprint"] == manifest.fingerprint.encode()
    # a third run has nothing to do
    assert _run(scored_setup, out, batch_tokens=4096)["skipped_units"] == total


def test_a_unit_scored_with_a_non_default_setting_is_not_current_for_the_default(tmp_path):
    """Defect: a unit's keys held token_count and the response-only prefix only where they were not
    the default, and the check asked only for the keys it wanted, so a `labelled` run reused units
    scored with `nonzero`; and the scoring dtype was not keyed at all. Each setting now rescores."""
    import pyarrow as pa

    from rayapp.core import keyed
    from rayapp.core.manifests import CheckpointRecord
    from rayapp.stages.score.engine import _keys, is_committed

    ck = CheckpointRecord(name="epoch-1", path="x", uid="u1")
    table = pa.table({"id": ["a", "b"]})
    variants = {"default": {}, "nonzero": {"token_count": "nonzero"}, "bf16": {"dtype": "bfloat16"},
                "prefix": {"response_only_prefix": "### Response:"}}
    for name, setting in variants.items():
        uri = str(tmp_path / f"{name}.parquet")
        keyed.write_table(uri, table, _keys("fp", ck, ["prompted", "response_only"], 2, **setting))
        for other, other_setting in variants.items():
            current = is_committed(uri, _keys("fp", ck, ["prompted", "response_only"], 2, **other_setting))
            assert current == (other == name), (name, other)
