"""Stage progress as Ray metrics, read back from the node's Prometheus endpoint while a real run
goes on (rayapp/core/metrics.py): rows and tokens scored by the scoring actors, the training step,
live actors per pool. The run is `rayapp run --until score` in a subprocess whose Ray reports
metrics every 0.5 s (Ray's default is 10 s) on a port this test picks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.conftest import ALPACA, REPO, free_port, tiny_config_dict

pytestmark = pytest.mark.slow  # not in `make test-fast`: a pipeline run

SCRIPT = """
import sys, time, ray
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _metrics_export_port=int(sys.argv[2]),
         _system_config={"metrics_report_interval_ms": 500})
from rayapp.config import load_config
from rayapp.pipeline import run_pipeline
run_pipeline(load_config(sys.argv[1]), until="score")
print("RAYAPP-DONE", flush=True)
time.sleep(30)  # the metrics stay up for the test to read the final values
"""


def _scrape(port: int) -> dict[str, float]:
    """rayapp's series on the endpoint, summed over their labels: {name: value}."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"(ray_rayapp_\w+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            name = m.group(1)
            out[name] = out.get(name, 0.0) + float(m.group(3))
    return out


@pytest.mark.extended  # ~85 s; CI's 30-minute budget (make test-extended)
def test_scoring_and_training_progress_reach_the_metrics_endpoint(tmp_path):
    rows = 160
    cfg = tiny_config_dict(tmp_path, [{"path": str(ALPACA), "limit": rows}])
    cfg.pop("ray")
    cfg["reference"] = {"epochs": 2, "per_device_batch_size": 8, "num_workers": 0, "fsdp": False,
                        "log_every_steps": 1, "learning_rate": 1e-3}
    cfg["score"] = {"local": False, "rows_per_task": 64, "resources": {"num_cpus": 1, "max_actors": 1}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    # a cluster of its own: not one an earlier test's ray.init left in RAY_ADDRESS
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(path), str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    steps = []
    try:
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 600:
            got = _scrape(port)
            if "ray_rayapp_train_step" in got:
                steps.append(got["ray_rayapp_train_step"])
            seen.update(got)
            done = seen.get("ray_rayapp_score_rows_total", 0)
            if done >= rows * 3:  # P0, P1, P2: every row under every checkpoint
                break
            time.sleep(0.5)
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert seen, out[-3000:]
    scored = seen.get("ray_rayapp_score_rows_total")
    assert scored == rows * 3, (seen, out[-2000:])
    assert seen["ray_rayapp_score_tokens_total"] > scored
    total = seen["ray_rayapp_train_total_steps"]
    assert total == 2 * (rows // 8) and max(steps) == total and steps == sorted(steps)
    assert seen["ray_rayapp_train_tokens_per_s"] > 0 and seen["ray_rayapp_actors_alive"] >= 1
