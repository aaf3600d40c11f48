"""The SRM co-occurrence descriptor of the kept low bits, computed in compiled loops (numba).

What it computes is `model.SrmStem`'s docstring: for each of 7 integer high-pass kernels the
residual of the low-bit values modulo 2^3, wrapped to [-4, 4), truncated to [-2, 2], and the
histogram over the whole view of the triple of colour channels' residuals at one pixel, normalised
and square-rooted. Models made before session 14 also count two histograms of neighbour pairs
per kernel (`pairs=True`), which carried nothing the triples did not (docs/results.md) and were
most of the counting.

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
  (value, right neighbour, lower neighbour), 125 bins, and split afterwards (the last row and
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

TRUNCATION = 2
WIDTH = 2 * TRUNCATION + 1  # quantised residual values 0..4
PAIR_BINS, TRIPLE_BINS = WIDTH**2, WIDTH**3
PER_KERNEL = 2 * PAIR_BINS + TRIPLE_BINS  # along, across, triple: 175
SPLIT_CLASSES = 3  # content classes of a split descriptor: flat, gentle, textured (`_box_classes`)

U2, U3, U4, U5, U6, U7 = (np.uint8(n) for n in (2, 3, 4, 5, 6, 7))  # typed constants keep the loops in uint8

# The descriptor's layout, in order; `_residuals` states each kernel.
KERNELS = ("d1h", "d1v", "d2h", "d2v", "d3h", "d3v", "kb")


@njit(cache=True, nogil=True, boundscheck=False)
def _quantise(r):
    """A residual modulo 256 (uint8) -> modulo 8, wrapped to [-4, 4), truncated to [-2, 2], shifted to 0..4."""
    m = np.uint8(r + U4) & U7
    return np.uint8((m if m > U2 else U2) if m < U6 else U6) - U2


@njit(cache=True, nogil=True, boundscheck=False)
def _residuals(f, kernel, pitch, o, n):
    """Kernel `kernel` (an index into KERNELS) at flat positions 0..n-1 of f (interleaved pixels, row pitch `pitch`) into o."""
    step = 3 if kernel % 2 == 0 else pitch  # the kernel's direction: the next pixel along a row, or down a column
    if kernel == 0 or kernel == 1:
        f1 = f[step:]
        for x in range(n):
            o[x] = _quantise(np.uint8(f1[x] - f[x]))
    elif kernel == 2 or kernel == 3:
        f1, f2 = f[step:], f[2 * step:]
        for x in range(n):
            o[x] = _quantise(np.uint8(f[x] + f2[x] - f1[x] - f1[x]))
    elif kernel == 4 or kernel == 5:
        f1, f2, f3 = f[step:], f[2 * step:], f[3 * step:]
        for x in range(n):
            o[x] = _quantise(np.uint8(U3 * np.uint8(f1[x] - f2[x]) + f3[x] - f[x]))
    else:  # kb: -1 2 -1 / 2 -4 2 / -1 2 -1
        a, b, d = f, f[pitch:], f[2 * pitch:]
        a1, a2, b1, b2, d1, d2 = a[3:], a[6:], b[3:], b[6:], d[3:], d[6:]
        for x in range(n):
            edges = np.uint8(a1[x] + b[x] + b2[x] + d1[x])
            corners = np.uint8(a[x] + a2[x] + d[x] + d2[x])
            o[x] = _quantise(np.uint8(U2 * edges - corners - U4 * b1[x]))


@njit(cache=True, nogil=True, boundscheck=False)
def _codes(q, pitch, out, n, triple):
    """Histogram codes at flat positions 0..n-1: (value, right, lower) of one channel, or the pixel's channel triple."""
    if triple:
        q1, q2 = q[1:], q[2:]
        for x in range(n):
            out[x] = np.uint8(np.uint8(q[x] * U5 + q1[x]) * U5 + q2[x])
    else:
        q1, qp = q[3:], q[pitch:]
        for x in range(n):
            out[x] = np.uint8(np.uint8(q[x] * U5 + q1[x]) * U5 + qp[x])


