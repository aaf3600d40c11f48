"""The srm profile: its fixed stem, its closed-form head and the quadratic detection rule."""

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from lida_core import embed, srm, statistical
from lida_core.decide import Decider, calibrate_real_threshold
from lida_core.decode import YCbCrPixels
from lida_core.fingerprint import fingerprint_bits, prepare_pixels, tile_boxes, tile_views, to_model_input
from lida_core.model import CheckpointError, SrmStem, build_model, checkpoint_bytes, load_checkpoint, save_checkpoint

# The rich-model kernels as arrays (rows x columns), each with the axis its neighbour pairs run along first.
KERNELS = [
    (np.array([[-1, 1]]), 1),
    (np.array([[-1], [1]]), 0),
    (np.array([[1, -2, 1]]), 1),
    (np.array([[1], [-2], [1]]), 0),
    (np.array([[-1, 3, -3, 1]]), 1),
    (np.array([[-1], [3], [-3], [1]]), 0),
    (np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]), 1),
]


def _srm_reference(pixels: np.ndarray, pairs: bool = False, truncation: int = 2) -> np.ndarray:
    """SrmStem's descriptor stated again: valid correlation with each kernel, mod 8, truncated, histograms.

    Per kernel the colour triple's histogram, after (with `pairs`, the pre-session-14 layout) the
    neighbour pairs along the kernel's direction and across it.
    """
    v = (pixels & 7).astype(np.int64)
    parts = []

    def hist(codes, n):
        counts = np.bincount(codes.ravel(), minlength=n).astype(np.float64)
        return counts / counts.sum()

    for kernel, axis in KERNELS:
        kh, kw = kernel.shape
        h, w = v.shape[0] - kh + 1, v.shape[1] - kw + 1
        r = sum(kernel[i, j] * v[i : i + h, j : j + w] for i in range(kh) for j in range(kw))
        signed = np.where(r % 8 >= 4, r % 8 - 8, r % 8)  # the residual modulo 8, in [-4, 3]
        q, n = np.clip(signed, -truncation, truncation) + truncation, 2 * truncation + 1
        for ax in (axis, 1 - axis) if pairs else ():
            first = q[:-1] if ax == 0 else q[:, :-1]
            second = q[1:] if ax == 0 else q[:, 1:]
            parts.append(hist(first * n + second, n**2))
        parts.append(hist((q[..., 0] * n + q[..., 1]) * n + q[..., 2], n**3))
    return np.sqrt(np.concatenate(parts))


def _input(pixels):
    return to_model_input(torch.from_numpy(((pixels & 7) * 36).astype(np.uint8))[None])


def test_srm_stem_is_the_rich_model_restated_in_numpy(rng):
    model = build_model("srm", stem_options={"truncation": 2, "quiet": False})  # every srm model before session 19
    current = build_model("srm", stem_options={"quiet": False})  # srm models of sessions 19-27
    legacy = build_model("srm", stem_options={"pairs": True, "truncation": 2, "quiet": False})
    smooth = np.cumsum(rng.integers(-2, 3, size=(64, 80, 3)), axis=1).clip(0, 255).astype(np.uint8)
    for pixels in (rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8), smooth):
        out = model.stem(_input(pixels))[0].numpy()
        assert out.shape == (SrmStem.size(),) == (875,)
        assert np.allclose(out, _srm_reference(pixels), atol=1e-6)
        wide = current.stem(_input(pixels))[0].numpy()
        assert current.stem.truncation == 3 and wide.shape == (SrmStem.size(3),) == (2401,)
        assert np.allclose(wide, _srm_reference(pixels, truncation=3), atol=1e-6)
        with_pairs = legacy.stem(_input(pixels))[0].numpy()
        assert with_pairs.shape == (SrmStem.size(pairs=True),) == (1225,)
        assert np.allclose(with_pairs, _srm_reference(pixels, pairs=True), atol=1e-6)
        # The triples are the same counts in both layouts: the pairs only come before them.
        assert np.array_equal(out, np.concatenate([with_pairs[k * 175 + 50 : (k + 1) * 175] for k in range(7)]))
    # High-pass kernels sum to zero: a constant offset of the pixels changes no residual.
    base = rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
    assert torch.allclose(model.stem(_input(base + 1)), model.stem(_input(base)), atol=1e-6)
    # Directional: the horizontal first-difference block reads columns, so a transpose moves it.
    stripes = np.zeros((48, 48, 3), np.uint8)
    stripes[:, ::2] = 3
    assert not torch.allclose(model.stem(_input(stripes)), model.stem(_input(np.ascontiguousarray(stripes.transpose(1, 0, 2)))))


def test_srm_counts_each_box_of_raw_pixels_as_the_box_cut_out_and_masked(rng):
    """pixel_counts reads uncut, unmasked pixels: each box counts what its own `x & 7` crop counts."""
    smooth = np.cumsum(rng.integers(-2, 3, size=(70, 90, 3)), axis=1).clip(0, 255).astype(np.uint8)
    for image in (rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8), smooth):
        boxes = np.array([[0, 0, 70, 90], [0, 0, 35, 45], [35, 45, 35, 45], [3, 60, 4, 30], [10, 7, 33, 4],
                          [66, 86, 4, 4], [0, 45, 70, 45]])
        for pairs, t, width in ((False, 2, 875), (True, 2, 1225), (False, 3, 2401), (True, 3, 3087)):
            got = srm.pixel_counts([(image, boxes), (image, boxes[3:5])], threads=2, pairs=pairs, truncation=t)
            assert got.shape == (9, width) == (9, srm.descriptor_width(pairs, truncation=t))
            assert (got[:, srm.histogram_slices(pairs, truncation=t)[0]].sum(1) > 0).all()
            for row, (top, left, h, w) in zip(got, [*boxes, *boxes[3:5]], strict=True):
                alone = srm.srm_counts(np.ascontiguousarray(image[top : top + h, left : left + w] & 7)[None], threads=1,
                                       pairs=pairs, truncation=t)[0]
                np.testing.assert_array_equal(row, alone)
                reference = _srm_reference(image[top : top + h, left : left + w], pairs, t) ** 2  # normalised counts
                for span in srm.histogram_slices(pairs, truncation=t):
                    assert np.allclose(row[span] / max(row[span].sum(), 1), np.nan_to_num(reference[span]))
    with pytest.raises(ValueError, match="inside the image"):
        srm.pixel_counts([(smooth, np.array([[0, 88, 10, 4]]))])
    with pytest.raises(ValueError, match="at least 4x4"):
        srm.pixel_counts([(smooth, np.array([[0, 0, 3, 10]]))])


