"""Do the bundled samples leak content? Train one classifier on fingerprints, one on RGB.

The synthetic generators must be told apart by their synthesis trace, not by content: a
classifier that sees plain RGB must not beat one that sees the low-bit fingerprint. Both
use the `small` profile's network, the same crops, epochs and seed; only the input differs.

    .venv/bin/python benchmarks/sample_separability.py [--per-source 60] [--epochs 6] [--inputs fingerprint phase rgb]

`phase` is the `phase` profile: the same network behind lida_core.model.PhaseStem.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lida_core import samples  # noqa: E402
from lida_core.fingerprint import fingerprint_bits, to_model_input  # noqa: E402
from lida_core.model import build_model  # noqa: E402


def crops(images: list[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for image in images:
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        out.append(np.ascontiguousarray(image[top : top + size, left : left + size]))
    return out


def as_input(batch: list[np.ndarray], kind: str, settings) -> torch.Tensor:
    if kind in ("fingerprint", "phase"):
        return to_model_input(np.stack([fingerprint_bits(x, settings) for x in batch]))
    return to_model_input(np.stack(batch))


def train_and_test(kind: str, train, test, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("phase" if kind == "phase" else "small")  # phase: the same network behind the phase stem
    size, settings = model.input_size, model.fingerprint
    sources = sorted({s for s, _ in train})
    head = nn.Linear(model.embedding_dim, len(sources))
    params = list(model.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    labels = {s: i for i, s in enumerate(sources)}
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(train))
        for start in range(0, len(order), 32):
            chunk = [train[i] for i in order[start : start + 32]]
            x = as_input(crops([img for _, img in chunk], size, rng), kind, settings)
            y = torch.tensor([labels[s] for s, _ in chunk])
            loss = nn.functional.cross_entropy(head(model(x)), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test), 64):
            chunk = test[start : start + 64]
            x = as_input(crops([img for _, img in chunk], size, rng), kind, settings)
            pred = head(model(x)).argmax(1)
            correct += sum(int(p) == labels[s] for p, (s, _) in zip(pred, chunk, strict=True))
    return correct / len(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-source", type=int, default=60)
    parser.add_argument("--test-per-source", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", nargs="+", default=["fingerprint", "rgb"], choices=["fingerprint", "phase", "rgb"])
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train = [(s, img) for s, _, img in samples.iter_samples(args.per_source)]
    test = [(s, img) for s, _, img in samples.iter_samples(args.test_per_source, start=10_000)]
    results = {}
    for kind in args.inputs:
        started = time.perf_counter()
        results[kind] = train_and_test(kind, train, test, args.epochs, args.seed)
        print(f"{kind:12s} held-out accuracy {results[kind]:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    chance = 1 / len(samples.sample_sources())
    print(f"chance {chance:.3f}" + (f"; fingerprint - rgb = {results['fingerprint'] - results['rgb']:+.3f}"
                                      if {"fingerprint", "rgb"} <= set(results) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
