"""Tests of pipeline.source: decoding, grouping, security, error policy, stream failures."""

from __future__ import annotations

import gzip
import os
import pickle
import shlex

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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

from pipeline.source import (
    ArrayDecoder,
    DecodeError,
    ImageDecoder,
    Reject,
    Sample,
    SampleError,
    ShardReadError,
    check_unique_ids,
    expand_urls,
    iter_shard,
    shard_id,
)


def norm(v) -> np.ndarray:
    """Expected normalized value(s) of 8-bit level(s) v, computed as the decoder does."""
    return np.asarray(v, dtype=np.float32) / np.float32(127.5) - np.float32(1)


def decode_one(image: Image.Image, fmt: str = "png", **kw) -> np.ndarray:
    return ImageDecoder(**{"resolution": 8, **kw})({fmt: encode_image(image, fmt)})


def channel_values(array: np.ndarray) -> list[float]:
    """Per-channel value of an array that must be constant per channel."""
    flat = array.reshape(array.shape[0], -1)
    np.testing.assert_allclose(flat, flat[:, :1].repeat(flat.shape[1], 1), atol=1e-6)
    return list(flat[:, 0])


def run(path, decoder, on_error="skip") -> list[Sample | Reject]:
    return list(iter_shard(str(path), decoder, on_error))


def rejects(items) -> list[Reject]:
    return [x for x in items if isinstance(x, Reject)]


# ---------------------------------------------------------------------------- image modes


def palette(transparency=None) -> Image.Image:
    im = Image.new("P", (12, 10), 0)
    im.putpalette([10, 20, 30, 200, 0, 0])
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


SOLID = [  # (image, decoder kwargs, expected 8-bit level per output channel)
    (Image.new("L", (12, 10), 77), {}, [77, 77, 77]),
    (Image.new("LA", (12, 10), (77, 255)), {}, [77, 77, 77]),
    (Image.new("LA", (12, 10), (77, 0)), {}, [255, 255, 255]),
    (Image.new("LA", (12, 10), (77, 0)), {"alpha": "drop"}, [77, 77, 77]),
    (Image.new("RGB", (12, 10), (10, 200, 30)), {}, [10, 200, 30]),
    (Image.new("RGBA", (12, 10), (10, 200, 30, 255)), {}, [10, 200, 30]),
    (Image.new("RGBA", (12, 10), (10, 200, 30, 0)), {}, [255, 255, 255]),
    (Image.new("RGBA", (12, 10), (10, 200, 30, 0)), {"alpha": "drop"}, [10, 200, 30]),
    (Image.new("RGBA", (8, 8), (10, 200, 30, 0)), {"channels": 4}, [10, 200, 30, 0]),
    (Image.new("RGBA", (12, 10), (10, 200, 30, 255)), {"channels": 4}, [10, 200, 30, 255]),
    (Image.new("RGB", (12, 10), (10, 200, 30)), {"channels": 4}, [10, 200, 30, 255]),
    (Image.new("L", (12, 10), 77), {"channels": 1}, [77]),
    (Image.new("LA", (12, 10), (77, 0)), {"channels": 1}, [255]),
    (palette(), {}, [10, 20, 30]),
    (palette(transparency=0), {}, [255, 255, 255]),
    (palette(transparency=0), {"alpha": "drop"}, [10, 20, 30]),
    (palette(transparency=1), {}, [10, 20, 30]),
    (Image.new("I;16", (12, 10), 257 * 100), {}, [100, 100, 100]),
    (Image.new("I;16", (12, 10), 65535), {"channels": 1}, [255]),
    (Image.new("1", (12, 10), 1), {}, [255, 255, 255]),
]


@pytest.mark.parametrize("image,kw,levels", SOLID, ids=lambda x: getattr(x, "mode", None))
def test_solid_image_modes_give_exact_values(image, kw, levels):
    array = decode_one(image, **kw)
    assert array.dtype == np.float32 and array.flags.c_contiguous
    assert array.shape == (len(levels), 8, 8)
    np.testing.assert_allclose(channel_values(array), norm(levels), atol=1e-6)


def test_rgb_to_gray_uses_pillow_luma():
    colour = (10, 200, 30)
    expected = Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0))
    array = decode_one(Image.new("RGB", (12, 10), colour), channels=1)
    np.testing.assert_allclose(channel_values(array), norm([expected]), atol=1e-6)


def test_half_transparent_composites_over_white():
    array = decode_one(Image.new("RGBA", (12, 10), (0, 100, 200, 128)))
    expected = [(c * 128 + 255 * 127) / 255 for c in (0, 100, 200)]
    np.testing.assert_allclose(channel_values(array), norm(expected), atol=1.01 / 127.5)


