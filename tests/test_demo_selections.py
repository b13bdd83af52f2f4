"""The demo selects the same rows after the stage redesign as before it: `rayapp run -c
configs/tiny.yaml --until select`, and each selection's ids hash (selection.json's
``selected_ids_sha256``) against the values recorded at 3c9bf95, the last commit before the
redesign (three runs of it there, in one driver and in step processes, all gave these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.extended  # prepare, reference, score and select of the demo: about 2.5 min

RECORDED = {  # selection -> (rows, sha256 of the sorted ids), at 3c9bf95
    "lp": (125, "0359020a7414e621"),
    "clust_rand": (125, "448ef02da4d8ae7a"),
    "random": (125, "9a9768525d065bb3"),
    "ppl_high": (125, "b56cf4ac6b553771"),
    "ppl_high:global": (125, "8909a6648ae1d323"),
    "ifd": (125, "dd37ffa78973e0ff"),
    # since ifd_cherry drops truncated rows as Cherry-LLM does (22 here): 7 rows differ from 3c9bf95's
    # "cecc74e0e9d8295f"
    "ifd_cherry": (125, "31687eff5d67f666"),
    "longest": (125, "c26412ebdd902f6f"),
    "longest:global": (125, "a3ade466306a8b07"),
}


def test_the_demo_selects_the_rows_it_selected_before_the_redesign(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "rayapp", "run", "-c", "configs/tiny.yaml", "--until", "select",
                           "--set", f"output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[select] lp: kept 125 of 360 rows (budget 33%, stratified over 12 clusters; " \
           "1 rows with no response tokens excluded)" in proc.stdout, proc.stdout
    # the clustering started ahead did its work (it needs the layout's folders in its Ray worker),
    # and Ray's internals kept off the terminal
    assert "background clustering failed" not in proc.stdout + proc.stderr
    assert "core_worker.cc" not in proc.stdout + proc.stderr
    assert _selections(tmp_path / "run") == RECORDED
    before = {key: pq.read_table(r["path"]) for key, r in _manifest(tmp_path / "run")["selections"].items()}

    # select spread over Ray Data (select.workers): the same rows, every column, from the cached
    # clusters, then with the clusters computed again in a Ray task (--force)
    for extra in ([], ["--force"]):
        (tmp_path / "run" / "select" / "manifest.json").unlink()
        proc = subprocess.run([sys.executable, "-m", "rayapp", "select", "-c", "configs/tiny.yaml", *extra, "--set",
                               f"output_dir={tmp_path / 'run'}", "--set", "select.workers=2"], cwd=REPO,
                              capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "joined" in proc.stdout  # the spread path's step log
        assert _selections(tmp_path / "run") == RECORDED
        for key, r in _manifest(tmp_path / "run")["selections"].items():
            assert pq.read_table(r["path"]).equals(before[key]), (extra, key)
    assert not (tmp_path / "run" / "select" / ".work").exists()


def _manifest(run) -> dict:
    return json.loads((run / "select" / "manifest.json").read_text())


def _selections(run) -> dict:
    got = {}
    for key, record in _manifest(run)["selections"].items():
        prov = json.loads((run / "select" / record["tag"] / "selection.json").read_text())
        got[key] = (record["rows"], prov["selected_ids_sha256"])
    return got
