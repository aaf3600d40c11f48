"""Bundled samples: deterministic, content-alike, and carrying only their decoder's low bits."""

import numpy as np
import pytest

from lida_core import samples


def laplacian(image: np.ndarray) -> float:
    g = image.astype(np.float64).mean(2)
    return float(np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).mean())


def content_crop(source: str, index: int) -> np.ndarray:
    crop = samples.real_crop(index, 0)
    f = samples.GENERATORS[source].factor
    return crop[: crop.shape[0] // f * f, : crop.shape[1] // f * f]


def test_at_least_six_generators_and_real():
    sources = samples.sample_sources()
    assert sources[0] == "real" and len(sources) >= 7
    kinds = {spec.upsampler for spec in samples.GENERATORS.values()}
    assert {"tconv", "nearest_conv", "bilinear_conv", "pixel_shuffle", "vae"} <= kinds
    assert len({spec.activation for spec in samples.GENERATORS.values()}) >= 3


@pytest.mark.parametrize("source", samples.sample_sources())
def test_samples_are_deterministic_uint8_in_the_size_range(source):
    a = samples.sample_image(source, 3)
    b = samples.sample_image(source, 3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert 120 <= min(a.shape[:2]) and max(a.shape[:2]) <= 256
    assert not np.array_equal(a, samples.sample_image(source, 4))
    assert not np.array_equal(a, samples.sample_image(source, 3, seed=1))


@pytest.mark.parametrize("source", list(samples.GENERATORS))
def test_generated_images_look_like_their_content(source):
    for index in range(4):
        out = samples.sample_image(source, index).astype(np.int64)
        content = content_crop(source, index).astype(np.int64)
        assert out.shape == content.shape
        assert np.abs(out - content).max() <= 8
        assert np.abs(out - content).mean() < 4.5


@pytest.mark.parametrize("source", list(samples.GENERATORS))
def test_the_photographs_low_bits_do_not_survive_generation(source):
    agree = []
    for index in range(4):
        out = samples.sample_image(source, index)
        agree.append(np.mean((out & 7) == (content_crop(source, index) & 7)))
    assert np.mean(agree) < 0.3  # chance is 1/8; the photograph's own bits would give 1.0


def test_content_statistics_are_shared():
    stats = {}
    for source in samples.sample_sources():
        images = [samples.sample_image(source, i) for i in range(24)]
        stats[source] = (np.mean([im.mean() for im in images]), np.mean([laplacian(im) for im in images]))
    brightness = [b for b, _ in stats.values()]
    sharpness = [s for _, s in stats.values()]
    # the same crops for every source: no source is brighter or sharper than real
    assert max(brightness) - min(brightness) < 3, stats
    assert max(sharpness) / min(sharpness) < 1.3, stats


def test_generators_leave_different_traces():
    # the low bits of one image per generator differ between generators fed the same content
    crop = samples.real_crop(0, 0)[:128, :128]
    import torch

    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
    outs = {name: samples.to_uint8(samples.generator(name)(x, 1))[0] for name in samples.GENERATORS}
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.mean((outs[a] & 7) == (outs[b] & 7)) < 0.6, (a, b)


def test_write_samples_saves_lossless_pngs(tmp_path):
    from PIL import Image

    paths = samples.write_samples(str(tmp_path), per_source=2, sources=["real", "vae_ldm"])
    assert len(paths) == 4
    assert sorted(p.name for p in (tmp_path / "vae_ldm").iterdir()) == ["vae_ldm_00000.png", "vae_ldm_00001.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[2])), samples.sample_image("vae_ldm", 0))


def test_unknown_generator_is_refused():
    with pytest.raises(ValueError, match="unknown sample generator"):
        samples.generator("dalle")
