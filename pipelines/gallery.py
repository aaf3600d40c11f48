"""Gallery changes and their index: add (incremental index update), reindex (full rebuild)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lida_core import lifecycle
from lida_core.workspace import Workspace
from pipelines import index as gallery_index


def reindex(ws: Workspace) -> dict:
    """Rebuild the index of the current model from the gallery table; published atomically."""
    config = ws.config()
    version = ws.require_model_version()
    table = lifecycle.gallery_table(ws, version)
    vectors = np.asarray(table["embedding"].to_pylist(), dtype=np.float32) if len(table) else np.zeros((0, 1), np.float32)
    manifest = gallery_index.build_index(ws, version, config.fingerprint, table["image_id"].to_pylist(),
                                         table["source"].to_pylist(), vectors, config.unknown_accept)
    return {k: manifest[k] for k in ("index_version", "model_version", "count", "dimension", "kind", "unknown_threshold")}


def add(ws: Workspace, source: str, paths: Sequence[str], progress=lifecycle._quiet) -> dict:
    """`lida gallery add`: register, embed, and extend the index without a full rebuild.

    One lock covers both, so two adds at once cannot each extend the same old index.
    """
    ws.require()
    with ws.lock("gallery add"):
        return _add_locked(ws, source, paths, progress)


def _add_locked(ws: Workspace, source: str, paths: Sequence[str], progress) -> dict:
    result = lifecycle.gallery_add(ws, source, paths, progress, lock=False)
    config = ws.config()
    current = gallery_index.open_index(ws)
    if current is None or current.model_version != result["model_version"]:
        result["index"] = reindex(ws)
        return result
    table = lifecycle.gallery_table(ws, result["model_version"])
    indexed = set(zip(current.image_ids, current.sources, strict=True))
    rows = zip(table["image_id"].to_pylist(), table["source"].to_pylist(), strict=True)
    new = [i for i, pair in enumerate(rows) if pair not in indexed]
    if new:
        vectors = np.asarray([table["embedding"][i].as_py() for i in new], dtype=np.float32)
        manifest = gallery_index.add_to_index(ws, current, [table["image_id"][i].as_py() for i in new],
                                              [table["source"][i].as_py() for i in new], vectors, config.unknown_accept)
        result["index"] = {"index_version": manifest["index_version"], "count": manifest["count"], "incremental": True}
    else:
        result["index"] = {"index_version": current.version, "count": len(current.image_ids), "incremental": True}
    return result


def attribute_files(ws: Workspace, paths: Sequence[str]) -> list[dict]:
    """`lida attribute`: decisions for a few files now, in this process (no Beam, no server)."""
    from lida_core.decode import DecodeError, decode_image
    from lida_core.inputs import list_inputs, read_input

    config = ws.config()
    loaded = lifecycle.load_model(ws)
    decider, index = gallery_index.query_decider(ws, loaded.version, loaded.meta, config)
    results, good, pixels = [], [], []
    for uri in [u for path in paths for u in list_inputs([path])]:  # in the order given
        try:
            pixels.append(decode_image(read_input(uri), uri).pixels)
            good.append(len(results))
            results.append({"uri": uri})
        except (DecodeError, OSError) as exc:
            results.append({"uri": uri, "error": getattr(exc, "reason", str(exc))})
    if pixels:
        emb = loaded.embed(pixels)
        k = min(index.index.ntotal, max(config.k, config.top_k) * 8) if index else 0
        sims, ids = index.search(emb, k, loaded.version) if k else (np.zeros((len(emb), 0)), np.zeros((len(emb), 0), int))
        for row, position in enumerate(good):
            labels = [index.sources[j] for j in ids[row] if j >= 0] if k else []
            results[position].update(decider.decide_from_similarities(emb[row], sims[row][: len(labels)], labels))
            results[position].update(model_version=loaded.version, index_version=index.version if index else "none",
                                     fingerprint=config.fingerprint)
    return results


def adapt_and_reindex(ws: Workspace, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                      progress=lifecycle._quiet) -> dict:
    """`lida adapt`: one lock over adaptation and the index rebuild, so no scan sees the new model before its index."""
    ws.require()
    with ws.lock("adapt"):
        result = lifecycle.adapt_version(ws, epochs, lr, seed, progress, lock=False)
        if result["promoted"]:
            result["index"] = reindex(ws)
    return result
