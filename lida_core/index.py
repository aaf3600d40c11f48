"""The attribution index: FAISS over the gallery table of one model version.

Inner product over L2-normalised float32 vectors (= cosine). The index type follows the
vector count and the workspace's memory budget (`index_memory_mb`, `choose_index`), as
autofaiss reasons: exact (`IndexFlatIP`) while the vectors fit and number under
IVF_THRESHOLD; IVF over full vectors (`IndexIVFFlat`, nlist ~ 4 sqrt(n)) above it; and, when
full vectors would not fit, IVF over product-quantised codes (`IndexIVFPQ`, m bytes a vector,
the largest m that fits). Row ids go through IndexIDMap2; a sidecar `ids.parquet` maps them
back to (image id, source), so a reader loads two Arrow columns instead of JSON lists. The
manifest records model version, index version, kind, the memory it was sized for, count,
dimension, fingerprint settings, calibrated open-set threshold and build time.

Publication is atomic: a version folder `indexes/iNNNN/` is written whole under a staging
name, renamed, and only then does `indexes/CURRENT` move. A reader opens one version and
never sees a partial index.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass, replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lida_core.decide import Decider, calibrate_unknown_threshold, image_key
from lida_core.workspace import INDEXES, Workspace, WorkspaceConfig, WorkspaceError, utc_now

IVF_THRESHOLD = 200_000


class IndexMismatch(WorkspaceError):
    """Embeddings from one model version queried against an index of another."""


@dataclass
class GalleryIndex:
    version: str
    manifest: dict
    index: faiss.Index
    sources: list[str]
    image_ids: list[str]
    # "cuda" (or "cpu", for tests): search exactly with lida_core.accel.exact_topk instead of FAISS
    exact_device: str | None = None
    _exact: tuple | None = None

    @property
    def model_version(self) -> str:
        return self.manifest["model_version"]

    def search(self, queries: np.ndarray, k: int, model_version: str) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, row ids) for normalised queries from `model_version`."""
        if model_version != self.model_version:
            raise IndexMismatch(
                f"index {self.version} holds embeddings of model {self.model_version}, not {model_version}; run 'lida reindex'"
            )
        if queries.shape[1] != self.manifest["dimension"]:
            raise IndexMismatch(f"query dimension {queries.shape[1]} != index dimension {self.manifest['dimension']}")
        k = min(k, self.index.ntotal)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        flat = faiss.downcast_index(self.index.index) if self.exact_device and isinstance(self.index, faiss.IndexIDMap2) else None
        if isinstance(flat, faiss.IndexFlat):
            import torch

            from lida_core.accel import exact_topk

            if self._exact is None:  # the gallery moved to the device once per index
                vectors = torch.from_numpy(flat.reconstruct_n(0, flat.ntotal)).to(self.exact_device)
                self._exact = (vectors, faiss.vector_to_array(self.index.id_map))
            sims, rows = exact_topk(queries, self._exact[0], k, self.exact_device)
            return sims, self._exact[1][rows]
        return self.index.search(queries, k)


