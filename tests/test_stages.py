"""The stage contract: one runner for every stage (up-to-date check, --force, stale state, manifest
written last), typed manifests, the CLI's errors and exit codes, and the package's layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayapp.core import storage
from rayapp.core.layout import RunLayout
from rayapp.core.manifests import StageManifest
from rayapp.core.stage import Stage, StageContext, run_stage
from tests.conftest import REPO


class CountingManifest(StageManifest):
    stage: str = "count"
    runs: int


class CountingStage(Stage):
    """A real stage on real files: writes ``work/out.txt`` and counts its runs in ``work/runs``."""

    name = "count"  # its own folder: <output_dir>/count
    help = "test stage"
    manifest_type = CountingManifest
    reset_on_force = ("scratch",)
    reset_on_change = ("state",)

    def __init__(self, setting: str = "a", fail: bool = False):
        self.setting, self.fail = setting, fail

    def fingerprint(self, cfg, layout, inputs=None):
        from rayapp.core.hashing import fingerprint

        return fingerprint(setting=self.setting)

    def outputs_complete(self, m, layout):
        return storage.exists(storage.join(self.work_dir(layout), "out.txt"))

    def run(self, ctx: StageContext):
        work = self.work_dir(ctx.layout)
        runs_file = storage.join(work, "runs")
        runs = int(storage.read_bytes(runs_file)) + 1 if storage.exists(runs_file) else 1
        storage.write_text(runs_file, str(runs))
        for entry in ("scratch", "state"):
            storage.write_text(storage.join(work, entry, "x"), self.setting)
        if self.fail:
            raise RuntimeError("stage failed half-way")
        storage.write_text(storage.join(work, "out.txt"), self.setting)
        return CountingManifest(runs=runs)

    def summary(self, m, layout):
        return [f"ran {m.runs} times"]


@pytest.fixture
def cfg(make_config, tmp_path):
    return make_config([{"path": str(tmp_path / "none.jsonl")}])


def test_runner_skips_up_to_date_work_and_force_redoes_it(cfg):
    layout = RunLayout(cfg.output_dir)
    first = run_stage(CountingStage(), cfg)
    assert not first.skipped and first.manifest.runs == 1 and first.manifest.fingerprint
    manifest = json.loads(Path(layout.manifest("count")).read_text())
    assert manifest["runs"] == 1 and manifest["config_digest"] == cfg.digest() and manifest["seconds"] >= 0
    again = run_stage(CountingStage(), cfg)
    assert again.skipped and again.manifest.runs == 1  # nothing ran
    forced = run_stage(CountingStage(), cfg, force=True)
    assert not forced.skipped and forced.manifest.runs == 2
    # an output the manifest relies on is gone: the stage runs again
    Path(layout.stage_dir("count"), "out.txt").unlink()
    assert run_stage(CountingStage(), cfg).manifest.runs == 3


def test_runner_clears_stale_state_on_force_and_on_other_inputs(cfg):
    work = Path(RunLayout(cfg.output_dir).stage_dir("count"))
    run_stage(CountingStage("a"), cfg)
    (work / "scratch" / "keep").write_text("?")
    (work / "state" / "keep").write_text("?")
    run_stage(CountingStage("b"), cfg)  # other inputs: 'state' (e.g. checkpoints) must not be resumed from
    assert (work / "scratch" / "keep").exists() and not (work / "state" / "keep").exists()
    (work / "state" / "keep").write_text("?")
    run_stage(CountingStage("b"), cfg, force=True)  # --force: both go
    assert not (work / "scratch" / "keep").exists() and not (work / "state" / "keep").exists()


def test_a_failed_stage_leaves_no_manifest_and_resumes_its_state(cfg):
    layout = RunLayout(cfg.output_dir)
    with pytest.raises(RuntimeError, match="half-way"):
        run_stage(CountingStage("a", fail=True), cfg)
    assert not storage.exists(layout.manifest("count"))  # written last: nothing counts as done
    (Path(layout.stage_dir("count")) / "state" / "keep").write_text("partial")
    done = run_stage(CountingStage("a"), cfg)  # same inputs: the partial state stays to resume from
    assert done.manifest.runs == 2 and (Path(layout.stage_dir("count")) / "state" / "keep").exists()


def test_a_manifest_that_does_not_validate_counts_as_not_done(cfg):
    layout = RunLayout(cfg.output_dir)
    run_stage(CountingStage(), cfg)
    Path(layout.manifest("count")).write_text(json.dumps({"stage": "count", "runs": "many"}))
    assert not run_stage(CountingStage(), cfg).skipped


def test_every_stage_has_its_folder_and_manifest_in_the_layout():
    from rayapp import pipeline
    from rayapp.config import load_config
    from rayapp.core.manifests import MANIFEST_TYPES

    layout = RunLayout("/runs/x")
    cfg = load_config(REPO / "configs/tiny.yaml")
    assert set(pipeline.STAGE_TYPES) <= set(MANIFEST_TYPES)  # each stage registered itself when defined
    for name in pipeline.STAGE_TYPES:
        stage = pipeline.stage(name, cfg)
        assert stage.manifest_type is MANIFEST_TYPES[name]
        assert stage.manifest_uri(layout) == f"{stage.work_dir(layout)}/manifest.json"
    # the embeddings and clusters that `select --force` must redo are inside select's work folder
    select = pipeline.stage("select", cfg)
    assert [storage.join(select.work_dir(layout), e) for e in select.reset_on_force] == \
        [layout.embeddings_dir, layout.clusters]
    plan = [s.label for s in pipeline.plan(cfg)]
    assert plan == ["prepare", "reference", "score", "select", "finetune (selected)", "finetune (clust_rand)",
                    "finetune (full)", "evaluate"]
    # any selection can be trained on and compared; its work folder and model name are path-safe
    other = load_config(REPO / "configs/tiny.yaml", ["evaluate.models=[selected, 'ppl_high:global', /d/my.parquet]"])
    assert [s.label for s in pipeline.plan(other)][4:7] == [
        "finetune (selected)", "finetune (ppl_high-global)", "finetune (file-my)"]
    assert [s.label for s in pipeline.plan(cfg, until="finetune")][-1] == "finetune (selected)"


def _rayapp(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "rayapp", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_errors_are_one_line_with_their_exit_codes(tmp_path):
    bad = _rayapp("prepare", "--config", str(tmp_path / "nope.yaml"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"rayapp prepare: error: config file not found: {tmp_path / 'nope.yaml'}"]
    missing = _rayapp("score", "--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}/run")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "no complete prepare output" in missing.stderr and "run `rayapp prepare" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_bug_is_not_dressed_up_as_a_user_error(cfg, monkeypatch):
    """Anything that is not a RayappError propagates with its traceback (exit code 1 from Python)."""
    from rayapp import cli, pipeline

    class Broken(CountingStage):
        def run(self, ctx):
            return {}["missing"]  # a KeyError: a bug, not the user's problem

    monkeypatch.setattr(pipeline, "stage", lambda name, c: Broken())
    cfg_file = Path(cfg.output_dir).parent / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json", by_alias=True)))
    with pytest.raises(KeyError):
        cli.main(["prepare", "--config", str(cfg_file)])


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_shared_pieces_import_no_stage():
    """config, core/ and ml/ sit below the stages; a stage imports core and ml, never another
    stage's internals (the pipeline module and the CLI tie them together)."""
    pkg = REPO / "rayapp"
    stages = sorted(p.name for p in (pkg / "stages").iterdir() if (p / "stage.py").exists())
    assert stages == sorted(["prepare", "reference", "score", "select", "finetune", "evaluate"])
    low = [pkg / "config.py", *sorted((pkg / "core").glob("*.py")), *sorted((pkg / "ml").rglob("*.py"))]
    assert len(low) > 30, "the layering check found no shared modules: the folders moved?"
    for path in low:
        bad = {m for m in _imports(path) if m.startswith("rayapp.stages")}
        assert not bad, f"{path.relative_to(REPO)} imports a stage: {bad}"
    for stage in stages:
        paths = sorted((pkg / "stages" / stage).glob("*.py"))
        assert paths, stage
        for path in paths:
            for m in _imports(path):
                parts = m.split(".")
                if parts[:2] == ["rayapp", "stages"] and len(parts) > 2 and parts[2] != stage:
                    pytest.fail(f"{path.relative_to(REPO)} imports {m}")


