"""A single-writer lease on a shared folder that holds across nodes (no ``flock``).

The lease is one file (JSON: owner id, host, pid, process namespace, expiry as Unix seconds)::

    <folder>/.lease

Taking it: the record is written under a temporary name and hard-linked to ``.lease`` (the link
fails if the name exists, so one contender wins even on NFS-like volumes, and nobody reads a
half-written lease; ``O_CREAT | O_EXCL`` where the volume has no hard links), then read back to
confirm the owner. While held, a daemon thread rewrites it with a new
expiry every third of ``seconds``. Another contender may take it over only once it has expired: it
renames the stale file to a name of its own (one rename wins), checks that what it moved is the
stale lease it judged (a fresh lease moved by mistake is linked back), removes it and creates its
own the same way. A lease whose owner ran on this very machine (same host, boot and pid
namespace) and whose process is gone counts as expired at once, so a killed local job is resumed
without waiting; a live or foreign owner is only ever outwaited. An owner whose lease was taken over or lapsed sees it at the next renewal or
:meth:`Lease.check` and must write nothing more. Expiry uses wall clocks: nodes must agree on the
time to well under ``seconds``.
Closing (or dropping) the holder removes the file, if it is still its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

from mirage.atomic import write_bytes
from mirage.errors import MirageError

LEASE = ".lease"
_ATTEMPTS = 8


@dataclass(frozen=True)
class Holder:
    """What a lease file says: who holds it and until when (Unix seconds)."""

    owner: str
    host: str
    pid: int
    expires: float
    space: str = ""
    """Boot id and pid namespace of the owner's process (who may test its pid)."""

    def stale(self, now: float) -> bool:
        """Expired, or owned by a process of this machine that no longer runs."""
        if self.expires <= now:
            return True
        if not self.space or (self.host, self.space) != (socket.gethostname(), process_space()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        left = self.expires - time.time()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires))
        state = f"expires in {left:.1f} s" if left > 0 else f"expired {-left:.1f} s ago"
        return f"host {self.host}, pid {self.pid}, until {when} ({state}; owner {self.owner})"


