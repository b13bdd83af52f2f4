"""Connect to (or start) the Ray cluster a run uses."""

from __future__ import annotations

import logging
import os
import threading

from rayapp.config import RunConfig
from rayapp.core.log import current_level, get_logger

log = get_logger("rayapp.ray")


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
    step_back_into(cwd)


def step_back_into(cwd: str) -> None:
    """chdir to ``cwd`` if this process's current directory is no longer that folder (it was
    deleted and unpacked again at the same path)."""
    try:
        unchanged = os.path.samestat(os.stat("."), os.stat(cwd))
    except FileNotFoundError:
        unchanged = False
    if not unchanged and os.path.isdir(cwd):
        os.chdir(cwd)


# The cluster a run's own process started, for its step processes to join (``raycluster``). Not
# RAY_ADDRESS: that one means "a cluster this run joined", where pools are sized differently.
RUN_CLUSTER_ENV = "RAYAPP_RUN_CLUSTER"
# The folder `rayapp run` was started in, for the step processes to start in. Inside a Ray job
# that folder is the job's working_dir, which Ray may delete and unpack again when a driver ends
# and another starts on the node (see raycluster._init_ray): its path, not the process's current
# directory, is what stays valid.
RUN_DIR_ENV = "RAYAPP_RUN_DIR"

_INIT_LOCK = threading.Lock()


def init_ray(cfg: RunConfig | None = None) -> None:
    with _INIT_LOCK:  # stages of one step may start side by side
        _init_ray(cfg)


def _init_ray(cfg: RunConfig | None) -> None:
    import ray

    if ray.is_initialized():
        return  # one Ray session serves every stage of a run
    # Hub access follows the environment (HF_HUB_OFFLINE): the embedded default needs no hub, the
    # paper presets name hub models, and a cluster image may pre-fill the cache and set it to 1.
    verbose = current_level() <= logging.DEBUG
    address = existing_cluster_address(cfg)
    if address:
        # Inside a Ray job, setting up the job's runtime env on the driver's node (after its first
        # ray.init) can unpack the job's working_dir again, deleting the folder the driver runs in
        # and re-creating it at the same path (seen with Ray 2.60). The driver is then left with no
        # current directory: getcwd fails, and oneMKL inside torch aborts the process if it loads
        # then ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). So load torch first, wait
        # until the runtime env is set up on this node, and step back into the re-created folder.
        import torch  # noqa: F401

        cwd = os.environ.get(RUN_DIR_ENV) or os.getcwd()  # a step's process: its run's folder
        ray.init(address=address, log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")
        if ray.get_runtime_context().runtime_env.get("working_dir"):
            _return_to_working_dir(cwd)
        _quiet_ray_libraries(verbose)
        return
    if os.environ.get(RUN_CLUSTER_ENV):  # a step of `rayapp run`, in a driver process of its own
        ray.init(address=os.environ[RUN_CLUSTER_ENV], log_to_driver=verbose,
                 logging_level="INFO" if verbose else "ERROR")
        _quiet_ray_libraries(verbose)
        return
    # The dashboard process backs Ray's State API (Train's placement-group cleaner uses it); it
    # listens on loopback only, never on a public address.
    # address="local": a new cluster for this run, even when `ray start` left one behind on this
    # machine (ray.init() with no address would join that one instead)
    # Worker output (training workers, actors) reaches the terminal with -v only; their progress
    # comes back as rayapp's own progress lines, and errors as exceptions.
    kwargs = dict(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose,
                  configure_logging=True, logging_level="INFO" if verbose else "ERROR")
    if cfg and cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg and cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    if cfg and cfg.ray.resources:
        kwargs["resources"] = dict(cfg.ray.resources)
    ray.init(**kwargs)
    _quiet_ray_libraries(verbose)


def _quiet_ray_libraries(verbose: bool) -> None:
    """Ray Data and Train log every dataset plan, worker group and (off a terminal) a progress
    snapshot every few seconds at INFO. Unless -v: Ray Data's progress bars stay on a terminal
    (rayapp draws its own progress lines elsewhere), and those INFO lines go."""
    if verbose:
        return
    import sys

    import ray.data

    ctx = ray.data.DataContext.get_current()
    if not sys.stdout.isatty():
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.tune", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
        log.info("%d actors x %g CPU would hold all %g CPUs of this local cluster and starve Ray Data's reads; "
                 "using %d", max_actors, cpus_per_actor, total, fit)
    return min(max_actors, fit)
