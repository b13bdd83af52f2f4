"""Adding a stage is one new file plus one entry in the pipeline's list (and the import that entry
names): every consumer loops over the stages. The test does exactly that to a copy of the rayapp
package, then runs the real commands as a user would: `rayapp run` (tracked to TensorBoard),
`rayapp status`, `rayapp plan`, `rayapp check-cluster` and the new stage's own command, and finds
the new stage in each, and in the run's summary, with no other edit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ALPACA, REPO, tiny_config_dict

TOY_STAGE = '''
"""A toy stage: counts the prepared rows whose response is long, and writes a small report."""

from __future__ import annotations

from typing import Literal

import pyarrow.compute as pc

from rayapp.core import storage
from rayapp.core.hashing import fingerprint
from rayapp.core.layout import RunLayout
from rayapp.core.manifests import StageManifest, read_prepared
from rayapp.core.stage import Stage, StageContext
from rayapp.config import RunConfig


class ToyManifest(StageManifest):
    stage: Literal["toy"] = "toy"
    long_rows: int
    report: str


class ToyStage(Stage):
    name = "toy"
    help = "count the prepared rows with long responses"
    manifest_type = ToyManifest

    @classmethod
    def placements(cls, cfg: RunConfig) -> list:
        from rayapp.core.placement import Placement

        # on a node type no cluster file has: check-cluster must say so, naming the stage
        return [Placement(cls.name, "actor pool", {"CPU": 1, "toy_node": 1}, 1)]

    @classmethod
    def memory_plans(cls, cfg: RunConfig) -> list:
        from rayapp.ops.plan.check import StagePlan

        return [StagePlan(cls.name, "no model", None, "1 CPU actor(s)")]

    def uses_ray(self, cfg: RunConfig) -> bool:
        return False

    def read_inputs(self, cfg: RunConfig, layout: RunLayout):
        return read_prepared(layout)

    def fingerprint(self, cfg: RunConfig, layout: RunLayout, prepared) -> str:
        return fingerprint(prepared=prepared.fingerprint)

    def run(self, ctx: StageContext) -> ToyManifest:
        table = storage.read_parquet_dir(ctx.layout.prepared)
        long_rows = int(pc.sum(pc.greater(table["n_response_tokens"], 32)).as_py())
        report = storage.join(self.work_dir(ctx.layout), "report.json")
        storage.write_json(report, {"long_rows": long_rows})
        return ToyManifest(long_rows=long_rows, report=report)

    def done_detail(self, m: ToyManifest) -> dict:
        return {"long_rows": m.long_rows}

    def artifacts(self, m: ToyManifest, layout: RunLayout) -> list[str]:
        return [m.report]

    def summary(self, m: ToyManifest, layout: RunLayout) -> list[str]:
        return [f"{m.long_rows} rows with long responses -> {m.report}"]
'''


def _rayapp(pkg_root, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(pkg_root)
    return subprocess.run([sys.executable, "-m", "rayapp", *args], cwd=pkg_root, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow  # rayapp run, status, plan and check-cluster as subprocesses: ~60 s
def test_a_new_stage_is_one_file_and_one_list_entry(tmp_path):
    pkg_root = tmp_path / "src"
    shutil.copytree(REPO / "rayapp", pkg_root / "rayapp", ignore=shutil.ignore_patterns("__pycache__"))
    # the one new file
    (pkg_root / "rayapp" / "stages" / "toy").mkdir()
    (pkg_root / "rayapp" / "stages" / "toy" / "__init__.py").write_text("")
    (pkg_root / "rayapp" / "stages" / "toy" / "stage.py").write_text(TOY_STAGE)
    # the one list entry (after prepare), and its import
    pipeline = pkg_root / "rayapp" / "pipeline.py"
    text = pipeline.read_text()
    entry = "PrepareStage, ReferenceStage,"
    assert text.count(entry) == 1
    text = text.replace(entry, "PrepareStage, ToyStage, ReferenceStage,")
    text = text.replace("from rayapp.stages.prepare.stage import PrepareStage\n",
                        "from rayapp.stages.prepare.stage import PrepareStage\nfrom rayapp.stages.toy.stage import ToyStage\n")
    pipeline.write_text(text)

    cfg = tiny_config_dict(tmp_path, [{"path": str(ALPACA), "limit": 120}])
    cfg["tracking"] = {"backend": "tensorboard"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"

    done = _rayapp(pkg_root, "run", "-c", str(path), "--until", "toy")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "[run] (2/2) toy" in done.stdout and "[toy] done in" in done.stdout, done.stdout
    manifest = json.loads((run_dir / "toy" / "manifest.json").read_text())
    assert manifest["stage"] == "toy" and manifest["long_rows"] > 0
    # the summary
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert list(summary) == ["prepare", "toy"]
    assert f"{manifest['long_rows']} rows with long responses" in done.stdout
    # tracking: its numbers and its report, under its name
    from tests.test_tracking import TensorBoardRun

    tracked = TensorBoardRun(run_dir / "tracking" / "test")
    assert tracked.series("toy/long_rows") == [(0, manifest["long_rows"])]
    assert "report.json" in tracked.files("toy")

    # status: from the config, and from the output dir alone
    for args in (["status", "-c", str(path), "--json"], ["status", "--output-dir", str(run_dir), "--json"]):
        status = _rayapp(pkg_root, *args)
        assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-3000:]
        rows = {s["label"]: s for s in json.loads(status.stdout)["stages"]}
        assert rows["toy"]["state"] == "done" and rows["toy"]["detail"] == {"long_rows": manifest["long_rows"]}
        assert rows["reference"]["state"] == "not started"
    # plan and check-cluster
    plan = _rayapp(pkg_root, "plan", "-c", str(path), "--json")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "toy" in [p["stage"] for p in json.loads(plan.stdout)["stages"]], plan.stdout
    check = _rayapp(pkg_root, "check-cluster", str(REPO / "cluster" / "aws.yaml"), "-c", str(path))
    assert check.returncode == 1 and "toy" in check.stdout + check.stderr, check.stdout[-2000:] + check.stderr[-2000:]
    # its own command: up to date
    again = _rayapp(pkg_root, "toy", "-c", str(path))
    assert again.returncode == 0 and "[toy] up to date" in again.stdout, again.stdout + again.stderr[-2000:]
