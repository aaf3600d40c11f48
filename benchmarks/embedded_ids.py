"""What each attribution worker holds to keep one embeddings row per image and model.

A scan's attribution workers each load the ids of every image their model embedded in other
scans (`pipelines.scan.embedded_elsewhere`), so that memory grows with the workspace's history,
not with the scan. This writes `--ids` synthetic image ids (SHA-256 hex, as lida writes them)
into `--files` embeddings files of a fresh workspace, then loads them twice in one run:

- **baseline**: a `frozenset` of the id strings, as the scan held them until session 14;
- **lida**: `embedded_elsewhere` as it is now (`lida_core.idset.ImageIds`, sorted digests).

For each it prints the Python heap kept after loading and its peak while loading (tracemalloc;
numpy's buffers are counted, Arrow's are not, and Arrow's are freed file by file), the seconds to
load, and the time for 256 membership checks (one shard); then the ratio of kept bytes.

    .venv/bin/python benchmarks/embedded_ids.py [--ids 1000000] [--files 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402,F401  (puts the project on sys.path)

from lida_core.workspace import Workspace, table_folder  # noqa: E402
from pipelines.scan import embedded_elsewhere  # noqa: E402

MODEL = "bench-model"


def baseline(ws: Workspace, scan_id: str) -> frozenset[str]:
    """The scan's set before session 14: every id as a Python string."""
    folder = ws.path(table_folder("embeddings", MODEL))
    own = re.compile(rf"scan-{re.escape(scan_id)}-\d{{6}}\.parquet")
    ids: set[str] = set()
    for path in ws.fs.find(folder):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith(".") and not own.fullmatch(name):
            with ws.fs.open(path, "rb") as handle:
                ids.update(pq.read_table(handle, columns=["image_id"])["image_id"].to_pylist())
    return frozenset(ids)


def measure(load, probe: list[str]):
    tracemalloc.start()
    started = time.perf_counter()
    held = load()
    seconds = time.perf_counter() - started
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    started = time.perf_counter()
    hits = sum(1 for i in probe if i in held)
    check = time.perf_counter() - started
    return held, kept, peak, seconds, check, hits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        folder = Path(ws.path(table_folder("embeddings", MODEL)))
        folder.mkdir(parents=True)
        per_file = -(-args.ids // args.files)
        written = 0
        for f in range(args.files):
            ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(written, min(written + per_file, args.ids))]
            pq.write_table(pa.table({"image_id": pa.array(ids, pa.string())}), folder / f"scan-past-{f:06d}.parquet")
            written += len(ids)
        probe = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.ids - 128, args.ids + 128)]  # half known
        print(f"{args.ids:,} ids in {args.files:,} files")
        print("| set | kept MiB | peak MiB | load s | 256 checks ms | known of 256 |")
        print("|---|---|---|---|---|---|")
        rows = {}
        for name, load in (("baseline: frozenset of str", lambda: baseline(ws, "now")),
                           ("lida: sorted digests", lambda: embedded_elsewhere(ws, MODEL, "now"))):
            held, kept, peak, seconds, check, hits = measure(load, probe)
            assert len(held) == args.ids and hits == 128, (name, len(held), hits)
            rows[name] = kept
            print(f"| {name} | {kept / 2**20:.1f} | {peak / 2**20:.1f} | {seconds:.2f} | {check * 1e3:.1f} | {hits} |")
            del held
        base, ours = rows.values()
        print(f"kept bytes per id: baseline {base / args.ids:.0f}, lida {ours / args.ids:.0f}; ratio {base / max(ours, 1):.1f}x less")


if __name__ == "__main__":
    main()