@njit(cache=True, nogil=True, boundscheck=False)
def _box_classes(pixels, top, left, height, width, ycc, out):
    """Each pixel's content class in the box (top, left, height, width) into out (row-major, height x width).

    The luma's content (its high 5 bits: Y >> 3 for YCbCr, ((R >> 3) + 2 (G >> 3) + (B >> 3)) // 4
    for RGB), its central differences along both axes summed, the box's edge pixels repeated:
    0 flat (no change), 1 gentle (1-2 levels of 32), 2 textured. The low bits never reach it.
    """
    for i in range(height):
        for j in range(width):
            p = pixels[top + i, left + j]
            if ycc:
                out[i * width + j] = p[0] >> 3
            else:
                out[i * width + j] = ((p[0] >> 3) + 2 * (p[1] >> 3) + (p[2] >> 3)) // 4
    luma = out[: height * width].copy()
    for i in range(height):
        up, down = (i - 1 if i > 0 else 0), (i + 1 if i < height - 1 else height - 1)
        for j in range(width):
            lt, rt = (j - 1 if j > 0 else 0), (j + 1 if j < width - 1 else width - 1)
            g = abs(np.int16(luma[i * width + rt]) - np.int16(luma[i * width + lt])) \
                + abs(np.int16(luma[down * width + j]) - np.int16(luma[up * width + j]))
            out[i * width + j] = 0 if g == 0 else (1 if g <= 2 else 2)


@njit(cache=True, nogil=True, boundscheck=False)
def _image_counts(pixels, boxes, out, scratch, pairs, split, ycc):
    """Every kernel's histograms of each box (top, left, height, width) of H x W x 3 pixels into out's rows.

    With `pairs`, three per kernel (pairs along, pairs across, the colour triple: `PER_KERNEL`
    bins); without, the triple alone (`TRIPLE_BINS`), and the pairs' codes are never made.
    With `split` (triples only), each kernel's triples are counted in three histograms, by the
    content class of the residual's anchor pixel (`_box_classes`; `ycc`: the pixels are YCbCr).

    The boxes' union is the whole image (`pixel_counts` cuts it out), so every residual and code
    is computed in one loop over whole rows.
    """
    height, width = pixels.shape[0], pixels.shape[1]
    pitch = 3 * width
    f = pixels.reshape(height * pitch)
    size = height * pitch
    q, joint_codes, triple_codes = scratch[:size], scratch[size : 2 * size], scratch[2 * size : 3 * size]
    joint = np.zeros(TRIPLE_BINS, np.int64)
    areas = boxes[:, 2] * boxes[:, 3]
    classes = np.zeros(areas.sum() if split else 0, np.uint8)
    if split:
        start = 0
        for b in range(boxes.shape[0]):
            _box_classes(pixels, boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3], ycc, classes[start : start + areas[b]])
            start += areas[b]
    per_kernel = SPLIT_CLASSES * TRIPLE_BINS if split else TRIPLE_BINS
    for k in range(7):
        dy = 1 + k // 2 if k == 1 or k == 3 or k == 5 else (2 if k == 6 else 0)  # the kernel's support past its anchor
        dx = 1 + k // 2 if k == 0 or k == 2 or k == 4 else (2 if k == 6 else 0)
        rows, cols = height - dy, width - dx  # anchors with the whole kernel inside the image
        _residuals(f, k, pitch, q, (rows - 1) * pitch + 3 * cols)
        _codes(q, pitch, triple_codes, (rows - 1) * pitch + 3 * cols - 2, True)
        if pairs:
            _codes(q, pitch, joint_codes, (rows - 2) * pitch + 3 * (cols - 1), False)
            base = k * PER_KERNEL
            triple = base + 2 * PAIR_BINS
        else:
            base = triple = k * per_kernel
        if dy > 0 and dx == 0:  # vertical: its pairs along run down the columns
            along, across = base + PAIR_BINS, base
        else:
            along, across = base, base + PAIR_BINS
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
                        h[along + q[s + 3 * j] * WIDTH + q[s + 3 * j + 3]] += 1
                    s = top * pitch + 3 * (left + wq - 1) + c  # the last column has lower neighbours only
                    for i in range(hq - 1):
                        h[across + q[s + i * pitch] * WIDTH + q[s + i * pitch + pitch]] += 1
                for a in range(WIDTH):
                    for e in range(WIDTH):
                        for d in range(WIDTH):
                            n = joint[(a * WIDTH + e) * WIDTH + d]
                            h[along + a * WIDTH + e] += n
                            h[across + a * WIDTH + d] += n
            if split:
                t = h[triple : triple + SPLIT_CLASSES * TRIPLE_BINS]
                bw = boxes[b, 3]
                for i in range(hq):
                    row = triple_codes[(top + i) * pitch + 3 * left:]
                    c = classes[start + i * bw:]
                    for j in range(wq):
                        t[np.int64(c[j]) * TRIPLE_BINS + row[3 * j]] += 1
                start += areas[b]
            else:
                t = h[triple : triple + TRIPLE_BINS]
                for i in range(hq):
                    row = triple_codes[(top + i) * pitch + 3 * left:]
                    for j in range(wq):
                        t[row[3 * j]] += 1


