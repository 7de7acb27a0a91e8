"""The record format: Arrow schema, tensor columns and process metadata of the Parquet output.

One row per (sample, draw). Columns (the public contract):

==========================  ===============================  =====================================
column                      type                             meaning
==========================  ===============================  =====================================
key                         string                           the sample's WebDataset ``__key__``
index                       int64                            the sample's ordinal in its shard
draw                        int32                            draw index, 0 <= draw < K
t                           int32 / float32 (flow)           [0, T) index; flow: sigma * T
sigma                       float32                          flow: the noise level sigma_t
x_t                         tensor [C, H, W] (dtype)         alpha_t x_0 + sigma_t eps
epsilon                     tensor [C, H, W] (dtype)         the noise eps ~ N(0, I)
posterior_mean              tensor [C, H, W] (dtype)         mean of q(x_{t-1} | x_t, x_0)
posterior_variance          float32                          variance of q(x_{t-1} | x_t, x_0)
posterior_log_variance      float32                          its clipped log (finite at t = 0)
alpha_bar                   float32                          DDPM: ab_t
snr                         float32                          alpha_t^2 / sigma_t^2
x_0                         tensor [C, H, W] (dtype)         the data, when output.store_x0=true
velocity                    tensor [C, H, W] (dtype)         flow: eps - x_0 (its target)
v                           tensor [C, H, W] (dtype)         output.targets=[v]: a_t eps - s_t x_0
latent_mean                 tensor [C, H, W] (dtype)         encoder.store_dist: (mean - shift) * s
latent_std                  tensor [C, H, W] (dtype)         encoder.store_dist: std * scale
original_size               fixed_size_list<int32>[2]        buckets: [H, W] of the decoded image
crop_top_left               fixed_size_list<int32>[2]        buckets: [y, x] in resized pixels
target_size                 fixed_size_list<int32>[2]        buckets: [H, W] of the bucket
flipped                     bool                             buckets: mirrored (source.flip)
cls, txt, json, ...         int64 / string / binary, null    source.keep: the sample's members
==========================  ===============================  =====================================

The conditioning columns (``source.keep``, :mod:`pipeline.read.conditioning`) are nullable (null:
the member was absent) and repeat the sample's values on each of its K draws; the metadata's
``conditioning`` entry lists them with their types.

With aspect-ratio buckets (``source.buckets``, :mod:`pipeline.read.buckets`) each record carries
SDXL's micro-conditioning (``original_size``, ``crop_top_left``, ``target_size``, ``flipped``) and
a shard's records are written as one file per bucket used, each of its own shape [C, H, W]
(:func:`file_shape`); the metadata's ``shape`` is then the largest sample shape of the dataset
and ``buckets`` lists every bucket with its sample shape.

With an encoder (``encoder=vae``) x_0 is a VAE latent (:mod:`pipeline.encode.encoder`): [C, H, W] is
the latent's shape, ``x_0 = latent_mean + latent_std * n`` (``latent=sample``) or ``latent_mean``
(``latent=mean``), and the metadata's ``encoder`` entry identifies the model (file hashes).

Tensor columns use Arrow's canonical ``arrow.fixed_shape_tensor`` extension type: row-major, no
permutation, value type float16 or float32. The schema's key-value metadata holds, under
``ddpm``, a JSON object describing the process (see :func:`process_metadata`): its ``schedule``
entry names the family (no ``family`` key: DDPM; ``flow``: rectified flow, see
:mod:`pipeline.noising.process`), a flow file's ``grid`` entry the shift of its own grid (a dynamic
shift depends on the file's shape) and ``targets`` the extra targets (``output.targets``).

The columns are declared once, in :data:`COLUMNS` (see "Column registry" below); the schema, the
non-finite split of the noise stage, the reserved names of ``source.keep``, the loader's
conversions and the Hugging Face features all follow from it.

Column registry
---------------
A :class:`Column` declares one column: ``name``, ``kind`` (``identity`` | ``tensor`` |
``scalar`` | ``conditioning``), ``dtype`` (an Arrow type name, ``"output"``: the file's
``output.dtype``, for tensors, or a function of the file's :class:`Layout` returning one),
``per`` (``sample``: one value per input sample, repeated on its K
draws; ``draw``: one per record), ``nullable``, ``stage`` (the stage that produces it: ``read``,
``encode``, ``noise``, ...), ``when`` (a predicate on the file's :class:`Layout`: is the column in
this file?) and ``finite`` (a non-finite value rejects the sample, see :func:`nonfinite_columns`).
A :class:`ColumnFamily` declares columns whose names come from the process metadata (the kept
conditioning members). Adding a column is one declaration (docs/architecture.md has the
whole example)::

    register(Column("x0_mean", "scalar", "float32", "sample", stage="mean",
                    when=lambda layout: bool(layout.meta.get("x0_mean")),
                    doc="the sample's mean value"))

and the producing stage filling ``batch.records["x0_mean"]`` (:class:`pipeline.run.stage.Batch`)
with one value per record: N*K rows, sample-major, a per-sample value repeated on its K draws
(as :func:`pipeline.run.stages.compute_records` does for ``latent_mean``). ``Batch.extras`` holds
per-sample columns that are not record columns (the text embeddings, stored in ``_text/``).

The shape is a property of a file, not of a dataset: :func:`columns_of` and :func:`record_schema`
take the file's :class:`Layout` (its sample ``shape``, ``dtype``, options and metadata), and
:func:`file_shape` reads it back from a file's schema.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

METADATA_KEY = b"ddpm"
HF_METADATA_KEY = (
    b"huggingface"  # datasets' features, in the schema of an HF export (pipeline.consume.hf)
)
FORMAT = "ddpm-records/1"
DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
ARROW_TYPES = {
    "string": pa.string(), "binary": pa.binary(), "int64": pa.int64(), "int32": pa.int32(),
    "float32": pa.float32(), "float64": pa.float64(), "bool": pa.bool_(),
    "int32[2]": pa.list_(pa.int32(), 2),
}  # fmt: skip
KINDS = ("identity", "tensor", "scalar", "conditioning")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"output.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def tensor_type(shape: Sequence[int], dtype: str) -> pa.FixedShapeTensorType:
    """arrow.fixed_shape_tensor of ``shape`` ([C, H, W] or [C, ...]), row-major, no permutation."""
    return pa.fixed_shape_tensor(DTYPES[check_dtype(dtype)][1], [int(s) for s in shape])


@dataclass(frozen=True)
class Layout:
    """What decides a file's columns and their types: the sample ``shape`` of this file (one
    per file: aspect-ratio buckets give files of different shapes), the tensors' ``dtype``, the
    ``store_x0`` and ``store_dist`` options, and the process metadata ``meta``."""

    shape: tuple[int, ...]
    dtype: str
    store_x0: bool = False
    store_dist: bool = False
    meta: Mapping = field(default_factory=dict)

    @classmethod
    def of(cls, meta, shape: Sequence[int] | None = None) -> Layout:
        """The layout of a file from its process metadata (a
        :class:`pipeline.output.description.ProcessMetadata` or its JSON dict); ``shape``: the
        file's (default the metadata's ``shape``)."""
        meta = metadata_json(meta)
        enc = meta.get("encoder") or {}
        return cls(
            shape=tuple(int(s) for s in (meta["shape"] if shape is None else shape)),
            dtype=meta["dtype"],
            store_x0=bool(meta.get("store_x0")),
            store_dist=bool(enc.get("store_dist")),
            meta=meta,
        )


def metadata_json(meta) -> Mapping:
    """The JSON dict of a process description: a ProcessMetadata's :meth:`to_json`, or ``meta``
    itself when it is already a (possibly partial) dict. :attr:`Layout.meta` holds this form: it
    is what a file's schema stores."""
    return meta.to_json() if hasattr(meta, "to_json") else meta


