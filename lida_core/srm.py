"""The SRM co-occurrence descriptor of the kept low bits, computed in compiled loops (numba).

What it computes is `model.SrmStem`'s docstring: for each of 7 integer high-pass kernels the
residual of the low-bit values modulo 2^3, wrapped to [-4, 4), truncated to [-2, 2], and three
histograms over the whole view (neighbour pairs along the kernel's direction, pairs across it,
the triple of colour channels at one pixel), each normalised and square-rooted.

Why compiled loops: the same descriptor written as whole-array torch operations made a
temporary array per step and one `bincount` per histogram, and it was the whole cost of a
CPU scan (33-40 ms per 512x512 image on one core, 15-20 times the JPEG decode; docs/performance.md).
Here each residual is computed in one pass and counted in a second (each row's codes first,
then a plain counting loop over them):
- the two neighbour-pair histograms of a channel are counted as one joint histogram of
  (value, right neighbour, lower neighbour), 125 bins, and split afterwards (the last row and
  column, which have only one of the two neighbours, are counted on their own), so each
  position costs one increment instead of two;
- each residual, and each histogram's codes, are computed in one loop over whole rows of the
  flattened view, each neighbour read through a shifted view of it, so the compiler
  vectorises the loop without a scalar tail per row (the values past a row's valid width are
  computed and never counted: 1.17x on the whole descriptor, session 11);
- the loops release the GIL, so Beam's worker threads run them in parallel.
The counts are integers, then normalised with the same float32 operations as before: the
descriptor is bit-identical to the torch version it replaced (checked when it was replaced,
and `tests/test_statistical.py` checks it against a plain numpy restatement).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

TRUNCATION = 2
WIDTH = 2 * TRUNCATION + 1  # quantised residual values 0..4
PAIR_BINS, TRIPLE_BINS = WIDTH**2, WIDTH**3
PER_KERNEL = 2 * PAIR_BINS + TRIPLE_BINS  # along, across, triple: 175

U2, U3, U4, U5, U6, U7 = (np.uint8(n) for n in (2, 3, 4, 5, 6, 7))  # typed constants keep the loops in uint8

# The descriptor's layout, in order; `_residuals` states each kernel.
KERNELS = ("d1h", "d1v", "d2h", "d2v", "d3h", "d3v", "kb")


@njit(cache=True, nogil=True, boundscheck=False)
def _quantise(r):
    """A residual modulo 256 (uint8) -> modulo 8, wrapped to [-4, 4), truncated to [-2, 2], shifted to 0..4."""
    m = np.uint8(r + U4) & U7
    return np.uint8((m if m > U2 else U2) if m < U6 else U6) - U2


@njit(cache=True, nogil=True, boundscheck=False)
def _count(q, hq, wq, h, along, across, triple, codes):
    """Pairs along the last axis, pairs along the middle axis and channel triples of q[:, :hq, :wq] into h."""
    height, width = q.shape[1], q.shape[2]
    size = height * width
    joint = np.zeros(TRIPLE_BINS, np.int64)
    # The codes first, in one vectorised loop over whole rows, then a plain counting loop over the
    # valid columns (counting straight from q was twice as slow); columns past wq - 2 are not counted.
    n = (hq - 1) * width
    for c in range(3):
        f0 = q[c].reshape(size)
        f1 = f0[1:]
        fw = f0[width:]
        for x in range(n):
            codes[x] = np.uint8(np.uint8(f0[x] * U5 + f1[x]) * U5 + fw[x])
        for i in range(hq - 1):
            row = codes[i * width:]
            for j in range(wq - 1):
                joint[row[j]] += 1
        for j in range(wq - 1):  # the last row has right neighbours only
            h[along + q[c, hq - 1, j] * WIDTH + q[c, hq - 1, j + 1]] += 1
        for i in range(hq - 1):  # the last column has lower neighbours only
            h[across + q[c, i, wq - 1] * WIDTH + q[c, i + 1, wq - 1]] += 1
    for a in range(WIDTH):
        for b in range(WIDTH):
            for d in range(WIDTH):
                k = joint[(a * WIDTH + b) * WIDTH + d]
                h[along + a * WIDTH + b] += k
                h[across + a * WIDTH + d] += k
    r, g, b = q[0].reshape(size), q[1].reshape(size), q[2].reshape(size)
    n = hq * width
    for x in range(n):
        codes[x] = np.uint8(np.uint8(r[x] * U5 + g[x]) * U5 + b[x])
    for i in range(hq):
        row = codes[i * width:]
        for j in range(wq):
            h[triple + row[j]] += 1


@njit(cache=True, nogil=True, boundscheck=False)
def _residuals(v, kernel, q):
    """Kernel `kernel` (an index into KERNELS) on v (3 x H x W, valid positions) -> quantised residuals in q; their shape."""
    _, height, width = v.shape
    hq, wq = height, width
    if kernel == 0 or kernel == 2 or kernel == 4:  # horizontal: d1h, d2h, d3h
        wq = width - 1 - kernel // 2
    elif kernel == 6:  # kb
        hq, wq = height - 2, width - 2
    else:  # vertical: d1v, d2v, d3v
        hq = height - 1 - kernel // 2
    size, w = height * width, width
    step = 1 if kernel % 2 == 0 else w  # the kernel's direction in the flattened view: along a row, or down a column
    n = (hq - 1) * w + wq  # through the last valid position, over whole rows
    for c in range(3):
        # Whole rows of the flattened view in one loop (no scalar tail per row); each neighbour is a
        # shifted view, so every index is a plain non-negative loop counter. Positions past wq
        # in a row get values that are never counted. In uint8, which wraps modulo 256 and so
        # keeps every residual modulo 8 (32 values per vector instead of 8).
        f = v[c].reshape(size)
        o = q[c].reshape(size)
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
        else:
            a, b, d = f, f[w:], f[2 * w:]
            a1, a2, b1, b2, d1, d2 = a[1:], a[2:], b[1:], b[2:], d[1:], d[2:]
            for x in range(n):
                edges = np.uint8(a1[x] + b[x] + b2[x] + d1[x])
                corners = np.uint8(a[x] + a2[x] + d[x] + d2[x])
                o[x] = _quantise(np.uint8(U2 * edges - corners - U4 * b1[x]))
    return hq, wq


@njit(cache=True, nogil=True, boundscheck=False)
def _view_counts(v, q, h):
    """Every kernel's three histograms of one view into h (1225 counts)."""
    codes = np.empty(v.shape[1] * v.shape[2], np.uint8)
    for k in range(7):
        hq, wq = _residuals(v, k, q)
        base = k * PER_KERNEL
        if k == 1 or k == 3 or k == 5:  # vertical: its pairs along run down the columns
            _count(q, hq, wq, h, base + PAIR_BINS, base, base + 2 * PAIR_BINS, codes)
        else:
            _count(q, hq, wq, h, base, base + PAIR_BINS, base + 2 * PAIR_BINS, codes)


