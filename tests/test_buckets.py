"""Aspect-ratio buckets (pipeline/read/buckets.py): the grid, the assignment, the keyed crop and
flip, the decoder's output and its micro-conditioning."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from shards import encode_image, random_image
from sources import source_group

from pipeline.read.buckets import Bucketing, Grid, auto_grid, config_problems, cover, keyed_choice
from pipeline.read.decoders import ImageDecoder

SOURCE = source_group("images", resolution=64, buckets="auto", bucket_step=16)


def test_auto_grid_is_sdxl_and_kohya():
    grid = auto_grid(1024, 64, 4.0)
    for hw in [(1024, 1024), (768, 1344), (1344, 768), (512, 2048), (2048, 512), (896, 1152)]:
        assert hw in grid
    for h, w in grid:
        assert h % 64 == 0 and w % 64 == 0
        assert h * w <= 1024**2
        assert max(h / w, w / h) <= 4.0
    assert grid == sorted(grid, key=lambda hw: hw[0] / hw[1])
    assert (256, 4096) not in grid  # aspect 16


def test_explicit_grid_and_assignment_by_log_ratio():
    grid = Grid.from_source(replace(SOURCE, buckets=[[64, 64], [32, 128], [128, 32]]))
    assert grid.assign(100, 100) == (64, 64)
    assert grid.assign(10, 41) == (32, 128)  # ratio 0.24 -> 0.25
    assert grid.assign(41, 10) == (128, 32)
    assert grid.assign(50, 100) in ((64, 64), (32, 128))  # log 0.5 is halfway: the first
    assert grid.half_step() == pytest.approx(math.log(4) / 2)


@pytest.mark.parametrize("aspect", [0.25, 0.33, 0.5, 0.7, 1.0, 1.3, 1.5, 2.0, 3.0, 4.0])
def test_images_land_in_the_nearest_bucket_with_minimal_crop(aspect):
    """Each image in the nearest bucket (log ratio), resized to just cover it (one side equal,
    so no more pixels are cropped than the fit requires), micro-conditioning = decoded size."""
    w = 120
    h = round(w * aspect)
    bucketing = Bucketing.from_source(SOURCE, seed=0, shard="s")
    decoder = ImageDecoder(64, normalize=False, bucketing=bucketing)
    array, cond = decoder({"png": encode_image(random_image((w, h)), "png")}, "k")
    grid = bucketing.grid
    best = min(abs(math.log(h / w) - math.log(a / b)) for a, b in grid.sizes)
    bh, bw = cond["target_size"]
    assert abs(math.log(h / w) - math.log(bh / bw)) == pytest.approx(best)
    assert array.shape == (3, bh, bw)
    assert cond["original_size"] == [h, w]
    rh, rw = cover(h, w, (bh, bw))
    assert rh == bh or rw == bw  # the tight side is not cropped
    scale = max(bh / h, bw / w)  # the image's aspect, each side rounded once
    assert abs(rh - h * scale) <= 0.5 and abs(rw - w * scale) <= 0.5
    y, x = cond["crop_top_left"]
    assert (y, x) == ((rh - bh) // 2, (rw - bw) // 2)
    assert 0 <= y <= rh - bh and 0 <= x <= rw - bw
    assert cond["flipped"] is False
    kept = bh * bw / (rh * rw)
    square = min(h, w) ** 2 / (h * w)
    assert kept >= square - 1e-9  # a bucket never keeps less than the square crop


def test_center_crop_content_matches_a_manual_resize_and_crop():
    image = random_image((200, 90), seed=3)
    bucketing = Bucketing.from_source(SOURCE)
    array, cond = ImageDecoder(64, normalize=False, bucketing=bucketing)(
        {"png": encode_image(image, "png")}, "k"
    )
    (rh, rw), (y, x), (bh, bw) = (
        cover(90, 200, cond["target_size"]),
        cond["crop_top_left"],
        (cond["target_size"]),
    )
    sx, sy = 200 / rw, 90 / rh
    ref = image.resize((bw, bh), Image.Resampling.BICUBIC, box=(x * sx, y * sy, (x + bw) * sx,
                                                                (y + bh) * sy))  # fmt: skip
    np.testing.assert_array_equal(array, np.asarray(ref, np.float32).transpose(2, 0, 1) / 255)


def test_random_crop_and_flip_are_keyed():
    src = replace(SOURCE, crop="random", flip="random")
    fits = [Bucketing.from_source(src, 7, "s").fit(90, 300, f"k{i}") for i in range(400)]
    again = [Bucketing.from_source(src, 7, "s").fit(90, 300, f"k{i}") for i in range(400)]
    assert fits == again
    xs = {f.top_left[1] for f in fits}
    rw = fits[0].resized[1]
    assert min(xs) == 0 and max(xs) == rw - fits[0].bucket[1]  # the whole range is reachable
    rate = np.mean([f.flipped for f in fits])
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / 400)
    assert keyed_choice(7, "s", "k1") != keyed_choice(8, "s", "k1")
    assert keyed_choice(7, "s", "k1") != keyed_choice(7, "t", "k1")


def test_flip_mirrors_the_crop():
    image = random_image((100, 100), seed=1)
    data = {"png": encode_image(image, "png")}
    src = replace(SOURCE, buckets=[[64, 64]], flip="random")
    b = Bucketing.from_source(src, 0, "s")
    key = next(f"k{i}" for i in range(50) if b.fit(100, 100, f"k{i}").flipped)
    flipped, cond = ImageDecoder(64, bucketing=b)(data, key)
    unflipped = Bucketing.from_source(replace(src, flip="none"))
    plain, _ = ImageDecoder(64, bucketing=unflipped)(data, key)
    assert cond["flipped"] is True
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_exif_orientation_decides_the_bucket():
    image = random_image((160, 40))  # stored landscape 4:1
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed as a portrait 1:4
    decoder = ImageDecoder(64, bucketing=Bucketing.from_source(SOURCE))
    array, cond = decoder({"png": encode_image(image, "png", exif=exif)}, "k")
    assert cond["original_size"] == [160, 40]
    assert cond["target_size"][0] > cond["target_size"][1]
    assert array.shape[1:] == tuple(cond["target_size"])


def test_large_jpeg_draft_keeps_the_bucket_and_conditioning():
    image = random_image((1600, 800), seed=2)
    decoder = ImageDecoder(64, bucketing=Bucketing.from_source(SOURCE))
    array, cond = decoder({"jpg": encode_image(image, "jpeg", quality=95)}, "k")
    assert cond["original_size"] == [800, 1600]
    assert array.shape[1:] == tuple(cond["target_size"])


@pytest.mark.parametrize(
    "change, key",
    [
        ({"buckets": "square"}, "source.buckets"),
        ({"buckets": [[64, 0]]}, "source.buckets"),
        ({"buckets": []}, "source.buckets"),
        ({"crop": "left"}, "source.crop"),
        ({"flip": "vertical"}, "source.flip"),
        ({"bucket_step": 0}, "source.bucket_step"),
        ({"max_aspect": 0.5}, "source.max_aspect"),
        ({"resolution": 8}, "source.buckets"),
        ({"kind": "arrays"}, "source.buckets"),
    ],
)
def test_bad_settings_name_the_key(change, key):
    problems = config_problems(replace(SOURCE, **change))
    assert problems and problems[0][0] == key


def test_step_must_keep_the_latent_whole():
    assert config_problems(SOURCE, patch=8) == []
    problems = config_problems(replace(SOURCE, bucket_step=12), patch=8)
    assert problems[0][0] == "source.bucket_step" and "8-pixel" in problems[0][1]
    problems = config_problems(replace(SOURCE, buckets=[[64, 60]]), patch=8)
    assert problems[0][0] == "source.buckets"
