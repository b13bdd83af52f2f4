"""Training on an object store: sharded checkpoints and exports under s3://, a resume from the
bucket after a worker fault, and models loaded back from s3:// (S3 API served locally, see
tests/s3_server.py)."""

from __future__ import annotations

import os

import pytest

from rayapp.config import FinetuneConfig
from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.core.stage import claim_work_dir
from rayapp.ml.models import registry
from rayapp.ml.models.loading import load_causal_lm, materialize
from rayapp.ml.train import checkpoints as ck
from rayapp.ml.train.layout import TRAINING_STATE
from rayapp.ml.train.runner import TrainJob, run_training
from rayapp.testing.faults import TRAIN_KILL_ENV as KILL_AT_STEP_ENV
from tests.conftest import alpaca_rows, run_stage, write_jsonl
from tests.s3_server import create_bucket, start_s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    proc, env = start_s3_server()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ["RAYAPP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    create_bucket(env, "rayapp-test")
    yield env
    proc.terminate()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.environ.pop("RAYAPP_CACHE_DIR", None)


def test_storage_round_trip(s3, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(src), "s3://rayapp-test/rt/dir")
    assert storage.list_dirs("s3://rayapp-test/rt/dir") == ["sub"]
    out = storage.download_dir("s3://rayapp-test/rt/dir", str(tmp_path / "dst"))
    assert open(os.path.join(out, "sub", "b.txt")).read() == "b"
    storage.remove_dir("s3://rayapp-test/rt/dir")
    assert not storage.exists("s3://rayapp-test/rt/dir/a.txt")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_keyed_files_are_reused_only_with_the_keys_they_were_written_with(s3, tmp_path, where):
    import pyarrow as pa

    from rayapp.core import keyed

    root = str(tmp_path) if where == "local" else f"s3://rayapp-test/keyed-{tmp_path.name}"
    table, keys = pa.table({"id": ["a", "b"], "x": [1, 2]}), {"rayapp.key": "k1", "rayapp.rows": "2"}
    uri = storage.join(root, "t.parquet")
    assert keyed.read_table(uri, keys) is None  # nothing there yet
    keyed.write_table(uri, table, keys)
    assert keyed.is_current(uri, keys, rows=2) and keyed.read_table(uri, keys, ["id"])["id"].to_pylist() == ["a", "b"]
    assert not keyed.is_current(uri, {**keys, "rayapp.key": "k2"})  # another input made it
    assert not keyed.is_current(uri, {**keys, "rayapp.extra": "1"})  # a key it was not written with
    assert not keyed.is_current(uri, keys, rows=3)
    data = storage.read_bytes(uri)
    storage.write_bytes_atomic(uri, data[: len(data) // 2])  # torn: no footer, so never taken as done
    assert not keyed.is_current(uri, keys) and keyed.read_table(uri, keys) is None

    records, jkeys = [{"id": "a", "v": "é"}, {"id": "b", "v": 2}], {"fingerprint": "f1"}
    juri = storage.join(root, "r.jsonl")
    keyed.write_records(juri, records, jkeys, judge="test")
    assert keyed.read_records(juri, jkeys) == records
    assert storage.read_json(juri + keyed.META_SUFFIX) == {"fingerprint": "f1", "rows": 2, "judge": "test"}
    assert keyed.read_records(juri, {"fingerprint": "f2"}) is None
    storage.write_text(juri, storage.read_bytes(juri).decode().splitlines()[0] + "\n")  # a line lost
    assert keyed.read_records(juri, jkeys) is None


@pytest.mark.extended  # ~1.5 min: `make test-extended`, not CI
def test_fsdp_training_checkpoints_to_s3_and_resumes(s3, ray_local, tmp_path, make_config):
    cfg = make_config([{"path": str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(64)))}], data__shard_rows=32)
    manifest = run_stage("prepare", cfg)
    layout = RunLayout(cfg.output_dir)
    files = [storage.join(layout.prepared, s.file) for s in manifest.shards]
    init = registry.model_source(cfg, "target")
    tc = FinetuneConfig(epochs=1, learning_rate=3e-3, warmup_ratio=0.0, per_device_batch_size=8, num_workers=2,
                        fsdp=True, checkpoint_every_steps=1, max_failures=1, log_every_steps=1, eval_rows=16)
    work = "s3://rayapp-test/run/finetune/selected"
    claim_work_dir(work, "fp-1", False, TRAINING_STATE, TRAINING_STATE)
    # the local cluster's workers get the bucket's settings the way cluster nodes do: from the env
    job = TrainJob(label="finetune", init_model=init, tokenizer=manifest.tokenizer, train_files=files,
                   total_rows=manifest.rows, work_dir=work, eval_file=files[0])
    [metrics] = run_training("finetune", tc, [job], runtime_env={"env_vars": {**s3, KILL_AT_STEP_ENV: "3"}})
    stats = [storage.read_json(f"{work}/stats/rank-{r}.json") for r in (0, 1)]
    assert all(s["resumed_from_step"] == 2 and s["global_step"] == s["total_steps"] == 4 for s in stats)
    assert all(s["background_saves"] == 0 for s in stats)  # an object store: staged and uploaded at once
    steps = storage.list_dirs(f"{work}/checkpoints")
    # older ones pruned in the bucket; none after the last step, whose final export follows at once
    assert steps == ["step-000002", "step-000003"]
    names = {os.path.basename(f) for f in storage.list_files(f"{work}/checkpoints/step-000003")}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", ck.PROGRESS} <= names  # both ranks' shards
    export = f"{work}/exports/final"
    assert ck.export_complete(export)
    local = materialize(export)
    assert local != export and os.path.exists(os.path.join(local, "model.safetensors"))
    assert load_causal_lm(export).config.num_hidden_layers == 2
    assert metrics["eval_loss"] > 0
    # a re-claim with other inputs clears the bucket's old state, so it is never resumed from
    claim_work_dir(work, "fp-2", False, TRAINING_STATE, TRAINING_STATE)
    assert storage.list_dirs(f"{work}/checkpoints") == [] and not ck.export_complete(export)


def _fake_export(uri: str, tmp, weights: bytes) -> str:
    """A folder shaped like an export: files, then the marker (with a fresh uid) last."""
    from rayapp.core.artifacts import mark_export

    src = tmp / f"src-{os.urandom(4).hex()}"
    src.mkdir()
    for i in range(8):
        (src / f"part-{i}.bin").write_bytes(weights * 2000)
    storage.upload_dir(str(src), uri)
    mark_export(uri, {"test": True})
    return uri


def test_score_sees_a_retrained_reference_on_s3(s3, tmp_path):
    """Defect: the score stage took an s3:// checkpoint's uid to be its path (it looked for the
    marker with os.path.exists), so scores were silently reused after the reference re-trained."""
    from rayapp.core.hashing import fingerprint
    from rayapp.core.layout import RunLayout
    from rayapp.core.manifests import (
        CheckpointRecord,
        HoldoutRecord,
        PreparedManifest,
        ReferenceManifest,
        reference_checkpoints,
        write_manifest,
    )

    layout = RunLayout("s3://rayapp-test/uid-run")
    prepared = PreparedManifest(fingerprint=fingerprint(x=1), tokenizer="t", vocab_size=1, eos_token=None, template={},
                                max_length=8, truncation="truncate", sources=[], rows_read=0, rows=0, rejected=0,
                                reject_reasons={}, truncated=0, no_response_tokens=0, tokens=0, response_tokens=0,
                                shards=[], holdout=None, ids_sha256="", tokenize_seconds=0)
    assert HoldoutRecord  # the manifest types load from one module
    export = _fake_export(f"{layout.reference}/exports/epoch-1", tmp_path, b"a")
    write_manifest(layout.manifest("reference"), ReferenceManifest(
        prepared_fingerprint=prepared.fingerprint, init_model="base", epochs=1, metrics={},
        checkpoints=[CheckpointRecord(name="epoch-0", path="base", uid="base"),
                     CheckpointRecord(name="epoch-1", path=export, uid="old")]))
    first = reference_checkpoints(layout, prepared)[1].uid
    assert first != export and first == storage.read_json(f"{export}/rayapp_checkpoint.json")["uid"]
    _fake_export(export, tmp_path, b"b")  # trained again: a new marker
    assert reference_checkpoints(layout, prepared)[1].uid not in (first, export)


def test_nodes_cache_of_a_remote_model_is_safe_under_concurrent_loads(s3, tmp_path):
    """Defect: several actors on a node materializing the same s3:// export raced in the node's
    cache (one deleted the folder another was reading or renaming into place)."""
    from concurrent.futures import ThreadPoolExecutor

    uri = _fake_export("s3://rayapp-test/race/export", tmp_path, b"x")
    for round_ in range(3):
        if round_:
            _fake_export(uri, tmp_path, bytes([round_]))  # a new export: every cached copy is stale

        def load(_):
            local = materialize(uri)
            return sorted(os.listdir(local)), open(os.path.join(local, "part-7.bin"), "rb").read(1)

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(load, range(12)))
        want = bytes([round_]) if round_ else b"x"
        assert all(names == got[0][0] and first == want for names, first in got)
        assert "rayapp_checkpoint.json" in got[0][0]