def test_srm_truncation_3_keeps_what_truncation_2_merges(rng):
    """Merging levels -3 and 3 into -2 and 2 turns the 343-bin triples into the 125-bin ones, count for count."""
    image = _textured(rng)
    boxes = np.array([[0, 0, 70, 90], [35, 45, 35, 45], [66, 86, 4, 4]])
    wide = srm.pixel_counts([(image, boxes)], truncation=3).reshape(3, 7, 7, 7, 7)  # box, kernel, then the three levels
    narrow = srm.pixel_counts([(image, boxes)], truncation=2).reshape(3, 7, 125)
    merge = np.clip(np.arange(7) - 3, -2, 2) + 2  # T = 3 level -> T = 2 level
    folded = np.zeros((3, 7, 5, 5, 5), np.int64)
    np.add.at(folded, (slice(None), slice(None), merge[:, None, None], merge[None, :, None], merge[None, None, :]), wide)
    np.testing.assert_array_equal(folded.reshape(3, 7, 125), narrow)
    assert wide[:, :, [0, 6]].sum() > 0  # and the outer levels are there to keep on these residuals
    for bad in (1, 4, True, "3"):
        with pytest.raises(ValueError, match="truncat"):
            srm.pixel_counts([(image, boxes)], truncation=bad)
        with pytest.raises(ValueError, match="truncation"):
            build_model("srm", stem_options={"truncation": bad})


@pytest.mark.parametrize("shape", [(512, 512), (600, 530), (300, 1000), (1024, 768), (256, 256), (200, 300), (90, 80)])
def test_srm_descriptors_from_pixels_equal_the_stem_on_each_tile_fingerprint(shape, rng):
    """describe (the scan's and the fit's path) against the stem on fingerprints of tile_views: bit for bit."""
    model = build_model("srm", stem_options={"quiet": False}).eval()  # the stem that reads fingerprints
    images = [rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8) for _ in range(2)]
    described, owners = model.stem.describe(images, model.fingerprint, model.input_size, model.tiles)
    views = [(i, view) for i, image in enumerate(images) for view in tile_views(image, model.input_size, model.tiles)]
    assert owners.tolist() == [i for i, _ in views]
    fingerprints = torch.from_numpy(np.stack([fingerprint_bits(view, model.fingerprint) for _, view in views]))
    assert torch.equal(described, model.stem(to_model_input(fingerprints)))
    boxes = tile_boxes(*shape, model.input_size, model.tiles)
    assert [view.shape[:2] for _, view in views[: len(boxes)]] == [(h, w) for _, _, h, w in boxes]


def _classes_reference(pixels: np.ndarray, ycc: bool) -> np.ndarray:
    """Each pixel's content class stated again: the luma's high 5 bits, central differences (edges repeated)."""
    p = (pixels >> 3).astype(np.int64)
    luma = p[..., 0] if ycc else (p[..., 0] + 2 * p[..., 1] + p[..., 2]) // 4
    padded = np.pad(luma, 1, mode="edge")
    g = np.abs(padded[1:-1, 2:] - padded[1:-1, :-2]) + np.abs(padded[2:, 1:-1] - padded[:-2, 1:-1])
    return np.where(g == 0, 0, np.where(g <= 2, 1, 2))


def _split_reference(pixels: np.ndarray, ycc: bool = False) -> np.ndarray:
    """The split descriptor's normalised counts: per kernel, the triples of the pixels of each class in turn."""
    v = (pixels & 7).astype(np.int64)
    classes = _classes_reference(pixels, ycc)
    parts = []
    for kernel, _ in KERNELS:
        kh, kw = kernel.shape
        h, w = v.shape[0] - kh + 1, v.shape[1] - kw + 1
        r = sum(kernel[i, j] * v[i : i + h, j : j + w] for i in range(kh) for j in range(kw))
        q = np.clip(np.where(r % 8 >= 4, r % 8 - 8, r % 8), -2, 2) + 2
        codes, anchor = q[..., 0] * 25 + q[..., 1] * 5 + q[..., 2], classes[:h, :w]  # a residual's class: its first pixel's
        for k in range(3):
            counts = np.bincount(codes[anchor == k], minlength=125).astype(np.float64)
            parts.append(counts / max(counts.sum(), 1))
    return np.concatenate(parts)