PQ_MIN_VECTORS = 39 * 256  # a product quantiser's 256 centroids per sub-vector: FAISS asks for 39 points each


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index a gallery gets, and the memory it is estimated to take."""

    kind: str  # IndexFlatIP | IndexIVFFlat | IndexIVFPQ
    nlist: int = 0
    m: int = 0  # IndexIVFPQ: bytes per vector (sub-quantisers of 8 bits)
    bytes: int = 0


def choose_index(n: int, dim: int, budget_bytes: int) -> IndexPlan:
    """The index for n vectors of `dim` within `budget_bytes` (vectors or codes, ids, centroids, codebooks).

    Raises WorkspaceError when not even the smallest codes fit: the budget is then the user's to raise.
    """
    ids = 8 * n  # IndexIDMap2's int64 ids
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS wants ~39 training points per centroid
    flat = 4 * n * dim + ids
    if n < IVF_THRESHOLD and flat <= budget_bytes:
        return IndexPlan("IndexFlatIP", bytes=flat)
    centroids = 4 * nlist * dim
    if flat + centroids <= budget_bytes:
        return IndexPlan("IndexIVFFlat", nlist=nlist, bytes=flat + centroids)
    if n >= PQ_MIN_VECTORS:
        for m in sorted((m for m in range(1, dim // 2 + 1) if dim % m == 0), reverse=True):  # >= 2 dimensions a byte
            need = n * (m + 8) + centroids + 4 * 256 * dim  # codes and ids, coarse centroids, PQ codebooks
            if need <= budget_bytes:
                return IndexPlan("IndexIVFPQ", nlist=nlist, m=m, bytes=need)
    raise WorkspaceError(f"a gallery of {n} vectors of {dim} dimensions does not fit in index_memory_mb "
                         f"{budget_bytes / 2**20:.0f}; raise it ('lida config index_memory_mb N')")


def _build_faiss(vectors: np.ndarray, ids: np.ndarray, plan: IndexPlan | None = None) -> faiss.Index:
    n, dim = vectors.shape
    plan = plan or IndexPlan("IndexFlatIP")
    if plan.kind == "IndexFlatIP":
        base = faiss.IndexFlatIP(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        if plan.kind == "IndexIVFPQ":
            base = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.m, 8, faiss.METRIC_INNER_PRODUCT)
        else:
            base = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(np.ascontiguousarray(vectors, dtype=np.float32))
        base.nprobe = min(plan.nlist, max(8, plan.nlist // 16))
    index = faiss.IndexIDMap2(base)
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


IDS_FILE = "ids.parquet"


def _publish(ws: Workspace, index: faiss.Index, manifest: dict, image_ids: list[str], sources: list[str]) -> str:
    ids = io.BytesIO()  # row id i -> (image_ids[i], sources[i])
    pq.write_table(pa.table({"image_id": pa.array(image_ids, pa.string()), "source": pa.array(sources, pa.string())}), ids)
    version = ws.publish_version(INDEXES, "i", 1, {"index.faiss": faiss.serialize_index(index).tobytes(), IDS_FILE: ids.getvalue()},
                                 "manifest.json", lambda name: {**manifest, "index_version": name})
    ws.write_bytes(f"{INDEXES}/CURRENT", (version + "\n").encode())
    prune(ws)
    return version


KEEP_INDEXES = 5  # the newest index versions kept; older ones go unless one is the current model's newest


def prune(ws: Workspace, keep: int = KEEP_INDEXES) -> list[str]:
    """Remove index versions nothing reads any more (a demo left 12); returns the names removed.

    Kept: the `keep` newest, the one CURRENT names, and the newest index of the current model
    (what `index_for_model` finds). Runs under the writer's workspace lock.
    """
    names = versions(ws)
    if len(names) <= keep:
        return []
    kept = set(names[-keep:])
    try:
        kept.add(ws.read_bytes(INDEXES, "CURRENT").decode().strip())
        model = ws.current_model_version()
    except (FileNotFoundError, WorkspaceError):
        model = None
    for name in reversed(names):
        try:
            if json.loads(ws.read_bytes(INDEXES, name, "manifest.json")).get("model_version") == model:
                kept.add(name)
                break
        except (FileNotFoundError, ValueError):
            continue
    removed = [n for n in names if n not in kept]
    for name in removed:
        ws.fs.rm(ws.path(INDEXES, name), recursive=True)
    return removed


def versions(ws: Workspace) -> list[str]:
    return ws.versions(INDEXES, "i")


def _source_counts(sources: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in sources:
        out[s] = out.get(s, 0) + 1
    return dict(sorted(out.items()))


def build_index(ws: Workspace, model_version: str, fingerprint: str, image_ids: list[str], sources: list[str],
                vectors: np.ndarray, unknown_accept: float, memory_mb: int | None = None) -> dict:
    """Full rebuild from gallery rows, of the type `choose_index` picks for the budget; returns the manifest."""
    started = time.perf_counter()
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors.reshape(len(image_ids), vectors.shape[-1] if vectors.ndim == 2 else -1)
    budget = (memory_mb if memory_mb is not None else WorkspaceConfig.index_memory_mb) * 2**20
    plan = choose_index(len(image_ids), int(vectors.shape[1]), budget)
    index = _build_faiss(vectors, np.arange(len(image_ids)), plan)
    manifest = {
        "model_version": model_version,
        "count": len(image_ids),
        "dimension": int(vectors.shape[1]),
        "fingerprint": fingerprint,
        "kind": type(faiss.downcast_index(index.index)).__name__,  # the real type (SWIG alone says "Index")
        "memory_budget_mb": budget // 2**20,
        "estimated_bytes": plan.bytes,
        "ids": IDS_FILE,
        "source_counts": _source_counts(sources),
        "unknown_threshold": calibrate_unknown_threshold(vectors, sources, unknown_accept) if len(vectors) else None,
        "built_at": utc_now().isoformat(),
        "build_seconds": time.perf_counter() - started,
    }
    manifest["index_version"] = _publish(ws, index, manifest, list(image_ids), list(sources))
    return manifest


def add_to_index(ws: Workspace, current: GalleryIndex, image_ids: list[str], sources: list[str], vectors: np.ndarray,
                 unknown_accept: float) -> dict:
    """Incremental add: the current index plus new vectors, published as a new version."""
    index = faiss.deserialize_index(faiss.serialize_index(current.index))
    start = len(current.image_ids)
    vectors = np.asarray(vectors, dtype=np.float32)
    index.add_with_ids(vectors, np.arange(start, start + len(image_ids), dtype=np.int64))
    all_sources = current.sources + list(sources)
    exact = isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
    all_vectors = np.vstack([index.reconstruct(i) for i in range(len(all_sources))]) if exact and len(all_sources) <= 50_000 else None
    manifest = {
        **{k: v for k, v in current.manifest.items() if k not in ("sources", "image_ids")},  # older manifests held them
        "count": len(all_sources),
        "ids": IDS_FILE,
        "source_counts": _source_counts(all_sources),
        "unknown_threshold": calibrate_unknown_threshold(all_vectors, all_sources, unknown_accept)
        if all_vectors is not None else current.manifest.get("unknown_threshold"),
        "built_at": utc_now().isoformat(),
        "parent_index": current.version,
    }
    manifest["index_version"] = _publish(ws, index, manifest, current.image_ids + list(image_ids), all_sources)
    return manifest


def fits_after_adding(current: GalleryIndex, added: int, memory_mb: int) -> bool:
    """Whether the current index's type is still the one `choose_index` picks with `added` more vectors."""
    try:
        plan = choose_index(current.index.ntotal + added, current.manifest["dimension"], memory_mb * 2**20)
    except WorkspaceError:
        return False
    return plan.kind == current.manifest.get("kind") and current.manifest.get("memory_budget_mb", memory_mb) == memory_mb


