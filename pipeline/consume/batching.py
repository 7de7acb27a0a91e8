"""Records to tensors and batches for the loader (:mod:`pipeline.consume.dataset`): the
Arrow-to-numpy conversion, the records of record mode, ``collate``, the batcher that gathers
records straight into a batch's tensors and the shuffle buffer.

Batches
-------
``batch_size=B`` makes the dataset yield collated batches of ``B`` records instead of records:
use it with ``DataLoader(ds, batch_size=None, num_workers=...)`` (the DataLoader then neither
fetches record by record nor collates). The records and their order are the same as in record
mode, and so are the batches: a batch is what ``DataLoader(ds, batch_size=B,
collate_fn=pipeline.consume.dataset.collate)`` makes of the same records (tensor columns ``[B, C, H,
W]``, ``t``, ``index``, ``draw`` and integer labels int64 ``[B]``, float scalars float32 ``[B]``,
``key`` and string/binary columns lists, None kept). As in record mode, each reader (rank and
DataLoader worker) batches its own records, so its last batch may be short; ``drop_last=True``
leaves those out. Tensor columns are gathered straight into the batch's tensor (in shared memory
in a DataLoader worker, as ``default_collate`` does): one copy per record less than records +
``default_collate``, and no per-record Python work, which is the fast way to train (see
``docs/benchmark.md``, "Training loader").

Memory
------
Only the requested columns are read (Parquet column projection), one row group at a time. A
reader holds one row group (Arrow's memory, released once copied), the next one (read ahead in
a background thread), the shuffle buffer's storage (``shuffle_buffer`` + the largest row group,
allocated once; records stay in their slot until they leave) and the block or batch being
yielded: about ``(shuffle_buffer + 4 * rows_per_group) * record_bytes`` (with ``batch_size``,
plus a batch). Yielded record tensors are views into the block copied out for them
(``default_collate`` copies them into the batch; ``.clone()`` a record you keep); batch tensors
are their own.

Yielded records
---------------
A dict with the requested columns, in the order asked: tensor columns as torch tensors of their
stored shape ``[C, H, W]`` (stored dtype, or ``dtype`` when given), ``t`` as an int64 0-d tensor
(flow: float32 sigma * T), ``posterior_variance``/``posterior_log_variance``/``alpha_bar`` as
float32 0-d tensors, ``key`` as ``str``, ``index`` and ``draw`` as ``int``. Conditioning columns
(``source.keep``, see :mod:`pipeline.read.conditioning`): an int64 column such as ``cls`` as an
int64 0-d tensor, a null (absent member) as ``null_label`` (default -1; a dataset whose labels with
nulls include that value is refused, see :mod:`pipeline.consume.labels`); string columns (``txt``,
``json``, ``meta_json``) as ``str`` and binary ones as ``bytes``, a null as None.
``default_collate`` makes a batch's labels an int64 [B] tensor and its strings a list of str; it
cannot collate None, so a loader over captions that may be null needs
``collate_fn=pipeline.consume.dataset.collate`` (strings and None kept as lists).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.consume.labels import DEFAULT_NULL_LABEL
from pipeline.consume.recordsdir import Unit
from pipeline.output import records


def table_to_numpy(table: pa.Table, null_label: int = DEFAULT_NULL_LABEL) -> dict[str, np.ndarray]:
    """Columns of a records table as numpy: tensors [N, *shape] (zero-copy when possible),
    scalars [N], ``key`` and string/binary conditioning columns as object arrays (None for a
    null), integer conditioning columns as int64 with ``null_label`` for a null."""
    out = {}
    for name in table.column_names:
        col = table[name]
        if records.is_tensor(col.type):
            out[name] = records.tensor_to_numpy(col)
        elif pa.types.is_fixed_size_list(col.type):  # buckets' [H, W] pairs: an [N, 2] array
            flat = pa.concat_arrays(col.chunks).flatten() if col.num_chunks else []
            out[name] = np.asarray(flat, dtype=col.type.value_type.to_pandas_dtype()).reshape(
                -1, col.type.list_size
            )
        elif pa.types.is_integer(col.type) and col.null_count:
            out[name] = col.fill_null(null_label).to_numpy()
        else:
            out[name] = col.to_numpy()
    return out


def collate(batch: Sequence[dict]) -> dict:
    """A DataLoader ``collate_fn`` for records with conditioning columns that may be null:
    columns holding str, bytes or None stay lists (None kept), the rest go through
    ``default_collate`` (tensors stacked, ints to a tensor)."""
    from torch.utils.data import default_collate

    out = {}
    for name in batch[0]:
        values = [b[name] for b in batch]
        if any(v is None or isinstance(v, (str, bytes)) for v in values):
            out[name] = values
        else:
            out[name] = default_collate(values)
    return out


INT_COLUMNS = ("index", "draw")  # yielded as Python ints in record mode


def record_dicts(
    block: dict, rows: slice | np.ndarray, columns: Sequence[str], dtype: torch.dtype | None
) -> Iterator[dict]:
    """Record mode: one dict of ``columns`` per row of ``block`` (see *Yielded records*). The
    rows are copied out of the block once (views for every record: ``unbind`` of one tensor per
    column), a floating tensor column cast to ``dtype`` on the way."""
    seqs = []
    for name in columns:
        values = block[name]
        if values.dtype == object:  # key, string and binary columns (None: a null)
            seqs.append(values[rows].tolist())
        elif name in INT_COLUMNS:
            seqs.append(values[rows].tolist())
        elif name == "t" and values.dtype.kind in "iu":  # DDPM; flow's t is float32 sigma*T
            seqs.append(torch.from_numpy(values[rows].astype(np.int64)).unbind(0))
        elif values.ndim > 1 and values.dtype.kind == "f" and _casts(values, dtype):
            seqs.append(to_tensor(take_rows(values, rows)).to(dtype).unbind(0))
        else:
            values = values[rows]
            if isinstance(rows, slice):  # Arrow's read-only memory: torch wants a copy
                values = values.copy()
            seqs.append(torch.from_numpy(values).unbind(0))
    for row in zip(*seqs):
        yield dict(zip(columns, row))


def _casts(values: np.ndarray, dtype: torch.dtype | None) -> bool:
    return dtype not in (None, torch_dtype(values.dtype))


def take_rows(values: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of a column block: a view for a slice, a gathered copy for an index array."""
    return values[rows] if isinstance(rows, slice) else np.take(values, rows, axis=0, mode="clip")