def test_colour_key_transparency_in_rgb_png_becomes_alpha():
    data = encode_image(Image.new("RGB", (12, 10), (1, 2, 3)), "png", transparency=(1, 2, 3))
    array = ImageDecoder(8)({"png": data})
    np.testing.assert_allclose(channel_values(array), norm([255] * 3), atol=1e-6)


def test_cmyk_jpeg():
    array = decode_one(Image.new("CMYK", (12, 10), (255, 0, 0, 0)), "jpeg")
    np.testing.assert_allclose(channel_values(array), norm([0, 255, 255]), atol=3 / 127.5)


@pytest.mark.parametrize(
    "image,levels",
    [
        (Image.fromarray(np.full((10, 12), 257 * 50, dtype=np.int32)), [50, 50, 50]),
        (Image.fromarray(np.full((10, 12), 200.0, dtype=np.float32)), [200, 200, 200]),
        (Image.fromarray(np.full((10, 12), 900.0, dtype=np.float32)), [255, 255, 255]),
    ],
    ids=["I", "F", "F-clipped"],
)
def test_32bit_modes(image, levels):
    # PNG/JPEG/WebP cannot store I or F, so the conversion is tested below the parser.
    assert image.mode in ("I", "F")
    array = ImageDecoder(8)._decode(image)
    np.testing.assert_allclose(channel_values(array), norm(levels), atol=1e-5)


def test_high_bit_depth_keeps_precision_and_channels_4():
    array = ImageDecoder(8, channels=4)._decode(Image.new("I;16", (8, 8), 1000))
    np.testing.assert_allclose(channel_values(array), norm([1000 / 257] * 3 + [255]), atol=1e-5)


def test_webp_lossless():
    data = encode_image(Image.new("RGB", (12, 10), (10, 200, 30)), "webp", lossless=True)
    array = ImageDecoder(8, normalize=False)({"webp": data})
    np.testing.assert_allclose(channel_values(array), np.array([10, 200, 30]) / 255, atol=1e-6)


def test_normalize_off_gives_unit_range():
    image = Image.fromarray(np.array([[0, 255] * 6] * 12, dtype=np.uint8))
    on, off = (decode_one(image, resolution=12, normalize=n) for n in (True, False))
    assert off.min() == 0.0 and off.max() == 1.0
    assert on.min() == -1.0 and on.max() == 1.0
    np.testing.assert_allclose(on, off * 2 - 1, atol=1e-6)


# ----------------------------------------------------------------- geometry and large images


