"""Tests of pipeline.read.decoders: image modes and geometry, arrays, untrusted payloads, cut JPEG
scans, the decoder of a source config group."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from shards import encode_image, npy_bytes, random_image
from sources import source_group

from pipeline.read.decoders import ArrayDecoder, DecodeError, ImageDecoder, make_decoder


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


# ------------------------------------------------------------------------------ image modes


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


# ---------------------------------------------------------------- geometry and large images


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


# ----------------------------------------------------------------------------------- arrays


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


# ----------------------------------------------------------------------- untrusted payloads


def test_only_jpeg_png_webp_parsers_are_used(tmp_path):
    gif = encode_image(Image.new("P", (8, 8)), "gif")
    with pytest.raises(DecodeError, match="cannot identify image file"):
        ImageDecoder(8)({"png": gif})


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


# ------------------------------------------------------------------------------ from the config


def test_make_decoder_follows_the_source_group():
    img = make_decoder(
        source_group("images", resolution=8, channels=1, normalize=False, alpha="drop")
    )
    assert isinstance(img, ImageDecoder)
    arr = make_decoder(source_group("arrays", scale=2.0, shift=0.5), shape=[4, 2, 2])
    assert isinstance(arr, ArrayDecoder)