def _textured(rng, shape=(70, 90)):
    """Flat, gently and strongly changing regions side by side, with noise in the low bits."""
    base = np.zeros((*shape, 3), np.int64)
    base[:, shape[1] // 3 : 2 * shape[1] // 3] = (np.arange(shape[0]) * 9)[:, None, None]  # a gentle ramp
    base[:, 2 * shape[1] // 3 :] = rng.integers(0, 200, size=(shape[0], shape[1] - 2 * shape[1] // 3, 3))
    return (base + rng.integers(0, 8, size=base.shape)).clip(0, 255).astype(np.uint8)


def test_split_srm_counts_each_content_class_apart_and_sum_to_the_unsplit_counts(rng):
    image = _textured(rng)
    boxes = np.array([[0, 0, 70, 90], [0, 0, 35, 45], [35, 45, 35, 45], [3, 55, 4, 30], [66, 86, 4, 4]])
    split = srm.pixel_counts([(image, boxes)], threads=2, split=True)
    plain = srm.pixel_counts([(image, boxes)], threads=1)
    assert split.shape == (5, 2625) == (5, srm.descriptor_width(split=True)) and len(srm.histogram_slices(split=True)) == 21
    # the classes partition the positions: summed over them, a kernel's split triples are its plain ones
    assert np.array_equal(split.reshape(5, 7, 3, 125).sum(2), plain.reshape(5, 7, 125))
    assert (split[0].reshape(7, 3, 125).sum(2) > 0).all()  # every kernel sees every class in this image
    for row, (top, left, h, w) in zip(split, boxes, strict=True):  # each box as if cut out on its own (its edges repeated)
        box = image[top : top + h, left : left + w]
        np.testing.assert_array_equal(row, srm.pixel_counts([(np.ascontiguousarray(box), np.array([[0, 0, h, w]]))], split=True)[0])
        normalised = np.concatenate([row[span] / max(row[span].sum(), 1) for span in srm.histogram_slices(split=True)])
        assert np.allclose(normalised, _split_reference(box))
    # The classes read the high bits only: new low bits move the counts, never which class a residual falls in.
    noisier = (image & 0xF8) | rng.integers(0, 8, size=image.shape, dtype=np.uint8)
    assert np.array_equal(_classes_reference(noisier, False), _classes_reference(image, False))
    again = srm.pixel_counts([(noisier, boxes[:1])], split=True)[0].reshape(7, 3, 125)
    assert np.array_equal(again.sum(2), split[0].reshape(7, 3, 125).sum(2))  # per class, as many residuals
    with pytest.raises(ValueError, match="triples alone"):
        srm.pixel_counts([(image, boxes)], pairs=True, split=True)


def test_split_srm_reads_a_jpeg_luma_from_its_first_channel(rng):
    """A YCbCr JPEG's classes come from Y; the same array as RGB takes the weighted channel mean."""
    image = _textured(rng)
    image[..., 1] = rng.integers(0, 256, size=image.shape[:2])  # a second channel that would class everything textured
    box = np.array([[0, 0, *image.shape[:2]]])
    as_ycc = srm.pixel_counts([(image.view(YCbCrPixels), box)], split=True)[0]
    as_rgb = srm.pixel_counts([(image, box)], split=True)[0]
    assert not np.array_equal(as_ycc, as_rgb)
    for counts, ycc in ((as_ycc, True), (as_rgb, False)):
        normalised = np.concatenate([counts[span] / max(counts[span].sum(), 1) for span in srm.histogram_slices(split=True)])
        assert np.allclose(normalised, _split_reference(image, ycc))


@pytest.mark.parametrize("shape", [(600, 530), (256, 256), (90, 80)])
def test_split_srm_describes_whole_pixels_of_every_tile_and_refuses_fingerprints(shape, rng):
    model = build_model("srm-split").eval()
    assert model.stem.split and model.stem.dim == 2625
    images = [_textured(rng, shape), _textured(rng, shape).view(YCbCrPixels)]
    described, owners = model.stem.describe(images, model.fingerprint, model.input_size, model.tiles)
    views = [(i, view) for i, image in enumerate(images) for view in tile_views(image, model.input_size, model.tiles)]
    assert owners.tolist() == [i for i, _ in views]
    for row, (i, view) in zip(described.numpy(), views, strict=True):
        whole = prepare_pixels(view.view(YCbCrPixels) if i == 1 else view, model.fingerprint)  # a small image's view is padded up to size, high bits kept
        assert whole.shape[:2] == (model.input_size, model.input_size) and isinstance(whole, YCbCrPixels) == (i == 1)
        assert np.allclose(row, np.sqrt(_split_reference(whole, i == 1)), atol=1e-6)
    with pytest.raises(ValueError, match="content class"):
        model.stem(_input(images[0][:64, :64]))


@pytest.mark.parametrize("profile,width", [("srm", 4151), ("srm-split", 2625)])
def test_srm_head_round_trips_with_its_reference_rows(profile, width, tmp_path, rng):
    model = build_model(profile).eval()
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(6)]
    kept, rows = statistical.fit_pretrain(model, images)
    assert kept.shape == (12, width) and rows.tolist() == list(range(12))  # every image, then its JPEG copy
    copies, image, quality = statistical.calibration_copies(model, images)
    statistical.keep_calibration(model, copies)
    path = str(tmp_path / "m.pt")
    save_checkpoint(model, path)
    loaded, _ = load_checkpoint(path, profile=profile, fingerprint=model.fingerprint)
    assert loaded.backbone.reference.shape == (12, width) and not loaded.stem.pairs
    assert np.array_equal(statistical.calibration_descriptors(loaded), statistical.calibration_descriptors(model))
    assert copies.shape == (6 * len(statistical.CALIBRATION_QUALITIES), width)
    assert loaded.stem.split == (profile == "srm-split")
    queries = [rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8) for _ in range(3)]
    assert np.array_equal(embed.embed(loaded.eval(), queries), embed.embed(model, queries))
    assert not np.allclose(embed.embed(build_model(profile).eval(), queries), embed.embed(model, queries))  # the fitted head
    assert loaded.stem.quiet == (profile == "srm")


def test_calibration_copies_are_each_image_at_each_calibrated_quality(rng):
    from lida_core.perturb import jpeg_copy

    model = build_model("srm").eval()
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    copies, image, quality = statistical.calibration_copies(model, images, seed=0)
    qualities = list(statistical.CALIBRATION_QUALITIES)
    assert image.tolist() == [i for i in range(3) for _ in qualities] and quality.tolist() == qualities * 3
    for row in (0, 4, 3 * len(qualities) - 1):  # a row is the descriptor of that image re-encoded at that quality
        copy = jpeg_copy(images[image[row]], int(quality[row]), model.fingerprint.jpeg)
        np.testing.assert_allclose(copies[row], statistical.descriptors(model, [copy])[0])
    assert not np.allclose(copies[0], copies[1])  # the quality shows in the descriptor
    many = [images[0]] * (statistical.MAX_CALIBRATION_IMAGES + 5)  # a seeded choice of at most that many images
    picked = statistical.calibration_copies(model, many, seed=2)[1]
    assert len(set(picked.tolist())) == statistical.MAX_CALIBRATION_IMAGES
    assert np.array_equal(picked, statistical.calibration_copies(model, many, seed=2)[1])


def test_size_copies_are_centre_crops_of_each_image_at_each_side_as_they_are_and_as_a_jpeg(rng):
    from lida_core.perturb import jpeg_copy

    model = build_model("srm").eval()
    sides = list(statistical.SIZE_SIDES)
    assert statistical.size_sides(model) == tuple(sides) and all(s < model.fingerprint.size for s in sides)
    images = [rng.integers(0, 256, size=(300, 280, 3), dtype=np.uint8) for _ in range(2)]
    images.append(images[1].copy().view(YCbCrPixels))  # a JPEG read in its decoder's YCbCr: its crops stay YCbCr
    copies, image, side, quality = statistical.size_copies(model, images, seed=0)
    assert image.tolist() == [i for i in range(3) for _ in sides for _ in (0, 1)]
    assert side.tolist() == [s for _ in range(3) for s in sides for _ in (0, 1)]
    assert (quality[::2] == 0).all() and ((quality[1::2] >= 70) & (quality[1::2] <= 95)).all()
    assert len(set(quality[1::2].tolist())) > 1  # stratified over the range, not one quality
    for row in (0, 3, 2 * len(sides) - 1, len(copies) - 2):  # a row is that crop's descriptor, kept or re-encoded
        pixels, s = images[image[row]], int(side[row])
        top, left = (pixels.shape[0] - s) // 2, (pixels.shape[1] - s) // 2
        crop = pixels[top : top + s, left : left + s]
        assert isinstance(crop, YCbCrPixels) == (image[row] == 2)
        made = jpeg_copy(crop, int(quality[row]), model.fingerprint.jpeg) if quality[row] else crop
        np.testing.assert_allclose(copies[row], statistical.descriptors(model, [made])[0])
    assert not np.allclose(copies[-2], copies[-4])  # the YCbCr image's crops differ from the same pixels read as RGB
    # an image narrower than a side gives what it has; a model with another fit or a smaller view has fewer sides
    narrow = statistical.size_copies(model, [rng.integers(0, 256, size=(40, 200, 3), dtype=np.uint8)])[0]
    assert len(narrow) == 2 * len(sides) and np.isfinite(narrow).all()
    model.fingerprint = replace(model.fingerprint, size=64)
    assert statistical.size_sides(model) == (16, 32)
    model.fingerprint = replace(model.fingerprint, size=256, fit="resize")
    assert statistical.size_sides(model) == () and len(statistical.size_copies(model, images)[0]) == 0


