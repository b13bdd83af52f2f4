"""The image's dependency step (cluster/Dockerfile) as written: it runs `pip install -r` on the pinned
GPU set from the base image's home folder, before any of the repo is copied, then installs rayapp
with --no-deps. The set must therefore hold pins only: an `-e file:.` line (what `uv pip compile`
emits for gpu.in's own `-e file:.[...]`) points at a folder with no pyproject.toml, and the layer
fails. No Docker builder runs on the development machine (no daemon, no Docker Hub), so the extended
test runs the Dockerfile's own install command, resolution included, against PyPI from a folder
other than the repo root, without downloading the wheels."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "cluster/Dockerfile"
PINNED = REPO / "requirements/constraints-gpu.txt"
# rayproject/ray images set WORKDIR /home/ray (the ray user's home); the Dockerfile inherits it
BASE_WORKDIR = "/home/ray"
# a requirement line of a pinned set: a name and an exact version, nothing else (no -e, path, URL,
# extras or markers: the image installs exactly these)
PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+")


def requirement_lines(text: str) -> list[str]:
    """The lines pip reads as requirements or options (comments and uv's `# via` notes left out)."""
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def dockerfile_steps(text: str) -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined."""
    steps, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            steps.append((word.upper(), rest.strip()))
            current = ""
    return steps


def image_install_steps(text: str) -> dict:
    """Follow the Dockerfile as the builder does: the working folder and what has been copied where
    when each `pip install` runs. Returns the dependency step (`pip install ... -r FILE`) and the
    rayapp step (`pip install ... --no-deps DIR`) with the state they run in."""
    workdir, copied = BASE_WORKDIR, {}  # image path -> repo path
    found = {}
    for word, args in dockerfile_steps(text):
        if word == "WORKDIR":
            workdir = os.path.join(workdir, args)
        elif word == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            *sources, dest = parts
            for src in sources:
                target = dest if len(sources) == 1 and not dest.endswith("/") else os.path.join(dest, os.path.basename(src))
                copied[os.path.join(workdir, target)] = src
        elif word == "RUN" and "pip install" in args:
            argv = shlex.split(args)
            if "-r" in argv:
                found["deps"] = {"argv": argv, "file": argv[argv.index("-r") + 1], "cwd": workdir, "copied": dict(copied)}
            elif "--no-deps" in argv:
                found["rayapp"] = {"argv": argv, "target": argv[-1], "cwd": workdir, "copied": dict(copied)}
    return found


def test_the_pinned_gpu_set_holds_pins_only():
    lines = requirement_lines(PINNED.read_text())
    bad = [line for line in lines if not PIN.fullmatch(line)]
    assert not bad, f"{PINNED.name}: lines the image's `pip install -r` cannot take as pins: {bad}"
    names = {line.split("==")[0].lower() for line in lines}
    # rayapp's dependencies stay in (only rayapp itself is left out); the image's key pins are there
    assert {"ray", "vllm", "torch", "transformers", "boto3", "google-api-python-client"} <= names
    assert "rayapp" not in names


def test_requirement_line_check_rejects_what_uv_emits_for_an_editable_project():
    # the head of the file as it was: uv's line for gpu.in's `-e file:.[vllm,tracking,lora]`
    old = "# header\n-e file:.\n    # via -r requirements/gpu.in\nabsl-py==2.5.1\n    # via\n    #   rouge-score\n"
    assert [line for line in requirement_lines(old) if not PIN.fullmatch(line)] == ["-e file:."]
    for line in ("torch @ https://example.org/torch.whl", "./wheels/x.whl", "ray[llm]==2.60.0",
                 "numpy>=2", "--index-url https://example.org"):
        assert not PIN.fullmatch(line), line


def install_step_problems(text: str) -> list[str]:
    """What would break the image's two install steps, read from the Dockerfile."""
    steps = image_install_steps(text)
    if set(steps) != {"deps", "rayapp"}:
        return [f"expected a `pip install -r` step and a `pip install --no-deps` step, found {sorted(steps)}"]
    deps, rayapp, problems = steps["deps"], steps["rayapp"], []
    if deps["copied"].get(deps["file"]) != "requirements/constraints-gpu.txt":
        problems.append(f"the dependency step installs {deps['file']}, not the copied pinned GPU set")
    project = [p for p in deps["copied"] if os.path.dirname(p) == deps["cwd"]
               and os.path.basename(p) in ("pyproject.toml", "setup.py")]
    if project:
        problems.append(f"the dependency step runs in {deps['cwd']}, where {project} is already copied: a `.` in "
                        "the pinned set would install the project there, with its code not yet copied")
    if "--no-deps" not in rayapp["argv"]:
        problems.append("rayapp is installed without --no-deps: pip would resolve its dependencies again")
    if rayapp["copied"].get(os.path.join(rayapp["target"], "pyproject.toml")) != "pyproject.toml" or \
            os.path.join(rayapp["target"], "rayapp") not in rayapp["copied"]:
        problems.append(f"rayapp's install step ({rayapp['target']}) runs before the project is copied there")
    return problems


def test_the_image_installs_the_pins_from_outside_the_project_then_rayapp_without_deps():
    assert install_step_problems(DOCKERFILE.read_text()) == []
    deps = image_install_steps(DOCKERFILE.read_text())["deps"]
    # the base image's home: what `.` would mean for an `-e file:.` line, and it holds no project
    assert deps["cwd"] == BASE_WORKDIR


def test_the_dockerfile_model_sees_a_project_in_the_install_folder():
    """The check above fails on a Dockerfile that copies the project where the dependency step
    runs, or that installs rayapp with its dependencies: the model of the build is not blind."""
    text = DOCKERFILE.read_text()
    early = text.replace("COPY --chown=ray:users requirements/constraints-gpu.txt",
                         "COPY --chown=ray:users pyproject.toml /home/ray/pyproject.toml\n"
                         "COPY --chown=ray:users requirements/constraints-gpu.txt")
    assert any("where ['/home/ray/pyproject.toml'] is already copied" in p for p in install_step_problems(early))
    assert any("--no-deps" in p for p in install_step_problems(text.replace("--no-deps ", "")))


# ---- the dependency step itself, against PyPI ---------------------------------------------------

PIP_FOR_THE_CHECK = "pip==26.3"  # a pip with PEP 658 metadata and range-request (fast-deps) resolution


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _clean_pip_env(home: Path) -> dict:
    """pip as a fresh image has it: no pip configuration of this machine (its local wheel folders,
    extra indexes and caps), PyPI only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, HOME=str(home), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.mark.extended
def test_the_image_dependency_command_resolves_the_pinned_set_from_outside_the_repo(tmp_path):
    """The Dockerfile's own `pip install -r` line, run where the image runs it (a home folder with
    only the copied requirements file under rayapp/requirements/), with the resolution done against
    PyPI but no wheel downloaded: --dry-run, and metadata from PEP 658 files or HTTP range requests
    (--use-feature=fast-deps). Measured here: ~80 s and ~110 MB received for 275 packages (pip 26.3,
    an index without PEP 658 files: every wheel's metadata by range requests); the wheels themselves
    are ~4.5 GB. The image's Python is 3.11 on Linux x86_64: this host must match to pick the
    same wheels and environment markers."""
    if not (sys.platform == "linux" and os.uname().machine == "x86_64" and sys.version_info[:2] == (3, 11)):
        pytest.skip("the image is CPython 3.11 on Linux x86_64; this host resolves other wheels and markers")
    if not _pypi_reachable():
        pytest.skip("PyPI (pypi.org:443) is not reachable from this machine: the resolution needs the index")
    steps = image_install_steps(DOCKERFILE.read_text())
    deps = steps["deps"]
    # the image's layout, under tmp: its home folder and the copied file at the same relative place
    root = tmp_path / "image"
    home = root / deps["cwd"].lstrip("/")
    home.mkdir(parents=True)
    for image_path, repo_path in deps["copied"].items():
        dest = root / image_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((REPO / repo_path).read_bytes())
    venv = tmp_path / "venv"
    env = _clean_pip_env(tmp_path / "user")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", PIP_FOR_THE_CHECK], check=True, env=env, timeout=300)
    argv = deps["argv"]
    assert argv[:2] == ["pip", "install"], argv
    # the image's paths, rooted under tmp; then what makes it a resolution without an install
    command = [py, "-m", "pip", *[str(root / a.lstrip("/")) if a.startswith("/") else a for a in argv[1:]],
               "--dry-run", "--ignore-installed", "--target", str(tmp_path / "target"),
               "--use-feature=fast-deps", "--report", str(tmp_path / "report.json")]
    start = time.monotonic()
    done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=1200)
    took = time.monotonic() - start
    assert done.returncode == 0, f"the image's dependency step fails ({took:.0f} s):\n{done.stderr[-4000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    would = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
    pins = dict(line.lower().replace("_", "-").split("==") for line in requirement_lines(PINNED.read_text()))
    # exactly the pinned set, nothing pulled in beside it (the set is closed under its dependencies)
    assert would == pins, {k: (would.get(k), pins.get(k)) for k in set(would) | set(pins) if would.get(k) != pins.get(k)}
    # no wheel came down whole: pip read metadata only (an sdist is fetched to build its metadata)
    whole = [line.strip() for line in done.stdout.splitlines()
             if line.strip().startswith("Downloading ") and ".whl" in line and ".metadata" not in line]
    assert not whole, whole[:5]
    print(f"image dependency step resolved {len(would)} pins in {took:.0f} s")
