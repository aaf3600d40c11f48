"""Is a generated image "less surprising" than a photograph? A coding-cost test on `../shared/devset`.

ZED (Cozzolino et al., ECCV 2024) detects generated images with no generated data at all: a
lossless coder is trained on real photographs only, and an image whose coding cost falls below
what the coder itself expects (its entropy) is called generated. This lab measures the idea
with a classical coder in place of ZED's deep one, so it says whether the cue is there at this
coder's strength, not whether ZED works:

- each pixel of each channel is predicted from its causal neighbours by LOCO-I's median
  predictor, and its residual (clipped to +-24) is coded with a histogram per context;
- a context is the channel and the log2 of the neighbours' local activity (12 bins);
- the histograms are counted on photographs only (`pretrain/real`; for `jpeg90`, on their
  copies re-encoded at quality 90 by Pillow, as the devset's JPEGs were made).

Two statistics per image, each against the labelled part's real photographs:
- `gap`: mean coding cost minus mean expected cost, in bits per value (lower: more predictable
  than a photograph should be);
- `typicality`: the Mahalanobis distance of the per-context gaps (12 values plus the mean),
  with the mean and covariance of 35 pre-training photographs the coder was not counted on,
  and the share of each source above those photographs' 95th percentile.

    .venv/bin/python benchmarks/coding_cost_lab.py [--data DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402

from lida_core import metrics  # noqa: E402
from lida_core.decode import decode_image  # noqa: E402
from lida_core.perturb import jpeg_copy  # noqa: E402

CLIP = 24
BINS = 12


def read(path: Path, jpeg: bool = False) -> np.ndarray:
    """The image as lida decodes it (RGB); with `jpeg`, its Pillow quality-90 copy (`perturb.jpeg_copy`)."""
    pixels = decode_image(path.read_bytes(), str(path)).pixels
    return (jpeg_copy(pixels, 90) if jpeg else pixels).astype(np.int32)


def contexts_and_residuals(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d, v = x[1:, :-2], x[:-1, 1:-1], x[:-1, :-2], x[:-1, 2:], x[1:, 1:-1]
    high, low = np.maximum(a, b), np.minimum(a, b)
    predicted = np.where(c >= high, low, np.where(c <= low, high, a + b - c))
    residual = np.clip(v - predicted, -CLIP, CLIP) + CLIP
    activity = np.abs(a - c) + np.abs(b - c) + np.abs(d - b)
    level = np.minimum(BINS - 1, np.floor(np.log2(1 + activity)).astype(np.int32))
    context = level * 3 + np.arange(3)
    return context.ravel(), residual.ravel()


def fit_coder(images) -> tuple[np.ndarray, np.ndarray]:
    counts = np.ones((BINS * 3, 2 * CLIP + 1))
    for x in images:
        context, residual = contexts_and_residuals(x)
        np.add.at(counts, (context, residual), 1)
    p = counts / counts.sum(1, keepdims=True)
    return -np.log2(p), -(p * np.log2(p)).sum(1)


def gaps(x: np.ndarray, coder) -> np.ndarray:
    cost, entropy = coder
    context, residual = contexts_and_residuals(x)
    gap = cost[context, residual] - entropy[context]
    level = context // 3
    per = np.bincount(level, weights=gap, minlength=BINS) / np.maximum(1, np.bincount(level, minlength=BINS))
    return np.r_[per, gap.mean()]


def auroc(generated, real) -> float:
    """The project's AUROC (`lida_core.metrics.auroc`), generated images as the positives."""
    return metrics.auroc(np.r_[generated, real], np.r_[np.ones(len(generated), bool), np.zeros(len(real), bool)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "devset"), help="default: ../shared/devset")
    parser.add_argument(
        "--seed", type=int, default=0, help="which 35 pre-training photographs set the typicality model"
    )
    args = parser.parse_args(argv)
    data = Path(args.data)
    photos = sorted((data / "pretrain" / "real").iterdir())
    order = np.random.default_rng(args.seed).permutation(len(photos))
    for part in ("png", "jpeg90"):
        pre = [read(p, jpeg=part == "jpeg90") for p in photos]
        coder = fit_coder([pre[i] for i in order[:60]])
        held = np.array([gaps(pre[i], coder) for i in order[60:]])
        mean = held.mean(0)
        cov = np.cov(held.T)
        inverse = np.linalg.inv(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)))

        def distance(rows: np.ndarray, mean=mean, inverse=inverse) -> np.ndarray:
            centred = rows - mean
            return np.einsum("ij,jk,ik->i", centred, inverse, centred)

        bound = np.quantile(distance(held), 0.95)
        found = {
            s.name: np.array([gaps(read(p), coder) for p in sorted(s.iterdir())])
            for s in sorted((data / part).iterdir())
        }
        real = found["real"]
        print(f"\n{part} (coder counted on 60 pre-training photographs, typicality from the other 35)")
        print("| source | gap, bits (mean ± sd) | AUROC of -gap | AUROC of typicality | flagged |")
        print("|---|---|---|---|---|")
        for source, rows in found.items():
            g = rows[:, -1]
            if source == "real":
                print(f"| real | {g.mean():+.3f} ± {g.std():.3f} | | | {np.mean(distance(rows) > bound):.2f} |")
                continue
            print(
                f"| {source} | {g.mean():+.3f} ± {g.std():.3f} | {auroc(-g, -real[:, -1]):.3f} | "
                f"{auroc(distance(rows), distance(real)):.3f} | {np.mean(distance(rows) > bound):.2f} |"
            )


if __name__ == "__main__":
    main()
