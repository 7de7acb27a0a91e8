"""The column registry of pipeline.output.records: one declaration per column, everything
derived."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sources import source_group

from pipeline.output import records
from pipeline.output.records import Column, Layout, columns_of, record_schema
from pipeline.read import conditioning
from pipeline.run.stages import split_nonfinite

COND = {"keep": ["cls", "txt"], "require": [], "columns": [
    {"column": "cls", "ext": "cls", "kind": "cls", "type": "int64"},
    {"column": "txt", "ext": "txt", "kind": "txt", "type": "string"}]}  # fmt: skip


def test_schema_order_types_and_options():
    base = record_schema((2, 4, 4), "float16", False)
    assert base.names == ["key", "index", "draw", "t", "x_t", "epsilon", "posterior_mean",
                          "posterior_variance", "posterior_log_variance", "alpha_bar",
                          "snr"]  # fmt: skip
    assert base.field("x_t").type == records.tensor_type((2, 4, 4), "float16")
    assert base.field("t").type == pa.int32() and not base.field("key").nullable
    full = record_schema((2, 4, 4), "float32", True, {"conditioning": COND}, store_dist=True)
    assert full.names[11:] == ["x_0", "latent_mean", "latent_std", "cls", "txt"]
    assert full.field("cls").nullable and full.field("cls").type == pa.int64()
    assert full.field("latent_std").type == records.tensor_type((2, 4, 4), "float32")
    assert records.file_shape(full) == [2, 4, 4]


def test_shape_is_the_files():
    meta = {"shape": [4, 8, 8], "dtype": "float16", "store_x0": True}
    wide = records.schema_of(Layout.of(meta, shape=(4, 8, 12)))
    assert records.file_shape(wide) == [4, 8, 12] and wide.field("x_0").type.shape == [4, 8, 12]
    assert records.file_shape(records.schema_of(Layout.of(meta))) == [4, 8, 8]


def test_derived_lists():
    assert records.TENSOR_COLUMNS == ("x_t", "epsilon", "posterior_mean")
    assert records.SCALAR_COLUMNS == (
        "posterior_variance", "posterior_log_variance", "alpha_bar", "snr")  # fmt: skip
    assert records.DIST_COLUMNS == ("latent_mean", "latent_std")
    assert records.tensor_columns(True, True) == (
        "x_t", "epsilon", "posterior_mean", "x_0", "latent_mean", "latent_std")  # fmt: skip
    names = ["key", "t", "x_t", "epsilon", "posterior_mean", "alpha_bar", "x_0", "latent_mean",
             "latent_std", "cls"]  # fmt: skip
    assert records.nonfinite_columns(names) == (
        "x_t", "epsilon", "posterior_mean", "x_0", "latent_mean", "latent_std")  # fmt: skip
    assert "latent_std" in records.reserved_names() and "cls" not in records.reserved_names()


def test_split_nonfinite_covers_the_latent_columns():
    """An overflowing latent_std (store_dist) rejects its sample, like an overflowing x_t."""
    n, k = 3, 2
    cols = {
        "key": [f"k{i // k}" for i in range(n * k)], "index": np.repeat(np.arange(n), k),
        "t": np.zeros(n * k, np.int32), "x_t": np.zeros((n * k, 2), np.float16),
        "latent_std": np.zeros((n * k, 2), np.float16),
    }  # fmt: skip
    cols["latent_std"][3, 1] = np.inf  # sample 1, draw 1
    kept, dropped = split_nonfinite(cols, k, "float16")
    assert [d[:2] for d in dropped] == [("k1", 1)] and kept["key"] == ["k0", "k0", "k2", "k2"]


def test_flow_and_target_columns_follow_the_metadata():
    flow = {"schedule": {"family": "flow"}, "dtype": "float16"}
    schema = record_schema((2, 4, 4), "float16", False, flow)
    assert schema.names == ["key", "index", "draw", "t", "sigma", "x_t", "epsilon",
                            "posterior_mean", "posterior_variance", "posterior_log_variance",
                            "snr", "velocity"]  # fmt: skip
    assert schema.field("t").type == pa.float32() and schema.field("sigma").type == pa.float32()
    assert schema.field("velocity").type == records.tensor_type((2, 4, 4), "float16")
    v = record_schema((2, 4, 4), "float32", True, {"targets": ["v"]})
    assert v.names[-3:] == ["snr", "x_0", "v"] and v.field("t").type == pa.int32()
    assert records.nonfinite_columns(["velocity", "v", "snr", "sigma"]) == ("velocity", "v")
    assert {"sigma", "velocity", "v", "snr"} <= set(records.reserved_names())


def test_one_declaration_adds_a_column(monkeypatch):
    monkeypatch.setattr(records, "COLUMNS", list(records.COLUMNS))
    records.register(Column("lw", "scalar", "float32", when=lambda lay: lay.meta.get("flow")),
                     before="x_0")  # fmt: skip
    plain = record_schema((1, 2, 2), "float16", True, {"dtype": "float16"})
    flow = record_schema((1, 2, 2), "float16", True, {"dtype": "float16", "flow": True})
    assert "lw" not in plain.names and flow.names[11:13] == ["lw", "x_0"]
    assert "lw" in records.reserved_names()
    kept_lw = source_group("images", keep=["lw"])
    assert conditioning.config_problems(kept_lw)  # a kept member may not take it
    with pytest.raises(ValueError, match="already declared"):
        records.register(Column("lw", "scalar", "float32"))
    cols = {f.name: np.zeros((3, 1, 2, 2)) if records.is_tensor(f.type) else np.zeros(3)
            for f in flow}  # fmt: skip
    table = records.build_table(flow, {**cols, "key": ["a", "b", "c"]})
    assert table.num_rows == 3


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        Column("a", "vector", "float32")
    with pytest.raises(ValueError, match="per must be sample or draw"):
        Column("a", "scalar", "float32", per="row")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        Column("a", "scalar", "float8")
    assert [c.name for c in columns_of(Layout((1,), "float16"))][:4] == [
        "key",
        "index",
        "draw",
        "t",
    ]
