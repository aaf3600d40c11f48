"""The attribution index: FAISS over the gallery table of one model version.

Exact inner product over L2-normalised float32 vectors (= cosine) by default; above
`ivf_threshold` vectors an IVF index (nlist ~ 4 sqrt(n), nprobe set for recall) keeps search
fast within memory, as autofaiss reasons. Ids go through IndexIDMap2; the manifest maps
ids back to (image id, source) and records model version, index version, count, dimension,
fingerprint settings, calibrated open-set threshold and build time.

Publication is atomic: a version folder `indexes/iNNNN/` is written whole under a staging
name, renamed, and only then does `indexes/CURRENT` move. A reader opens one version and
never sees a partial index.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, replace

import faiss
import numpy as np

from lida_core.training import Decider, calibrate_unknown_threshold
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


def _build_faiss(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    n, dim = vectors.shape
    if n >= IVF_THRESHOLD:
        nlist = int(4 * math.sqrt(n))
        quantizer = faiss.IndexFlatIP(dim)
        base = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        base.train(vectors)
        base.nprobe = max(8, nlist // 16)
    else:
        base = faiss.IndexFlatIP(dim)
    index = faiss.IndexIDMap2(base)
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


def _publish(ws: Workspace, index: faiss.Index, manifest: dict) -> str:
    staging = ws.path(INDEXES, f".staging-{uuid.uuid4().hex}")
    ws.fs.makedirs(staging, exist_ok=True)
    with ws.fs.open(f"{staging}/index.faiss", "wb") as handle:
        handle.write(faiss.serialize_index(index).tobytes())
    while True:
        existing = versions(ws)
        version = f"i{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
        with ws.fs.open(f"{staging}/manifest.json", "w") as handle:
            json.dump({**manifest, "index_version": version}, handle, indent=1)
        target = ws.path(INDEXES, version)
        try:
            if ws.local:
                os.rename(staging, target)
            elif not ws.fs.exists(target):
                ws.fs.mv(staging, target, recursive=True)
            else:
                continue
            break
        except OSError:
            if not ws.fs.exists(target):
                raise
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
    if not ws.exists(INDEXES):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in ws.fs.ls(ws.path(INDEXES), detail=False)]
    return sorted((n for n in names if n.startswith("i") and n[1:].isdigit()), key=lambda n: int(n[1:]))


def build_index(ws: Workspace, model_version: str, fingerprint: str, image_ids: list[str], sources: list[str],
                vectors: np.ndarray, unknown_accept: float) -> dict:
    """Full rebuild from gallery rows; returns the manifest."""
    started = time.perf_counter()
    vectors = np.asarray(vectors, dtype=np.float32)
    vectors = vectors.reshape(len(image_ids), vectors.shape[-1] if vectors.ndim == 2 else -1)
    index = _build_faiss(vectors, np.arange(len(image_ids)))
    manifest = {
        "model_version": model_version,
        "count": len(image_ids),
        "dimension": int(vectors.shape[1]),
        "fingerprint": fingerprint,
        "kind": type(faiss.downcast_index(index.index)).__name__,  # IndexFlatIP or IndexIVFFlat (SWIG says "Index")
        "sources": sources,
        "image_ids": image_ids,
        "unknown_threshold": calibrate_unknown_threshold(vectors, sources, unknown_accept) if len(vectors) else None,
        "built_at": utc_now().isoformat(),
        "build_seconds": time.perf_counter() - started,
    }
    manifest["index_version"] = _publish(ws, index, manifest)
    return manifest


def add_to_index(ws: Workspace, current: GalleryIndex, image_ids: list[str], sources: list[str], vectors: np.ndarray,
                 unknown_accept: float) -> dict:
    """Incremental add: the current index plus new vectors, published as a new version."""
    index = faiss.deserialize_index(faiss.serialize_index(current.index))
    start = len(current.image_ids)
    vectors = np.asarray(vectors, dtype=np.float32)
    index.add_with_ids(vectors, np.arange(start, start + len(image_ids), dtype=np.int64))
    all_sources = current.sources + list(sources)
    all_vectors = np.vstack([index.reconstruct(i) for i in range(len(all_sources))]) if len(all_sources) <= 50_000 else None
    manifest = {
        **current.manifest,
        "count": len(all_sources),
        "sources": all_sources,
        "image_ids": current.image_ids + list(image_ids),
        "unknown_threshold": calibrate_unknown_threshold(all_vectors, all_sources, unknown_accept)
        if all_vectors is not None else current.manifest.get("unknown_threshold"),
        "built_at": utc_now().isoformat(),
        "parent_index": current.version,
    }
    manifest["index_version"] = _publish(ws, index, manifest)
    return manifest


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
    return GalleryIndex(version, manifest, index, manifest["sources"], manifest["image_ids"])


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
    return replace(base, unknown_threshold=unknown, method=config.decision, k=config.k, top_k=config.top_k), index
