"""The shard worker: one Ray actor turns whole shards into committed Parquet files.

Like a NeMo Curator stage, :meth:`ShardWorker.setup` loads once (schedule tables, keyed noise,
device, batch size, output filesystem) and :meth:`ShardWorker.process` handles one shard: stream
its samples (decoded ahead by a reader thread when ``read_ahead`` allows, see
:mod:`pipeline.prefetch`), batch them (``batch_size``, capped by free memory on a GPU), draw
(t, eps), compute x_t and the posterior on the device, and write row groups as they fill. The worker writes its own file, so no tensor travels through Ray's
object store; the driver only receives a small summary.

Commit protocol (see :mod:`pipeline.manifest`): Parquet to a temporary name -> rejects part ->
rename the Parquet into place -> the marker ``_shards/<shard>.json`` (the commit point).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import __version__
from .diffusion import q_posterior, q_sample
from .manifest import OutputDir, OutputWriteError
from .noise import KeyedNoise
from .prefetch import ReadAhead
from .records import (
    DTYPES,
    TENSOR_COLUMNS,
    build_table,
    noise_from_metadata,
    record_schema,
    schedule_from_metadata,
)
from .schedule import NoiseSchedule
from .source import ArrayDecoder, ImageDecoder, Reject, Sample, ShardReadError, iter_shard, shard_id

log = logging.getLogger(__name__)


def make_decoder(source: dict, shape: Sequence[int] | None = None):
    """A fresh decoder for one shard, from the ``source`` config group."""
    if source["kind"] == "images":
        return ImageDecoder(
            resolution=source["resolution"],
            channels=source["channels"],
            normalize=source["normalize"],
            alpha=source["alpha"],
        )
    shape = shape if shape is not None else source.get("shape")
    return ArrayDecoder(
        shape=tuple(shape) if shape is not None else None,
        scale=source["scale"],
        shift=source["shift"],
    )


def resolve_device(requested: str, gpu_ids: Sequence, cuda_available: bool) -> torch.device:
    """The torch device for an actor, from the GPU ids Ray assigned it.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned ids, so the first assigned GPU is ``cuda:0``
    inside the actor. ``requested`` is ``ray.device``: auto | cuda | cpu.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if gpu_ids and cuda_available:
        return torch.device("cuda", 0)
    if requested == "cuda":
        why = "Ray assigned this actor no GPU" if not gpu_ids else "torch sees no CUDA device"
        raise RuntimeError(
            f"ray.device=cuda but {why} (assigned GPU ids: {list(gpu_ids)}); set ray.gpus_per_actor=1 "
            "on a node with GPUs and a CUDA build of torch, or use ray.device=auto|cpu"
        )
    return torch.device("cpu")


def compute_records(
    schedule: NoiseSchedule,
    noise: KeyedNoise,
    shard: str,
    samples: Sequence[Sample],
    device: torch.device,
    dtype: str,
    store_x0: bool,
) -> dict[str, np.ndarray | list]:
    """The record columns for a batch of samples (N samples -> N*K rows, sample-major).

    t and eps are drawn on the CPU from the keyed streams (so they are bit-identical on every
    device); x_t and the posterior mean are computed on ``device``. On CUDA the inputs go through
    pinned host memory with asynchronous copies, the results come back the same way, and the
    stream is synchronised once per batch, before the columns are handed to Arrow.
    """
    keys = [s.key for s in samples]
    indices = np.array([s.index for s in samples], dtype=np.int64)
    x0 = np.stack([s.array for s in samples])  # [N, C, ...] float32
    K = noise.draws
    digests = noise.digests(shard, keys)
    t = noise.timesteps(digests, shard, indices)  # [N*K]
    eps = noise.noise(digests, x0.shape[1:])  # [N*K, C, ...] float32, always drawn on the CPU
    if K > 1:
        x0 = np.repeat(x0, K, axis=0)
    out = DTYPES[dtype][0]
    torch_out = torch.float16 if out == np.float16 else torch.float32
    x0_h, eps_h = torch.from_numpy(x0), torch.from_numpy(eps)
    x0_d, eps_d = _to_device(x0_h, device), _to_device(eps_h, device)
    t_d = torch.from_numpy(t)
    x_t = q_sample(schedule, x0_d, t_d, eps_d)  # float32: the posterior uses the unrounded x_t
    mean, _, _ = q_posterior(schedule, x0_d, x_t, t_d, out_dtype=torch_out)
    x_t_h, mean_h = _to_host(x_t.to(torch_out)), _to_host(mean)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the host copies are complete
    cols = {
        "key": [k for k in keys for _ in range(K)],
        "index": np.repeat(indices, K),
        "draw": np.tile(np.arange(K, dtype=np.int32), len(keys)),
        "t": t.astype(np.int32),
        "x_t": x_t_h.numpy(),
        "epsilon": eps_h.to(torch_out).numpy(),  # torch's float16 cast is ~2.5x numpy's
        "posterior_mean": mean_h.numpy(),
        "posterior_variance": schedule.posterior_variance[t].astype(np.float32),
        "posterior_log_variance": schedule.posterior_log_variance_clipped[t].astype(np.float32),
        "alpha_bar": schedule.alphas_cumprod[t].astype(np.float32),
    }
    if store_x0:
        cols["x_0"] = x0_h.to(torch_out).numpy()
    return cols


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA copied from pinned memory, without blocking."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A device tensor in (pinned) host memory; from CUDA the copy is asynchronous: synchronise
    the stream before reading it."""
    if x.device.type != "cuda":
        return x
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return host.copy_(x, non_blocking=True)


# Device bytes per sample element and draw while a batch is computed: float32 x_0, eps, x_t and
# the posterior's temporaries, plus the output casts (a deliberate overestimate).
DEVICE_BYTES_PER_ELEMENT = 8 * 4


def fit_batch_size(requested: int, bytes_per_sample: int, free_bytes: int, fraction=0.5) -> int:
    """The batch size to use on a GPU: ``requested``, capped so that the batch's working set
    (``bytes_per_sample`` each) fits in ``fraction`` of the device's free memory."""
    fits = int(free_bytes * fraction) // max(1, bytes_per_sample)
    if fits < 1:
        raise RuntimeError(
            f"one sample needs ~{bytes_per_sample / 2**20:.1f} MiB of GPU memory but only "
            f"{free_bytes / 2**20:.1f} MiB are free; free the GPU or use ray.device=cpu"
        )
    return min(requested, fits)


