"""The embedded Ray's processes end with their driver, even a SIGKILLed one (Linux).

When the driver dies, Ray's GCS, raylet and monitors go with it (Ray starts them bound to their
parent), but the raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) notice the
raylet's death, then hang reporting it to the GCS, which is gone too: measured here, both were
still alive a minute after the driver was SIGKILLed.

:func:`start`, called just before ``ray.init``, launches this file as a small watcher process
in a session of its own (so a terminal's Ctrl-C or a process-group kill aimed at the driver does
not reach it). It notes, once a second, every process descending from the driver by pid and
start time, except the processes the driver had started before (and theirs): so the Ray's. The
driver holds the write end of a pipe whose read end is the watcher's stdin. When the driver
ends in any way, the pipe closes: the watcher sends SIGTERM to the processes it noted that
still run with the same start time (a reused pid is never signalled), waits ``grace`` seconds,
SIGKILLs what is left and exits; after a clean ``ray.shutdown()`` (or a failed ``ray.init``)
the driver tells it so and it signals nothing. Only descendants of the driver are touched, never
another Ray of the machine; ``ray stop`` is never used. Only the standard library is imported
(the watcher starts in ~50 ms).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0  # how often the watcher notes the driver's descendants
GRACE_S = 2.0  # between SIGTERM and SIGKILL


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a running process, None when it is gone or
    a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _start(pid: int) -> int | None:
    st = _stat(pid)
    return None if st is None else st[1]


def descendants(root: int, skip=()) -> dict[int, int]:
    """pid -> start time of every running process below ``root`` (``root`` excluded), leaving
    out the processes of ``skip`` and everything below them."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and child not in skip:
                found[child] = starts[child]
                todo.append(child)
    return found


def _alive(noted: dict[int, int]) -> list[int]:
    out = []
    for pid, start in noted.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            out.append(pid)
    return out


def reap(noted: dict[int, int], grace: float = GRACE_S) -> list[int]:
    """SIGTERM the noted processes still running (same start time), SIGKILL those left after
    ``grace`` seconds; returns the pids signalled."""
    signalled = _alive(noted)
    for pid in signalled:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(noted):
        time.sleep(0.1)
    for pid in _alive(noted):
        _signal(pid, signal.SIGKILL)
    return signalled


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # gone meanwhile, or not ours to signal
        pass


DONE = b"done\n"  # what the driver writes after a clean shutdown: nothing to reap


def watch(driver: int, before: dict[int, int] | None = None, poll: float = POLL_S) -> list[int]:
    """The watcher's loop (stdin: the pipe from the driver); returns the pids it signalled.
    ``before``: the driver's descendants when it started the watcher (pid -> start time), not
    the Ray's: neither they nor their own descendants are ever signalled."""
    import selectors

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    noted: dict[int, int] = {}
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.buffer, selectors.EVENT_READ)
    received = b""
    skip = {os.getpid()} | {p for p, start in (before or {}).items() if _start(p) == start}
    while True:
        noted.update(descendants(driver, skip=skip))
        if sel.select(timeout=poll):
            data = os.read(sys.stdin.fileno(), 1 << 12)
            received += data
            if not data:  # end of file: the driver closed the pipe or died
                break
    if received.endswith(DONE):
        return []
    return reap(noted)


def start() -> subprocess.Popen | None:
    """Start the watcher of this process (None where /proc is missing: not Linux). Keep the
    returned Popen: its ``stdin`` is the pipe, closed by :func:`stop` or by this process's
    death."""
    if not os.path.isdir("/proc/self"):
        return None
    before = [f"{pid}:{start}" for pid, start in descendants(os.getpid()).items()]
    return subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *before],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """End the watcher after a clean shutdown (it signals nothing)."""
    if proc is None:
        return
    try:
        proc.stdin.write(DONE)
        proc.stdin.close()
        proc.wait(timeout)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    watch(int(sys.argv[1]), dict(tuple(map(int, a.split(":"))) for a in sys.argv[2:]))