def bands(size, vertical: bool) -> Image.Image:
    """Thirds coloured red, green, blue: left to right, or top to bottom when vertical."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    for i in range(3):
        if vertical:
            a[i * h // 3 : (i + 1) * h // 3, :, i] = 255
        else:
            a[:, i * w // 3 : (i + 1) * w // 3, i] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("size,vertical", [((96, 32), False), ((32, 96), True)])
def test_resize_shorter_side_then_center_crop(size, vertical):
    array = decode_one(bands(size, vertical), resolution=16, normalize=False)
    assert array.shape == (3, 16, 16)
    core = array[:, 2:-2, 2:-2]  # away from the band edges, where bicubic blends neighbours
    np.testing.assert_allclose(core[1], 1.0, atol=1e-6)
    np.testing.assert_allclose(core[[0, 2]], 0.0, atol=1e-6)


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (5, 3), (16, 16), (17, 300)])
def test_output_shape(size):
    assert decode_one(random_image(size), resolution=16).shape == (3, 16, 16)


def test_large_jpeg_uses_draft_and_keeps_content():
    image = Image.new("RGB", (1600, 1200), (10, 200, 30))
    array = decode_one(image, "jpeg", resolution=32)
    assert array.shape == (3, 32, 32)
    np.testing.assert_allclose(channel_values(array), norm([10, 200, 30]), atol=4 / 127.5)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # stored: left black, right white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: top black, bottom white
    data = encode_image(image, "png", exif=exif)
    array = ImageDecoder(20, normalize=False)({"png": data})
    assert array.shape == (3, 20, 20)
    np.testing.assert_allclose(array[:, :8], 0.0, atol=1e-6)
    np.testing.assert_allclose(array[:, 12:], 1.0, atol=1e-6)


def test_decompression_bomb_guard(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_one(Image.new("RGB", (20, 20)))


@pytest.mark.parametrize(
    "kw", [{"channels": 2}, {"alpha": "keep"}, {"resolution": 0}, {"resolution": 2.5}]
)
def test_image_decoder_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        ImageDecoder(**{"resolution": 8, **kw})


@settings(max_examples=25, deadline=None)
@given(
    w=st.integers(1, 64),
    h=st.integers(1, 64),
    r=st.integers(1, 24),
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "LA"]),
    normalize=st.booleans(),
)
def test_any_size_and_mode_gives_shape_and_range(w, h, r, mode, normalize):
    array = decode_one(random_image((w, h), mode, seed=w * h), resolution=r, normalize=normalize)
    assert array.shape == (3, r, r) and array.dtype == np.float32
    lo = -1.0 if normalize else 0.0
    assert lo <= array.min() and array.max() <= 1.0


# ------------------------------------------------------------------------ arrays


def test_array_shard_values_and_extras_ignored(tmp_path):
    path = tmp_path / "a-000.tar"
    keys = write_array_shard(path, 3, extras={"cls": b"1", "json": b"{}"})
    items = run(path, ArrayDecoder())
    expected = array_samples(3)
    assert [(x.key, x.index) for x in items] == [(k, i) for i, k in enumerate(keys)]
    for item in items:
        assert item.array.dtype == np.float32 and item.array.flags.c_contiguous
        np.testing.assert_array_equal(item.array, expected[item.key])


def test_scale_and_shift_follow_diffusers_convention():
    raw = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = ArrayDecoder(scale=0.18215, shift=1.5)({"npy": npy_bytes(raw)})
    np.testing.assert_allclose(out, (raw - 1.5) * np.float32(0.18215), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float64", "int16", "uint8", "bool", ">f4"])
def test_numeric_dtypes_cast_to_float32(dtype):
    raw = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
    out = ArrayDecoder()({"npy": npy_bytes(raw)})
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, raw.astype(np.float32))


def test_fortran_order_array_becomes_c_contiguous():
    raw = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    out = ArrayDecoder()({"npy": npy_bytes(raw)})
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, raw)


@pytest.mark.parametrize(
    "raw,match",
    [
        (np.array(1.0), "unsupported .npy"),
        (np.zeros(3, np.complex64), "unsupported .npy"),
        (np.array(["a"]), "unsupported .npy"),
        (np.array([1e300, 0.0]), r"non-finite values \(0 NaN, 1 Inf\)"),
    ],
    ids=["0-d", "complex", "str", "overflow"],
)
def test_bad_arrays(raw, match):
    with pytest.raises(DecodeError, match=match):
        ArrayDecoder()({"npy": npy_bytes(raw)})


def test_truncated_and_garbage_npy():
    data = npy_bytes(np.zeros((4, 4), np.float32))
    with pytest.raises(DecodeError, match="truncated"):
        ArrayDecoder()({"npy": data[:-8]})
    with pytest.raises(DecodeError, match="undecodable .npy"):
        ArrayDecoder()({"npy": b"not an npy file"})


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


# ---------------------------------------------------------------------------- security


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


def test_only_jpeg_png_webp_parsers_are_used(tmp_path):
    gif = encode_image(Image.new("P", (8, 8)), "gif")
    with pytest.raises(DecodeError, match="cannot identify image file"):
        ImageDecoder(8)({"png": gif})


# ------------------------------------------------------------------- samples and grouping


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


def test_member_without_extension_is_a_keyless_reject(tmp_path):
    image = encode_image(random_image((12, 10)))
    members = [("a.png", image), ("README", b"hi"), ("b.png", image)]
    items = run(write_tar(tmp_path / "x.tar", members), ImageDecoder(8))
    assert [(x.key, x.index) for x in items] == [("a", 0), (None, None), ("b", 1)]
    assert "'README' has no extension" in items[1].reason


# ------------------------------------------------------------------------- error policy


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


# ------------------------------------------------------------------------ stream failures


def member_offsets(path) -> list[int]:
    """Byte offset of each member's header in an uncompressed tar."""
    import tarfile

    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("on_error", ["skip", "fail"])
@pytest.mark.parametrize("where", ["mid-data", "mid-header", "member-boundary", "no-end-marker"])
def test_truncated_tar_yields_complete_samples_then_raises(tmp_path, where, on_error):
    path = tmp_path / "t.tar"
    keys = write_array_shard(path, 5, shape=(4, 16, 16))
    data = path.read_bytes()
    start = member_offsets(path)[3]  # the header of the 4th sample
    end = member_offsets(path)[4]
    cut = {
        "mid-data": start + 512 + 100,
        "mid-header": start + 100,
        "member-boundary": start,
        "no-end-marker": end + (end - start),  # all 5 members, no zero blocks
    }[where]
    path.write_bytes(data[:cut])
    it = iter_shard(str(path), ArrayDecoder(), on_error)
    n_complete = 5 if where == "no-end-marker" else 3
    got = [next(it).key for _ in range(n_complete)]
    assert got == keys[:n_complete]
    with pytest.raises(ShardReadError) as info:
        next(it)
    assert str(path) in str(info.value) and info.value.url == str(path)
    assert isinstance(info.value, OSError)


