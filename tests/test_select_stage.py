"""`rayapp select` and `rayapp compare` on the paper's published per-sample perplexities."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayapp.config import ConfigError, load_config
from rayapp.stages.select.stage import SelectError
from tests.conftest import REPO, SHARED, run_stage


def run_select(cfg):
    return run_stage("select", cfg)

# the full published files where ../shared is there, else a committed sample of them: these tests
# always run (a skip would be a test that cannot fail)
FULL = (SHARED / "paper-perplexities").exists()
PAPER = SHARED / "paper-perplexities" if FULL else REPO / "tests" / "data" / "paper-perplexities-sample"


def _empty_rows(path, model="opt-350m") -> int:
    t = pq.read_table(path).to_pandas()
    return int((t[[f"{model}_P{i}" for i in range(4)]] == 1.0).all(axis=1).sum())


def _cfg(tmp_path, path, model, *extra):
    return load_config(REPO / "configs/tiny.yaml", [
        f"output_dir={tmp_path}", f"select.trajectories={path}", f"select.trajectory_prefix={model}_",
        "select.stratified=false", *extra])


def test_select_on_published_alpaca_perplexities(tmp_path):
    out = run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-350m", "select.budget=0.05"))
    main = out.selections["lp"]
    t = pq.read_table(main.path).to_pandas()
    n_rows = pq.read_metadata(PAPER / "alpaca.parquet").num_rows
    eligible = n_rows - _empty_rows(PAPER / "alpaca.parquet")  # rows with no response tokens: P = 1 throughout
    if FULL:
        assert (n_rows, eligible) == (52002, 52001)
    assert len(t) == main.rows == len(np.array_split(np.arange(eligible), 20)[0])
    # the hardest 5 %: every kept LP(1) is at or below every LP(1) left out
    full = pq.read_table(PAPER / "alpaca.parquet").to_pandas()
    P = full[[f"opt-350m_P{i}" for i in range(4)]].to_numpy()
    lp = (P[:, 0] - P[:, 1]) / (P[:, 0] - P[:, 3])
    kept = full["index"].astype(str).isin(set(t.id)).to_numpy()
    assert kept.sum() == len(t)
    valid = ~np.all(P == 1.0, axis=1)
    assert lp[kept].max() <= lp[valid & ~kept].min()
    prov = json.loads((tmp_path / "select" / main.tag / "selection.json").read_text())
    assert prov["prefix"] == "opt-350m_" and prov["excluded_no_response"] == n_rows - eligible
    assert prov["stratified"] is False
    assert set(out.selections) == {"lp", "random", "ppl_high"}  # text-needing baselines skipped, said so


def test_dolly_rows_without_response_tokens_are_excluded_and_counted(tmp_path):
    fixed = run_select(_cfg(tmp_path / "a", PAPER / "dolly.parquet", "opt-350m", "select.budget=0.05"))
    prov = json.loads((tmp_path / "a" / "select" / fixed.selections["lp"].tag / "selection.json").read_text())
    empty = _empty_rows(PAPER / "dolly.parquet")
    assert empty == (544 if FULL else 60) and prov["no_response_rows"] == prov["excluded_no_response"] == empty
    original = run_select(_cfg(tmp_path / "b", PAPER / "dolly.parquet", "opt-350m", "select.budget=0.05",
                               "select.keep_empty_responses=true"))
    kept = pq.read_table(original.selections["lp"].path)["P0"].to_numpy()
    assert (kept == 1.0).sum() == empty  # the original code's pitfall: all of them rank as the hardest


def test_stratified_needs_text_and_unknown_model_is_named(tmp_path):
    with pytest.raises(SelectError, match="stratified selection clusters the rows' text"):
        run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-350m", "select.stratified=true"))
    with pytest.raises(SelectError, match="no columns opt-99b_P0"):
        run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-99b"))
    with pytest.raises(ConfigError, match="select.method"):
        load_config(REPO / "configs/tiny.yaml", ["select.method=hardest"])


@pytest.mark.slow
def test_compare_cli_prints_the_cross_model_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rayapp", "compare", "--trajectories", str(PAPER / "alpaca.parquet"),
                           "--reference", "opt-13b", "--models", "opt-350m,opt-6.7b", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {l.split("|")[1].strip(): l for l in proc.stdout.splitlines() if l.startswith("| opt-")}
    rho_small = float(rows["opt-350m"].split("|")[2])
    rho_big = float(rows["opt-6.7b"].split("|")[2])
    assert 0.5 < rho_small < rho_big < 1.0  # hardness transfers, and more so between closer sizes
    assert (tmp_path / "compare.png").stat().st_size > 5000