def _module_graph() -> dict[str, set[str]]:
    """rayapp's modules -> the rayapp modules they import, at the top or inside a function."""
    pkg = REPO / "rayapp"
    paths = {}
    for path in pkg.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        paths[name.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.update(filter(None, (resolve(f"{node.module}.{a.name}") or resolve(node.module)
                                          for a in node.names)))
            elif isinstance(node, ast.Import):
                deps.update(filter(None, (resolve(a.name) for a in node.names)))
        graph[name] = deps - {name}
    return graph


def test_no_import_circles_and_no_test_code_in_the_product():
    """Every import counts, also one inside a function: the modules form no circle (a circle means
    neither side can be read, tested or moved alone). Product code reaches the test suite's fault
    hooks only through core/hooks.py, never by importing rayapp/testing."""
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    product = {m: deps for m, deps in graph.items() if not m.startswith("rayapp.testing")}
    users = sorted(m for m, deps in product.items() if any(d.startswith("rayapp.testing") for d in deps))
    assert not users, f"product modules import test code: {users}"


def test_package_data_globs_match_files():
    """Defect: pyproject shipped `configs/*.yaml` as package data, which matches nothing."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rayapp"]
    for pattern in data:
        assert list((REPO / "rayapp").glob(pattern)), f"package-data {pattern!r} matches no file"


@pytest.mark.extended  # ~28 s; CI's 30-minute budget (make test-extended)
def test_ray_start_leaves_hub_access_to_the_environment(tmp_path):
    """Defect: init_ray set HF_HUB_OFFLINE=0 when it was unset, although no stage should reach the
    hub unless the environment allows it."""
    code = ("import os; from rayapp.core.raycluster import init_ray; from rayapp.config import load_config; "
            "init_ray(load_config('configs/tiny.yaml')); print(repr(os.environ.get('HF_HUB_OFFLINE')))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "None"


def test_a_stage_name_belongs_to_one_stage():
    """Defining a stage registers its folder and manifest type under its name; a second stage with
    that name would silently take over the first's folder, so it is refused."""
    import rayapp.pipeline  # noqa: F401  (the real stages are defined)

    with pytest.raises(TypeError, match="two stages named 'score'"):
        class AnotherScore(Stage):  # noqa: F841
            name = "score"
            help = "?"
            manifest_type = CountingManifest


def test_a_layout_sent_to_a_process_that_imported_no_stage_knows_their_folders(tmp_path):
    """A Ray worker (the clustering started ahead, an actor pool) gets the run's layout pickled and
    may have imported no stage module: the folders travel with the layout."""
    import pickle

    import rayapp.pipeline  # noqa: F401  (defines every stage, as in a run's process)

    layout = RunLayout(str(tmp_path))
    code = ("import pickle, sys; layout = pickle.loads(sys.stdin.buffer.read()); "
            "assert not [m for m in sys.modules if m.endswith('.stage')], 'a stage module was imported'; "
            "print(layout.prepared); print(layout.manifest('finetune'))")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(layout), capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == [layout.prepared, layout.manifest("finetune")]
