"""Connecting to Ray: a cluster when one is named or we run inside a Ray job, else a local Ray."""

from __future__ import annotations

import os

from mirage.config import RayConfig


def init_ray(cfg: RayConfig, runtime_env: dict | None = None) -> None:
    """Connect to (or start) Ray once per process.

    ``cfg.address`` names a cluster (``auto``, ``ray://host:10001``); inside a job started by
    ``ray job submit`` the ``RAY_ADDRESS`` variable is set and wins. Otherwise a local Ray
    starts with ``cfg.num_cpus`` logical CPUs (more than the physical cores on small machines,
    so that Tune trials and their Train workers never wait on each other) and its dashboard
    bound to 127.0.0.1.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray on 127.0.0.1
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )
