"""A gallery that grows, on real generators (`../shared/devset`): is the refit promoted, and what do scans then say?

The periodic adaptation flow registers generators as they are labelled, so a fitted model
meets a gallery that gained sources. Per draw, through the real `lida` command:
- a copy of one pre-trained workspace (`lida init`, `lida pretrain DATA/pretrain/real`);
- 5 PNG shots of `real` and of three generators registered, `lida adapt`;
- 5 shots of the other two generators (drawn per seed) registered, `lida adapt` again;
- every image not registered decided by `lida attribute`.

Prints, per draw and on the mean: whether the second fit was promoted, the gate's two figures,
attribution accuracy over all decided images and over the added generators' images, and the
share of the added generators' images called `real`.

    .venv/bin/python benchmarks/gallery_growth.py [--data DIR] [--draws 10] [--shots 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LIDA, ROOT, lida  # noqa: E402  (benchmarks/common.py puts the project on sys.path)

from lida_core.decide import REAL  # noqa: E402


def attribute(ws: Path, files: list[str]) -> list[dict]:
    """`lida attribute FILE...`: one JSON object per image."""
    result = subprocess.run([LIDA, "--workspace", str(ws), "--json", "attribute", *files], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"lida attribute failed: {result.stderr[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def one_draw(work: Path, pretrained: Path, data: Path, generators: list[str], shots: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    added = sorted(str(g) for g in rng.choice(generators, 2, replace=False))
    ws = work / f"ws{seed}"
    shutil.copytree(pretrained, ws)
    registered, queries = {}, []
    for source in [REAL, *generators]:
        files = sorted(p for p in (data / source).iterdir() if p.is_file())
        rng.shuffle(files)
        folder = work / f"shots{seed}" / source
        folder.mkdir(parents=True)
        for f in files[:shots]:
            shutil.copy(f, folder / f.name)
        registered[source] = folder
        queries += [(str(f), source) for f in files[shots:]]
    for source in [REAL, *(g for g in generators if g not in added)]:
        lida(ws, "gallery", "add", "--source", source, str(registered[source]))
    lida(ws, "adapt")
    for source in added:
        lida(ws, "gallery", "add", "--source", source, str(registered[source]))
    grown = lida(ws, "adapt")
    truth = dict(queries)
    decided = attribute(ws, [f for f, _ in queries])
    predicted = np.array([d["predicted_source"] for d in decided])
    sources = np.array([truth[d["uri"]] for d in decided])
    new = np.isin(sources, added)
    return {"seed": seed, "added": added, "promoted": bool(grown["promoted"]), "before": grown["holdout_accuracy_before"],
            "after": grown["holdout_accuracy_after"], "attribution": float(np.mean(predicted == sources)),
            "attribution_added": float(np.mean(predicted[new] == sources[new])),
            "added_called_real": float(np.mean(predicted[new] == REAL))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "devset", help="default: ../shared/devset")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="keep the workspaces here (default: a temporary folder)")
    args = parser.parse_args(argv)
    png = args.data / "png"
    if not (args.data / "pretrain" / "real").is_dir() or not (png / REAL).is_dir():
        raise SystemExit(f"{args.data}: not a devset (needs pretrain/real/ and png/real/; see its README)")
    generators = sorted(p.name for p in png.iterdir() if p.is_dir() and p.name != REAL)
    if len(generators) < 3:
        raise SystemExit(f"{png}: needs at least three generators besides real, found {generators}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="lida-growth-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pretrained = work / "pretrained"
        lida(pretrained, "init")
        lida(pretrained, "pretrain", str(args.data / "pretrain" / "real"))
        rows = []
        print("| draw | added | promoted | gate: current / candidate | attribution | attribution, added | added called real |")
        print("|---|---|---|---|---|---|---|")
        for seed in range(args.draws):
            r = one_draw(work, pretrained, png, generators, args.shots, seed)
            rows.append(r)
            print(f"| {seed} | {', '.join(r['added'])} | {'yes' if r['promoted'] else 'no'} | {r['before']:.3f} / {r['after']:.3f} | "
                  f"{r['attribution']:.3f} | {r['attribution_added']:.3f} | {r['added_called_real']:.3f} |", flush=True)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("promoted", "attribution", "attribution_added", "added_called_real")}
        print(f"| mean | | {mean['promoted']:.2f} | | {mean['attribution']:.3f} | {mean['attribution_added']:.3f} | "
              f"{mean['added_called_real']:.3f} |")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
