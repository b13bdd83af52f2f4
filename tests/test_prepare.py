"""The prepare stage on real rows and real files: formats, ids, masking, bad input, resumability."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rayapp.core import storage
from rayapp.core.errors import InputDataError
from rayapp.core.hashing import row_id
from rayapp.core.labels import IGNORE_INDEX
from rayapp.core.layout import RunLayout
from rayapp.ml.models.loading import load_tokenizer
from tests.conftest import REPO, alpaca_rows, run_stage, tiny_config_dict, write_jsonl


def _prepared(cfg) -> pa.Table:
    return storage.read_parquet_dir(RunLayout(cfg.output_dir).prepared)


def _rejects(cfg) -> list[dict]:
    text = storage.read_bytes(RunLayout(cfg.output_dir).rejects).decode()
    return [json.loads(line) for line in text.splitlines()]


def test_alpaca_jsonl_and_json_array_give_the_same_rows(tmp_path, make_config):
    rows = alpaca_rows(60)
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(rows))
    t1 = _prepared_for(make_config, tmp_path / "r1", jl)
    t2 = _prepared_for(make_config, tmp_path / "r2", arr)
    assert t1.num_rows == t2.num_rows == 60
    assert t1["id"].to_pylist() == t2["id"].to_pylist()
    assert t1["instruction"].to_pylist() == [r["instruction"] for r in rows]


def _prepared_for(make_config, out, path, **src):
    cfg = make_config([{"path": str(path), **src}], output_dir=str(out))
    run_stage("prepare", cfg)
    return _prepared(cfg)


def test_dolly_schema_is_mapped(tmp_path, make_config):
    rows = alpaca_rows(40)
    dolly = [
        {"instruction": r["instruction"], "context": r["input"] or None, "response": r["output"], "category": "qa"}
        for r in rows
    ]
    path = write_jsonl(tmp_path / "dolly.jsonl", dolly)
    t = _prepared_for(make_config, tmp_path / "run", path)
    assert t.num_rows == 40
    assert t["input"].to_pylist() == [r["input"] for r in rows]  # null context -> ""
    assert t["output"].to_pylist() == [r["output"] for r in rows]
    # same content as the Alpaca-schema rows -> the same ids
    assert t["id"].to_pylist() == [row_id(r["instruction"], r["input"], r["output"]) for r in rows]
    assert set(t["source"].to_pylist()) == {"dolly"}


def test_parquet_and_hf_dataset_dir(tmp_path, make_config):
    import datasets

    rows = alpaca_rows(30)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    t_pq = _prepared_for(make_config, tmp_path / "r1", tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfds"))
    t_hf = _prepared_for(make_config, tmp_path / "r2", tmp_path / "hfds", format="hf")
    # a folder of data files, loaded by datasets.load_dataset (what a hub name resolves to)
    (tmp_path / "hfdir").mkdir()
    write_jsonl(tmp_path / "hfdir" / "train.jsonl", rows)
    t_dir = _prepared_for(make_config, tmp_path / "r3", tmp_path / "hfdir", format="hf")
    assert t_pq["id"].to_pylist() == t_hf["id"].to_pylist() == t_dir["id"].to_pylist()
    assert t_pq.num_rows == 30


def test_ids_are_stable_content_hashes():
    # A fixed value: the same row gets this id on every run and machine.
    assert row_id("Give three tips for staying healthy.", "", "Eat well.") == row_id(
        "Give three tips for staying healthy.", "", "Eat well."
    )
    assert row_id("ab", "c", "d") != row_id("a", "bc", "d")
    import hashlib

    expected = hashlib.sha256(b'["Give three tips for staying healthy.","","Eat well."]').hexdigest()[:20]
    assert row_id("Give three tips for staying healthy.", "", "Eat well.") == expected == "1800dde349e56292e758"


def test_label_masking_matches_prompt_boundary(tmp_path, make_config):
    rows = alpaca_rows(40)
    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", rows))}], data__max_length=2048)
    manifest = run_stage("prepare", cfg)
    t = _prepared(cfg)
    tok = load_tokenizer(manifest.tokenizer)
    for rec in t.to_pylist():
        ids, labels = rec["input_ids"], rec["labels"]
        assert len(ids) == len(labels) == rec["n_tokens"]
        first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        assert all(x == IGNORE_INDEX for x in labels[:first])  # prompt: all masked
        assert labels[first:] == ids[first:]  # response: every token labelled
        assert tok.decode(ids[:first], skip_special_tokens=True) == rec["prompt"]
        assert tok.decode(ids[first:]) == rec["output"] + tok.eos_token  # EOS appended, as the paper's code
        assert rec["n_response_tokens"] == len(ids) - first


def test_truncate_and_drop_policies_are_counted(tmp_path, make_config):
    rows = alpaca_rows(80)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    cfg_t = make_config([{"path": str(path)}], output_dir=str(tmp_path / "t"), data__max_length=200)
    m_t = run_stage("prepare", cfg_t)
    t = _prepared(cfg_t)
    assert 0 < m_t.truncated < 80 and max(t["n_tokens"].to_pylist()) <= 200
    assert m_t.truncated == sum(t["truncated"].to_pylist())
    assert m_t.no_response_tokens == sum(1 for n in t["n_response_tokens"].to_pylist() if n == 0)
    cfg_d = make_config([{"path": str(path)}], output_dir=str(tmp_path / "d"), data__max_length=200,
                        data__truncation="drop")
    m_d = run_stage("prepare", cfg_d)
    assert m_d.rows == 80 - m_t.truncated
    too_long = [r for r in _rejects(cfg_d) if r["reason"].startswith("too long")]
    assert len(too_long) == m_t.truncated
    assert all(r["file"] == str(path) and r["row_kind"] == "line" for r in too_long)


BAD_LINES = [
    (b'{"instruction": "x", "output": "y"', "malformed JSON", None),
    (b'{"instruction": "caf\xe9", "input": "", "output": "ok"}', "invalid UTF-8", None),
    (b'["a list", "not an object"]', "expected a JSON object", None),
    (b'{"input": "", "output": "no instruction"}', "field 'instruction' is missing", "instruction"),
    (b'{"instruction": null, "output": "null instruction"}', "field 'instruction' is null", "instruction"),
    (b'{"instruction": "wrong type", "output": 42}', "field 'output' must be a string, got int", "output"),
    (b'{"instruction": "empty", "input": "", "output": "   "}', "empty response", "output"),
    (b'{"instruction": "list input", "input": ["a"], "output": "z"}', "field 'input' must be a string", "input"),
    (b'{"instruction": "huge", "input": "", "output": "' + b"x" * 300_001 + b'"}', "row too large", None),
]


def test_every_bad_row_is_rejected_with_file_line_field(tmp_path, make_config):
    good = alpaca_rows(50)
    raw = [line for line, _, _ in BAD_LINES] + [json.dumps(good[0]).encode()]  # plus one duplicate
    path = write_jsonl(tmp_path / "mixed.jsonl", good, raw)
    cfg = make_config([{"path": str(path)}])
    manifest = run_stage("prepare", cfg)
    rejects = _rejects(cfg)
    assert manifest.rows == 50 and manifest.rejected == len(BAD_LINES) + 1
    assert manifest.rows_read == manifest.rows + manifest.rejected
    by_line = {r["row"]: r for r in rejects}
    for offset, (_, reason, field) in enumerate(BAD_LINES):
        rec = by_line[51 + offset]  # 1-based line numbers after the 50 good lines
        assert rec["file"] == str(path)
        assert reason in rec["reason"], rec
        assert rec["field"] == field
    dup = by_line[51 + len(BAD_LINES)]
    assert "duplicate row (first seen at" in dup["reason"] and ":line 1)" in dup["reason"]


def test_dedupe_across_sources(tmp_path, make_config):
    rows = alpaca_rows(20)
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows[10:] + alpaca_rows(5, start=300))
    cfg = make_config([{"path": str(a)}, {"path": str(b)}])
    m = run_stage("prepare", cfg)
    assert m.rows == 25 and m.rejected == 10
    assert len(set(_prepared(cfg)["id"].to_pylist())) == 25


def test_unreadable_sources_fail_with_one_clear_line(tmp_path):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary\n\xff\xfe\n")
    for path, expect in [
        (garbage, "no usable rows"),
        (tmp_path / "missing.jsonl", "file not found"),
        (tmp_path / "broken.json", "malformed JSON array"),
        (tmp_path / "broken.parquet", "not a readable Parquet file"),
    ]:
        if path.name == "broken.json":
            path.write_text('[{"instruction": "a", "output": "b"},')
        if path.name == "broken.parquet":
            path.write_bytes(b"PAR1 not really")
        cfg = tmp_path / f"{path.stem}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, [{"path": str(path)}])))
        proc = subprocess.run([sys.executable, "-m", "rayapp", "prepare", "--config", str(cfg)],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 1, proc.stderr
        err_lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(err_lines) == 1 and expect in err_lines[0] and str(path) in err_lines[0], proc.stderr


def test_prepare_is_skipped_when_up_to_date_and_redone_when_input_changes(tmp_path, make_config):
    from rayapp import pipeline

    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    cfg = make_config([{"path": str(path)}])
    first = run_stage("prepare", cfg)
    again = pipeline.run("prepare", cfg)
    assert again.skipped and again.manifest.fingerprint == first.fingerprint
    write_jsonl(path, alpaca_rows(31))
    third = run_stage("prepare", cfg)
    assert third.rows == 31 and third.fingerprint != first.fingerprint
    # shards are named deterministically and nothing stale is left behind
    assert [s.file for s in third.shards] == ["shard-00000.parquet"]


def test_manifest_records_hashes_and_counts(tmp_path, make_config):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(100))
    cfg = make_config([{"path": str(path)}])
    m = run_stage("prepare", cfg)
    assert m.sources[0].identity.startswith("sha256:") and len(m.shards) == 2  # 64 rows per shard
    assert sum(s.rows for s in m.shards) == m.rows == 100
    assert m.tokenizer.endswith("models/tokenizer") and m.vocab_size > 0


def test_generated_bad_corpus_in_real_alpaca_is_fully_accounted_for(tmp_path, make_config):
    """2,000 real Alpaca rows with 400 generated malformed ones (broken JSON, wrong types, huge rows,
    empty responses, duplicates, invalid UTF-8, ...) at random places: every bad row is in the
    rejects file with its line, field and reason, and every good row is prepared."""
    from tests.bad_rows import mixed_corpus

    path = tmp_path / "alpaca-mixed.jsonl"
    expected, good_ids = mixed_corpus(path, alpaca_rows(2000, start=5000), n_bad=400, seed=7, max_chars=20_000)
    assert len({e.kind for e in expected.values()}) == 10
    cfg = make_config([{"path": str(path)}], data__max_chars=20_000, data__shard_rows=512)
    manifest = run_stage("prepare", cfg)
    rejects = {r["row"]: r for r in _rejects(cfg)}
    assert set(rejects) == set(expected)  # exactly the bad lines, none of the good ones
    for line, exp in expected.items():
        rec = rejects[line]
        assert exp.reason in rec["reason"] and rec["field"] == exp.field and rec["file"] == str(path), (exp, rec)
    assert set(_prepared(cfg)["id"].to_pylist()) == good_ids
    assert manifest.rows == len(good_ids) and manifest.rejected == len(expected)
    assert manifest.rows_read == manifest.rows + manifest.rejected


def test_held_out_rows_are_kept_out_of_the_shards_and_chosen_the_same_way_every_run(tmp_path, make_config):
    """Defect: finetune reported its eval loss on the last prepared shard, i.e. on training data.
    prepare now holds out rows (a seeded hash of their ids) that no later stage trains on or selects."""
    rows = alpaca_rows(120)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = make_config([{"path": str(path)}], data__holdout_rows=20, output_dir=str(tmp_path / "r1"))
    m = run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)
    held = storage.read_parquet(m.holdout.path)
    train_ids = set(_prepared(cfg)["id"].to_pylist())
    assert m.holdout.rows == held.num_rows == 20 and m.rows == 100 == len(train_ids)
    assert not train_ids & set(held["id"].to_pylist())  # disjoint
    assert m.rows_read == m.rows + m.holdout.rows + m.rejected  # every row accounted for
    assert all(n > 0 for n in held["n_response_tokens"].to_pylist())  # each one can be scored
    assert m.holdout.path == layout.holdout and not layout.holdout.startswith(layout.prepared_file("shard"))
    # the same rows whatever the input order
    again = make_config([{"path": str(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))}], data__holdout_rows=20,
                        output_dir=str(tmp_path / "r2"))
    m2 = run_stage("prepare", again)
    assert set(storage.read_parquet(m2.holdout.path)["id"].to_pylist()) == set(held["id"].to_pylist())
    with pytest.raises(InputDataError, match="holdout_rows=60 would hold out at least half"):
        run_stage("prepare", make_config([{"path": str(path)}], data__holdout_rows=60, output_dir=str(tmp_path / "r3")))


@pytest.mark.slow
def test_prepare_on_ray_data_gives_the_same_rows_and_rejects(ray_local, tmp_path, make_config):
    """data.workers: blocks of the sources read, normalised and tokenized as Ray Data tasks. Lines
    are numbered across blocks, limits hold across blocks, duplicates are found across blocks and
    files (the first occurrence kept), and the result is the driver's, row for row and reject for
    reject."""
    from tests.bad_rows import mixed_corpus

    mixed = tmp_path / "alpaca-mixed.jsonl"
    mixed_corpus(mixed, alpaca_rows(1200, start=5000), n_bad=240, seed=3, max_chars=20_000)
    # a Parquet source in row groups of 50, half of it repeating rows of the JSONL file
    good = {r["instruction"]: r for r in alpaca_rows(1200, start=5000)}

    def good_row(line):
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) and good.get(obj.get("instruction")) == obj else None

    again = [r for r in map(good_row, mixed.read_bytes().splitlines()[:400]) if r]
    parquet_rows = again[:150] + alpaca_rows(150, start=9000)
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "more.parquet", row_group_size=50)
    limited = write_jsonl(tmp_path / "limited.jsonl", alpaca_rows(600, start=12000))
    sources = [{"path": str(mixed)}, {"path": str(tmp_path / "more.parquet")}, {"path": str(limited), "limit": 333}]

    def prepared(name, **data):
        cfg = make_config(sources, output_dir=str(tmp_path / name), data__max_chars=20_000, data__shard_rows=256,
                          data__holdout_rows=20, **{f"data__{k}": v for k, v in data.items()})
        return cfg, run_stage("prepare", cfg)

    cfg0, m0 = prepared("driver")
    cfg2, m2 = prepared("ray", workers=2, block_mb=0.02)  # ~40 blocks of the mixed file
    assert _prepared(cfg2).equals(_prepared(cfg0))
    assert _rejects(cfg2) == _rejects(cfg0)
    keys = ("rows_read", "rows", "rejected", "reject_reasons", "truncated", "tokens", "response_tokens", "ids_sha256")
    assert {k: getattr(m2, k) for k in keys} == {k: getattr(m0, k) for k in keys}
    assert (m2.holdout.rows, m2.holdout.ids_sha256) == (m0.holdout.rows, m0.holdout.ids_sha256)
    assert m2.sources == m0.sources
    assert m0.reject_reasons["duplicate row"] >= 150 and m0.sources[2].rows_read == 333
    # how the work is spread is not part of what was prepared
    from rayapp.stages.prepare.stage import PrepareStage

    spread = cfg0.model_copy(deep=True)
    spread.data.workers, spread.data.block_mb = 2, 0.02
    layout = RunLayout(cfg0.output_dir)
    assert PrepareStage().fingerprint(spread, layout) == PrepareStage().fingerprint(cfg0, layout)


@pytest.mark.slow
def test_conversations_on_ray_data_give_the_driver_s_rows(ray_local, tmp_path, make_config):
    """data.workers: conversations read and tokenized by Ray Data tasks and actors, keep_last_turns
    included, give the driver's prepared rows and manifest. (Here, not in test_conversations.py:
    Ray prints a warning test_datapools.py looks for once per driver process, at the first actor
    pool with constructor arguments, and test files run in name order.)"""
    from tests.test_conversations import sample

    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in sample()[:60]])
    made = {}
    for name, workers in (("driver", 0), ("ray", 2)):
        cfg = make_config([{"path": str(path)}], output_dir=str(tmp_path / name), data__max_length=256,
                          data__truncation="keep_last_turns", data__workers=workers, data__block_mb=0.05)
        made[name] = (cfg, run_stage("prepare", cfg))
    (c0, m0), (c2, m2) = made["driver"], made["ray"]
    assert _prepared(c2).equals(_prepared(c0))
    keys = ("rows", "conversations", "turns_dropped", "truncated", "tokens", "response_tokens", "ids_sha256")
    assert {k: getattr(m2, k) for k in keys} == {k: getattr(m0, k) for k in keys}
    assert m0.turns_dropped > 0
