"""Low-bit fingerprints: settings, the authors' formula, patch rules, numpy == torch."""

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lida_core.fingerprint import (
    FingerprintSettings,
    cv2_bilinear_resize,
    decode_image,
    fingerprint_bits,
    pillow_bilinear_resize,
    tile_complexity,
    to_model_input,
)

ALL_SETTINGS = [
    FingerprintSettings(mode=mode, region=region, patch_select=select, fit=fit, size=size, seed=seed)
    for mode, (region, select, seed), fit, size in itertools.product(
        ("scale", "binary"),
        (("full", "max", 0), ("patch", "max", 0), ("patch", "min", 0), ("patch", "random", 0), ("patch", "random", 7)),
        ("resize", "crop"),
        (64, 256),
    )
]


def odd_images(rng, count=9):
    sizes = [(1, 1), (31, 33), (32, 32), (65, 17), (127, 255), (300, 41), (257, 263), (5, 700), (96, 96)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes[:count]]


def _production(images, settings):
    """The production path: CPU workers keep the low bits (`accel.prepare`), the device finishes a batch."""
    from lida_core import accel

    kept = torch.stack([torch.from_numpy(accel.prepare(x, settings)) for x in images])
    return accel.finish(kept, settings).numpy()


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=str)
def test_production_finish_of_a_batch_is_bit_identical_to_numpy(settings, rng):
    for image in odd_images(rng):
        other = rng.integers(0, 256, image.shape, dtype=np.uint8)  # a second image of the size: its own patch, its own bits
        got = _production([image, other], settings)
        assert got.dtype == np.uint8 and got.shape == (2, settings.size, settings.size, 3)
        for x, out in zip((image, other), got, strict=True):
            np.testing.assert_array_equal(out, fingerprint_bits(x, settings))


