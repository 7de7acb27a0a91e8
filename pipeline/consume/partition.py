"""Which records each reader of :class:`pipeline.consume.dataset.PrecomputedDataset` yields in an
epoch, and how many: the units dealt over ranks and DataLoader workers, the draws an epoch keeps,
the ``drop_uneven`` cut and ``len()``. Pure planning from the Parquet footers (no row is read);
the iteration follows the same plan, so the length is exact.

What one epoch yields
---------------------
The work units are the (file, row group) pairs of the directory's committed ``*.parquet`` files
(``OutputDir.data_files()``: sorted, temporary files excluded), so a few large files still spread
over many readers. Units are dealt in two levels, like ``DistributedSampler``: rank ``r`` of
``R`` takes units ``r, r + R, r + 2R, ...`` of the epoch's unit order, and DataLoader worker
``w`` of ``W`` takes every ``W``-th of those. **Every record is yielded exactly once per epoch
across all ranks and workers** (the default contract). When the units do not divide evenly, ranks
get ``ceil(N/R)`` or ``floor(N/R)`` units (and workers of a rank likewise), so ranks differ by at
most one unit; their *record* counts also differ by the rows of that unit (and by short last row
groups). Nothing is padded or repeated.

``drop_uneven=True`` is for DistributedDataParallel, where every rank must take the same number
of steps: each DataLoader worker ``w`` of every rank yields the same number of records (the
least that worker ``w`` has on any rank), so with one batch size every rank gets the same number
of batches. It drops at most about one row group per worker and rank per epoch, and which
records are dropped changes with the epoch when shuffling.

Rank and world size come from the arguments, else from ``torch.distributed`` when it is
initialised (looked up when the dataset is iterated or pickled to workers, so the dataset may be
built before ``init_process_group``), else 0 and 1. Worker id and count come from
``torch.utils.data.get_worker_info()``. All ranks must use the same ``seed``, epoch and number of
DataLoader workers.

Length
------
``len(ds)`` is exact: the records (with ``batch_size``, the batches) this rank yields in the
epoch set by ``set_epoch``, counted from the Parquet footers by the same plan the iteration
follows (ranks differ by the rows of their units, so a rank's length can change with the epoch
when shuffling). Without ``drop_uneven`` and ``batch_size`` it does not depend on the number of
DataLoader workers; with either, pass ``num_workers=`` the DataLoader's (the dataset refuses to
be iterated by another number of workers, so the length cannot silently be wrong).
``DataLoader(ds, batch_size=B)`` in record mode reports ``ceil(len(ds) / B)`` batches, but each
worker makes its own short last batch: use the dataset's ``batch_size`` for an exact count.

Draws over epochs
-----------------
A sample made with ``sampling.draws_per_sample=K`` has K records, draws ``0 .. K-1``, each with
its own (t, eps). ``draws="all"`` (the default) yields all K every epoch: an epoch is K passes
over the samples. ``draws="cycle"`` yields draw ``e mod K`` of each sample in epoch ``e``: one
record per sample per epoch, so a training run sees fresh noise for K epochs and the same
(t, eps) again from epoch K on (K = the number of epochs of distinct noise the data holds; the
directory is K times the bytes of one draw). The reader still reads whole row groups (a
sample's draws are adjacent rows) and keeps every K-th record (:func:`one_draw`). The records of
a draw, their order and the partitioning follow the rules above (the unit order is shuffled per
epoch as usual).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.consume.recordsdir import Unit

DRAWS = ("all", "cycle")

Plan = list[list[list[Unit]]]  # plan[rank][worker] -> the units that reader reads, in order


def check_int(name: str, value, low: int) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_world(rank, world_size) -> tuple[int | None, int | None]:
    """The ``rank`` and ``world_size`` arguments, checked: both or neither (None: from
    torch.distributed), ``0 <= rank < world_size``."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (torch.distributed)")
    if world_size is not None:
        world_size = check_int("world_size", world_size, 1)
        rank = check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
    return rank, world_size


def world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given ones, else torch.distributed's, else (0, 1)."""
    if world_size is not None:
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def bucketed(shapes: Sequence[tuple]) -> bool:
    """The files have more than one sample shape (aspect-ratio buckets)."""
    return len(set(shapes)) > 1


def deal(
    units: Sequence[Unit], world_size: int, num_workers: int, shuffle_seed: list[int] | None
) -> Plan:
    """``plan[rank][worker]``: the units in file order, or permuted by ``shuffle_seed`` (``[seed,
    epoch]``, the same on every rank), dealt round-robin to ranks, then to a rank's workers."""
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(units))
        units = [units[i] for i in order]
    return [
        [units[r::world_size][w::num_workers] for w in range(num_workers)]
        for r in range(world_size)
    ]


