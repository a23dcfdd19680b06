"""Connecting to Ray: a cluster when one is named or we run inside a Ray job, else a local Ray;
:func:`ray_session` scopes it to a block (what a block started, it shuts down).

A local Ray's gRPC servers (GCS, raylet, workers) listen on every interface, so a local Ray
keeps Ray's token authentication: the token lives in a file only its owner can read
(``ray.auth_token_path``) and every Ray process of the session, and every client of it, reads
it from there.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray._raylet import AuthenticationTokenLoader
from ray._raylet import Config as RayletConfig

from mirage.config import Config, RayConfig
from mirage.errors import MirageError
from mirage.preflight import check_gpus, gpus_needed

TOKEN_BYTES = 32


@contextmanager
def ray_session(cfg: RayConfig, *, start: bool = True) -> Iterator[None]:
    """Ray for the duration of a ``with`` block; shut down at its end only if this block started it.

    Args:
        cfg: how to join or start Ray (:func:`init_ray`).
        start: join or start Ray on entry; ``False`` leaves that to the first Ray call inside the
            block (a block that needs no Ray then starts none), which is still shut down at its end.

    A session entered while this process is already connected (an enclosing ``ray_session``, a
    test's fixture) joins that Ray and leaves it running. Shutting down a cluster's Ray only
    disconnects this process from the cluster.
    """
    running = ray.is_initialized()
    try:
        if start:
            init_ray(cfg)
        yield
    finally:
        if not running and ray.is_initialized():
            ray.shutdown()


def init_ray(cfg: RayConfig, runtime_env: dict | None = None) -> None:
    """Connect to (or start) Ray once per process.

    ``cfg.address`` names a cluster (``auto``, ``ray://host:10001``); inside a job started by
    ``ray job submit`` the ``RAY_ADDRESS`` variable is set and wins. Otherwise a local Ray
    starts with ``cfg.num_cpus`` logical CPUs (more than the physical cores on small machines,
    so that Tune trials and their Train workers never wait on each other), token
    authentication as ``cfg.auth`` says, and its dashboard bound to 127.0.0.1.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    use_local_auth(cfg)
    ray.init(
        address="local",  # a new Ray, never one a `ray start` on this machine left in /tmp/ray
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )


def use_local_auth(cfg: RayConfig) -> None:
    """Set this process' (and its children's) Ray authentication for a local Ray.

    ``token``: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` = the owner-only token file,
    created when missing. ``disabled``: ``RAY_AUTH_MODE=disabled``.
    """
    if cfg.auth == "disabled":
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    else:
        path = ensure_token_file(Path(cfg.auth_token_path))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
        os.environ.pop("RAY_AUTH_TOKEN", None)  # a token in the environment would win over the file
    _forget_cached_token()


def ensure_token_file(path: Path) -> Path:
    """The token file at ``path``, created with 0600 permissions when missing.

    Raises MirageError when an existing file can be read by its group or others (a token that
    others can read lets them run code as this user) or is empty.
    """
    if not str(path):
        raise MirageError("ray.auth_token_path is empty; expected a file path (run resolve_paths first)")
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise MirageError(
                f"Ray token file {path} has permissions {mode:o}; expected 600 (run `chmod 600 {path}`)"
            ) from None
        if not path.read_text().strip():
            raise MirageError(f"Ray token file {path} is empty; expected a token (delete it to get a new one)")
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(TOKEN_BYTES))
    return path


def _forget_cached_token() -> None:
    """Make Ray's token loader read the token (file) again: it caches the first one it saw."""
    RayletConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster can ever provide.

    The GPUs of its nodes now or, when an autoscaler publishes its node groups, the most those
    groups can scale to, whichever is larger (a cluster scaled to zero GPU workers can still get
    them). Ray must be initialised.
    """
    now = float(ray.cluster_resources().get("GPU", 0.0))
    try:
        from ray._private.state import state

        bound = (state.get_max_resources_from_cluster_config() or {}).get("GPU") or 0
    except Exception:  # noqa: BLE001 - no autoscaler config on this cluster (or an older Ray): nodes only
        bound = 0
    return max(now, float(bound))


def check_cluster_gpus(cfg: Config, use: str) -> None:
    """Fail fast when ``cfg``'s GPU request for ``use`` (``train``, ``extract``, ``serve``, ``predict``)
    exceeds :func:`cluster_gpus`; Ray must be initialised.

    Raises:
        ResourceError: naming the setting, the GPUs requested and the cluster's.
    """
    if gpus_needed(cfg, use) > 0:
        check_gpus(cfg, use, present=cluster_gpus(), where="the Ray cluster")