def open_index(ws: Workspace, version: str | None = None) -> GalleryIndex | None:
    """The published index (CURRENT, or `version`); None when none was ever built.

    The pointer is read as untrusted: only a name like `i0007` that is published under indexes/.
    """
    if version is None:
        try:
            version = ws.read_bytes(INDEXES, "CURRENT").decode(errors="replace").strip()
        except FileNotFoundError:
            return None
    if not re.fullmatch(r"i\d{4,}", version):
        raise WorkspaceError(f"indexes/CURRENT points at {version[:80]!r}, which is not an index version")
    try:
        manifest = json.loads(ws.read_bytes(INDEXES, version, "manifest.json"))
        data = ws.read_bytes(INDEXES, version, "index.faiss")
    except FileNotFoundError:
        raise WorkspaceError(f"index {version} is missing or incomplete") from None
    except ValueError:
        raise WorkspaceError(f"index {version}: its manifest is not valid JSON") from None
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if "image_ids" in manifest:  # published before the ids moved to their sidecar
        return GalleryIndex(version, manifest, index, manifest["sources"], manifest["image_ids"])
    try:
        ids = pq.read_table(io.BytesIO(ws.read_bytes(INDEXES, version, manifest.get("ids", IDS_FILE))))
    except FileNotFoundError:
        raise WorkspaceError(f"index {version} is missing its ids file") from None
    if ids.num_rows != index.ntotal:
        raise WorkspaceError(f"index {version}: {ids.num_rows} ids for {index.ntotal} vectors")
    return GalleryIndex(version, manifest, index, ids["source"].to_pylist(), ids["image_id"].to_pylist())


