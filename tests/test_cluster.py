"""Cluster operations: launcher YAMLs through Ray's own validation, KubeRay manifests through field
checks (rayapp/ops/deploy/checks.py; the GPU-level checks are in test_cluster_configs.py), and `rayapp submit` against the job server of a real three-node cluster on 127.0.0.1.
(The whole pipeline runs as a Ray job on that cluster in test_pipeline.py.)"""

from __future__ import annotations

import io
import sys

import pytest
import yaml

from rayapp.ops.deploy.checks import _cluster_spec, check_kuberay
from rayapp.ops.submit import SubmitError, build_runtime_env, submit
from tests.conftest import REPO, wait_for_job_server

LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]
KUBERAY = ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"]


@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_yaml_passes_ray_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / path).read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert all(t.get("min_workers", 0) == 0 for n, t in types.items() if n != config["head_node_type"])
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)
    # a typo fails
    config["available_node_types"]["gpu-small"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", KUBERAY)
def test_kuberay_manifests(path):
    doc = yaml.safe_load((REPO / path).read_text())
    assert check_kuberay(doc, (REPO / path).read_text()) == []
    bad = yaml.safe_load((REPO / path).read_text())
    spec = _cluster_spec(bad)
    spec["headGroupSpec"]["serviceType"] = "LoadBalancer"
    spec["workerGroupSpecs"][0]["minReplicas"] = 3
    spec["workerGroupSpecs"][0]["maxReplicas"] = 2
    del spec["workerGroupSpecs"][1]["groupName"]
    errors = check_kuberay(bad)
    assert any("ClusterIP" in e for e in errors) and any("minReplicas" in e for e in errors)
    assert any("missing groupName" in e for e in errors)


def test_runtime_env_refuses_secrets_and_excludes_build_outputs(tmp_path):
    env = build_runtime_env(str(tmp_path), '{"env_vars": {"HF_HUB_OFFLINE": "1"}}')
    assert env["working_dir"] == str(tmp_path) and ".venv" in env["excludes"] and "runs" in env["excludes"]
    with pytest.raises(SubmitError, match="OPENAI_API_KEY"):
        build_runtime_env(None, '{"env_vars": {"OPENAI_API_KEY": "sk-x"}}')
    with pytest.raises(SubmitError, match="not valid JSON"):
        build_runtime_env(None, "{oops")


@pytest.mark.slow
def test_submit_streams_logs_and_returns_the_job_status(three_nodes):
    _, address = three_nodes
    wait_for_job_server(address)
    out = io.StringIO()
    assert submit(address, [sys.executable, "-c", "print('hello from the job')"], working_dir=None, out=out) == 0
    assert "hello from the job" in out.getvalue() and "succeeded" in out.getvalue()
    out = io.StringIO()
    code = "import sys; print('about to fail', flush=True); sys.exit(3)"
    assert submit(address, [sys.executable, "-c", code], working_dir=None, out=out) == 1
    assert "about to fail" in out.getvalue() and "failed" in out.getvalue()
