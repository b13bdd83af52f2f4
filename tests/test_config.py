import re
from pathlib import Path

import pytest
import yaml

from rayapp.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate(preset):
    cfg = load_config(preset)
    assert cfg.data.sources and cfg.models.reference.name_or_path


def test_presets_present():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {"tiny.yaml", "paper-opt350m-to-13b.yaml", "paper-llama2-7b-to-13b.yaml"} <= names


def _write(tmp_path, tree) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def _base():
    return yaml.safe_load((REPO / "configs/tiny.yaml").read_text())


def test_unknown_key_is_named(tmp_path):
    tree = _base()
    tree["score"]["batch_tokenz"] = 5
    with pytest.raises(ConfigError, match=r"score\.batch_tokenz: unknown key"):
        load_config(_write(tmp_path, tree))


def test_wrong_type_is_named(tmp_path):
    tree = _base()
    tree["reference"]["epochs"] = "three"
    with pytest.raises(ConfigError, match=r"reference\.epochs: .*integer.*'three'"):
        load_config(_write(tmp_path, tree))


def test_missing_required_key_is_named(tmp_path):
    tree = _base()
    del tree["models"]["target"]
    with pytest.raises(ConfigError, match=r"models\.target: required key is missing"):
        load_config(_write(tmp_path, tree))


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs/tiny.yaml", ["score.batch_tokens=4096", "select.budget=0.1",
                                                   "score.modes=[prompted]", "output_dir=/tmp/x"])
    assert cfg.score.batch_tokens == 4096 and isinstance(cfg.score.batch_tokens, int)
    assert cfg.select.budget == 0.1
    assert cfg.score.modes == ["prompted"]
    assert cfg.output_dir == "/tmp/x"


def test_override_unknown_key_and_bad_value():
    with pytest.raises(ConfigError, match=r"score\.nope: unknown key"):
        load_config(REPO / "configs/tiny.yaml", ["score.nope=1"])
    with pytest.raises(ConfigError, match=r"select\.budget"):
        load_config(REPO / "configs/tiny.yaml", ["select.budget=2"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(REPO / "configs/tiny.yaml", ["select.budget"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_digest_changes_with_content():
    a = load_config(REPO / "configs/tiny.yaml")
    b = load_config(REPO / "configs/tiny.yaml", ["seed=7"])
    assert a.digest() == load_config(REPO / "configs/tiny.yaml").digest()
    assert a.digest() != b.digest()


@pytest.mark.parametrize("key,uri,what", [
    ("output_dir", "s3://AKIAEXAMPLE:c4nary-secret@bucket/runs/x", "a user name or password"),
    ("output_dir", "s3://bucket/runs/x?region=us-east-1&secret_key=c4nary-secret", "'secret_key'"),
    ("data.sources.0.path", "https://user:c4nary-secret@example.com/alpaca.jsonl", "a user name or password"),
    ("evaluate.judge.base_url", "https://judge.example.com/v1?api_key=c4nary-secret", "'api_key'"),
])
def test_credentials_in_uris_are_refused(tmp_path, key, uri, what):
    """Configs end up in manifests, provenance and logs: a secret inside a URI is refused, naming the key."""
    tree = _base()
    if key == "data.sources.0.path":
        tree["data"]["sources"][0]["path"] = uri
    elif key == "evaluate.judge.base_url":
        tree["evaluate"]["judge"] = {"kind": "endpoint", "base_url": uri, "model": "m"}
    else:
        tree[key] = uri
    with pytest.raises(ConfigError, match=f"{key}: .*{what}.*from the environment") as err:
        load_config(_write(tmp_path, tree))
    assert "c4nary-secret" not in str(err.value)  # the message itself does not repeat it
    tree["output_dir"] = "s3://bucket/runs/x?region=us-east-1"  # plain settings are fine
    tree["data"]["sources"][0]["path"] = "s3://bucket/data/alpaca.jsonl"
    tree["evaluate"]["judge"] = {"kind": "reference"}
    assert load_config(_write(tmp_path, tree)).output_dir.startswith("s3://")


def test_selections_and_training_subsets_are_checked_and_named():
    cfg = load_config(REPO / "configs/tiny.yaml", ["select.baselines=[clust_rand, 'ppl_high:global', ifd_cherry]",
                                                   "finetune.subset=clust_rand-low-5pct"])
    assert cfg.select.baselines[1] == "ppl_high:global" and cfg.finetune.subset == "clust_rand-low-5pct"
    for bad, msg in (("select.baselines=[hardest]", "unknown selection method 'hardest'"),
                     ("select.baselines=['random:stratified']", "random is always global"),
                     ("select.baselines=['ppl_high:sideways']", "the scope after ':' is 'global' or 'stratified'"),
                     ("finetune.subset=my-model", "'my-model' names no training data")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(REPO / "configs/tiny.yaml", [bad])
