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


# -- the loopback Ray cluster of tests/raycluster.py, shared by test_cluster.py, test_faults.py
# and test_remote_storage.py (each module: pytestmark = pytest.mark.usefixtures("cluster_release"))


@pytest.fixture(scope="module")
def cluster_release(request):
    """At the end of a module that uses the shared loopback cluster: stop it if no later test of
    the session is marked ``cluster`` (so it does not idle through the rest of the suite)."""
    from raycluster import release_when_done

    yield
    release_when_done(request)


@pytest.fixture
def cluster(request, cluster_release):
    """The loopback cluster with its worker node (started again if a test removed it)."""
    from raycluster import shared_cluster

    return shared_cluster(request)


@pytest.fixture
def any_cluster(request, cluster_release):
    """The loopback cluster as it is (one node is enough)."""
    from raycluster import shared_cluster

    return shared_cluster(request, workers=0)
