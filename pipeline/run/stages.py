"""The stages of a worker (:mod:`pipeline.run.stage` defines their interface): read -> batch ->
noise -> write -> commit.

* :class:`ReadStage`: a shard's samples in tar order (:func:`pipeline.read.source.iter_shard`),
  decoded ahead by a reader thread when ``read_ahead`` allows (:mod:`pipeline.read.prefetch`); the
  source of the chain's batches.
* :func:`batches`: samples in batches of ``batch_size``; rejects and a stream fault go to a
  :class:`Tally` instead of ending the shard's good samples.
* :class:`NoiseStage`: (t, eps) drawn on the CPU from the keyed streams, x_t and the posterior on
  the device (:func:`compute_records`).
* :class:`WriteStage`: a :class:`ParquetSink` per shard, row groups of exactly
  ``rows_per_group`` rows into a temporary file.
* commit: rejects part -> rename -> marker (the commit point: :mod:`pipeline.output.commit`).

The encoders are stages of their own modules (:mod:`pipeline.encode.encode_stage`,
:mod:`pipeline.encode.text_encode`). torch (and :mod:`pipeline.noising.diffusion`) is imported by
the functions that compute, not with the module: the driver calls :func:`commit` and :func:`discard`
and never loads torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.encode.device import synchronize, to_device, to_host
from pipeline.noising.noise import KeyedNoise
from pipeline.output.commit import quietly
from pipeline.output.contracts import DataFile, ShardResult
from pipeline.output.manifest import OutputDir, OutputWriteError
from pipeline.output.records import DTYPES, build_table, nonfinite_columns, writer_options
from pipeline.read.conditioning import Conditioning
from pipeline.read.decoders import make_decoder
from pipeline.read.prefetch import ReadAhead
from pipeline.read.source import Reject, Sample, iter_shard, shard_id
from pipeline.read.tarstream import ReadLimits, ShardReadError, ShardTimeoutError
from pipeline.run.stage import Batch, Stage, reject_row

if TYPE_CHECKING:
    import torch

    from pipeline.run.config import OutputConfig, PrecomputeConfig

log = logging.getLogger(__name__)


def read_ahead(cfg: PrecomputeConfig) -> int:
    """Batches decoded ahead by a reader thread: ``read_ahead``, or when null 2 if the actor has
    a second CPU for it, else 0 (measured: with one CPU the thread only adds GIL contention)."""
    if cfg.read_ahead is not None:
        return int(cfg.read_ahead)
    return 2 if cfg.ray.cpus_per_actor >= 2 else 0


@dataclass
class Tally:
    """What one shard's read produced besides its samples: counts, rejects, a stream fault."""

    shard: str
    samples: int = 0  # every group of the shard: good samples and rejects
    rejects: list = field(default_factory=list)
    read_error: str | None = None  # the stream broke after ``samples`` groups
    retryable: bool = True  # False when the read ran out of time: a retry would too


class ReadStage:
    """Decoded samples of one shard, in tar order (see :func:`pipeline.read.source.iter_shard`).

    ``cfg``: the job's typed config; the readers of :mod:`pipeline.read` take its typed
    ``source`` group (:class:`pipeline.run.config.ImagesSource` or ``ArraysSource``)."""

    def __init__(self, cfg: PrecomputeConfig, shape: Sequence[int], batch_size: int):
        self.source, self.on_error = cfg.source, cfg.on_error
        self.shape, self.seed = shape, cfg.seed
        self.conditioning = Conditioning.from_source(self.source)  # kept members -> Sample.cond
        self.limits = ReadLimits.from_source(self.source)  # member size, name length, time
        self.depth = read_ahead(cfg) * batch_size  # samples decoded ahead (0: inline)

    def read(self, url: str):
        """A context manager over the shard's :class:`Sample`/:class:`Reject` items."""
        from pipeline.read.buckets import Bucketing  # keyed crops and flips: on (seed, shard, key)

        bucketing = Bucketing.from_source(self.source, self.seed, shard_id(url))
        items = iter_shard(
            url,
            make_decoder(self.source, self.shape, bucketing),
            on_error=self.on_error,
            limits=self.limits,
            conditioning=self.conditioning,
        )
        if self.depth > 0:
            return ReadAhead(items, self.depth, name="shard-reader")
        return nullcontext(items)


