"""The record format: Arrow schema, tensor columns and process metadata of the Parquet output.

One row per (sample, draw). Columns (the public contract):

==========================  ===============================  =====================================
column                      type                             meaning
==========================  ===============================  =====================================
key                         string                           the sample's WebDataset ``__key__``
index                       int64                            the sample's ordinal in its shard
draw                        int32                            draw index, 0 <= draw < K
t                           int32                            0-based timestep in [0, T)
x_t                         tensor [C, H, W] (dtype)         sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
epsilon                     tensor [C, H, W] (dtype)         the noise eps ~ N(0, I)
posterior_mean              tensor [C, H, W] (dtype)         mean of q(x_{t-1} | x_t, x_0)
posterior_variance          float32                          variance of q(x_{t-1} | x_t, x_0)
posterior_log_variance      float32                          its clipped log (finite at t = 0)
alpha_bar                   float32                          ab_t
x_0                         tensor [C, H, W] (dtype)         the data, when output.store_x0=true
latent_mean                 tensor [C, H, W] (dtype)         encoder.store_dist: (mean - shift) * s
latent_std                  tensor [C, H, W] (dtype)         encoder.store_dist: std * scale
cls, txt, json, ...         int64 / string / binary, null    source.keep: the sample's members
==========================  ===============================  =====================================

The conditioning columns (``source.keep``, :mod:`pipeline.conditioning`) are nullable (null: the
member was absent) and repeat the sample's values on each of its K draws; the metadata's
``conditioning`` entry lists them with their types.

With an encoder (``encoder=vae``) x_0 is a VAE latent (:mod:`pipeline.encoder`): [C, H, W] is the
latent's shape, ``x_0 = latent_mean + latent_std * n`` (``latent=sample``) or ``latent_mean``
(``latent=mean``), and the metadata's ``encoder`` entry identifies the model (file hashes).

Tensor columns use Arrow's canonical ``arrow.fixed_shape_tensor`` extension type: row-major, no
permutation, value type float16 or float32. The schema's key-value metadata holds, under
``ddpm``, a JSON object describing the process (see :func:`process_metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

METADATA_KEY = b"ddpm"
FORMAT = "ddpm-records/1"
TENSOR_COLUMNS = ("x_t", "epsilon", "posterior_mean")
SCALAR_COLUMNS = ("posterior_variance", "posterior_log_variance", "alpha_bar")
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}


DIST_COLUMNS = ("latent_mean", "latent_std")


def tensor_columns(store_x0: bool, store_dist: bool = False) -> tuple[str, ...]:
    """The tensor columns of a file: :data:`TENSOR_COLUMNS`, ``x_0`` with ``store_x0``, and
    :data:`DIST_COLUMNS` with an encoder's ``store_dist``."""
    cols = (*TENSOR_COLUMNS, "x_0") if store_x0 else TENSOR_COLUMNS
    return (*cols, *DIST_COLUMNS) if store_dist else cols


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"output.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def tensor_type(shape: Sequence[int], dtype: str) -> pa.FixedShapeTensorType:
    """arrow.fixed_shape_tensor of ``shape`` ([C, H, W] or [C, ...]), row-major, no permutation."""
    return pa.fixed_shape_tensor(DTYPES[check_dtype(dtype)][1], [int(s) for s in shape])


def record_schema(
    shape: Sequence[int],
    dtype: str,
    store_x0: bool,
    metadata: Mapping | None = None,
    store_dist: bool = False,
) -> pa.Schema:
    """The Arrow schema of one output file; ``metadata`` is stored as JSON under ``ddpm``;
    ``store_dist`` adds an encoder's ``latent_mean`` and ``latent_std`` columns; the metadata's
    ``conditioning`` entry adds one nullable column per kept member
    (:mod:`pipeline.conditioning`)."""
    tt = tensor_type(shape, dtype)
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
        pa.field("draw", pa.int32(), nullable=False),
        pa.field("t", pa.int32(), nullable=False),
        *(pa.field(name, tt, nullable=False) for name in TENSOR_COLUMNS),
        *(pa.field(name, pa.float32(), nullable=False) for name in SCALAR_COLUMNS),
    ]
    if store_x0:
        fields.append(pa.field("x_0", tt, nullable=False))
    if store_dist:
        fields += [pa.field(name, tt, nullable=False) for name in DIST_COLUMNS]
    if metadata and metadata.get("conditioning"):
        from .conditioning import Conditioning

        fields += Conditioning.from_spec(metadata["conditioning"]).fields()
    meta = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)} if metadata else None
    return pa.schema(fields, metadata=meta)


def make_metadata(
    *,
    schedule,
    noise,
    dtype: str,
    shape: Sequence[int],
    store_x0: bool,
    config_hash: str,
    source: Mapping | None = None,
    library_version: str | None = None,
    encoder: Mapping | None = None,
    conditioning: Mapping | None = None,
) -> dict:
    """The ``ddpm`` process description of a dataset (see the module docstring): what a reader
    needs to interpret and regenerate every record. ``schedule`` is a NoiseSchedule, ``noise`` a
    KeyedNoise; ``source`` describes the input (decoding, normalisation; the shard URL is added
    per file); ``encoder`` identifies the VAE of latent records (see :mod:`pipeline.encoder`);
    ``conditioning`` lists the kept members and their columns' types
    (:meth:`pipeline.conditioning.Conditioning.describe`)."""
    meta = {
        "format": FORMAT,
        "schedule": schedule.describe(),
        "noise": noise.describe(),
        "dtype": check_dtype(dtype),
        "shape": [int(s) for s in shape],
        "store_x0": bool(store_x0),
        "config_hash": config_hash,
    }
    if source is not None:
        meta["source"] = dict(source)
    if library_version is not None:
        meta["library_version"] = library_version
    if encoder is not None:
        meta["encoder"] = dict(encoder)
    if conditioning is not None:
        meta["conditioning"] = dict(conditioning)
    return meta


