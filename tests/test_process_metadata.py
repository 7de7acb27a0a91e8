"""The process description as a typed contract (pipeline/output/description.py ProcessMetadata):
its JSON is exactly the dict written before the class (so every records file keeps its bytes),
it round-trips, an old manifest's ``process`` block reads, and a newer format is refused."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.noising import process
from pipeline.noising.noise import KeyedNoise
from pipeline.noising.schedule import make_schedule
from pipeline.output import records
from pipeline.output.description import (
    SUPPORTED_FORMATS,
    ProcessMetadata,
    make_metadata,
    noise_from_metadata,
    process_metadata,
    same_process,
    schedule_from_metadata,
)

ENCODER = {"kind": "vae", "model": "tiny", "latent": "sample", "store_dist": True,
           "scaling_factor": 0.18215, "shift_factor": 0.0, "input_shape": [3, 16, 16]}  # fmt: skip
TEXT = {"caption_key": "txt", "encoders": [{"name": "clip", "max_length": 77}], "dtype": "float16"}
BUCKETS = [{"bucket": [8, 16], "shape": [4, 1, 2]}, {"bucket": [16, 16], "shape": [4, 2, 2]}]
SOURCE = {"kind": "images", "resolution": 16, "buckets": None}


def old_make_metadata(*, schedule, noise, dtype, shape, store_x0, config_hash, source=None,
                      library_version=None, encoder=None, conditioning=None, targets=(),
                      buckets=None, text=None) -> dict:  # fmt: skip
    """make_metadata as it was before ProcessMetadata (commit 12dc31c), plus the ``text`` entry
    pipeline.run.metadata.dataset_metadata appended: the reference for the bytes."""
    meta = {
        "format": "ddpm-records/1",
        "schedule": schedule.describe(),
        "noise": noise.describe(),
        "dtype": dtype,
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
    if targets:
        meta["targets"] = sorted(targets)
    if buckets is not None:
        meta["buckets"] = [dict(b) for b in buckets]
    if text is not None:
        meta["text"] = text
    return meta


def _ddpm():
    return process.ddpm(make_schedule("cosine", 100)), KeyedNoise(5, 100, 2, "uniform")


def _flow():
    proc = process.flow(1000, shift=3.0)
    return proc, KeyedNoise(1, 1000, 1, "logit_normal", family="flow")


CASES = {
    "ddpm": (_ddpm, dict(dtype="float16", shape=[3, 8, 8], store_x0=False)),
    "ddpm-x0-v": (_ddpm, dict(dtype="float32", shape=[3, 8, 8], store_x0=True, targets=["v"])),
    "flow": (
        _flow,
        dict(
            dtype="float16", shape=[4, 8, 8], store_x0=False, source=SOURCE, library_version="0.3.0"
        ),
    ),  # fmt: skip
    "vae": (
        _ddpm,
        dict(
            dtype="float16",
            shape=[4, 2, 2],
            store_x0=False,
            encoder=ENCODER,
            source=SOURCE,
            conditioning={"keep": ["cls"], "types": {"cls": "int64"}},
            library_version="0.3.0",
        ),
    ),  # fmt: skip
    "text": (_ddpm, dict(dtype="float16", shape=[4, 2, 2], store_x0=False, text=TEXT)),
    "buckets": (
        _flow,
        dict(
            dtype="float16",
            shape=[4, 2, 2],
            store_x0=False,
            buckets=BUCKETS,
            source={**SOURCE, "buckets": [[8, 16], [16, 16]]},
        ),
    ),  # fmt: skip
}


def _both(case: str) -> tuple[dict, ProcessMetadata]:
    build, kwargs = CASES[case]
    proc, noise = build()
    old = old_make_metadata(schedule=proc, noise=noise, config_hash="abc", **kwargs)
    new_kwargs = {k: v for k, v in kwargs.items() if k != "text"}
    new = ProcessMetadata.from_json(
        make_metadata(schedule=proc, noise=noise, config_hash="abc", **new_kwargs)
    )
    new.text = kwargs.get("text")
    return old, new


@pytest.mark.parametrize("case", sorted(CASES))
def test_json_is_the_old_dict_byte_for_byte(case):
    old, new = _both(case)
    assert list(new.to_json()) == list(old)  # same keys, same order, same omissions
    assert json.dumps(new.to_json(), sort_keys=True) == json.dumps(old, sort_keys=True)
    assert json.dumps(new.to_json()) == json.dumps(old)
    # and inside a records file's schema: the same 'ddpm' bytes from either form
    shape = old["shape"]
    a = records.record_schema(shape, old["dtype"], old["store_x0"], old)
    b = records.record_schema(shape, new.dtype, new.store_x0, new)
    assert a.metadata[records.METADATA_KEY] == b.metadata[records.METADATA_KEY]
    assert a.equals(b, check_metadata=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_json_and_a_schema(case):
    _, new = _both(case)
    assert ProcessMetadata.from_json(json.loads(json.dumps(new.to_json()))) == new
    schema = records.record_schema(new.shape, new.dtype, new.store_x0, new)
    assert ProcessMetadata.from_json(process_metadata(schema)) == new
    assert same_process(new, process_metadata(schema)) == []


# The keys a description may lack (what each reads as then: ProcessMetadata's defaults), with a
# value each may hold; every one but format may also be written as null.
MAYBE = {
    "format": "ddpm-records/1", "store_x0": True, "config_hash": "abc", "source": SOURCE,
    "library_version": "0.3.0", "encoder": ENCODER,
    "conditioning": {"keep": ["cls"], "types": {"cls": "int64"}}, "targets": ["v"],
    "buckets": BUCKETS, "text": TEXT, "grid": process.flow(1000, shift=3.0).grid,
}  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _required() -> dict:
    proc, noise = _ddpm()
    return {"schedule": proc.describe(), "noise": noise.describe(), "dtype": "float16",
            "shape": [3, 8, 8]}  # fmt: skip


def _assert_round_trip(d: dict) -> None:
    """``d`` comes back from ProcessMetadata exactly: the same keys in the same order, through
    JSON text, and as the same bytes in a records file's schema and in a manifest."""
    from pipeline.output.manifest import OutputDir

    m = ProcessMetadata.from_json(d)
    assert m.to_json() == d and list(m.to_json()) == list(d)
    assert ProcessMetadata.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert json.dumps(m.to_json()) == json.dumps(d)
    schema = records.record_schema([3, 8, 8], "float16", False, m)
    assert schema.metadata[records.METADATA_KEY] == json.dumps(d, sort_keys=True).encode()
    assert process_metadata(schema) == d
    manifest = OutputDir.encode_json({"process": m.to_json()})
    assert manifest == OutputDir.encode_json({"process": d})


