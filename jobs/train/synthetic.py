"""Synthetic records (coloured blobs, optionally labelled) for trying the example trainer without a
precompute run and for its tests (:func:`make_synthetic_records`)."""

from __future__ import annotations

import numpy as np
import torch


def palette(classes: int, channels: int) -> np.ndarray:
    """``classes`` distinct fixed colours [classes, channels] in [-1, 1]: channel ``c`` of colour
    ``k`` is level ``k * (2c + 1) mod classes`` of ``classes`` evenly spaced levels."""
    k, c = np.arange(classes)[:, None], np.arange(channels)[None]
    levels = (k * (2 * c + 1)) % classes
    return (-1.0 + 2.0 * levels / max(classes - 1, 1)).astype(np.float64)


def make_synthetic_records(
    out,
    num_records: int = 4096,
    shape=(3, 32, 32),
    num_timesteps: int = 1000,
    schedule: str = "linear",
    dtype: str = "float16",
    files: int = 4,
    rows_per_group: int = 256,
    seed: int = 0,
    classes: int = 0,
    informative: bool = True,
    null_labels: float = 0.0,
) -> None:
    """Write records of coloured blobs with the pipeline's own noise, forward process and
    posterior, in the record format (one file per synthetic shard, no manifest).

    ``classes`` > 0: each blob takes one of ``classes`` fixed colours (:func:`palette`) and the
    records carry a ``cls`` conditioning column (int64, ``source.keep=[cls]`` in the metadata), the
    colour's index; ``informative=False`` draws the labels independently of the colours (a
    control: the label then tells nothing); a fraction ``null_labels`` of the records has a null
    label (an absent ``.cls`` member)."""
    import pyarrow.parquet as pq

    from pipeline.noising.diffusion import q_posterior, q_sample
    from pipeline.noising.noise import KeyedNoise
    from pipeline.noising.schedule import make_schedule
    from pipeline.output import records
    from pipeline.output.description import make_metadata
    from pipeline.output.manifest import OutputDir
    from pipeline.read.conditioning import Conditioning

    sched = make_schedule(schedule, num_timesteps)
    noise = KeyedNoise(seed, num_timesteps)
    meta = make_metadata(
        schedule=sched,
        noise=noise,
        dtype=dtype,
        shape=shape,
        store_x0=False,
        config_hash=f"synthetic-{seed}-{schedule}-{num_timesteps}"
        + (f"-cls{classes}{'' if informative else 'r'}" if classes else ""),
        conditioning=Conditioning(["cls"]).describe() if classes else None,
    )
    target = OutputDir(str(out))
    target.makedirs()
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    for f, rows in enumerate(np.array_split(np.arange(num_records), files)):
        n, shard = len(rows), f"synthetic-{f:03d}"
        centre = rng.uniform(-0.6, 0.6, (n, 2, 1, 1))
        radius = rng.uniform(0.2, 0.5, (n, 1, 1))
        blob = np.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / radius**2)
        extra = {}
        if classes:
            colour_class = rng.integers(classes, size=n)
            colour = palette(classes, c)[colour_class][:, :, None, None]
            label = colour_class if informative else rng.integers(classes, size=n)
            null = rng.random(n) < null_labels
            extra["cls"] = [None if z else int(v) for v, z in zip(label, null)]
        else:
            colour = rng.uniform(-1, 1, (n, c, 1, 1))
        if classes:
            x0 = (colour * (0.5 + 0.5 * blob[:, None])).astype(np.float32)
        else:
            x0 = np.clip(-0.5 + blob[:, None] * (colour + 0.5), -1, 1).astype(np.float32)
        keys = [f"{i:08d}" for i in rows]
        t, eps = noise.draw(shard, keys, np.arange(n), shape)
        x0_t, t_t = torch.from_numpy(x0), torch.from_numpy(t)
        x_t = q_sample(sched, x0_t, t_t, torch.from_numpy(eps))
        mean, var, log_var = q_posterior(sched, x0_t, x_t, t_t)
        m = {**meta, "source": {"url": "synthetic", "shard": shard}}
        schema = records.record_schema(shape, dtype, False, m)
        table = records.build_table(
            schema,
            {
                "key": keys,
                "index": np.arange(n),
                "draw": np.zeros(n, np.int32),
                "t": t.astype(np.int32),
                "x_t": x_t.numpy(),
                "epsilon": eps,
                "posterior_mean": mean.numpy(),
                "posterior_variance": var.reshape(-1).numpy(),
                "posterior_log_variance": log_var.reshape(-1).numpy(),
                "alpha_bar": sched.alphas_cumprod[t].astype(np.float32),
                "snr": sched.snr[t].astype(np.float32),
                **extra,
            },
        )
        name = OutputDir.data_name(shard)
        tmp = target.tmp_name(name)
        pq.write_table(
            table,
            target.path(tmp),
            filesystem=target.fs,
            row_group_size=rows_per_group,
            **records.writer_options(schema, compression="zstd", tensor_compression="none"),
        )
        target.commit(tmp, name)
