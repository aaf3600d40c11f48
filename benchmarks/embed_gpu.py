"""The embed path at the speed of the hardware: correctness first, then img/s and ratios, in one call.

Checks (exit 1 if any fails):
- the device fingerprint (CPU half `x & mask`, device half scale/binarise + fit) is bit-identical
  to the CPU fingerprint on every generated JPEG, for the profile's settings and the paper's
  binary and patch variants;
- DeviceEmbedder embeddings agree with the float32 CPU path (cosine >= 0.99 under bf16);
- exact device search returns FAISS flat search's neighbours.

Timings (synthetic 512x512 JPEGs, q90, written once into a temporary folder):
- authors: a re-statement of the released code's path, one image at a time: decode, fingerprint
  ((x & 7) * 36), resize to the input size, forward at batch 1;
- encoder: the bare encoder on a fixed batch (bf16 + channels_last [+ torch.compile] on CUDA);
- decode: Pillow decode + low-bit extraction alone on all cores (the CPU ceiling);
- ours: DeviceEmbedder.embed_files end to end (decode workers -> pinned batches -> device).
It prints ours / min(encoder, decode) (target >= 0.85) and ours / authors (target >= 25x on a GPU).

    .venv/bin/python benchmarks/embed_gpu.py [--profile paper] [--images 2000] [--device auto] [--compile]
On this 2-core CPU: .venv/bin/python benchmarks/embed_gpu.py --profile small --images 200
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lida_core import accel, embed  # noqa: E402
from lida_core.decode import decode_image  # noqa: E402
from lida_core.fingerprint import FingerprintSettings, fingerprint_bits, load_tile_bits, pillow_bilinear_resize  # noqa: E402
from lida_core.model import build_model  # noqa: E402


def write_jpegs(folder: Path, count: int, size: int = 512) -> list[str]:
    """Smooth random content plus noise, JPEG q90 (4:2:0), like camera or generator output."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-6, 7, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def authors_path(model, paths: list[str], device: torch.device, seconds: float) -> float:
    """One image at a time, float32, as the released code does (restated, not copied)."""
    model = model.to(device).eval()
    size = model.input_size
    done, started = 0, time.perf_counter()
    with torch.no_grad():
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            fp = ((pixels & 7) * 36).astype(np.uint8)
            fp = pillow_bilinear_resize(fp, size, size)
            x = torch.from_numpy(np.ascontiguousarray(fp)).permute(2, 0, 1)[None].float().div(255).to(device)
            model(x)
            sync(device)
            done += 1
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def encoder_ceiling(embedder: accel.DeviceEmbedder, seconds: float) -> float:
    size, batch = embedder.model.input_size, embedder.batch_size
    x = torch.rand(batch, 3, size, size, device=embedder.device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(embedder.device.type, dtype=torch.bfloat16, enabled=embedder.autocast):
        for _ in range(3):
            embedder.forward(x)
        sync(embedder.device)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 3 * batch:
            embedder.forward(x)
            done += batch
        sync(embedder.device)
    return done / (time.perf_counter() - started)


def decode_ceiling(paths: list[str], settings: str, size: int, tiles: int, workers: int) -> float:
    jobs = [(i, p, settings, size, tiles) for i, p in enumerate(paths)]
    with mp.get_context("spawn").Pool(workers) as pool:
        list(pool.imap_unordered(load_tile_bits, jobs[: workers * 2], chunksize=1))  # workers up
        started = time.perf_counter()
        for _ in pool.imap_unordered(load_tile_bits, jobs, chunksize=4):
            pass
        return len(paths) / (time.perf_counter() - started)


def checks(model, embedder: accel.DeviceEmbedder, paths: list[str]) -> dict:
    results = {}
    variants = [model.fingerprint, FingerprintSettings(mode="binary", fit="resize", size=model.input_size),
                FingerprintSettings(region="patch", patch=32, patch_select="max", fit="resize", size=model.input_size)]
    same = True
    for settings in variants:
        for path in paths[:64]:
            pixels = decode_image(Path(path).read_bytes(), path).pixels
            kept = torch.from_numpy(accel.prepare(pixels, settings))[None].to(embedder.device)
            same &= bool(np.array_equal(accel.finish(kept, settings)[0].cpu().numpy(), fingerprint_bits(pixels, settings)))
    results["fingerprint_identical"] = same

    sample = [decode_image(Path(p).read_bytes(), p).pixels for p in paths[:32]]
    reference = embed.embed(model.to("cpu").float(), sample)
    device_emb = embedder.embed(sample)
    results["embedding_min_cosine"] = float(np.min(np.sum(reference * device_emb, axis=1)))
    import faiss

    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(5000, model.embedding_dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(model.embedding_dim)
    index.add(gallery)
    _, want = index.search(device_emb, 10)
    _, got = accel.exact_topk(device_emb, gallery, 10, embedder.device, chunk=2048)
    results["search_identical"] = bool(np.array_equal(want, got))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper", choices=["paper", "small"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    parser.add_argument("--batch", type=int, help="default: chosen for the card (32 on CPU)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit of the slow authors' path")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    model = build_model(args.profile)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU)"
    say(f"device: {card}; profile {args.profile} ({model.input_size}px, {model.fingerprint}); {args.images} JPEGs 512x512")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        embedder = accel.DeviceEmbedder(build_model(args.profile).eval(), device, args.batch, compile=args.compile)
        embedder.model.load_state_dict(model.state_dict())
        ok = checks(model, embedder, paths)
        say(f"checks: {json.dumps(ok)}")
        rates = {}
        rates["authors"] = authors_path(build_model(args.profile), paths, device, args.seconds)
        say(f"authors' path (batch 1, float32): {rates['authors']:8.1f} img/s")
        # a crop-fit profile embeds several tiles of a 512 px image: the ceiling counts images, not views
        views = len(accel.tile_views(np.zeros((512, 512, 3), np.uint8), model.input_size, embedder.tiles))
        rates["encoder"] = encoder_ceiling(embedder, 10.0) / views
        say(f"bare encoder (batch {embedder.batch_size}{', bf16' if embedder.cuda else ''}, channels_last"
            f"{', compiled' if args.compile else ''}, {views} view(s) per image): {rates['encoder']:8.1f} img/s")
        rates["decode"] = decode_ceiling(paths, str(model.fingerprint), model.input_size, embedder.tiles, args.workers)
        say(f"decode + low bits alone, {args.workers} processes: {rates['decode']:8.1f} img/s")
        embedder.embed_files(paths[: 2 * args.workers], args.workers)  # warm-up
        started = time.perf_counter()
        _, errors = embedder.embed_files(paths, args.workers)
        sync(device)
        rates["ours"] = len(paths) / (time.perf_counter() - started)
        say(f"ours end to end (embed_files): {rates['ours']:8.1f} img/s ({len(errors)} errors)")
    ceiling = min(rates["encoder"], rates["decode"])
    ratios = {"ours_vs_ceiling": rates["ours"] / ceiling, "ours_vs_authors": rates["ours"] / rates["authors"]}
    say(f"ours / min(encoder, decode) = {ratios['ours_vs_ceiling']:.2f} (target >= 0.85); "
        f"ours / authors = {ratios['ours_vs_authors']:.1f}x (target >= 25x on a GPU)")
    passed = ok["fingerprint_identical"] and ok["search_identical"] and ok["embedding_min_cosine"] >= 0.99
    summary = {"device": card, "profile": args.profile, "images": args.images, "workers": args.workers,
               "batch": embedder.batch_size, "compile": args.compile, "checks": ok,
               "img_per_s": {k: round(v, 1) for k, v in rates.items()}, "ratios": {k: round(v, 3) for k, v in ratios.items()}}
    print(json.dumps(summary) if args.json else "")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
