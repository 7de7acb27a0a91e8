"""The driver's actor pool: how an actor's death is explained to the user."""

from __future__ import annotations

import ray

from pipeline.run.pool import death_cause


def test_death_by_memory_monitor_says_out_of_memory():
    exc = ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
    assert "out of memory" in death_cause(exc) and "batch_size" in death_cause(exc)


def test_death_by_sigkill_points_at_the_oom_killer():
    why = death_cause(RuntimeError("worker killed by SIGKILL (exit code 137)"))
    assert "OOM killer" in why and "source.resolution" in why
    assert death_cause(ValueError("node gone")) == "actor died: ValueError"


def test_placement_problem_names_what_is_asked_and_the_override(monkeypatch):
    from pipeline.run import pool

    def nodes(*resources):
        return lambda: (
            [{"Alive": True, "Resources": r} for r in resources]
            + [
                {
                    "Alive": False,
                    "Resources": {"CPU": 64.0, "GPU": 8.0},
                }  # a dead node holds nothing
            ]
        )

    monkeypatch.setattr(pool.ray, "nodes", nodes({"CPU": 8.0}, {"CPU": 4.0}))
    msg = pool.placement_problem(2, 1)
    assert "each actor asks for 2 CPU and 1 GPU" in msg and "8 CPU, 0 GPU; 4 CPU, 0 GPU" in msg
    assert msg.endswith("set ray.gpus_per_actor=0 (CPU actors)"), msg
    assert pool.placement_problem(2, 0) is None
    monkeypatch.setattr(pool.ray, "nodes", nodes({"CPU": 8.0, "GPU": 0.5}))
    assert "ray.gpus_per_actor=0 (CPU actors) or ray.gpus_per_actor=0.5" in pool.placement_problem(
        1, 1
    )
    assert "ray.cpus_per_actor=8 (or less)" in pool.placement_problem(16, 0)
    assert pool.placement_problem(8, 0.5) is None
