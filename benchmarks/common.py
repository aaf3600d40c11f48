"""Shared by the benchmarks: run the installed `lida` command as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LIDA = str(Path(sys.executable).with_name("lida"))


def lida(workspace: Path, *args: str) -> dict:
    """Run `lida --json ...`; returns its JSON answer plus `_seconds`, or exits with its error."""
    started = time.perf_counter()
    result = subprocess.run([LIDA, "--workspace", str(workspace), "--json", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"lida {' '.join(args)} failed: {result.stderr[-2000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["_seconds"] = time.perf_counter() - started
    return out