@pytest.mark.parametrize(
    "change",
    [
        {"config_hash": None},  # absent: a hand-written description, or an older version's
        {"store_x0": None},
        {"format": None},  # before the key existed
        {"config_hash": "null"},  # present, null
        {"encoder": "null"},
        {"source": "null", "text": "null", "grid": "null"},
    ],
    ids=[
        "no-config_hash",
        "no-store_x0",
        "no-format",
        "null-config_hash",
        "null-encoder",
        "null-source-text-grid",
    ],
)
def test_a_description_without_a_key_or_with_a_null_round_trips_exactly(change):
    full = {"format": "ddpm-records/1", **_required(), "store_x0": False, "config_hash": "abc",
            "encoder": ENCODER}  # fmt: skip
    d = {k: v for k, v in full.items() if change.get(k, 1) is not None}
    d.update({k: None for k, v in change.items() if v == "null"})
    _assert_round_trip(d)
    m = ProcessMetadata.from_json(d)
    assert m.encoder == d.get("encoder") and m.config_hash == d.get("config_hash")  # null: None
    assert m.store_x0 is d.get("store_x0", False) and m.format == "ddpm-records/1"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_every_dict_it_accepts_round_trips_exactly(data):
    """Property: each key that may be absent is absent, null (but format, which must name a
    version) or set; unknown keys added; the keys in any order."""
    d = _required()
    for key, value in MAYBE.items():
        how = data.draw(st.sampled_from(["absent", "set"] + ([] if key == "format" else ["null"])))
        if how != "absent":
            d[key] = value if how == "set" else None
    known = set(MAYBE) | set(d) | {"extra", "_keys"}
    unknown = st.text(min_size=1, max_size=6).filter(lambda k: k not in known)
    d.update(data.draw(st.dictionaries(unknown, JSON_VALUES, max_size=2)))
    d.update(data.draw(st.dictionaries(st.sampled_from(["extra", "_keys"]), JSON_VALUES)))
    order = data.draw(st.permutations(list(d)))
    _assert_round_trip({k: d[k] for k in order})


