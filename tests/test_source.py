"""Tests of pipeline.source: decoding, grouping, security, error policy, stream failures."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import tarfile
import time
import tracemalloc

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
    ReadLimits,
    Reject,
    Sample,
    SampleError,
    ShardReadError,
    ShardTimeoutError,
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


# ------------------------------------------------------------------------- hostile shards
# Each test builds a real malformed tar; see the measured failures in the module
# docstring of pipeline/source.py.


def tar_member(name, data: bytes = b"", fmt=tarfile.PAX_FORMAT, **attrs) -> bytes:
    """One member's header block(s) and padded data, as ``tarfile`` writes it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    pad = bytes(-len(data) % 512) if info.isreg() else b""
    return info.tobuf(fmt, "utf-8", "surrogateescape") + (data + pad if info.isreg() else b"")


def write_raw_tar(path, *members: bytes) -> str:
    path.write_bytes(b"".join(members) + bytes(1024))
    return str(path)


def gnu_sparse_member(
    name: str, real_size: int, segments: list[tuple[int, bytes]], claim: int = 0
) -> bytes:
    """An old-GNU sparse member (type ``S``, as ``tar --sparse`` writes it): ``real_size`` bytes,
    zeros but for ``segments`` ((offset, data), at most 4), which alone are stored; ``claim``:
    bytes the map says the last segment has beyond what is stored (a corrupt map)."""
    stored = b"".join(data for _, data in segments)
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = tarfile.GNUTYPE_SPARSE, len(stored), 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    for i, (offset, data) in enumerate(segments):
        pos = 386 + 24 * i
        header[pos : pos + 12] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
        size = len(data) + (claim if i == len(segments) - 1 else 0)
        header[pos + 12 : pos + 24] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # the real size
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + stored + bytes(-len(stored) % 512)


def small_npy(value: float = 1.0) -> bytes:
    return npy_bytes(np.full((2, 3), value, np.float32))


def kinds(items) -> list[tuple[str, int, str]]:
    return [(x.key, x.index, type(x).__name__) for x in items]


