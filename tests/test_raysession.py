"""Connecting to Ray (pipeline/run/raysession.py): the default mode always starts its own embedded
Ray, so a dead ``ray start`` cluster named in ``ray_current_cluster`` cannot hang it, and two
default runs on one machine at once do not share (and lose) one Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from shards import write_array_shard


@pytest.mark.slow
def test_two_default_runs_at_once_beside_a_dead_cluster_both_succeed(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are bounded
    os.makedirs(f"{ray_tmp}/ray")
    with open(f"{ray_tmp}/ray/ray_current_cluster", "w") as f:
        f.write("127.0.0.1:1\n")  # a GCS that is not there: ray.init() would retry forever
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    procs = []
    for i in range(2):
        write_array_shard(tmp_path / f"a{i}.tar", 4, shape=(2, 4, 4), seed=i)
        args = [f"source.urls={tmp_path}/a{i}.tar", f"output.dir={tmp_path}/out{i}"]
        cmd = [sys.executable, "-m", "pipeline.precompute", "source=arrays", "progress=false"]
        procs.append(
            subprocess.Popen(
                [*cmd, *args],
                env=env,
                cwd=tmp_path,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
        assert "records: 4" in out


DRIVER = """
import os, sys, time
import ray
from pipeline.run.raysession import ray_session

with ray_session(None, num_cpus=1):
    ray.get(ray.remote(lambda: 1).remote())  # a worker process too
    print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
    time.sleep(600)
"""


def _session_processes(name: str) -> list[int]:
    """Pids of running processes whose command line names the Ray session ``name``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if name.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the watcher reads /proc (Linux)")
def test_an_embedded_ray_goes_away_with_its_sigkilled_driver(tmp_path):
    """Two agents of a SIGKILLed driver's Ray (ray::DashboardAgent, ray::RuntimeEnvAgent) were
    alive 10 s later (a minute, measured). Every process below the driver, noted before the kill
    by pid and start time, and every process naming its session, must be gone within 10 s."""
    import signal
    import time

    from pipeline.run import reaper

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        session = os.path.basename(proc.stdout.readline().strip())
        assert session.startswith("session_"), session
        time.sleep(1.5)  # the watcher notes the processes once a second
        noted = reaper.descendants(proc.pid)
        names = {
            pid: open(f"/proc/{pid}/cmdline", "rb").read()[:300].rstrip(b"\0") for pid in noted
        }
        assert any(b"raylet" in n for n in names.values())
        assert any(b"DashboardAgent" in n for n in names.values()), names
        assert set(_session_processes(session)) <= set(noted)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (reaper._alive(noted) or _session_processes(session)):
        time.sleep(0.25)
    left = {pid: names[pid] for pid in reaper._alive(noted)}
    assert not left and not _session_processes(session), left


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the watcher reads /proc (Linux)")
@pytest.mark.parametrize("clean", [False, True])
def test_the_watcher_reaps_a_dead_drivers_descendants_only_when_not_told_done(clean):
    """A stand-in driver (a shell) with a grandchild that ignores SIGTERM: killed driver ->
    SIGTERM, then SIGKILL after the grace; a clean shutdown (DONE written) signals nothing; a
    child the driver had before the watcher started (not the Ray's) is never signalled."""
    import signal
    import time

    from pipeline.run import reaper

    script = "sleep 60 & sleep 0.5; sh -c 'trap \"\" TERM; sleep 60' & sleep 60 & wait"
    driver = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    kids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 10
        while len(reaper.descendants(driver.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        before = {  # the first sleep 60: older than the watcher
            p: st
            for p, st in reaper.descendants(driver.pid).items()
            if open(f"/proc/{p}/cmdline", "rb").read() == b"sleep\x0060\x00"
        }
        assert len(before) == 1, before
        watcher = subprocess.Popen(
            [sys.executable, "-I", reaper.__file__, str(driver.pid)]
            + [f"{p}:{s}" for p, s in before.items()],
            stdin=subprocess.PIPE,
        )
        while len(reaper.descendants(driver.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)  # 3 sleeps and the trapping shell
        kids = reaper.descendants(driver.pid)
        assert len(kids) >= 4, kids
        time.sleep(2 * reaper.POLL_S)  # noted by the watcher
        if clean:
            watcher.stdin.write(reaper.DONE)
        driver.kill()  # the driver's death closes the pipe (here: closed by hand)
        driver.wait()
        watcher.stdin.close()
        watcher.wait(timeout=reaper.GRACE_S + 10)
        assert watcher.returncode == 0
        ray_like = {p: s for p, s in kids.items() if p not in before and p != watcher.pid}
        assert bool(reaper._alive(ray_like)) == clean
        assert reaper._alive(before) == list(before)  # older than the watcher: left alone
    finally:
        for pid in reaper._alive(kids):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.integration  # the watcher is a process (ray.init itself is replaced here)
def test_a_ray_that_cannot_start_is_one_error_and_leaves_no_watcher(monkeypatch):
    """Ray raises a bare Exception when its node times out starting (seen under load): it is a
    RayConnectError naming ray.address (exit 2 on the command line), and the watcher is gone."""
    import ray

    from pipeline.run import reaper
    from pipeline.run.raysession import RayConnectError, ray_session

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(RayConnectError, match=r"ray.address=null .*timed out during startup"):
        with ray_session(None):
            pass
    if os.path.isdir("/proc/self"):
        mine = reaper.descendants(os.getpid())
        assert not any(
            b"reaper.py" in open(f"/proc/{p}/cmdline", "rb").read() for p in reaper._alive(mine)
        )
