"""Peak memory of one scan of hostile files, and a re-run of the same scan id (issue #12's acceptance).

    .venv/bin/python benchmarks/hostile_scan.py [--workdir DIR]

Builds one folder: corrupt, truncated, header-only bombs, odd pixel modes, a name that is not
UTF-8, a symlink to /dev/zero, a FIFO, a sparse file over the byte cap, 16 truncated JPEGs whose
header says 8000x8000, 16 valid 8000x8000 JPEGs (192 MB each decoded) and 16 PNGs of 40 MB.
Runs `lida demo`'s workspace through `lida scan` with default settings, polling the resident
memory of the whole process tree (psutil), then runs the same scan id again. Prints entries,
rows, statuses, peak RSS and both exit codes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from common import LIDA
from PIL import Image


def build(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / "good.png")
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes((folder / "good.png").read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_bytes(b"<html>not an image</html>")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    Image.fromarray((rng.integers(0, 256, (40, 40)) * 257).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg")
    (folder / "noext").write_bytes(data)
    (folder / ".hidden.png").write_bytes(data[:-1] + b"\x00")
    (folder / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.png")
    with open(folder / "huge.png", "wb") as handle:
        handle.truncate(300 * 1024 * 1024)
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 8000)).save(buffer, "JPEG", quality=1)
    for i in range(16):
        (folder / f"trunc{i:02d}.jpg").write_bytes(buffer.getvalue()[:9000])
        valid = io.BytesIO()
        Image.new("RGB", (8000, 8000), (i * 10, 3, 7)).save(valid, "JPEG", quality=1)
        (folder / f"big{i:02d}.jpg").write_bytes(valid.getvalue())
    noise = rng.integers(0, 256, (3650, 3650, 3), dtype=np.uint8)
    for i in range(16):
        noise[0, 0, 0] = i
        Image.fromarray(noise).save(folder / f"noise{i:02d}.png", compress_level=0)


def scan(workspace: Path, folder: Path, scan_id: str) -> tuple[int, float, float]:
    """(exit code, peak RSS of the process tree in MB, seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen([LIDA, "--workspace", str(workspace), "--json", "scan", str(folder), "--scan-id", scan_id],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, peak = psutil.Process(process.pid), 0.0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.1)
    return process.returncode, peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lida-hostile-"))
    folder = work / "hostile"
    build(folder)
    entries = len(os.listdir(folder))
    subprocess.run([LIDA, "demo", "--dir", str(work / "demo")], check=True, capture_output=True)
    workspace = work / "demo" / "workspace"
    first = scan(workspace, folder, "hostile")
    second = scan(workspace, folder, "hostile")
    rows = subprocess.run([LIDA, "--workspace", str(workspace), "--json", "query",
                           "select status, count(*) n from images where scan_id = 'hostile' group by 1 order by 1"],
                          capture_output=True, text=True, check=True)
    statuses = {r["status"]: r["n"] for r in json.loads(rows.stdout.strip().splitlines()[-1])}
    print(f"entries {entries}, rows {sum(statuses.values())}, statuses {statuses}")
    print(f"first scan: exit {first[0]}, peak RSS {first[1]:.0f} MB, {first[2]:.1f} s")
    print(f"same scan id again: exit {second[0]}, peak RSS {second[1]:.0f} MB, {second[2]:.1f} s")


if __name__ == "__main__":
    main()
