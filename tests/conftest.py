"""Shared fixtures: one local Ray for the whole session, and configs composed from conf/."""

from __future__ import annotations

import pytest
import ray

from pipeline.config import compose


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and 2 fake GPUs (for the pinning logic), shared by all tests."""
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def make_cfg():
    """make_cfg(*overrides) -> a composed precompute config (progress bar off)."""

    def _make(*overrides: str):
        return compose(["progress=false", *overrides])

    return _make