def test_every_truncation_point_is_detected(tmp_path):
    """Cut a shard at many offsets: it must raise unless the first end-of-archive block is
    complete, and what it yields before must be exact, in order, and include every sample whose
    members all precede the cut."""
    import tarfile

    path = tmp_path / "full.tar"
    expected = array_samples(4, (3, 50))  # 600-byte payloads: not block aligned
    write_tar(
        path, [(f"{k}.npy", npy_bytes(v)) for k, v in expected.items()] + [("s000003.cls", b"1")]
    )
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    ends = [m.offset_data + -(-m.size // 512) * 512 for m in members]
    marker = ends[-1]
    cut_path = tmp_path / "cut.tar"
    for cut in list(range(0, marker + 1024, 97)) + [e for e in ends] + [marker + 511]:
        cut_path.write_bytes(data[:cut])
        got = []
        try:
            for item in iter_shard(str(cut_path), ArrayDecoder(), "fail"):
                got.append(item)
            raised = False
        except ShardReadError:
            raised = True
        assert raised == (cut < marker + 512), cut
        for item in got:
            np.testing.assert_array_equal(item.array, expected[item.key])
        assert [x.key for x in got] == list(expected)[: len(got)]
        complete = sum(e <= cut for e in ends[:3]) + (ends[4] <= cut)  # s000003 = .npy + .cls
        assert len(got) >= complete, cut


def test_missing_shard(tmp_path):
    url = str(tmp_path / "nope.tar")
    with pytest.raises(ShardReadError, match="nope.tar"):
        list(iter_shard(url, ArrayDecoder()))


def test_empty_tar_yields_nothing_but_empty_file_is_an_error(tmp_path):
    assert run(write_tar(tmp_path / "e.tar", []), ArrayDecoder()) == []
    (tmp_path / "z.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match="z.tar"):
        run(tmp_path / "z.tar", ArrayDecoder())


def test_garbage_in_the_middle_of_a_tar(tmp_path):
    path = tmp_path / "g.tar"
    write_array_shard(path, 3)
    data = bytearray(path.read_bytes())
    offset = member_offsets(path)[1]
    data[offset : offset + 512] = os.urandom(512)
    path.write_bytes(bytes(data))
    it = iter_shard(str(path), ArrayDecoder())
    assert next(it).key == "s000000"
    with pytest.raises(ShardReadError):
        next(it)


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz"])
def test_compressed_tar(tmp_path, compress):
    members = [(f"{k}.npy", npy_bytes(v)) for k, v in array_samples(4).items()]
    path = write_tar(tmp_path / f"c.tar.{compress}", members, compress)
    assert [x.key for x in run(path, ArrayDecoder())] == list(array_samples(4))


def test_truncated_gzip(tmp_path):
    members = [(f"{k}.npy", npy_bytes(v)) for k, v in array_samples(4, (64, 64)).items()]
    path = write_tar(tmp_path / "c.tar.gz", members, "gz")
    data = path.read_bytes()
    assert gzip.decompress(data)  # valid before the cut
    path.write_bytes(data[: len(data) * 3 // 4])
    it = iter_shard(str(path), ArrayDecoder())
    with pytest.raises(ShardReadError, match="c.tar.gz"):
        for _ in range(5):
            next(it)


def test_pipe_and_file_urls(tmp_path):
    path = tmp_path / "shard 01.tar"
    keys = write_array_shard(path, 3)
    for url in (f"pipe:cat {shlex.quote(str(path))}", path.as_uri()):
        assert [x.key for x in iter_shard(url, ArrayDecoder())] == keys
    with pytest.raises(ShardReadError, match="pipe:"):
        list(iter_shard(f"pipe:cat {shlex.quote(str(tmp_path / 'missing.tar'))}", ArrayDecoder()))


def test_failing_pipe_after_valid_tar_is_an_error(tmp_path):
    path = tmp_path / "ok.tar"
    write_array_shard(path, 2)
    url = f"pipe:cat {shlex.quote(str(path))}; exit 3"
    with pytest.raises(ShardReadError, match="exit 3"):
        list(iter_shard(url, ArrayDecoder()))


def test_stopping_early_closes_the_stream(tmp_path):
    path = tmp_path / "x.tar"
    write_array_shard(path, 50)
    it = iter_shard(f"pipe:cat {shlex.quote(str(path))}", ArrayDecoder())
    next(it)
    it.close()  # must neither hang nor raise


# --------------------------------------------------------------------------- URL helpers


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
