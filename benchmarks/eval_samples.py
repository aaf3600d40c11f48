"""The evaluation protocol on the bundled samples, through the real `lida` command.

For each input (fingerprint, and the RGB ablation): a fresh workspace, `lida init`,
`lida pretrain` on real images only, then `lida eval DIR --shots K` (which adapts a
throwaway candidate on the K-shot gallery) for K = 1, 5, 10. Prints a table and the
training time; `--write docs/results.md` records it.

    .venv/bin/python benchmarks/eval_samples.py [--per-source 40] [--pretrain-images 256] [--seeds 0 1 2] [--write FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import lida  # noqa: E402  (benchmarks/common.py puts the project on sys.path)

from lida_core import samples  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=40)
    parser.add_argument("--pretrain-images", type=int, default=256)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--inputs", nargs="+", default=["fingerprint", "rgb"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="`lida eval --seed`: which gallery draw and adaptation seed; several give mean ± sd")
    parser.add_argument("--profile", default="small", help="model profile for `lida init` (small, phase, paper)")
    parser.add_argument("--write", help="write the Markdown table to this file")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lida-eval-"))
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> int:
    samples.write_samples(str(work / "pretrain"), args.pretrain_images, sources=["real"], start=20000)
    samples.write_samples(str(work / "eval"), args.per_source)
    rows, timing = [], {}
    for kind in args.inputs:
        ws = work / f"ws-{kind}"
        lida(ws, "init", "--profile", args.profile)
        pre = lida(ws, "pretrain", str(work / "pretrain"), "--input", kind, "--epochs", str(args.pretrain_epochs))
        timing[kind] = {"pretrain": pre["_seconds"]}
        for k in args.shots:
            runs = []
            for seed in args.seeds:
                r = lida(ws, "eval", str(work / "eval"), "--shots", str(k), "--input", kind, "--seed", str(seed))
                timing[kind][f"{k}-shot eval (adapt + embed), seed {seed}"] = r["_seconds"]
                runs.append(r)
                print(f"{kind:11s} {k:2d}-shot seed {seed}  Rank-1 {r['rank1']:.3f}  mAP {r['mAP']:.3f}  "
                      f"balanced acc {r['balanced_accuracy']:.3f}  AUROC {r['auroc']:.3f}  ({r['_seconds']:.0f} s)", flush=True)
            rows.append((kind, k, runs))
    keys = ("rank1", "mAP", "attribution_accuracy", "balanced_accuracy", "auroc")

    def cell(runs: list[dict], key: str) -> str:
        values = [r[key] for r in runs]
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")

    lines = [
        f"Seeds {args.seeds} (mean ± sd where several); profile {args.profile}; {args.pretrain_epochs} pre-training epochs.",
        "",
        "| input | shots | Rank-1 | mAP | attribution acc. | balanced real/gen acc. | AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, k, runs in rows:
        lines.append(f"| {kind} | {k} | " + " | ".join(cell(runs, key) for key in keys) + " |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps({"seconds": timing}, indent=1))
    if args.write:
        Path(args.write).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
