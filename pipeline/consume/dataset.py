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
epoch set by :meth:`set_epoch`, counted from the Parquet footers by the same plan the iteration
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
sample's draws are adjacent rows) and keeps every K-th record. The records of a draw, their
order and the partitioning follow the rules above (the unit order is shuffled per epoch as
usual).

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

See :mod:`pipeline.consume.batching` for batches, memory and the types of yielded records.
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
    resolve_dtype,
    rows_len,
    table_to_numpy,
    take_rows,
    to_tensor,
    torch_dtype,
)
from pipeline.consume.labels import DEFAULT_NULL_LABEL, check_null_label, refuse_collisions
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
DRAWS = ("all", "cycle")
_INT_COLUMNS = ("index", "draw")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class PrecomputedDataset(IterableDataset):
    """An iterable dataset of the records in ``dir`` (see the module docstring for the contract).

    dir: output directory (path or URI); columns: names to read (default: all); shuffle, seed,
    shuffle_buffer: see *Shuffling*; rank, world_size: override torch.distributed; dtype: cast
    tensor columns to this floating torch dtype; filesystem: pyarrow or fsspec filesystem for
    ``dir``; drop_uneven: equal record counts per rank and worker (for DDP), dropping a few;
    batch_size: yield collated batches of this many records instead of records (see *Batches*;
    use ``DataLoader(ds, batch_size=None)``); drop_last: with ``batch_size``, leave out each
    reader's short last batch; draws: ``"all"`` or ``"cycle"`` (see *Draws over epochs*);
    num_workers: the DataLoader's ``num_workers``, for an exact ``len()`` (see *Length*);
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
        self.text = None
        text_meta = self.records.metadata.get("text")
        text_available: list[str] = []
        if (
            text_meta
        ):  # per-sample embeddings in _text/ (pipeline.output.text_store), joined by index
            from pipeline.encode.text import embedding_columns
            from pipeline.output.text_store import TextTables

            self.text = TextTables(self.records.fs, self.records.root, self.records.display)
            text_available = ["caption_null", *embedding_columns(text_meta)]
        available = self.records.column_names + text_available
        if columns is None:
            columns = available
        elif isinstance(columns, str):
            columns = [columns]
        columns = list(columns)
        unknown = [c for c in columns if c not in available]
        if unknown or not columns:
            raise ValueError(
                f"unknown columns {unknown} for records in {self.records.uri}; "
                f"available: {', '.join(available)}"
                + ("" if "x_0" in available else " (x_0 is only stored with output.store_x0=true)")
            )
        if len(set(columns)) != len(columns):
            raise ValueError(f"duplicate column names in {columns}")
        self.columns: list[str] = columns
        self.text_columns = [c for c in columns if c in text_available]
        self.record_columns = [c for c in columns if c not in text_available]
        if self.text_columns and "index" not in self.record_columns:
            self.record_columns.append("index")  # the join key, dropped after the join
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {', '.join(DRAWS)}, got {draws!r}")
        self.draws = draws
        self.null_label = check_null_label(null_label)
        refuse_collisions(self.records, self.record_columns, self.null_label)
        self.K = int(self.metadata.get("noise", {}).get("draws_per_sample", 1))
        if self.cycling and "draw" not in self.record_columns:
            self.record_columns.append("draw")  # the filter's column, dropped after it
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
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (torch.distributed)")
        if world_size is not None:
            world_size = _check_int("world_size", world_size, 1)
            rank = _check_int("rank", rank, 0)
            if rank >= world_size:
                raise ValueError(f"rank must be < world_size = {world_size}, got {rank}")
        self._rank, self._world_size = rank, world_size
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
    def files(self) -> list[str]:
        return list(self.records.files)

    def unconditional(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding columns (stored once per dataset in
        ``_text/_uncond.parquet``), for classifier-free guidance: drop captions at train time by
        swapping a sample's embeddings for these. ValueError without text embeddings."""
        if self.text is None:
            raise ValueError(f"{self.records.uri} has no text embeddings (made without text=...)")
        from pipeline.encode.text import embedding_columns

        cols = embedding_columns(self.metadata["text"])
        out = {k: torch.from_numpy(np.array(v)) for k, v in self.text.uncond(cols).items()}
        return {k: v.to(self.dtype) if self.dtype and v.is_floating_point() else v
                for k, v in out.items()}  # fmt: skip

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
        draw ``d = epoch mod K``. A file holds whole samples with their K draws adjacent, so row
        ``i`` of a file is draw ``i mod K`` (checked when the rows are read)."""
        d = self.draw_of(epoch)
        if d is None:
            return unit.num_rows
        a, b, k = unit.start, unit.start + unit.num_rows, self.K
        return (b - 1 - d) // k - (a - 1 - d) // k

    def __len__(self) -> int:
        """Records (with ``batch_size``: batches) this rank yields in the current epoch."""
        rank, world_size = self.world()
        workers = max(self.num_workers or 1, 1)
        plan = self.plan(world_size, workers)
        total = 0
        for worker in range(workers):
            if self.batch_size is not None and self.bucketed:
                total += self._bucket_batches(plan, worker)[rank]
                continue
            n = self._limit(plan, worker)
            if n is None:
                n = sum(self.unit_records(u) for u in plan[rank][worker])
            if self.batch_size is None:
                total += n
            else:
                full, rest = divmod(n, self.batch_size)
                total += full + (1 if rest and not self.drop_last else 0)
        return total

    # -- partitioning ---------------------------------------------------------------------------

    def world(self) -> tuple[int, int]:
        """(rank, world_size): from the arguments, else torch.distributed, else (0, 1)."""
        if self._world_size is not None:
            return self._rank, self._world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __getstate__(self):
        state = self.__dict__.copy()
        # Freeze the distributed placement here: spawned DataLoader workers have no process group.
        state["_rank"], state["_world_size"] = self.world()
        return state

    def plan(self, world_size: int, num_workers: int = 1, epoch: int | None = None):
        """Units per rank and worker for an epoch: ``plan[rank][worker] -> [Unit, ...]``."""
        epoch = self.epoch if epoch is None else epoch
        units = self.records.units()
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return [
            [units[r::world_size][w::num_workers] for w in range(num_workers)]
            for r in range(world_size)
        ]

    @property
    def bucketed(self) -> bool:
        """The files have more than one sample shape (aspect-ratio buckets)."""
        return len(set(self.records.shapes)) > 1

    def _bucket_batches(self, plan, worker: int) -> list[int]:
        """Per rank, the batches worker ``worker`` yields with buckets: a batch per
        ``batch_size`` records of a bucket, plus each bucket's short one unless ``drop_last``;
        with ``drop_uneven`` the least of any rank on every rank."""
        counts = []
        for rank_plan in plan:
            per: dict = {}
            for u in rank_plan[worker]:
                key = self.records.shapes[u.file]
                per[key] = per.get(key, 0) + self.unit_records(u)
            full = [divmod(n, self.batch_size) for n in per.values()]
            counts.append(sum(f + (1 if r and not self.drop_last else 0) for f, r in full))
        return [min(counts)] * len(counts) if self.drop_uneven else counts

    def _limit(self, plan, worker: int) -> int | None:
        """With ``drop_uneven``: the records worker ``worker`` of every rank yields (the least
        any rank has). ValueError with the numbers and the fix when a reader has no row group
        while the same worker of another rank has records: every rank would drop them all."""
        if not self.drop_uneven:
            return None
        counts = [sum(self.unit_records(u) for u in rank_plan[worker]) for rank_plan in plan]
        if min(counts) == 0 < max(counts):
            ranks, workers = len(plan), len(plan[0])
            per = [[sum(self.unit_records(u) for u in units) for units in p] for p in plan]
            kept = ranks * sum(min(p[w] for p in per) for w in range(workers))
            raise ValueError(
                f"drop_uneven=True with {ranks} rank(s) x {workers} DataLoader worker(s) = "
                f"{ranks * workers} readers over {len(self.records.units())} row group(s) of "
                f"{self.records.uri}: a reader without a row group makes every rank drop the "
                f"records of its worker {worker}, so {kept} of {sum(map(sum, per))} records "
                "would be yielded. Use fewer DataLoader workers or ranks, write smaller row "
                "groups (output.rows_per_group) so that every reader gets one, or "
                "drop_uneven=False"
            )
        return min(counts)

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
        plan = self.plan(world_size, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker])
        pieces = self._pieces(plan[rank][worker], rng, use_threads=info is None)
        if self.batch_size and self.bucketed:  # a batch per bucket (see *Aspect-ratio buckets*)
            batches = self._bucket_batches(plan, worker)[rank] if self.drop_uneven else None
            yield from itertools.islice(self._bucketed(pieces, info is not None), batches)
            return
        limit = self._limit(plan, worker)
        batcher = None
        if self.batch_size:
            batcher = Batcher(self.columns, self.batch_size, self.dtype, shared=info is not None)
        count = 0
        for _, block, rows in pieces:
            if limit is not None and count + rows_len(rows) > limit:
                rows = head_rows(rows, limit - count)
            if batcher is None:
                yield from self._records(block, rows)
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
            table = self.records.read(unit, self.record_columns, use_threads)
            block = table_to_numpy(table, self.null_label)
            if self.cycling:
                block = self._one_draw(unit, block)
            if self.text_columns:  # each record's sample row of its shard's text table
                shard = self.records.shard_of(unit.file)
                block.update(self.text.rows(shard, block["index"], self.text_columns))
                if "index" not in self.columns:
                    del block["index"]
            return block

        with ThreadPoolExecutor(1, thread_name_prefix="records-read-ahead") as pool:
            ahead = pool.submit(read, units[0])
            for prev, unit in zip(units, units[1:]):
                block = ahead.result()
                ahead = pool.submit(read, unit)
                yield prev, block
                del block
            yield units[-1], ahead.result()

    def _one_draw(self, unit: Unit, block: dict) -> dict:
        """The rows of the epoch's draw (``draws="cycle"``); ValueError when the file's draws
        are not in the order the pipeline writes them (row ``i`` is draw ``i mod K``), which
        the exact length relies on."""
        d, k = self.draw_of(), self.K
        draw = block["draw"]
        expected = (unit.start + np.arange(len(draw))) % k
        if not np.array_equal(draw, expected):
            raise ValueError(
                f"{self.records.display(self.records.files[unit.file])} row group "
                f"{unit.row_group}: draws are not in sample order (row i is draw i mod K={k}), "
                "as pipeline.precompute writes them; draws='cycle' needs that order"
            )
        rows = np.flatnonzero(draw == d)
        out = {name: values[rows] for name, values in block.items()}
        if "draw" not in self.columns:
            del out["draw"]
        return out

    def _records(self, block: dict, rows: slice | np.ndarray) -> Iterator[dict]:
        """One dict per row: the rows are copied out of the block once (views for every
        record: ``unbind`` of one tensor per column), a tensor column cast on the way."""
        seqs = []
        for name in self.columns:
            values = block[name]
            if values.dtype == object:  # key, string and binary columns (None: a null)
                seqs.append(values[rows].tolist())
            elif name in _INT_COLUMNS:
                seqs.append(values[rows].tolist())
            elif name == "t" and values.dtype.kind in "iu":  # DDPM; flow's t is float32 sigma*T
                seqs.append(torch.from_numpy(values[rows].astype(np.int64)).unbind(0))
            elif (
                values.ndim > 1
                and values.dtype.kind == "f"
                and self.dtype
                not in (
                    None,
                    torch_dtype(values.dtype),
                )
            ):
                seqs.append(to_tensor(take_rows(values, rows)).to(self.dtype).unbind(0))
            else:
                values = values[rows]
                if isinstance(rows, slice):  # Arrow's read-only memory: torch wants a copy
                    values = values.copy()
                seqs.append(torch.from_numpy(values).unbind(0))
        names = self.columns
        for row in zip(*seqs):
            yield dict(zip(names, row))
