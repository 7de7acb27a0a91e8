"""What validation costs: the :class:`Cost` timer of a scan's parts and of the driver's phases,
and the report's ``summary.cost_seconds``."""

from __future__ import annotations

import time
from collections import Counter


class Cost:
    """Seconds per part of a scan: ``lap(part)`` adds the time since the previous lap."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.t = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self.t
        self.t = now


def cost_seconds(wall: dict, scan: Counter, checks: dict | None = None) -> dict:
    """What validation cost, for the report's ``summary.cost_seconds``: ``wall``, the driver's
    phases (open and plan, Ray start, the shard tasks, the duplicate reduce, Ray shutdown, the
    checks); ``scan``, seconds per part of the shard scans summed over the shards (CPU-bound, so
    on n cores about n times the scan's wall time; ``task_total`` is their sum with the file
    open); ``checks``, seconds per check on the driver (the duplicate-noise reduce is in
    ``wall``; the report and plots are written after)."""
    return {
        "wall": {k: round(v, 3) for k, v in wall.items()},
        "scan": {k: round(v, 3) for k, v in sorted(scan.items(), key=lambda i: -i[1])},
        "checks": dict(checks or {}),
    }
