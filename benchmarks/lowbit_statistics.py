"""A yardstick for learned profiles: K-shot retrieval with fixed low-bit statistics, no training.

The descriptor is the steganalysis-style statistic of the kept low bits (SPAM, Pevny et al.
2010): per channel and direction, the histogram of wrapped neighbour differences
`(v[i+1] - v[i]) mod 8` (8 bins) and of consecutive pairs of them (64 bins), square-rooted
(Hellinger) and L2-normalised, so cosine retrieval works as in the product. Nothing is learnt
and nothing is specific to the samples. A learned profile that retrieves worse than this one
on the same protocol is not yet using what the low bits carry.

`--descriptor stats` uses the `stats` profile's stem instead (lida_core.model.StatsStem: the
same pairs plus colour co-occurrences and period-2 parity), on the whole image, so the profile's
starting point is measured on its own. Protocol as `lida eval`: per seed, K gallery images per source, the rest are queries;
Rank-1 and mAP of cosine retrieval, and the AUROC of similarity to the real prototype
(mean real gallery descriptor) as the real/generated score.

    .venv/bin/python benchmarks/lowbit_statistics.py [--per-source 40] [--shots 1 5 10] [--seeds 0 1 2] [--descriptor spam|stats]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the project on sys.path)

from lida_core import samples  # noqa: E402
from lida_core.metrics import auroc, retrieval_metrics  # noqa: E402


def descriptor(pixels: np.ndarray, bits: int = 3) -> np.ndarray:
    """H x W x 3 uint8 -> 2 directions x 3 channels x (levels + levels^2) Hellinger-normalised bins."""
    levels = 2**bits
    v = (pixels & (levels - 1)).astype(np.int16)
    parts = []
    for axis in (1, 0):
        d = np.diff(v, axis=axis) % levels
        for c in range(3):
            a = d[..., c]
            single = np.bincount(a.ravel(), minlength=levels).astype(np.float64)
            pairs = (a[:, :-1] * levels + a[:, 1:]) if axis == 1 else (a[:-1, :] * levels + a[1:, :])
            double = np.bincount(pairs.ravel(), minlength=levels * levels).astype(np.float64)
            parts += [single / max(single.sum(), 1.0), double / max(double.sum(), 1.0)]
    f = np.sqrt(np.concatenate(parts))
    return f / max(np.linalg.norm(f), 1e-12)


def stats_descriptor(pixels: np.ndarray) -> np.ndarray:
    """The stats profile's fixed stem on the whole image."""
    import torch

    from lida_core.fingerprint import FingerprintSettings, to_model_input
    from lida_core.model import StatsStem

    stem = StatsStem(FingerprintSettings(bits=3, mode="scale", fit="crop", size=128))
    with torch.no_grad():
        return stem(to_model_input(torch.from_numpy(((pixels & 7) * 36).astype(np.uint8))[None]))[0].numpy()


def evaluate(images: dict[str, list[np.ndarray]], shots: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    g, g_src, q, q_src = [], [], [], []
    for source, items in sorted(images.items()):
        order = rng.permutation(len(items))
        g += [items[i] for i in order[:shots]]
        g_src += [source] * shots
        q += [items[i] for i in order[shots:]]
        q_src += [source] * (len(items) - shots)
    gallery, queries = np.stack(g), np.stack(q)
    retrieval = retrieval_metrics(queries @ gallery.T, q_src, g_src)
    prototype = gallery[np.asarray(g_src) == samples.REAL].mean(0)
    prototype /= np.linalg.norm(prototype)
    generated = [s != samples.REAL for s in q_src]
    return {"rank1": retrieval["rank1"], "mAP": retrieval["mAP"], "auroc": auroc(-(queries @ prototype), generated)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=40)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--descriptor", choices=("spam", "stats"), default="spam")
    args = parser.parse_args(argv)
    describe = stats_descriptor if args.descriptor == "stats" else descriptor
    images: dict[str, list[np.ndarray]] = {}
    for source, _index, pixels in samples.iter_samples(args.per_source):
        images.setdefault(source, []).append(describe(pixels))
    print(f"{args.descriptor} descriptor; {len(images)} sources x {args.per_source} images; seeds {args.seeds}")
    print("| shots | Rank-1 | mAP | real-prototype AUROC |")
    print("|---|---|---|---|")
    for shots in args.shots:
        runs = [evaluate(images, shots, seed) for seed in args.seeds]
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        spread = {k: float(np.std([r[k] for r in runs])) for k in runs[0]}
        print(f"| {shots} | {mean['rank1']:.3f} ± {spread['rank1']:.3f} | {mean['mAP']:.3f} ± {spread['mAP']:.3f} | "
              f"{mean['auroc']:.3f} ± {spread['auroc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
