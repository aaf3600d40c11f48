"""Closed-form fitting for fixed-descriptor profiles (`srm`): a whitened space and a quadratic detector.

With a handful of images per generator, a network trained by gradient descent has little
to learn from; the classical few-shot answer is a linear discriminant with a shrunk
covariance. A profile with `fit == "closed-form"` keeps its stem fixed and fits its head
here, in seconds:

- `fit_head`: centre on the real images, whiten with the pooled within-class covariance
  (real images, and each gallery generator around its own mean) shrunk towards a multiple
  of the identity (Ledoit-Wolf style, fixed weight `HEAD_SHRINK`), then keep the `rank`
  directions along which the reference data vary most. Cosine retrieval in that space is
  a shrinkage-LDA nearest-neighbour rule.
- `QuadraticDetector`: real photographs are spread widely, each generator sits in a tight
  cluster. Real vs generated is the difference of two squared distances on the normalised
  embeddings: to the nearest generator mean under the generators' pooled covariance (shrunk
  by `DETECTOR_SHRINK`), minus to the real mean under the real images' average variance
  (`REAL_SHRINK` = 1: isotropic). The head has already whitened the space by a within-class
  covariance that real images dominate, and a real covariance of its own fitted the
  pre-training collections too closely: on the devset, photographs from collections
  pre-training never saw were then called generated 10-13% of the time at a 5% target,
  against 2-4% isotropic (docs/results.md, session 5). Its threshold is cross-fitted
  (`cross_fitted_scores`): every pre-training photograph is in the published fit, and each
  is scored by a fit that left its fold out. A 30% held-out slice made the threshold depend on
  which photographs it drew (docs/results.md, session 16).
- `calibration_copies`: a JPEG's score under the fit depends on its quality (not
  monotonically), so one JPEG threshold taken over copies spread across qualities is too
  high for some and too low for others. Copies of the pre-training photographs at each
  quality of `CALIBRATION_QUALITIES`, scored cross-fitted like the reference rows but never
  fitted, calibrate one JPEG threshold per quality (docs/results.md, session 20).
- `size_copies`: an image smaller than the view counts fewer pixels, and its score moves with
  its size. Centre crops of the same photographs at each of `SIZE_SIDES`, kept and re-encoded,
  scored like the per-quality copies, calibrate a threshold per side (`decide.Decider.threshold`;
  docs/results.md, session 29).
- `with_jpeg_copies`: scraped images are mostly JPEG, and a JPEG's low bits differ from the
  PNG it came from. Every reference image (real or gallery) therefore also counts as a
  re-encoded copy at a quality drawn from `JPEG_QUALITIES`, so both fits and the real
  threshold cover JPEG inputs. The draw is seeded: a fit is a pure function of its inputs.

Measured on `../shared/devset` (`benchmarks/eval_devset.py`, docs/results.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lida_core.allocator import keep_freed_memory
from lida_core.decide import REAL
from lida_core.decode import LazyImages, YCbCrPixels
from lida_core.embed import described_sums, reads_pixels, tile_sums
from lida_core.model import Embedder
from lida_core.perturb import jpeg_copy

HEAD_SHRINK = 0.5
DETECTOR_SHRINK = 0.8
REAL_SHRINK = 1.0
JPEG_QUALITIES = (70, 95)  # inclusive range of re-encoding qualities
# JPEG qualities with a real threshold of their own, each calibrated on a copy of every (of at most
# MAX_CALIBRATION_IMAGES) pre-training image at that quality (`calibration_copies`)
CALIBRATION_QUALITIES = (70, 75, 80, 85, 90, 95)
MAX_CALIBRATION_IMAGES = 150
# Sides of the square crops of the pre-training images that calibrate a real threshold for images smaller than the
# model's view (`size_copies`, `decide.Decider.threshold`)
SIZE_SIDES = (16, 32, 64, 128)
MAX_REFERENCE = 1000  # real descriptors kept in a model (pre-training images and their JPEG copies)
CALIBRATION_FOLDS = 5  # cross-fitted calibration of the real threshold (`cross_fitted_scores`)


class _MadeOnRead(Sequence):
    """A sequence whose items (`_item(i)`, 0 <= i < len) are made when read; slices and negative indexes as a list's."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._item(index)

    def _item(self, index: int) -> np.ndarray:
        raise NotImplementedError


