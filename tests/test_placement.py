"""One placement object per stage, read alike by the Ray call, `rayapp plan` and `check-cluster`;
and the paper presets' placements scheduled by Ray itself, not compared as dicts.

The vLLM test builds the engine's placement group with ray.data.llm's own scheduling function and
starts the engine actor inside it the way ray.data.llm does with tensor parallelism (num_gpus=0,
Ray Data's default of one CPU), on a local cluster that declares the gpu-8x node type (logical
GPUs). Before the placement object, the bundles held no CPU and Ray refused the actor."""

from __future__ import annotations

import pytest

from rayapp.config import ConfigError, load_config
from tests.conftest import REPO

PRESETS = ["configs/paper-opt350m-to-13b.yaml", "configs/paper-llama2-7b-to-13b.yaml"]


# In a process and local Ray cluster of its own: the suite's shared cluster has no gpu-8x node, and
# one driver per test process can hold only one Ray session.
SCHEDULE = r"""
import json, sys
import ray
from ray.llm._internal.batch.stages.vllm_engine_stage import _ray_scheduling_strategy_fn
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayapp.config import load_config
from rayapp.stages.evaluate.generate import engine_placement

# one gpu-8x node: 8 logical GPUs, its label and accelerator type, its CPUs
ray.init(address="local", num_cpus=16, num_gpus=8, resources={"gpu_8x": 8, "accelerator_type:A100": 1},
         include_dashboard=False, log_to_driver=False, logging_level="ERROR")


@ray.remote
class Engine:
    def node(self):
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_gpus=1, num_cpus=0)
def tp_worker():  # what vLLM's Ray executor asks per tensor-parallel worker
    return True


out = {}
for preset in sys.argv[1:]:
    gen = load_config(preset).evaluate.generation
    config = engine_placement(gen)
    bundle = config.pop("bundle_per_worker")  # as vLLMEngineStage.post_init expands it
    config["bundles"] = [dict(bundle) for _ in range(gen.tensor_parallel_size)]
    engines, groups, workers = [], [], []
    for _ in range(gen.resources.max_actors):
        # the engine actor as ray.data.llm starts it with tensor parallelism: no GPU, Ray Data's CPU
        options = _ray_scheduling_strategy_fn(gen.tensor_parallel_size, gen.resources.accelerator_type, config)
        groups.append(options["scheduling_strategy"].placement_group)
        engines.append(Engine.options(num_cpus=1, num_gpus=0, **options).remote())
    started = ray.get([e.node.remote() for e in engines], timeout=120)
    for g in groups:
        workers.append(ray.get([tp_worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(g, i)).remote()
                                for i in range(gen.tensor_parallel_size)], timeout=120))
    for e, g in zip(engines, groups):
        ray.kill(e)
        remove_placement_group(g)
    out[preset] = {"engines": len(started), "workers": workers, "tp": gen.tensor_parallel_size,
                   "bundle": bundle, "strategy": config["strategy"]}

# the bundle before the fix ({GPU: 1, gpu_8x: 1}, no CPU) cannot hold the engine actor
old = placement_group([{"GPU": 1, "gpu_8x": 1}] * 2, strategy="STRICT_PACK")
ray.get(old.ready(), timeout=60)
try:
    Engine.options(num_cpus=1, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
        old, placement_group_capture_child_tasks=True)).remote()
    out["old_bundle"] = "scheduled"
except ValueError as exc:
    out["old_bundle"] = str(exc)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.extended  # ~1 min (a Ray cluster of its own and ray.data.llm's imports); the rehearsal also catches it
def test_tensor_parallel_engines_are_scheduled_by_ray_as_ray_data_llm_starts_them():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SCHEDULE, *PRESETS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for preset in PRESETS:
        r = out[preset]
        # the presets' 4 engines x 2 GPUs fill one gpu-8x node, and each engine's TP workers fit its group
        assert r["engines"] == 4 and r["tp"] == 2 and r["workers"] == [[True, True]] * 4
        assert r["bundle"] == {"CPU": 1.0, "GPU": 1, "gpu_8x": 1.0} and r["strategy"] == "STRICT_PACK"
    # the placement before the fix: Ray refuses the engine actor, as the issue saw
    assert "cannot fit into any bundles" in out["old_bundle"]


def test_one_field_places_the_generators_and_plan_and_check_cluster_read_it():
    import yaml

    from rayapp.core import placement
    from rayapp.ops.deploy.checks import check_placement, launcher_node_types, stage_requests
    from rayapp.ops.plan.check import _gpu

    # the hf generator on H100s: the Ray call, the plan and check-cluster all see H100
    cfg = load_config(str(REPO / "configs/tiny.yaml"),
                      ["evaluate.generation.resources={num_cpus: 1, num_gpus: 1, accelerator_type: H100}"])
    where = placement.generation(cfg.evaluate.generation)
    assert where.actor_options()["accelerator_type"] == "H100"
    assert _gpu(cfg, where)[1] == "H100"
    evaluate = next(r for r in stage_requests(cfg) if r.stage == "evaluate")
    assert evaluate.bundles[0]["accelerator_type:H100"] == 0.001
    aws = launcher_node_types(yaml.safe_load(open(REPO / "cluster/aws.yaml")))
    assert any(e.startswith("evaluate:") and "accelerator_type:H100" in e for e in check_placement(cfg, aws))
    # the second field is gone, with a message that says where it went
    with pytest.raises(ConfigError, match="moved to evaluate.generation.resources.accelerator_type"):
        load_config(str(REPO / "configs/tiny.yaml"), ["evaluate.generation.accelerator_type=A100"])


def test_every_stage_declares_its_placement_and_consumers_loop_over_them():
    from rayapp.ops.deploy.checks import stage_requests
    from rayapp.pipeline import placements as run_placements

    cfg = load_config(str(REPO / PRESETS[0]))
    by_stage = {p.stage: p for p in run_placements(cfg)}
    assert set(by_stage) == {"reference", "score", "select", "finetune", "evaluate"}  # prepare: the driver
    assert by_stage["finetune"].describe() == "8 x {CPU: 8, GPU: 1, gpu_8x: 1} on one node (STRICT_PACK)"
    assert by_stage["evaluate"].groups == 4 and by_stage["evaluate"].count == 2
    stages = [r.stage for r in stage_requests(cfg)]
    assert stages == ["reference", "score", "select", "finetune"] + [f"evaluate (vLLM engine {k})" for k in range(1, 5)]
