"""Attribution and detection on real generators (`../shared/devset`), through the real `lida` command.

One workspace per profile: `lida init`, `lida pretrain DATA/pretrain/real` (real photographs
only), then `lida eval DATA/<part> --shots K --seed S` for every part (png, jpeg90), K and S;
each eval adapts a throwaway candidate on its K-shot gallery and decides the rest (a part
`png@jpeg:90` registers the PNGs and decides JPEG 90 copies of the queries). Prints
one table of mean ± sd over the seeds, plus the false-positive rate on real photographs:
over all real queries, and over those from collections pre-training (where the real
threshold is calibrated) never saw (`manifest.csv`'s repository and folder).

`--crop SIDE` first cuts every labelled image (`png/`) to its centre SIDE x SIDE and evaluates those
crops instead: as PNGs (part `png`) and encoded as JPEG 90 (part `jpeg90`), the way a small image
comes from a site. Pre-training still reads the full-size photographs, so this measures what the
real threshold does with images smaller than the model's view. `--downscale SIDE` does the same
with each image downscaled to SIDE x SIDE (Pillow's Lanczos, as a thumbnail is made) instead.

The RGB ablation follows on a network profile (`small` reading plain RGB): content follows
the source for three devset sources, so a fingerprint figure only counts where it clearly
beats the RGB one.

    .venv/bin/python benchmarks/eval_devset.py [--data DIR] [--shots 1 5 10] [--seeds 0 1 2 3 4]
        [--parts png jpeg90] [--real-shots K] [--profile srm] [--pretrain-seeds 0] [--rgb-seeds 0 1 2] [--rgb-epochs 60]
        [--crop SIDE | --downscale SIDE] [--write FILE]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, lida  # noqa: E402  (benchmarks/common.py puts the project on sys.path)

KEYS = ("rank1", "mAP", "attribution_accuracy", "balanced_accuracy", "auroc", "false_positive_rate", "fpr_unseen")
HEADER = "| profile | input | part | shots | Rank-1 | mAP | attribution acc. | balanced real/gen acc. | AUROC | FPR, all real | FPR, unseen collections |"


def collection(row: dict) -> tuple[str, str]:
    """A photograph's collection: its repository and the folder it lies in there (`manifest.csv`)."""
    return row["repo"], row["path"].rpartition("/")[0]