def writer_options(schema: pa.Schema, compression: str, tensor_compression: str) -> dict:
    """Keyword arguments of ``pyarrow.parquet.ParquetWriter`` / ``write_table`` for a record file.

    Tensor columns get ``tensor_compression`` (Gaussian noise does not compress: ``none`` by
    default), scalars ``compression``; only ``key`` is dictionary-encoded (dictionaries of float
    tensors slow reads for nothing), and statistics are kept for the scalar columns only (min/max
    of a tensor column is of no use to a reader and costs encode time).
    """
    tensors = {f.name for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}
    return {
        "compression": {
            f.name: tensor_compression if f.name in tensors else compression for f in schema
        },
        "use_dictionary": ["key"],
        "write_statistics": [f.name for f in schema if f.name not in tensors],
    }


def tensor_array(values: np.ndarray, type_: pa.FixedShapeTensorType) -> pa.ExtensionArray:
    """Wrap an [N, *shape] array (converted to the column's dtype) as a tensor column, zero-copy
    when it already has that dtype and is C-contiguous."""
    np_dtype = np.dtype(type_.value_type.to_pandas_dtype())
    flat = np.ascontiguousarray(values, dtype=np_dtype).reshape(-1)
    if len(values) and flat.size != len(values) * int(np.prod(type_.shape)):
        raise ValueError(
            f"tensor of shape {values.shape[1:]} does not match column shape {type_.shape}"
        )
    storage_values = pa.Array.from_buffers(type_.value_type, flat.size, [None, pa.py_buffer(flat)])
    storage = pa.FixedSizeListArray.from_arrays(storage_values, int(np.prod(type_.shape)))
    return pa.ExtensionArray.from_storage(type_, storage)


def build_table(schema: pa.Schema, columns: Mapping[str, np.ndarray | Sequence]) -> pa.Table:
    """A table of ``schema`` from numpy columns: tensors [N, *shape], scalars [N], keys [N]."""
    arrays = []
    for f in schema:
        if f.name not in columns:
            raise KeyError(f"missing column {f.name!r} for the record schema")
        v = columns[f.name]
        if isinstance(f.type, pa.FixedShapeTensorType):
            arrays.append(tensor_array(v, f.type))
        else:  # a nullable column may come as floats with NaN for null (pandas' convention)
            arrays.append(pa.array(v, type=f.type, from_pandas=f.nullable))
    return pa.Table.from_arrays(arrays, schema=schema)


def tensor_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A tensor column as an [N, *shape] numpy array of its value type."""
    if isinstance(column, pa.ChunkedArray):
        type_ = column.type
        if column.num_chunks == 0:
            return np.empty((0, *type_.shape), dtype=type_.value_type.to_pandas_dtype())
        column = column.combine_chunks() if column.num_chunks > 1 else column.chunk(0)
    if not isinstance(column.type, pa.FixedShapeTensorType):
        raise TypeError(f"not a fixed_shape_tensor column: {column.type}")
    return column.to_numpy_ndarray()


def process_metadata(schema: pa.Schema) -> dict:
    """The ``ddpm`` JSON of a file's schema; ValueError when the file has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            "no 'ddpm' process metadata in this Parquet schema: not written by pipeline.precompute"
        )
    return json.loads(raw)


# Keys of the process metadata that must agree across every file of one dataset.
PROCESS_KEYS = (
    "format", "schedule", "noise", "dtype", "shape", "store_x0", "config_hash", "encoder",
    "conditioning",
)  # fmt: skip


def same_process(a: Mapping, b: Mapping) -> list[str]:
    """The process keys on which two metadata dicts differ (empty when they describe one
    process)."""
    return [k for k in PROCESS_KEYS if a.get(k) != b.get(k)]


def schedule_from_metadata(meta: Mapping):
    """Rebuild the NoiseSchedule a file was written with; ValueError if its betas hash differs."""
    from .schedule import make_schedule

    s = meta["schedule"]
    sched = make_schedule(
        s["name"], s["num_timesteps"], zero_terminal_snr=s["zero_terminal_snr"], **s["params"]
    )
    if sched.betas_sha256 != s["betas_sha256"]:
        raise ValueError(
            f"schedule {s['name']!r} rebuilt here does not match the file's betas hash "
            f"({sched.betas_sha256[:12]} != {s['betas_sha256'][:12]}): library versions differ"
        )
    return sched


def noise_from_metadata(meta: Mapping):
    """Rebuild the KeyedNoise that drew a file's (t, eps)."""
    from .noise import KeyedNoise

    n = meta["noise"]
    return KeyedNoise(
        seed=n["seed"],
        num_timesteps=meta["schedule"]["num_timesteps"],
        draws=n["draws_per_sample"],
        sampler=n["sampler"],
    )