def test_srm_checkpoints_without_calibration_copies_load_with_none(tmp_path, rng):
    """A checkpoint saved before session 20 has no calibration buffer: it loads, and its JPEGs take the one JPEG threshold."""
    old = build_model("srm").eval()
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(6)]
    statistical.fit_pretrain(old, images)
    payload = torch.load(io.BytesIO(checkpoint_bytes(old)), weights_only=True)
    state = payload["state_dict"]
    removed = [k for k in list(state) if k.endswith("calibration")]
    assert len(removed) == 1
    del state[removed[0]]
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(str(tmp_path / "old.pt"), profile="srm")
    assert statistical.calibration_descriptors(loaded).shape == (0, 4151)
    assert np.array_equal(embed.embed(loaded.eval(), images), embed.embed(old, images))


def test_srm_checkpoints_from_before_the_triples_only_layout_load_as_fitted(tmp_path, rng):
    """A checkpoint without recorded stem options is a pre-session-14 srm model: pairs and triples, 1225 values."""
    old = build_model("srm", stem_options={"pairs": True, "truncation": 2, "quiet": False}).eval()
    statistical.fit_pretrain(old, [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(6)])  # (rows, places)
    payload = torch.load(io.BytesIO(checkpoint_bytes(old)), weights_only=True)
    assert payload.pop("stem_options") == {"pairs": True, "split": False, "truncation": 2, "quiet": False}  # before 14: none
    path = tmp_path / "old.pt"
    torch.save(payload, path)
    loaded, _ = load_checkpoint(str(path), profile="srm")
    assert loaded.stem.pairs and loaded.stem.truncation == 2 and loaded.backbone.mean.shape == (1225,)
    x = _input(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), old(x))
    for bad in ({"pairs": "yes"}, {"colours": True}, ["pairs"], {"truncation": 9}):
        payload["stem_options"] = bad
        torch.save(payload, path)
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(str(path))
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_srm_checkpoints_of_sessions_14_to_18_load_unsplit_at_truncation_2(tmp_path, rng):
    """Sessions 14-17 recorded {"pairs": False}, session 18 also the split, none the truncation: the stem's
    defaults (no split, truncation 2) fill in, even under a profile whose own options differ."""
    old = build_model("srm", stem_options={"truncation": 2, "quiet": False}).eval()
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(6)]
    statistical.fit_pretrain(old, images)
    payload = torch.load(io.BytesIO(checkpoint_bytes(old)), weights_only=True)
    for profile, recorded in (("srm-split", {"pairs": False}), ("srm", {"pairs": False, "split": False})):
        payload["stem_options"] = recorded  # what those sessions wrote
        payload["profile"] = profile
        torch.save(payload, tmp_path / "old.pt")
        loaded, _ = load_checkpoint(str(tmp_path / "old.pt"), profile=profile)
        assert not loaded.stem.split and not loaded.stem.pairs and not loaded.stem.quiet and loaded.stem.truncation == 2
        assert loaded.backbone.mean.shape == (875,)
        assert np.array_equal(embed.embed(loaded.eval(), images), embed.embed(old, images))
    assert build_model("srm-split").stem.split and build_model("srm").stem.truncation == 3  # new models take the profile's
    assert build_model("srm").stem.quiet and not build_model("srm-split").stem.quiet


def test_srm_checkpoints_of_sessions_19_to_27_load_without_the_quiet_classes(tmp_path, rng):
    """Sessions 19-27 recorded pairs, split and truncation 3, not `quiet`: such a model describes as it was fitted."""
    old = build_model("srm", stem_options={"quiet": False}).eval()
    images = [rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8) for _ in range(6)]
    statistical.fit_pretrain(old, images)
    payload = torch.load(io.BytesIO(checkpoint_bytes(old)), weights_only=True)
    payload["stem_options"] = {"pairs": False, "split": False, "truncation": 3}  # what those sessions wrote
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(str(tmp_path / "old.pt"), profile="srm")
    assert not loaded.stem.quiet and loaded.backbone.mean.shape == (2401,)
    assert np.array_equal(embed.embed(loaded.eval(), images), embed.embed(old, images))


@pytest.mark.parametrize("shape", [(600, 530), (256, 256), (90, 80)])
def test_quiet_srm_is_the_whole_view_triples_then_the_flat_and_gentle_ones(shape, rng):
    """The quiet descriptor (srm since session 28) from one split pass equals its two parts counted on their own:
    the unsplit triples at truncation 3, and the split stem's flat and gentle triples at 2; pixels, not fingerprints."""
    quiet = build_model("srm").eval()
    plain = build_model("srm", stem_options={"quiet": False}).eval()
    split = build_model("srm-split").eval()
    assert quiet.stem.dim == SrmStem.size(3, quiet=True) == 2401 + 7 * 2 * 125
    images = [_textured(rng, shape), _textured(rng, shape).view(YCbCrPixels)]
    args = (quiet.fingerprint, quiet.input_size, quiet.tiles)
    got, owners = quiet.stem.describe(images, *args)
    whole, whole_owners = plain.stem.describe(images, *args)
    classes, _ = split.stem.describe(images, *args)
    assert owners.tolist() == whole_owners.tolist() and got.shape == (len(owners), quiet.stem.dim)
    assert torch.equal(got[:, :2401], whole)
    flat_gentle = classes.reshape(len(owners), 7, 3, 125)[:, :, :2].reshape(len(owners), -1)
    assert torch.allclose(got[:, 2401:], flat_gentle, atol=1e-7)
    counts = srm.pixel_counts([(images[0], np.array([[0, 0, *shape]]))], split=True, truncation=3)
    assert np.array_equal(srm.quiet_counts(counts)[:, :2401].sum(), counts.sum())  # the classes add up to the whole view
    with pytest.raises(ValueError, match="content class"):
        quiet.stem(_input(images[0][:64, :64]))
    for bad in ({"quiet": "yes"}, {"quiet": True, "truncation": 2}, {"quiet": True, "split": True}):
        with pytest.raises(ValueError, match="quiet"):
            build_model("srm", stem_options=bad)