def index_for_model(ws: Workspace, model_version: str) -> GalleryIndex | None:
    """The newest published index built for this model version (CURRENT first); None when there is none.

    A model version and its index are published one after the other, so a process killed in
    between leaves CURRENT on the other one: looking the index up by model keeps the current
    model usable whichever pointer moved last.
    """
    current = open_index(ws)
    if current is None or current.model_version == model_version:
        return current
    for version in reversed(versions(ws)):
        try:
            manifest = json.loads(ws.read_bytes(INDEXES, version, "manifest.json"))
        except (FileNotFoundError, ValueError):
            continue
        if manifest.get("model_version") == model_version and ws.exists(INDEXES, version, "index.faiss"):
            return open_index(ws, version)
    return current


def query_decider(ws: Workspace, model_version: str, meta: dict, config: WorkspaceConfig) -> tuple[Decider, GalleryIndex | None]:
    """What queries are decided with: the model's calibrated rule + the index's open-set threshold.

    Refuses an index built for another model version, and a model with no real prototype yet.
    """
    index = index_for_model(ws, model_version)
    if index is not None and index.model_version != model_version:
        raise IndexMismatch(f"the published index is for model {index.model_version}, not {model_version}; run 'lida reindex'")
    if not meta.get("decider"):
        raise WorkspaceError("the current model has no real prototype yet: run 'lida pretrain' or 'lida adapt' first")
    base = Decider.from_dict(meta["decider"])
    unknown = index.manifest.get("unknown_threshold") if index else None
    return replace(base, unknown_threshold=unknown).configured(config), index


def search_and_decide(decider: Decider, index: GalleryIndex | None, embeddings: np.ndarray, jpeg: list[bool],
                      model_version: str, quality: list[int | None] | None = None,
                      dims: list[tuple[int, int] | None] | None = None) -> list[dict]:
    """Each embedding's decision against the index (searched once for all): the one search-then-decide.

    `jpeg`: which inputs were JPEG files; `quality`: their JPEG qualities (`decode.jpeg_quality`), None where unknown;
    `dims`: their (height, width), None where unknown (the threshold of images smaller than the model's view).
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    k = min(index.index.ntotal, max(decider.k, decider.top_k) * 8) if index is not None and len(embeddings) else 0
    if k:
        sims, ids = index.search(embeddings, k, model_version)
    else:
        sims, ids = np.zeros((len(embeddings), 0), np.float32), np.zeros((len(embeddings), 0), np.int64)
    neighbours, keys, viewed = [], [], bool(decider.jpeg_gallery)  # keys name what a JPEG query meets through the view
    for row in range(len(embeddings)):
        found = [j for j in ids[row] if j >= 0] if k else []
        neighbours.append((sims[row][: len(found)], [index.sources[j] for j in found]))
        keys.append([image_key(index.sources[j], index.image_ids[j]) for j in found] if viewed and jpeg[row] else [])
    return decider.decide_neighbours(embeddings, neighbours, jpeg, quality, keys, dims)