def _always(layout: Layout) -> bool:
    return True


@dataclass(frozen=True)
class Column:
    """One column of the record format (see the module docstring, "Column registry")."""

    name: str
    kind: str
    dtype: str | Callable[[Layout], str]
    per: str = "draw"
    nullable: bool = False
    stage: str = "noise"
    when: Callable[[Layout], bool] = _always
    finite: bool | None = None  # None: True for tensors
    shape: Callable[[Layout], Sequence[int]] | None = None  # tensors; None: the file's shape
    doc: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind must be one of {KINDS}, got {self.kind}")
        if self.per not in ("sample", "draw"):
            raise ValueError(f"column {self.name!r}: per must be sample or draw, got {self.per}")
        if isinstance(self.dtype, str) and self.dtype != "output" and self.dtype not in ARROW_TYPES:
            raise ValueError(f"column {self.name!r}: dtype {self.dtype!r} is not one of "
                             f"{['output', *ARROW_TYPES]}")  # fmt: skip

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor"

    @property
    def rejects_nonfinite(self) -> bool:
        return self.is_tensor if self.finite is None else self.finite

    def dtype_of(self, layout: Layout) -> str:
        """The Arrow type name of this column in a file of ``layout``."""
        dtype = self.dtype(layout) if callable(self.dtype) else self.dtype
        return layout.dtype if dtype == "output" else dtype

    def arrow_type(self, layout: Layout) -> pa.DataType:
        if self.is_tensor:
            shape = layout.shape if self.shape is None else self.shape(layout)
            return tensor_type(shape, self.dtype_of(layout))
        return ARROW_TYPES[self.dtype_of(layout)]

    def field(self, layout: Layout) -> pa.Field:
        return pa.field(self.name, self.arrow_type(layout), nullable=self.nullable)


