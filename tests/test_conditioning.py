"""Conditioning columns (source.keep): from tar members through precompute into the Parquet, the
readers (pyarrow, polars, DuckDB), the loader and the validator."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from shards import encode_image, random_image, write_tar
from sources import source_group

from pipeline.output import records
from pipeline.output.manifest import OutputDir
from pipeline.precompute import run
from pipeline.read.conditioning import Conditioning, column_name, config_problems
from pipeline.read.decoders import DecodeError
from pipeline.run.config import validate

KEEP = ["cls", "txt", "json", "meta.json", "bin"]

# key -> its members besides the image; values checked against these bytes
SAMPLES = {
    "full": {
        "cls": b"3",
        "txt": "a caf\u00e9 cat".encode(),
        "json": b'{"a": 1, "b": [true, null]}',
        "meta.json": b'{"m": "x"}',
        "bin": b"\x00\xff\x80",
    },
    "bare": {},
    "badint": {"cls": b"three", "txt": b"ok"},
    "badutf": {"cls": b"1", "txt": b"\xff\xfe caption"},
    "badjson": {"cls": b"2", "json": b"{not json"},
    "clsonly": {"cls": b" 7\n"},
    "nanjson": {"json": b"NaN"},
    "big": {"cls": b"-9223372036854775808", "txt": b""},
    "huge": {"cls": b"7" * 5000},  # beyond Python's int-string limit (4300 digits)
}
GOOD = ("full", "bare", "clsonly", "big")


def expected(key: str) -> dict:
    m = SAMPLES[key]
    return {
        "cls": int(m["cls"]) if "cls" in m else None,
        "txt": m["txt"].decode() if "txt" in m else None,
        "json": m["json"].decode() if "json" in m else None,
        "meta_json": m["meta.json"].decode() if "meta.json" in m else None,
        "bin": m["bin"] if "bin" in m else None,
    }


def write_cond_shard(path, samples=SAMPLES, size=(12, 10), seed=0):
    members = []
    for i, (key, extra) in enumerate(samples.items()):
        members.append((f"{key}.png", encode_image(random_image(size, "RGB", seed + i))))
        members += [(f"{key}.{ext}", data) for ext, data in extra.items()]
    return write_tar(path, members)


def read_rejects(out) -> dict[str, str]:
    lines = (out / "rejects.jsonl").read_text().splitlines()
    return {r["key"]: r["reason"] for r in map(json.loads, lines)}


# -- config and extraction (no Ray) ----------------------------------------------------------


@pytest.mark.parametrize(
    "keep, key, words",
    [
        (["cls", "pkl"], "source.keep", "pickle"),
        (["meta.pth"], "source.keep", "pickle"),
        (["jpg"], "source.keep", "payload"),
        (["t"], "source.keep", "column 't'"),
        (["x_0"], "source.keep", "column 'x_0'"),
        (["meta.json", "meta_json"], "source.keep", "both be column 'meta_json'"),
        (["Cls"], "source.keep", "lowercase"),
    ],
)
def test_config_refuses_bad_keep(make_cfg, keep, key, words):
    cfg = make_cfg("source.urls=x.tar", "output.dir=o", f"source.keep=[{','.join(keep)}]")
    with pytest.raises(ValueError, match=f"config key {key}: .*{words}"):
        validate(cfg)


def test_config_defaults_and_require(make_cfg):
    cfg = make_cfg("source.urls=x.tar", "output.dir=o")
    assert list(cfg.source.keep) == ["cls", "txt", "json"] and list(cfg.source.require) == []
    validate(cfg)
    bad = make_cfg("source.urls=x.tar", "output.dir=o", "source.require=[label]")
    with pytest.raises(ValueError, match="config key source.require: 'label' is not in"):
        validate(bad)


def test_keep_and_require_change_the_config_hash(make_cfg):
    from pipeline.run.config import config_hash

    base = ("source.urls=x.tar", "output.dir=o")
    hashes = {
        config_hash(make_cfg(*base)),
        config_hash(make_cfg(*base, "source.keep=[cls]")),
        config_hash(make_cfg(*base, "source.require=[cls]")),
    }
    assert len(hashes) == 3


def test_extract_types_nulls_and_reasons():
    c = Conditioning(KEEP, ["cls"])
    assert c.columns == ("cls", "txt", "json", "meta_json", "bin")
    assert column_name("meta.json") == "meta_json"
    assert [str(f.type) for f in c.fields()] == ["int64", "string", "string", "string", "binary"]
    assert all(f.nullable for f in c.fields())
    assert c.extract(SAMPLES["full"]) == expected("full")
    assert c.extract({"cls": b"+5\r\n"}) == {**dict.fromkeys(c.columns), "cls": 5}
    zeros = {"cls": b"-" + b"0" * 5000 + b"42"}  # 5002 digits, but only two count
    assert c.extract(zeros) == {**dict.fromkeys(c.columns), "cls": -42}
    cases = {
        "required member .cls missing": {},
        "class label is not an integer": {"cls": b"3.0"},
        "class label out of int64 range": {"cls": b"9223372036854775808"},
        r"class label out of int64 range.*\(5000 digits\)": {"cls": b"-" + b"9" * 5000},
        "invalid JSON.*4300": {"cls": b"1", "json": b"[" + b"1" * 5000 + b"]"},
        "not UTF-8 text": {"cls": b"1", "txt": b"\xc3"},
        "invalid JSON": {"cls": b"1", "meta.json": b"[1,"},
    }
    for words, members in cases.items():
        with pytest.raises(DecodeError, match=words):
            c.extract(members)
    assert config_problems(source_group("images", keep=["pickle"]))[0][0] == "source.keep"
    spec = c.describe()
    assert Conditioning.from_spec(spec).describe() == spec
    assert not Conditioning.from_spec(None)


# -- precompute -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, ray_session):
    """Two shards of SAMPLES (keys prefixed per shard), keep=KEEP, 2 draws, float32."""
    root = tmp_path_factory.mktemp("cond")
    for s in range(2):
        write_cond_shard(root / f"c-{s}.tar", {f"{s}{k}": v for k, v in SAMPLES.items()}, seed=s)
    from pipeline.run.config import compose

    cfg = compose(
        [
            "progress=false", "source=images", f"source.urls={root}/c-{{0..1}}.tar",
            "source.resolution=8", f"output.dir={root}/out", "output.dtype=float32",
            f"source.keep=[{','.join(KEEP)}]", "sampling.draws_per_sample=2",
            "schedule.num_timesteps=50", "batch_size=3", "output.rows_per_group=4",
        ]
    )  # fmt: skip
    manifest = run(cfg)
    return root, manifest


def test_precompute_writes_kept_columns(cond_run):
    root, manifest = cond_run
    out = root / "out"
    assert manifest["exit_code"] == 0
    assert manifest["totals"]["records"] == 2 * 2 * len(GOOD)
    names = OutputDir(str(out)).data_files()
    assert len(names) == 2
    for name in names:
        table = pq.read_table(out / name)
        schema = table.schema
        for col, typ in zip(
            ("cls", "txt", "json", "meta_json", "bin"),
            ("int64", "string", "string", "string", "binary"),
        ):
            assert str(schema.field(col).type) == typ and schema.field(col).nullable
        meta = records.process_metadata(schema)
        assert meta["conditioning"]["keep"] == KEEP and meta["conditioning"]["require"] == []
        assert [c["type"] for c in meta["conditioning"]["columns"]][-1] == "binary"
        rows = table.drop_columns([c for c in schema.names if c in records.TENSOR_COLUMNS])
        rows = rows.to_pylist()
        shard = name[len("c-")][0]
        assert sorted({r["key"] for r in rows}) == sorted(shard + k for k in GOOD)
        for r in rows:  # every draw carries its sample's values
            want = expected(r["key"][1:])
            assert {c: r[c] for c in want} == want, r["key"]
        assert sorted((r["key"], r["draw"]) for r in rows) == sorted(
            (shard + k, d) for k in GOOD for d in range(2)
        )
    reasons = read_rejects(out)
    assert set(reasons) == {f"{s}{k}" for s in "01" for k in SAMPLES if k not in GOOD}
    assert "class label is not an integer in member '0badint.cls'" in reasons["0badint"]
    assert "not UTF-8 text in member '1badutf.txt'" in reasons["1badutf"]
    assert "invalid JSON in member '0badjson.json'" in reasons["0badjson"]
    assert "invalid JSON" in reasons["0nanjson"]
    # a 5000-digit label costs its own sample only (it used to fail the shard: 0 records)
    assert "class label out of int64 range in member '1huge.cls'" in reasons["1huge"]
    assert "(5000 digits)" in reasons["1huge"]


def test_require_rejects_samples_without_the_member(tmp_path, make_cfg):
    write_cond_shard(tmp_path / "r-0.tar")
    cfg = make_cfg(
        "source=images", f"source.urls={tmp_path}/r-0.tar", "source.resolution=8",
        f"output.dir={tmp_path}/out", "source.keep=[cls]", "source.require=[cls]",
        "schedule.num_timesteps=20",
    )  # fmt: skip
    manifest = run(cfg)
    reasons = read_rejects(tmp_path / "out")
    # badutf/badjson/nanjson: their txt and json are not kept, so only cls matters
    assert set(reasons) == {"bare", "badint", "nanjson", "huge"}
    assert "required member .cls missing (source.require)" in reasons["bare"]
    table = pq.read_table(tmp_path / "out" / OutputDir(str(tmp_path / "out")).data_files()[0])
    assert "txt" not in table.column_names and table.column("cls").null_count == 0
    got = dict(zip(table.column("key").to_pylist(), table.column("cls").to_pylist()))
    assert got == {"full": 3, "badutf": 1, "badjson": 2, "clsonly": 7, "big": -(2**63)}
    assert manifest["totals"]["rejected"] == 4


# -- readers and the loader --------------------------------------------------------------------


def _expected_rows(root) -> dict[tuple[str, int], dict]:
    """(key, draw) -> kept values, from the tar members (via SAMPLES)."""
    return {(f"{s}{k}", d): expected(k) for s in "01" for k in GOOD for d in range(2)}


def test_polars_and_duckdb_read_the_columns(cond_run):
    import duckdb
    import polars as pl

    root, _ = cond_run
    want = _expected_rows(root)
    glob = str(root / "out" / "*.parquet")
    df = pl.read_parquet(glob, columns=["key", "draw", *Conditioning(KEEP).columns])
    assert df.schema["cls"] == pl.Int64 and df.schema["txt"] == pl.String
    assert df.schema["bin"] == pl.Binary
    got = {(r["key"], r["draw"]): {c: r[c] for c in want[("0full", 0)]} for r in df.to_dicts()}
    assert got == want
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT key, draw, cls, txt, json, meta_json, bin FROM read_parquet('{glob}')"
    ).fetchall()
    assert {(r[0], r[1]): dict(zip(want[("0full", 0)], r[2:])) for r in rows} == want
    (n,) = con.execute(
        f"SELECT count(*) FROM read_parquet('{glob}') WHERE json_extract(json, '$.a') = 1"
    ).fetchone()
    assert n == 4  # 0full and 1full, 2 draws each


def test_loader_two_ranks_two_workers_each_record_once_with_its_label(cond_run):
    from torch.utils.data import DataLoader

    from pipeline.consume.dataset import PrecomputedDataset, collate

    root, _ = cond_run
    want = _expected_rows(root)
    seen = []
    for rank in range(2):
        ds = PrecomputedDataset(
            root / "out", columns=["key", "draw", "cls", "txt", "bin"], rank=rank, world_size=2,
            shuffle_buffer=3,
        )  # fmt: skip
        for batch in DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate):
            assert batch["cls"].dtype == torch.int64
            for i, key in enumerate(batch["key"]):
                w = want[(key, int(batch["draw"][i]))]
                assert int(batch["cls"][i]) == (-1 if w["cls"] is None else w["cls"])
                assert batch["txt"][i] == w["txt"] and batch["bin"][i] == w["bin"]
                seen.append((key, int(batch["draw"][i])))
    assert sorted(seen) == sorted(want)  # each (key, draw) once
    plain = PrecomputedDataset(root / "out", columns=["key", "cls", "json"], shuffle=False)
    rec = {r["key"]: r for r in plain}
    assert int(rec["0bare"]["cls"]) == -1 and rec["0bare"]["json"] is None
    assert rec["0full"]["json"] == SAMPLES["full"]["json"].decode()


def test_hf_export_carries_value_features(cond_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    from pipeline.consume.hf import export_hf_parquet, hf_features

    root, _ = cond_run
    from pipeline.consume.dataset import RecordsDir

    feats = hf_features(RecordsDir(root / "out").schema, ["key", "cls", "txt", "bin"])
    assert feats["cls"] == datasets.Value("int64") and feats["txt"] == datasets.Value("string")
    assert feats["bin"] == datasets.Value("binary")
    export_hf_parquet(root / "out", tmp_path / "hf", columns=["key", "draw", "x_t", "cls", "txt"])
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "hf" / "*.parquet"), split="train",
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    want = _expected_rows(root)
    assert len(ds) == len(want)
    for r in ds:
        w = want[(r["key"], r["draw"])]
        assert r["cls"] == w["cls"] and r["txt"] == w["txt"]


# -- validation ---------------------------------------------------------------------------------


def _validate(path):
    from pipeline import validate

    cfg = validate.load_config(
        [f"output.dir={path}", "progress=false", "ray.address=local", "plots=true"]
    )
    report = validate.run(cfg)
    return report, {c["name"]: c for c in report["checks"]}


def test_validation_reports_nulls_histogram_and_catches_a_shifted_label(cond_run, tmp_path):
    import shutil

    root, _ = cond_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    report, checks = _validate(out)
    c = checks["conditioning"]
    assert c["passed"], c["summary"]
    assert c["detail"]["histograms"]["cls"] == {"-9223372036854775808": 2, "3": 2, "7": 2}
    # nulls: per shard, bare has all 5 null (2 draws), full none, clsonly 4, big json/meta/bin
    assert checks["completeness"]["detail"]["nulls"] == {
        "cls": 4, "txt": 8, "json": 12, "meta_json": 12, "bin": 12
    }  # fmt: skip
    assert "hist_cls.png" in report["plots"]
    # plant: cls shifted down by one row within shard 0's file
    name = OutputDir(str(out)).data_files()[0]
    table = pq.read_table(out / name)
    cls = table.column("cls").to_pylist()
    shifted = cls[1:] + cls[:1]
    i = table.schema.get_field_index("cls")
    import pyarrow as pa

    table = table.set_column(i, table.schema.field(i), pa.array(shifted, pa.int64()))
    pq.write_table(table, out / name)
    _, checks = _validate(out)
    c = checks["conditioning"]
    assert not c["passed"]
    assert "records disagreeing with their key's first draw" in c["summary"]


# -- class names (source.class_names) -----------------------------------------------------------

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]  # labels 0..7


@pytest.mark.parametrize(
    "value, words",
    [
        ("[]", "no class names"),
        ("[cat,dog,cat]", "'cat' is both label 0 and label 2"),
        ("[cat,1]", "entry 1 is 1; names are non-empty strings"),
        ("/nonexistent/names.txt", "'/nonexistent/names.txt' is a string, so the path of a names"),
    ],
)
def test_class_names_refused_naming_the_key(make_cfg, value, words):
    cfg = make_cfg("source.urls=x.tar", "output.dir=o", f"source.class_names={value}")
    with pytest.raises(ValueError, match=f"config key source.class_names: .*{words}"):
        validate(cfg)


def test_class_names_need_cls_kept_and_a_file_reads_like_a_list(make_cfg, tmp_path):
    from pipeline.run.config import config_hash

    base = ("source.urls=x.tar", "output.dir=o")
    cfg = make_cfg(*base, "source.keep=[txt]", "source.class_names=[a,b]")
    with pytest.raises(ValueError, match="source.class_names: names cls labels, but cls is not"):
        validate(cfg)
    names = tmp_path / "names.txt"
    names.write_text("ant\n  bee \n\ncat\n")  # blank lines skipped, names stripped (datasets')
    from_file = make_cfg(*base, f"source.class_names={names}")
    validate(from_file)
    from_list = make_cfg(*base, "source.class_names=[ant,bee,cat]")
    hashes = [config_hash(c) for c in (make_cfg(*base), from_file, from_list)]
    assert hashes[1] == hashes[2] != hashes[0]  # the names count, not where they were read
    assert config_hash(make_cfg(*base, "source.class_names=null")) == hashes[0]
    assert config_hash(make_cfg(*base, "source.class_names=[ant,bee,dog]")) != hashes[1]


def test_extract_refuses_a_label_outside_the_names():
    c = Conditioning(["cls", "txt"], class_names=["a", "b", "c"])
    assert c.extract({"cls": b"2"})["cls"] == 2 and c.extract({})["cls"] is None
    for bad in (b"3", b"-1"):
        with pytest.raises(DecodeError, match=r"class label not in source.class_names .*0 to 2"):
            c.extract({"cls": bad})
    assert Conditioning.from_spec(c.describe()).class_names == ("a", "b", "c")
    assert "class_names" not in Conditioning(["cls"]).describe()  # older metadata unchanged


def test_class_names_through_precompute_and_the_hf_export(tmp_path, make_cfg):
    datasets = pytest.importorskip("datasets")
    from pipeline.consume.dataset import RecordsDir
    from pipeline.consume.hf import export_hf_parquet, hf_features, to_hf_dataset

    write_cond_shard(tmp_path / "n-0.tar")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES[:5]) + "\n")  # 5 names: clsonly (7) and big are out
    out = tmp_path / "out"
    cfg = make_cfg(
        "source=images", f"source.urls={tmp_path}/n-0.tar", "source.resolution=8",
        f"output.dir={out}", "source.keep=[cls,txt]", f"source.class_names={names}",
        "schedule.num_timesteps=20",
    )  # fmt: skip
    manifest = run(cfg)
    reasons = read_rejects(out)
    assert (
        "class label not in source.class_names in member 'clsonly.cls': 7; 5 names"
        in (reasons["clsonly"])
    )
    assert "class label not in source.class_names" in reasons["big"]
    assert manifest["totals"]["records"] == 4  # full (3), bare, badjson (2), nanjson
    rd = RecordsDir(out)
    assert rd.metadata["conditioning"]["class_names"] == NAMES[:5]  # the names, not the path
    feats = hf_features(rd.schema, ["key", "cls", "txt"])
    assert feats["cls"] == datasets.ClassLabel(names=NAMES[:5])
    export_hf_parquet(out, tmp_path / "hf", columns=["key", "cls", "txt"])
    ds = datasets.load_dataset(
        "parquet", data_files=str(tmp_path / "hf" / "*.parquet"), split="train",
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert ds.features["cls"].names == NAMES[:5]
    got = {r["key"]: ds.features["cls"].int2str(r["cls"]) for r in ds if r["cls"] is not None}
    assert got == {"full": "dog", "badjson": "cat"}
    gen = to_hf_dataset(out, ["key", "cls"], cache_dir=str(tmp_path / "cache2"))
    assert gen.features["cls"].names == NAMES[:5]
    assert sorted(r["cls"] for r in gen if r["cls"] is not None) == [2, 3]


def test_hf_export_refuses_labels_outside_the_recorded_names(cond_run, tmp_path):
    pytest.importorskip("datasets")
    from pipeline.consume.hf import export_hf_parquet

    root, _ = cond_run
    copy = tmp_path / "named"
    copy.mkdir()
    for name in OutputDir(str(root / "out")).data_files():
        table = pq.read_table(root / "out" / name)
        meta = records.process_metadata(table.schema)
        meta["conditioning"]["class_names"] = NAMES[:4]  # the records hold label 7
        raw = {**table.schema.metadata, records.METADATA_KEY: json.dumps(meta).encode()}
        pq.write_table(table.replace_schema_metadata(raw), copy / name)
    with pytest.raises(ValueError, match=r"c-0.parquet: cls label .* not in source.class_names"):
        export_hf_parquet(copy, tmp_path / "hf", columns=["key", "cls"])
