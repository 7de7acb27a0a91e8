"""Connecting to Ray (pipeline/raysession.py): the default mode always starts its own embedded
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