@dataclass(frozen=True)
class ColumnFamily:
    """Columns named by the process metadata: ``expand(layout)`` returns them (e.g. one per
    kept member of ``source.keep``). ``names`` is the family's description for the docs."""

    names: str
    expand: Callable[[Layout], Sequence[Column]]


def _conditioning(layout: Layout) -> list[Column]:
    from pipeline.read.conditioning import Conditioning

    spec = Conditioning.from_spec(layout.meta.get("conditioning"))
    return [
        Column(k.column, "conditioning", k.type, "sample", nullable=True, stage="read")
        for k in spec.kept
    ]


def _x0(layout: Layout) -> bool:
    return layout.store_x0


def _dist(layout: Layout) -> bool:
    return layout.store_dist


def family(layout: Layout) -> str:
    """The process family of a file: ``ddpm`` (no ``family`` in its schedule) or ``flow``."""
    return (layout.meta.get("schedule") or {}).get("family", "ddpm")


def _flow(layout: Layout) -> bool:
    return family(layout) == "flow"


def _ddpm(layout: Layout) -> bool:
    return family(layout) == "ddpm"


def _t_dtype(layout: Layout) -> str:
    return "float32" if _flow(layout) else "int32"


def _v(layout: Layout) -> bool:
    return "v" in (layout.meta.get("targets") or ())


def _bucketed(layout: Layout) -> bool:
    """Aspect-ratio buckets are on (``source.buckets``, :mod:`pipeline.read.buckets`)."""
    return (layout.meta.get("source") or {}).get("buckets") is not None