def peak_bytes(fn):
    """(fn(), peak bytes allocated by Python while it ran)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sparse_member_declaring_5_gib_is_rejected_unread(tmp_path):
    """A 10 KiB tar whose GNU sparse member says 5 GiB: tarfile's extractfile().read() would
    build 5 GiB of zeros. It is a Reject naming the member, its size and the key; the other
    samples of the shard are kept."""
    big = gnu_sparse_member("big.npy", 5 * 2**30, [(5 * 2**30 - 4, b"tail")])
    path = write_raw_tar(
        tmp_path / "s.tar",
        tar_member("a.npy", small_npy()),
        big,
        tar_member("big.cls", b"1"),
        tar_member("c.npy", small_npy()),
    )
    assert os.path.getsize(path) <= 10 * 1024
    items, peak = peak_bytes(lambda: run(path, ArrayDecoder()))
    assert kinds(items) == [("a", 0, "Sample"), ("big", 1, "Reject"), ("c", 2, "Sample")]
    assert items[1].reason == (
        "member 'big.npy' is 5368709120 bytes, more than source.max_member_bytes=268435456: "
        "not read (raise source.max_member_bytes if such members are expected)"
    )
    assert peak < 16 * 2**20


def test_sparse_member_under_the_cap_is_read_with_its_holes(tmp_path):
    data = [(0, b"head" * 100), (5000, b"middle"), (9000, b"end")]
    expected = bytearray(9003)
    for offset, chunk in data:
        expected[offset : offset + len(chunk)] = chunk
    path = write_raw_tar(tmp_path / "s.tar", gnu_sparse_member("x.bin", 9003, data))
    (item,) = run(path, lambda m: np.frombuffer(m["bin"], np.uint8).astype(np.float32))
    np.testing.assert_array_equal(item.array, np.frombuffer(bytes(expected), np.uint8))
    (item,) = list(iter_shard(path, lambda m: np.ones(1), limits=ReadLimits(max_member_bytes=9002)))
    assert "'x.bin' is 9003 bytes, more than source.max_member_bytes=9002" in item.reason
    lying = gnu_sparse_member("y.bin", 2**20, [(0, b"abc"), (1000, b"def")], claim=600)
    path = write_raw_tar(tmp_path / "l.tar", lying, tar_member("z.bin", b"ok"))
    items = run(path, lambda m: np.frombuffer(m["bin"], np.uint8).astype(np.float32))
    assert kinds(items) == [("y", 0, "Reject"), ("z", 1, "Sample")]
    assert (
        items[0].reason == "sparse member 'y.bin' maps more data than it stores: the tar is corrupt"
    )


def holey_npy(path, array: np.ndarray) -> None:
    """``array`` (zeros but its first and last values) saved as a file with a hole."""
    data = npy_bytes(array)
    with open(path, "wb") as f:
        f.write(data[:4096])
        f.seek(len(data) - 4096)
        f.write(data[-4096:])


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_members(tmp_path, fmt):
    """``tar --sparse`` (old GNU sparse headers, or pax sparse 1.0 with --format=posix): a 5 GiB
    hole is rejected without being read, a sparse .npy under the cap decodes exactly."""
    if shutil.which("tar") is None or b"GNU tar" not in subprocess.check_output(
        ["tar", "--version"]
    ):
        pytest.skip("needs GNU tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.npy", "wb") as f:
        f.truncate(5 * 2**30)
    array = np.zeros((1, 512, 512), np.float32)
    array.flat[0], array.flat[-1] = 1.5, -2.0
    holey_npy(src / "holey.npy", array)
    (src / "ok.npy").write_bytes(small_npy())
    shard = tmp_path / "s.tar"
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-cf", str(shard), "-C", str(src),
         "ok.npy", "big.npy", "holey.npy"],
        check=True,
    )  # fmt: skip
    with tarfile.open(shard) as tar:
        if not tar.getmember("holey.npy").issparse():
            pytest.skip("the file system made no hole")
    assert shard.stat().st_size < 64 * 1024
    items, peak = peak_bytes(lambda: run(shard, lambda m: ArrayDecoder()(m)))
    assert kinds(items) == [("ok", 0, "Sample"), ("big", 1, "Reject"), ("holey", 2, "Sample")]
    assert "'big.npy' is 5368709120 bytes, more than source.max_member_bytes" in items[1].reason
    np.testing.assert_array_equal(items[2].array, array)
    assert peak < 32 * 2**20


def test_gzip_bomb_member_is_rejected_and_the_rest_kept(tmp_path):
    """A .tar.gz member that inflates past the cap is skipped in bounded steps, never held."""
    members = [
        ("a.npy", small_npy()),
        ("bomb.npy", bytes(16 * 2**20)),  # 16 MiB of zeros: ~16 KiB compressed
        ("c.npy", small_npy()),
    ]
    path = write_tar(tmp_path / "b.tar.gz", members, "gz")
    assert path.stat().st_size < 64 * 1024
    limits = ReadLimits(max_member_bytes=2**20)
    items, peak = peak_bytes(lambda: list(iter_shard(str(path), ArrayDecoder(), limits=limits)))
    assert kinds(items) == [("a", 0, "Sample"), ("bomb", 1, "Reject"), ("c", 2, "Sample")]
    assert items[1].reason.startswith(
        "member 'bomb.npy' is 16777216 bytes, more than source.max_member_bytes=1048576"
    )
    assert peak < 8 * 2**20


def test_bzip2_bomb_is_inflated_in_bounded_steps(tmp_path):
    """tarfile's own stream inflates each 10 KiB read whole and copies the rest at every read:
    a 64 MiB zero member (~50 bytes of bzip2) took it seconds and 64+ MiB; 512 MiB, minutes."""
    members = [("a.npy", small_npy()), ("bomb.npy", bytes(64 * 2**20)), ("c.npy", small_npy())]
    path = write_tar(tmp_path / "b.tar.bz2", members, "bz2")
    assert path.stat().st_size < 4096
    limits = ReadLimits(max_member_bytes=2**20)
    start = time.perf_counter()
    items, peak = peak_bytes(lambda: list(iter_shard(str(path), ArrayDecoder(), limits=limits)))
    assert kinds(items) == [("a", 0, "Sample"), ("bomb", 1, "Reject"), ("c", 2, "Sample")]
    assert peak < 16 * 2**20 and time.perf_counter() - start < 20


def test_long_member_names_are_rejected_in_linear_time(tmp_path):
    """webdataset's base_plus_ext is quadratic in the slashes of a name (4 s at 40k characters,
    ~40 min at 10^6): such names are rejected before it runs; a name beyond the 1 MiB header
    bound is not even read whole."""
    slashes = "/" * 10**6 + "x"  # pax path record: 1 MB
    pairs = "a/" * 50_000 + "b.npy"  # 100k characters
    huge = "/" * (2 * 2**20) + "y.npy"  # pax header above MAX_HEADER_BYTES: skipped unread
    gnu = "/" * 10**6 + "z"  # GNU long name member
    path = write_raw_tar(
        tmp_path / "n.tar",
        tar_member("a.npy", small_npy()),
        tar_member(slashes, b"1"),
        tar_member(pairs, small_npy()),
        tar_member(huge, small_npy()),
        tar_member(gnu, b"2", fmt=tarfile.GNU_FORMAT),
        tar_member("c.npy", small_npy()),
    )
    start = time.perf_counter()
    items = run(path, ArrayDecoder())
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert [x.index for x in items] == list(range(6))
    assert [x.key for x in items if isinstance(x, Sample)] == ["a", "c"]
    long = [x for x in items if isinstance(x, Reject)]
    # keys: the names cut to 200 characters + "..."; the skipped pax header's member keeps the
    # 100-character name of its ustar header
    assert [len(x.key) for x in long] == [203, 203, 100, 203]
    for x, name in zip([long[0], long[1], long[3]], [slashes, pairs, gnu]):
        assert f"tar member name of {len(name)} bytes is longer than 1024 bytes" in x.reason
        assert "(max_name_bytes)" in x.reason and len(x.reason) < 600
    assert (
        "pax extended header of 2097" in long[2].reason and "(more than 1048576)" in long[2].reason
    )


def test_bad_pax_header_rejects_its_member_in_linear_time(tmp_path):
    """CPython 3.11.7 parses pax records with a backtracking regex and keeps a key per bogus
    record (CVE-2024-6232): 43 KB of "2 2 2 ..." took 2.7 s and 400 MB, 1 MiB would take hours.
    A malformed pax header now rejects the member it describes; the shard goes on."""
    body = b"2 " * 200_000 + b"=x\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(body)
    bad = pax.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)
    path = write_raw_tar(
        tmp_path / "p.tar",
        tar_member("a.npy", small_npy()),
        bad + tar_member("b.npy", small_npy(), fmt=tarfile.USTAR_FORMAT),
        tar_member("c.npy", small_npy()),
    )
    start = time.perf_counter()
    items, peak = peak_bytes(lambda: run(path, ArrayDecoder()))
    assert time.perf_counter() - start < 1.0 and peak < 16 * 2**20
    assert kinds(items) == [("a", 0, "Sample"), ("b", 1, "Reject"), ("c", 2, "Sample")]
    assert "bad pax extended header" in items[1].reason and "'b.npy'" in items[1].reason


def test_shard_timeout_with_a_slow_decoder(tmp_path):
    """The bound fails the shard as a stream fault: the samples before it were yielded."""
    path = tmp_path / "t.tar"
    keys = write_array_shard(path, 20, shape=(2, 2))

    def slow(members):
        time.sleep(0.05)
        return ArrayDecoder()(members)

    got = []
    with pytest.raises(ShardReadError) as info:
        for item in iter_shard(str(path), slow, limits=ReadLimits(shard_timeout_s=0.3)):
            got.append(item.key)
    assert 1 <= len(got) < 20 and got == keys[: len(got)]
    assert isinstance(info.value, ShardTimeoutError)
    err = pickle.loads(pickle.dumps(info.value))  # crosses Ray actors
    assert isinstance(err, ShardTimeoutError) and err.url == str(path)
    message = str(info.value)
    assert str(path) in message and "timed out" in message
    assert "source.shard_timeout_s=0.3 s" in message and info.value.url == str(path)


def test_shard_timeout_between_members(tmp_path):
    path = tmp_path / "t.tar"
    write_array_shard(path, 3)
    with pytest.raises(ShardReadError, match=r"timed out between members.*shard_timeout_s=1e-09"):
        list(iter_shard(str(path), ArrayDecoder(), limits=ReadLimits(shard_timeout_s=1e-9)))


def test_time_spent_by_the_consumer_is_not_counted(tmp_path):
    path = tmp_path / "t.tar"
    keys = write_array_shard(path, 4, shape=(2, 2))
    got = []
    for item in iter_shard(str(path), ArrayDecoder(), limits=ReadLimits(shard_timeout_s=0.5)):
        got.append(item.key)
        time.sleep(0.25)  # 1 s in all, the source's own share is milliseconds
    assert got == keys


def test_links_and_special_members_are_rejected_never_followed(tmp_path):
    """GNU tar stores a file's second name as a hard link member: those samples vanished with no
    reject. Links, devices and FIFOs are now rejected with the fix; directories are skipped."""
    if shutil.which("tar") is None:
        pytest.skip("needs tar")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    image = encode_image(random_image((12, 10)))
    (src / "a.png").write_bytes(image)
    os.link(src / "a.png", src / "b.png")  # the same file twice: a hard link member
    (src / "b.cls").write_bytes(b"1")
    secret = tmp_path / "secret.png"
    secret.write_bytes(image)
    os.symlink(secret, src / "c.png")
    os.mkfifo(src / "d.png")
    (src / "sub" / "e.png").write_bytes(image)
    path = tmp_path / "x.tar"
    names = ["a.png", "b.png", "b.cls", "c.png", "d.png", "sub"]
    subprocess.run(["tar", "-cf", str(path), "-C", str(src), *names], check=True)
    with tarfile.open(path) as tar:  # what GNU tar wrote
        assert tar.getmember("b.png").islnk() and tar.getmember("sub").isdir()
    with tarfile.open(path, "a") as tar:  # and a device, which tar would need a real one for
        device = tarfile.TarInfo("f.png")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
    items = run(path, ImageDecoder(8))
    assert kinds(items) == [
        ("a", 0, "Sample"),
        ("b", 1, "Reject"),
        ("c", 2, "Reject"),
        ("d", 3, "Reject"),
        ("sub/e", 4, "Sample"),
        ("f", 5, "Reject"),
    ]
    assert items[1].reason == (
        "hard link member 'b.png' (to 'a.png') is not supported: re-create the tar with "
        "--hard-dereference so that every member holds its data"
    )
    assert items[2].reason.startswith(f"symbolic link member 'c.png' (to {str(secret)!r}) is not")
    assert "--dereference" in items[2].reason
    assert items[3].reason.startswith("FIFO member 'd.png' is not a regular file")
    assert items[5].reason.startswith("character device member 'f.png' is not a regular file")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_non_utf8_member_name_rejects_only_its_sample(tmp_path, fmt):
    """A name that is not UTF-8 made the worker fail the whole shard (UnicodeEncodeError when
    the key was hashed and written): only its sample is rejected, named with its bytes."""
    image = encode_image(random_image((12, 10)))
    bad = b"\xff\xfe.png".decode("utf-8", "surrogateescape")
    path = write_raw_tar(
        tmp_path / "u.tar",
        tar_member("a.png", image, fmt),
        tar_member(bad, image, fmt),
        tar_member("c.png", image, fmt),
    )
    items = run(path, ImageDecoder(8))
    assert kinds(items) == [("a", 0, "Sample"), ("\\xff\\xfe", 1, "Reject"), ("c", 2, "Sample")]
    assert items[1].reason == (
        "member name b'\\xff\\xfe.png' is not valid UTF-8: keys are stored as UTF-8 text; "
        "re-create the tar with UTF-8 member names"
    )
    json.dumps(items[1].__dict__, ensure_ascii=False).encode("utf-8")  # storable as UTF-8
    items = run(path, ArrayDecoder())
    assert all(isinstance(x, Reject) for x in items) and items[1].key == "\\xff\\xfe"


def astronaut_jpeg(**save) -> bytes:
    from skimage import data

    return encode_image(Image.fromarray(data.astronaut()), "jpeg", **save)


def cut_scan(jpeg: bytes, keep: float) -> bytes:
    """``jpeg`` with most of its first scan's data cut out, the end-of-image marker kept."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    end = jpeg.rindex(b"\xff\xd9")
    return jpeg[: start + int((end - start) * keep)] + jpeg[end:]


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("resolution", [64, 512], ids=["draft", "full"])
def test_jpeg_with_its_scan_cut_is_rejected(progressive, resolution):
    jpeg = astronaut_jpeg(progressive=progressive)
    cut = cut_scan(jpeg, 0.01 if progressive else 0.3)  # progressive: cut in the first (DC) scan
    with Image.open(io.BytesIO(cut)) as im:  # what Pillow alone makes of it: gray, no error
        assert np.asarray(im)[-64:].std() < 2
    with pytest.raises(DecodeError) as info:
        ImageDecoder(resolution)({"jpg": cut})
    assert str(info.value) == (
        "truncated JPEG in member '*.jpg': the scan data ends before the last block of the image "
        "(libjpeg: premature end of data segment, the rest would be gray): the file was cut or "
        "corrupted"
    )


