"""Ports for local services: picked outside the ephemeral range, checked before a server starts."""

from __future__ import annotations

import socket
import time

import pytest

from mirage.errors import MirageError
from mirage.ports import RAY_WORKER_PORTS, bindable, candidate_ports, check_port_free, ephemeral_range, free_port


def test_candidates_avoid_the_ephemeral_range_and_rays_worker_ports():
    pool = set(candidate_ports((32768, 60999)))
    assert {20000, 32767, 61000, 65535} <= pool
    assert not pool & set(range(32768, 61000))
    assert not pool & set(range(RAY_WORKER_PORTS[0], RAY_WORKER_PORTS[1] + 1))
    assert candidate_ports((1024, 65535)) == []


def test_free_ports_are_outside_the_kernels_range_and_bindable():
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) > 1  # drawn at random, so two jobs picking at once rarely collide
    for p in ports:
        assert not low <= p <= high and not RAY_WORKER_PORTS[0] <= p <= RAY_WORKER_PORTS[1], p
        assert bindable("127.0.0.1", p)


def test_a_held_port_is_refused_naming_the_key_and_a_released_one_passes():
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        port = held.getsockname()[1]
        assert not bindable("127.0.0.1", port)
        with pytest.raises(MirageError, match=rf"serve.port: cannot listen on 127.0.0.1:{port}: the port is in use"):
            check_port_free("127.0.0.1", port, "serve.port")
    check_port_free("127.0.0.1", port, "serve.port")


def test_serve_on_a_held_port_fails_before_ray_naming_the_port(exported_model, test_cfg, tmp_path, capfd):
    import ray

    from mirage.cli import main

    outputs = tmp_path / "outputs"
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.perf_counter()
        rc = main(["serve", "--model", str(exported_model), "--port", str(port), "--set", f"outputs={outputs}"])
        seconds = time.perf_counter() - t0
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"mirage: error: serve.port: cannot listen on 127.0.0.1:{port}"), err[0]
    assert seconds < 20.0, f"{seconds:.1f} s"
    assert not ray.is_initialized()
    assert not outputs.exists() or not any(outputs.iterdir())