def test_fitted_head_finds_the_direction_a_nuisance_hides():
    """Two generators differ along a direction of small spread; a large nuisance spread hides it from raw cosine."""
    g = np.random.default_rng(5)
    dim, n = 40, 60

    def draw(shift, count):
        x = g.normal(size=(count, dim)) * 0.05
        x[:, 0] += g.normal(size=count) * 3.0  # nuisance: content-like spread, shared by all
        x[:, 1] += shift
        return x + 1.0

    real = draw(0.0, n)
    a, b = draw(0.4, 5), draw(-0.4, 5)
    queries = np.vstack([draw(0.4, 30), draw(-0.4, 30)])
    truth = np.array([0] * 30 + [1] * 30)

    def nearest_centroid_accuracy(transform):
        cents = np.stack([transform(a).mean(0), transform(b).mean(0)])
        q = transform(queries)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        cents = cents / np.linalg.norm(cents, axis=1, keepdims=True)
        return float(np.mean((q @ cents.T).argmax(1) == truth))

    mean, weight = statistical.fit_head(real, np.vstack([a, b]), ["a"] * 5 + ["b"] * 5, rank=8)
    assert weight.shape == (dim, 8)
    fitted = nearest_centroid_accuracy(lambda x: (x - mean) @ weight)
    raw = nearest_centroid_accuracy(lambda x: x)
    assert fitted >= 0.95 and raw <= 0.75, (fitted, raw)


def test_quadratic_rule_flags_tight_clusters_at_the_calibrated_rate():
    g = np.random.default_rng(9)
    dim = 16

    def normed(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def reals(n):
        return normed(g.normal(size=(n, dim)))

    centres = normed(g.normal(size=(3, dim)))

    def fakes(n):
        labels = g.integers(0, 3, size=n)
        return normed(centres[labels] + 0.15 * g.normal(size=(n, dim))), [f"g{i}" for i in labels]

    gallery, labels = fakes(15)
    detector = statistical.QuadraticDetector.fit(reals(200), gallery, labels)
    threshold = calibrate_real_threshold(detector.scores(reals(200)), 0.05)
    new_fakes, _ = fakes(300)
    fpr = float(np.mean(detector.scores(reals(2000)) < threshold))
    tpr = float(np.mean(detector.scores(new_fakes) < threshold))
    assert fpr <= 0.08 and tpr >= 0.9, (fpr, tpr)
    # The rule survives the model's metadata (JSON) and decides through the Decider.
    decider = Decider.from_dict(Decider(np.zeros(dim, np.float32), threshold, None, quadratic=detector.to_dict()).to_dict())
    assert decider.rule == "quadratic"
    assert np.allclose(decider.scores(new_fakes[:5]), detector.scores(new_fakes[:5]))
    decision = decider.decide(new_fakes[:1].astype(np.float32), gallery.astype(np.float32), labels)[0]
    assert decision["is_generated"] and decision["predicted_source"] in set(labels)


def test_reference_rows_beyond_the_cap_are_sampled_and_their_places_kept(rng, monkeypatch):
    monkeypatch.setattr(statistical, "MAX_REFERENCE", 7)
    model = build_model("srm").eval()
    images = [rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8) for _ in range(5)]
    kept, rows = statistical.fit_pretrain(model, images)
    assert kept.shape == (7, model.stem.dim) and len(set(rows.tolist())) == 7 and rows.max() < 10
    # image i's copy is row 5 + i, read back as the model reads a JPEG
    every = statistical.descriptors(model, statistical.with_jpeg_copies(images, jpeg_space=model.fingerprint.jpeg))
    assert np.allclose(kept, every[rows])


def _clustered(g, n_real, dim=40):
    """Wide real rows and three tight generator clusters, as descriptors (before the head)."""
    real = g.normal(size=(n_real, dim))
    centres = 3 * g.normal(size=(3, dim))
    labels = np.repeat(["a", "b", "c"], 6)
    generated = centres[np.repeat([0, 1, 2], 6)] + 0.3 * g.normal(size=(18, dim))
    return real, generated, labels


def test_cross_fitted_scores_never_score_a_row_with_a_fit_that_saw_its_fold():
    g = np.random.default_rng(5)
    reference, generated, labels = _clustered(g, 60)
    gallery_real = g.normal(size=(4, 40))
    folds = np.arange(60) % 5
    extra, extra_folds = reference[:20] + 0.1 * g.normal(size=(20, 40)), folds[:20]  # copies of the first 20 rows' images
    scores, extra_scores = statistical.cross_fitted_scores(reference, folds, gallery_real, generated, labels, rank=8,
                                                           extra=extra, extra_folds=extra_folds)
    assert np.array_equal(statistical.cross_fitted_scores(reference, folds, gallery_real, generated, labels, rank=8)[0], scores)
    moved = reference.copy()
    moved[0] = 10 * g.normal(size=40)  # one row of fold 0 changes
    again, extra_again = statistical.cross_fitted_scores(moved, folds, gallery_real, generated, labels, rank=8,
                                                         extra=extra, extra_folds=extra_folds)
    fold0 = folds == 0
    assert np.array_equal(again[fold0][1:], scores[fold0][1:])  # its fold-mates were scored without it
    assert not np.allclose(again[~fold0], scores[~fold0])  # every other fold's fit included it
    assert np.array_equal(extra_again[extra_folds == 0], extra_scores[extra_folds == 0])  # so were its fold's copies
    assert not np.allclose(extra_again[extra_folds != 0], extra_scores[extra_folds != 0])
    # The extra rows are scored, never fitted: moving one changes no other score.
    shifted = extra.copy()
    shifted[3] = 10 * g.normal(size=40)
    still, extra_still = statistical.cross_fitted_scores(reference, folds, gallery_real, generated, labels, rank=8,
                                                         extra=shifted, extra_folds=extra_folds)
    assert np.array_equal(still, scores) and np.array_equal(np.delete(extra_still, 3), np.delete(extra_scores, 3))
    # Scored by a fit that saw them, the same rows look more typical of real images than they are.
    real = np.vstack([reference, gallery_real])
    mean, weight = statistical.fit_head(real, generated, labels, 8)
    detector = statistical.QuadraticDetector.fit(statistical.project(real, mean, weight), statistical.project(generated, mean, weight), labels)
    assert np.median(detector.scores(statistical.project(reference, mean, weight))) > np.median(scores)
    with pytest.raises(ValueError, match="at least two folds"):
        statistical.cross_fitted_scores(reference, np.zeros(60, int), gallery_real, generated, labels, rank=8)
    with pytest.raises(ValueError, match="a fold for each"):
        statistical.cross_fitted_scores(reference, folds[:-1], gallery_real, generated, labels, rank=8)
    with pytest.raises(ValueError, match="calibration rows needs one of the reference rows' folds"):
        statistical.cross_fitted_scores(reference, folds, gallery_real, generated, labels, rank=8, extra=extra,
                                        extra_folds=extra_folds + 7)