class _RowGroupWriter:
    """Writes tables to a ParquetWriter in row groups of exactly ``rows`` rows (last may be short)."""

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


class ShardWorker:
    """One pipeline stage worker. ``cfg`` is the resolved config as a plain dict.

    ``metadata``: the process description shared by every file (see records.py), including the
    sample shape [C, ...] the driver fixed (every file of a dataset has one shape).
    """

    def __init__(self, cfg: dict, metadata: dict):
        self.cfg, self.metadata = cfg, metadata
        self.shape = [int(s) for s in metadata["shape"]]
        self.setup()

    def setup(self) -> None:
        cfg = self.cfg
        # Rebuilt from the driver's process description (checks the betas hash on this node).
        self.schedule = schedule_from_metadata(self.metadata)
        self.noise = noise_from_metadata(self.metadata)
        # Threads from the declared CPU budget, not from the host: oversubscribing cores slows
        # torch's elementwise kernels by an order of magnitude.
        torch.set_num_threads(max(1, int(cfg["ray"]["cpus_per_actor"])))
        gpu_ids = _assigned_gpus()
        self.device = resolve_device(cfg["ray"]["device"], gpu_ids, torch.cuda.is_available())
        self.batch_size = cfg["batch_size"]
        if self.device.type == "cuda":
            per_sample = self.noise.draws * int(np.prod(self.shape)) * DEVICE_BYTES_PER_ELEMENT
            free, _ = torch.cuda.mem_get_info(self.device)
            self.batch_size = fit_batch_size(self.batch_size, per_sample, free)
            if self.batch_size < cfg["batch_size"]:
                log.warning(
                    "batch_size %d does not fit in the GPU's free memory: using %d",
                    cfg["batch_size"], self.batch_size,
                )  # fmt: skip
        self.out = OutputDir(cfg["output"]["dir"])
        log.info("worker pid %d on device %s (Ray GPU ids %s)", os.getpid(), self.device, gpu_ids)

    def info(self) -> dict:
        """Where this worker runs: for logs and the GPU-pinning tests."""
        return {"pid": os.getpid(), "device": str(self.device), "gpu_ids": _assigned_gpus()}

    def _writer(self, tmp: str, schema: pa.Schema) -> pq.ParquetWriter:
        o = self.cfg["output"]
        compression = {
            f.name: (
                o["tensor_compression"] if f.name in (*TENSOR_COLUMNS, "x_0") else o["compression"]
            )
            for f in schema
        }
        scalars = [f.name for f in schema if f.name not in (*TENSOR_COLUMNS, "x_0")]
        return pq.ParquetWriter(
            self.out.path(tmp),
            schema,
            filesystem=self.out.fs,
            compression=compression,
            use_dictionary=["key"],
            write_statistics=scalars,
        )

    def process(self, url: str, final_attempt: bool = True) -> dict:
        """Turn one shard into a committed file; returns its summary (see manifest.py).

        A read failure raises :class:`ShardReadError` unless this is the final attempt and some
        samples were read: those are then committed and the shard is marked ``partial``.
        """
        start = time.perf_counter()
        cfg, shard = self.cfg, shard_id(url)
        meta = {**self.metadata, "source": {**self.metadata["source"], "url": url, "shard": shard}}
        schema = record_schema(self.shape, cfg["output"]["dtype"], cfg["output"]["store_x0"], meta)
        name, tmp = self.out.data_name(shard), self.out.tmp_name(self.out.data_name(shard))
        decoder = make_decoder(cfg["source"], self.shape)
        rejects: list[dict] = []
        samples = records = 0
        error = None
        batch: list[Sample] = []
        depth = read_ahead(cfg) * self.batch_size  # samples decoded ahead (0: inline)
        try:
            writer = _RowGroupWriter(self._writer(tmp, schema), cfg["output"]["rows_per_group"])
        except OSError as exc:
            raise self._write_error(name, exc) from exc
        try:

            def flush() -> None:
                nonlocal records
                cols = compute_records(
                    self.schedule, self.noise, shard, batch, self.device,
                    cfg["output"]["dtype"], cfg["output"]["store_x0"],
                )  # fmt: skip
                writer.write(build_table(schema, cols))
                records += len(cols["t"])
                batch.clear()

            try:
                with _reader(iter_shard(url, decoder, on_error=cfg["on_error"]), depth) as items:
                    for item in items:
                        samples += 1
                        if isinstance(item, Reject):
                            rejects.append(_reject(shard, item.key, item.index, item.reason))
                            continue
                        batch.append(item)
                        if len(batch) >= self.batch_size:
                            flush()
            except ShardReadError as exc:
                if not final_attempt or samples == 0:
                    raise  # retried by the driver, or recorded as failed (nothing committed)
                error = str(exc)
            if batch:
                flush()
            writer.close()
        except BaseException as exc:  # nothing of this attempt may stay: clean up, keep the cause
            _quietly(writer.writer.close)
            _quietly(self.out.remove, tmp)
            if isinstance(exc, OSError) and not isinstance(exc, ShardReadError):
                raise self._write_error(name, exc) from exc  # reading raises ShardReadError
            raise
        status = "ok" if error is None else "partial"
        if error is not None:
            rejects.append(_reject(shard, None, None, f"shard read error: {error}"))
        try:
            self.out.write_jsonl(self.out.rejects_name(shard), rejects)
            self.out.commit(tmp, name)
            summary = {
                "url": url,
                "file": name,
                "status": status,
                "samples": samples,
                "records": records,
                "rejected": sum(r["key"] is not None for r in rejects),
                "bytes": self.out.size(name),
                "seconds": round(time.perf_counter() - start, 3),
                "error": error,
                "worker": self.info(),
                "library_version": __version__,
            }
            self.out.write_json(self.out.marker_name(shard), summary)
        except OSError as exc:  # not committed: the driver retries, then removes what is left
            _quietly(self.out.remove, tmp)
            raise self._write_error(name, exc) from exc
        return summary

    def _write_error(self, name: str, exc: BaseException) -> OutputWriteError:
        return OutputWriteError(f"cannot write {self.out.display(name)}: {exc}")


