"""Low-bit fingerprints: the lowest bit planes of each RGB channel, as a fixed-size image.

Content lives in the high bit planes and generator noise in the low ones, so the
fingerprint keeps only `x & (2**bits - 1)` of the decoded pixels, before any resampling:

- `mode=scale`   the authors' released formula, `(x & 7) * (255 // 7)` for 3 bits;
- `mode=binary`  the paper's binarisation, 255 where any kept bit is set, else 0.

Region and fit bring it to the model's square input size without touching the bits:

- `fit=resize`   the authors' path, reproduced exactly in integers: the scaled bit image of
  the whole picture resized to size x size, by Pillow's BILINEAR (with antialias), or by
  OpenCV's bilinear `cv2.resize` when its shorter side is under 32 px (`AUTHORS_SMALL_SIDE`).
  `region=patch` then scores every `patch` x `patch` tile of the size x size grid by the
  gradient complexity of its *low bits* (sum of absolute horizontal, vertical and both
  diagonal differences over the tile, all channels), keeps `max` (the first highest), `min`
  (the first lowest) or `random` (Python's `random.Random(seed).choice` over the tiles, the
  authors' `random.choice` right after `random.seed(seed)`), and enlarges it back to size x size
  with `cv2.resize` (`authors_patch`);
- `fit=crop`     no resampling at all: a centre crop, tiling (wrapping) any side shorter than
  the output, which leaves every kept bit untouched. `region=patch` here takes the tile on the
  original image, scored by the complexity of its *content*, and `random` is a numpy pick
  seeded by `seed` and the grid size. Either way a fingerprint is a pure function of pixels
  and settings.

Two paths give bit-identical uint8 results, in integer arithmetic only, so they cannot drift
apart on different hardware: `fingerprint_bits` (numpy, one image: the reference) and the
production split, `prepare_low_bits` in CPU workers then `accel.finish` on a batch on the device
(`fit_to_size` and `authors_patch` take numpy arrays and torch tensors alike).

Over 400 lines on purpose: Pillow's and OpenCV's resamplers are restated here step by step,
because a fingerprint that differs from the authors' in one low bit is another fingerprint.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from lida_core.decode import JPEG_SPACES, DecodeError, YCbCrPixels, decode_image

__all__ = [
    "FingerprintSettings",
    "DecodeError",
    "decode_image",
    "fingerprint_bits",
    "fit_to_size",
    "low_bits",
    "authors_patch",
    "cv2_bilinear_resize",
    "patch_box",
    "pillow_bilinear_resize",
    "to_model_input",
]

_MODES = ("scale", "binary")
_REGIONS = ("full", "patch")
_SELECTS = ("max", "min", "random")
_FITS = ("resize", "crop")


@dataclass(frozen=True)
class FingerprintSettings:
    """How a fingerprint is made; `str(settings)` is stored in every table row and model."""

    bits: int = 3
    mode: str = "scale"
    region: str = "full"
    patch: int = 32
    patch_select: str = "max"
    seed: int = 0
    fit: str = "resize"
    size: int = 256
    # How a colour JPEG's pixels are read: "rgb" (decoded to RGB, as every file is), or "ycc"
    # (its decoder's YCbCr before the rounding RGB conversion; `lida_core.decode`). Written in
    # `str()` only when "ycc", so every settings string made before reads back as "rgb".
    jpeg: str = "rgb"

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 7:
            raise ValueError(f"fingerprint bits must be 1..7, got {self.bits}")
        if self.mode not in _MODES:
            raise ValueError(f"fingerprint mode must be one of {_MODES}, got {self.mode!r}")
        if self.region not in _REGIONS:
            raise ValueError(f"fingerprint region must be one of {_REGIONS}, got {self.region!r}")
        if self.patch_select not in _SELECTS:
            raise ValueError(f"patch_select must be one of {_SELECTS}, got {self.patch_select!r}")
        if self.fit not in _FITS:
            raise ValueError(f"fingerprint fit must be one of {_FITS}, got {self.fit!r}")
        if self.patch < 2 or self.size < 8:
            raise ValueError("patch must be >= 2 and size >= 8")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.jpeg not in JPEG_SPACES:
            raise ValueError(f"fingerprint jpeg space must be one of {JPEG_SPACES}, got {self.jpeg!r}")

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    @property
    def scale_factor(self) -> int:
        return 255 // self.mask

    def with_size(self, size: int) -> FingerprintSettings:
        return replace(self, size=size)

    def __str__(self) -> str:
        region = "full"
        if self.region == "patch":
            region = f"patch{self.patch}{self.patch_select}"
            if self.patch_select == "random":
                region += f"s{self.seed}"
        return f"b{self.bits}-{self.mode}-{region}-{self.fit}{self.size}" + ("-jpegycc" if self.jpeg == "ycc" else "")

    @classmethod
    def parse(cls, text: str) -> FingerprintSettings:
        """Inverse of `str()`: 'b3-scale-full-resize256', 'b3-binary-patch32randoms7-crop128', 'b3-scale-full-crop256-jpegycc'."""
        match = re.fullmatch(
            r"b(\d)-(scale|binary)-(full|patch(\d+)(max|min|random)(?:s(\d+))?)-(resize|crop)(\d+)(-jpegycc)?",
            text.strip(),
        )
        if not match:
            raise ValueError(f"not a fingerprint settings string: {text!r}")
        bits, mode, region, patch, select, seed, fit, size, ycc = match.groups()
        kwargs = dict(bits=int(bits), mode=mode, fit=fit, size=int(size), jpeg="ycc" if ycc else "rgb")
        if region != "full":
            kwargs.update(region="patch", patch=int(patch), patch_select=select, seed=int(seed or 0))
        return cls(**kwargs)


# ---------------------------------------------------------------- numpy (reference) path


def low_bits(pixels: np.ndarray, settings: FingerprintSettings) -> np.ndarray:
    """The scaled or binarised low bit planes, uint8, same shape as `pixels`."""
    kept = np.bitwise_and(pixels, settings.mask)
    if settings.mode == "binary":
        return np.where(kept != 0, np.uint8(255), np.uint8(0))
    return (kept * settings.scale_factor).astype(np.uint8)


def tile_complexity(pixels, patch: int):
    """Gradient complexity of each tile of the non-overlapping `patch` grid (rows x cols, int64).

    Works on a numpy array or a torch tensor (H x W x C, or N x H x W x C); only
    differences between two pixels of the same tile count.
    """
    height, width = pixels.shape[-3], pixels.shape[-2]
    rows, cols = height // patch, width // patch
    lead = pixels.shape[:-3]
    x = pixels[..., : rows * patch, : cols * patch, :]
    x = x.astype(np.int64) if isinstance(x, np.ndarray) else x.to(dtype=_torch().int64)
    t = x.reshape(*lead, rows, patch, cols, patch, pixels.shape[-1])
    # tile axes: rows=-5, y=-4, cols=-3, x=-2, channel=-1
    diffs = (
        t[..., :, :, :, 1:, :] - t[..., :, :, :, :-1, :],
        t[..., :, 1:, :, :, :] - t[..., :, :-1, :, :, :],
        t[..., :, 1:, :, 1:, :] - t[..., :, :-1, :, :-1, :],
        t[..., :, 1:, :, :-1, :] - t[..., :, :-1, :, 1:, :],
    )
    return sum(abs(d).sum((-4, -2, -1)) for d in diffs)


def random_tile(seed: int, rows: int, cols: int) -> int:
    """The `random` rule: one tile index from the seed and the grid size alone."""
    return int(np.random.default_rng([seed, rows, cols]).integers(rows * cols))


def patch_box(pixels, settings: FingerprintSettings, complexity=None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the region of the original image the fingerprint reads.

    An image smaller than one patch in either direction is read whole. A resize fit reads the
    whole image: its patch is chosen after the resize (`authors_patch`).
    """
    height, width = pixels.shape[0], pixels.shape[1]
    if settings.region == "full" or settings.fit == "resize":
        return 0, 0, height, width
    p = settings.patch
    rows, cols = height // p, width // p
    if rows == 0 or cols == 0:
        return 0, 0, height, width
    if settings.patch_select == "random":
        index = random_tile(settings.seed, rows, cols)
    else:
        scores = tile_complexity(pixels, p) if complexity is None else complexity
        flat = scores.reshape(-1)
        # argmax/argmin return the first extreme in both numpy and torch: ties are stable.
        index = int(flat.argmax() if settings.patch_select == "max" else flat.argmin())
    return (index // cols) * p, (index % cols) * p, p, p


def crop_indices(length: int, size: int) -> np.ndarray:
    """Centre crop to `size`, or tile (wrap) when `length` is shorter than `size`."""
    if length >= size:
        start = (length - size) // 2
        return np.arange(start, start + size, dtype=np.int64)
    return np.arange(size, dtype=np.int64) % length


_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)