def test_a_field_set_after_reading_is_written_and_equality_is_the_json():
    d = {**_required(), "encoder": None}  # no format, store_x0, config_hash; a null encoder
    m = ProcessMetadata.from_json(d)
    assert ProcessMetadata.from_json({**_required()}) != m  # absent is not null
    assert ProcessMetadata.from_json({**_required(), "encoder": None}) == m
    m.config_hash, m.text = "h", TEXT  # set since: written, after the keys read
    assert list(m.to_json()) == [*d, "config_hash", "text"] and m.to_json()["config_hash"] == "h"
    m.encoder = ENCODER  # read (as null): stays in its place
    assert m.to_json() == {**d, "encoder": ENCODER, "config_hash": "h", "text": TEXT}
    moved = replace(m, source=SOURCE, grid=None)  # as the worker adds a file's source and grid
    assert moved.to_json() == {**m.to_json(), "source": SOURCE}
    assert m.to_json()["encoder"] == ENCODER and "source" not in m.to_json()


def _leaves(value, path=()):
    """The path of every value, container and key of a JSON value."""
    yield path
    if isinstance(value, dict | list):
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _leaves(v, (*path, k))


def _changed(d, path, how: str):
    """A deep copy of ``d`` with the value at ``path`` changed, deleted or given one more item."""
    d = copy.deepcopy(d)
    *up, last = path
    parent = d
    for k in up:
        parent = parent[k]
    v = parent[last]
    if how == "delete":
        del parent[last]
    elif isinstance(v, dict | list):
        v.update({"added": 1}) if isinstance(v, dict) else v.append(1)
    else:
        parent[last] = {bool: lambda: not v, int: lambda: v + 1, float: lambda: v * 1.5 + 1,
                        str: lambda: v + "x", type(None): lambda: 0}[type(v)]()  # fmt: skip
    return d


def test_a_description_pin_fails_on_any_change_of_any_field_and_not_on_a_move(tmp_path):
    """tests/fixtures/pins.py, which the flow, text and bucket jobs' tests pin descriptions
    with: changing, deleting or extending any value of a description changes the pinned JSON
    or fails a check of a normalised value; the same job in another tmp dir pins the same."""
    import hashlib
    import shutil

    import numpy as np
    from fixtures.pins import canonical, normalise

    from pipeline import __version__

    def job(root):
        model = root / "clip"
        model.mkdir(parents=True)
        for n in ("config.json", "model.safetensors", "tokenizer.json"):
            (model / n).write_bytes(n.encode())
        sha = {n: hashlib.sha256(n.encode()).hexdigest() for n in ("config.json",
               "model.safetensors", "tokenizer.json")}  # fmt: skip
        proc, noise = _flow()
        meta = make_metadata(
            schedule=proc, noise=noise, dtype="float16", shape=[4, 8, 8], store_x0=False,
            config_hash="abc", source={**SOURCE, "url": f"{root}/a-0.tar", "shard": "a-0"},
            library_version=__version__, targets=["v"], buckets=BUCKETS,
        )  # fmt: skip
        encoder = {"name": "clip", "model": str(model), "folder": str(model),
                   "tokenizer_folder": str(model), "config_sha256": sha["config.json"],
                   "weights_sha256": {"model.safetensors": sha["model.safetensors"]},
                   "tokenizer_sha256": {"tokenizer.json": sha["tokenizer.json"]}}  # fmt: skip
        return {**meta, "text": {**TEXT, "encoders": [encoder]}, "grid": proc.grid}

    meta = job(tmp_path / "a")
    assert meta["noise"]["numpy_version"] == np.__version__
    pin = canonical(normalise(meta, {"tmp": tmp_path / "a"}, "abc"))
    assert str(tmp_path) not in pin and np.__version__ not in pin and __version__ not in pin

    def fails(d) -> bool:
        try:
            return canonical(normalise(d, {"tmp": tmp_path / "a"}, "abc")) != pin
        except AssertionError:  # a normalised value that is not what it must be
            return True

    paths = list(_leaves(meta))[1:]
    assert len(paths) > 70
    for path in paths:
        for how in ("change", "delete"):
            assert fails(_changed(meta, path, how)), (path, how)
    assert not fails(copy.deepcopy(meta))
    moved = job(tmp_path / "b")  # another tmp dir: other paths
    assert canonical(normalise(moved, {"tmp": tmp_path / "b"}, "abc")) == pin
    shutil.rmtree(tmp_path / "b" / "clip")  # its files are checked: gone, the pin fails
    with pytest.raises(AssertionError, match="not the sha256 of"):
        normalise(moved, {"tmp": tmp_path / "b"}, "abc")
    with pytest.raises(AssertionError, match="pass its cfg"):  # a model's hash needs the config
        normalise(meta, {"tmp": tmp_path / "a"})