def test_scale_mode_is_the_authors_formula_before_a_pillow_resize(rng):
    # Independent restatement of the released code: (x & 7) * (255 // 7), then PIL resize to 256.
    for shape in ((512, 384, 3), (200, 333, 3), (256, 256, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        scaled = ((x & 7) * (255 // 7)).astype(np.uint8)
        expected = np.asarray(Image.fromarray(scaled).resize((256, 256), Image.BILINEAR))
        np.testing.assert_array_equal(fingerprint_bits(x, FingerprintSettings()), expected)
    assert set(np.unique(fingerprint_bits(x, FingerprintSettings(fit="crop")))) <= {36 * k for k in range(8)}


def test_binary_mode_sets_255_where_any_low_bit_is_set(rng):
    x = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    got = fingerprint_bits(x, FingerprintSettings(mode="binary", fit="crop", size=40))
    np.testing.assert_array_equal(got, np.where((x % 8) > 0, 255, 0))
    one_bit = fingerprint_bits(x, FingerprintSettings(bits=1, mode="scale", fit="crop", size=40))
    np.testing.assert_array_equal(one_bit, (x % 2) * 255)


def test_high_bits_do_not_matter(rng):
    x = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    shifted = (x & 7) | (rng.integers(0, 32, x.shape, dtype=np.uint8) << 3)
    for settings in (FingerprintSettings(), FingerprintSettings(mode="binary", fit="crop", size=64)):
        np.testing.assert_array_equal(fingerprint_bits(x, settings), fingerprint_bits(shifted, settings))


def test_crop_keeps_every_bit_and_tiles_small_images(rng):
    x = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    got = fingerprint_bits(x, FingerprintSettings(fit="crop", size=128))
    np.testing.assert_array_equal(got, (x[86:214, 36:164] & 7) * 36)
    small = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    tiled = fingerprint_bits(small, FingerprintSettings(fit="crop", size=8))
    np.testing.assert_array_equal(tiled, np.tile((small & 7) * 36, (3, 2, 1))[:8, :8])


def test_patch_rules_pick_the_textured_or_flat_tile(rng):
    x = np.full((96, 128, 3), 120, np.uint8)
    x[32:64, 64:96] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the one textured tile
    x[0:32, 96:128] = 121  # a flat tile, but not the first one: ties go to the first
    x[64:96, 0:32] += (np.arange(32) % 2).astype(np.uint8)[None, :, None]  # mild stripes
    scores = tile_complexity(x, 32)
    assert scores.shape == (3, 4) and scores.argmax() == 1 * 4 + 2 and scores.min() == 0
    fp = FingerprintSettings(region="patch", patch=32, fit="crop", size=32)
    np.testing.assert_array_equal(fingerprint_bits(x, fp), (x[32:64, 64:96] & 7) * 36)
    flat = FingerprintSettings(region="patch", patch=32, patch_select="min", fit="crop", size=32)
    np.testing.assert_array_equal(fingerprint_bits(x, flat), (x[0:32, 0:32] & 7) * 36)


def test_complexity_ignores_differences_across_tile_borders():
    x = np.zeros((64, 64, 3), np.uint8)
    x[:, 32:] = 255  # each tile is flat; the only edge lies on a tile border
    assert int(tile_complexity(x, 32).max()) == 0


def test_random_patch_is_seeded_and_inside_the_grid(rng):
    x = rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)
    picks = set()
    for seed in range(12):
        fp = FingerprintSettings(region="patch", patch_select="random", seed=seed, fit="crop", size=32)
        a, b = fingerprint_bits(x, fp), fingerprint_bits(x.copy(), fp)
        np.testing.assert_array_equal(a, b)
        matches = [
            (r, c) for r in range(6) for c in range(5) if np.array_equal(a, (x[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32] & 7) * 36)
        ]
        assert len(matches) == 1
        picks.add(matches[0])
    assert len(picks) > 3  # different seeds pick different tiles


def test_images_smaller_than_a_patch_are_read_whole(rng):
    x = rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)
    whole = fingerprint_bits(x, FingerprintSettings(fit="crop", size=16))
    patch = fingerprint_bits(x, FingerprintSettings(region="patch", fit="crop", size=16))
    np.testing.assert_array_equal(whole, patch)


@pytest.mark.parametrize("settings", ALL_SETTINGS[:8] + [FingerprintSettings(bits=2, region="patch", patch=16, patch_select="random", seed=5),
                                      FingerprintSettings(fit="crop", jpeg="ycc")], ids=str)
def test_settings_round_trip_through_their_string(settings):
    text = str(settings)
    assert FingerprintSettings.parse(text) == settings
    assert len(text) < 40 and " " not in text


def test_bad_settings_are_refused():
    for kwargs in ({"bits": 0}, {"mode": "gray"}, {"region": "tile"}, {"fit": "pad"}, {"patch_select": "mean"}):
        with pytest.raises(ValueError):
            FingerprintSettings(**kwargs)
    with pytest.raises(ValueError, match="not a fingerprint settings string"):
        FingerprintSettings.parse("b3-scale")
    with pytest.raises(ValueError, match="jpeg space"):
        FingerprintSettings(jpeg="yuv")


def test_settings_strings_written_before_the_jpeg_space_read_as_rgb():
    """Every model and table row made before session 17 says nothing of JPEGs: they were decoded to RGB."""
    assert FingerprintSettings.parse("b3-scale-full-crop256").jpeg == "rgb"
    assert str(FingerprintSettings.parse("b3-scale-full-crop256-jpegycc")) == "b3-scale-full-crop256-jpegycc"
    from lida_core.model import get_profile

    assert get_profile("srm").fingerprint.jpeg == "ycc" and get_profile("paper").fingerprint.jpeg == "rgb"


@pytest.mark.parametrize("size", [(610, 6), (900, 3), (17, 1000), (1, 1), (256, 256), (513, 129)])
def test_resize_matches_pillow_including_its_tall_image_rule(size, rng):
    x = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    for out in ((140, 396), (256, 256), (3, 2)):
        expected = np.asarray(Image.fromarray(x).resize((out[1], out[0]), Image.BILINEAR))
        np.testing.assert_array_equal(pillow_bilinear_resize(x, *out), expected)
        np.testing.assert_array_equal(pillow_bilinear_resize(torch.from_numpy(x), *out).numpy(), expected)


def test_model_input_is_channels_first_in_unit_range(rng):
    fp = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = to_model_input(fp)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 8, 8)
    assert float(x[1, 2, 3, 4]) == pytest.approx(fp[1, 3, 4, 2] / 255.0)


def test_bad_pixel_arrays_are_refused():
    with pytest.raises(ValueError):
        fingerprint_bits(np.zeros((4, 4), np.uint8), FingerprintSettings())
    with pytest.raises(ValueError):
        fingerprint_bits(np.zeros((4, 4, 3), np.float32), FingerprintSettings())


# ---------------------------------------------------------------- the authors' code, restated

AUTHORS_SIZES = [(32, 32), (32, 45), (40, 300), (64, 64), (100, 77), (128, 256), (200, 200), (255, 257),
                 (256, 256), (300, 199), (384, 512), (500, 333), (512, 512), (640, 480), (700, 1024),
                 (1024, 1024), (1024, 768), (33, 1000), (256, 100), (480, 640), (96, 128), (1000, 40)]
AUTHORS_MODES = ["RGB", "L", "RGBA", "P", "RGB", "CMYK", "LA", "RGB"]


def authors_test_images(folder, rng) -> list:
    """22 files: PNG and JPEG, 32 to 1024 px, several pixel modes; smooth content plus noise, so tiles differ."""
    paths = []
    for i, (h, w) in enumerate(AUTHORS_SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = 128 + 100 * np.sin(xx / (7 + i)) * np.cos(yy / (11 + i))
        noise = rng.normal(0, 2 + (xx > w // 2) * 10 + (yy > h // 3) * 5, (3, h, w))  # more texture in some regions
        pixels = np.clip(smooth[None] + noise, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        mode = AUTHORS_MODES[i % len(AUTHORS_MODES)]
        jpeg = i % 2 == 1 and mode in ("RGB", "L", "CMYK")
        image = Image.fromarray(pixels).convert(mode)
        path = folder / f"img{i:02d}.{'jpg' if jpeg else 'png'}"
        image.save(path, quality=90) if jpeg else image.save(path)
        paths.append(path)
    return paths


def authors_fingerprint(path, select=None, seed=0):
    """The released code's preprocessing (../shared/reference/lida-method.md), written out on its own."""
    cv2 = pytest.importorskip("cv2")
    x = np.array(Image.open(path).convert("RGB"))
    low = ((x & 7) * 36).astype(np.uint8)
    if min(x.shape[:2]) < 32:
        img = cv2.resize(low, (256, 256))
    else:  # torchvision Resize((256, 256)) on a PIL image is Pillow's bilinear resize
        img = np.array(Image.fromarray(low).resize((256, 256), Image.BILINEAR))
    if select is None:
        return img
    patches = [img[i : i + 32, j : j + 32] for i in range(0, 256, 32) for j in range(0, 256, 32)]

    def complexity(p):
        p = p.astype(np.int64)
        return (np.abs(p[:, :-1] - p[:, 1:]).sum() + np.abs(p[:-1, :] - p[1:, :]).sum()
                + np.abs(p[:-1, :-1] - p[1:, 1:]).sum() + np.abs(p[1:, :-1] - p[:-1, 1:]).sum())

    if select == "random":
        random.seed(seed)
        chosen = random.choice(patches)
    else:
        order = sorted(range(len(patches)), key=lambda k: complexity(patches[k]), reverse=select == "max")
        chosen = patches[order[0]]
    return cv2.resize(chosen, (256, 256))


def test_paper_patches_equal_the_authors_on_22_images(tmp_path, rng):
    pytest.importorskip("cv2", reason="opencv-python-headless (the dev extra) restates the authors' resize")
    paths = authors_test_images(tmp_path, rng)
    assert {p.suffix for p in paths} == {".png", ".jpg"} and len(paths) == 22
    cases = [("max", 0), ("min", 0), ("random", 0), ("random", 3), ("random", 11)]
    picked = set()
    for path in paths:
        pixels = decode_image(path.read_bytes(), path.name).pixels
        np.testing.assert_array_equal(fingerprint_bits(pixels, FingerprintSettings()), authors_fingerprint(path))
        for select, seed in cases:
            settings = FingerprintSettings(region="patch", patch_select=select, seed=seed)
            expected = authors_fingerprint(path, select, seed)
            np.testing.assert_array_equal(fingerprint_bits(pixels, settings), expected, err_msg=f"{path.name} {settings}")
            np.testing.assert_array_equal(_production([pixels], settings)[0], expected)
            if select != "random":
                picked.add((select, fingerprint_bits(pixels, settings).tobytes()))
    assert len(picked) > 30  # max and min pick different tiles on different images: the rule is exercised


@pytest.mark.parametrize("shape", [(1, 1), (8, 300), (31, 31), (20, 40), (31, 700)])
def test_images_under_32_pixels_are_resized_as_opencv_does(shape, tmp_path, rng):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the dev extra) restates the authors' resize")
    x = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    path = tmp_path / "small.png"
    Image.fromarray(x).save(path)
    np.testing.assert_array_equal(fingerprint_bits(x, FingerprintSettings()), authors_fingerprint(path))
    for size in (64, 256):  # the restatement holds for any enlargement, not only to 256
        np.testing.assert_array_equal(cv2_bilinear_resize(x, size, size + 3), cv2.resize(x, (size + 3, size)))
    np.testing.assert_array_equal(cv2_bilinear_resize(torch.from_numpy(x), 256, 256).numpy(), cv2.resize(x, (256, 256)))