@lru_cache(maxsize=256)
def bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's BILINEAR coefficients for one axis, as (indices, int weights), each out x K.

    Follows Pillow's precompute_coeffs + normalize_coeffs_8bpc step by step in float64, so
    the integer weights are Pillow's own; unused taps point at a valid pixel with weight 0.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    indices = np.zeros((out_size, ksize), dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.int64)
    inv = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = []
        total = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * inv)
            w = 1.0 - t if t < 1.0 else 0.0
            taps.append(w)
            total += w
        for x, w in enumerate(taps):
            k = w / total if total != 0.0 else w
            fixed = int(-0.5 + k * (1 << _PRECISION_BITS)) if k < 0 else int(0.5 + k * (1 << _PRECISION_BITS))
            indices[xx, x] = x + xmin
            weights[xx, x] = fixed
        indices[xx, xmax:] = xmin
    return indices, weights


def _resample_axis(x, in_axis_len: int, out_size: int, axis: int):
    """One Pillow pass along `axis` (-3 rows, -2 columns) of uint8 pixels; numpy or torch."""
    idx, w = bilinear_coefficients(in_axis_len, out_size)
    is_np = isinstance(x, np.ndarray)
    if not is_np:
        torch = _torch()
        idx = torch.from_numpy(idx).to(x.device)
        w = torch.from_numpy(w).to(x.device)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = None
    for k in range(idx.shape[1]):
        column = idx[:, k]
        taken = np.take(x, column, axis=axis) if is_np else x.index_select(x.ndim + axis, column)
        term = taken.astype(np.int64) if is_np else taken.to(_torch().int64)
        term = term * w[:, k].reshape(shape)
        acc = term if acc is None else acc + term
    acc = acc + (1 << (_PRECISION_BITS - 1))
    acc = acc >> _PRECISION_BITS
    if is_np:
        return np.clip(acc, 0, 255).astype(np.uint8)
    return acc.clamp_(0, 255).to(_torch().uint8)