@pytest.mark.parametrize(
    "save",
    [{}, {"progressive": True}, {"optimize": True}, {"restart_marker_blocks": 3},
     {"quality": 100, "subsampling": 0}, {"mode": "L"}, {"trailing": b"appended data"}],
    ids=lambda s: ",".join(s) or "baseline",
)  # fmt: skip
@pytest.mark.parametrize("resolution", [64, 512], ids=["draft", "full"])
def test_good_jpegs_decode_as_before(save, resolution):
    save = dict(save)
    trailing, mode = save.pop("trailing", b""), save.pop("mode", "RGB")
    from skimage import data

    jpeg = encode_image(Image.fromarray(data.astronaut()).convert(mode), "jpeg", **save)
    jpeg += trailing
    decoder = ImageDecoder(resolution)
    with Image.open(io.BytesIO(jpeg)) as im:  # the plain Pillow path, without the scan check
        draft = decoder._draft_size(im)
        if draft is not None:
            im.draft(None, draft)
        expected = decoder._decode(im)
    np.testing.assert_array_equal(decoder({"jpg": jpeg}), expected)


def test_mpo_first_frame_decodes():
    from skimage import data

    im = Image.fromarray(data.astronaut())
    buf = io.BytesIO()
    im.save(buf, "MPO", save_all=True, append_images=[im.rotate(90)])
    with Image.open(io.BytesIO(buf.getvalue())) as mpo:
        assert mpo.format == "MPO"
        expected = ImageDecoder(64)._decode(mpo)  # 512 < 2 x 64 x ... : draft is not used at 512
    assert ImageDecoder(512)({"jpg": buf.getvalue()}).shape == (3, 512, 512)
    assert ImageDecoder(64)({"jpg": buf.getvalue()}).shape == expected.shape


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


def test_read_limits():
    assert ReadLimits() == ReadLimits(256 * 2**20, 1024, 3600.0)
    source = {"kind": "images", "max_member_bytes": 10, "shard_timeout_s": None}
    assert ReadLimits.from_source(source) == ReadLimits(10, 1024, None)
    for bad in ({"max_member_bytes": 0}, {"max_name_bytes": 1.5}, {"shard_timeout_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReadLimits(**bad)
    with pytest.raises(TypeError, match="ReadLimits"):
        iter_shard("x.tar", ArrayDecoder(), limits={"max_member_bytes": 1})