def batches(items: Iterator, size: int, tally: Tally) -> Iterator[list[Sample]]:
    """``items`` in batches of ``size`` samples of one shape (aspect-ratio buckets: a batch per
    bucket fills up, each bucket's samples in tar order; the partial batches at the end in order
    of their first sample); rejects go to ``tally``. A stream fault (:class:`ShardReadError`) is
    recorded in ``tally.read_error`` after the last full batch and ends the shard: the samples
    read before it are still yielded."""
    pending: dict[tuple, list[Sample]] = {}  # shape -> its batch filling up
    try:
        for item in items:
            tally.samples += 1
            if isinstance(item, Reject):
                tally.rejects.append(reject_row(tally.shard, item.key, item.index, item.reason))
                continue
            batch = pending.setdefault(item.array.shape, [])
            batch.append(item)
            if len(batch) >= size:
                yield batch
                del pending[item.array.shape]
    except ShardReadError as exc:
        tally.read_error = str(exc)
        tally.retryable = not isinstance(exc, ShardTimeoutError)
    yield from sorted(pending.values(), key=lambda b: b[0].index)


@dataclass(frozen=True)
class RecordOptions:
    """What a record holds besides the forward process: the tensors' ``dtype``, ``store_x0``,
    an encoder's ``latent`` mode (sample | mean; None without an encoder) and ``store_dist``,
    the conditioning columns (``source.keep``) and the extra ``targets``."""

    dtype: str
    store_x0: bool = False
    latent: str | None = None
    store_dist: bool = False
    cond_columns: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()  # output.targets beyond x_0 (v); flow always has velocity


def compute_records(
    process,
    noise: KeyedNoise,
    shard: str,
    samples: Sequence[Sample],
    *,
    device: torch.device,
    options: RecordOptions,
) -> dict[str, np.ndarray | list]:
    """The record columns for a batch of samples (N samples -> N*K rows, sample-major).

    ``process``: the forward process, a :class:`pipeline.noising.process.GaussianProcess`, a
    :class:`pipeline.noising.process.Processes` (the batch's shape picks its grid: Flux's dynamic
    shift) or a DDPM :class:`pipeline.noising.schedule.NoiseSchedule`. DDPM records carry ``t``
    (int32 index) and ``alpha_bar``; flow records ``t = sigma * T`` (float32), ``sigma`` and the
    target ``velocity = eps - x_0``. Every record carries ``snr``; ``options.targets`` adds
    ``v = alpha eps - sigma x_0``.

    t and eps are drawn on the CPU from the keyed streams (so they are bit-identical on every
    device); x_t and the posterior mean are computed on ``device``. On CUDA the inputs go through
    pinned host memory with asynchronous copies, the results come back the same way, and the
    stream is synchronised once per batch, before the columns are handed to Arrow.

    With an encoder (``options.latent``: sample | mean) the samples are
    :class:`pipeline.encode.encoder.Latent` (the scaled latent mean and std): ``x_0 = mean + std *
    n`` with ``n`` keyed per record like eps but in its own domain (:meth:`KeyedNoise.latent_noise`,
    on the CPU), or ``x_0 = mean``;
    ``options.store_dist`` adds the ``latent_mean`` and ``latent_std`` columns.

    ``options.cond_columns``: the conditioning columns (``source.keep``), each sample's ``cond``
    value repeated on its K rows; a sample without them (lost on the way) is a KeyError, never a
    null.
    """
    import torch

    from pipeline.noising.diffusion import q_posterior, q_sample, v_target, velocity
    from pipeline.noising.process import resolve

    latent, dtype = options.latent, options.dtype
    keys = [s.key for s in samples]
    indices = np.array([s.index for s in samples], dtype=np.int64)
    x0 = np.stack([s.array for s in samples])  # [N, C, ...] float32
    proc = resolve(process, x0.shape[1:])
    K = noise.draws
    digests = noise.digests(shard, keys)
    t = noise.timesteps(digests, shard, indices)  # [N*K]
    eps = noise.noise(digests, x0.shape[1:])  # [N*K, C, ...] float32, always drawn on the CPU
    if K > 1:
        x0 = np.repeat(x0, K, axis=0)
    if latent is not None:  # encoder.Latent samples: x0 holds the scaled mean, std beside it
        z_mean, z_std = x0, np.stack([s.std for s in samples])
        if K > 1:
            z_std = np.repeat(z_std, K, axis=0)
        if latent == "sample":  # one latent draw per record: z = mean + std * n
            x0 = z_mean + z_std * noise.latent_noise(shard, keys, x0.shape[1:])
    out = DTYPES[dtype][0]
    torch_out = torch.float16 if out == np.float16 else torch.float32
    x0_h, eps_h = torch.from_numpy(x0), torch.from_numpy(eps)
    x0_d, eps_d = to_device(x0_h, device), to_device(eps_h, device)
    t_d = torch.from_numpy(t)
    x_t = q_sample(proc, x0_d, t_d, eps_d)  # float32: the posterior uses the unrounded x_t
    mean, _, _ = q_posterior(proc, x0_d, x_t, t_d, out_dtype=torch_out)
    x_t_h, mean_h = to_host(x_t.to(torch_out)), to_host(mean)
    targets = {}
    if proc.family == "flow":
        targets["velocity"] = to_host(velocity(x0_d, eps_d, out_dtype=torch_out))
    if "v" in options.targets:
        targets["v"] = to_host(v_target(proc, x0_d, t_d, eps_d, out_dtype=torch_out))
    synchronize(device)  # the host copies are complete
    cols = {
        "key": [k for k in keys for _ in range(K)],
        "index": np.repeat(indices, K),
        "draw": np.tile(np.arange(K, dtype=np.int32), len(keys)),
        "t": proc.t_column(t),
        "x_t": x_t_h.numpy(),
        "epsilon": eps_h.to(torch_out).numpy(),  # torch's float16 cast is ~2.5x numpy's
        "posterior_mean": mean_h.numpy(),
        "posterior_variance": proc.posterior_variance[t].astype(np.float32),
        "posterior_log_variance": proc.posterior_log_variance_clipped[t].astype(np.float32),
        "snr": proc.snr[t].astype(np.float32),
    }
    if proc.family == "flow":
        cols["sigma"] = proc.sigma[t].astype(np.float32)
    else:
        cols["alpha_bar"] = proc.schedule.alphas_cumprod[t].astype(np.float32)
    if options.store_x0:
        cols["x_0"] = x0_h.to(torch_out).numpy()
    for name, value in targets.items():
        cols[name] = value.numpy()
    if options.store_dist:
        cols["latent_mean"] = torch.from_numpy(z_mean).to(torch_out).numpy()
        cols["latent_std"] = torch.from_numpy(z_std).to(torch_out).numpy()
    for name in options.cond_columns:
        cols[name] = [s.cond[name] for s in samples for _ in range(K)]
    return cols


