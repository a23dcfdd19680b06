"""A simulated multi-node Ray cluster on this machine, for tests and benchmarks.

Several raylets share one GCS (``ray.cluster_utils.Cluster``), each its own Ray node with its own
node id, object store and worker processes, as the pods of a KubeRay cluster are:

- the head offers no CPUs or GPUs for work (KubeRay's head has ``num-cpus: 0``); the driver that
  :meth:`SimCluster.connect` attaches runs there, like a job's driver on the head pod;
- worker nodes carry a custom resource named after their group (``{"gpu_group": 1}``,
  ``{"cpu_group": 4}``) standing in for KubeRay worker groups: work that requests the resource
  lands only on that group's nodes;
- :meth:`SimCluster.remove_node` takes a node away the way a lost spot node goes: every process
  of the node is killed at once (SIGKILL), and the GCS marks it dead after its health checks fail
  (``health_check_ms`` x ``health_check_failures``).

Ray's servers listen on the machine's address (Ray resolves 127.0.0.1 to it), so the cluster keeps
the authentication of ``ray.auth`` (:func:`mirage.distributed.cluster.use_local_auth`); dashboards
bind 127.0.0.1. :meth:`SimCluster.shutdown` stops every node and waits until no process it
started, workers included, is left.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from mirage.config import RayConfig
from mirage.distributed.cluster import use_local_auth
from mirage.errors import MirageError
from mirage.ports import free_port

GPU_GROUP = "gpu_group"
CPU_GROUP = "cpu_group"


@dataclass
class SimNode:
    """One worker node: its group (custom resource name), slots of that resource, CPUs and Ray node id."""

    group: str
    slots: float
    cpus: float
    node_id: str
    handle: object = field(repr=False)  # ray._private.node.Node


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process on this machine (from /proc)."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def _descendants(pids: list[int]) -> set[int]:
    """``pids`` and every process below them."""
    tree, seen, todo = _children(), set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += tree.get(pid, [])
    return seen


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def _kill(pids: set[int]) -> None:
    for pid in pids:
        if pid != os.getpid() and _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class SimCluster:
    """A head (no CPUs for work) and worker nodes with group resources, all on this machine.

    Args:
        ray_cfg: authentication of the cluster (``ray.auth``, ``ray.auth_token_path``) and whether
            the head runs a dashboard (``ray.include_dashboard``; Train inside Tune needs it).
        object_store_mb: object store of each node.
        health_check_ms, health_check_failures: the GCS checks each raylet this often and marks it
            dead after this many missed checks in a row (Ray's defaults: 3000 ms, 5).

    Use as a context manager (``with SimCluster(cfg.ray) as sim: ...``) or call :meth:`start`
    and :meth:`shutdown`.
    """

    def __init__(
        self,
        ray_cfg: RayConfig,
        *,
        object_store_mb: int = 100,
        health_check_ms: int = 1000,
        health_check_failures: int = 5,
    ):
        self.ray_cfg = ray_cfg
        self.object_store_mb = object_store_mb
        self.system_config = {
            "health_check_initial_delay_ms": health_check_ms,
            "health_check_period_ms": health_check_ms,
            "health_check_timeout_ms": 2 * health_check_ms,
            "health_check_failure_threshold": health_check_failures,
        }
        self._cluster: Cluster | None = None
        self._nodes: list[SimNode] = []
        self._pids: set[int] = set()  # every process a node of this cluster started, seen so far
        self.head_node_id = ""

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "SimCluster":
        """Start the head: a GCS, a dashboard on 127.0.0.1 and a raylet offering 0 CPUs and 0 GPUs."""
        if self._cluster is not None:
            raise MirageError("SimCluster.start: the cluster is already running")
        use_local_auth(self.ray_cfg)
        self._cluster = Cluster(
            initialize_head=True,
            shutdown_at_exit=True,
            head_node_args={
                "num_cpus": 0,
                "num_gpus": 0,
                "object_store_memory": self.object_store_mb * 2**20,
                "include_dashboard": self.ray_cfg.include_dashboard,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "_system_config": self.system_config,
            },
        )
        self.head_node_id = self._cluster.head_node.node_id
        self._track(self._cluster.head_node)
        return self

    def __enter__(self) -> "SimCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def address(self) -> str:
        """The GCS address (``host:port``) for ``ray.init(address=...)``."""
        return self._running().address

    def connect(self) -> None:
        """Attach this process as the driver, on the head node."""
        if ray.is_initialized():
            raise MirageError("SimCluster.connect: this process is already connected to a Ray (ray.shutdown() first)")
        ray.init(address=self.address, log_to_driver=True)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Disconnect the driver, stop every node and wait (up to ``timeout`` s) until none of their
        processes, Ray workers included, is left; stragglers are killed."""
        if self._cluster is None:
            return
        if ray.is_initialized():
            ray.shutdown()
        for node in [self._cluster.head_node, *self._cluster.worker_nodes]:
            if node is not None:
                self._track(node)
        try:
            self._cluster.shutdown()
        finally:
            self._cluster = None
            self._nodes = []
            self._reap(self._pids, timeout)
            self._pids = set()

    # ----------------------------------------------------------------------- nodes

    def add_node(self, group: str, *, slots: float = 1, cpus: float = 2) -> SimNode:
        """Start a worker node offering ``cpus`` logical CPUs and ``slots`` of the custom resource ``group``.

        Returns when the node is registered with the GCS.
        """
        cluster = self._running()
        handle = cluster.add_node(
            num_cpus=cpus,
            num_gpus=0,
            resources={group: slots},
            object_store_memory=self.object_store_mb * 2**20,
        )
        node = SimNode(group=group, slots=slots, cpus=cpus, node_id=handle.node_id, handle=handle)
        self._nodes.append(node)
        self._track(handle)
        return node

    def remove_node(self, node: SimNode, *, wait_dead: float = 60.0) -> float:
        """Kill every process of ``node`` at once (its raylet, agents and Ray workers), as a lost node goes.

        Waits until the GCS reports the node dead (at most ``wait_dead`` s) and returns the seconds
        that took.

        Raises:
            MirageError: ``node`` is not a live node of this cluster, or the GCS still reports it
                alive after ``wait_dead`` s.
        """
        cluster = self._running()
        if node not in self._nodes:
            raise MirageError(f"SimCluster.remove_node: {node.node_id} is not a live worker node of this cluster")
        t0 = time.monotonic()
        victims = _descendants(self._node_pids(node.handle))
        _kill(victims)  # workers and raylet together, none left to shut the others down
        cluster.remove_node(node.handle, allow_graceful=False)
        self._nodes.remove(node)
        self._reap(victims, 10.0)
        while node.node_id in self.alive_node_ids():
            if time.monotonic() - t0 > wait_dead:
                raise MirageError(
                    f"SimCluster.remove_node: the GCS still reports node {node.node_id} alive {wait_dead:g} s after "
                    "its processes were killed"
                )
            time.sleep(0.2)
        return time.monotonic() - t0

    def nodes(self, group: str | None = None) -> list[SimNode]:
        """Live worker nodes, of ``group`` only when given, in the order they were added."""
        return [n for n in self._nodes if group is None or n.group == group]

    def node(self, node_id: str) -> SimNode:
        """The live worker node with Ray node id ``node_id``.

        Raises:
            MirageError: no live worker node has that id (the head, a removed node).
        """
        for n in self._nodes:
            if n.node_id == node_id:
                return n
        raise MirageError(f"SimCluster.node: {node_id} is not a live worker node (head: {self.head_node_id})")

    def alive_node_ids(self) -> set[str]:
        """Node ids the GCS reports alive (the head included)."""
        return {n["NodeID"] for n in self._running().global_state.node_table() if n["Alive"]}

    # -------------------------------------------------------------------- internals

    def _running(self) -> Cluster:
        if self._cluster is None:
            raise MirageError("SimCluster: the cluster is not running (call start() or use it in a with block)")
        return self._cluster

    @staticmethod
    def _node_pids(handle) -> list[int]:
        return [
            info.process.pid
            for infos in handle.all_processes.values()
            for info in infos
            if info.process is not None
        ]

    def _track(self, handle) -> None:
        """Remember the processes of a node and their children (Ray workers start under the raylet)."""
        self._pids |= _descendants(self._node_pids(handle))

    @staticmethod
    def _reap(pids: set[int], timeout: float) -> None:
        """Wait until every process in ``pids`` has exited; kill those left after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill(pids)