class _WithCopies(_MadeOnRead):
    """images[0..n) then their JPEG copies, each copy made when it is read: n large photographs never sit in memory twice."""

    def __init__(self, images: Sequence[np.ndarray], qualities: list[int], jpeg_space: str):
        self.images, self.qualities, self.jpeg_space = images, qualities, jpeg_space

    def __len__(self) -> int:
        return 2 * len(self.images)

    def _item(self, index: int) -> np.ndarray:
        n = len(self.images)
        return self.images[index] if index < n else jpeg_copy(self.images[index - n], self.qualities[index - n], self.jpeg_space)


def with_jpeg_copies(images: Sequence[np.ndarray], seed: int = 0, jpeg_space: str = "rgb") -> Sequence[np.ndarray]:
    """The images followed by one re-encoded copy of each (made on reading), at qualities spread over JPEG_QUALITIES.

    Each copy is read back in `jpeg_space`, the model's (`FingerprintSettings.jpeg`).

    Stratified, not drawn independently: n copies take one quality from each of n equal
    slices of the range, in a seeded order. The JPEG threshold is a low quantile of the copies'
    scores, so which qualities an independent draw happened to favour moved it: with independent
    draws and a held-out slice, the devset's real JPEG 90 photographs were called generated 4.9%
    to 9.8% of the time over three pre-training seeds; stratified and cross-fitted, 6.0% to 7.3%
    (docs/results.md, session 16).
    """
    qualities = stratified_qualities(len(images), np.random.default_rng([seed, 7919]))
    return _WithCopies(images, [int(q) for q in qualities], jpeg_space)


def stratified_qualities(n: int, rng: np.random.Generator) -> np.ndarray:
    """n JPEG qualities, one from each of n equal slices of JPEG_QUALITIES, in a shuffled order (`with_jpeg_copies`)."""
    low, high = JPEG_QUALITIES
    strata = np.floor(low + (high + 1 - low) * (np.arange(n) + rng.random(n)) / max(n, 1)).astype(np.int64)
    return rng.permutation(strata)


class _QualityCopies(_MadeOnRead):
    """Each of `images` re-encoded at each quality of `qualities` (image-major), each copy made when it is read.

    The image last read is kept: read in order, a lazily decoded photograph is decoded once, not once per quality.
    """

    def __init__(self, images: Sequence[np.ndarray], qualities: Sequence[int], jpeg_space: str):
        self.images, self.qualities, self.jpeg_space = images, list(qualities), jpeg_space
        self._last: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images) * len(self.qualities)

    def _item(self, index: int) -> np.ndarray:
        image, quality = divmod(index, len(self.qualities))
        if self._last is None or self._last[0] != image:
            self._last = (image, self.images[image])
        return jpeg_copy(self._last[1], self.qualities[quality], self.jpeg_space)


def _calibration_choice(images: Sequence[np.ndarray], seed: int) -> tuple[np.ndarray, Sequence[np.ndarray]]:
    """(indexes, images) of at most MAX_CALIBRATION_IMAGES of `images`: a seeded choice when there are more."""
    chosen = np.arange(len(images))
    if len(chosen) > MAX_CALIBRATION_IMAGES:
        chosen = np.sort(np.random.default_rng([seed, 104729]).choice(len(images), MAX_CALIBRATION_IMAGES, replace=False))
    return chosen, images.take(chosen) if hasattr(images, "take") else [images[int(i)] for i in chosen]