def pillow_bilinear_resize(x, height: int, width: int):
    """Exactly `Image.resize((width, height), Image.BILINEAR)` on uint8 RGB, numpy or torch.

    Pillow resizes horizontally first, then vertically, rounding to uint8 in between, and
    skips an axis whose size does not change; for a very tall image (height > 100 x width)
    being shortened, `Image.resize` goes vertically first. So do we.
    """
    in_height, in_width = x.shape[-3], x.shape[-2]
    if in_height > in_width * 100 and height < in_height:
        x = _resample_axis(x, in_height, height, axis=-3)
        return _resample_axis(x, in_width, width, axis=-2) if in_width != width else x
    if x.shape[-2] != width:
        x = _resample_axis(x, x.shape[-2], width, axis=-2)
    if x.shape[-3] != height:
        x = _resample_axis(x, x.shape[-3], height, axis=-3)
    return x


AUTHORS_SMALL_SIDE = 32  # the authors resize an image whose shorter side is under this with OpenCV, not Pillow
_CV_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: 11-bit fixed-point weights for 8-bit images


@lru_cache(maxsize=256)
def cv2_bilinear_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps for one axis: (first index, second index, first weight, second weight).

    The source position (dx + 0.5) * in / out - 0.5 in float32, its floor and fraction; the two
    weights (1 - fraction, fraction) rounded to 11 bits separately; both taps clamped to the
    image (the border pixel repeats, with the unclamped weights).
    """
    position = ((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first.astype(np.float32)).astype(np.float32)
    scale = np.float32(_CV_COEF_SCALE)
    w1 = np.rint(fraction * scale).astype(np.int64)
    w0 = np.rint((np.float32(1) - fraction) * scale).astype(np.int64)
    return np.clip(first, 0, in_size - 1), np.clip(first + 1, 0, in_size - 1), w0, w1


def cv2_bilinear_resize(x, height: int, width: int):
    """Exactly `cv2.resize(x, (width, height))` (INTER_LINEAR) on uint8 RGB when enlarging; numpy or torch.

    Rows first in 32-bit integers (pixel x 11-bit weights), then columns as OpenCV's vector
    code does it: each row value shifted right by 4, multiplied by its 11-bit weight keeping
    the high 16 bits, the two summed, then (sum + 2) >> 2. Checked against OpenCV 4.14 and
    5.0 (`tests/test_fingerprint.py`).
    """
    is_np = isinstance(x, np.ndarray)
    i0, i1, a0, a1 = cv2_bilinear_coefficients(x.shape[-2], width)
    j0, j1, b0, b1 = cv2_bilinear_coefficients(x.shape[-3], height)
    if is_np:
        v = x.astype(np.int64)
        rows = np.take(v, i0, axis=-2) * a0[:, None] + np.take(v, i1, axis=-2) * a1[:, None]
        top, bottom = np.take(rows, j0, axis=-3) >> 4, np.take(rows, j1, axis=-3) >> 4
        out = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
        return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
    torch = _torch()

    def t(a):
        return torch.from_numpy(a).to(x.device)

    v = x.to(torch.int64)
    rows = v.index_select(v.ndim - 2, t(i0)) * t(a0)[:, None] + v.index_select(v.ndim - 2, t(i1)) * t(a1)[:, None]
    top = rows.index_select(rows.ndim - 3, t(j0)) >> 4
    bottom = rows.index_select(rows.ndim - 3, t(j1)) >> 4
    out = ((top * t(b0)[:, None, None]) >> 16) + ((bottom * t(b1)[:, None, None]) >> 16)
    return ((out + 2) >> 2).clamp_(0, 255).to(torch.uint8)


def resize_as_authors(region, size: int):
    """The authors' resize of the low-bit image to size x size: OpenCV under 32 px on the shorter side, else Pillow."""
    if min(region.shape[-3], region.shape[-2]) < AUTHORS_SMALL_SIDE:
        return cv2_bilinear_resize(region, size, size)
    return pillow_bilinear_resize(region, size, size)