COLUMNS: list[Column | ColumnFamily] = [
    Column("key", "identity", "string", "sample", stage="read", doc="WebDataset __key__"),
    Column("index", "identity", "int64", "sample", stage="read", doc="ordinal in its shard"),
    Column("draw", "identity", "int32", doc="draw index, 0 <= draw < K"),
    Column("t", "scalar", _t_dtype, doc="DDPM: 0-based timestep in [0, T); flow: sigma * T"),
    Column("sigma", "scalar", "float32", when=_flow, doc="flow: the noise level sigma_t"),
    Column("x_t", "tensor", "output", doc="alpha_t x_0 + sigma_t eps"),
    Column("epsilon", "tensor", "output", doc="the noise eps ~ N(0, I)"),
    Column("posterior_mean", "tensor", "output", doc="mean of q(x_{t-1} | x_t, x_0)"),
    Column("posterior_variance", "scalar", "float32", doc="variance of q(x_{t-1} | x_t, x_0)"),
    Column("posterior_log_variance", "scalar", "float32", doc="its clipped log"),
    Column("alpha_bar", "scalar", "float32", when=_ddpm, doc="DDPM: ab_t"),
    Column("snr", "scalar", "float32", doc="alpha_t^2 / sigma_t^2"),
    Column("x_0", "tensor", "output", when=_x0, doc="the data (output.store_x0)"),
    Column("velocity", "tensor", "output", when=_flow, doc="flow: eps - x_0, its target"),
    Column("v", "tensor", "output", when=_v, doc="output.targets=[v]: alpha_t eps - sigma_t x_0"),
    Column("latent_mean", "tensor", "output", "sample", stage="encode", when=_dist,
           doc="encoder.store_dist: (mean - shift) * scale"),
    Column("latent_std", "tensor", "output", "sample", stage="encode", when=_dist,
           doc="encoder.store_dist: std * scale"),
    # SDXL's micro-conditioning, with aspect-ratio buckets (pipeline/read/buckets.py)
    Column("original_size", "conditioning", "int32[2]", "sample", stage="read", when=_bucketed,
           finite=False, doc="[H, W] of the decoded image"),
    Column("crop_top_left", "conditioning", "int32[2]", "sample", stage="read", when=_bucketed,
           finite=False, doc="[y, x] of the crop in the resized image's pixels"),
    Column("target_size", "conditioning", "int32[2]", "sample", stage="read", when=_bucketed,
           finite=False, doc="[H, W] of the bucket"),
    Column("flipped", "conditioning", "bool", "sample", stage="read", when=_bucketed,
           finite=False, doc="mirrored horizontally (source.flip=random)"),
    ColumnFamily("cls, txt, json, ... (source.keep)", _conditioning),
]  # fmt: skip


def register(column: Column | ColumnFamily, *, before: str | None = None) -> None:
    """Declare a column (at the end, or before the column named ``before``). Used at import time
    by the module that owns the column; a name may be declared once."""
    if isinstance(column, Column) and column.name in reserved_names():
        raise ValueError(f"column {column.name!r} is already declared")
    if before is None:
        COLUMNS.append(column)
        return
    at = next(i for i, c in enumerate(COLUMNS) if isinstance(c, Column) and c.name == before)
    COLUMNS.insert(at, column)


def declared(name: str) -> Column:
    """The fixed column named ``name``; KeyError for a family member or an unknown name."""
    for c in COLUMNS:
        if isinstance(c, Column) and c.name == name:
            return c
    raise KeyError(f"no column {name!r} is declared in pipeline.output.records.COLUMNS")


def reserved_names() -> tuple[str, ...]:
    """Every fixed column name (a conditioning column may not take one)."""
    return tuple(c.name for c in COLUMNS if isinstance(c, Column))


def columns_of(layout: Layout) -> list[Column]:
    """The columns of a file of this layout, in schema order."""
    out: list[Column] = []
    for c in COLUMNS:
        if isinstance(c, ColumnFamily):
            out += c.expand(layout)
        elif c.when(layout):
            out.append(c)
    return out


_DDPM_LAYOUT = Layout((1,), "float32")  # a DDPM file without options


def _names(kind: str, cols: Iterable[Column] | None = None) -> tuple[str, ...]:
    cols = [c for c in COLUMNS if isinstance(c, Column)] if cols is None else cols
    return tuple(c.name for c in cols if c.kind == kind and c.when in (_always, _ddpm))