def test_a_changed_object_in_the_bucket_makes_prepared_data_stale(s3, tmp_path, make_config):
    """Defect: remote sources got digest None in prepare's fingerprint, so a changed object never
    invalidated the prepared data."""
    from rayapp import pipeline

    uri = "s3://rayapp-test/data/alpaca.jsonl"
    local = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    storage.write_bytes_atomic(uri, local.read_bytes())
    cfg = make_config([{"path": uri}])
    first = pipeline.run("prepare", cfg)
    assert first.manifest.rows == 20 and first.manifest.sources[0].identity.startswith("object:")
    assert pipeline.run("prepare", cfg).skipped
    storage.write_bytes_atomic(uri, write_jsonl(tmp_path / "b.jsonl", alpaca_rows(21)).read_bytes())
    again = pipeline.run("prepare", cfg)
    assert not again.skipped and again.manifest.rows == 21


def test_resume_downloads_a_step_once_per_node_and_removes_it(s3, tmp_path, monkeypatch):
    """Defect: every rank downloaded the whole step folder for itself (8 copies of weights and
    Adam state per node at 13B) and never removed it. A node's ranks now share one download."""
    from concurrent.futures import ThreadPoolExecutor

    src = tmp_path / "step"
    src.mkdir()
    (src / "__0_0.distcp").write_bytes(os.urandom(1 << 16))
    (src / ".metadata").write_bytes(b"m")
    uri = "s3://rayapp-test/resume/checkpoints/step-000004"
    storage.upload_dir(str(src), uri)
    calls = []
    real_download = storage.download_dir

    def counted(remote, local):  # the real download, counted
        calls.append(remote)
        return real_download(remote, local)

    monkeypatch.setattr(storage, "download_dir", counted)
    staging = str(tmp_path / "staging")
    with ThreadPoolExecutor(8) as pool:  # 8 ranks of one node
        paths = list(pool.map(lambda _: ck.fetch_step(uri, staging), range(8)))
    assert len(set(paths)) == 1 and calls == [uri]
    assert sorted(os.listdir(paths[0])) == [".metadata", "__0_0.distcp"]
    ck.drop_fetched(paths[0], uri)
    assert not os.path.exists(paths[0]) and os.listdir(os.path.dirname(paths[0])) == []