def unit_records(unit: Unit, draw: int | None, k: int) -> int:
    """Records of ``unit`` an epoch yields: its rows, or (``draw`` not None) its rows of that
    draw. A file holds whole samples with their ``k`` draws adjacent, so row ``i`` of a file is
    draw ``i mod k`` (checked when the rows are read: :func:`one_draw`)."""
    if draw is None:
        return unit.num_rows
    a, b = unit.start, unit.start + unit.num_rows
    return (b - 1 - draw) // k - (a - 1 - draw) // k


def one_draw(block: dict, unit: Unit, draw: int, k: int, name: str) -> dict:
    """The rows of ``block`` (``unit``'s rows, from file ``name``) that are draw ``draw``;
    ValueError when the file's draws are not in the order the pipeline writes them (row ``i`` is
    draw ``i mod k``), which the exact length relies on."""
    draws = block["draw"]
    expected = (unit.start + np.arange(len(draws))) % k
    if not np.array_equal(draws, expected):
        raise ValueError(
            f"{name} row group {unit.row_group}: draws are not in sample order (row i is draw i "
            f"mod K={k}), as pipeline.precompute writes them; draws='cycle' needs that order"
        )
    rows = np.flatnonzero(draws == draw)
    return {column: values[rows] for column, values in block.items()}


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's plan and what each reader yields of it.

    readers: ``readers[rank][worker]`` -> units (:func:`deal`); shapes: the sample shape of each
    file (a bucket per shape); draw, k: the epoch's draw with ``draws="cycle"`` (None: every
    draw) and the draws per sample; batch_size (None: records), drop_last, drop_uneven: the
    dataset's arguments; where: the directory, for messages.
    """

    readers: Plan
    shapes: Sequence[tuple]
    draw: int | None = None
    k: int = 1
    batch_size: int | None = None
    drop_last: bool = False
    drop_uneven: bool = False
    where: str = ""

    @property
    def bucketed(self) -> bool:
        return bucketed(self.shapes)

    def records(self, units: Sequence[Unit]) -> int:
        """Records the epoch yields of ``units``."""
        return sum(unit_records(u, self.draw, self.k) for u in units)

    def bucket_batches(self, worker: int) -> list[int]:
        """Per rank, the batches worker ``worker`` yields with buckets: a batch per
        ``batch_size`` records of a bucket, plus each bucket's short one unless ``drop_last``;
        with ``drop_uneven`` the least of any rank on every rank."""
        counts = []
        for rank_plan in self.readers:
            per: dict = {}
            for u in rank_plan[worker]:
                key = self.shapes[u.file]
                per[key] = per.get(key, 0) + unit_records(u, self.draw, self.k)
            full = [divmod(n, self.batch_size) for n in per.values()]
            counts.append(sum(f + (1 if r and not self.drop_last else 0) for f, r in full))
        return [min(counts)] * len(counts) if self.drop_uneven else counts

    def limit(self, worker: int) -> int | None:
        """With ``drop_uneven``: the records worker ``worker`` of every rank yields (the least
        any rank has). ValueError with the numbers and the fix when a reader has no row group
        while the same worker of another rank has records: every rank would drop them all."""
        if not self.drop_uneven:
            return None
        counts = [self.records(rank_plan[worker]) for rank_plan in self.readers]
        if min(counts) == 0 < max(counts):
            ranks, workers = len(self.readers), len(self.readers[0])
            per = [[self.records(units) for units in p] for p in self.readers]
            kept = ranks * sum(min(p[w] for p in per) for w in range(workers))
            units = sum(len(units) for p in self.readers for units in p)
            raise ValueError(
                f"drop_uneven=True with {ranks} rank(s) x {workers} DataLoader worker(s) = "
                f"{ranks * workers} readers over {units} row group(s) of "
                f"{self.where}: a reader without a row group makes every rank drop the "
                f"records of its worker {worker}, so {kept} of {sum(map(sum, per))} records "
                "would be yielded. Use fewer DataLoader workers or ranks, write smaller row "
                "groups (output.rows_per_group) so that every reader gets one, or "
                "drop_uneven=False"
            )
        return min(counts)

    def length(self, rank: int) -> int:
        """Records (with ``batch_size``: batches) rank ``rank`` yields over all its workers."""
        total = 0
        for worker in range(len(self.readers[rank])):
            if self.batch_size is not None and self.bucketed:
                total += self.bucket_batches(worker)[rank]
                continue
            n = self.limit(worker)
            if n is None:
                n = self.records(self.readers[rank][worker])
            if self.batch_size is None:
                total += n
            else:
                full, rest = divmod(n, self.batch_size)
                total += full + (1 if rest and not self.drop_last else 0)
        return total
