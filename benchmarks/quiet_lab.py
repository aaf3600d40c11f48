"""Which of the split descriptor's content classes add to `srm`'s whole-view triples (session 28's lab, `../shared/devset`).

`descriptor_lab.py`'s fit, draws and figures (5-shot, 30% of the pre-training photographs held out for the
threshold; "oracle" puts it at 5% of the query photographs' scores), on five descriptors made from two:
`low:3` (the whole-view triples, `srm` before session 28), `low:2/g` (the split triples, `srm-split`),
the two concatenated, `low:3` with the split's flat and gentle classes only (what `srm` counts since
session 28: `SrmStem`'s quiet option), and `low:3` with the textured class only. `--view content` reads
the high 5 bits instead (the content control: a gain that content shows too is not the low bits');
`--sources` keeps those generators and `real`.

    .venv/bin/python benchmarks/quiet_lab.py [--seeds 0 1 2 3 4 5 6 7 8 9] [--view low|content]
        [--sources stable_diffusion_v1 dit_xl2]
"""

from __future__ import annotations

import argparse
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import descriptor_lab as lab  # noqa: E402
from common import ROOT  # noqa: E402
from eval_devset import unseen_collections  # noqa: E402

from lida_core.srm import KERNELS, SPLIT_CLASSES  # noqa: E402

TRIPLES_AT_2 = 125


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "devset")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--view", choices=("low", "content"), default="low")
    parser.add_argument("--sources", nargs="+", help="keep only these generators (and real)")
    args = parser.parse_args(argv)
    classes = np.arange(len(KERNELS) * SPLIT_CLASSES * TRIPLES_AT_2).reshape(len(KERNELS), SPLIT_CLASSES, TRIPLES_AT_2)
    quiet, textured = classes[:, :2].ravel(), classes[:, 2].ravel()
    rows = {f"{args.view}:3": lambda w, s: w, f"{args.view}:2/g": lambda w, s: s,
            "both": lambda w, s: np.hstack([w, s]), "whole + flat, gentle": lambda w, s: np.hstack([w, s[:, quiet]]),
            "whole + textured": lambda w, s: np.hstack([w, s[:, textured]])}
    started = time.perf_counter()
    descriptors = [(args.view, 3, None), (args.view, 2, lab.SPLITS["g"])]
    with Pool(2) as pool:
        pre, pre_copies, _, _, _ = lab.load(args.data / "pretrain", descriptors, pool)
        parts = {p: lab.load(args.data / p, descriptors, pool)[:4] for p in ("png", "jpeg90")}
    names = unseen_collections(args.data)
    print(f"descriptors computed in {time.perf_counter() - started:.0f} s; 5-shot, seeds {args.seeds}")
    print("| descriptor | part | Rank-1 | attribution | balanced | AUROC | FPR | FPR unseen | oracle attribution / balanced "
          "| detected, per generator |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, make in rows.items():
        for part, (feats, copies, labels, files) in parts.items():
            keep = np.isin(labels, [*args.sources, lab.REAL]) if args.sources else np.ones(len(labels), bool)
            unseen = np.isin(files[keep], list(names))
            runs = []
            for seed in args.seeds:
                d = lab.draw(make(*feats)[keep], make(*copies)[keep], labels[keep], make(*pre), make(*pre_copies),
                             part != "png", 5, seed)
                runs.append(lab.summarise(d, d, labels[keep], unseen))
            print(lab.table_row(name, part, runs), flush=True)


if __name__ == "__main__":
    main()
