"""The gallery: labelled images per source, one table partition per model version, and its index.

A model version's gallery rows hold each registered image's embedding by that model
(`tables/gallery/model_version=vNNNN/`); the original bytes live in the workspace blobs, so a
new model version re-embeds them (`carry`). The attribution index is built from these rows:
`reindex` rebuilds it, `index_with` extends it by new rows without a rebuild when it can.
Registering images (decode, embed in parallel) is the Beam job in `pipelines/gallery.py`.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

import schemas
from lida_core import index as gallery_index
from lida_core.decide import UNKNOWN
from lida_core.decode import decode_image
from lida_core.workspace import Workspace, WorkspaceError, table_folder

if TYPE_CHECKING:
    from lida_core.lifecycle import LoadedModel

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def check_source_name(source: str) -> str:
    if not _SOURCE_NAME.match(source) or source == UNKNOWN:
        raise WorkspaceError(f"invalid source name {source!r}: letters, digits and _ . + - (not 'unknown')")
    return source


def table(ws: Workspace, version: str) -> pa.Table:
    """A model version's gallery rows, one per (image, source): a re-added image keeps its first registration.

    Rows come in registration order (then source and image id), not in the order of their
    part files' random names: a closed-form fit draws its JPEG copies in row order, so the same
    registrations give the same fit in every workspace, and a growing gallery keeps its earlier
    rows in place.
    """
    rows = ws.read_parquet(table_folder("gallery", version))
    if rows is None:
        return schemas.schema("gallery", 1).empty_table().drop(["embedding"])
    rows = rows.sort_by([("added_at", "ascending"), ("source", "ascending"), ("image_id", "ascending")])
    rows = rows.append_column("model_version", pa.array([version] * len(rows)))
    seen, keep = set(), []
    for i, (image_id, source) in enumerate(zip(rows["image_id"].to_pylist(), rows["source"].to_pylist(), strict=True)):
        if (image_id, source) not in seen:
            seen.add((image_id, source))
            keep.append(i)
    return rows.take(keep)


def write_rows(ws: Workspace, version: str, rows: list[dict], dim: int) -> None:
    if rows:
        ws.write_table(f"{table_folder('gallery', version)}/part-{uuid.uuid4().hex}.parquet", "gallery",
                       pa.Table.from_pylist(rows), dim)


def summary(ws: Workspace) -> dict:
    """`lida gallery list`: the current model's sources and their image counts."""
    current = ws.require_model_version()
    rows = table(ws, current)
    counts: dict[str, int] = {}
    for s in rows["source"].to_pylist():
        counts[s] = counts.get(s, 0) + 1
    return {"model_version": current, "sources": dict(sorted(counts.items())), "images": len(rows)}


def images(ws: Workspace, version: str) -> tuple[list[np.ndarray], list[str], list[str]]:
    """(decoded pixels, sources, image ids) of a model version's gallery, from the blobs."""
    rows = table(ws, version)
    ids, sources = rows["image_id"].to_pylist(), rows["source"].to_pylist()
    space = ws.config().jpeg_space  # as the workspace's models read a JPEG
    return [decode_image(ws.get_blob(i), i, jpeg_space=space).pixels for i in ids], sources, ids


def carry(ws: Workspace, parent: str, model: LoadedModel, version: str, pixels: list[np.ndarray] | None = None) -> int:
    """The parent version's gallery rows, re-embedded by `model`, written for `version`; returns how many."""
    rows = table(ws, parent)
    if not len(rows):
        return 0
    if pixels is None:
        pixels = images(ws, parent)[0]
    emb = model.embed(pixels)
    out = [
        {**{k: rows[k][i].as_py() for k in ("image_id", "uri", "source", "added_at")}, "model_version": version,
         "fingerprint": str(model.model.fingerprint), "embedding": emb[i].tolist()}
        for i in range(len(rows))
    ]
    write_rows(ws, version, out, model.model.embedding_dim)
    return len(out)


def _index_rows(ws: Workspace, version: str, staged: pa.Table | None) -> pa.Table:
    """(image_id, source, embedding) of a model's gallery table, followed by staged rows."""
    parts = [t.select(["image_id", "source", "embedding"]) for t in (table(ws, version), staged)
             if t is not None and len(t)]
    if not parts:
        return pa.table({"image_id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                         "embedding": pa.array([], pa.list_(pa.float32()))})
    return pa.concat_tables([p.cast(parts[0].schema) for p in parts])


def reindex(ws: Workspace, version: str | None = None, staged: pa.Table | None = None) -> dict:
    """Rebuild the index of a model version (the current one) from its gallery rows (plus `staged` rows); published atomically."""
    config = ws.config()
    version = version or ws.require_model_version()
    rows = _index_rows(ws, version, staged)
    if len(rows):
        vectors = np.asarray(rows["embedding"].to_pylist(), dtype=np.float32)
    else:  # an empty gallery still gets an (empty) index of the model's dimension
        from lida_core.lifecycle import load_model  # lifecycle imports this module

        vectors = np.zeros((0, load_model(ws, version).model.embedding_dim), np.float32)
    manifest = gallery_index.build_index(ws, version, config.fingerprint, rows["image_id"].to_pylist(),
                                         rows["source"].to_pylist(), vectors, config.unknown_accept, config.index_memory_mb)
    return {k: manifest[k] for k in ("index_version", "model_version", "count", "dimension", "kind", "unknown_threshold")}


def index_with(ws: Workspace, version: str, staged: pa.Table | None) -> dict:
    """The model's index extended by `staged` gallery rows (and by any row it misses): incremental when it can be."""
    config = ws.config()
    current = gallery_index.index_for_model(ws, version)
    if current is None or current.model_version != version:
        return reindex(ws, version, staged)
    rows = _index_rows(ws, version, staged)
    indexed = set(zip(current.image_ids, current.sources, strict=True))
    new, seen = [], set()
    for i, pair in enumerate(zip(rows["image_id"].to_pylist(), rows["source"].to_pylist(), strict=True)):
        if pair not in indexed and pair not in seen:
            seen.add(pair)
            new.append(i)
    if not new:
        return {"index_version": current.version, "count": len(current.image_ids), "incremental": True}
    if not gallery_index.fits_after_adding(current, len(new), config.index_memory_mb):
        return reindex(ws, version, staged)  # the gallery outgrew its index type (or the budget changed): rebuild
    vectors = np.asarray([rows["embedding"][i].as_py() for i in new], dtype=np.float32)
    manifest = gallery_index.add_to_index(ws, current, [rows["image_id"][i].as_py() for i in new],
                                          [rows["source"][i].as_py() for i in new], vectors, config.unknown_accept)
    return {"index_version": manifest["index_version"], "count": manifest["count"], "incremental": True}
