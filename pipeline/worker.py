"""The shard worker: one Ray actor turns whole shards into committed Parquet files.

:meth:`ShardWorker.setup` loads once (schedule tables, keyed noise, device, batch size, output
filesystem, the stages); :meth:`ShardWorker.process` takes one shard through the stages of
:mod:`pipeline.stages`: read (decoded ahead by a reader thread when ``read_ahead`` allows) ->
batch (``batch_size``, capped by free memory on a GPU) -> noise (t, eps drawn on the CPU, x_t and
the posterior on the device) -> write (row groups into a temporary file) -> commit. The worker
writes its own file, so no tensor travels through Ray's object store; the driver only receives a
small summary.

A shard whose stream breaks after some samples is written but not committed: the driver decides
(retry it, or commit it as ``partial`` on its last attempt, see :mod:`pipeline.precompute`).

torch is imported where it is used (:meth:`ShardWorker.setup`, :func:`resolve_device`), not with
the module: the driver imports :class:`ShardWorker` to start the actors and never loads torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from . import __version__
from .fs import identity
from .manifest import OutputDir
from .memory import fit_batch_size, host_memory_share, working_set_per_sample
from .records import noise_from_metadata, record_schema, schedule_from_metadata
from .source import shard_id
from .stages import (
    NoiseStage,
    ParquetSink,
    ReadStage,
    RecordOptions,
    Tally,
    batches,
    commit,
    elapsed,
)
from .tarstream import ShardReadError, ShardTimeoutError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(requested: str, gpu_ids: Sequence, cuda_available: bool) -> torch.device:
    """The torch device for an actor, from the GPU ids Ray assigned it.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned ids, so the first assigned GPU is ``cuda:0``
    inside the actor. ``requested`` is ``ray.device``: auto | cuda | cpu.
    """
    import torch

    if requested == "cpu":
        return torch.device("cpu")
    if gpu_ids and cuda_available:
        return torch.device("cuda", 0)
    if requested == "cuda":
        why = "Ray assigned this actor no GPU" if not gpu_ids else "torch sees no CUDA device"
        raise RuntimeError(
            f"ray.device=cuda but {why} (assigned GPU ids: {list(gpu_ids)}); set "
            "ray.gpus_per_actor=1 on a node with GPUs and a CUDA build of torch, or use "
            "ray.device=auto|cpu"
        )
    return torch.device("cpu")


class ShardWorker:
    """One pipeline worker: a chain of stages. ``cfg`` is the resolved config as a plain dict.

    ``metadata``: the process description shared by every file (see records.py), including the
    sample shape [C, ...] the driver fixed (every file of a dataset has one shape).
    """

    def __init__(self, cfg: dict, metadata: dict):
        self.cfg, self.metadata = cfg, metadata
        self.shape = [int(s) for s in metadata["shape"]]
        self.setup()

    def setup(self) -> None:
        import torch

        cfg = self.cfg
        # Rebuilt from the driver's process description (checks the betas hash on this node).
        schedule = schedule_from_metadata(self.metadata)
        noise = noise_from_metadata(self.metadata)
        # Threads from the declared CPU budget, not from the host: oversubscribing cores slows
        # torch's elementwise kernels by an order of magnitude.
        torch.set_num_threads(max(1, int(cfg["ray"]["cpus_per_actor"])))
        gpu_ids = _assigned_gpus()
        self.device = resolve_device(cfg["ray"]["device"], gpu_ids, torch.cuda.is_available())
        per_sample = working_set_per_sample(self.shape, noise.draws)
        if self.device.type == "cuda":
            free, where = torch.cuda.mem_get_info(self.device)[0], "GPU"
        else:
            free, where = host_memory_share(cfg["ray"]["cpus_per_actor"]), "host"
        self.batch_size = fit_batch_size(cfg["batch_size"], per_sample, free, where=where)
        if self.batch_size < cfg["batch_size"]:
            log.warning(
                "batch_size %d does not fit in the %s memory available: using %d",
                cfg["batch_size"], where, self.batch_size,
            )  # fmt: skip
        self.encoder, read_shape = None, self.shape
        enc = self.metadata.get("encoder")
        if enc:  # a frozen VAE turns decoded samples into latents (pipeline/encoder.py)
            from .encoder import EncodeStage

            self.encoder = EncodeStage(
                enc,
                device=self.device,
                on_error=cfg["on_error"],
                gpu_share=cfg["ray"]["gpus_per_actor"],
            )
            read_shape = enc["input_shape"]
        self.store_dist = bool(enc and enc["store_dist"])
        self.out = OutputDir(cfg["output"]["dir"])
        self.text = None
        if self.metadata.get("text"):  # captions -> embeddings, one table per shard
            from .text_encode import TextStage
            from .text_store import build, text_schema, write_uncond

            tmeta = self.metadata["text"]
            self.text = TextStage(tmeta, device=self.device, on_error=cfg["on_error"])
            write_uncond(self.out, build(text_schema(tmeta), self.text.uncond_columns()))
        self.reader = ReadStage(cfg, read_shape, self.batch_size)
        options = RecordOptions(
            dtype=cfg["output"]["dtype"],
            store_x0=cfg["output"]["store_x0"],
            latent=enc["latent"] if enc else None,
            store_dist=self.store_dist,
            cond_columns=tuple(self.reader.conditioning.columns),
        )
        self.noiser = NoiseStage(
            schedule=schedule, noise=noise, device=self.device, options=options
        )
        log.info("worker pid %d on device %s (Ray GPU ids %s)", os.getpid(), self.device, gpu_ids)

    def info(self) -> dict:
        """Where this worker runs: for logs and the GPU-pinning tests."""
        return {"pid": os.getpid(), "device": str(self.device), "gpu_ids": _assigned_gpus()}

    def process(self, url: str) -> dict:
        """Take one shard through the stages; returns its summary (see manifest.py).

        A complete shard is committed here. A stream that breaks before any sample raises
        :class:`ShardReadError`; one that breaks later returns the written, uncommitted result
        (``tmp`` names its file) for the driver to commit or discard.
        """
        start = time.perf_counter()
        shard = shard_id(url)
        source_identity = identity(url)  # before reading: a later change is seen on resume
        o = self.cfg["output"]
        meta = {**self.metadata, "source": {**self.metadata["source"], "url": url, "shard": shard}}
        schema = record_schema(
            self.shape, o["dtype"], o["store_x0"], meta, store_dist=self.store_dist
        )
        tally = Tally(shard)
        sink = ParquetSink(self.out, shard, schema, o)
        text_sink = None
        try:
            if self.text is not None:
                from .text_store import TextSink

                self.text.start(shard)
                text_sink = TextSink(self.out, shard, self.metadata["text"])
            with self.reader.read(url) as items:
                for batch in batches(items, self.batch_size, tally):
                    text_cols = None
                    if self.text is not None:  # before the VAE: the caption is in Sample.cond
                        batch, text_cols = self.text.process_batch(shard, batch, tally.rejects)
                        if not batch:
                            continue
                    if self.encoder is not None:  # -> latents; non-finite ones are rejects
                        conds = {s.index: s.cond for s in batch}  # kept members (source.keep)
                        batch, rejected = self.encoder.process(shard, batch)
                        batch = [replace(s, cond=conds[s.index]) for s in batch]
                        tally.rejects.extend(rejected)
                        if not batch:
                            continue
                    cols = self.noiser.process(shard, batch, tally)
                    tally.records += sink.write(cols)
                    if text_sink is not None:  # the samples whose records were written
                        text_sink.write(text_cols, cols["index"])
            if tally.read_error is not None and tally.samples == 0:
                error = ShardReadError if tally.retryable else ShardTimeoutError
                raise error(tally.read_error, url=url)
            sink.close()
            if text_sink is not None:
                text_sink.close()
        except BaseException:
            sink.abort()
            if text_sink is not None:
                text_sink.abort()
            raise
        result = {
            "url": url,
            "shard": shard,
            "file": sink.name,
            "tmp": sink.tmp,
            "status": "ok" if tally.read_error is None else "partial",
            "samples": tally.samples,
            "records": tally.records,
            "rejected": sum(r["key"] is not None for r in tally.rejects),
            "rejects": tally.rejects,
            "error": tally.read_error,
            "retryable": tally.retryable,
            "seconds": elapsed(start),
            "worker": self.info(),
            "config_hash": self.metadata["config_hash"],
            "source_identity": source_identity,
            "library_version": __version__,
        }
        if text_sink is not None:  # committed with the shard, before its data file and marker
            result["side_files"] = [[text_sink.tmp, text_sink.name]]
            result["text"] = self.text.stats()
        return commit(self.out, result) if tally.read_error is None else result


def _assigned_gpus() -> list:
    """GPU ids Ray assigned to the current worker ([] outside Ray or without GPUs)."""
    import ray

    if not ray.is_initialized():
        return []
    return list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
