"""The attribution index: its type follows the vector count and the memory budget; ids live in a sidecar."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_lida
from lida_core import index as gallery_index
from lida_core.workspace import Workspace, WorkspaceError


def test_index_type_follows_count_and_budget():
    mib = 2**20
    assert gallery_index.choose_index(1000, 128, 64 * mib).kind == "IndexFlatIP"
    big = gallery_index.choose_index(gallery_index.IVF_THRESHOLD, 128, 4096 * mib)
    assert big.kind == "IndexIVFFlat" and big.nlist == int(4 * gallery_index.IVF_THRESHOLD**0.5)
    squeezed = gallery_index.choose_index(1_000_000, 2048, 512 * mib)  # 8 GB of float32 vectors in 512 MiB
    assert squeezed.kind == "IndexIVFPQ" and 2048 % squeezed.m == 0 and squeezed.bytes <= 512 * mib
    assert gallery_index.choose_index(1_000_000, 2048, 1024 * mib).m > squeezed.m  # more room, finer codes
    with pytest.raises(WorkspaceError, match="raise it"):
        gallery_index.choose_index(10_000_000, 2048, 16 * mib)


@pytest.fixture()
def ws(tmp_path):
    run_lida(tmp_path / "ws", "init", "--profile", "small")
    return Workspace(str(tmp_path / "ws"))


def _clustered(rng, sources: int, per_source: int, dim: int, spread: float):
    centres = rng.normal(size=(sources, dim))
    labels = np.repeat(np.arange(sources), per_source)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels, centres


def test_a_gallery_over_budget_gets_compressed_codes_that_still_attribute(ws, rng):
    vectors, labels, centres = _clustered(rng, 40, 250, 32, 0.6)  # 10,000 x 32: 1.3 MB as float32
    ids = [f"img{i:05d}" for i in range(len(vectors))]
    sources = [f"gen{s:02d}" for s in labels]
    manifest = gallery_index.build_index(ws, "v0000", "fp", ids, sources, vectors, 0.95, memory_mb=1)
    assert manifest["kind"] == "IndexIVFPQ" and manifest["estimated_bytes"] <= 2**20
    folder = ws.path("indexes", manifest["index_version"])
    assert (ws.fs.size(f"{folder}/index.faiss") + ws.fs.size(f"{folder}/ids.parquet")) <= 2**20
    saved = json.loads(ws.read_bytes("indexes", manifest["index_version"], "manifest.json"))
    assert "image_ids" not in saved and "sources" not in saved and saved["source_counts"]["gen07"] == 250
    index = gallery_index.open_index(ws)
    assert index.index.ntotal == len(index.sources) == 10_000 and index.image_ids[123] == "img00123"
    queries = centres[labels[::50]] + 0.6 * rng.normal(size=(len(labels[::50]), 32))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    _, rows = index.search(queries, 5, "v0000")
    top = [max(set(r), key=list(r).count) for r in [[index.sources[j] for j in row] for row in rows]]
    assert np.mean([t == f"gen{s:02d}" for t, s in zip(top, labels[::50], strict=True)]) >= 0.95
    exact = gallery_index.build_index(ws, "v0000", "fp", ids, sources, vectors, 0.95)  # the default budget
    assert exact["kind"] == "IndexFlatIP" and pq.read_table(f"{ws.path('indexes', exact['index_version'])}/ids.parquet").num_rows == 10_000


def test_incremental_adds_rebuild_when_the_index_type_no_longer_fits(ws, rng):
    vectors, labels, _ = _clustered(rng, 4, 100, 64, 0.5)
    first = gallery_index.build_index(ws, "v0000", "fp", [f"a{i}" for i in range(400)], [f"g{s}" for s in labels], vectors, 0.95)
    current = gallery_index.open_index(ws)
    assert first["kind"] == "IndexFlatIP" and gallery_index.fits_after_adding(current, 10, 4096)
    assert not gallery_index.fits_after_adding(current, 10_000, 2)  # 10,400 x 64 floats exceed 2 MiB: compressed codes
    assert not gallery_index.fits_after_adding(current, 10, 1024)  # another budget: rebuilt to its own plan
