"""The store's single-writer lease: one of two processes wins, a stale lease is taken over, renewal
keeps a long writer's lease, and a writer whose lease was taken over commits nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mirage.config import load_config
from mirage.errors import FeatureStoreError, MirageError
from mirage.features.lease import LEASE, Lease, read_holder
from mirage.features.store import FeatureStore, StoreWriter

CONTENDER = textwrap.dedent("""
    import os, sys, time
    from mirage.errors import MirageError
    from mirage.features.lease import Lease
    folder, go = sys.argv[1], sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        lease = Lease(folder, 5.0, "the test folder")
    except MirageError as e:
        print("lost", e, flush=True)
    else:
        print("won", os.getpid(), flush=True)
        time.sleep(1.5)
        lease.release()
""")


def test_two_processes_one_wins_and_the_loser_is_told_who_holds_it(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), str(go)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(1.0)  # both are importing and then polling for the start signal
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    won = [o for o in outs if o.startswith("won")]
    lost = [o for o in outs if o.startswith("lost")]
    assert len(won) == 1 and len(lost) == 1, outs
    winner_pid = won[0].split()[1]
    assert f"pid {winner_pid}" in lost[0] and f"host {socket.gethostname()}" in lost[0] and "until" in lost[0]
    assert not (tmp_path / LEASE).exists()  # released by the winner


def _plant(folder: Path, host: str, pid: int, expires: float) -> None:
    (folder / LEASE).write_text(json.dumps({"owner": "someone", "host": host, "pid": pid, "expires": expires}))


def test_a_live_foreign_lease_is_refused_and_an_expired_one_taken_over(tmp_path):
    _plant(tmp_path, "gpu-node-7", 4242, time.time() + 30)
    with pytest.raises(MirageError, match="host gpu-node-7, pid 4242, until .*expires in"):
        Lease(tmp_path, 5.0, "the test folder")
    _plant(tmp_path, "gpu-node-7", 4242, time.time() - 1)  # its owner died a lease period ago
    lease = Lease(tmp_path, 5.0, "the test folder")
    holder = read_holder(tmp_path / LEASE, 5.0)
    assert holder.owner == lease.owner and holder.pid == os.getpid() and holder.expires > time.time()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE]  # the stale one is gone, not set aside
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_a_killed_local_owner_is_taken_over_without_waiting(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from mirage.features.lease import Lease
        lease = Lease(sys.argv[1], 600.0, "the test folder")
        print("held", flush=True)
        time.sleep(600)
    """), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MirageError, match=f"pid {holder.pid}"):
            Lease(tmp_path, 5.0, "the test folder")  # alive: refused
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert read_holder(tmp_path / LEASE, 5.0).expires > time.time() + 500  # far from expiry
    lease = Lease(tmp_path, 5.0, "the test folder")  # its process is gone: stale at once
    assert read_holder(tmp_path / LEASE, 5.0).owner == lease.owner
    lease.release()


def test_renewal_keeps_a_long_writer_lease_past_its_period(tmp_path):
    lease = Lease(tmp_path, 1.5, "the test folder")  # renewed every 0.5 s: a 1 s stall of this process is tolerated
    first = lease.expires
    time.sleep(5.0)  # more than three lease periods
    assert lease.held and lease.expires > first + 3.0
    assert read_holder(tmp_path / LEASE, 1.5).expires > time.time()
    with pytest.raises(MirageError, match="another writer holds the lease"):
        Lease(tmp_path, 1.5, "the test folder")
    lease.check()
    lease.release()


def test_dropping_the_writer_releases_its_lease(tmp_path):
    Lease(tmp_path, 5.0, "the test folder")  # dropped at once, as a writer that is never closed
    assert not (tmp_path / LEASE).exists()
    Lease(tmp_path, 5.0, "the test folder").release()


STALLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from mirage.config import load_config
    from mirage.features.store import StoreWriter
    cfg = load_config("demo", [f"features.store={sys.argv[1]}", "features.lease_seconds=1.0"]).features
    w = StoreWriter(cfg)
    w.write("a", np.zeros((2, 3, 2, 4), np.float16))
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        w.write("b", np.ones((2, 3, 2, 4), np.float16))
        print("committed", flush=True)
    except Exception as e:
        print("refused", e, flush=True)
""")


def test_a_writer_whose_lease_was_taken_over_commits_nothing(tmp_path):
    store = tmp_path / "store"
    old = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(store)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert old.stdout.readline().strip() == "ready"
        cfg = load_config("demo", [f"features.store={store}", "features.lease_seconds=1.0"]).features
        with pytest.raises(FeatureStoreError, match=f"pid {old.pid}"):
            StoreWriter(cfg)
        os.kill(old.pid, signal.SIGSTOP)  # frozen (a paused node): its renewals stop
        time.sleep(1.6)
        new = StoreWriter(cfg)  # expired: taken over
        new.write("c", np.full((2, 3, 2, 4), 2, np.float16))
        os.kill(old.pid, signal.SIGCONT)
        out, _ = old.communicate("go\n", timeout=60)
    finally:
        old.kill()
    assert out.startswith("refused") and "lost its lease" in out and f"pid {os.getpid()}" in out, out
    new.close()
    s = FeatureStore(new.root)
    assert s.stimuli() == ["a", "c"] and s.verify() == {} and not s.path("b").exists()
