"""The driver's actor pool: how an actor's death is explained to the user."""

from __future__ import annotations

import ray

from pipeline.pool import death_cause


def test_death_by_memory_monitor_says_out_of_memory():
    exc = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
    assert "out of memory" in death_cause(exc) and "batch_size" in death_cause(exc)


def test_death_by_sigkill_points_at_the_oom_killer():
    why = death_cause(RuntimeError("worker killed by SIGKILL (exit code 137)"))
    assert "OOM killer" in why and "source.resolution" in why
    assert death_cause(ValueError("node gone")) == "actor died: ValueError"
