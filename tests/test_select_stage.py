"""`rayapp select` and `rayapp compare` on the paper's published per-sample perplexities."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from rayapp.config import ConfigError, load_config
from rayapp.select.stage import SelectError, run_select
from tests.conftest import REPO, SHARED

PAPER = SHARED / "paper-perplexities"
pytestmark = pytest.mark.skipif(not PAPER.exists(), reason="../shared/data/paper-perplexities is absent")


def _cfg(tmp_path, path, model, *extra):
    return load_config(REPO / "configs/tiny.yaml", [
        f"output_dir={tmp_path}", f"select.trajectories={path}", f"select.trajectory_prefix={model}_",
        "select.stratified=false", *extra])


def test_select_on_published_alpaca_perplexities(tmp_path):
    out = run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-350m", "select.budget=0.05"))
    main = out["selections"]["lp"]
    t = pq.read_table(main["path"]).to_pandas()
    eligible = 52002 - 1  # one row has no response tokens (P = 1 at every epoch)
    assert len(t) == main["rows"] == len(np.array_split(np.arange(eligible), 20)[0])
    # the hardest 5 %: every kept LP(1) is at or below every LP(1) left out
    full = pq.read_table(PAPER / "alpaca.parquet").to_pandas()
    P = full[[f"opt-350m_P{i}" for i in range(4)]].to_numpy()
    lp = (P[:, 0] - P[:, 1]) / (P[:, 0] - P[:, 3])
    kept = np.zeros(len(full), bool)
    kept[t.id.astype(int)] = True
    valid = ~np.all(P == 1.0, axis=1)
    assert lp[kept].max() <= lp[valid & ~kept].min()
    prov = json.loads((tmp_path / "select" / main["tag"] / "selection.json").read_text())
    assert prov["prefix"] == "opt-350m_" and prov["excluded_no_response"] == 1 and prov["stratified"] is False
    assert set(out["selections"]) == {"lp", "random", "ppl_high"}  # text-needing baselines skipped, said so


def test_dolly_rows_without_response_tokens_are_excluded_and_counted(tmp_path):
    fixed = run_select(_cfg(tmp_path / "a", PAPER / "dolly.parquet", "opt-350m", "select.budget=0.05"))
    prov = json.loads((tmp_path / "a" / "select" / fixed["selections"]["lp"]["tag"] / "selection.json").read_text())
    assert prov["no_response_rows"] == 544 and prov["excluded_no_response"] == 544
    original = run_select(_cfg(tmp_path / "b", PAPER / "dolly.parquet", "opt-350m", "select.budget=0.05",
                               "select.keep_empty_responses=true"))
    kept = pq.read_table(original["selections"]["lp"]["path"])["P0"].to_numpy()
    assert (kept == 1.0).sum() == 544  # the original code's pitfall: all 544 rank as the hardest


def test_stratified_needs_text_and_unknown_model_is_named(tmp_path):
    with pytest.raises(SelectError, match="stratified selection clusters the rows' text"):
        run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-350m", "select.stratified=true"))
    with pytest.raises(SelectError, match="no columns opt-99b_P0"):
        run_select(_cfg(tmp_path, PAPER / "alpaca.parquet", "opt-99b"))
    with pytest.raises(ConfigError, match="select.method"):
        load_config(REPO / "configs/tiny.yaml", ["select.method=hardest"])


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