def srm_counts(views: np.ndarray, threads: int | None = None) -> np.ndarray:
    """N x 3 x H x W low-bit values (uint8, 0..7) -> N x 1225 integer counts in the descriptor's layout.

    Views are shared among `threads` threads (None: torch's setting, which Beam workers set to 1).
    """
    views = np.ascontiguousarray(views, dtype=np.uint8)
    n, channels, height, width = views.shape
    if channels != 3 or height < 4 or width < 4:
        raise ValueError(f"the SRM descriptor needs 3-channel views of at least 4x4 pixels, not {tuple(views.shape[1:])}")
    out = np.zeros((n, len(KERNELS) * PER_KERNEL), np.int64)

    def run(rows: range) -> None:
        q = np.zeros((3, height, width), np.uint8)  # every value the loops read is written first or zero
        for b in rows:
            _view_counts(views[b], q, out[b])

    threads = min(n, threads or torch.get_num_threads())
    if threads <= 1:
        run(range(n))
    else:  # the loops release the GIL: one thread per share of the views
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, [range(t, n, threads) for t in range(threads)]))
    return out


def histogram_slices() -> list[slice]:
    """The 21 histograms' places in a descriptor, in order."""
    spans = []
    for k in range(len(KERNELS)):
        base = k * PER_KERNEL
        spans += [slice(base, base + PAIR_BINS), slice(base + PAIR_BINS, base + 2 * PAIR_BINS),
                  slice(base + 2 * PAIR_BINS, base + PER_KERNEL)]
    return spans
