"""Candidate descriptors on `../shared/devset`, fitted and decided as the `srm` profile does, with a content control.

`eval_devset.py` measures the shipped profile through the real command (a minute a run).
This script answers a narrower question quickly: would another fixed descriptor, dropped
into the same closed-form path, do better, and is its gain generator noise or content?
Each descriptor is a rich model (neighbour pairs along and across seven high-pass
kernels, and the colour triple, over the whole image; `lida_core.srm` states it) read
from one view of the pixels:

- `low`: the kept low 3 bits, residuals modulo 8 (what the shipped `srm` profile reads);
- `whole`: the whole 8-bit value, residuals truncated (not wrapped);
- `content`: the high 5 bits only (`x >> 3`), residuals truncated: the content and none of
  the generator noise. A descriptor that does not clearly beat it reads content;
- `lowx`: the kept low bits with the channels recoded as colour differences (R - G, G, B - G,
  modulo 8): a camera's demosaicing ties its channels' noise together, a generator's differ;

each at truncation T (`low:2`, `whole:3`...), and optionally split (`low:2/g`): each triple
histogram counted per content class of its pixel, from the high 5 bits of the luma only (`/i`:
dark, mid, bright; `/g`: flat, gentle, textured by its central differences, what the `srm`
profile counts since session 18), each class normalised on its own. As the profile does, the
lab counts the colour triples alone (`--pairs` adds the neighbour pairs it counted before
session 14) and reads a colour JPEG in its decoder's YCbCr (`--jpeg-space rgb`: as before
session 17). A `p2` suffix (`lowp2:2`) appends period-2
contrasts: each histogram counted over the four (row, column) parities, and the absolute
differences between parities (columns, rows, diagonals). Upsampling layers leave period-2
traces that a stationary histogram averages away; the absolute value makes the contrasts
independent of the crop's phase. `--region` reads fewer pixels of each image, to
measure what a cheaper scan would cost: `half` (the top half), `quarter` (one quarter tile),
`quarters` (the mean over the four quarter tiles, as the profile averages its tiles). The fit and the decisions are the product's own
(`lida_core.statistical.fit_head` with the profile's rank, `QuadraticDetector`, a JPEG copy of
every reference image, one conformal real threshold per format from 30% of the pre-training
photographs held out), so only the descriptor changes. Mean ± sd over K-shot draws. The
"oracle" columns put the threshold at 5% of the query real photographs' scores instead: what
the ranking allows at the target rate, so a gain there is the descriptor's, not a looser
threshold's. "FPR unseen" is the rate on the real photographs of collections pre-training does
not hold (`manifest.csv`, as `eval_devset.py` counts them). `DETECT+VOTE` (`low:2+low:2/g`)
decides real or generated with the first descriptor and votes the source with the second.

    .venv/bin/python benchmarks/descriptor_lab.py [--data DIR] [--descriptors low:2 low:2/g content:2/g low:2+low:2/g]
        [--shots 5] [--seeds 0 1 2 3 4] [--sources stable_diffusion_v1 dit_xl2] [--region full]
        [--jpeg-space ycc] [--pairs]

`--sources` keeps those generators (and `real`): the devset's sources whose content varies
are Stable Diffusion v1 and DiT-XL/2.

Two more questions (session 26), each one change to the same fit:
- `--merge-directions` merges each horizontal kernel's histograms with its vertical twin's
  (d1h + d1v, d2h + d2v, d3h + d3v; kb alone), as rich models symmetrise their co-occurrences:
  4 histograms instead of 7, each counted over twice the positions.
- `--simulated KIND...` re-makes every pre-training photograph by KIND (`SIMULATIONS`: a
  resampling, a blur; no generator involved) and adds each KIND's images, with their JPEG
  copies, to the detector's generated side as a source of its own (the head and the vote are
  unchanged). If generated images share what such processing does to a camera's noise, the
  detector learns it from real photographs alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402  (benchmarks/common.py puts the project on sys.path)
from eval_devset import unseen_collections  # noqa: E402

from lida_core.decide import REAL, calibrate_real_threshold  # noqa: E402
from lida_core.decode import JPEG_SPACES, YCbCrPixels, decode_image  # noqa: E402
from lida_core.fingerprint import tile_views  # noqa: E402
from lida_core.perturb import jpeg_copy  # noqa: E402
from lida_core.statistical import JPEG_QUALITIES, QuadraticDetector, fit_head  # noqa: E402

RANK = 128  # the srm profile's embedding width
CALIBRATION_SHARE = 0.3  # the srm profile's share of pre-training photographs held out


def _residuals(v: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """The seven kernels of `lida_core.srm` on H x W x 3 integers: (residual, axis of its direction)."""
    c = v[1:-1, 1:-1]
    kb = (-v[:-2, :-2] + 2 * v[:-2, 1:-1] - v[:-2, 2:] + 2 * v[1:-1, :-2] - 4 * c + 2 * v[1:-1, 2:]
          - v[2:, :-2] + 2 * v[2:, 1:-1] - v[2:, 2:])
    return [(v[:, 1:] - v[:, :-1], 1), (v[1:] - v[:-1], 0),
            (v[:, :-2] - 2 * v[:, 1:-1] + v[:, 2:], 1), (v[:-2] - 2 * v[1:-1] + v[2:], 0),
            (-v[:, :-3] + 3 * v[:, 1:-2] - 3 * v[:, 2:-1] + v[:, 3:], 1), (-v[:-3] + 3 * v[1:-2] - 3 * v[2:-1] + v[3:], 0),
            (kb, 1)]


SPLITS = {"": None, "i": "intensity", "g": "gradient"}


def classes(pixels: np.ndarray, split: str | None, ycc: bool) -> np.ndarray | None:
    """Each pixel's class 0-2 by its content (the high 5 bits only, so the low-bit noise never moves it), or None.

    `intensity`: the luma's (Y for a YCbCr JPEG, (R + 2G + B) / 4 otherwise) dark / mid / bright
    thirds. `gradient`: the luma content's central differences summed over both axes: flat (0),
    gentle (1-2 levels of 32), textured (more).
    """
    if split is None:
        return None
    p = (pixels >> 3).astype(np.int16)
    luma = p[..., 0] if ycc else (p[..., 0] + 2 * p[..., 1] + p[..., 2]) // 4
    if split == "intensity":
        return np.minimum(luma * 3 // 32, 2).astype(np.int64)
    padded = np.pad(luma, 1, mode="edge")
    g = np.abs(padded[1:-1, 2:] - padded[1:-1, :-2]) + np.abs(padded[2:, 1:-1] - padded[:-2, 1:-1])
    return np.where(g == 0, 0, np.where(g <= 2, 1, 2)).astype(np.int64)


def describe(pixels: np.ndarray, view: str, truncation: int, pairs: bool = False, split: str | None = None) -> np.ndarray:
    """The rich model of one view of H x W x 3 uint8 pixels (square-rooted normalised histograms).

    `pairs`: also the neighbour-pair histograms (the `srm` profile counted them before session
    14). `split`: each triple histogram counted per content class (`classes`), each normalised
    by its own count, so how much of the image is dark or flat (content) does not enter.
    """
    phase = view.endswith("p2")
    view = view.removesuffix("p2")
    ycc = isinstance(pixels, YCbCrPixels)
    cls = classes(pixels, split, ycc)
    if view == "lowx":
        p = pixels.astype(np.int16)
        values, view = np.stack([p[..., 0] - p[..., 1], p[..., 1], p[..., 2] - p[..., 1]], axis=-1) & 7, "low"
    else:
        values = {"low": pixels & 7, "whole": pixels, "content": pixels >> 3}[view].astype(np.int16)
    width = 2 * truncation + 1
    parts, contrasts = [], []
    for residual, axis in _residuals(values):
        if view == "low":
            residual = ((residual + 4) & 7) - 4  # modulo 8, wrapped to [-4, 4)
        q = (np.clip(residual, -truncation, truncation) + truncation).astype(np.int64)
        for direction in (axis, 1 - axis) if pairs else ():
            a = q if direction == 1 else q.transpose(1, 0, 2)
            codes = a[:, :-1] * width + a[:, 1:]
            parts.append(np.bincount(codes.ravel(), minlength=width**2))
            if phase:
                contrasts += _contrasts(codes if direction == 1 else codes.transpose(1, 0, 2), width**2)
        codes = (q[..., 0] * width + q[..., 1]) * width + q[..., 2]
        if cls is None:
            parts.append(np.bincount(codes.ravel(), minlength=width**3))
        else:  # the residual at (y, x) of a kernel spanning rows y..y+a, columns x..x+b: the class at its first pixel
            c = cls[: codes.shape[0], : codes.shape[1]]
            parts += [np.bincount(codes[c == k].ravel(), minlength=width**3) for k in range(3)]
        if phase:
            contrasts += _contrasts(codes[..., None], width**3)
    base = np.sqrt(np.concatenate([p / max(p.sum(), 1) for p in parts]))
    if not phase:
        return base
    return np.concatenate([base, np.sqrt(np.abs(np.concatenate(contrasts)))])


def _contrasts(codes: np.ndarray, bins: int) -> list[np.ndarray]:
    """Period-2 contrasts of a histogram over positions (y, x): column parity, row parity, diagonal; each / the count."""
    h = {(i, j): np.bincount(codes[i::2, j::2].ravel(), minlength=bins) for i in (0, 1) for j in (0, 1)}
    n = max(codes.size, 1)
    return [((h[0, 0] + h[1, 0]) - (h[0, 1] + h[1, 1])) / n, ((h[0, 0] + h[0, 1]) - (h[1, 0] + h[1, 1])) / n,
            ((h[0, 0] + h[1, 1]) - (h[0, 1] + h[1, 0])) / n]


REGIONS = ("full", "half", "quarter", "quarters")


def describe_region(pixels: np.ndarray, view: str, truncation: int, region: str, pairs: bool = False,
                    split: str | None = None) -> np.ndarray:
    """`describe` on part of the image: all of it, its top half, one quarter tile, or the mean over the four."""
    height, width = pixels.shape[:2]
    if region == "half":
        return describe(pixels[: height // 2], view, truncation, pairs, split)
    if region in ("quarter", "quarters"):
        tiles = tile_views(pixels, min(height, width) // 2, 4)
        return np.mean([describe(t, view, truncation, pairs, split) for t in tiles[: 1 if region == "quarter" else 4]], axis=0)
    return describe(pixels, view, truncation, pairs, split)


def _half(image: Image.Image, down, up) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), down).resize(image.size, up)


SIMULATIONS = {  # RGB image -> a re-made one: processing that replaces a camera's noise, no generator involved
    "bilinear2": lambda im: _half(im, Image.BOX, Image.BILINEAR),  # halved, then doubled
    "bicubic2": lambda im: _half(im, Image.LANCZOS, Image.BICUBIC),
    "nearest2": lambda im: _half(im, Image.BOX, Image.NEAREST),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(radius=1.0)),
    "up1.5": lambda im: im.crop((0, 0, im.width * 2 // 3, im.height * 2 // 3)).resize(im.size, Image.BICUBIC),
}


def _one(job):
    path, quality, descriptors, region, jpeg_space, pairs, simulations = job
    pixels = decode_image(Path(path).read_bytes(), path, jpeg_space=jpeg_space).pixels  # the product's decoder
    views = [pixels, jpeg_copy(pixels, quality, jpeg_space)]  # the copy of the whole image, as the product makes its copies
    for kind in simulations:  # each simulation of an RGB image, and its JPEG copy at the same quality
        remade = np.asarray(SIMULATIONS[kind](Image.fromarray(np.asarray(pixels))))
        views += [remade, jpeg_copy(remade, quality, jpeg_space)]
    return [[describe_region(view, v, t, region, pairs, s) for v, t, s in descriptors] for view in views]


def load(folder: Path, descriptors, pool, region: str = "full", jpeg_space: str = "ycc",
         pairs: bool = False, simulations: Sequence[str] = ()) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray, dict]:
    """Per descriptor: (N x D of the files, N x D of their JPEG copies); each file's source folder and name;
    and per simulation, per descriptor, (N x D of the re-made files, N x D of their JPEG copies)."""
    rng = np.random.default_rng(7)
    low, high = JPEG_QUALITIES
    files = [(f, d.name) for d in sorted(p for p in folder.iterdir() if p.is_dir()) for f in sorted(d.iterdir()) if f.is_file()]
    jobs = [(str(f), int(rng.integers(low, high + 1)), descriptors, region, jpeg_space, pairs, tuple(simulations)) for f, _ in files]
    done = pool.map(_one, jobs, chunksize=4)
    views = [[np.array([d[j][i] for d in done]) for i in range(len(descriptors))] for j in range(len(done[0]))]
    simulated = {kind: (views[2 + 2 * k], views[3 + 2 * k]) for k, kind in enumerate(simulations)}
    return views[0], views[1], np.array([s for _, s in files]), np.array([f.stem for f, _ in files]), simulated


def merge_directions(x: np.ndarray) -> np.ndarray:
    """Descriptors with each horizontal kernel's histograms merged with its vertical twin's (KERNELS' order:
    d1h, d1v, d2h, d2v, d3h, d3v, kb): the normalised histograms averaged, then square-rooted again."""
    h = (x**2).reshape(len(x), 7, -1)
    return np.sqrt(np.concatenate([(h[:, 0:6:2] + h[:, 1:6:2]) / 2, h[:, 6:]], axis=1).reshape(len(x), -1))


def split(labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gallery, queries = [], []
    for source in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == source)
        rng.shuffle(idx)
        gallery += idx[:shots].tolist()
        queries += idx[shots:].tolist()
    return np.array(gallery), np.array(queries)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def draw(feats, copies, labels, pre, pre_copies, jpeg: bool, shots: int, seed: int, simulated=()) -> dict:
    """One K-shot draw through the srm profile's fit and decisions: each query's score, vote and Rank-1 hit.

    `simulated`: (N x D re-made pre-training photographs, N x D their JPEG copies) per simulation; the
    training share of each joins the detector's generated side as a source of its own."""
    gallery, queries = split(labels, shots, seed)
    order = np.random.default_rng(100 + seed).permutation(len(pre))
    cal, train = order[: int(round(CALIBRATION_SHARE * len(pre)))], order[int(round(CALIBRATION_SHARE * len(pre))):]
    g_labels = labels[gallery]
    real = np.vstack([pre[train], pre_copies[train], feats[gallery][g_labels == REAL], copies[gallery][g_labels == REAL]])
    is_gen = g_labels != REAL
    generated = np.vstack([feats[gallery][is_gen], copies[gallery][is_gen]])
    gen_labels = np.concatenate([g_labels[is_gen], g_labels[is_gen]])
    mean, weight = fit_head(real, generated, gen_labels, RANK)

    def embed(x):
        return normalise((x - mean) @ weight)

    extra = [np.vstack([plain[train], copy[train]]) for plain, copy in simulated]
    extra_labels = [np.full(2 * len(train), f"~simulated{k}") for k in range(len(extra))]
    detector = QuadraticDetector.fit(embed(real), embed(np.vstack([generated, *extra])),
                                     np.concatenate([gen_labels, *extra_labels]))
    threshold = calibrate_real_threshold(detector.scores(embed(pre_copies[cal] if jpeg else pre[cal])))
    q_emb = embed(feats[queries])
    sources = sorted(set(gen_labels.tolist()))
    centroids = normalise(np.stack([embed(generated)[gen_labels == s].mean(0) for s in sources]))
    return {"queries": queries, "scores": detector.scores(q_emb), "threshold": threshold,
            "hit": g_labels[(q_emb @ embed(feats[gallery]).T).argmax(1)] == labels[queries],
            "source": np.array(sources)[(q_emb @ centroids.T).argmax(1)], "sources": sources}