def read_ahead(cfg: dict) -> int:
    """Batches decoded ahead by a reader thread: ``read_ahead``, or when null 2 if the actor has
    a second CPU for it, else 0 (measured: with one CPU the thread only adds GIL contention)."""
    if cfg["read_ahead"] is not None:
        return int(cfg["read_ahead"])
    return 2 if cfg["ray"]["cpus_per_actor"] >= 2 else 0


def _reject(shard: str, key: str | None, index: int | None, reason: str) -> dict:
    """A row of ``rejects.jsonl``: a sample (key, index) or the whole shard (None, None)."""
    return {"shard": shard, "key": key, "index": index, "reason": reason}


def _reader(items: Iterator, depth: int):
    """``items`` read ahead by a thread (see :mod:`pipeline.prefetch`), or inline if depth is 0."""
    return ReadAhead(items, depth, name="shard-reader") if depth > 0 else nullcontext(items)


def _quietly(fn, *args) -> None:
    """Best-effort cleanup after a failure: its own error must not hide the first one."""
    try:
        fn(*args)
    except Exception as exc:
        log.warning("cleanup %s%s failed: %s", getattr(fn, "__name__", fn), args, exc)


def _assigned_gpus() -> list:
    """GPU ids Ray assigned to the current worker ([] outside Ray or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