def test_vllm_inputs_read_an_s3_export_without_its_weights(s3, tmp_path, monkeypatch):
    """Defect: vLLM evaluation on an s3:// output_dir failed (AutoConfig was given the s3:// path),
    and the driver would have downloaded the whole export to tokenize prompts."""
    # a cache of its own: the module's other tests (the extended FSDP one) fetch whole exports
    monkeypatch.setenv("RAYAPP_CACHE_DIR", str(tmp_path / "cache"))
    from rayapp.config import GenerationConfig, TinyModelConfig
    from rayapp.core.artifacts import mark_export
    from rayapp.ml.models import tiny
    from rayapp.stages.evaluate.generate import vllm_inputs

    rows = alpaca_rows(40)
    tiny.train_tokenizer((r["instruction"] + " " + r["output"] for r in rows), 400, str(tmp_path / "tok"))
    tiny.build_model(str(tmp_path / "tok"), TinyModelConfig(vocab_size=400), str(tmp_path / "model"), max_positions=96)
    uri = "s3://rayapp-test/vllm/finetune/exports/final"
    storage.upload_dir(str(tmp_path / "model"), uri)
    mark_export(uri, {"test": True})
    prompts = [{"set": "s", "id": str(i), "prompt": r["instruction"] * 20} for i, r in enumerate(rows[:5])]
    fitted, kwargs = vllm_inputs(prompts, uri, GenerationConfig(backend="vllm", max_new_tokens=32), None)
    assert kwargs["max_model_len"] == 96  # read from the export's config.json
    from rayapp.ml.models.loading import load_tokenizer

    tok = load_tokenizer(uri)
    assert all(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= 96 - 32 - 1 for r in fitted)
    cache = os.environ["RAYAPP_CACHE_DIR"]
    fetched = [f for _, _, files in os.walk(cache) for f in files]
    assert "config.json" in fetched and "tokenizer.json" in fetched
    assert not [f for f in fetched if f.endswith(".safetensors")]  # the weights stayed in the bucket
