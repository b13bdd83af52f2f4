"""A Ray cluster on this machine whose worker nodes Ray's own autoscaler starts and stops: the
autoscaler (monitor) runs on the head with Ray's fake multi-node provider, which starts each
"instance" as another raylet here instead of a cloud VM. The node types are those of a cluster
launcher YAML (cluster/aws.yaml): the same names, custom resources and logical GPU counts, with
CPUs scaled down to this machine.

Ray ships this as ``ray.cluster_utils.AutoscalingCluster``, but that helper reads an example YAML
missing from the Ray 2.60 wheel, runs ``ray stop --force`` (every Ray process on the machine, other
tests' clusters too) and binds the default ports. This one starts the head with ``ray start
--block`` on free ports and, on exit, ends only its own process tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import yaml

from tests.conftest import free_port


def node_types_like(launcher_yaml: str, cpus: dict[str, int], max_workers: dict[str, int]) -> dict:
    """The worker node types of a launcher config, as fake-provider node types: its names, custom
    resources and GPU counts (logical here: there is no GPU), with these CPUs and node counts."""
    doc = yaml.safe_load(open(launcher_yaml))
    out = {}
    for name, t in doc["available_node_types"].items():
        if name == doc["head_node_type"] or name not in cpus:
            continue
        res = {k: v for k, v in t["resources"].items() if k != "CPU"}
        res["CPU"] = cpus[name]
        res["object_store_memory"] = 150 * 2**20
        out[name] = {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": max_workers[name]}
    return out


class FakeAutoscalingCluster:
    def __init__(self, worker_node_types: dict, head_cpus: int = 1, idle_timeout_minutes: float = 0.25):
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Ray resolves 127.0.0.1 in an address to this machine's own IP, and binds the GCS there
        from ray._private.services import get_node_ip_address

        self.address = f"{get_node_ip_address()}:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.head_cpus = head_cpus
        self.config = {
            "cluster_name": "rayapp-fake",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "auth": {},
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        self.proc = None

    def start(self, timeout: float = 120) -> "FakeAutoscalingCluster":
        fd, path = tempfile.mkstemp(suffix=".json", prefix="rayapp-fake-cluster-")
        self.config_path = path
        with os.fdopen(fd, "w") as f:
            json.dump(self.config, f)
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        # `ray start` turns Ray's token authentication on unless told otherwise; this process's
        # clients (ray.init, the job and state APIs) must use the same mode
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        env.pop("RAY_ADDRESS", None)
        cmd = [ray, "start", "--head", "--block", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
               f"--autoscaling-config={path}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        self.log = tempfile.NamedTemporaryFile(prefix="rayapp-fake-cluster-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import urllib.error
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {open(self.log.name).read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=5):
                    pass
            except urllib.error.HTTPError:
                pass  # it answered (401 under Ray's token authentication): it is up
            except OSError:
                time.sleep(1)
                continue
            # the job server answers before the head's node is registered
            if any(n["state"] == "ALIVE" for n in self.nodes()):
                return self
            time.sleep(1)
        self.shutdown()
        raise TimeoutError(f"no job server at {self.dashboard_url} after {timeout}s")

    def nodes(self) -> list[dict]:
        """Every node the cluster has had (alive or not), from the GCS: what the autoscaler started."""
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else n
                for n in list_nodes(address=self.dashboard_url, limit=1000, detail=True)]

    def shutdown(self) -> None:
        """End the head's process group (`ray start` ran in a session of its own) and every process
        descended from it: the raylets the autoscaler started and their workers."""
        if self.proc is None:
            return
        try:
            tree = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        tree += [p for p in psutil.process_iter() if _pgid(p) == self.proc.pid and p not in tree]
        for p in tree:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            _signal(p, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        os.unlink(self.config_path)

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log.name) as f:
            return f.read()[-chars:]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return None


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.NoSuchProcess:
        pass
