"""Connect to (or start) the Ray cluster a run uses."""

from __future__ import annotations

import os

from rayapp.config import RunConfig


def existing_cluster_address(cfg: RunConfig | None) -> str | None:
    """The cluster this run joins (config, else RAY_ADDRESS, which Ray sets inside a job), or
    None when the run starts its own local cluster."""
    return (cfg.ray.address if cfg else None) or os.environ.get("RAY_ADDRESS")


def _return_to_working_dir(cwd: str) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def env_ready() -> bool:
        return True

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ray.get(env_ready.options(scheduling_strategy=here).remote(), timeout=600)
    try:
        unchanged = os.path.samestat(os.stat("."), os.stat(cwd))
    except FileNotFoundError:
        unchanged = False
    if not unchanged and os.path.isdir(cwd):
        os.chdir(cwd)


def init_ray(cfg: RunConfig | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # No hub at run time: models and tokenizers come from local folders or the mounted cache.
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    address = existing_cluster_address(cfg)
    if address:
        # Inside a Ray job, setting up the job's runtime env on the driver's node (after its first
        # ray.init) can unpack the job's working_dir again, deleting the folder the driver runs in
        # and re-creating it at the same path (seen with Ray 2.60). The driver is then left with no
        # current directory: getcwd fails, and oneMKL inside torch aborts the process if it loads
        # then ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). So load torch first, wait
        # until the runtime env is set up on this node, and step back into the re-created folder.
        import torch  # noqa: F401

        cwd = os.getcwd()
        ray.init(address=address, log_to_driver=True)
        if ray.get_runtime_context().runtime_env.get("working_dir"):
            _return_to_working_dir(cwd)
        return
    # The dashboard process backs Ray's State API (Train's placement-group cleaner uses it); it
    # listens on loopback only, never on a public address.
    # address="local": a new cluster for this run, even when `ray start` left one behind on this
    # machine (ray.init() with no address would join that one instead)
    kwargs = dict(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                  configure_logging=True, logging_level="WARNING")
    if cfg and cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg and cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)


def pool_size_leaving_a_cpu(cfg: RunConfig, cpus_per_actor: float, max_actors: int) -> int:
    """Cap an actor pool that reads with Ray Data so one CPU stays free for the read tasks: a
    pool holding every CPU starves them and the dataset never finishes. Only on a local cluster,
    whose size is fixed; on a cluster that autoscales, the current size says nothing."""
    import ray

    if existing_cluster_address(cfg) or cpus_per_actor <= 0:
        return max_actors
    total = ray.cluster_resources().get("CPU", 0)
    fit = max(1, int((total - 1) // cpus_per_actor))
    if fit < max_actors:
        print(f"[ray] {max_actors} actors x {cpus_per_actor:g} CPU would hold all {total:g} CPUs of this local "
              f"cluster and starve Ray Data's reads; using {fit}")
    return min(max_actors, fit)