def calibration_copies(model: Embedder, images: Sequence[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors of JPEG copies of (at most MAX_CALIBRATION_IMAGES of) `images` at every CALIBRATION_QUALITIES.

    Returns (descriptors, each row's image index, each row's quality). The images are a seeded
    choice when there are more; every chosen image has one copy at each quality, so each
    quality's threshold is a quantile over the same photographs.
    """
    chosen, picked = _calibration_choice(images, seed)
    feats = descriptors(model, _QualityCopies(picked, CALIBRATION_QUALITIES, model.fingerprint.jpeg))
    per = len(CALIBRATION_QUALITIES)
    return feats, np.repeat(chosen, per), np.tile(np.asarray(CALIBRATION_QUALITIES, dtype=np.int64), len(chosen))


class _SizeCrops(_MadeOnRead):
    """Per image (image-major), per side of `sides`: its centre crop of side x side, then a JPEG copy of that crop at
    the row's quality; each made when it is read, the image last read kept (one decode per image)."""

    def __init__(self, images: Sequence[np.ndarray], sides: Sequence[int], qualities: Sequence[int], jpeg_space: str):
        self.images, self.sides, self.qualities, self.jpeg_space = images, list(sides), list(qualities), jpeg_space
        self._last: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return 2 * len(self.images) * len(self.sides)

    def _item(self, index: int) -> np.ndarray:
        crop_index, is_copy = divmod(index, 2)
        image, side = divmod(crop_index, len(self.sides))
        if self._last is None or self._last[0] != image:
            self._last = (image, self.images[image])
        pixels, side = self._last[1], self.sides[side]
        top, left = max(0, (pixels.shape[0] - side) // 2), max(0, (pixels.shape[1] - side) // 2)
        crop = pixels[top : top + side, left : left + side]  # a YCbCrPixels array's slice stays one
        return jpeg_copy(crop, self.qualities[crop_index], self.jpeg_space) if is_copy else crop


def size_sides(model: Embedder) -> tuple[int, ...]:
    """The sides of `size_copies`' crops for this model: SIZE_SIDES under its view's side, for a crop fit of the whole
    image (a resize fit brings every image to one size, so size calibrates nothing there)."""
    settings = model.fingerprint
    if settings.fit != "crop" or settings.region != "full":
        return ()
    return tuple(s for s in SIZE_SIDES if s < settings.size)


def size_copies(model: Embedder, images: Sequence[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors of centre crops of (at most MAX_CALIBRATION_IMAGES of) `images` at each `size_sides`, each crop as
    it is and as a JPEG copy (qualities stratified over JPEG_QUALITIES, as `with_jpeg_copies` draws them).

    Returns (descriptors, each row's image index, its side, its quality: 0 for a crop kept as it is). An image
    narrower than a side gives what it has. The same seeded choice of images as `calibration_copies`.

    Why: a small image's descriptor counts fewer pixels, and its scores move with that. On the devset, with the
    gallery and the queries cut to 64 x 64, a threshold calibrated on 256-pixel photographs called 43% of the real
    photographs generated (80% at 32 x 32); one calibrated on crops of the pre-training photographs at the query's
    side, 4.4% (docs/results.md, session 29).
    """
    sides = size_sides(model)
    chosen, picked = _calibration_choice(images, seed)
    n = len(chosen) * len(sides)
    qualities = stratified_qualities(n, np.random.default_rng([seed, 15485863]))
    if not n:
        return np.zeros((0, model.backbone.mean.shape[0])), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    feats = descriptors(model, _SizeCrops(picked, sides, qualities.tolist(), model.fingerprint.jpeg))
    crop_image = np.repeat(chosen, len(sides))
    crop_side = np.tile(np.asarray(sides, dtype=np.int64), len(chosen))
    return (feats, np.repeat(crop_image, 2), np.repeat(crop_side, 2),
            np.stack([np.zeros(n, np.int64), qualities], axis=1).reshape(-1))


@torch.no_grad()
def descriptors(model: Embedder, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
    """The fixed stem's output (N x D float64) for decoded images, averaged over the embedder's tiles."""
    if model.stem is None:
        raise ValueError(f"the {model.profile} profile has no fixed stem to fit a closed-form head on")
    keep_freed_memory()  # the stem's large integer temporaries are reused instead of mapped and zeroed per batch
    if reads_pixels(model):  # srm: straight from the pixels
        sums, counts = described_sums(model, images, lambda d: d.double().numpy(), model.backbone.mean.shape[0],
                                      batch_size, dtype=np.float64)
        return sums / np.maximum(counts, 1)[:, None]
    sums, counts = tile_sums(model, images, lambda x: model.stem(x).double().numpy(), model.backbone.mean.shape[0],
                             batch_size, dtype=np.float64)
    return sums / np.maximum(counts, 1)[:, None]


def shrunk_inverse_sqrt(scatter: np.ndarray, shrink: float) -> np.ndarray:
    """C^(-1/2) of C = (1 - shrink) S + shrink (tr S / d) I: a covariance estimate that stays invertible."""
    d = scatter.shape[0]
    level = max(float(np.trace(scatter)) / d, 1e-12)
    c = (1 - shrink) * scatter + shrink * level * np.eye(d)
    w, v = np.linalg.eigh(c)
    return (v / np.sqrt(np.maximum(w, 1e-12 * level))) @ v.T


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_head(real: np.ndarray, generated: np.ndarray, labels: Sequence[str], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, weight D x rank) of the whitened space: centred on `real`, whitened within classes, top `rank` directions."""
    if len(real) < 2:
        raise ValueError("the closed-form fit needs at least two real images")
    labels = np.asarray(labels)
    mean = real.mean(0)
    within = [real - mean] + [generated[labels == s] - generated[labels == s].mean(0) for s in sorted(set(labels.tolist()))]
    residuals = np.vstack(within)
    centred = np.vstack([real, generated]) - mean
    if len(residuals) < residuals.shape[1]:  # fewer rows than values (the split srm descriptor): in the rows' span
        return mean, _fit_head_in_span(residuals, centred, rank)
    whiten = shrunk_inverse_sqrt(residuals.T @ residuals / len(residuals), HEAD_SHRINK)
    spread = centred @ whiten
    w, v = np.linalg.eigh(spread.T @ spread)
    top = v[:, np.argsort(-w, kind="stable")[:rank]]
    return mean, whiten @ top


def _fit_head_in_span(residuals: np.ndarray, centred: np.ndarray, rank: int) -> np.ndarray:
    """`fit_head`'s weight without a D x D eigendecomposition, for N < D rows (the same map, up to each direction's sign).

    The within-class scatter S = V diag(s2) V' has rank at most N, so its shrunk inverse square
    root is V diag(a) V' + b (I - V V'), with a = ((1 - shrink) s2 + shrink l)^(-1/2) and
    b = (shrink l)^(-1/2), l = tr S / D; and the top directions of the whitened rows are the
    top right singular vectors of those rows. Both cost N^2 D instead of D^3: with the split
    descriptor's 2625 values, seconds per fit become a fraction of one.
    """
    d = residuals.shape[1]
    s2, vt = _row_span(residuals / np.sqrt(len(residuals)))
    level = max(float(s2.sum()) / d, 1e-12)
    a = 1.0 / np.sqrt(np.maximum((1 - HEAD_SHRINK) * s2 + HEAD_SHRINK * level, 1e-12 * level))
    b = 1.0 / np.sqrt(HEAD_SHRINK * level)

    def whiten(x: np.ndarray) -> np.ndarray:  # x @ C^(-1/2), C^(-1/2) symmetric
        along = x @ vt.T
        return (along * a) @ vt + b * (x - along @ vt)

    w, top = _row_span(whiten(centred))
    top = top[np.argsort(-w, kind="stable")[:rank]]
    if len(top) < rank:  # fewer rows than the head's width: complete with seeded directions of no spread, as eigh would
        extra = np.random.default_rng(0).normal(size=(rank - len(top), d))
        q, _ = np.linalg.qr(np.vstack([top, extra]).T)
        top = np.vstack([top, q[:, len(top) : rank].T])
    return whiten(top).T


def _row_span(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(squared singular values, right singular vectors as rows) of N x D x, N < D, through the N x N Gram matrix.

    LAPACK's SVD of a 400 x 2625 matrix took 3.5 s here, the Gram matrix's eigh 0.3 s; directions
    with no spread (squared singular value under 1e-12 of the largest) are left out.
    """
    w, u = np.linalg.eigh(x @ x.T)
    keep = w > 1e-12 * max(float(w.max(initial=0.0)), 1e-300)
    w, u = w[keep], u[:, keep]
    return w, (u / np.sqrt(w)).T @ x


def set_head(model: Embedder, mean: np.ndarray, weight: np.ndarray, reference: np.ndarray | None = None) -> None:
    head = model.backbone
    head.mean = torch.as_tensor(mean, dtype=torch.float32).clone()
    head.weight = torch.as_tensor(weight, dtype=torch.float32).contiguous().clone()
    if reference is not None:
        head.reference = torch.as_tensor(reference, dtype=torch.float32).contiguous().clone()


def reference_descriptors(model: Embedder) -> np.ndarray:
    return model.backbone.reference.double().numpy()


def keep_calibration(model: Embedder, calibration: np.ndarray) -> None:
    """Store the per-quality calibration copies' descriptors (`calibration_copies`) in the model's head."""
    model.backbone.calibration = torch.as_tensor(calibration, dtype=torch.float32).contiguous().clone()


def calibration_descriptors(model: Embedder) -> np.ndarray:
    """The per-quality calibration copies' descriptors the model keeps (none for a model saved before they existed)."""
    return model.backbone.calibration.double().numpy()


def embeddings_from_descriptors(model: Embedder, feats: np.ndarray) -> np.ndarray:
    """What `embed.embed` returns for these descriptors (single-tile images): normalised head outputs."""
    head = model.backbone
    return project(feats, head.mean.double().numpy(), head.weight.double().numpy())


def project(feats: np.ndarray, mean: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Descriptors through a fitted head (`fit_head`'s mean and weight): normalised float32 embeddings."""
    return _normalise((feats - mean) @ weight).astype(np.float32)


def fit_pretrain(model: Embedder, real_images: Sequence[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pre-training for a closed-form profile: keep the real descriptors, fit the head on them alone.

    Returns the kept descriptors and, for each, its row in images-then-copies order (row i < n
    is image i, row n + i its JPEG copy): at most MAX_REFERENCE rows are kept.
    """
    feats = descriptors(model, with_jpeg_copies(real_images, seed, model.fingerprint.jpeg))
    rows = np.arange(len(feats))
    if len(feats) > MAX_REFERENCE:
        rows = np.sort(np.random.default_rng(seed).choice(len(feats), MAX_REFERENCE, replace=False))
        feats = feats[rows]
    mean, weight = fit_head(feats, feats[:0], [], model.embedding_dim)
    set_head(model, mean, weight, feats)
    keep_calibration(model, feats[:0])  # `calibration_copies` are made by the caller, which knows their folds
    return feats, rows


def cross_fitted_scores(reference: np.ndarray, folds: Sequence[int], gallery_real: np.ndarray, generated: np.ndarray,
                        labels: Sequence[str], rank: int, extra: np.ndarray | None = None,
                        extra_folds: Sequence[int] | None = None,
                        jpeg_view: tuple[np.ndarray, Sequence[str]] | None = None) -> tuple[np.ndarray, ...]:
    """Each reference row's detection score under a head and a detector fitted without its fold; and each extra row's.

    `reference`: the pre-training descriptors the model keeps, each with its fold (an image
    and its JPEG copy share one); `gallery_real`, `generated` and `labels`: the rest of the
    fit, in every fold's. `extra` (with `extra_folds`): rows scored but never fitted (the
    per-quality calibration copies), each by the fit without its image's fold. The scores are
    exchangeable with a new real image's under the full fit, so a conformal quantile of them
    calibrates its threshold while every photograph stays in the fit (`lida_core.lifecycle`).

    With `jpeg_view` (the generated side as JPEG queries meet it, and its labels; `fit_gallery`),
    the same rows are also scored by that view's detector under each fold's head, and four
    arrays come back: the reference and extra rows' scores, then theirs under the JPEG view.
    """
    folds = np.asarray(folds)
    if len(folds) != len(reference) or len(np.unique(folds)) < 2:
        raise ValueError(f"cross-fitting needs a fold for each of the {len(reference)} reference rows and at least two folds")
    extra = np.zeros((0, reference.shape[1])) if extra is None else extra
    extra_folds = np.zeros(0, np.int64) if extra_folds is None else np.asarray(extra_folds)
    if len(extra_folds) != len(extra) or not np.isin(extra_folds, folds).all():
        raise ValueError(f"each of the {len(extra)} calibration rows needs one of the reference rows' folds")
    labels = np.asarray(labels)
    scores, extra_scores = np.empty(len(reference)), np.empty(len(extra))
    jpeg_scores, jpeg_extra_scores = np.empty(len(reference)), np.empty(len(extra))
    for fold in np.unique(folds):
        held = folds == fold
        real = np.vstack([reference[~held], gallery_real])
        mean, weight = fit_head(real, generated, labels, rank)
        detectors = [(QuadraticDetector.fit(project(real, mean, weight), project(generated, mean, weight), labels),
                      scores, extra_scores)]
        if jpeg_view is not None:
            detectors.append((QuadraticDetector.fit(project(real, mean, weight), project(jpeg_view[0], mean, weight), jpeg_view[1]),
                              jpeg_scores, jpeg_extra_scores))
        for detector, out, extra_out in detectors:
            out[held] = detector.scores(project(reference[held], mean, weight))
            if (extra_folds == fold).any():
                extra_out[extra_folds == fold] = detector.scores(project(extra[extra_folds == fold], mean, weight))
    return (scores, extra_scores) if jpeg_view is None else (scores, extra_scores, jpeg_scores, jpeg_extra_scores)


def fit_gallery(model: Embedder, images: Sequence[np.ndarray], sources: Sequence[str], seed: int = 0,
                with_jpeg_view: bool = True) -> dict:
    """Adaptation for a closed-form profile: refit the head on the kept real descriptors and the gallery.

    Returns the fitted descriptors by role, for the detector: {"real": ..., "generated": ...,
    "labels": ...}, and the generated side as a JPEG query meets it (`jpeg_view`):
    {"jpeg_generated": ..., "jpeg_labels": ..., "jpeg_images": each row's gallery image}, unless `with_jpeg_view`
    is False (or every generated image is a JPEG file).
    """
    sources = np.asarray([str(s) for s in sources])
    copies = with_jpeg_copies(images, seed, model.fingerprint.jpeg)
    feats = descriptors(model, copies)
    labels = np.concatenate([sources, sources])
    real = np.vstack([reference_descriptors(model), feats[labels == REAL]])
    generated, gen_labels = feats[labels != REAL], labels[labels != REAL]
    mean, weight = fit_head(real, generated, gen_labels, model.embedding_dim)
    set_head(model, mean, weight)
    fitted = {"real": real, "generated": generated, "labels": gen_labels}
    return {**fitted, **jpeg_view(model, images, sources, feats)} if with_jpeg_view else fitted


def jpeg_files(images: Sequence[np.ndarray]) -> list[bool]:
    """Which images came from JPEG files, without decoding them again: a `decode.LazyImages` knows its files' bytes
    (a JPEG starts with its SOI marker); decoded pixels say so by their type when the model reads colour JPEGs in
    their YCbCr (`decode.YCbCrPixels`, the srm profile's `FingerprintSettings.jpeg == "ycc"`)."""
    if isinstance(images, LazyImages):
        return [bytes(raw[:2]) == b"\xff\xd8" for raw in images.raw]
    return [isinstance(pixels, YCbCrPixels) for pixels in images]


def jpeg_view(model: Embedder, images: Sequence[np.ndarray], sources: np.ndarray, feats: np.ndarray) -> dict:
    """The gallery as a JPEG query meets it: each image that is a JPEG file as it is (with its copy, the rows the fit
    already has), each other one (a PNG) as copies at every CALIBRATION_QUALITIES. The generated images' rows are
    the detector's JPEG side and name their source ("jpeg_generated", "jpeg_labels", "jpeg_images": each row's
    gallery image); the real images' rows ("jpeg_real", "jpeg_real_images") only take part in retrieval. Empty ({})
    when every generated image is a JPEG file: the fit's own generated rows are that view.

    Why: a generator's PNG outputs and its JPEGs differ in exactly the low bits the descriptor reads.
    Registered as PNGs and met as JPEGs, one copy per gallery image among the PNGs left the generator's
    JPEG side too thin: on the devset (PNG gallery, JPEG 90 queries) Rank-1 0.48, AUROC 0.72; with the
    copies at every quality as the JPEG side, 0.61 and 0.77, what a JPEG gallery gives (docs/results.md,
    session 24). The same holds for a real photograph registered as a PNG: met as a file beside the
    generators' JPEG copies, it was never a real JPEG query's nearest image (Rank-1 of the devset's real
    JPEG 90 queries 0.0; docs/results.md, session 27). `feats`: `descriptors` of `with_jpeg_copies(images)`
    (images, then their copies).
    """
    n = len(images)
    jpeg = jpeg_files(images)
    if all(jpeg[i] for i in range(n) if sources[i] != REAL):  # the fit's generated rows are JPEGs already
        return {}
    per = len(CALIBRATION_QUALITIES)
    width = feats.shape[1]

    def side(members: list[int]) -> tuple[np.ndarray, list[int]]:
        rows, owners = [], []
        for i in members:
            if jpeg[i]:
                rows += [feats[i], feats[n + i]]
                owners += [i, i]
        png = [i for i in members if not jpeg[i]]
        if png:
            picked = images.take(png) if hasattr(images, "take") else [images[i] for i in png]
            rows += list(descriptors(model, _QualityCopies(picked, CALIBRATION_QUALITIES, model.fingerprint.jpeg)))
            owners += [i for i in png for _ in range(per)]
        return np.asarray(rows, dtype=np.float64).reshape(-1, width), owners

    generated, owners = side([i for i in range(n) if sources[i] != REAL])
    real, real_owners = side([i for i in range(n) if sources[i] == REAL])
    return {"jpeg_generated": generated, "jpeg_labels": np.asarray([sources[i] for i in owners], dtype=str),
            "jpeg_images": np.asarray(owners, dtype=np.int64),
            "jpeg_real": real, "jpeg_real_images": np.asarray(real_owners, dtype=np.int64)}


class QuadraticDetector:
    """score(e) = min_g |(e - m_g) W_g|^2 - |(e - m_r) W_r|^2 on normalised embeddings: higher looks more real."""

    def __init__(self, real_mean, real_whitener, generator_means, generator_whitener, sources=None):
        self.real_mean = np.asarray(real_mean, dtype=np.float64)
        self.real_whitener = np.asarray(real_whitener, dtype=np.float64)
        self.generator_means = np.asarray(generator_means, dtype=np.float64).reshape(-1, len(self.real_mean))
        self.generator_whitener = np.asarray(generator_whitener, dtype=np.float64)
        self.sources = None if sources is None else [str(s) for s in sources]  # each mean's generator (kept since session 24)

    @classmethod
    def fit(cls, real: np.ndarray, generated: np.ndarray, labels: Sequence[str]) -> QuadraticDetector:
        """From normalised embeddings of real images and of labelled generated ones (possibly none)."""
        labels = np.asarray(labels)
        real_mean = real.mean(0)
        centred = real - real_mean
        real_whitener = shrunk_inverse_sqrt(centred.T @ centred / len(centred), REAL_SHRINK)
        sources = sorted(set(labels.tolist()))
        means = np.stack([generated[labels == s].mean(0) for s in sources]) if sources else np.zeros((0, real.shape[1]))
        if sources:
            within = np.vstack([generated[labels == s] - m for s, m in zip(sources, means, strict=True)])
            generator_whitener = shrunk_inverse_sqrt(within.T @ within / len(within), DETECTOR_SHRINK)
        else:
            generator_whitener = np.eye(real.shape[1])
        return cls(real_mean, real_whitener, means, generator_whitener, sources)

    def generator_distances(self, embeddings: np.ndarray, means: np.ndarray | None = None) -> np.ndarray:
        """N x G squared distances to each generator's mean (or to each of `means`) under the generators' pooled covariance."""
        e = np.asarray(embeddings, dtype=np.float64)
        means = self.generator_means if means is None else np.asarray(means, dtype=np.float64).reshape(-1, e.shape[1])
        return np.stack([(((e - m) @ self.generator_whitener) ** 2).sum(1) for m in means], axis=1)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        e = np.asarray(embeddings, dtype=np.float64)
        to_real = (((e - self.real_mean) @ self.real_whitener) ** 2).sum(1)
        if not len(self.generator_means):  # no generator yet: how typical of real images it is
            return -to_real
        return self.generator_distances(e).min(1) - to_real

    def to_dict(self) -> dict:
        return {"real_mean": self.real_mean.tolist(), "real_whitener": self.real_whitener.tolist(),
                "generator_means": self.generator_means.tolist(), "generator_whitener": self.generator_whitener.tolist(),
                "sources": self.sources}

    @classmethod
    def from_dict(cls, data: dict) -> QuadraticDetector:
        return cls(data["real_mean"], data["real_whitener"], data["generator_means"], data["generator_whitener"],
                   data.get("sources"))
