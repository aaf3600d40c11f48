"""`lida demo`: the main job end to end in a fresh folder, and what it prints works."""

import json
import shlex
import subprocess

import pytest

from conftest import LIDA


@pytest.mark.slow
def test_demo_end_to_end_and_its_query_example(tmp_path):
    folder = tmp_path / "demo"
    result = subprocess.run([LIDA, "--json", "demo", "--dir", str(folder), "--pretrain-epochs", "1", "--adapt-epochs", "3"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["scan"]["images"] == 56 and out["scan"]["status"] == {"ok": 56}
    assert (folder / "workspace" / "reports" / "demo.html").exists()
    for table in ("images", "embeddings", "attributions", "gallery"):
        assert list((folder / "workspace" / "tables" / table).rglob("*.parquet")), table
    query = subprocess.run(shlex.split(out["query_example"].replace("lida ", f"{LIDA} --json ", 1)),
                           capture_output=True, text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    rows = json.loads(query.stdout)
    assert sum(r["n"] for r in rows) == 56
    # A second demo replaces its own folder
    again = subprocess.run([LIDA, "--json", "demo", "--dir", str(folder), "--pretrain-epochs", "1", "--adapt-epochs", "1"],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
