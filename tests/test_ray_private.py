"""A local Ray started by the platform keeps token authentication on every port it opens.

Ray's gRPC servers (GCS, raylet, core workers, dashboard agent) listen on every interface, so
the test starts the platform's local Ray in a child process, lists the TCP ports its processes
listen on, and calls each one on the machine's own (non-loopback) address: without the token
every call is refused, with the token the same calls succeed. Ray's Prometheus exporters (node,
autoscaler, dashboard metrics) also listen on every interface and answer a GET with counters; they
have no handler that runs code, and Ray binds them to loopback only for a node whose IP is loopback,
which ``ray.init`` never uses.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import grpc
import pytest

from mirage.config import load_config, resolve_paths
from mirage.distributed.cluster import ensure_token_file, use_local_auth
from mirage.errors import MirageError

pytestmark = pytest.mark.skipif(not os.path.exists("/proc"), reason="lists sockets through /proc and ss")

# Starts the local Ray exactly as every command does, runs one task, prints what listens, waits.
CHILD = textwrap.dedent(
    """
    import json, os, re, subprocess, sys
    import ray
    from mirage.config import load_config, resolve_paths
    from mirage.distributed.cluster import init_ray

    cfg = resolve_paths(load_config("demo", [f"outputs={sys.argv[1]}", "ray.num_cpus=2",
                                             "ray.include_dashboard=false"]))
    init_ray(cfg.ray)
    ray.get(ray.remote(lambda: 1).remote())
    parent = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    mine, grown = {os.getpid()}, True
    while grown:
        new = {p for p, q in parent.items() if q in mine} - mine
        mine |= new
        grown = bool(new)
    ports = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        if {int(x) for x in re.findall(r"pid=(\\d+)", line)} & mine:
            ports.append([line.split()[3], re.findall(r'"([^"]+)"', line)[0]])
    node = ray._private.worker.global_worker.node
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    metrics = [node.metrics_export_port, AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT]
    print(json.dumps({"ip": node.node_ip_address, "ports": ports, "metrics_ports": metrics,
                      "token": os.environ["RAY_AUTH_TOKEN_PATH"]}), flush=True)
    sys.stdin.read()
    """
)


def _grpc_calls():
    """One read-only call per Ray gRPC service: name -> call(channel, metadata)."""
    from ray.core.generated import core_worker_pb2 as cw
    from ray.core.generated import core_worker_pb2_grpc as cwg
    from ray.core.generated import gcs_service_pb2 as gcs
    from ray.core.generated import gcs_service_pb2_grpc as gcsg
    from ray.core.generated import node_manager_pb2 as nm
    from ray.core.generated import node_manager_pb2_grpc as nmg
    from ray.core.generated import reporter_pb2 as rp
    from ray.core.generated import reporter_pb2_grpc as rpg

    return {
        "gcs": lambda ch, md: gcsg.NodeInfoGcsServiceStub(ch).GetAllNodeInfo(
            gcs.GetAllNodeInfoRequest(), timeout=5, metadata=md),
        "raylet": lambda ch, md: nmg.NodeManagerServiceStub(ch).GetNodeStats(
            nm.GetNodeStatsRequest(), timeout=5, metadata=md),
        "worker": lambda ch, md: cwg.CoreWorkerServiceStub(ch).GetCoreWorkerStats(
            cw.GetCoreWorkerStatsRequest(), timeout=5, metadata=md),
        "agent": lambda ch, md: rpg.LogServiceStub(ch).ListLogs(
            rp.ListLogsRequest(glob_filter="*"), timeout=5, metadata=md),
    }


def _answers(target: str, metadata) -> dict[str, str]:
    """Status code name of each service call on ``target`` (UNIMPLEMENTED: not that service)."""
    out = {}
    with grpc.insecure_channel(target) as ch:
        for name, call in _grpc_calls().items():
            try:
                call(ch, metadata)
                out[name] = "OK"
            except grpc.RpcError as e:
                out[name] = e.code().name
    return out


def _http_get(url: str) -> tuple[int, str]:
    """Status code and content type of an anonymous GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", "")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    out = tmp_path_factory.mktemp("private")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "disabled"  # the platform's configuration must win over the environment
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the local Ray did not start (exit {proc.poll()})"
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_no_ray_port_answers_without_the_token(local_ray):
    ip, token = local_ray["ip"], open(local_ray["token"]).read().strip()
    assert not ip.startswith("127."), "the machine has no non-loopback address to test on"
    exposed = [(addr.rsplit(":", 1)[1], proc) for addr, proc in local_ray["ports"]
               if not re.match(r"127\.|\[::1\]", addr)]
    assert len(exposed) >= 4, local_ray["ports"]  # GCS, raylet, driver and worker at least
    served = set()
    for port, proc in exposed:
        target = f"{ip}:{port}"
        anonymous = _answers(target, None)
        assert "OK" not in anonymous.values(), f"{proc} on {target} answered without a token: {anonymous}"
        if set(anonymous.values()) == {"UNAVAILABLE"}:  # not gRPC: an HTTP server
            status, kind = _http_get(f"http://{target}/")
            if int(port) in local_ray["metrics_ports"]:
                # Prometheus exporters (node, autoscaler, dashboard): GET of counters, no handler that runs code
                assert status == 200 and kind.startswith("text/plain"), f"{proc} on {target}: {status} {kind}"
                continue
            assert status in (401, 403), f"{proc} on {target} (ports {local_ray['ports']}): HTTP {status}"
            continue
        with_token = _answers(target, [("authorization", f"Bearer {token}")])
        for name, code in anonymous.items():
            if code != "UNIMPLEMENTED":
                assert code == "UNAUTHENTICATED", f"{proc} on {target}: {name} -> {code}"
                assert with_token[name] == "OK", f"{proc} on {target}: {name} with the token -> {with_token[name]}"
                served.add(name)
    assert {"gcs", "raylet", "worker", "agent"} <= served


@pytest.mark.slow
def test_token_file_is_owner_only(local_ray):
    mode = stat.S_IMODE(os.stat(local_ray["token"]).st_mode)
    assert mode == 0o600
    assert len(open(local_ray["token"]).read().strip()) == 64


def test_token_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "auth_token"
    ensure_token_file(path)
    first = path.read_text()
    assert ensure_token_file(path) == path and path.read_text() == first  # reused, not regenerated
    path.chmod(0o644)
    with pytest.raises(MirageError, match=r"permissions 644; expected 600"):
        ensure_token_file(path)


def test_auth_setting_follows_the_config(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    cfg = resolve_paths(load_config("demo", [f"outputs={tmp_path}"]))
    assert cfg.ray.auth_token_path == str(tmp_path / ".ray" / "auth_token")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    use_local_auth(cfg.ray)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == cfg.ray.auth_token_path
    use_local_auth(cfg.with_overrides({"ray.auth": "disabled"}).ray)
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in os.environ
