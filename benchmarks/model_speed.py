"""Forward speed of each model profile at batch 32 on this machine (inference, float32).

Prints img/s per profile, the ratio of each to the `paper` profile measured in the same run,
and whether `small` meets its target (>= 30 img/s on the 2-core CPU machine).

    .venv/bin/python benchmarks/model_speed.py [--batch 32] [--seconds 8] [--profiles small paper]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lida_core.model import PROFILES, build_model  # noqa: E402

SMALL_TARGET = 30.0


def images_per_second(profile: str, batch: int, seconds: float, device: str) -> float:
    torch.manual_seed(0)
    model = build_model(profile).to(device).eval()
    x = torch.rand(batch, 3, model.input_size, model.input_size, device=device)
    with torch.inference_mode():
        model(x)  # warm-up: allocator, kernels, caches
        done, started = 0, time.perf_counter()
        while True:
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            done += batch
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and done >= 2 * batch:
                return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="minimum timed seconds per profile")
    parser.add_argument("--profiles", nargs="+", default=["small", "paper"], choices=sorted(PROFILES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for name in args.profiles:
        results[name] = images_per_second(name, args.batch, args.seconds, args.device)
        profile = PROFILES[name]
        print(
            f"{name:6s} {profile.input_size}x{profile.input_size} -> {profile.embedding_dim:4d}-d  "
            f"batch {args.batch}: {results[name]:8.1f} img/s",
            file=sys.stderr,
            flush=True,
        )
    baseline = results.get("paper")
    if baseline:
        for name, value in results.items():
            print(f"ratio {name}/paper: {value / baseline:.1f}x", file=sys.stderr)
    if "small" in results and args.device == "cpu":
        verdict = "meets" if results["small"] >= SMALL_TARGET else "MISSES"
        print(f"small {verdict} its target of {SMALL_TARGET:.0f} img/s", file=sys.stderr)
    summary = {
        "batch": args.batch,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "img_per_s": {k: round(v, 2) for k, v in results.items()},
    }
    print(json.dumps(summary) if args.json else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