def split_nonfinite(cols: dict, draws: int, dtype: str) -> tuple[dict, list[tuple[str, int, str]]]:
    """Drop the samples any of whose records has a value that does not fit ``dtype`` (finite
    inputs above 65504 overflow float16 to Inf): all K draws of such a sample go, so records
    stay K per sample. The columns checked are those the registry marks (tensors by default,
    :func:`pipeline.output.records.nonfinite_columns`). Returns the kept columns and ``(key, index,
    reason)`` per dropped sample."""
    n = len(cols["t"])
    bad = np.zeros(n, dtype=bool)
    for name in nonfinite_columns(cols):
        bad |= ~np.isfinite(cols[name].reshape(n, -1)).all(axis=1)
    if not bad.any():
        return cols, []
    bad_sample = bad.reshape(-1, draws).any(axis=1)
    keep = ~np.repeat(bad_sample, draws)
    hint = " (use output.dtype=float32)" if dtype == "float16" else ""
    reason = f"record values do not fit output.dtype={dtype}: overflow to Inf{hint}"
    dropped = [
        (cols["key"][i * draws], int(cols["index"][i * draws]), reason)
        for i in np.flatnonzero(bad_sample)
    ]
    kept = {
        k: [v for v, m in zip(vals, keep) if m] if isinstance(vals, list) else vals[keep]
        for k, vals in cols.items()
    }
    return kept, dropped


class NoiseStage(Stage):
    """The forward process for batches of samples: :func:`compute_records` with this actor's
    process (a :class:`pipeline.noising.process.Processes`: a grid per shape), keyed noise, device
    and record options."""

    def __init__(self, *, process, noise, options: RecordOptions):
        self.processes, self.noise, self.options = process, noise, options
        self.device = None

    def setup(self, device: torch.device) -> None:
        self.device = device

    def process(self, batch: Batch) -> Batch:
        """The batch with its record columns; samples whose records overflow the output dtype
        are rejects instead (whatever ``on_error``: the input was good)."""
        cols = compute_records(
            self.processes,
            self.noise,
            batch.shard,
            batch.samples,
            device=self.device,
            options=self.options,
        )
        cols, dropped = split_nonfinite(cols, self.noise.draws, self.options.dtype)
        if dropped:
            where = {s.index: i for i, s in enumerate(batch.samples)}
            batch = batch.reject([where[i] for _, i, _ in dropped], [why for *_, why in dropped])
        return replace(batch, records=cols)


class RowGroupWriter:
    """Writes tables to a ParquetWriter in row groups of exactly ``rows`` rows (the last may be
    short)."""

    def __init__(self, writer: pq.ParquetWriter, rows: int):
        self.writer, self.rows, self.pending = writer, rows, []
        self.pending_rows = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.rows:
            merged = pa.concat_tables(self.pending)
            full = (merged.num_rows // self.rows) * self.rows
            self.writer.write_table(merged.slice(0, full), row_group_size=self.rows)
            rest = merged.slice(full)
            self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.pending_rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.rows)
        self.writer.close()

    def abort(self) -> None:
        """Close the file after a failure without writing what is pending."""
        self.writer.close()


