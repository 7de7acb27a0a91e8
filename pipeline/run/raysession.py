"""Connecting to Ray: the one place where the driver and the validator start or join it.

``ray.address``:

* ``null``: always a new embedded Ray of this process (``ray.init(address="local")``), whose
  processes end with the driver even when it is SIGKILLed (:mod:`pipeline.run.reaper`). A bare
  ``ray.init()`` would join whatever ``/tmp/ray/ray_current_cluster`` names (a ``ray start``
  cluster that may be long dead, where it retries forever, or another embedded run, which takes
  its Ray down when it ends); ``"local"`` never does.
* ``auto``: join the cluster of this machine (``RAY_ADDRESS``, or the running ``ray start``).
* an address (``ray://head:10001``, ``head:6379``): join that cluster.

A Ray that the calling process already initialised (a test session, a notebook, a Ray job's
driver) is used as it is and left running.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from pipeline.run import reaper


class RayConnectError(RuntimeError):
    """Ray could not be started or joined; the message names ``ray.address`` and the cause."""


@contextmanager
def ray_session(address: str | None, **init_kwargs) -> Iterator[None]:
    """Ray for the duration of the block (see the module docstring for ``address``); a Ray this
    block started is shut down when it ends. ``init_kwargs`` go to ``ray.init``."""
    if ray.is_initialized():
        yield
        return
    options = {"include_dashboard": False, "logging_level": logging.WARNING, **init_kwargs}
    watcher = reaper.start() if address is None else None  # an embedded Ray: ends with us
    try:
        ray.init(address="local" if address is None else address, **options)
    except Exception as exc:  # Ray raises a bare Exception when its node times out starting
        reaper.stop(watcher)
        where = "null (a new embedded Ray)" if address is None else address
        raise RayConnectError(f"cannot start or join Ray (ray.address={where}): {exc}") from exc
    except BaseException:
        reaper.stop(watcher)
        raise
    try:
        yield
    finally:
        ray.shutdown()
        reaper.stop(watcher)
