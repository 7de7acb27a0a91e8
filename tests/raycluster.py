"""A real multi-node Ray cluster on loopback for tests: ``ray start --head`` and ``ray start
--address=...`` processes with their own ports, temp dir and auth token (token authentication
on), driven the way users drive a cluster: through ``jobs/submit.sh`` and ``jobs/validate.sh``.

Every node is a ``ray start --block`` process started here; its processes (GCS, raylet,
dashboard, workers, job drivers) are its descendants and are killed by pid on shutdown (never
``ray stop``, which would also stop the tests' own local Ray). :func:`shared_cluster` gives one
cluster per pytest session, shared by the test modules that need it and shut down at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: ray CLI, python
# Ray's failure detection, tightened so a vanished node is noticed in seconds (defaults ~15 s+).
SYSTEM_CONFIG = '{"health_check_period_ms": 500, "health_check_failure_threshold": 3}'


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ppids() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            out[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p == pid and not os.path.exists(f"/proc/{pid}"):
            continue
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cmdline(pid: int) -> list[str]:
    """The process's argv ([] if it is gone); Ray workers show their title (``ray::...``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are gone
    except OSError:
        return False


class Node:
    def __init__(self, proc: subprocess.Popen, log: Path, head: bool):
        self.proc, self.log, self.head = proc, log, head

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> list[int]:
        """Pids of the ``ray start`` process and all its descendants."""
        return descendants(self.proc.pid) if self.alive else []

    def find(self, predicate) -> list[int]:
        """Pids of this node's processes whose argv satisfies ``predicate``."""
        return [p for p in self.processes() if predicate(cmdline(p))]


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LocalCluster:
    """Head + worker nodes on 127.0.0.1. ``job_address`` is the job server's http address."""

    def __init__(self, head_cpus: float = 1, env: dict | None = None):
        # short temp dir: Ray's unix socket paths must stay under ~107 characters
        self.root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.token_file = self.root / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "PYTEST_")) or k == "RAY_USAGE_STATS_ENABLED"
        }
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            **(env or {}),
        )
        self.nodes: list[Node] = []
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.job_address = f"http://127.0.0.1:{self.dashboard_port}"
        self._start(head=True, num_cpus=head_cpus)

    def _start(self, head: bool, num_cpus: float) -> Node:
        p = free_ports(8)
        args = [
            str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats",
            f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}",
            f"--dashboard-agent-listen-port={p[2]}", f"--dashboard-agent-grpc-port={p[3]}",
            f"--metrics-export-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
            "--object-store-memory=100000000",
        ]  # fmt: skip
        if head:
            args += [
                "--head", f"--port={self.gcs_port}", f"--temp-dir={self.root}",
                f"--ray-client-server-port={p[6]}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--system-config={SYSTEM_CONFIG}",
            ]  # fmt: skip
        else:
            args += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = self.root / f"node-{len(self.nodes)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                args, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(proc, log, head)
        self.nodes.append(node)
        return node

    def add_worker(self, num_cpus: float = 1, timeout: float = 90) -> Node:
        """Start a worker node and wait until the cluster counts it alive (a second try if
        `ray start` gives up: it waits at most 30 s for its raylet, short on a loaded machine)."""
        for attempt in (1, 2):
            before = self.alive_node_ids()
            node = self._start(head=False, num_cpus=num_cpus)
            try:
                self._wait(lambda known=before: self.alive_node_ids() - known, timeout, node)
                return node
            except RuntimeError:
                if attempt == 2:
                    raise
                self.remove_node(node)
        raise AssertionError("unreachable")

    def wait_for_head(self, timeout: float = 90) -> None:
        self._wait(self.alive_node_ids, timeout, self.nodes[0])

    def _wait(self, predicate, timeout: float, node: Node) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if not node.alive:
                raise RuntimeError(f"ray start failed: {node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray node not up after {timeout} s; see {node.log}")
            time.sleep(0.5)

    def alive_node_ids(self) -> set[str]:
        """Ids of the nodes the cluster (its GCS, through the state API) counts as alive; empty
        until the job server answers."""
        req = urllib.request.Request(
            f"{self.job_address}/api/v0/nodes?limit=1000",
            headers={"Authorization": f"Bearer {self.token_file.read_text()}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                nodes = json.load(r)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return set()
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def workers(self) -> list[Node]:
        return [n for n in self.nodes if not n.head and n.alive]

    def ensure_workers(self, n: int = 1, num_cpus: float = 1) -> None:
        """At least ``n`` live worker nodes (after a test removed one)."""
        while len(self.workers()) < n:
            self.add_worker(num_cpus)

    def remove_node(self, node: Node) -> None:
        """The node vanishes: SIGKILL its ``ray start``, raylet, workers and all."""
        procs = node.processes()
        _kill(procs, signal.SIGKILL)
        node.proc.wait(timeout=30)
        _gone(procs, timeout=10)

    def stray_processes(self) -> list[int]:
        """Pids of processes of this cluster no longer under a ``ray start`` (reparented when
        one died): their command lines name this cluster's own temp dir."""
        root = str(self.root)
        return [
            int(p) for p in os.listdir("/proc") if p.isdigit() and root in " ".join(cmdline(int(p)))
        ]

    def find(self, predicate) -> list[int]:
        return [p for node in self.nodes for p in node.find(predicate)]

    def run_script(self, script: str, *args: str, env: dict | None = None, timeout: float = 240):
        """Run jobs/<script> against this cluster; returns the CompletedProcess (text output)."""
        return subprocess.run(
            [str(ROOT / "jobs" / script), *args],
            env={**self.env, "RAY_ADDRESS": self.job_address, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen_script(self, script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [str(ROOT / "jobs" / script), *args],
            env={**self.env, "RAY_ADDRESS": self.job_address, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def shutdown(self) -> None:
        """Stop every node: SIGTERM each ``ray start`` (it stops its processes), then SIGKILL
        whatever of theirs is left, by pid."""
        procs = [p for node in self.nodes for p in node.processes()]
        for node in reversed(self.nodes):  # workers first, the head last
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        procs += [p for node in self.nodes for p in node.processes()]
        procs += self.stray_processes()
        _kill(procs, signal.SIGKILL)
        _gone(procs, timeout=10)
        for node in self.nodes:
            if node.alive:
                node.proc.kill()
                node.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


_shared: LocalCluster | None = None


def shared_cluster(request, workers: int = 1) -> LocalCluster:
    """The session's cluster (a head and ``workers`` worker nodes, 1 CPU each), started on first
    use; each call starts worker nodes again if a test removed some. It is shut down by
    :func:`release_when_done` or at the end of the session."""
    global _shared
    if _shared is None or not _shared.nodes[0].alive:
        stop_shared()
        _shared = LocalCluster(head_cpus=1)
        request.config.add_cleanup(stop_shared)
        _shared.wait_for_head()
    _shared.ensure_workers(workers)
    return _shared


def stop_shared() -> None:
    global _shared
    if _shared is not None:
        cluster, _shared = _shared, None
        cluster.shutdown()


def release_when_done(request) -> None:
    """At a module's teardown: stop the shared cluster if no later test of the session is marked
    ``cluster`` (so it does not idle through the rest of the suite)."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.module is request.module]
    later = items[max(mine) + 1 :] if mine else []
    if not any(item.get_closest_marker("cluster") for item in later):
        stop_shared()


# -- held shards and jobs in flight ---------------------------------------------------------

GATECAT = '''\
"""gatecat.py GATE URL: stream the shard at URL (a path or fsspec URL) to stdout, but stop in the
middle until the file GATE exists (60 s at most): a shard whose reading the test holds."""
import os, sys, time
import fsspec
gate, url = sys.argv[1:3]
with fsspec.open(url, "rb") as f:
    data = f.read()
out = sys.stdout.buffer
out.write(data[: len(data) // 2])
out.flush()
deadline = time.monotonic() + 60
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.05)
out.write(data[len(data) // 2 :])
out.flush()
'''


def gated(url: str, gate: Path) -> str:
    """A ``pipe:`` URL reading ``url`` through :data:`GATECAT` held by ``gate`` (same shard id)."""
    script = gate.parent / "gatecat.py"
    if not script.exists():
        script.write_text(GATECAT)
    return f"pipe:{sys.executable} {script} {gate} {url}"


def urls_override(urls: list[str]) -> str:
    return "source.urls=[" + ",".join(f"'{u}'" for u in urls) + "]"


def open_files(pid: int) -> list[str]:
    """Paths the process has open (Linux /proc/<pid>/fd)."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def is_shard_worker(argv: list[str]) -> bool:
    return bool(argv) and argv[0].startswith("ray::ShardWorker")


def writing_actors(node_or_cluster, out: Path, min_bytes: int = 1000) -> dict[int, str]:
    """pid -> shard id of the ShardWorker actors that are in the middle of a shard: a temporary
    Parquet file of ``out`` open, with records in it."""
    res = {}
    for pid in node_or_cluster.find(is_shard_worker):
        for path in open_files(pid):
            p = Path(path)
            if p.parent == out and p.name.startswith(".") and ".parquet.tmp-" in p.name:
                try:
                    if p.stat().st_size >= min_bytes:
                        res[pid] = p.name[1:].split(".parquet.tmp-")[0]
                except OSError:
                    pass
    return res


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll ``predicate()`` until it returns something truthy (returned); fail after ``timeout``
    or when ``proc`` (a job being submitted) ended first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"job ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """Wait for a job started with :meth:`LocalCluster.popen_script`; returns (exit code, stdout,
    stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"job did not finish in {timeout} s:\n{out}\n{err}") from None
    return proc.returncode, out, err
