"""Tests of pipeline.read.source: samples from shards, grouping, pickled members, error policy,
URL helpers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image
from shards import (
    array_samples,
    encode_image,
    npy_bytes,
    random_image,
    write_array_shard,
    write_image_shard,
    write_tar,
)

from pipeline.read.decoders import ArrayDecoder, DecodeError, ImageDecoder
from pipeline.read.source import (
    Reject,
    Sample,
    SampleError,
    check_unique_ids,
    expand_globs,
    expand_urls,
    iter_shard,
    missing_local_shards,
    shard_id,
)


def run(path, decoder, on_error="skip") -> list[Sample | Reject]:
    return list(iter_shard(str(path), decoder, on_error))


def rejects(items) -> list[Reject]:
    return [x for x in items if isinstance(x, Reject)]


def kinds(items) -> list[tuple[str, int, str]]:
    return [(x.key, x.index, type(x).__name__) for x in items]


# ----------------------------------------------------------------------------------- arrays


def test_array_shard_values_and_extras_ignored(tmp_path):
    path = tmp_path / "a-000.tar"
    keys = write_array_shard(path, 3, extras={"cls": b"1", "json": b"{}"})
    items = run(path, ArrayDecoder())
    expected = array_samples(3)
    assert [(x.key, x.index) for x in items] == [(k, i) for i, k in enumerate(keys)]
    for item in items:
        assert item.array.dtype == np.float32 and item.array.flags.c_contiguous
        np.testing.assert_array_equal(item.array, expected[item.key])


def test_shape_fixed_by_first_valid_sample(tmp_path):
    nan = np.full((2, 2), np.nan, np.float32)
    shapes = [(4, 8, 8), (4, 8, 8), (4, 8, 7), (4, 8, 8)]
    members = [("a.npy", npy_bytes(nan))]  # invalid: must not fix the shape
    members += [(f"s{i}.npy", npy_bytes(np.zeros(s, np.float32))) for i, s in enumerate(shapes)]
    items = run(write_tar(tmp_path / "x.tar", members), ArrayDecoder())
    assert [type(x).__name__ for x in items] == ["Reject", "Sample", "Sample", "Reject", "Sample"]
    assert items[0].reason == "non-finite values (4 NaN, 0 Inf)"
    assert items[3].reason == "shape (4, 8, 7) != expected (4, 8, 8) in member 's2.npy'"
    assert [x.index for x in items] == [0, 1, 2, 3, 4]


def test_explicit_shape_and_reset_per_shard(tmp_path):
    a = tmp_path / "a.tar"
    b = tmp_path / "b.tar"
    write_array_shard(a, 2, shape=(4, 8, 8))
    write_array_shard(b, 2, shape=(2, 3))
    free = ArrayDecoder()
    assert all(isinstance(x, Sample) for x in run(a, free) + run(b, free))
    fixed = ArrayDecoder(shape=(4, 8, 8))
    assert all(isinstance(x, Sample) for x in run(a, fixed))
    assert [x.reason for x in run(b, fixed)] == [
        f"shape (2, 3) != expected (4, 8, 8) in member 's00000{i}.npy'" for i in range(2)
    ]


def test_nan_and_inf_counted(tmp_path):
    raw = np.zeros((2, 4), np.float32)
    raw[0, :3] = np.nan
    raw[1, 0] = -np.inf
    (item,) = run(write_tar(tmp_path / "x.tar", [("k.npy", npy_bytes(raw))]), ArrayDecoder())
    assert item == Reject("k", 0, "non-finite values (3 NaN, 1 Inf)")


@pytest.mark.parametrize("shape", [(3, 0, 4), (0,), (2, 0)])
def test_empty_arrays_are_rejected_and_never_fix_the_shape(tmp_path, shape):
    members = [
        ("a.npy", npy_bytes(np.zeros(shape, np.float32))),
        ("b.npy", npy_bytes(np.ones((3, 2, 4), np.float32))),
        ("c.npy", npy_bytes(np.zeros(shape, np.float32))),
    ]
    items = run(write_tar(tmp_path / "e.tar", members), ArrayDecoder())
    assert kinds(items) == [("a", 0, "Reject"), ("b", 1, "Sample"), ("c", 2, "Reject")]
    assert items[0].reason == (
        f"empty .npy in member 'a.npy': shape {shape} has a zero-size dimension"
    )
    with pytest.raises(DecodeError, match="unsupported .npy"):  # 0-d
        ArrayDecoder()({"npy": npy_bytes(np.float32(1))})
    items = run(tmp_path / "e.tar", lambda m: np.zeros((2, 0)))  # a custom decoder's output too
    assert items[1].reason == "decoder returned an empty array of shape (2, 0)"


def test_unexpected_exception_types_reject_their_sample_alone(tmp_path):
    """Whatever a parser raises for one sample (here a KeyError, a RecursionError, the
    int-string limit's ValueError) rejects that sample with its type and message; the shard's
    other samples are read, and on_error=fail names the sample."""
    members = [(f"{k}.npy", npy_bytes(np.full((2,), i, np.float32))) for i, k in enumerate("abcd")]
    path = write_tar(tmp_path / "u.tar", members)
    raised = {1: KeyError("scale"), 2: RecursionError("too deep")}

    def decoder(m):
        value = int(ArrayDecoder()(m)[0])
        if value in raised:
            raise raised[value]
        return np.ones(2)

    items = run(path, decoder)
    assert kinds(items) == [("a", 0, "Sample"), ("b", 1, "Reject"), ("c", 2, "Reject"),
                            ("d", 3, "Sample")]  # fmt: skip
    assert items[1].reason == "cannot decode sample 'b': KeyError: 'scale'"
    assert items[2].reason == "cannot decode sample 'c': RecursionError: too deep"
    with pytest.raises(SampleError, match=r"key 'b' \(index 1\).*KeyError"):
        run(path, decoder, on_error="fail")
    # a .npy header whose shape has 5000 digits: numpy's int() raises ValueError
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"9" * 5000 + b",), }"
    text += b" " * (-(len(text) + 13) % 64) + b"\n"
    header = b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text
    with pytest.raises(DecodeError, match="undecodable .npy.*ValueError"):
        ArrayDecoder()({"npy": header + b"\0" * 8})


# --------------------------------------------------------------------------------- security


class Evil:
    """Unpickling this creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_payloads_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(marker))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Evil(probe))).close()  # the payload is live...
    assert probe.exists()
    members = [
        ("a.pyd", payload),
        ("b.png", encode_image(Image.new("RGB", (8, 8)))),
        ("b.pickle", payload),
        ("c.npy", payload),
        ("d.npy", npy_bytes(np.array([Evil(marker)], dtype=object), allow_pickle=True)),
        ("e.seg.pth", payload),
        ("f.npy", npy_bytes(np.zeros(2, np.float32))),
        ("f.pkl", payload),
        ("g.ckpt", payload),
        ("h.pt", payload),
    ]
    path = write_tar(tmp_path / "x.tar", members)
    for decoder in (ArrayDecoder(), ImageDecoder(8)):
        items = run(path, decoder)
        assert all(isinstance(x, Reject) for x in items), items
    assert not marker.exists()  # ...but was never unpickled
    reasons = {x.key: x.reason for x in run(path, ArrayDecoder())}
    assert reasons["a"] == "refused to decode pickled member 'a.pyd': shards are untrusted"
    assert reasons["b"] == "refused to decode pickled member 'b.pickle': shards are untrusted"
    assert reasons["c"].startswith("undecodable .npy in member 'c.npy'")
    assert reasons["d"] == "pickled .npy refused in member 'd.npy': dtype object"
    assert "'e.seg.pth'" in reasons["e"] and "'f.pkl'" in reasons["f"]