class ParquetSink:
    """One shard's records into a temporary Parquet file of ``out``; :meth:`close` leaves it
    complete under :attr:`tmp`, :meth:`abort` removes it. Errors name the final file.
    ``output``: the typed ``output`` group (compression, tensor_compression, rows_per_group)."""

    def __init__(
        self,
        out: OutputDir,
        shard: str,
        schema: pa.Schema,
        output: OutputConfig,
        name: str | None = None,
    ):
        self.out, self.schema = out, schema
        self.name = out.data_name(shard) if name is None else name  # or a bucket's file
        self.tmp = out.tmp_name(self.name)
        self.records = 0
        options = writer_options(schema, output.compression, output.tensor_compression)
        try:
            writer = pq.ParquetWriter(out.path(self.tmp), schema, filesystem=out.fs, **options)
        except OSError as exc:
            raise self.error(exc) from exc
        self.rows = RowGroupWriter(writer, output.rows_per_group)

    def write(self, cols: dict) -> int:
        """Append a batch's columns; returns its row count."""
        table = build_table(self.schema, cols)
        try:
            self.rows.write(table)
        except OSError as exc:
            raise self.error(exc) from exc
        self.records += table.num_rows
        return table.num_rows

    def close(self) -> None:
        try:
            self.rows.close()
        except OSError as exc:
            raise self.error(exc) from exc

    def abort(self) -> None:
        """Nothing of this attempt may stay; cleanup errors must not hide the first one."""
        quietly(self.rows.abort)
        quietly(self.out.remove, self.tmp)

    def error(self, exc: BaseException) -> OutputWriteError:
        return OutputWriteError(f"cannot write {self.out.display(self.name)}: {exc}")


class WriteStage(Stage):
    """The records of each shard into its Parquet file(s).

    Unbucketed: one :class:`ParquetSink` ``<shard>.parquet`` per shard, opened at ``start``.
    With aspect-ratio buckets (``bucketed``): one per bucket the shard uses,
    ``<shard>.<H>x<W>.parquet`` (:func:`pipeline.read.buckets.file_suffix` of the batch's
    ``target_size``), opened at that bucket's first batch with the schema of its sample shape; a
    batch holds one bucket (:func:`batches` groups by shape).

    ``output``: the typed ``output`` group the files are written with; ``schema(url, shard,
    shape)`` gives a file's Arrow schema (its metadata names the source
    file); ``finish`` puts the files' final and temporary names and the record counts in the
    result: ``file`` and ``tmp``, or bucketed ``tmp`` None and ``files``, one ``{"name", "tmp",
    "bucket", "shape", "records"}`` per bucket used, in grid order (by aspect ratio)."""

    def __init__(self, out: OutputDir, schema, output: OutputConfig, *, shape, bucketed=False):
        self.out, self.schema, self.output = out, schema, output
        self.shape, self.bucketed = [int(d) for d in shape], bool(bucketed)
        self.sinks: dict = {}
        self.records = 0

    def start(self, shard: str, url: str) -> None:
        self.shard, self.url, self.sinks, self.records = shard, url, {}, 0
        if not self.bucketed:
            schema = self.schema(url, shard, self.shape)
            self.sinks[None] = ParquetSink(self.out, shard, schema, self.output)

    def process(self, batch: Batch) -> Batch:
        self.records += self._sink(batch.records).write(batch.records)
        return batch

    def _sink(self, cols: dict) -> ParquetSink:
        if not self.bucketed:
            return self.sinks[None]
        sizes = {tuple(s) for s in cols["target_size"]}
        if len(sizes) != 1:
            raise ValueError(f"shard {self.shard}: a batch of buckets {sorted(sizes)}")
        bucket = sizes.pop()
        if bucket not in self.sinks:
            from pipeline.read.buckets import file_suffix

            shape = list(cols["x_t"].shape[1:])
            self.sinks[bucket] = ParquetSink(
                self.out,
                self.shard,
                self.schema(self.url, self.shard, shape),
                self.output,
                name=f"{self.shard}.{file_suffix(bucket)}.parquet",
            )
        return self.sinks[bucket]

    def finish(self, result: ShardResult) -> None:
        for sink in self.sinks.values():
            sink.close()
        result.records = self.records
        if not self.bucketed:
            sink = self.sinks[None]
            result.files = [DataFile(sink.name, sink.records, tmp=sink.tmp)]
            return
        order = sorted(self.sinks.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0]))
        result.bucketed = True
        result.files = [
            DataFile(s.name, s.records, bucket=list(b), tmp=s.tmp,
                     shape=[int(d) for d in s.schema.field("x_t").type.shape])
            for b, s in order
        ]  # fmt: skip

    def abort(self) -> None:
        for sink in self.sinks.values():
            sink.abort()


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 3)