# The tensor and float scalar columns of every DDPM file (without options).
TENSOR_COLUMNS = _names("tensor")
SCALAR_COLUMNS = tuple(
    n for n in _names("scalar") if declared(n).dtype_of(_DDPM_LAYOUT).startswith("float")
)
DIST_COLUMNS = tuple(c.name for c in COLUMNS if isinstance(c, Column) and c.when is _dist)


def tensor_columns(store_x0: bool, store_dist: bool = False) -> tuple[str, ...]:
    """The tensor columns of a file with these options."""
    layout = Layout((1,), "float32", store_x0, store_dist)
    return tuple(c.name for c in columns_of(layout) if c.is_tensor)


def nonfinite_columns(names: Iterable[str]) -> tuple[str, ...]:
    """Of ``names``, the declared columns whose non-finite values reject a sample."""
    fixed = {c.name: c for c in COLUMNS if isinstance(c, Column)}
    return tuple(n for n in names if n in fixed and fixed[n].rejects_nonfinite)


def schema_of(layout: Layout) -> pa.Schema:
    """The Arrow schema of a file of ``layout``; its metadata (JSON under ``ddpm``) is
    ``layout.meta`` when not empty."""
    fields = [c.field(layout) for c in columns_of(layout)]
    meta = layout.meta
    return pa.schema(
        fields, metadata={METADATA_KEY: json.dumps(dict(meta), sort_keys=True)} if meta else None
    )


def record_schema(
    shape: Sequence[int],
    dtype: str,
    store_x0: bool,
    metadata=None,
    store_dist: bool = False,
) -> pa.Schema:
    """The Arrow schema of one output file of sample ``shape`` (the file's: see :class:`Layout`);
    ``metadata`` (a ProcessMetadata or its JSON dict) is stored as JSON under ``ddpm``;
    ``store_dist`` adds an encoder's
    ``latent_mean`` and ``latent_std`` columns; the metadata's ``conditioning`` entry adds one
    nullable column per kept member (:mod:`pipeline.read.conditioning`)."""
    check_dtype(dtype)
    shape = tuple(int(s) for s in shape)
    return schema_of(
        Layout(shape, dtype, bool(store_x0), bool(store_dist), metadata_json(metadata or {}))
    )


def file_shape(schema: pa.Schema) -> list[int]:
    """The sample shape of a file, read from its ``x_t`` column's type."""
    return [int(s) for s in schema.field("x_t").type.shape]


def is_tensor(type_: pa.DataType) -> bool:
    """True for a tensor column's Arrow type (``arrow.fixed_shape_tensor``)."""
    return isinstance(type_, pa.FixedShapeTensorType)


def writer_options(schema: pa.Schema, compression: str, tensor_compression: str) -> dict:
    """Keyword arguments of ``pyarrow.parquet.ParquetWriter`` / ``write_table`` for a record file.

    Tensor columns get ``tensor_compression`` (Gaussian noise does not compress: ``none`` by
    default), scalars ``compression``; only ``key`` is dictionary-encoded (dictionaries of float
    tensors slow reads for nothing), and statistics are kept for the scalar columns only (min/max
    of a tensor column is of no use to a reader and costs encode time).
    """
    tensors = {f.name for f in schema if is_tensor(f.type)}
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
        if is_tensor(f.type):
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
    if not is_tensor(column.type):
        raise TypeError(f"not a fixed_shape_tensor column: {column.type}")
    return column.to_numpy_ndarray()


DESCRIPTION_NAMES = (
    "ProcessMetadata", "make_metadata", "process_metadata", "records_metadata", "PROCESS_KEYS",
    "same_process", "schedule_from_metadata", "process_from_metadata", "noise_from_metadata",
)  # fmt: skip


def __getattr__(name: str):
    """The process description's names, still importable from here (they live in
    :mod:`pipeline.output.description`)."""
    if name in DESCRIPTION_NAMES:
        from pipeline.output import description

        return getattr(description, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
