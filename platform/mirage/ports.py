"""TCP ports for services started on this machine: a free one to pick, a chosen one to check.

A port got by binding port 0 comes from the kernel's ephemeral range, the range every outgoing
connection takes its local port from. Between picking such a port and the service binding it, the
processes started in between (a Ray node opens hundreds of connections) can take it, and the
service fails to bind. ``free_port`` therefore picks outside the ephemeral range and outside Ray's
worker ports, where only an explicit bind can take a port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from mirage.errors import MirageError

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default when the range cannot be read
RAY_WORKER_PORTS = (10002, 19999)  # Ray's default min/max worker port
LOWEST = 20000
HIGHEST = 65535


def ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The kernel's ephemeral port range (low, high), inclusive."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def candidate_ports(ephemeral: tuple[int, int] | None = None) -> list[int]:
    """Ports from ``LOWEST`` to ``HIGHEST`` outside the ephemeral range and Ray's worker ports."""
    low, high = ephemeral or ephemeral_range()
    ray_low, ray_high = RAY_WORKER_PORTS
    return [p for p in range(LOWEST, HIGHEST + 1) if not low <= p <= high and not ray_low <= p <= ray_high]


def bindable(host: str, port: int) -> bool:
    """True when a listening socket can bind ``host:port`` now (``SO_REUSEADDR``, as servers set)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port on ``host`` free now, outside the ranges others pick ports from (see the module doc).

    Falls back to a kernel-chosen port when no candidate range exists (an ephemeral range that
    covers it all) or ``attempts`` random candidates are all taken.
    """
    pool = candidate_ports()
    rng = random.SystemRandom()  # two processes picking at once draw apart
    for port in rng.sample(pool, min(attempts, len(pool))):
        with socket.socket() as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a port in TIME_WAIT is skipped too
            except OSError:
                continue
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int, key: str) -> None:
    """Raise ``MirageError`` naming ``key`` when ``host:port`` cannot be bound (in use, or no such address)."""
    if port and not bindable(host, port):
        raise MirageError(
            f"{key}: cannot listen on {host}:{port}: the port is in use by another process or the "
            f"address is not this machine's; stop that process or choose another port ({key}=<port>)"
        )