def to_tensor(values: np.ndarray) -> torch.Tensor:
    """A torch view of ``values``, which may be read-only Arrow memory: only to read from (cast
    or copy), never handed out."""
    if values.flags.writeable:
        return torch.from_numpy(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(values)


def empty_tensor(shape: tuple, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor; ``shared``: in shared memory, as ``default_collate`` allocates a
    batch in a DataLoader worker, so that sending it to the main process does not copy it."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what default_collate uses
    if not shared or new_shared is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(new_shared(nbytes), 0, shape)


@functools.cache
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


class Batcher:
    """Fills collated batches of ``size`` records from (column block, rows) pieces.

    Tensor columns are gathered straight into the batch's tensor (cast to ``dtype``); the other
    columns are kept as pieces and collated when the batch is full, as :func:`collate` collates
    records: int columns (``t``, ``index``, ``draw``, labels) as int64 tensors, float scalars as
    float32 tensors, str/bytes/None columns as lists."""

    def __init__(self, columns: Sequence[str], size: int, dtype, shared: bool):
        self.columns, self.size, self.dtype, self.shared = list(columns), size, dtype, shared
        self.fill = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.pieces: dict[str, list] = {}

    def add(self, block: dict, rows: slice | np.ndarray) -> Iterator[dict]:
        """Append ``rows`` of ``block`` (a slice with a stop, or an index array); yields every
        batch that becomes full."""
        if isinstance(rows, slice):
            start, n = rows.start or 0, rows.stop - (rows.start or 0)
        else:
            start, n = 0, len(rows)
        pos = 0
        while pos < n:
            k = min(self.size - self.fill, n - pos)
            if isinstance(rows, slice):
                part = slice(start + pos, start + pos + k)
            else:
                part = rows[pos : pos + k]
            self._write(block, part, k)
            pos += k
            if self.fill == self.size:
                yield self.finish()

    def _write(self, block: dict, part: slice | np.ndarray, k: int) -> None:
        lo, hi = self.fill, self.fill + k
        for name in self.columns:
            values = block[name]
            if values.ndim == 1:
                self.pieces.setdefault(name, []).append(take_rows(values, part))
                continue
            out = self.tensors.get(name)  # a tensor column: straight into the batch's tensor
            if out is None:
                cast = self.dtype if values.dtype.kind == "f" else None  # not int8 masks
                dtype = cast or torch_dtype(values.dtype)
                shape = (self.size, *values.shape[1:])
                out = self.tensors[name] = empty_tensor(shape, dtype, self.shared)
            if out.dtype != torch_dtype(values.dtype):
                out[lo:hi].copy_(to_tensor(take_rows(values, part)))  # gather, then cast (torch's)
            elif isinstance(part, slice):
                out.numpy()[lo:hi] = values[part]
            else:
                # mode="clip": the indices are valid, and numpy buffers ``out`` with "raise"
                np.take(values, part, axis=0, out=out.numpy()[lo:hi], mode="clip")
        self.fill = hi

    def finish(self) -> dict | None:
        """The batch filled so far (a short one at the end), or None when there is none."""
        n, self.fill = self.fill, 0
        if n == 0:
            return None
        tensors, self.tensors = self.tensors, {}
        pieces, self.pieces = self.pieces, {}
        batch = {}
        for name in self.columns:
            if name in tensors:
                batch[name] = tensors[name][:n]
                continue
            values = np.concatenate(pieces[name])
            if values.dtype == object:  # key, string and binary columns (None: a null)
                batch[name] = values.tolist()
            elif values.dtype.kind in "iu":
                batch[name] = torch.from_numpy(values.astype(np.int64))
            else:
                batch[name] = torch.from_numpy(values)
        return batch


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype (e.g. torch.float32), got {dtype!r}"
        )
    return dtype


class ShuffleBuffer:
    """One shuffle buffer (see :meth:`PrecomputedDataset._pieces`): a storage of ``size`` +
    ``largest`` slots allocated like ``block``'s columns, the kept records' slots in buffer
    order."""

    def __init__(self, block: dict, size: int, largest: int):
        cap = size + largest
        self.size, self.largest = size, largest
        self.storage = {k: np.empty((cap, *v.shape[1:]), v.dtype) for k, v in block.items()}
        self.free = np.arange(cap)  # free slots of the storage
        self.kept = self.free[:0]  # the buffer: its records' slots, in buffer order

    def add(self, block: dict, rng: np.random.Generator) -> np.ndarray:
        """Merge ``block`` into the buffer; returns the slots emitted (valid until the next
        call)."""
        n = len(next(iter(block.values())))
        new, self.free = self.free[:n], self.free[n:]
        for k, v in block.items():
            self.storage[k][new] = v
        union = np.concatenate([self.kept, new])
        order = rng.permutation(len(union))
        emit = max(len(union) - self.size, 0)
        out, self.kept = union[order[:emit]], union[order[emit:]]
        self.free = np.concatenate([self.free, out])
        return out


def buffer_quotas(units: Sequence[Unit], shapes: Sequence[tuple], total: int) -> dict[tuple, int]:
    """Shape -> its shuffle buffer's size: ``total`` split in proportion to the rows of each
    shape among ``units`` (all of it with one shape)."""
    rows: dict[tuple, int] = {}
    for u in units:
        rows[shapes[u.file]] = rows.get(shapes[u.file], 0) + u.num_rows
    whole = sum(rows.values()) or 1
    return {k: total if len(rows) == 1 else total * n // whole for k, n in rows.items()}


def rows_len(rows: slice | np.ndarray) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def head_rows(rows: slice | np.ndarray, n: int) -> slice | np.ndarray:
    return slice(rows.start, rows.start + n) if isinstance(rows, slice) else rows[:n]