def test_valid_image_with_extra_pyd_member_is_rejected(tmp_path):
    path = tmp_path / "x.tar"
    write_image_shard(path, 2, extras={"pyd": pickle.dumps(1)})
    items = run(path, ImageDecoder(8))
    assert [x.reason for x in items] == [
        f"refused to decode pickled member 's00000{i}.pyd': shards are untrusted" for i in (0, 1)
    ]


# --------------------------------------------------------------------- samples and grouping


def test_image_shard_keys_indices_and_formats(tmp_path):
    for fmt in ("png", "jpg", "jpeg", "webp"):
        path = tmp_path / f"{fmt}.tar"
        keys = write_image_shard(path, 3, fmt=fmt, extras={"txt": b"caption", "cls": b"2"})
        items = run(path, ImageDecoder(16))
        assert [(x.key, x.index) for x in items] == [(k, i) for i, k in enumerate(keys)]
        assert all(isinstance(x, Sample) and x.array.shape == (3, 16, 16) for x in items)


def test_bad_samples_are_rejected_and_counted(tmp_path):
    good = encode_image(random_image((12, 10)))
    png = encode_image(random_image((40, 40)))
    members = [
        ("a.png", good),
        ("b.jpg", b"garbage"),
        ("c.json", b"{}"),
        ("d.png", png[: len(png) // 2]),
        ("e.png", good),
        ("e.jpg", good),
        ("f.PNG", good),
        ("dir/g.png", good),
    ]
    items = run(write_tar(tmp_path / "x.tar", members), ImageDecoder(8))
    assert [(x.key, x.index, type(x).__name__) for x in items] == [
        ("a", 0, "Sample"),
        ("b", 1, "Reject"),
        ("c", 2, "Reject"),
        ("d", 3, "Reject"),
        ("e", 4, "Reject"),
        ("f", 5, "Sample"),
        ("dir/g", 6, "Sample"),
    ]
    reasons = [x.reason for x in rejects(items)]
    assert reasons[0] == (
        "undecodable image in member 'b.jpg': cannot identify image file "
        "(allowed formats ['JPEG', 'PNG', 'WEBP'])"
    )
    assert (
        reasons[1] == "no payload: members ['json'], expected one of ['jpg', 'jpeg', 'png', 'webp']"
    )
    assert reasons[2].startswith("undecodable image in member 'd.png': ")
    assert reasons[3] == "ambiguous payload: members ['jpg', 'png'] are all payloads"


def test_non_contiguous_and_duplicate_keys(tmp_path):
    image = encode_image(random_image((12, 10)))
    members = [
        ("a.png", image),
        ("b.png", image),
        ("a.cls", b"1"),  # a's members are not contiguous
        ("c.png", image),
        ("c.png", image),  # the same member twice
        ("b.png", image),  # a whole duplicate sample
    ]
    items = run(write_tar(tmp_path / "x.tar", members), ImageDecoder(8))
    assert [(x.key, x.index, type(x).__name__) for x in items] == [
        ("a", 0, "Sample"),
        ("b", 1, "Sample"),
        ("a", 2, "Reject"),
        ("c", 3, "Reject"),
        ("b", 4, "Reject"),
    ]
    dup = "duplicate key within shard (members not contiguous in the tar?)"
    assert [x.reason for x in rejects(items)] == [
        dup,
        "duplicate member 'c.png' within the sample",
        dup,
    ]


def test_member_without_extension_is_a_reject_of_its_own(tmp_path):
    """A stray member counts as a rejected sample (keyed by its name, with its own index), so a
    shard's samples = records + rejects; it is yielded after the sample it interrupts."""
    image = encode_image(random_image((12, 10)))
    members = [("a.png", image), ("README", b"hi"), ("a.cls", b"1"), ("b.png", image)]
    items = run(write_tar(tmp_path / "x.tar", members), ImageDecoder(8))
    assert [(x.key, x.index, type(x).__name__) for x in items] == [
        ("a", 0, "Sample"),
        ("README", 1, "Reject"),
        ("b", 2, "Sample"),
    ]
    assert "'README' has no extension" in items[1].reason


# ----------------------------------------------------------------------------- error policy


def test_on_error_fail_names_url_key_and_reason(tmp_path):
    members = [("a.npy", npy_bytes(np.zeros(2))), ("b.npy", npy_bytes(np.array([np.nan, 0])))]
    path = str(write_tar(tmp_path / "x.tar", members))
    it = iter_shard(path, ArrayDecoder(), on_error="fail")
    assert next(it).key == "a"
    with pytest.raises(SampleError) as info:
        next(it)
    message = str(info.value)
    assert path in message and "'b'" in message and "non-finite values (1 NaN, 0 Inf)" in message
    err = pickle.loads(pickle.dumps(info.value))  # exceptions cross Ray actors pickled
    assert (err.url, err.key, err.index, str(err)) == (path, "b", 1, message)
    assert isinstance(err, ValueError)


def test_on_error_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="skip.*fail"):
        iter_shard(str(tmp_path / "x.tar"), ArrayDecoder(), on_error="ignore")


def test_custom_decoder_output_is_checked(tmp_path):
    path = write_array_shard(tmp_path / "x.tar", 2) and tmp_path / "x.tar"
    items = run(path, lambda members: np.array([1.0, np.inf], dtype=np.float64))
    assert [x.reason for x in items] == ["non-finite values (0 NaN, 1 Inf)"] * 2
    items = run(path, lambda members: np.ones((2, 2), dtype=np.float64))
    assert all(x.array.dtype == np.float32 for x in items)


# ------------------------------------------------------------------------------ URL helpers


def test_expand_urls():
    assert expand_urls("s3://b/train-{000..002}.tar") == [
        f"s3://b/train-{i:03d}.tar" for i in range(3)
    ]
    assert expand_urls("a-{0..1}.tar::b-{x,y}.tar") == ["a-0.tar", "a-1.tar", "b-x.tar", "b-y.tar"]
    assert expand_urls(["pipe:curl -s http://h/a-{01..02}.tar", "/d/c.tar"]) == [
        "pipe:curl -s http://h/a-01.tar",
        "pipe:curl -s http://h/a-02.tar",
        "/d/c.tar",
    ]
    assert expand_urls("gs://b/x.tar") == ["gs://b/x.tar"]
    with pytest.raises(ValueError):
        expand_urls([])


SPECS = [
    "s3://b/train-{000..002}.tar",  # a range with zero padding
    "a-{8..11}.tar",  # a range across widths, no padding
    "a-{0008..0011}.tar",
    "x-{a,b}-{1..2}.tgz",  # a list, nested with a range
    "a-{0..1}.tar::b-{x,y}.tar::c.tar",  # :: lists
    "a-{0..4..2}.tar",  # a step
    "a-{c..a}.tar",  # a letter range, descending
    "a-{1..0}{x,y}.tar",
    "a-\\{0..1\\}.tar",  # escaped braces stay
    "{}.tar",
    "a.tar::",  # an empty part
    "pipe:curl -s http://h/a-{01..02}.tar",
    "/data/${SPLIT}/a-{0..1}.tar",  # ${VAR} from WDS_VAR
    "/data/${NEST}/a.tar",  # a value naming another variable
]


@pytest.mark.parametrize("spec", SPECS)
def test_expand_urls_is_webdatasets_expansion(spec, monkeypatch):
    """expand_urls reimplements webdataset.shardlists.expand_urls (importing webdataset imports
    torch): the same URLs for every spec (only blank ones are dropped)."""
    from webdataset.shardlists import expand_urls as wds_expand_urls

    monkeypatch.setenv("WDS_SPLIT", "train")
    monkeypatch.setenv("WDS_NEST", "${SPLIT}-{0..1}")
    expected = [u for u in wds_expand_urls(spec) if u.strip()]
    assert expected and expand_urls(spec) == expected
    assert expand_urls([spec, spec]) == expected * 2


def test_expand_urls_refuses_what_webdataset_refuses(monkeypatch):
    from webdataset.shardlists import expand_urls as wds_expand_urls

    with pytest.raises(ValueError, match="Unbalanced braces") as ours:
        expand_urls("a-{0..1.tar")
    with pytest.raises(ValueError) as theirs:
        wds_expand_urls("a-{0..1.tar")
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    monkeypatch.delenv("WDS_NOPE", raising=False)
    with pytest.raises(ValueError, match=r"missing environment variable WDS_NOPE \(\$\{NOPE\}"):
        expand_urls("/d/${NOPE}/a.tar")


@pytest.mark.parametrize(
    "url,expected",
    [
        ("s3://b/train-000003.tar", "train-000003"),
        ("/data/shards/train-000003.tar", "train-000003"),
        ("file:///data/a-7.tar.gz", "a-7"),
        ("x.tgz", "x"),
        ("pipe:curl -s http://x/a-01.tar", "a-01"),
        ("pipe:aws s3 cp s3://b/dir/c-02.tar -", "c-02"),
        ("pipe:cat '/tmp/d e/f-03.tar'", "f-03"),
        ("pipe:gsutil cat gs://b/d/i-06.tar.gz", "i-06"),
        ("pipe:echo 'unbalanced /x/j-07.tar", "j-07"),
        ("https://h/p/g-04.tar?token=abc", "g-04"),
        ("relative/h-05", "h-05"),
    ],
)
def test_shard_id(url, expected):
    assert shard_id(url) == expected


def test_shard_id_fallback_is_stable_and_safe():
    assert shard_id("pipe:") == shard_id("pipe:") != shard_id("pipe: ")
    assert shard_id("pipe:").startswith("shard-")
    assert "/" not in shard_id("gs://b/we ird:name.tar")


def test_check_unique_ids():
    urls = expand_urls("s3://b/train-{000..002}.tar")
    assert list(check_unique_ids(urls)) == ["train-000", "train-001", "train-002"]
    with pytest.raises(ValueError, match="'0'.*s3://b/train/0.tar.*s3://b/val/0.tar"):
        check_unique_ids(["s3://b/train/0.tar", "s3://b/val/0.tar"])


# ------------------------------------------------------------------------------ glob patterns


@pytest.fixture
def tree(tmp_path):
    """Files a-0.tar, a-1.tar, a-2.tar, b-x.tar, sub/a-9.tar, sub/deep/a-7.tar and a directory
    dir.tar under tmp_path."""
    for name in ("a-0.tar", "a-1.tar", "a-2.tar", "b-x.tar", "sub/a-9.tar", "sub/deep/a-7.tar"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.tar").mkdir()
    return tmp_path


def test_glob_patterns_on_local_paths(tree):
    d = str(tree)
    assert expand_globs([f"{d}/a-*.tar"]) == [f"{d}/a-{i}.tar" for i in range(3)]
    assert expand_globs([f"{d}/a-?.tar"]) == [f"{d}/a-{i}.tar" for i in range(3)]
    assert expand_globs([f"{d}/a-[02].tar"]) == [f"{d}/a-0.tar", f"{d}/a-2.tar"]
    assert expand_globs([f"{d}/a-[!02].tar"]) == [f"{d}/a-1.tar"]
    assert expand_globs([f"{d}/*.tar"]) == [f"{d}/{n}.tar" for n in ("a-0", "a-1", "a-2", "b-x")]
    assert expand_globs([f"{d}/**/a-*.tar"]) == sorted(
        [f"{d}/a-{i}.tar" for i in range(3)] + [f"{d}/sub/a-9.tar", f"{d}/sub/deep/a-7.tar"]
    )
    # overlapping patterns and a literal path: each file once, in first-seen order
    assert expand_globs([f"{d}/a-0.tar", f"{d}/a-*.tar", f"{d}/a-[01].tar"]) == [
        f"{d}/a-{i}.tar" for i in range(3)
    ]
    # beside braces (expanded first) and with file://
    assert expand_globs(expand_urls(f"{d}/{{a,b}}-*.tar")) == [
        *(f"{d}/a-{i}.tar" for i in range(3)),
        f"{d}/b-x.tar",
    ]
    assert expand_globs([f"file://{d}/b-*.tar"]) == [f"file://{d}/b-x.tar"]
    # commands and web URLs are left alone
    assert expand_globs(["pipe:cat /x/*.tar", "https://h/a-?.tar"]) == [
        "pipe:cat /x/*.tar",
        "https://h/a-?.tar",
    ]
    with pytest.raises(ValueError, match=r"source.urls: the pattern '.*/c-\*.tar' matches no file"):
        expand_globs([f"{d}/a-*.tar", f"{d}/c-*.tar"])


def test_glob_patterns_on_an_object_store():
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("a-0.tar", "a-1.tar", "b-0.tar", "x/a-5.tar", "x/y/a-6.tar"):
        fs.pipe(f"/globtest/{name}", b"x")
    try:
        assert expand_globs(["memory://globtest/a-*.tar"]) == [
            "memory://globtest/a-0.tar",
            "memory://globtest/a-1.tar",
        ]
        assert expand_globs(["memory://globtest/[ab]-0.tar"]) == [
            "memory://globtest/a-0.tar",
            "memory://globtest/b-0.tar",
        ]
        assert expand_globs(["memory://globtest/**/a-?.tar"]) == [
            "memory://globtest/a-0.tar",
            "memory://globtest/a-1.tar",
            "memory://globtest/x/a-5.tar",
            "memory://globtest/x/y/a-6.tar",
        ]
        with pytest.raises(ValueError, match="matches no file"):
            expand_globs(["memory://globtest/z-*.tar"])
    finally:
        fs.rm("/globtest", recursive=True)


def test_missing_local_shards(tree):
    d = str(tree)
    urls = [f"{d}/a-0.tar", f"{d}/gone-1.tar", f"file://{d}/gone-2.tar", f"{d}/dir.tar"]
    urls += ["s3://b/gone.tar", "pipe:cat gone.tar", "https://h/gone.tar"]
    assert missing_local_shards(urls) == urls[1:4]
