"""The shard worker: one Ray actor turns whole shards into committed Parquet files.

:meth:`ShardWorker.setup` runs once per actor: schedule tables, keyed noise, the device Ray
assigned (:mod:`pipeline.encode.device`), the batch size (capped by free memory on a GPU), the
reader and the chain of stages (:mod:`pipeline.run.stage`), each set up on that device. The chain
is, in order, the ones the config asks for of::

    text encode (text=...) -> VAE encode (encoder=vae) -> noise -> write records -> write text

:meth:`ShardWorker.process` is a loop: read a shard (decoded ahead by a reader thread when
``read_ahead`` allows), cut it into batches, pass each batch through the chain, then let each
stage finish (close its files, add its figures) and commit. The worker writes its own files, so
no tensor travels through Ray's object store; the driver only receives a small summary.

A shard whose stream breaks after some samples is written but not committed: the driver decides
(retry it, or commit it as ``partial`` on its last attempt, see :mod:`pipeline.precompute`).

torch is imported where it is used (:meth:`ShardWorker.setup` and the stages), not with the
module: the driver imports :class:`ShardWorker` to start the actors and never loads torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from pipeline import __version__
from pipeline.encode.device import actor_device, assigned_gpus, resolve_device
from pipeline.encode.memory import fit_batch_size, host_memory_share, working_set_per_sample
from pipeline.fs import identity
from pipeline.noising.process import Processes
from pipeline.output.commit import commit, quietly
from pipeline.output.contracts import CommitMarker, ShardResult
from pipeline.output.description import ProcessMetadata, noise_from_metadata
from pipeline.output.manifest import OutputDir
from pipeline.output.records import record_schema
from pipeline.read.buckets import COLUMNS as BUCKET_COLUMNS
from pipeline.read.source import shard_id
from pipeline.read.tarstream import ShardReadError, ShardTimeoutError
from pipeline.run.stage import Batch, Stage, run_chain
from pipeline.run.stages import (
    NoiseStage,
    ReadStage,
    RecordOptions,
    Tally,
    WriteStage,
    batches,
    elapsed,
)

if TYPE_CHECKING:
    from pipeline.run.config import PrecomputeConfig

__all__ = ["ShardWorker", "resolve_device"]

log = logging.getLogger(__name__)


class ShardWorker:
    """One pipeline worker: a chain of stages. ``cfg``: the job's typed config, the dataclass
    instances of :mod:`pipeline.run.config` (:func:`pipeline.run.config.actor_config`).

    ``metadata``: the process description shared by every file (a :class:`ProcessMetadata` or
    its JSON dict), including the sample shape [C, ...] the driver fixed (every file of a dataset
    has one shape).
    """

    def __init__(self, cfg: PrecomputeConfig, metadata: ProcessMetadata | dict):
        self.cfg, self.metadata = cfg, ProcessMetadata.from_json(metadata)
        self.shape = [int(s) for s in self.metadata.shape]
        self.setup()

    def setup(self) -> None:
        import torch

        cfg = self.cfg
        # Rebuilt from the driver's process description (checks the grid's hash on this node).
        self.processes = Processes(self.metadata.schedule)
        self.processes(self.shape)  # builds this shape's grid now: a hash mismatch fails here
        # Threads from the declared CPU budget, not from the host: oversubscribing cores slows
        # torch's elementwise kernels by an order of magnitude.
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_actor)))
        self.device, gpu_ids = actor_device(cfg.ray.device)
        noise = noise_from_metadata(self.metadata)
        per_sample = working_set_per_sample(self.shape, noise.draws)
        if self.device.type == "cuda":
            free, where = torch.cuda.mem_get_info(self.device)[0], "GPU"
        else:
            free, where = host_memory_share(cfg.ray.cpus_per_actor), "host"
        self.batch_size = fit_batch_size(cfg.batch_size, per_sample, free, where=where)
        if self.batch_size < cfg.batch_size:
            log.warning(
                "batch_size %d does not fit in the %s memory available: using %d",
                cfg.batch_size, where, self.batch_size,
            )  # fmt: skip
        enc = self.metadata.encoder
        self.store_dist = bool(enc and enc["store_dist"])
        self.out = OutputDir(cfg.output.dir)
        self.reader = ReadStage(cfg, enc["input_shape"] if enc else self.shape, self.batch_size)
        # aspect-ratio buckets: SDXL's micro-conditioning per record, a file per bucket
        self.bucketed = self.metadata.buckets is not None
        self.bucket_columns = tuple(BUCKET_COLUMNS) if self.bucketed else ()
        self.chain = self.stages(noise)
        for stage in self.chain:
            stage.setup(self.device)
        log.info("worker pid %d on device %s (Ray GPU ids %s)", os.getpid(), self.device, gpu_ids)

    def stages(self, noise) -> list[Stage]:
        """The chain this job's config asks for, in order (not yet set up)."""
        cfg, meta = self.cfg, self.metadata
        enc, tmeta = meta.encoder, meta.text
        chain: list[Stage] = []
        if tmeta:  # captions -> embeddings (pipeline/encode/text_encode.py), one table per shard
            from pipeline.encode.text_encode import TextStage

            text = TextStage(tmeta, on_error=cfg.on_error)
            chain.append(text)
        if enc:  # a frozen VAE turns decoded samples into latents (pipeline/encode/encode_stage.py)
            from pipeline.encode.encode_stage import EncodeStage

            gpu_share = cfg.ray.gpus_per_actor
            chain.append(EncodeStage(enc, on_error=cfg.on_error, gpu_share=gpu_share))
        options = RecordOptions(
            dtype=cfg.output.dtype,
            store_x0=meta.store_x0,  # or output.targets has x_0
            latent=enc["latent"] if enc else None,
            store_dist=self.store_dist,
            cond_columns=(*self.reader.conditioning.columns, *self.bucket_columns),
            targets=tuple(meta.targets or ()),
        )
        chain.append(NoiseStage(process=self.processes, noise=noise, options=options))
        chain.append(
            WriteStage(self.out, self.schema, cfg.output, shape=self.shape, bucketed=self.bucketed)
        )
        if tmeta:
            from pipeline.output.text_store import TextWriteStage

            chain.append(TextWriteStage(self.out, tmeta, text.uncond_columns))
        return chain

    def schema(self, url: str, shard: str, shape=None):
        """The Arrow schema of a shard's records file of sample ``shape`` (default the
        dataset's; a bucket's with aspect-ratio buckets): its metadata names the source file and,
        for flow, the grid of its shape."""
        shape = self.shape if shape is None else [int(s) for s in shape]
        meta = replace(
            self.metadata,
            source={**self.metadata.source, "url": url, "shard": shard},
            grid=self.processes.grid_of(shape),
        )
        return record_schema(
            shape, self.cfg.output.dtype, meta.store_x0, meta, store_dist=self.store_dist
        )

    def info(self) -> dict:
        """Where this worker runs: for logs and the GPU-pinning tests."""
        return {"pid": os.getpid(), "device": str(self.device), "gpu_ids": assigned_gpus()}

    def process(self, url: str) -> CommitMarker | ShardResult:
        """Take one shard through the chain (see :mod:`pipeline.output.contracts`).

        A complete shard is committed here: its :class:`CommitMarker`. A stream that breaks
        before any sample raises :class:`ShardReadError`; one that breaks later returns the
        written, uncommitted :class:`ShardResult` for the driver to commit or discard.
        """
        start = time.perf_counter()
        shard = shard_id(url)
        source_identity = identity(url)  # before reading: a later change is seen on resume
        tally = Tally(shard)
        result = ShardResult(url, shard)
        started: list[Stage] = []
        try:
            for stage in self.chain:
                started.append(stage)
                stage.start(shard, url)
            with self.reader.read(url) as items:
                for samples in batches(items, self.batch_size, tally):
                    tally.rejects.extend(run_chain(self.chain, Batch(shard, samples)).rejects)
            if tally.read_error is not None and tally.samples == 0:
                error = ShardReadError if tally.retryable else ShardTimeoutError
                raise error(tally.read_error, url=url)
            for stage in self.chain:
                stage.finish(result)
        except BaseException:
            for stage in started:  # nothing of this attempt may stay
                quietly(stage.abort)
            raise
        result = replace(
            result,
            status="ok" if tally.read_error is None else "partial",
            samples=tally.samples,
            rejected=sum(r["key"] is not None for r in tally.rejects),
            rejects=tally.rejects,
            error=tally.read_error,
            retryable=tally.retryable,
            seconds=elapsed(start),
            worker=self.info(),
            config_hash=self.metadata.config_hash,
            source_identity=source_identity,
            library_version=__version__,
        )
        return commit(self.out, result) if tally.read_error is None else result