def summarise(detect: dict, vote: dict, labels: np.ndarray, unseen: np.ndarray) -> dict:
    """The figures of one draw, detecting with one descriptor's scores and voting with another's (or the same)."""
    q_labels, scores, source = labels[detect["queries"]], detect["scores"], vote["source"]
    called = scores < detect["threshold"]
    truth_gen = q_labels != REAL
    oracle = scores < np.quantile(scores[~truth_gen], 0.05)
    positive, negative = -scores[truth_gen], -scores[~truth_gen]
    auroc = float(np.mean(positive[:, None] > negative[None, :]) + 0.5 * np.mean(positive[:, None] == negative[None, :]))
    return {
        "rank1": float(np.mean(vote["hit"])),
        "attribution": float(np.mean(np.where(called, source, REAL) == q_labels)),
        "balanced": float(0.5 * (np.mean(called[truth_gen]) + np.mean(~called[~truth_gen]))),
        "auroc": auroc,
        "fpr": float(np.mean(called[~truth_gen])),
        "fpr unseen": float(np.mean(called[unseen[detect["queries"]]])),
        "oracle attribution": float(np.mean(np.where(oracle, source, REAL) == q_labels)),
        "oracle balanced": float(0.5 * (np.mean(oracle[truth_gen]) + np.mean(~oracle[~truth_gen]))),
        **{f"detected {s}": float(np.mean(called[q_labels == s])) for s in detect["sources"]},
    }