def authors_tile(seed: int, count: int) -> int:
    """The authors' `random` rule: `random.choice` over the tiles, right after `random.seed(seed)`."""
    return random.Random(seed).choice(range(count))


def authors_patch(resized, settings: FingerprintSettings):
    """The authors' patch mode on the resized low-bit image(s) (S x S x 3, or N x S x S x 3; numpy or torch).

    Every `patch` x `patch` tile of the grid is scored by `tile_complexity`; `max` keeps the
    first highest, `min` the first lowest, `random` the seeded pick; the tile is enlarged back
    to S x S with `cv2_bilinear_resize`.
    """
    size, p = resized.shape[-3], settings.patch
    rows, cols = size // p, resized.shape[-2] // p
    if rows == 0 or cols == 0:
        return resized
    single = resized.ndim == 3
    batch = resized[None] if single else resized
    n = batch.shape[0]
    if settings.patch_select == "random":
        index = [authors_tile(settings.seed, rows * cols)] * n
    else:
        flat = tile_complexity(batch, p).reshape(n, -1)
        # argmax/argmin return the first extreme in both numpy and torch: ties keep the earlier tile.
        index = flat.argmax(1) if settings.patch_select == "max" else flat.argmin(1)
        index = [int(i) for i in index]
    tiles = [batch[k, (i // cols) * p : (i // cols) * p + p, (i % cols) * p : (i % cols) * p + p] for k, i in enumerate(index)]
    stacked = np.stack(tiles) if isinstance(batch, np.ndarray) else _torch().stack(tiles)
    out = cv2_bilinear_resize(stacked, size, resized.shape[-2])
    return out[0] if single else out


def fit_to_size(region, settings: FingerprintSettings):
    """Bring a region (H x W x 3 uint8, numpy or torch) to size x size by the settings' fit rule."""
    size = settings.size
    if settings.fit == "resize":
        resized = resize_as_authors(region, size)
        return authors_patch(resized, settings) if settings.region == "patch" else resized
    if region.shape[-3] >= size and region.shape[-2] >= size:  # a plain centre crop: a view, no gather
        top, left = (region.shape[-3] - size) // 2, (region.shape[-2] - size) // 2
        return region[..., top : top + size, left : left + size, :]
    rows = crop_indices(region.shape[-3], size)
    cols = crop_indices(region.shape[-2], size)
    if isinstance(region, np.ndarray):
        return region[..., rows[:, None], cols[None, :], :]
    torch = _torch()
    region = region.index_select(region.ndim - 3, torch.from_numpy(rows).to(region.device))
    return region.index_select(region.ndim - 2, torch.from_numpy(cols).to(region.device))


def _require_rgb(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 uint8 pixels, got {pixels.dtype} {pixels.shape}")


def fingerprint_bits(pixels: np.ndarray, settings: FingerprintSettings) -> np.ndarray:
    """The fingerprint of one decoded RGB uint8 image: settings.size x settings.size x 3 uint8."""
    _require_rgb(pixels)
    top, left, h, w = patch_box(pixels, settings)
    region = low_bits(pixels[top : top + h, left : left + w], settings)
    return np.ascontiguousarray(fit_to_size(region, settings))


def prepare_low_bits(pixels: np.ndarray, settings: FingerprintSettings) -> np.ndarray:
    """CPU half: the kept low bits (`x & mask`, uint8) of the region the fingerprint reads."""
    _require_rgb(pixels)
    top, left, h, w = patch_box(pixels, settings)
    kept = np.bitwise_and(pixels[top : top + h, left : left + w], settings.mask)
    if settings.fit == "crop":
        kept = fit_to_size(kept, settings)
    return np.ascontiguousarray(kept)



def tile_boxes(height: int, width: int, size: int, tiles: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the views `tile_views` cuts from a height x width image, in its order."""
    rows, cols = max(1, height // size), max(1, width // size)
    if tiles <= 1 or rows * cols == 1:
        return [(0, 0, height, width)]
    ys = np.linspace(0, height - size, rows).round().astype(int)
    xs = np.linspace(0, width - size, cols).round().astype(int)
    grid = [(int(y), int(x)) for y in ys for x in xs]
    centre = np.array([(height - size) / 2, (width - size) / 2])
    grid.sort(key=lambda p: float(np.abs(np.array(p) - centre).sum()))
    return [(y, x, size, size) for y, x in grid[:tiles]]


def tile_views(pixels: np.ndarray, size: int, tiles: int) -> list[np.ndarray]:
    """Up to `tiles` non-overlapping size x size tiles spread over the image (centre first).

    More tiles read more of an image's noise; with tiles=1 this is the fingerprint's own
    centre crop. Tiles only apply to crop-fit settings (a resize fit reads the whole image).
    """
    boxes = tile_boxes(pixels.shape[0], pixels.shape[1], size, tiles)
    if len(boxes) == 1 and boxes[0][2:] == pixels.shape[:2]:
        return [pixels]
    return [np.ascontiguousarray(pixels[y : y + h, x : x + w]) for y, x, h, w in boxes]


def prepare_pixels(pixels: np.ndarray, settings: FingerprintSettings) -> np.ndarray:
    """`prepare_low_bits`' region and fit of the whole values (for a stem that also reads content); YCbCr stays marked."""
    _require_rgb(pixels)
    top, left, h, w = patch_box(pixels, settings)
    view = pixels[top : top + h, left : left + w]
    if settings.fit == "crop":
        view = fit_to_size(view, settings)
    out = np.ascontiguousarray(view)
    return out.view(YCbCrPixels) if isinstance(pixels, YCbCrPixels) else out


def low_bit_boxes(pixels: np.ndarray, settings: FingerprintSettings, size: int, tiles: int,
                  whole: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """For readers of raw pixels (the srm stem): where each tile view's kept low bits lie, nothing copied.

    [(array, K x 4 boxes (top, left, height, width))], view for view in `tile_views` order:
    the low bits of each box are `prepare_low_bits` of that view. A view that is not a plain box
    of the image (a crop padded up to size, a patch) comes prepared, as its own array: its low
    bits alone, or with `whole` its whole values (`prepare_pixels`, for a stem that reads the
    content class of each pixel too).
    """
    _require_rgb(pixels)
    s = settings.size
    boxes, prepared = [], []
    for top, left, h, w in tile_boxes(pixels.shape[0], pixels.shape[1], size, tiles):
        if settings.fit == "crop" and settings.region == "full" and h >= s and w >= s:  # fit_to_size's centre crop
            boxes.append((top + (h - s) // 2, left + (w - s) // 2, s, s))
        else:
            tile = pixels[top : top + h, left : left + w]
            kept = prepare_pixels(tile, settings) if whole else prepare_low_bits(tile, settings)
            prepared.append((kept, np.array([[0, 0, kept.shape[0], kept.shape[1]]])))
    # Never both, so the order is tile_views' order: tiles all have one size, so they are all
    # boxes or all prepared, and a single view is one or the other.
    return ([(pixels, np.array(boxes))] if boxes else []) + prepared


def load_pixels(job: tuple[int, str, str]) -> tuple[int, np.ndarray | str]:
    """A decode worker's job (index, uri, JPEG space) -> (index, the decoded pixels, or the error); no torch."""
    from lida_core.inputs import read_input

    index, uri, jpeg_space = job
    try:
        return index, decode_image(read_input(uri), uri, jpeg_space=jpeg_space).pixels
    except (DecodeError, OSError) as exc:
        return index, str(exc)


def load_tile_bits(job: tuple[int, str, str, int, int]) -> tuple[int, list[np.ndarray] | str]:
    """A decode worker's job (index, uri, settings, input size, tiles) -> (index, kept bits per tile, or the error).

    Light on purpose (numpy and Pillow, no torch), so process pools start fast.
    """
    index, uri, settings_text, size, tiles = job
    settings = FingerprintSettings.parse(settings_text)
    index, pixels = load_pixels((index, uri, settings.jpeg))
    if isinstance(pixels, str):  # the error
        return index, pixels
    return index, [prepare_low_bits(tile, settings) for tile in tile_views(pixels, size, tiles)]


# ---------------------------------------------------------------- torch (batched) path


def _torch():
    import torch  # heavy import kept out of module import time

    return torch


def to_model_input(fingerprints):
    """uint8 N x S x S x 3 fingerprints (tensor or array) -> float32 N x 3 x S x S in [0, 1]."""
    torch = _torch()
    x = torch.as_tensor(fingerprints)
    if x.ndim == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
