"""The output directory's lease: one driver at a time writes into an output directory.

A driver creates ``_lease.json`` exclusively (:meth:`OutputDir.create_exclusive`) before it
looks at what the directory holds, refreshes its heartbeat while it runs and removes it at the
end. A second driver finds the lease and stops with exit code 2, naming the holder. A lease is
stale, and taken over, when its holder is a dead process on this host, or when its heartbeat is
older than ``output.lease_timeout_s`` (a driver on another host that died: its lease cannot be
checked otherwise). So a killed driver's re-run resumes at once on the same host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from pipeline.output.manifest import CorruptFileError, OutputDir

log = logging.getLogger(__name__)

LEASE = "_lease.json"


class LeaseError(RuntimeError):
    """Another run holds the output directory, or this run lost its lease."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class OutputLease:
    """The lease of ``out`` for this process; ``timeout_s``: when another host's lease whose
    heartbeat is older counts as stale."""

    def __init__(self, out: OutputDir, timeout_s: float):
        self.out, self.timeout_s = out, timeout_s
        self.token = uuid.uuid4().hex
        self.held = False

    def _body(self, started: float) -> dict:
        return {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": started,
            "heartbeat": time.time(),
        }

    def _encode(self, body: dict) -> bytes:
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    def acquire(self) -> None:
        """Take the lease, taking over a stale one; :class:`LeaseError` when it is held."""
        self.started = time.time()
        for _ in range(2):
            if self.out.create_exclusive(LEASE, self._encode(self._body(self.started))):
                self.held = True
                return
            holder = self._holder()
            why = self._stale(holder)
            if why is None:
                raise LeaseError(
                    f"{self.out.display()} is being written by another run ({_describe(holder)}). "
                    "Wait for it to finish or use another output.dir. If that run is dead, its "
                    f"lease expires {self.timeout_s:g} s after its last heartbeat "
                    f"(output.lease_timeout_s), or remove {self.out.display(LEASE)}"
                )
            log.warning("taking over the stale lease of %s: %s", self.out.display(), why)
            self.out.remove(LEASE)
        raise LeaseError(f"could not take the lease {self.out.display(LEASE)}: another run did")

    def _holder(self) -> dict | None:
        try:
            return self.out.read_json(LEASE)
        except (CorruptFileError, FileNotFoundError):
            return None

    def _stale(self, holder: dict | None) -> str | None:
        """Why the holder's lease is stale, or None when it may still be running."""
        if holder is None:
            return "the lease file is empty or damaged"
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return f"its driver (pid {holder.get('pid')}) is no longer running"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.timeout_s:
            limit = f"output.lease_timeout_s={self.timeout_s:g}"
            return f"its last heartbeat is {age:.0f} s old ({limit})"
        return None

    def refresh(self) -> None:
        """Renew the heartbeat; :class:`LeaseError` if another run has taken the lease."""
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            self.held = False
            raise LeaseError(
                f"lost the lease of {self.out.display()} to another run ({_describe(holder)}): "
                "stopping so the two runs do not mix records"
            )
        self.out.write_bytes(LEASE, self._encode(self._body(self.started)))

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("token") == self.token:
                self.out.remove(LEASE)
            self.held = False


def _describe(holder: dict | None) -> str:
    if not holder:
        return "unknown holder"
    age = time.time() - float(holder.get("heartbeat", 0))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, last heartbeat {age:.0f} s ago"
