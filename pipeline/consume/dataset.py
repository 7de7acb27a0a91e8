"""Training-side access to precomputed records: a PyTorch ``IterableDataset`` over an output dir.

::

    ds = PrecomputedDataset("s3://bucket/out", columns=["x_t", "t", "epsilon"], dtype=torch.float32)
    loader = DataLoader(ds, batch_size=64, num_workers=4)
    for epoch in range(E):
        ds.set_epoch(epoch)          # before the loader's iterator is created
        for batch in loader: ...

    # faster: the dataset yields ready batches (same records, same order, same batches)
    ds = PrecomputedDataset("s3://bucket/out", columns=["x_t", "t", "epsilon"], batch_size=64)
    loader = DataLoader(ds, batch_size=None, num_workers=4)

What one epoch yields
---------------------
Every record exactly once per epoch across all ranks and DataLoader workers: the (file, row
group) units are dealt like ``DistributedSampler`` deals samples, rank by rank, then worker by
worker; ``drop_uneven=True`` (for DDP) makes every rank yield as many records, dropping a few;
``len(ds)`` is exact; ``draws="cycle"`` yields one draw of each sample per epoch. The rules, the
rank and world-size lookup (arguments, else ``torch.distributed``) and the length are in
:mod:`pipeline.consume.partition`; the columns and the text-embedding join in
:mod:`pipeline.consume.columns`; batches, memory and the types of yielded records in
:mod:`pipeline.consume.batching`.

Shuffling
---------
``shuffle=True``: the unit order is a permutation seeded by ``(seed, epoch)``, identical on every
rank, and records pass through a shuffle buffer of ``shuffle_buffer`` records seeded by ``(seed,
epoch, rank, worker)``: each row group read is merged with the buffer, a random part of the union
is emitted and the rest kept. ``shuffle_buffer=0`` shuffles within each row group only. The order
is a pure function of (seed, epoch, world size, number of workers); call :meth:`set_epoch` to
reshuffle. With ``persistent_workers=True`` the DataLoader's workers keep the copy of the dataset
they were started with, so ``set_epoch`` does not reach them: leave persistent workers off, or
build a new loader per epoch. ``shuffle=False``: units in file order, rows in file order.

Aspect-ratio buckets
--------------------
A dataset made with ``source.buckets`` holds files of several sample shapes, one per bucket
(``<shard>.<H>x<W>.parquet``, :mod:`pipeline.read.buckets`). Units are dealt as above, whatever
their bucket, so every record is still yielded exactly once per epoch across ranks and workers. Each
reader keeps one shuffle buffer per bucket (their sizes share ``shuffle_buffer`` in proportion to
the reader's records of each bucket) and, with ``batch_size``, one batch per bucket filling up:
**a batch never mixes shapes**, as with the bucket samplers of kohya's sd-scripts and
SimpleTuner. Batches come out as they fill, so the epoch's unit order (seeded by ``(seed,
epoch)``) shuffles them across buckets and the buffers shuffle records within each bucket. At the
end of the epoch each bucket's short batch is yielded (in the order the buckets were first met)
or, with ``drop_last=True``, left out. In record mode the records come in the same order, each
with its own shape (``default_collate`` cannot batch them: use ``batch_size``).
``drop_uneven=True`` then makes every rank yield the same number of *batches* per DataLoader
worker (the least any rank has; the last batches of the others are dropped), since short batches
per bucket make equal record counts give unequal steps. The micro-conditioning columns
``original_size``, ``crop_top_left`` and ``target_size`` come as int32 ``[2]`` tensors (``[B,
2]`` in a batch), ``flipped`` as a bool tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.consume.batching import (
    Batcher,
    ShuffleBuffer,
    buffer_quotas,
    collate,
    head_rows,
    record_dicts,
    resolve_dtype,
    rows_len,
    table_to_numpy,
)

# "as" imports: importable from pipeline.consume.dataset, as before the loader was split
from pipeline.consume.batching import take_rows as take_rows
from pipeline.consume.batching import to_tensor as to_tensor
from pipeline.consume.batching import torch_dtype as torch_dtype
from pipeline.consume.columns import ColumnSelection
from pipeline.consume.labels import DEFAULT_NULL_LABEL, check_null_label, refuse_collisions
from pipeline.consume.partition import (
    DRAWS,
    EpochPlan,
    bucketed,
    check_world,
    deal,
    one_draw,
    unit_records,
    world,
)
from pipeline.consume.partition import check_int as _check_int
from pipeline.consume.recordsdir import RecordsDir, Unit, uncommitted_files
from pipeline.output import records

__all__ = [
    "DEFAULT_SHUFFLE_BUFFER",
    "DRAWS",
    "PrecomputedDataset",
    "RecordsDir",
    "Unit",
    "collate",
    "table_to_numpy",
    "uncommitted_files",
]

DEFAULT_SHUFFLE_BUFFER = 1024


class PrecomputedDataset(IterableDataset):
    """An iterable dataset of the records in ``dir`` (see the module docstring for the contract).

    dir: output directory (path or URI); columns: names to read (default: all, see
    :mod:`~pipeline.consume.columns`); shuffle, seed, shuffle_buffer: see *Shuffling*; rank,
    world_size: override torch.distributed; dtype: cast tensor columns to this floating torch
    dtype; filesystem: pyarrow or fsspec filesystem for ``dir``; drop_uneven: equal record counts
    per rank and worker (for DDP), dropping a few; batch_size: yield collated batches of this many
    records instead of records (:mod:`~pipeline.consume.batching`, *Batches*; use
    ``DataLoader(ds, batch_size=None)``); drop_last: with ``batch_size``, leave out each reader's
    short last batch; draws: ``"all"`` or ``"cycle"`` (:mod:`~pipeline.consume.partition`, *Draws
    over epochs*); num_workers: the DataLoader's ``num_workers``, for an exact ``len()``
    (:mod:`~pipeline.consume.partition`, *Length*);
    null_label: what a null integer label (an absent ``cls``) is yielded as, refused when a real
    label of a column with nulls equals it (:mod:`pipeline.consume.labels`).
    """

    def __init__(
        self,
        dir,
        columns: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        dtype: torch.dtype | str | None = None,
        filesystem=None,
        drop_uneven: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        draws: str = "all",
        num_workers: int | None = None,
        null_label: int = DEFAULT_NULL_LABEL,
    ):
        super().__init__()
        self.records = RecordsDir(dir, filesystem)
        self.selection = ColumnSelection(self.records, columns)
        self.columns: list[str] = self.selection.columns
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {', '.join(DRAWS)}, got {draws!r}")
        self.draws = draws
        self.null_label = check_null_label(null_label)
        refuse_collisions(self.records, self.selection.record_columns, self.null_label)
        self.K = self.records.description.draws_per_sample
        if self.cycling:
            self.selection.read_also("draw")  # the filter's column
        if num_workers is not None:
            num_workers = _check_int("num_workers", num_workers, 0)
        self.num_workers = num_workers
        self.shuffle = bool(shuffle)
        self.seed = _check_int("seed", seed, 0)
        self.shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 0)
        self.dtype = resolve_dtype(dtype)
        self.drop_uneven = bool(drop_uneven)
        self.batch_size = None if batch_size is None else _check_int("batch_size", batch_size, 1)
        if drop_last and self.batch_size is None:
            raise ValueError(
                "drop_last applies to batch_size=...; in record mode pass it to the DataLoader"
            )
        self.drop_last = bool(drop_last)
        self._rank, self._world_size = check_world(rank, world_size)
        self.epoch = 0

    # -- metadata -------------------------------------------------------------------------------

    @property
    def num_records(self) -> int:
        """Records in the directory (all ranks together), from the Parquet footers."""
        return self.records.num_records

    @property
    def metadata(self) -> dict:
        """The process description every file shares (schedule, noise, dtype, shape, ...)."""
        return self.records.metadata

    @property
    def description(self):
        """:attr:`metadata` as a :class:`pipeline.output.description.ProcessMetadata` (typed
        fields: ``shape``, ``dtype``, ``schedule``, ``text``, ...)."""
        return self.records.description

    @property
    def files(self) -> list[str]:
        return list(self.records.files)

    def unconditional(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding columns (stored once per dataset in
        ``_text/_uncond.parquet``), for classifier-free guidance: drop captions at train time by
        swapping a sample's embeddings for these. ValueError without text embeddings."""
        return self.selection.unconditional(self.dtype)

    def schedule(self):
        """The NoiseSchedule DDPM records were made with, rebuilt from the metadata
        (ValueError for rectified-flow records: see :meth:`process`)."""
        return records.schedule_from_metadata(self.metadata)

    def process(self):
        """The :class:`pipeline.noising.process.GaussianProcess` of the records (DDPM or rectified
        flow), rebuilt from the metadata: alpha_t, sigma_t, the posterior and snr tables."""
        return records.process_from_metadata(self.metadata)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle and, with ``draws="cycle"``, its draw (call on every rank
        before iterating)."""
        self.epoch = _check_int("epoch", epoch, 0)

    @property
    def cycling(self) -> bool:
        """True when an epoch yields one draw per sample (``draws="cycle"`` with K > 1)."""
        return self.draws == "cycle" and self.K > 1

    def draw_of(self, epoch: int | None = None) -> int | None:
        """The draw an epoch yields with ``draws="cycle"`` (``epoch mod K``); None: every draw."""
        epoch = self.epoch if epoch is None else epoch
        return epoch % self.K if self.cycling else None

    def unit_records(self, unit: Unit, epoch: int | None = None) -> int:
        """Records of ``unit`` the epoch yields: its rows, or with ``draws="cycle"`` its rows of
        draw ``epoch mod K`` (:func:`pipeline.consume.partition.unit_records`)."""
        return unit_records(unit, self.draw_of(epoch), self.K)

    def __len__(self) -> int:
        """Records (with ``batch_size``: batches) this rank yields in the current epoch."""
        rank, world_size = self.world()
        return self.epoch_plan(world_size, max(self.num_workers or 1, 1)).length(rank)

    # -- partitioning (pipeline.consume.partition) ----------------------------------------------

    def world(self) -> tuple[int, int]:
        """(rank, world_size): from the arguments, else torch.distributed, else (0, 1)."""
        return world(self._rank, self._world_size)

    def __getstate__(self):
        state = self.__dict__.copy()
        # Freeze the distributed placement here: spawned DataLoader workers have no process group.
        state["_rank"], state["_world_size"] = self.world()
        return state

    def plan(self, world_size: int, num_workers: int = 1, epoch: int | None = None):
        """Units per rank and worker for an epoch: ``plan[rank][worker] -> [Unit, ...]``."""
        epoch = self.epoch if epoch is None else epoch
        seed = [self.seed, epoch] if self.shuffle else None
        return deal(self.records.units(), world_size, num_workers, seed)

    def epoch_plan(self, world_size: int, num_workers: int = 1) -> EpochPlan:
        """The current epoch's :meth:`plan` with what each reader yields of it (its records or
        batches, the ``drop_uneven`` cut)."""
        return EpochPlan(
            self.plan(world_size, num_workers),
            self.records.shapes,
            draw=self.draw_of(),
            k=self.K,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            drop_uneven=self.drop_uneven,
            where=self.records.uri,
        )

    @property
    def bucketed(self) -> bool:
        """The files have more than one sample shape (aspect-ratio buckets)."""
        return bucketed(self.records.shapes)

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        rank, world_size = self.world()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.num_workers is not None and max(self.num_workers, 1) != num_workers:
            raise ValueError(
                f"PrecomputedDataset(num_workers={self.num_workers}) is read by {num_workers} "
                f"DataLoader worker(s): its len() counts {max(self.num_workers, 1)}; pass the "
                "DataLoader's num_workers"
            )
        plan = self.epoch_plan(world_size, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker])
        pieces = self._pieces(plan.readers[rank][worker], rng, use_threads=info is None)
        if self.batch_size and plan.bucketed:  # a batch per bucket (see *Aspect-ratio buckets*)
            batches = plan.bucket_batches(worker)[rank] if self.drop_uneven else None
            yield from itertools.islice(self._bucketed(pieces, info is not None), batches)
            return
        limit = plan.limit(worker)
        batcher = None
        if self.batch_size:
            batcher = Batcher(self.columns, self.batch_size, self.dtype, shared=info is not None)
        count = 0
        for _, block, rows in pieces:
            if limit is not None and count + rows_len(rows) > limit:
                rows = head_rows(rows, limit - count)
            if batcher is None:
                yield from record_dicts(block, rows, self.columns, self.dtype)
            else:
                yield from batcher.add(block, rows)
            count += rows_len(rows)
            del block, rows  # before the next piece: no block outlives its turn
            if limit is not None and count >= limit:
                break
        if batcher is not None and not self.drop_last:
            last = batcher.finish()
            if last is not None:
                yield last

    def _bucketed(self, pieces, shared: bool) -> Iterator[dict]:
        """Batches of one shape each: a :class:`Batcher` per bucket, its short batch at the end
        unless ``drop_last``."""
        batchers: dict[tuple, Batcher] = {}
        for key, block, rows in pieces:
            batcher = batchers.get(key)
            if batcher is None:
                batcher = batchers[key] = Batcher(self.columns, self.batch_size, self.dtype, shared)
            yield from batcher.add(block, rows)
            del block, rows
        if not self.drop_last:
            for batcher in batchers.values():
                last = batcher.finish()
                if last is not None:
                    yield last

    def _pieces(self, units: Sequence[Unit], rng: np.random.Generator, use_threads: bool):
        """The epoch's records as (shape, column block, rows) pieces, in order: ``shape`` is the
        sample shape of the block's file (its bucket), ``rows`` a slice of an Arrow block (no
        shuffle) or an index array into the shuffle buffer's storage. A piece is valid until the
        next one is asked for (the storage is then overwritten).

        The shuffle buffer: each row group read is merged with the buffer, a random part of the
        union (``rng.permutation``) is emitted, the rest kept. The records stay where they were
        written: a row group is copied once into free slots of a storage of ``shuffle_buffer`` +
        the largest row group, and the buffer is a list of slots in its (random) order, so a
        record is copied twice (into the storage, out of it into the block or batch yielded).
        With several shapes (buckets) there is one buffer per shape, of ``shuffle_buffer`` times
        its share of the reader's rows (:func:`buffer_quotas`)."""
        blocks = self._read_ahead(units, use_threads)
        shapes = self.records.shapes
        if not self.shuffle:
            for unit, block in blocks:
                yield shapes[unit.file], block, slice(0, len(block[self.columns[0]]))
                del block  # before the next read ahead is started
            return
        quota = buffer_quotas(units, shapes, self.shuffle_buffer)
        buffers: dict[tuple, ShuffleBuffer] = {}
        for unit, block in blocks:
            key = shapes[unit.file]
            buf = buffers.get(key)
            if buf is None:
                largest = max(u.num_rows for u in units if shapes[u.file] == key)
                buf = buffers[key] = ShuffleBuffer(block, quota[key], largest)
            out = buf.add(block, rng)
            del block
            if len(out):
                yield key, buf.storage, out
        for key, buf in buffers.items():  # the rest, already in random order
            step = max(buf.largest, 1)
            for i in range(0, len(buf.kept), step):
                yield key, buf.storage, buf.kept[i : i + step]

    def _read_ahead(self, units: Sequence[Unit], use_threads: bool) -> Iterator[tuple]:
        """(unit, numpy column block) of the units, in order; the next unit is read in a background
        thread while the current one is copied and yielded (pyarrow's read releases the GIL), so
        that reading and the rest overlap when a core is free."""
        if not units:
            return

        def read(unit: Unit) -> dict:
            table = self.records.read(unit, self.selection.record_columns, use_threads)
            block = table_to_numpy(table, self.null_label)
            if self.cycling:
                name = self.records.display(self.records.files[unit.file])
                block = one_draw(block, unit, self.draw_of(), self.K, name)
            return self.selection.complete(block, unit.file)  # text joined, helpers dropped

        with ThreadPoolExecutor(1, thread_name_prefix="records-read-ahead") as pool:
            ahead = pool.submit(read, units[0])
            for prev, unit in zip(units, units[1:]):
                block = ahead.result()
                ahead = pool.submit(read, unit)
                yield prev, block
                del block
            yield units[-1], ahead.result()