def test_jpeg_copies_are_reencoded_and_seeded(rng):
    images = [rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8) for _ in range(3)]
    copies = statistical.with_jpeg_copies(images, seed=1)
    assert len(copies) == 6 and all(c.shape == (32, 40, 3) for c in copies)
    assert all(np.array_equal(c, i) for c, i in zip(copies[:3], images, strict=True))
    assert not any(np.array_equal(c, i) for c, i in zip(copies[3:], images, strict=True))
    again = statistical.with_jpeg_copies(images, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(copies, again, strict=True))
    # One quality from each equal slice of the range: 26 copies take each of 70..95 once, 52 twice.
    low, high = statistical.JPEG_QUALITIES
    for n, seed in ((26, 0), (26, 3), (52, 1)):
        qualities = statistical.with_jpeg_copies([images[0]] * n, seed=seed).qualities
        assert sorted(qualities) == sorted(list(range(low, high + 1)) * (n // 26))
    assert statistical.with_jpeg_copies([images[0]] * 26, seed=0).qualities != statistical.with_jpeg_copies([images[0]] * 26, seed=3).qualities


def test_jpeg_inputs_are_decided_against_their_own_threshold():
    from lida_core.lifecycle import _thresholds

    g = np.random.default_rng(3)
    png, jpeg = g.normal(10.0, 1.0, 400), g.normal(0.0, 1.0, 400)  # the codec lowers real images' scores
    other, jpeg_threshold = _thresholds(np.concatenate([png, jpeg]), [False] * 400 + [True] * 400, 0.05)
    new_png, new_jpeg = g.normal(10.0, 1.0, 4000), g.normal(0.0, 1.0, 4000)
    assert np.mean(new_png < other) <= 0.07 and np.mean(new_jpeg < jpeg_threshold) <= 0.07
    pooled = calibrate_real_threshold(np.concatenate([png, jpeg]), 0.05)
    assert np.mean(new_jpeg < pooled) > 0.08  # one threshold for both lets JPEG's false positives through
    assert _thresholds(png, [False] * 400, 0.05) == (calibrate_real_threshold(png, 0.05), None)
    decider = Decider(np.ones(2, np.float32) / np.sqrt(2), 0.5, None, jpeg_threshold=-0.5)
    low = np.array([1.0, -0.9], np.float32) / np.linalg.norm([1.0, -0.9])  # cosine to the prototype ~0.07: between the thresholds
    assert -0.5 < float(decider.scores(low[None])[0]) < 0.5
    assert decider.decide_from_similarities(low, [], [])["is_generated"]
    assert not decider.decide_from_similarities(low, [], [], jpeg=True)["is_generated"]
    assert Decider.from_dict(decider.to_dict()).jpeg_threshold == -0.5


def test_pretraining_keeps_file_bytes_not_pixels(tmp_path, rng):
    """Issue #12 item 2: the closed-form pass decodes on reading; what it reads equals the eager decode."""
    from PIL import Image

    from lida_core.decode import LazyImages, decode_inputs

    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    eager = decode_inputs(paths + [str(tmp_path / "bad.png")])
    lazy = decode_inputs(paths + [str(tmp_path / "bad.png")], lazy=True)
    assert isinstance(lazy.pixels, LazyImages) and len(lazy.pixels) == 4 and len(lazy.errors) == 1
    assert all(np.array_equal(a, b) for a, b in zip(eager.pixels, lazy.pixels, strict=True))
    picked = lazy.pixels.take([3, 1])
    assert np.array_equal(picked[0], eager.pixels[3]) and np.array_equal(picked[1], eager.pixels[1])
    copies = statistical.with_jpeg_copies(picked, seed=2)
    assert np.array_equal(copies[-1], statistical.with_jpeg_copies([eager.pixels[3], eager.pixels[1]], seed=2)[-1])


def test_warm_up_loads_the_compiled_counting_before_any_image():
    """In a fresh process (this one may have counted already): nothing loaded before, loaded after."""
    import subprocess
    import sys

    code = ("from lida_core import srm; before = len(srm._image_counts.signatures); srm.warm_up(); "
            "print(before, len(srm._image_counts.signatures))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["0", "1"]
    assert srm.pixel_counts([(np.full((4, 4, 3), 9, np.uint8), np.array([[0, 0, 4, 4]]))], threads=1).sum() > 0



def test_calibration_copies_decode_each_lazily_read_photograph_once(rng):
    """Read in order, a lazily decoded photograph (pre-training's are) is decoded once for all of its qualities."""
    from collections.abc import Sequence

    from lida_core.perturb import jpeg_copy

    pixels = [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(3)]

    class Counting(Sequence):  # a decode per read, as LazyImages does
        reads = 0

        def __len__(self):
            return len(pixels)

        def __getitem__(self, index):
            Counting.reads += 1
            return pixels[index]

    copies = statistical._QualityCopies(Counting(), (70, 90), "rgb")
    made = [copies[i] for i in range(len(copies))]
    assert Counting.reads == 3 and len(made) == 6
    assert all(np.array_equal(made[2 * i + j], jpeg_copy(pixels[i], q)) for i in range(3) for j, q in enumerate((70, 90)))


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_jpeg_view_is_each_generators_png_at_every_calibrated_quality_and_each_jpeg_as_it_is(rng):
    """Issue #11 item 3: a generator registered from PNGs meets JPEG queries through its JPEG copies, not its PNGs."""
    from lida_core.decode import LazyImages, decode_image
    from lida_core.perturb import jpeg_copy

    model = build_model("srm").eval()
    pixels = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(5)]
    formats = ["PNG", "JPEG", "PNG", "PNG", "JPEG"]
    sources = np.array(["a", "a", "b", "real", "real"])
    raw = [_encoded(p, f) for p, f in zip(pixels, formats, strict=True)]
    images = LazyImages(raw, [f"{i}.{f.lower()}" for i, f in enumerate(formats)], model.fingerprint.jpeg)
    decoded = [decode_image(r, "x", jpeg_space=model.fingerprint.jpeg).pixels for r in raw]
    # Which are JPEG files: from the kept bytes, or from the decoded pixels' type when colour JPEGs are read in YCbCr
    assert statistical.jpeg_files(images) == statistical.jpeg_files(decoded) == [f == "JPEG" for f in formats]
    assert statistical.jpeg_files([np.asarray(p) for p in decoded]) == [False] * 5  # plain pixels: nothing says JPEG
    feats = statistical.descriptors(model, statistical.with_jpeg_copies(images, 0, model.fingerprint.jpeg))
    view = statistical.jpeg_view(model, images, sources, feats)
    per = len(statistical.CALIBRATION_QUALITIES)
    # The JPEG generator image keeps its two fitted rows (itself and its copy); each PNG one becomes `per` copies; real stays out.
    assert view["jpeg_labels"].tolist() == ["a", "a"] + ["a"] * per + ["b"] * per
    assert view["jpeg_images"].tolist() == [1, 1] + [0] * per + [2] * per
    assert np.array_equal(view["jpeg_generated"][:2], feats[[1, 6]])
    for row, (image, quality) in enumerate([(0, q) for q in statistical.CALIBRATION_QUALITIES] + [(2, 80)]):
        at = 2 + row if image == 0 else 2 + per + statistical.CALIBRATION_QUALITIES.index(quality)
        copy = jpeg_copy(decoded[image], quality, model.fingerprint.jpeg)
        np.testing.assert_allclose(view["jpeg_generated"][at], statistical.descriptors(model, [copy])[0])
    # The real images take part in retrieval the same way (the JPEG file's two rows, the PNG's copies), outside the
    # detector's generated side.
    assert view["jpeg_real_images"].tolist() == [4, 4] + [3] * per
    assert np.array_equal(view["jpeg_real"][:2], feats[[4, 9]])
    np.testing.assert_allclose(view["jpeg_real"][2 + statistical.CALIBRATION_QUALITIES.index(90)],
                               statistical.descriptors(model, [jpeg_copy(decoded[3], 90, model.fingerprint.jpeg)])[0])
    # A gallery whose generators are all JPEG files already meets JPEG queries as it is fitted.
    jpeg_only = np.array(["real", "a", "real", "real", "b"])
    assert statistical.jpeg_view(model, images, jpeg_only, feats) == {}
    # fit_gallery hands the view on for the detector, and leaves it out where only retrieval is judged (the gate's folds)
    fitted = statistical.fit_gallery(build_model("srm").eval(), images, sources)
    assert fitted["jpeg_labels"].tolist() == view["jpeg_labels"].tolist()
    assert "jpeg_generated" not in statistical.fit_gallery(build_model("srm").eval(), images, sources, with_jpeg_view=False)


def _view_world(g, dim=16):
    """Wide real rows; generators a and b as tight clusters, each with its JPEG side moved away from its PNG side."""

    def normed(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = normed(g.normal(size=(3, dim)))
    jpeg_centres = normed(centres + 0.6 * normed(g.normal(size=(3, dim))))

    def draw(side, index, n):
        return normed(side[[index] * n] + 0.04 * g.normal(size=(n, dim)))

    return normed(g.normal(size=(400, dim))), centres, jpeg_centres, draw


def test_a_jpeg_query_is_scored_and_named_by_the_jpeg_view_and_unknown_past_its_distance():
    from lida_core.lifecycle import _jpeg_unknown_distance

    g = np.random.default_rng(11)
    real, centres, jpeg_centres, draw = _view_world(g)
    png = np.vstack([draw(centres, 0, 6), draw(centres, 1, 6)])
    labels = ["a"] * 6 + ["b"] * 6
    view = np.vstack([draw(jpeg_centres, 0, 36), draw(jpeg_centres, 1, 36)])  # 6 images x 6 qualities each
    view_labels, owners = np.repeat(["a", "b"], 36), np.repeat(np.arange(12), 6)
    detector = statistical.QuadraticDetector.fit(real, png, labels)
    jpeg_detector = statistical.QuadraticDetector.fit(real, view, view_labels)
    assert jpeg_detector.sources == ["a", "b"]
    distance = _jpeg_unknown_distance(jpeg_detector, view, view_labels, owners, 0.95)
    fresh = np.vstack([draw(jpeg_centres, 0, 200), draw(jpeg_centres, 1, 200)])
    assert np.mean(jpeg_detector.generator_distances(fresh).min(1) <= distance) >= 0.9  # it keeps known JPEGs known
    assert _jpeg_unknown_distance(jpeg_detector, view[[0, 36]], view_labels[[0, 36]], [0, 6], 0.95) is None  # one image each
    threshold = calibrate_real_threshold(detector.scores(real), 0.05)
    jpeg_threshold = calibrate_real_threshold(jpeg_detector.scores(real), 0.05)
    decider = Decider.from_dict(json.loads(json.dumps(Decider(
        np.zeros(16, np.float32), threshold, None, quadratic=detector.to_dict(), jpeg_threshold=jpeg_threshold,
        quadratic_jpeg=jpeg_detector.to_dict(), jpeg_unknown_distance=distance).to_dict())))
    assert decider.jpeg_unknown_distance == distance and decider._jpeg_detector.sources == ["a", "b"]
    queries = draw(jpeg_centres, 0, 20).astype(np.float32)  # JPEGs of generator a
    flags = [True] * 10 + [False] * 10
    scores = decider.scores(queries, flags)
    np.testing.assert_allclose(scores[:10], jpeg_detector.scores(queries[:10]))
    np.testing.assert_allclose(scores[10:], detector.scores(queries[10:]))
    # The index's unknown threshold is set on PNG neighbours: a JPEG of a is less like them than that, as on the
    # devset, where 80% of the detected JPEGs came out unknown; the JPEG view names a instead.
    gallery = png.astype(np.float32)
    decider.unknown_threshold = float((gallery[:6] @ gallery[:6].T).min())  # the least alike of two PNGs of a
    assert (queries @ gallery.T).max() < decider.unknown_threshold
    as_png = decider.decide(queries, gallery, labels, jpeg=[False] * 20)
    assert all(d["predicted_source"] == "unknown" for d in as_png if d["is_generated"])
    as_jpeg = decider.decide(queries, gallery, labels, jpeg=[True] * 20)
    assert all(d["is_generated"] and d["predicted_source"] == "a" for d in as_jpeg), as_jpeg
    # Generated, but far from every generator's JPEG side: unknown.
    other = draw(jpeg_centres, 2, 1)[0].astype(np.float32)
    sims = gallery @ other
    order = np.argsort(-sims)
    said = decider.decide_from_similarities(other, sims[order], [labels[i] for i in order], jpeg=True, real_score=-1e9)
    assert said["is_generated"] and said["predicted_source"] == "unknown"
    # A detected JPEG whose nearest gallery images are all real (the view's real rows can be): the view names it.
    said = decider.decide_from_similarities(queries[0], np.array([0.9, 0.8]), ["real", "real"], jpeg=True, real_score=-1e9)
    assert said["predicted_source"] == "a" and said["topk_sources"] == ["real", "real"], said
    said = decider.decide_from_similarities(queries[0], np.array([0.9, 0.8]), ["real", "real"], jpeg=False, real_score=-1e9)
    assert said["predicted_source"] == "unknown", said  # a PNG without a generator among its neighbours: as before
    # A source registered after the fit is unknown to the JPEG view: the neighbours' vote names it.
    late, query = draw(centres, 2, 4).astype(np.float32)[:3], draw(centres, 2, 1)[0].astype(np.float32)
    sims = np.concatenate([gallery @ query, late @ query])
    later_labels = labels + ["c"] * 3
    order = np.argsort(-sims)
    said = decider.decide_from_similarities(query, sims[order], [later_labels[i] for i in order], jpeg=True, real_score=-1e9)
    assert said["predicted_source"] == "c", said
    # A decider saved before the JPEG view (no such keys) loads and judges JPEGs as before.
    old = decider.to_dict()
    del old["quadratic_jpeg"], old["jpeg_unknown_distance"]
    old["quadratic"].pop("sources")
    loaded = Decider.from_dict(old)
    assert loaded.quadratic_jpeg is None and loaded._quadratic_detector.sources is None
    np.testing.assert_allclose(loaded.scores(queries, flags), detector.scores(queries))


def test_a_jpeg_query_meets_the_gallery_through_its_jpeg_view_in_search_and_in_retrieval():
    """Session 26: a generator image registered as a PNG is met by a JPEG query as its JPEG copies, not as its own file."""
    from lida_core.decide import image_key
    from lida_core.lifecycle import _jpeg_gallery

    basis = np.eye(16)

    def normed(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    g = np.random.default_rng(5)
    png = {"a": basis[0], "b": normed(basis[2] + 0.5 * basis[1])}
    as_jpeg = {"a": normed(basis[2] + 0.3 * basis[0]), "b": normed(basis[1] + 0.3 * basis[3])}
    gallery = normed(np.stack([png[s] + 0.02 * g.normal(size=16) for s in ["a"] * 3 + ["b"] * 3])).astype(np.float32)
    labels = ["a"] * 3 + ["b"] * 3
    keys = [image_key(s, f"img{i}") for i, s in enumerate(labels)]
    # the fit's view: two qualities per image, each row near its source's JPEG side; the first row of each image nearer
    view = normed(np.stack([as_jpeg[s] + w * g.normal(size=16) for s in labels for w in (0.02, 0.2)]))
    owners = np.repeat(np.arange(6), 2)
    record = _jpeg_gallery(view, np.repeat(labels, 2), owners, keys)
    assert record["keys"] == keys and record["sources"] == labels and record["images"] == owners.tolist()
    decider = Decider.from_dict(json.loads(json.dumps(Decider(np.zeros(16, np.float32), 0.0, None, jpeg_gallery=record).to_dict())))
    queries = normed(np.stack([as_jpeg["a"] + 0.02 * g.normal(size=16) for _ in range(4)])).astype(np.float32)
    # As files, a's PNGs are less like a JPEG of a than b's PNGs are: retrieval said b.
    assert all(np.array(labels)[(queries @ gallery.T).argmax(1)] == "b")
    sims = decider.jpeg_similarities(queries, gallery, keys)
    np.testing.assert_allclose(sims, np.maximum(queries @ view[0::2].T, queries @ view[1::2].T), atol=1e-5)  # each image's best row (rows kept to 6 decimals)
    assert all(np.array(labels)[sims.argmax(1)] == "a")
    np.testing.assert_allclose(decider.jpeg_similarities(queries, gallery, None), queries @ gallery.T)  # unnamed rows: as they are
    shuffled = g.permutation(len(view))  # a view's rows need not come image by image (a JPEG file's come first)
    reordered = Decider(np.zeros(16, np.float32), 0.0, None, jpeg_gallery={
        **record, "images": owners[shuffled].tolist(), "embeddings": np.asarray(record["embeddings"])[shuffled].tolist()})
    np.testing.assert_allclose(reordered.jpeg_similarities(queries, gallery, keys), sims, atol=1e-6)
    # Decisions: the top-k a JPEG query is given comes from the view, by exact search and by an index's neighbours alike;
    # a PNG query, or a decider without a view, meets the files as they are.
    exact = decider.decide(queries, gallery, labels, jpeg=[True] * 4, gallery_keys=keys)
    assert all(d["topk_sources"][:3] == ["a"] * 3 for d in exact), exact
    order = [np.argsort(-row, kind="stable") for row in queries @ gallery.T]
    found = [((queries[i] @ gallery.T)[o], [labels[j] for j in o]) for i, o in enumerate(order)]
    searched = decider.decide_neighbours(queries, found, [True] * 4, None, [[keys[j] for j in o] for o in order])
    for e, s in zip(exact, searched, strict=True):
        assert e["topk_sources"] == s["topk_sources"]
        np.testing.assert_allclose(e["topk_similarities"], s["topk_similarities"], rtol=1e-5)
    assert all(d["topk_sources"][0] == "b" for d in decider.decide(queries, gallery, labels, jpeg=[False] * 4, gallery_keys=keys))
    given = decider.similarities(queries, gallery, [True] * 4, keys)  # a caller that has them already (eval) hands them in
    assert decider.decide(queries, gallery, labels, jpeg=[True] * 4, gallery_keys=keys, similarities=given) == exact
    with pytest.raises(ValueError, match="similarities are"):
        decider.decide(queries, gallery, labels, jpeg=[True] * 4, similarities=given[:, :2])
    plain = Decider(np.zeros(16, np.float32), 0.0, None)
    assert all(d["topk_sources"][0] == "b" for d in plain.decide(queries, gallery, labels, jpeg=[True] * 4, gallery_keys=keys))
    # An image registered after the fit is not in the view: a JPEG query meets it as it is, beside the view's images.
    late = normed(as_jpeg["a"] + 0.01 * g.normal(size=16)).astype(np.float32)
    grown, grown_labels, grown_keys = np.vstack([gallery, late]), [*labels, "c"], [*keys, image_key("c", "late")]
    said = decider.decide(queries, grown, grown_labels, jpeg=[True] * 4, gallery_keys=grown_keys)
    assert all(d["topk_sources"][0] == "c" and d["topk_sources"][1:4] == ["a"] * 3 for d in said), said
    # A view that does not hold together is refused when it is first used.
    broken = Decider(np.zeros(16, np.float32), 0.0, None, jpeg_gallery={**record, "images": [0, 7]})
    with pytest.raises(ValueError, match="JPEG gallery view"):
        broken.jpeg_similarities(queries, gallery, keys)