def table_row(label: str, part: str, runs: list[dict]) -> str:
    """One Markdown row of the table `main` prints: the mean over draws (`summarise`'s), attribution's sd too."""
    mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
    sd = np.std([r["attribution"] for r in runs])
    detected = ", ".join(f"{k.split(' ', 1)[1]} {v:.2f}" for k, v in mean.items() if k.startswith("detected"))
    return (f"| {label} | {part} | {mean['rank1']:.3f} | {mean['attribution']:.3f} ± {sd:.3f} | "
            f"{mean['balanced']:.3f} | {mean['auroc']:.3f} | {mean['fpr']:.3f} | {mean['fpr unseen']:.3f} | "
            f"{mean['oracle attribution']:.3f} / {mean['oracle balanced']:.3f} | {detected} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "devset")
    parser.add_argument("--descriptors", nargs="+", default=["low:2", "whole:3", "content:2"], help="VIEW:T[/SPLIT], VIEW in low, whole, content, lowx; DETECT+VOTE: two of them")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--parts", nargs="+", default=["png", "jpeg90"])
    parser.add_argument("--sources", nargs="+", help="keep only these generators (and real)")
    parser.add_argument("--jpeg-space", choices=JPEG_SPACES, default="ycc",
                        help="how colour JPEGs are read (default ycc: the decoder's YCbCr, as the srm profile reads them)")
    parser.add_argument("--pairs", action="store_true", help="also count the neighbour-pair histograms (srm before session 14)")
    parser.add_argument("--region", choices=REGIONS, default="full", help="the part of each image read (default: all of it)")
    parser.add_argument("--merge-directions", action="store_true",
                        help="merge each horizontal kernel's histograms with its vertical twin's (4 kernels instead of 7)")
    parser.add_argument("--simulated", nargs="+", choices=sorted(SIMULATIONS), default=[],
                        help="pre-training photographs re-made by these, each a source of the detector's generated side")
    args = parser.parse_args(argv)
    if not (args.data / "pretrain" / "real").is_dir():
        parser.error(f"{args.data} is not the devset (no pretrain/real folder)")
    descriptors, rows = [], []
    for row in args.descriptors:
        picked = []
        for d in row.split("+"):
            spec, _, split = d.partition("/")
            view, _, t = spec.partition(":")
            if (view.removesuffix("p2") not in ("low", "whole", "content", "lowx") or not t.isdigit() or not 1 <= int(t) <= 4
                    or split not in SPLITS):
                parser.error(f"descriptor {d!r}: VIEW:T[/SPLIT] with VIEW low, whole, content or lowx (a p2 suffix adds "
                             "period-2 contrasts), T 1-4 and SPLIT i (intensity) or g (gradient)")
            if (view, int(t), SPLITS[split]) not in descriptors:
                descriptors.append((view, int(t), SPLITS[split]))
            picked.append(descriptors.index((view, int(t), SPLITS[split])))
        if len(picked) > 2:
            parser.error(f"{row!r}: at most two descriptors, DETECT+VOTE")
        rows.append((row, picked[0], picked[-1]))
    if args.merge_directions and (args.pairs or any(v.endswith("p2") for v, _, _ in descriptors)):
        parser.error("--merge-directions merges the colour-triple layout (no --pairs, no p2 contrasts)")
    names = unseen_collections(args.data)
    started = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        pre, pre_copies, _, _, simulated = load(args.data / "pretrain", descriptors, pool, args.region, args.jpeg_space,
                                                args.pairs, args.simulated)
        parts = {p: load(args.data / p, descriptors, pool, args.region, args.jpeg_space, args.pairs)[:4] for p in args.parts}
    if args.merge_directions:
        pre, pre_copies = [merge_directions(x) for x in pre], [merge_directions(x) for x in pre_copies]
        simulated = {k: ([merge_directions(x) for x in a], [merge_directions(x) for x in b]) for k, (a, b) in simulated.items()}
        parts = {p: ([merge_directions(x) for x in f], [merge_directions(x) for x in c], labels, files)
                 for p, (f, c, labels, files) in parts.items()}
    print(f"descriptors computed in {time.perf_counter() - started:.0f} s; region {args.region}; JPEG read as {args.jpeg_space}; "
          f"{'pairs and triples' if args.pairs else 'triples'}; {args.shots}-shot, seeds {args.seeds}"
          + (f", sources {args.sources} and real" if args.sources else "")
          + (", horizontal and vertical kernels merged" if args.merge_directions else "")
          + (f", simulated generated sources {args.simulated}" if args.simulated else ""))
    print("| descriptor | part | Rank-1 | attribution | balanced | AUROC | FPR | FPR unseen | oracle attribution / balanced | detected, per generator |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    draws = {}
    for row, detect, vote in rows:
        for part, (feats, copies, labels, files) in parts.items():
            keep = np.isin(labels, [*args.sources, REAL]) if args.sources else np.ones(len(labels), bool)
            unseen = np.isin(files[keep], list(names))
            runs = []
            for seed in args.seeds:
                for i in {detect, vote}:
                    if (i, part, seed) not in draws:
                        draws[i, part, seed] = draw(feats[i][keep], copies[i][keep], labels[keep], pre[i], pre_copies[i],
                                                    part != "png", args.shots, seed,
                                                    [(a[i], b[i]) for a, b in simulated.values()])
                runs.append(summarise(draws[detect, part, seed], draws[vote, part, seed], labels[keep], unseen))
            print(table_row(row, part, runs), flush=True)


if __name__ == "__main__":
    main()
