"""The SRM co-occurrence descriptor of the kept low bits, computed in compiled loops (numba).

What it computes is `model.SrmStem`'s docstring: for each of 7 integer high-pass kernels the
residual of the low-bit values modulo 2^3, wrapped to [-4, 4), truncated to [-T, T] (T = 2, or 3
for `srm` models since session 19), and the histogram over the whole view of the triple of colour
channels' residuals at one pixel, normalised and square-rooted. Models made before session 14
also count two histograms of neighbour pairs per kernel (`pairs=True`), which carried nothing
the triples did not (docs/results.md) and were most of the counting.

Why compiled loops: the same descriptor written as whole-array torch operations made a
temporary array per step and one `bincount` per histogram, and it was the whole cost of a
CPU scan (33-40 ms per 512x512 image on one core, 15-20 times the JPEG decode; docs/performance.md).
How the loops are laid out:
- they read decoded pixels as they are (H x W x 3, any values): every residual is an integer
  combination of pixels taken modulo 8, and uint8 arithmetic wraps modulo 256, so the high
  bits never reach it. A scan hands over each image with its tiles as boxes: no `x & 7`, no
  tile copies, no stacking or transposing, and no thread preparing them beside the counting
  (session 12, the srm model alone on 2 cores: 251-272 against 177-210 img/s);
- each kernel's residuals are computed once per image, over the boxes' union, and each box
  counts its own valid positions, which are those of the tile cut out on its own;
- the residuals and the histograms' codes are computed in loops over whole rows of the
  flattened image, each neighbour read through a shifted view, so the compiler vectorises
  them (indexing `f[x + step]` instead was 160 times slower); values past a row's valid width
  are computed and never counted;
- the two neighbour-pair histograms of a channel are counted as one joint histogram of
  (value, right neighbour, lower neighbour), (2T + 1)^3 bins, and split afterwards (the last row and
  column, which have only one of the two neighbours, are counted on their own), so each
  position costs one increment instead of two. Counting is most of the time (about 0.43 ns an
  increment; several sub-histograms or pair codes were no faster, session 12);
- the loops release the GIL, so Beam's worker threads run them in parallel.
The counts are integers, then normalised with the same float32 operations as before: the
descriptor is bit-identical to the torch version it replaced (checked when it was replaced,
and `tests/test_statistical.py` checks it against a plain numpy restatement).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from lida_core.decode import YCbCrPixels

TRUNCATIONS = (2, 3)  # T: residuals truncated to [-T, T], 2T + 1 levels (2: every srm model before session 19)
SPLIT_CLASSES = 3  # content classes of a split descriptor: flat, gentle, textured (`_box_classes`)
QUIET_CLASSES = 2  # the classes a quiet descriptor adds: flat and gentle (`quiet_counts`)
QUIET_TRUNCATION = 2  # ... their triples truncated at 2

U2, U3, U4, U7 = (np.uint8(n) for n in (2, 3, 4, 7))  # typed constants keep the loops in uint8

# The descriptor's layout, in order; `_residuals` states each kernel.
KERNELS = ("d1h", "d1v", "d2h", "d2v", "d3h", "d3v", "kb")


def levels(truncation: int) -> int:
    """Quantised residual values at truncation T: 2T + 1 (0..2T)."""
    if truncation not in TRUNCATIONS:
        allowed = " or ".join(map(str, TRUNCATIONS))
        raise ValueError(f"the SRM descriptor truncates its residuals at {allowed}, not {truncation!r}")
    return 2 * truncation + 1


@njit(cache=True, nogil=True, boundscheck=False)
def _quantise(r, lo, hi):
    """A residual modulo 256 (uint8) -> modulo 8, wrapped to [-4, 4), truncated to [-T, T], shifted to 0..2T.

    lo = 4 - T and hi = min(4 + T, 7) are the truncation's bounds on the value shifted by 4
    (T = 2: 2 and 6; T = 3: 1 and 7, where +3 is already the largest wrapped value).
    """
    m = np.uint8(r + U4) & U7
    return np.uint8(min(max(m, lo), hi) - lo)


@njit(cache=True, nogil=True, boundscheck=False)
def _residuals(f, kernel, pitch, o, n, lo, hi):
    """Kernel `kernel` (an index into KERNELS) at flat positions 0..n-1 of f (interleaved pixels,
    row pitch `pitch`) into o, quantised between lo and hi (`_quantise`)."""
    step = 3 if kernel % 2 == 0 else pitch  # the kernel's direction: the next pixel along a row, or down a column
    if kernel == 0 or kernel == 1:
        f1 = f[step:]
        for x in range(n):
            o[x] = _quantise(np.uint8(f1[x] - f[x]), lo, hi)
    elif kernel == 2 or kernel == 3:
        f1, f2 = f[step:], f[2 * step:]
        for x in range(n):
            o[x] = _quantise(np.uint8(f[x] + f2[x] - f1[x] - f1[x]), lo, hi)
    elif kernel == 4 or kernel == 5:
        f1, f2, f3 = f[step:], f[2 * step:], f[3 * step:]
        for x in range(n):
            o[x] = _quantise(np.uint8(U3 * np.uint8(f1[x] - f2[x]) + f3[x] - f[x]), lo, hi)
    else:  # kb: -1 2 -1 / 2 -4 2 / -1 2 -1
        a, b, d = f, f[pitch:], f[2 * pitch:]
        a1, a2, b1, b2, d1, d2 = a[3:], a[6:], b[3:], b[6:], d[3:], d[6:]
        for x in range(n):
            edges = np.uint8(a1[x] + b[x] + b2[x] + d1[x])
            corners = np.uint8(a[x] + a2[x] + d[x] + d2[x])
            o[x] = _quantise(np.uint8(U2 * edges - corners - U4 * b1[x]), lo, hi)


@njit(cache=True, nogil=True, boundscheck=False)
def _codes(q, pitch, out, n, triple, width):
    """Histogram codes (uint16) at flat positions 0..n-1: (value, right, lower) of one channel, or the pixel's
    channel triple, each quantised value one digit in base `width`."""
    w = np.uint16(width)
    if triple:
        q1, q2 = q[1:], q[2:]
        for x in range(n):
            out[x] = (np.uint16(q[x]) * w + np.uint16(q1[x])) * w + np.uint16(q2[x])
    else:
        q1, qp = q[3:], q[pitch:]
        for x in range(n):
            out[x] = (np.uint16(q[x]) * w + np.uint16(q1[x])) * w + np.uint16(qp[x])


@njit(cache=True, nogil=True, boundscheck=False)
def _box_classes(pixels, top, left, height, width, ycc, out):
    """Each pixel's content class in the box (top, left, height, width) into out (row-major, height x width).

    The luma's content (its high 5 bits: Y >> 3 for YCbCr, ((R >> 3) + 2 (G >> 3) + (B >> 3)) // 4
    for RGB), its central differences along both axes summed, the box's edge pixels repeated:
    0 flat (no change), 1 gentle (1-2 levels of 32), 2 textured. The low bits never reach it.

    Laid out for the compiler (session 28): each row's channels read through shifted views of the
    flat row, and the row's interior (both horizontal neighbours inside the box) in its own loop
    with no per-pixel clamping; its two edge pixels after it. 4-5 times faster than one loop with
    a clamp per pixel, same classes (checked on random boxes from 1x1 and on devset photographs).
    """
    luma = np.empty(height * width, np.int16)
    for i in range(height):
        f = pixels[top + i].reshape(-1)[3 * left : 3 * (left + width)]
        f1, f2 = f[1:], f[2:]
        row = luma[i * width : (i + 1) * width]
        if ycc:
            for j in range(width):
                row[j] = f[3 * j] >> 3
        else:
            for j in range(width):
                row[j] = ((f[3 * j] >> 3) + 2 * (f1[3 * j] >> 3) + (f2[3 * j] >> 3)) // 4
    for i in range(height):
        up = (i - 1 if i > 0 else 0) * width
        down = (i + 1 if i < height - 1 else height - 1) * width
        c, u, d = luma[i * width : (i + 1) * width], luma[up : up + width], luma[down : down + width]
        o = out[i * width : (i + 1) * width]
        if width == 1:
            g = abs(d[0] - u[0])
            o[0] = (g > 0) + (g > 2)
            continue
        right, left_, below, above, inner = c[2:], c[: width - 2], d[1:], u[1:], o[1:]
        for j in range(width - 2):  # pixel j + 1
            g = abs(right[j] - left_[j]) + abs(below[j] - above[j])
            inner[j] = (g > 0) + (g > 2)
        g = abs(c[1] - c[0]) + abs(d[0] - u[0])
        o[0] = (g > 0) + (g > 2)
        last = width - 1
        g = abs(c[last] - c[last - 1]) + abs(d[last] - u[last])
        o[last] = (g > 0) + (g > 2)


@njit(cache=True, nogil=True, boundscheck=False)
def _image_counts(pixels, boxes, out, q, codes, pairs, split, ycc, truncation):
    """Every kernel's histograms of each box (top, left, height, width) of H x W x 3 pixels into out's rows.

    Residuals truncated at `truncation` (W = 2T + 1 levels). With `pairs`, three per kernel
    (pairs along and across, W^2 bins each, and the colour triple, W^3); without, the triple
    alone, and the pairs' codes are never made. `q` (uint8) and `codes` (uint16, twice as
    long) are scratch of at least the pixels' size.
    With `split` (triples only), each kernel's triples are counted in three histograms, by the
    content class of the residual's anchor pixel (`_box_classes`; `ycc`: the pixels are YCbCr).

    The boxes' union is the whole image (`pixel_counts` cuts it out), so every residual and code
    is computed in one loop over whole rows.
    """
    height, width = pixels.shape[0], pixels.shape[1]
    pitch = 3 * width
    f = pixels.reshape(height * pitch)
    size = height * pitch
    joint_codes, triple_codes = codes[:size], codes[size : 2 * size]
    n_levels = 2 * truncation + 1
    pair_bins, triple_bins = n_levels * n_levels, n_levels * n_levels * n_levels
    with_pairs = 2 * pair_bins + triple_bins  # a kernel's bins with its pairs: along, across, triple
    lo, hi = np.uint8(4 - truncation), np.uint8(min(4 + truncation, 7))
    joint = np.zeros(triple_bins, np.int64)
    areas = boxes[:, 2] * boxes[:, 3]
    classes = np.zeros(areas.sum() if split else 0, np.uint8)
    if split:
        start = 0
        for b in range(boxes.shape[0]):
            _box_classes(pixels, boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3], ycc, classes[start : start + areas[b]])
            start += areas[b]
    per_kernel = SPLIT_CLASSES * triple_bins if split else triple_bins
    for k in range(7):
        dy = 1 + k // 2 if k == 1 or k == 3 or k == 5 else (2 if k == 6 else 0)  # the kernel's support past its anchor
        dx = 1 + k // 2 if k == 0 or k == 2 or k == 4 else (2 if k == 6 else 0)
        rows, cols = height - dy, width - dx  # anchors with the whole kernel inside the image
        _residuals(f, k, pitch, q, (rows - 1) * pitch + 3 * cols, lo, hi)
        _codes(q, pitch, triple_codes, (rows - 1) * pitch + 3 * cols - 2, True, n_levels)
        if pairs:
            _codes(q, pitch, joint_codes, (rows - 2) * pitch + 3 * (cols - 1), False, n_levels)
            base = k * with_pairs
            triple = base + 2 * pair_bins
        else:
            base = triple = k * per_kernel
        if dy > 0 and dx == 0:  # vertical: its pairs along run down the columns
            along, across = base + pair_bins, base
        else:
            along, across = base, base + pair_bins
        start = 0
        for b in range(boxes.shape[0]):
            h = out[b]
            top, left = boxes[b, 0], boxes[b, 1]
            hq, wq = boxes[b, 2] - dy, boxes[b, 3] - dx  # the box's valid residuals
            if pairs:
                joint[:] = 0
                for i in range(hq - 1):
                    row = joint_codes[(top + i) * pitch + 3 * left:]
                    for x in range(3 * (wq - 1)):
                        joint[row[x]] += 1
                for c in range(3):
                    s = (top + hq - 1) * pitch + 3 * left + c  # the last row has right neighbours only
                    for j in range(wq - 1):
                        h[along + q[s + 3 * j] * n_levels + q[s + 3 * j + 3]] += 1
                    s = top * pitch + 3 * (left + wq - 1) + c  # the last column has lower neighbours only
                    for i in range(hq - 1):
                        h[across + q[s + i * pitch] * n_levels + q[s + i * pitch + pitch]] += 1
                for a in range(n_levels):
                    for e in range(n_levels):
                        for d in range(n_levels):
                            n = joint[(a * n_levels + e) * n_levels + d]
                            h[along + a * n_levels + e] += n
                            h[across + a * n_levels + d] += n
            if split:
                t = h[triple : triple + SPLIT_CLASSES * triple_bins]
                bw = boxes[b, 3]
                for i in range(hq):
                    row = triple_codes[(top + i) * pitch + 3 * left:]
                    c = classes[start + i * bw:]
                    for j in range(wq):
                        t[np.int64(c[j]) * triple_bins + row[3 * j]] += 1
                start += areas[b]
            else:
                t = h[triple : triple + triple_bins]
                for i in range(hq):
                    row = triple_codes[(top + i) * pitch + 3 * left:]
                    for j in range(wq):
                        t[row[3 * j]] += 1


def pixel_counts(sources: Sequence[tuple[np.ndarray, np.ndarray]], threads: int | None = None,
                 pairs: bool = False, split: bool = False, truncation: int = 2) -> np.ndarray:
    """[(H x W x 3 uint8 pixels, K x 4 boxes (top, left, height, width))] -> one row of counts per box, in order.

    A row holds `descriptor_width(pairs, split, truncation)` counts: each kernel's colour triples (7 x 125 at
    truncation 2, 7 x 343 at 3), or with `pairs` its neighbour pairs along and across and its triples (1225,
    the layout before session 14), or with `split` its triples by the content class of their pixel
    (3 x 875; `_box_classes`).

    Pixels may hold any values: only their low 3 bits are counted (and, with `split`, the high
    bits choose the class; a `decode.YCbCrPixels` array's luma is its first channel). A box must lie inside its image and
    be at least 4 x 4; its counts are those of the box cut out on its own. Sources are shared
    among `threads` threads (None: torch's setting, which Beam workers set to 1).
    """
    if split and pairs:
        raise ValueError("the split descriptor counts the colour triples alone (no neighbour pairs)")
    checked, starts, total = [], [], 0
    for pixels, boxes in sources:
        ycc = isinstance(pixels, YCbCrPixels)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        boxes = np.ascontiguousarray(boxes, dtype=np.int64).reshape(-1, 4)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"the SRM descriptor needs H x W x 3 pixels, not {pixels.shape}")
        top, left, h, w = boxes.T
        if len(boxes) and ((h < 4).any() or (w < 4).any() or (top < 0).any() or (left < 0).any()
                           or (top + h > pixels.shape[0]).any() or (left + w > pixels.shape[1]).any()):
            raise ValueError(f"the SRM descriptor needs boxes of at least 4x4 pixels inside the image, "
                             f"not {boxes.tolist()} in {pixels.shape[:2]}")
        if len(boxes):  # the boxes' union only: the kernel computes every residual of what it is given
            y0, x0 = boxes[:, 0].min(), boxes[:, 1].min()
            y1, x1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
            if (y0, x0, y1, x1) != (0, 0, *pixels.shape[:2]):
                pixels = np.ascontiguousarray(pixels[y0:y1, x0:x1])
                boxes = boxes - np.array([y0, x0, 0, 0])
        checked.append((pixels, boxes, ycc))
        starts.append(total)
        total += len(boxes)
    out = np.zeros((total, descriptor_width(pairs, split, truncation)), np.int64)

    def run(which: range) -> None:
        # Scratch for the residuals and codes, reused across images. A value the loops read is
        # either written first for this image or one the counts never use.
        largest = max((checked[i][0].size for i in which), default=0)
        q, codes = np.zeros(largest, np.uint8), np.zeros(2 * largest, np.uint16)
        for i in which:
            pixels, boxes, ycc = checked[i]
            if len(boxes):
                _image_counts(pixels, boxes, out[starts[i] : starts[i] + len(boxes)], q, codes, pairs, split, ycc, truncation)

    threads = min(len(checked), threads or torch.get_num_threads())
    if threads <= 1:
        run(range(len(checked)))
    else:  # the loops release the GIL: one thread per share of the sources
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, [range(t, len(checked), threads) for t in range(threads)]))
    return out


def warm_up() -> None:
    """Load the compiled loops now (numba's cache: about 0.7 s a process, holding a lock the first callers wait on).

    A scan worker calls it on a thread when it loads the model, so the loading overlaps the
    decoding of its first images instead of stalling every worker's first chunk.
    """
    pixel_counts([(np.zeros((4, 4, 3), np.uint8), np.array([[0, 0, 4, 4]], np.int64))], threads=1)  # any options: one compiled loop


def srm_counts(views: np.ndarray, threads: int | None = None, pairs: bool = False, truncation: int = 2) -> np.ndarray:
    """N x H x W x 3 uint8 views (only their low 3 bits count) -> N x descriptor_width(pairs, truncation=T) integer counts
    in the descriptor's layout."""
    views = np.asarray(views)
    if views.ndim != 4 or views.shape[3] != 3 or views.shape[1] < 4 or views.shape[2] < 4:
        raise ValueError(f"the SRM descriptor needs 3-channel views of at least 4x4 pixels, not {tuple(views.shape[1:])}")
    box = np.array([[0, 0, views.shape[1], views.shape[2]]], np.int64)
    return pixel_counts([(view, box) for view in views], threads, pairs, truncation=truncation)


def descriptor_width(pairs: bool = False, split: bool = False, truncation: int = 2) -> int:
    """Values in a descriptor, with W = 2T + 1 levels: 7 x W^3 triples (875 at T = 2, 2401 at 3),
    7 x (W^2 + W^2 + W^3) with the neighbour pairs, 7 x 3 x W^3 split."""
    return histogram_slices(pairs, split, truncation)[-1].stop


def histogram_slices(pairs: bool = False, split: bool = False, truncation: int = 2) -> list[slice]:
    """The histograms' places in a descriptor, in order: 7 triples, 21 (pairs along, across, triple) with
    pairs, or 21 triples (kernel by kernel, flat, gentle and textured) split."""
    width = levels(truncation)
    pair_bins, triple_bins = width**2, width**3
    if not pairs:
        n = len(KERNELS) * (SPLIT_CLASSES if split else 1)
        return [slice(k * triple_bins, (k + 1) * triple_bins) for k in range(n)]
    spans = []
    for k in range(len(KERNELS)):
        base = k * (2 * pair_bins + triple_bins)
        spans += [slice(base, base + pair_bins), slice(base + pair_bins, base + 2 * pair_bins),
                  slice(base + 2 * pair_bins, base + 2 * pair_bins + triple_bins)]
    return spans


def _fold_codes(truncation: int, to: int) -> np.ndarray:
    """Each triple code at `truncation` -> its code at the lower truncation `to`: each digit clamped, as `_quantise`
    clamps the wrapped residual (a level d of 0..2T is residual d - T; at `to` it is min(max(d - T, -to), to) + to)."""
    w, v = levels(truncation), levels(to)
    digits = np.clip(np.arange(w) - truncation, -to, to) + to
    a, b, c = np.meshgrid(digits, digits, digits, indexing="ij")
    return ((a * v + b) * v + c).reshape(-1)


def quiet_counts(split: np.ndarray, truncation: int = 3) -> np.ndarray:
    """Split triple counts at `truncation` (`pixel_counts(split=True)`: per kernel flat, gentle, textured) -> the quiet
    layout (`quiet_slices`): per kernel its triples over every pixel at `truncation`, then per kernel its flat and its
    gentle triples at QUIET_TRUNCATION. One counting pass gives both: the classes sum to the unsplit histogram, and
    a lower truncation only merges codes, so this equals counting each on its own (tests/test_statistical.py)."""
    bins = levels(truncation) ** 3
    c = np.asarray(split, dtype=np.int64).reshape(len(split), len(KERNELS), SPLIT_CLASSES, bins)
    folded = np.zeros((len(split), len(KERNELS), QUIET_CLASSES, levels(QUIET_TRUNCATION) ** 3), np.int64)
    fold = _fold_codes(truncation, QUIET_TRUNCATION)
    for code in range(bins):  # 343 column additions: a fraction of a millisecond for a batch
        folded[..., fold[code]] += c[:, :, :QUIET_CLASSES, code]
    return np.hstack([c.sum(2).reshape(len(split), -1), folded.reshape(len(split), -1)])


def quiet_slices(truncation: int = 3) -> list[slice]:
    """The histograms' places in a quiet descriptor: 7 triples at `truncation`, then 14 (kernel by kernel, flat and
    gentle) at QUIET_TRUNCATION."""
    whole, quiet = levels(truncation) ** 3, levels(QUIET_TRUNCATION) ** 3
    base = len(KERNELS) * whole
    return ([slice(k * whole, (k + 1) * whole) for k in range(len(KERNELS))]
            + [slice(base + j * quiet, base + (j + 1) * quiet) for j in range(len(KERNELS) * QUIET_CLASSES)])
