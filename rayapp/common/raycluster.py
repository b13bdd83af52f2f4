"""Connect to (or start) the Ray cluster a run uses."""

from __future__ import annotations

import os

from rayapp.config import RunConfig


def init_ray(cfg: RunConfig | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # No hub at run time: models and tokenizers come from local folders or the mounted cache.
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    address = (cfg.ray.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # The dashboard process backs Ray's State API (Train's placement-group cleaner uses it); it
    # listens on loopback only, never on a public address.
    kwargs = dict(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                  configure_logging=True, logging_level="WARNING")
    if cfg and cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg and cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)
