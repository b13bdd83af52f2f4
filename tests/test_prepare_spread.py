"""Prepare without a gather: the spread path's bookkeeping (stages/prepare/spread.py) against the
plain computation it replaces, and the spread path against the driver's on truncation drops,
shards that straddle blocks, and de-duplication switched off."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.core.repeats import repeats
from rayapp.stages.prepare import spread
from tests.conftest import alpaca_rows, run_stage, write_jsonl


def test_repeats_are_every_later_occurrence_of_an_id_across_blocks():
    rng = random.Random(0)
    sequence = []  # one sequential read: (block, position, row, id)
    for block in range(5):
        for pos in range(rng.randint(0, 40)):
            sequence.append((block, pos, 3 * pos + 1, f"id{rng.randint(0, 60)}"))
    rng.shuffle(shuffled := list(sequence))  # a partition meets its keys in any order
    keys = pa.table({"id": [s[3] for s in shuffled],
                     "order": np.concatenate([spread.order_keys(b, np.array([p])) for b, p, _, _ in shuffled]),
                     "row": [s[2] for s in shuffled]})
    found = repeats(keys)
    first: dict[str, tuple[int, int, int]] = {}
    expected = []
    for block, pos, row, rid in sequence:  # the driver's walk: a dict of ids seen so far
        if rid in first:
            fb, fp, frow = first[rid]
            expected.append(((block << spread.ORDER_BITS) | pos, (fb << spread.ORDER_BITS) | fp, frow))
        else:
            first[rid] = (block, pos, row)
    assert list(zip(*(found[c].to_pylist() for c in ("order", "first_order", "first_row")))) == sorted(expected)
    assert repeats(keys.slice(0, 0)).num_rows == 0


def test_limits_and_line_offsets_follow_one_sequential_read():
    # source 0: three blocks of 10, 10, 10 outcomes, limit 15; source 1: two blocks, no limit
    offsets, cuts = spread.starts_and_cuts([0, 0, 0, 1, 1], [10, 10, 10, 4, 6], [12, 11, 10, 4, 6], [15, None])
    assert offsets == [0, 12, 23, 0, 4]
    assert cuts == [10, 5, 0, 4, 6]
    order = np.array([(1 << spread.ORDER_BITS) | 4, (1 << spread.ORDER_BITS) | 5, 2 << spread.ORDER_BITS, 3])
    assert spread.within_cuts(order, np.array(cuts)).tolist() == [True, False, False, True]


@pytest.mark.parametrize("rows,size", [([5, 0, 7, 20, 1], 4), ([3], 16), ([16, 16], 16), ([0, 9], 3)])
def test_shard_pieces_cut_as_slicing_one_table_does(rows, size):
    whole = [(b, i) for b, n in enumerate(rows) for i in range(n)]
    pieces = spread.shard_pieces(rows, size)
    got = [[(b, i) for b, lo, hi in shard for i in range(lo, hi)] for shard in pieces]
    assert got == [whole[lo:lo + size] for lo in range(0, len(whole), size)]


def test_the_held_out_rows_are_the_smallest_keys_of_all_blocks_merged_a_block_at_a_time():
    rng = random.Random(2)
    blocks = [[(f"{rng.random():.12f}", g, i) for i in range(rng.randint(0, 30))] for g in range(12)]
    each = [sorted(b)[:10] for b in blocks]  # what each block keeps: its own 10 smallest
    assert spread.smallest(iter(each), 10) == sorted(c for b in blocks for c in b)[:10]
    assert spread.smallest(iter([]), 10) == []


def test_partitions_grow_with_the_blocks_not_just_the_workers():
    assert spread.partitions_for(1, 4) == 1
    assert spread.partitions_for(40, 2) == 5 and spread.partitions_for(10, 2) == 4
    assert spread.partitions_for(3000, 2) == 375


def test_rows_at_positions_read_only_their_row_groups(tmp_path):
    table = pa.table({"x": list(range(100))})
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, row_group_size=7)
    positions = [0, 6, 7, 50, 51, 99]
    assert storage.read_row_groups(path, positions)["x"].to_pylist() == positions
    assert storage.read_row_groups(path, [])["x"].to_pylist() == []


def _what_was_prepared(m) -> dict:
    """The manifest less where the run is and how long it took."""
    where = {"seconds", "tokenize_seconds", "tokenizer", "config_digest", "fingerprint", "created", "holdout"}
    return {**m.model_dump(exclude=where), "holdout": (m.holdout.rows, m.holdout.ids_sha256)}


@pytest.mark.slow
def test_spread_prepare_gives_the_driver_s_rows_with_drops_and_shards_across_blocks(ray_local, tmp_path, make_config):
    """Rows too long under truncation: drop are rejected after the read rejects, in the driver's
    order; shards of 16 rows straddle ~20 blocks, with held-out rows taken out of the middle of
    blocks; de-duplication off keeps every repeat."""
    rows = alpaca_rows(500, start=300)
    rows = rows + rows[:60]  # repeats in a later block
    path = write_jsonl(tmp_path / "a.jsonl", rows)

    def prepared(name, **data):
        cfg = make_config([{"path": str(path)}], output_dir=str(tmp_path / name), data__max_length=256,
                          data__truncation="drop", data__shard_rows=16, data__holdout_rows=25,
                          **{f"data__{k}": v for k, v in data.items()})
        m = run_stage("prepare", cfg)
        layout = RunLayout(cfg.output_dir)
        return m, storage.read_parquet_dir(layout.prepared), storage.read_bytes(layout.rejects), \
            storage.read_parquet(layout.holdout)

    for dedupe in (True, False):
        m0, t0, r0, h0 = prepared(f"driver-{dedupe}", dedupe=dedupe)
        m2, t2, r2, h2 = prepared(f"ray-{dedupe}", dedupe=dedupe, workers=2, block_mb=0.01)
        assert t2.equals(t0) and h2.equals(h0) and r2 == r0
        assert _what_was_prepared(m2) == _what_was_prepared(m0)
        assert m0.reject_reasons.get("too long (truncation: drop)", 0) > 0
        assert (m0.reject_reasons.get("duplicate row", 0) == 60) == dedupe
        assert len(m0.shards) > 10
        assert not storage.exists(storage.join(RunLayout(str(tmp_path / f"ray-{dedupe}")).prepared, ".work"))


@pytest.mark.slow
def test_a_spread_prepare_that_fails_names_the_source_and_leaves_no_work_folder(ray_local, tmp_path, make_config):
    from rayapp.core.errors import InputDataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join('{"instruction": "x", "output": ""}\n' for _ in range(5)))
    cfg = make_config([{"path": str(bad)}], output_dir=str(tmp_path / "run"), data__workers=2, data__holdout_rows=0)
    with pytest.raises(InputDataError, match=f"{bad}: no usable rows \\(5 read, all rejected; first: line 1"):
        run_stage("prepare", cfg)
    assert not storage.exists(storage.join(RunLayout(cfg.output_dir).prepared, ".work"))