def test_typed_fields_and_the_readers_take_either_form():
    old, new = _both("vae")
    assert (new.format, new.dtype, new.shape, new.store_x0) == ("ddpm-records/1", "float16",
                                                                 [4, 2, 2], False)  # fmt: skip
    assert new.encoder == ENCODER and new.targets is None and new.buckets is None
    assert (new.family, new.num_timesteps, new.draws_per_sample) == ("ddpm", 100, 2)
    s_old, s_new = schedule_from_metadata(old), schedule_from_metadata(new)
    assert s_old.betas_sha256 == s_new.betas_sha256
    assert noise_from_metadata(old).describe() == noise_from_metadata(new).describe()
    assert records.process_from_metadata(new).sigmas_sha256 == (
        records.process_from_metadata(old).sigmas_sha256
    )
    other = ProcessMetadata.from_json({**old, "dtype": "float32"})
    assert same_process(new, other) == ["dtype"] == same_process(old, other.to_json())


def test_an_old_manifest_process_block_reads_and_unknown_fields_are_kept():
    # a manifest's process block as written before this class (no targets, no buckets), with a
    # key a later version might add: kept and written back
    block = {
        "format": "ddpm-records/1",
        "schedule": {"name": "linear", "num_timesteps": 10, "zero_terminal_snr": False,
                     "params": {}, "betas_sha256": "x"},  # fmt: skip
        "noise": {"seed": 0, "draws_per_sample": 1, "timesteps": "uniform"},
        "dtype": "float16", "shape": [3, 4, 4], "store_x0": False, "config_hash": "h",
        "source": {"kind": "arrays"}, "library_version": "0.1.0", "future": {"x": 1},
    }  # fmt: skip
    m = ProcessMetadata.from_json(json.loads(json.dumps(block)))
    assert (m.family, m.num_timesteps, m.source, m.extra) == ("ddpm", 10, {"kind": "arrays"},
                                                              {"future": {"x": 1}})  # fmt: skip
    assert m.to_json() == block and list(m.to_json()) == list(block)
    older = {k: v for k, v in block.items() if k not in ("format", "future", "library_version")}
    assert ProcessMetadata.from_json(older).format == "ddpm-records/1"  # before the key


def test_a_newer_or_foreign_format_is_refused_saying_what_is_supported():
    _, new = _both("ddpm")
    with pytest.raises(ValueError, match=r"'ddpm-records/2' is not supported.*ddpm-records/1"):
        ProcessMetadata.from_json({**new.to_json(), "format": "ddpm-records/2"})
    assert SUPPORTED_FORMATS == ("ddpm-records/1",)
    with pytest.raises(ValueError, match=r"without \['schedule'\]"):
        ProcessMetadata.from_json({k: v for k, v in new.to_json().items() if k != "schedule"})


def test_a_schema_without_the_description_is_refused():
    with pytest.raises(ValueError, match="no 'ddpm' process metadata"):
        process_metadata(pa.schema([("key", pa.string())]))


def test_the_loader_reads_it_typed_and_refuses_a_newer_format(tmp_path):
    import pyarrow.parquet as pq
    from fixtures.records import write_records

    from pipeline.consume.recordsdir import RecordsDir

    root = tmp_path / "out"
    write_records(root, {"a": 8}, shape=(3, 4, 4))
    rd = RecordsDir(str(root))
    assert (rd.description.shape, rd.description.draws_per_sample) == ([3, 4, 4], 1)
    assert rd.description.to_json() == rd.metadata  # the public dict, unchanged
    table = pq.read_table(root / "a.parquet")
    meta = {**process_metadata(table.schema), "format": "ddpm-records/2"}
    raw = {**table.schema.metadata, records.METADATA_KEY: json.dumps(meta).encode()}
    pq.write_table(table.replace_schema_metadata(raw), root / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: process metadata format 'ddpm-records/2'"):
        RecordsDir(str(root))


def test_a_rerun_on_a_newer_manifest_is_a_job_error_naming_it(tmp_path):
    # resuming into an output whose manifest a newer version wrote: exit 2 naming the manifest,
    # not an internal error (a bare ValueError is reported as a bug, exit 70)
    from pipeline.output.manifest import OutputDir
    from pipeline.precompute import JobError, manifest_shape

    _, new = _both("ddpm")
    out = OutputDir(str(tmp_path))
    assert manifest_shape(out, None) is None
    assert manifest_shape(out, {"process": new.to_json()}) == [3, 8, 8]
    newer = {"process": {**new.to_json(), "format": "ddpm-records/2"}}
    with pytest.raises(JobError, match=r"_manifest.json: process metadata format 'ddpm-records/2'"):
        manifest_shape(out, newer)