def unseen_collections(data: Path) -> set[str]:
    """File names of labelled real photographs from collections that pre-training's images do not come from.

    A collection is a repository's folder, not the repository: one repository holds the Kodak set beside
    Wikipedia photographs, and pre-training has only the latter. Until session 27 the repository alone
    decided, which counted the 24 Kodak photographs as seen (28 unseen photographs instead of 52).
    """
    with open(data / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    seen = {collection(r) for r in rows if r["part"] == "pretrain"}
    return {r["name"] for r in rows if r["part"] == "labelled" and r["source"] == "real" and collection(r) not in seen}


def fpr_unseen(result: dict, names: set[str]) -> float:
    flags = [d["is_generated"] for d in result["decisions"] if d["source"] == "real" and Path(d["uri"]).stem in names]
    return float(np.mean(flags)) if flags else float("nan")


def cell(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")


def run_profile(work: Path, data: Path, profile: str, kind: str, parts, shots, seeds, epochs, names, rows,
                pretrain_seeds=(0,), real_shots: int | None = None) -> dict:
    """Per pre-training seed a workspace (its own held-out calibration photographs); the runs of all pooled per row."""
    timing = {"pretrain_s": [], "eval_s": []}
    pooled: dict[tuple[str, int], list[dict]] = {(part, k): [] for part in parts for k in shots}
    for p in pretrain_seeds:
        ws = work / f"ws-{profile}-{kind}-p{p}"
        lida(ws, "init", "--profile", profile)
        pre = lida(ws, "pretrain", str(data / "pretrain" / "real"), "--input", kind, "--seed", str(p))
        timing["pretrain_s"].append(round(pre["_seconds"], 1))
        for part in parts:
            for k in shots:
                for seed in seeds:
                    extra = ["--epochs", str(epochs)] if epochs else []
                    folder, _, perturbation = part.partition("@")
                    if perturbation:  # the gallery from DATA/folder as it is, the queries perturbed (PNG gallery, JPEG queries)
                        extra += ["--perturb", perturbation]
                    if real_shots:
                        extra += ["--real-shots", str(real_shots)]
                    r = lida(ws, "eval", str(data / folder), "--shots", str(k), "--seed", str(seed), "--input", kind, *extra)
                    if perturbation:
                        r = {**r, **r["perturbations"][0]}
                    r["fpr_unseen"] = fpr_unseen(r, names)
                    timing["eval_s"].append(round(r["_seconds"], 1))
                    pooled[part, k].append(r)
                    print(f"{profile:6s} {kind:11s} {part:7s} {k:2d}-shot pretrain seed {p} seed {seed}  Rank-1 {r['rank1']:.3f}  "
                          f"attribution {r['attribution_accuracy']:.3f}  balanced {r['balanced_accuracy']:.3f}  "
                          f"AUROC {r['auroc']:.3f}  FPR {r['false_positive_rate']:.3f} / unseen {r['fpr_unseen']:.3f}  "
                          f"({r['_seconds']:.0f} s)", flush=True)
    for (part, k), runs in pooled.items():
        label = f"{k} ({real_shots} real)" if real_shots and real_shots != k else str(k)
        rows.append(f"| {profile} | {kind} | {part} | {label} | " + " | ".join(cell(runs, key) for key in KEYS) + " |")
    timing["pretrain_s"] = float(np.median(timing["pretrain_s"]))
    return timing


def smaller(data: Path, out: Path, side: int, how: str = "crop") -> Path:
    """A devset whose labelled images are `data`'s PNGs cut to their centre side x side (`how` "crop") or downscaled
    to it ("downscale"): png/ as PNGs, jpeg90/ as JPEG 90s; pretrain/ and manifest.csv are `data`'s own (linked)."""
    from PIL import Image

    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "real").symlink_to((data / "pretrain" / "real").resolve())
    (out / "manifest.csv").symlink_to((data / "manifest.csv").resolve())
    for path in sorted((data / "png").glob("*/*.png")):
        with Image.open(path) as image:
            image = image.convert("RGB")
            top, left = max(0, (image.height - side) // 2), max(0, (image.width - side) // 2)
            crop = (image.crop((left, top, left + min(side, image.width), top + min(side, image.height))) if how == "crop"
                    else image.resize((side, side), Image.Resampling.LANCZOS))
        for part, suffix, options in (("png", ".png", {}), ("jpeg90", ".jpg", {"quality": 90})):
            target = out / part / path.parent.name / (path.stem + suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            crop.save(target, **options)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "devset"), help="default: ../shared/devset")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0],
                        help="one pre-training per seed (which photographs calibrate the threshold); runs pooled over all")
    parser.add_argument("--parts", nargs="+", default=["png", "jpeg90"],
                        help="devset folders; FOLDER@KIND:V registers FOLDER's images and queries them perturbed "
                             "(png@jpeg:90: generators registered as PNGs, met as JPEG 90s)")
    parser.add_argument("--real-shots", type=int, help="real images in each gallery (default: as many as --shots)")
    parser.add_argument("--profile", default="srm", help="the fingerprint profile measured (default: the CPU default, srm)")
    parser.add_argument("--rgb-profile", default="small", help="network profile for the RGB ablation")
    parser.add_argument("--rgb-shots", type=int, nargs="+", default=[5])
    parser.add_argument("--rgb-seeds", type=int, nargs="*", default=[0, 1, 2], help="none: skip the RGB ablation")
    parser.add_argument("--rgb-epochs", type=int, default=0, help="adaptation epochs of the RGB network (0: its profile's default)")
    parser.add_argument("--skip-fingerprint", action="store_true", help="only the RGB ablation")
    small = parser.add_mutually_exclusive_group()
    small.add_argument("--crop", type=int, help="evaluate centre crops of this side (PNG and JPEG 90) of the labelled images")
    small.add_argument("--downscale", type=int, help="evaluate the labelled images downscaled to this side (PNG and JPEG 90)")
    parser.add_argument("--write", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    how, side = ("crop", args.crop) if args.crop is not None else ("downscale", args.downscale)
    if side is not None and not 4 <= side <= 256:
        raise SystemExit(f"--{how} {side}: the devset's images are 256x256; a side from 4 to 256")
    data = Path(args.data)
    if not (data / "pretrain" / "real").is_dir() or not (data / "manifest.csv").is_file():
        raise SystemExit(f"{data}: not a devset (needs pretrain/real/, png/, jpeg90/ and manifest.csv; see its README)")
    names = unseen_collections(data)
    work = Path(tempfile.mkdtemp(prefix="lida-devset-"))
    rows: list[str] = []
    started = time.perf_counter()
    source = data
    try:
        if side is not None:
            data = smaller(source, work / f"{how}{side}", side, how)
        timing = {}
        if not args.skip_fingerprint:
            timing[args.profile] = run_profile(work, data, args.profile, "fingerprint", args.parts, args.shots, args.seeds, 0, names, rows,
                                               args.pretrain_seeds, args.real_shots)
        if args.rgb_seeds:
            timing[f"{args.rgb_profile}-rgb"] = run_profile(work, data, args.rgb_profile, "rgb", ["png"], args.rgb_shots,
                                                            args.rgb_seeds, args.rgb_epochs, names, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Devset {source}{f' ({how} to {side}x{side})' if side else ''}: seeds {args.seeds}, pre-training seeds {args.pretrain_seeds} (RGB: {args.rgb_seeds}, "
        f"pre-training seed 0), mean ± sd over all runs; "
        f"{len(names)} real photographs from collections pre-training did not use.",
        "",
        HEADER,
        "|---" * (HEADER.count("|") - 1) + "|",
        *rows,
        "",
        "Seconds: " + "; ".join(f"{p}: pretrain {t['pretrain_s']}, eval median {np.median(t['eval_s']):.0f}" for p, t in timing.items())
        + f"; total {time.perf_counter() - started:.0f}",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        Path(args.write).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
