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


@pytest.fixture(scope="module")
def gpu8x_cluster():
    """A local Ray cluster shaped like one gpu-8x node: 8 logical GPUs, its label, its CPUs."""
    import ray

    ray.init(address="local", num_cpus=16, num_gpus=8, resources={"gpu_8x": 8, "accelerator_type:A100": 1},
             include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.parametrize("preset", PRESETS)
def test_tensor_parallel_engines_are_scheduled_by_ray_as_ray_data_llm_starts_them(preset, gpu8x_cluster):
    import ray
    from ray.llm._internal.batch.stages.vllm_engine_stage import _ray_scheduling_strategy_fn

    from rayapp.evaluate.generate import engine_placement

    gen = load_config(str(REPO / preset)).evaluate.generation
    assert gen.tensor_parallel_size == 2 and gen.backend == "vllm"
    pg_config = engine_placement(gen)
    # what vLLMEngineStage.post_init does with bundle_per_worker: one bundle per TP worker
    bundle = pg_config.pop("bundle_per_worker")
    pg_config["bundles"] = [dict(bundle) for _ in range(gen.tensor_parallel_size)]

    @ray.remote
    class Engine:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    engines, groups = [], []
    for _ in range(gen.resources.max_actors):  # the preset's 4 engines x 2 GPUs fill one gpu-8x node
        options = _ray_scheduling_strategy_fn(gen.tensor_parallel_size, gen.resources.accelerator_type,
                                              pg_config)
        groups.append(options["scheduling_strategy"].placement_group)
        engines.append(Engine.options(num_cpus=1, num_gpus=0, **options).remote())
    nodes = ray.get([e.node.remote() for e in engines], timeout=60)
    assert len(nodes) == 4
    # and each engine's TP workers fit in its group: what vLLM's Ray executor asks per worker
    pg = options["scheduling_strategy"].placement_group

    @ray.remote(num_gpus=1, num_cpus=0)
    def tp_worker():
        return True

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    assert ray.get([tp_worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                    for i in range(gen.tensor_parallel_size)], timeout=60) == [True, True]
    for e, g in zip(engines, groups):
        ray.kill(e)
        ray.util.remove_placement_group(g)


def test_bundles_without_a_cpu_are_refused_as_the_issue_saw():
    """The old bundle ({GPU: 1, gpu_8x: 1}) cannot hold the engine actor: Ray says so. This keeps
    the test above honest: it would fail with the old placement."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not ray.is_initialized():
        pytest.skip("runs after the scheduling test, on its cluster")
    pg = placement_group([{"GPU": 1, "gpu_8x": 1}] * 2, strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)

    @ray.remote
    class Engine:
        pass

    with pytest.raises(ValueError, match="cannot fit into any bundles"):
        Engine.options(num_cpus=1, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True)).remote()
    ray.util.remove_placement_group(pg)


def test_one_field_places_the_generators_and_plan_and_check_cluster_read_it():
    from rayapp.common import placement
    from rayapp.deploy.checks import check_placement, launcher_node_types, stage_requests
    from rayapp.plan.check import _gpu

    import yaml

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
    from rayapp.common.placement import run_placements
    from rayapp.deploy.checks import stage_requests

    cfg = load_config(str(REPO / PRESETS[0]))
    by_stage = {p.stage: p for p in run_placements(cfg)}
    assert set(by_stage) == {"reference", "score", "select", "finetune", "evaluate"}  # prepare: the driver
    assert by_stage["finetune"].describe() == "8 x {CPU: 8, GPU: 1, gpu_8x: 1} on one node (STRICT_PACK)"
    assert by_stage["evaluate"].groups == 4 and by_stage["evaluate"].count == 2
    stages = [r.stage for r in stage_requests(cfg)]
    assert stages == ["reference", "score", "select", "finetune"] + [f"evaluate (vLLM engine {k})" for k in range(1, 5)]