def read_holder(path: Path, seconds: float) -> Holder | None:
    """The lease at ``path``; None when there is none. A file still being created (not yet JSON)
    counts as held until its modification time plus ``seconds``."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        return Holder(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["expires"]), str(d.get("space", "")))
    except (ValueError, KeyError, TypeError):
        return Holder("?", "?", 0, mtime + seconds)


class Lease:
    """The lease of one folder, held from construction until :meth:`release` (or garbage collection).

    Args:
        folder: the shared folder; the lease file is ``<folder>/.lease``.
        seconds: lease duration; renewed every ``seconds / 3``.
        what: the guarded thing, named in errors.
        error: the MirageError subclass raised when the lease is held by another or lost.
    """

    def __init__(self, folder: str | os.PathLike, seconds: float, what: str, error: type[MirageError] = MirageError):
        if seconds <= 0:
            raise MirageError(f"lease of {what}: duration {seconds} s; expected > 0")
        self.path = Path(folder) / LEASE
        self.seconds, self.what, self.error = float(seconds), what, error
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.expires = 0.0
        self._lost: str | None = None
        self._io = threading.Lock()
        self._acquire()
        self._stop = threading.Event()
        self._release = weakref.finalize(self, _drop, self.path, self.owner, self._stop)
        thread = threading.Thread(
            target=_renew_loop, args=(weakref.ref(self), self._stop, self.seconds / 3),
            name=f"lease-renewer-{self.path}", daemon=True,
        )
        thread.start()

    # --- taking

    def _acquire(self) -> None:
        for _ in range(_ATTEMPTS):
            if self._create():
                got = read_holder(self.path, self.seconds)
                if got is not None and got.owner == self.owner:
                    return
                continue
            holder = read_holder(self.path, self.seconds)
            if holder is None:
                continue  # released meanwhile
            if not holder.stale(time.time()):
                raise self.error(
                    f"{self.what}: another writer holds the lease {self.path} ({holder.describe()}); "
                    "expected one writer at a time (wait for it to finish, or for its lease to expire if it died)"
                )
            self._take_over(holder)
        raise self.error(f"{self.what}: could not take the lease {self.path} after {_ATTEMPTS} contended attempts")

    def _create(self) -> bool:
        """Create the lease file exclusively with this owner's record; False if one exists.

        The record is written and synced under a name of this owner's, then hard-linked to the lease
        name: the link fails when the name exists (exclusive, as ``O_CREAT | O_EXCL``) and a reader
        never sees a half-written lease. Where the volume has no hard links, ``O_CREAT | O_EXCL``.
        """
        expires = time.time() + self.seconds
        tmp = self.path.with_name(f"{LEASE}.new-{self.owner}")
        with open(tmp, "wb") as f:
            f.write(self._record(expires))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this volume
            return self._create_exclusive(expires)
        finally:
            tmp.unlink(missing_ok=True)
        self.expires = expires
        return True

    def _create_exclusive(self, expires: float) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._record(expires))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.expires = expires
        return True

    def _take_over(self, stale: Holder) -> None:
        """Move an expired lease aside; only the contender whose rename moved it removes it."""
        aside = self.path.with_name(f"{LEASE}.stale-{self.owner}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        moved = read_holder(aside, self.seconds)
        if moved is not None and (moved.owner, moved.expires) != (stale.owner, stale.expires):
            with contextlib.suppress(FileExistsError):  # a fresh lease was moved: put it back
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _record(self, expires: float) -> bytes:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "expires": expires,
                           "space": process_space()}).encode()

    # --- holding

    def renew(self) -> bool:
        """Push the expiry ``seconds`` ahead; False (and the lease marked lost) if it was taken or lapsed."""
        with self._io:
            if self._lost is not None:
                return False
            now = time.time()
            current = read_holder(self.path, self.seconds)
            if current is None or current.owner != self.owner:
                self._lost = f"taken over by {current.describe()}" if current else "its file was removed"
                return False
            if now >= self.expires:
                self._lost = f"it expired {now - self.expires:.1f} s before it could be renewed"
                return False
            expires = now + self.seconds
            write_bytes(self.path, self._record(expires))
            self.expires = expires
            return True

    def check(self) -> None:
        """Raise ``error`` unless this owner still holds an unexpired lease (read from the file)."""
        lost = self._verify()
        if lost is not None:
            raise self.error(f"{self.what}: this writer lost its lease {self.path} ({lost}); refusing to write")

    def _verify(self) -> str | None:
        """Why the lease is lost (None while held), checked against the file."""
        with self._io:
            if self._lost is None:
                if not self._release.alive:
                    self._lost = "it was released"
                else:
                    current = read_holder(self.path, self.seconds)
                    if current is None or current.owner != self.owner:
                        self._lost = f"taken over by {current.describe()}" if current else "its file was removed"
                    elif time.time() >= self.expires:
                        self._lost = "it expired before it was renewed"
            return self._lost

    @property
    def held(self) -> bool:
        """Not released, unexpired, and the lease file still names this owner."""
        return self._verify() is None

    @property
    def released(self) -> bool:
        """:meth:`release` ran (or the holder was dropped)."""
        return not self._release.alive

    def release(self) -> None:
        """Stop renewing and remove the lease file if it is still this owner's."""
        self._release()


def process_space() -> str:
    """``<boot id>/<pid namespace>`` of this process ("" where /proc does not tell): two processes
    with one space and one host name see each other's pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _drop(path: Path, owner: str, stop: threading.Event) -> None:
    stop.set()
    current = read_holder(path, 0.0)
    if current is not None and current.owner == owner:
        path.unlink(missing_ok=True)


def _renew_loop(ref: weakref.ref, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        lease = ref()
        if lease is None:
            return
        try:
            if not lease.renew():
                return
        except OSError:
            pass  # a storage hiccup: try again; the lease lapses if it lasts
        del lease
