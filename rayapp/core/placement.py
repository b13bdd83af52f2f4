"""Where each stage's Ray work runs: one placement object per stage, built from the config once.

The Ray call that starts the work (the actor pools of score, select's embedding and evaluate, Ray
Train's workers, vLLM's engines), `rayapp plan` (which GPU, so how much memory) and
`rayapp check-cluster` (does a node type hold it) all read the same object, so they cannot
disagree about what is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How a group of bundles is placed. ANY: no placement group, each actor wherever it fits.
ANY = "ANY"


@dataclass(frozen=True)
class Placement:
    """What one stage asks Ray for.

    ``bundle`` is one actor's, one training worker's, or one engine GPU's request: CPU, GPU and
    the node-type label (a custom resource, one unit per GPU in cluster/). ``count`` bundles make
    a group, placed by ``strategy`` (STRICT_PACK: one node); ``groups`` such groups are asked for
    (vLLM: one placement group per engine; otherwise 1). Actor pools start with ``min_count``."""

    stage: str
    kind: str  # "actor pool", "Ray Train workers", "vLLM engines"
    bundle: dict[str, float]
    count: int
    groups: int = 1
    strategy: str = ANY
    accelerator_type: str | None = None
    min_count: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def cpus(self) -> float:
        return float(self.bundle.get("CPU", 0))

    @property
    def gpus(self) -> float:
        return float(self.bundle.get("GPU", 0))

    @property
    def labels(self) -> dict[str, float]:
        """The custom resources of one bundle: the node-type label stages pin to."""
        return {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}

    def label(self) -> str | None:
        """The node-type label, if the stage names one (cluster.gpu_memory_gib_by_resource keys)."""
        return next(iter(self.labels), None)

    def ray_bundle(self) -> dict[str, float]:
        """One bundle as Ray schedules it: the accelerator type is a resource of 0.001 that every
        node with that GPU type carries (what Ray adds for ``accelerator_type=``)."""
        out = {k: v for k, v in self.bundle.items() if v}
        if self.accelerator_type and self.gpus:
            out[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return out

    def actor_options(self) -> dict:
        """Keyword arguments of Ray Data's ``map_batches`` (and ``.options``) for one actor."""
        return dict(num_cpus=self.cpus, num_gpus=self.gpus, resources=self.labels or None,
                    accelerator_type=self.accelerator_type if self.gpus else None)

    def train_scaling(self, use_gpu: bool, num_workers: int) -> dict:
        """``ray.train.ScalingConfig`` arguments (Ray Train adds the GPU itself from use_gpu)."""
        per_worker = {k: v for k, v in self.bundle.items() if k != "GPU"}
        if use_gpu:
            per_worker["GPU"] = self.gpus
        return dict(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                    accelerator_type=self.accelerator_type, placement_strategy=self.strategy)

    def vllm_placement_group(self) -> dict | None:
        """ray.data.llm's ``placement_group_config`` for one engine, or None for its default.

        With tensor parallelism ray.data.llm starts the engine actor itself with num_gpus=0 and
        Ray Data's default of one CPU inside this placement group, so every bundle carries a CPU:
        a bundle of GPU and label alone cannot hold the engine actor, and Ray refuses it ("the
        resource request {'CPU': 1, 'GPU': 0} cannot fit into any bundles")."""
        if not self.labels and self.count == 1:
            return None
        return {"bundle_per_worker": dict(self.bundle), "strategy": self.strategy}

    def describe(self) -> str:
        """One line for people: '8 x {CPU: 8, GPU: 1, gpu_8x: 1} on one node (STRICT_PACK)'."""
        shown = "{" + ", ".join(f"{k}: {v:g}" for k, v in self.ray_bundle().items()) + "}"
        where = {"STRICT_PACK": " on one node (STRICT_PACK)", ANY: ""}.get(self.strategy, f" ({self.strategy})")
        if self.groups > 1:
            return f"{self.groups} {self.kind} x {self.count} x {shown}{where}"
        return f"{self.count} x {shown}{where}"

    def as_dict(self) -> dict:
        return {"stage": self.stage, "kind": self.kind, "bundle": self.ray_bundle(), "count": self.count,
                "groups": self.groups, "strategy": self.strategy, "accelerator_type": self.accelerator_type}


def actor_pool(stage: str, res, count: int | None = None) -> Placement:
    """An actor pool of ``res`` (a ResourcesConfig): score, select's embedding, hf generation."""
    bundle = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    return Placement(stage, "actor pool", bundle, count or res.max_actors, strategy=ANY,
                     accelerator_type=res.accelerator_type, min_count=res.min_actors)


def training(stage: str, tc) -> Placement | None:
    """Ray Train's workers of a TrainConfig; None in local mode (no workers: the driver trains)."""
    if tc.num_workers == 0:
        return None
    bundle = {"CPU": tc.cpus_per_worker, "GPU": tc.gpus_per_worker if tc.use_gpu else 0,
              **tc.resources_per_worker}
    return Placement(stage, "Ray Train workers", bundle, tc.num_workers, strategy=tc.placement_strategy,
                     accelerator_type=tc.accelerator_type)


def vllm_engines(stage: str, gen) -> Placement:
    """vLLM engines: each a placement group of one bundle per tensor-parallel GPU."""
    res = gen.resources
    bundle = {"CPU": max(1.0, res.num_cpus), "GPU": 1, **res.resources}
    return Placement(stage, "vLLM engines", bundle, gen.tensor_parallel_size, groups=res.max_actors,
                     strategy=gen.placement_strategy, accelerator_type=res.accelerator_type)


def generation(gen) -> Placement:
    """The evaluation's generators: vLLM engines, or an actor pool of the hf generator."""
    if gen.backend == "vllm":
        return vllm_engines("evaluate", gen)
    return actor_pool("evaluate", gen.resources)


def embedding(cfg) -> Placement:
    """select's sentence-embedding pool: it runs on the scoring pool's resources."""
    return actor_pool("select", cfg.score.resources)


def scoring(cfg) -> Placement | None:
    """None when score.local: the driver scores, no actors."""
    return None if cfg.score.local else actor_pool("score", cfg.score.resources)


def preparing(cfg) -> Placement | None:
    """prepare's Ray Data tasks and tokenizer actors (data.workers), one CPU each; None: the driver."""
    if not cfg.data.workers:
        return None
    return Placement("prepare", "Ray Data tasks", {"CPU": 1}, cfg.data.workers, strategy=ANY)


def selecting(cfg) -> Placement | None:
    """select's Ray Data tasks (select.workers), one CPU each; None: select chooses in its process."""
    if not cfg.select.workers:
        return None
    return Placement("select", "Ray Data tasks", {"CPU": 1}, cfg.select.workers, strategy=ANY)