def pixel_counts(sources: Sequence[tuple[np.ndarray, np.ndarray]], threads: int | None = None,
                 pairs: bool = False, split: bool = False) -> np.ndarray:
    """[(H x W x 3 uint8 pixels, K x 4 boxes (top, left, height, width))] -> one row of counts per box, in order.

    A row holds `descriptor_width(pairs, split)` counts: each kernel's colour triples (875), or with `pairs` its
    neighbour pairs along and across and its triples (1225, the layout before session 14), or with
    `split` its triples by the content class of their pixel (3 x 875; `_box_classes`).

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
    out = np.zeros((total, descriptor_width(pairs, split)), np.int64)

    def run(which: range) -> None:
        # Scratch for the residuals and codes, reused across images. A value the loops read is
        # either written first for this image or one the counts never use.
        scratch = np.zeros(3 * max((checked[i][0].size for i in which), default=0), np.uint8)
        for i in which:
            pixels, boxes, ycc = checked[i]
            if len(boxes):
                _image_counts(pixels, boxes, out[starts[i] : starts[i] + len(boxes)], scratch, pairs, split, ycc)

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
    pixel_counts([(np.zeros((4, 4, 3), np.uint8), np.array([[0, 0, 4, 4]], np.int64))], threads=1)  # split or not: one compiled loop


def srm_counts(views: np.ndarray, threads: int | None = None, pairs: bool = False) -> np.ndarray:
    """N x H x W x 3 uint8 views (only their low 3 bits count) -> N x descriptor_width(pairs) integer counts in the descriptor's layout."""
    views = np.asarray(views)
    if views.ndim != 4 or views.shape[3] != 3 or views.shape[1] < 4 or views.shape[2] < 4:
        raise ValueError(f"the SRM descriptor needs 3-channel views of at least 4x4 pixels, not {tuple(views.shape[1:])}")
    box = np.array([[0, 0, views.shape[1], views.shape[2]]], np.int64)
    return pixel_counts([(view, box) for view in views], threads, pairs)


def descriptor_width(pairs: bool = False, split: bool = False) -> int:
    """Values in a descriptor: 7 x 125 triples, 7 x (25 + 25 + 125) with the neighbour pairs, 7 x 3 x 125 split."""
    return len(KERNELS) * (PER_KERNEL if pairs else SPLIT_CLASSES * TRIPLE_BINS if split else TRIPLE_BINS)


def histogram_slices(pairs: bool = False, split: bool = False) -> list[slice]:
    """The histograms' places in a descriptor, in order: 7 triples, 21 (pairs along, across, triple) with
    pairs, or 21 triples (kernel by kernel, flat, gentle and textured) split."""
    if not pairs:
        n = len(KERNELS) * (SPLIT_CLASSES if split else 1)
        return [slice(k * TRIPLE_BINS, (k + 1) * TRIPLE_BINS) for k in range(n)]
    spans = []
    for k in range(len(KERNELS)):
        base = k * PER_KERNEL
        spans += [slice(base, base + PAIR_BINS), slice(base + PAIR_BINS, base + 2 * PAIR_BINS),
                  slice(base + 2 * PAIR_BINS, base + PER_KERNEL)]
    return spans
