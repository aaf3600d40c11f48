"""The nightly scan as Beam jobs: shard -> images table -> embed -> attribute.

Exactly-once by construction, whatever crashes when:
- The plan (`shards/<scan>/plan.json`) fixes which file goes into which shard on the first
  run; a re-run reuses it (new files go to new shards), so work is never re-assigned. Each
  shard's part of it is also written on its own (`NNNNNN.plan.json`), so that a worker reads
  only its shards' file names, not the whole scan's.
- A shard's tar is written under a temporary name and renamed; its rows file
  (`NNNNNN.rows.parquet`) is written last and is the commit marker. Committed shards are
  skipped on re-runs.
- The images table of a scan is one file, rebuilt from the rows files (duplicates across
  shards resolved by content hash: the first URI is `ok`, the others `duplicate`).
- Embeddings and attributions are written per shard under deterministic names, so a re-run
  overwrites rather than adds; shards whose attributions exist are skipped.

Over 400 lines on purpose: the stages share the names, markers and retry rules above, and the
exactly-once argument has to be checked against all of them at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.ml.inference.base import ModelHandler, RunInference

import schemas
from lida_core import compact as compaction
from lida_core.decode import JPEG_FORMATS, DecodeError, decode_image
from lida_core.embed import embed, reads_pixels
from lida_core.idset import ImageIds
from lida_core.index import search_and_decide
from lida_core.inputs import list_inputs, read_input
from lida_core.workspace import SHARDS, Workspace, WorkspaceError, table_folder, utc_now, utc_stamp

SHARD_SIZE = int(os.environ.get("LIDA_SHARD_SIZE", "256"))  # most images per shard (tests use small shards)
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


# ---------------------------------------------------------------- plan


def _scan_dir(scan_id: str) -> str:
    return f"{SHARDS}/{scan_id}"


def plan_scan(ws: Workspace, scan_id: str, paths: Sequence[str], shard_size: int | None = None) -> dict:
    """Load or create the scan's plan; files not yet planned are appended as new shards.

    A new plan sizes its shards so that a small scan still gives every core several shards
    (at least 16 and at most SHARD_SIZE images each); the size is then fixed in the plan.
    """
    rel = f"{_scan_dir(scan_id)}/plan.json"
    uris = list_inputs(paths, every_entry=True)
    if ws.exists(rel):
        plan = ws.read_json(rel)
    else:
        if shard_size is None:
            per_core = -(-len(uris) // (4 * (os.cpu_count() or 1)))
            shard_size = max(1, min(SHARD_SIZE, max(16, per_core)))
        plan = {"scan_id": scan_id, "shard_size": shard_size, "shards": [], "created_at": utc_now().isoformat()}
    planned = {u for shard in plan["shards"] for u in shard}
    new = [u for u in uris if u not in planned]
    del planned, uris
    size = plan["shard_size"]
    for start in range(0, len(new), size):
        plan["shards"].append(new[start : start + size])
    if new or not ws.exists(rel):
        ws.write_json(rel, plan)
    # Each shard's own file, written after the plan (which stays the record) and before any
    # worker starts; a shard planned by an earlier run that stopped in between gets its file now.
    written = {path.rsplit("/", 1)[-1] for path in ws.ls(_scan_dir(scan_id))}
    for index, shard in enumerate(plan["shards"]):
        if shard_plan_file(scan_id, index).rsplit("/", 1)[-1] not in written:
            ws.write_json(shard_plan_file(scan_id, index), {"uris": shard})
    return plan


def shard_plan_file(scan_id: str, index: int) -> str:
    """One shard's part of the plan: {"uris": [...]}, the file names it holds in order."""
    return f"{_scan_dir(scan_id)}/{shard_name(index)}.plan.json"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def attributions_part(scan_id: str, shard: str) -> str:
    """A shard's attributions file in the attributions table; its presence marks the shard done."""
    return f"{table_folder('attributions', scan_id)}/part-{shard}.parquet"


# ---------------------------------------------------------------- the scan's stages

CHUNK = 32  # most images per embedding call
CHUNK_PIXELS = 32_000_000  # most decoded pixels held in one chunk (a decompression bomb under the pixel cap is 64 MP)
CHUNK_OUT, COMMITTED_OUT = "chunk", "committed"


@dataclass(frozen=True)
class Item:
    """Where a decoded image sits: its shard and its key there (the shard's rows say the rest)."""

    shard: str
    key: str


@dataclass(frozen=True)
class ShardFinal:
    """The images table's verdict for one shard: the keys its own rows call `ok` that the table made
    duplicates (repeats of an earlier shard's image; usually none). Its `ok` images are the rest.

    Only the exceptions travel, so the verdicts of a scan stay small however many files it has.
    """

    repeats: frozenset[str]


def chunk_size(count: int, most: int = CHUNK) -> int:
    """An even chunk size for `count` images: 75 -> 25 (3 chunks), not 32 + 32 + 11."""
    chunks = max(1, -(-count // most))
    return max(1, -(-count // chunks))


FILES = Metrics.counter("lida", "files")
BYTES = Metrics.counter("lida", "bytes")


def _error_counter(reason: str):
    """One Beam counter per kind of error: errors.unreadable, errors.not an image, errors.corrupt image, ..."""
    return Metrics.counter("lida", f"errors.{reason.strip().lower()[:40]}")


def beam_counters(outcome) -> dict[str, int]:
    """The lida namespace's committed counters of a finished pipeline ({} when the runner reports none)."""
    try:
        found = outcome.metrics().query(MetricsFilter().with_namespace("lida"))["counters"]
    except Exception:  # noqa: BLE001 - metrics are a report, never a reason to fail a finished scan
        return {}
    out: dict[str, int] = {}
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + int(value or 0)
    return dict(sorted(out.items()))


class ShardAndDecode(beam.DoFn):
    """(shard index, URIs) -> ("chunk", decoded images to embed)..., then ("committed", shard index).

    One output stream split by kind afterwards: Beam's DaskRunner mixed up tagged outputs.
    A shard not committed yet is read, hashed and decoded once: its images go on to the
    embedding as they are decoded, and its tar (temporary name, then renamed) and its rows file
    (the commit marker, written last) follow. A shard committed by an earlier run whose
    attributions are missing is decoded again from its own tar (ranged reads of its members).
    (Shards with attributions are done and never reach this stage.) Either way no more than
    a chunk of decoded images is held at once, so memory stays bounded whatever the scan's size.
    """

    def __init__(self, workspace: str, scan_id: str):
        self.workspace = workspace
        self.scan_id = scan_id

    def setup(self) -> None:
        self.ws = Workspace(self.workspace)
        self.jpeg_space = self.ws.config().jpeg_space  # a JPEG read as the workspace's models read it

    def process(self, index: int):
        name = shard_name(index)
        if self.ws.exists(f"{_scan_dir(self.scan_id)}/{name}.rows.parquet"):
            yield from self._from_tar(name)
        else:
            # File names travel in the plan, not through Beam's coders (which take UTF-8 text
            # only); each shard's own part of it, so a worker never holds the whole scan's names.
            yield from self._write(index, self.ws.read_json(shard_plan_file(self.scan_id, index))["uris"])
        yield COMMITTED_OUT, index

    def _write(self, index: int, uris: list[str]):
        name = shard_name(index)
        base = f"{_scan_dir(self.scan_id)}/{name}"
        rows = []
        first: dict[str, dict] = {}  # image_id -> the row of its first copy in this shard
        size = chunk_size(len(uris))
        chunk: tuple[list[Item], list[np.ndarray]] = ([], [])
        now = utc_now()
        # The tar is written as the files are read (one file's bytes held at a time), under a
        # temporary name renamed on close; chunks go on by count or by decoded pixels.
        with self.ws.open_atomic(f"{base}.tar") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            offsets: dict[str, list[int]] = {}
            for position, uri in enumerate(uris):
                key = f"{name}_{position:05d}"  # no dots: WebDataset splits extensions at dots
                row = {"scan_id": self.scan_id, "uri": uri, "image_id": "", "status": "ok", "error": None, "format": None,
                       "width": None, "height": None, "jpeg_quality": None, "bytes": 0, "shard": name, "key": key, "scanned_at": now}
                rows.append(row)
                FILES.inc()
                try:
                    data = read_input(uri)
                except OSError as exc:
                    row.update(status="error", error=f"unreadable: {exc}", image_id=hashlib.sha256(uri.encode()).hexdigest())
                    _error_counter("unreadable").inc()
                    continue
                BYTES.inc(len(data))
                row.update(image_id=hashlib.sha256(data).hexdigest(), bytes=len(data))
                original = first.setdefault(row["image_id"], row)
                if original is not row:  # the same bytes decode the same way: a duplicate
                    row.update(status="duplicate" if original["status"] == "ok" else original["status"], error=original["error"],
                               format=original["format"], width=original["width"], height=original["height"],
                               jpeg_quality=original["jpeg_quality"])
                    continue
                try:
                    decoded = decode_image(data, uri, jpeg_space=self.jpeg_space)
                except DecodeError as exc:
                    row.update(status="error", error=exc.reason)
                    _error_counter(exc.reason.split(":", 1)[0].split(" (", 1)[0]).inc()
                    continue
                row.update(format=decoded.format, width=decoded.width, height=decoded.height, jpeg_quality=decoded.quality)
                offsets[key] = _add_member(tar, f"{key}.{_EXT.get(decoded.format, 'img')}", data)
                _add_member(tar, f"{key}.json", json.dumps({"uri": uri, "image_id": row["image_id"], "scan_id": self.scan_id,
                                                             "format": decoded.format, "width": decoded.width,
                                                             "height": decoded.height}, sort_keys=True).encode())
                del data
                if chunk[0] and sum(p.shape[0] * p.shape[1] for p in chunk[1]) + decoded.width * decoded.height > CHUNK_PIXELS:
                    yield CHUNK_OUT, chunk
                    chunk = ([], [])
                chunk[0].append(Item(name, key))
                chunk[1].append(decoded.pixels)
                del decoded
                if len(chunk[0]) >= size:
                    yield CHUNK_OUT, chunk
                    chunk = ([], [])
        if chunk[0]:
            yield CHUNK_OUT, chunk
        self.ws.write_json(f"{base}.members.json", offsets)
        # the commit marker, last; it keeps scan_id: the images table is assembled from these files
        self.ws.write_table(f"{base}.rows.parquet", "images", pa.Table.from_pylist(rows), drop_partition=False)

    def _from_tar(self, name: str):
        base = f"{_scan_dir(self.scan_id)}/{name}"
        rows = pq.read_table(io.BytesIO(self.ws.read_bytes(f"{base}.rows.parquet")), columns=["uri", "status", "key"])
        rows = [r for r in rows.to_pylist() if r["status"] == "ok"]
        offsets = self.ws.read_json(f"{base}.members.json")
        size = chunk_size(len(rows))
        with self.ws.fs.open(self.ws.path(f"{base}.tar"), "rb") as handle:
            for start in range(0, len(rows), size):
                items, pixels = [], []
                for r in rows[start : start + size]:
                    offset, length = offsets[r["key"]]
                    handle.seek(offset)
                    decoded = decode_image(handle.read(length), r["uri"], jpeg_space=self.jpeg_space)
                    pixels.append(decoded.pixels)
                    items.append(Item(name, r["key"]))
                yield CHUNK_OUT, (items, pixels)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> list[int]:
    """Append one member (a short name: one 512-byte USTAR header); returns [data offset, size]."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    offset = tar.offset + tarfile.BLOCKSIZE
    tar.addfile(info, io.BytesIO(data))
    return [offset, len(data)]


class Shard(beam.PTransform):
    """Every planned shard without attributions (their indexes in the plan) -> (committed shard indexes, chunks of decoded images)."""

    def __init__(self, workspace: str, scan_id: str, shards: list[int]):
        super().__init__()
        self.workspace, self.scan_id, self.shards = workspace, scan_id, shards

    def expand(self, pbegin):
        out = (
            pbegin
            | "PlannedShards" >> beam.Create(self.shards)
            | "Spread" >> beam.Reshuffle()
            | "ShardAndDecode" >> beam.ParDo(ShardAndDecode(self.workspace, self.scan_id))
        )
        committed = out | "Committed" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == COMMITTED_OUT else [])
        chunks = out | "Chunks" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == CHUNK_OUT else [])
        return committed, chunks


def finalize_images(ws: Workspace, scan_id: str, shard_count: int) -> tuple[pa.Table, pa.Table]:
    """The scan's images table from the shards' rows; repeats across shards become duplicates.

    Returns the table written and the (shard, key) of the rows it made duplicates. Arrow compute
    throughout: no Python object per file (docs/performance.md, session 13).
    """
    tables = []
    for index in range(shard_count):
        rel = f"{_scan_dir(scan_id)}/{shard_name(index)}.rows.parquet"
        if not ws.exists(rel):
            raise WorkspaceError(f"scan {scan_id}: shard {shard_name(index)} is not committed")
        tables.append(pq.read_table(io.BytesIO(ws.read_bytes(rel))))
    # promote: a shard committed before the images table had jpeg_quality gets nulls there
    table = pa.concat_tables(tables, promote_options="default") if tables else schemas.schema("images").empty_table()
    del tables
    ok = pc.equal(table["status"], "ok")
    position = pa.array(np.arange(len(table), dtype=np.int64))
    # the first ok row of each image keeps `ok` (shards in plan order, rows in shard order)
    first = pa.table({"image_id": table["image_id"], "position": position}).filter(ok) \
        .group_by("image_id", use_threads=False).aggregate([("position", "min")])["position_min"]
    repeat = pc.and_(ok, pc.invert(pc.is_in(position, value_set=first)))
    table = table.set_column(table.schema.get_field_index("status"), "status", pc.if_else(repeat, "duplicate", table["status"]))
    table = ws.write_table(f"{table_folder('images', scan_id)}/part-00000.parquet", "images", table)
    return table, table.filter(repeat).select(["shard", "key"])


class ImagesTable(beam.DoFn):
    """After every shard is committed: write the scan's images table; emit each shard's verdict.

    The shards of this run are exactly those without attributions (see `run_scan`).
    """

    def __init__(self, workspace: str, scan_id: str, shard_count: int):
        self.workspace, self.scan_id, self.shard_count = workspace, scan_id, shard_count

    def process(self, committed: list[int]):
        ws = Workspace(self.workspace)
        _images, repeats = finalize_images(ws, self.scan_id, self.shard_count)
        demoted: dict[str, set[str]] = {shard_name(i): set() for i in committed}
        for row in repeats.to_pylist():
            if row["shard"] in demoted:
                demoted[row["shard"]].add(row["key"])
        for shard in sorted(demoted):
            yield shard, ShardFinal(frozenset(demoted[shard]))


class EmbedderHandler(ModelHandler):
    """RunInference handler: loads one model version once per worker, embeds decoded images."""

    def __init__(self, workspace: str, model_version: str, batch_size: int = 32, threads: int = 1, device: str = "cpu"):
        self.workspace, self.model_version = workspace, model_version
        self.batch_size, self.threads, self.device = batch_size, threads, device

    def load_model(self):
        import torch

        from lida_core.accel import DeviceEmbedder
        from lida_core.allocator import keep_freed_memory
        from lida_core.lifecycle import load_model

        torch.set_num_threads(self.threads)
        keep_freed_memory()
        loaded = load_model(Workspace(self.workspace), self.model_version)
        if loaded.input_kind != "fingerprint":  # the RGB ablation keeps the plain path
            return loaded
        warm_up(loaded.model)
        # CPU: low bits of the decoded pixels; device: the rest of the fingerprint and the model.
        return DeviceEmbedder(loaded.model, self.device, batch_size=None if self.device == "cuda" else self.batch_size)

    def run_inference(self, batch, model, inference_args=None):
        """Used without Beam's batching: `batch` is one chunk (items, decoded images) -> [(items, embeddings)].

        Beam's BatchElements holds its last elements until finish_bundle, and Beam's
        DaskRunner lost them (3 in, 2 out in a minimal pipeline); chunks made by the shard
        stage keep the batch size explicit without it.
        """
        from lida_core.accel import DeviceEmbedder

        items, pixels = batch
        if isinstance(model, DeviceEmbedder):
            return [(items, model.embed(list(pixels)))]
        return [(items, embed(model.model, list(pixels), batch_size=self.batch_size, input_kind=model.input_kind,
                                       device=self.device))]

    def get_num_bytes(self, batch) -> int:
        """The chunk's pixel bytes (Beam's inference metrics): the default pickles the whole chunk to measure it."""
        _items, pixels = batch
        return int(sum(p.nbytes for p in pixels))

    def share_model_across_processes(self) -> bool:
        return False


def staged_dir(scan_id: str, shard: str, model_version: str | None = None) -> str:
    """Where a shard's embeddings wait for the images table, one file per chunk and a folder per model.

    Per model: an interrupted run may have staged another model's vectors, and they must not be
    read. (Clearing the folder when the shard stage starts does not work: Beam's DaskRunner
    runs that stage once per consumer, and the second run cleared what the first had staged.)
    The whole shard folder is removed once the shard is attributed.
    """
    base = f"{_scan_dir(scan_id)}/{shard}.staged"
    return f"{base}/{model_version}" if model_version else base


class StageEmbeddings(beam.DoFn):
    """(items, embeddings) of one chunk -> written beside the shard's tar; emits (shard, count) only.

    The embeddings do not travel to the per-shard join: held in the local runner's group-by
    until every shard committed, they made a scan's memory grow with its size (about 3 KB an
    image; docs/performance.md). The file is named after the chunk's first key, so a retried
    chunk overwrites its own file.
    """

    def __init__(self, workspace: str, scan_id: str, model_version: str):
        self.workspace, self.scan_id, self.model_version = workspace, scan_id, model_version

    def setup(self) -> None:
        self.ws = Workspace(self.workspace)

    def process(self, element):
        items, vectors = element
        if not items:
            return
        shard = items[0].shard
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.asarray([item.key for item in items]), embeddings=np.asarray(vectors, dtype=np.float32))
        self.ws.write_bytes(f"{staged_dir(self.scan_id, shard, self.model_version)}/{items[0].key}.npz", buffer.getvalue())
        yield shard, len(items)


def read_staged(ws: Workspace, scan_id: str, shard: str, model_version: str, keys: frozenset[str]) -> dict[str, np.ndarray]:
    """This model's staged embeddings of these keys (an earlier attempt's chunks may overlap: same model, same vectors)."""
    found: dict[str, np.ndarray] = {}
    for path in sorted(ws.ls(staged_dir(scan_id, shard, model_version))):
        if not path.endswith(".npz") or path.rsplit("/", 1)[-1].startswith("."):
            continue  # a temporary file of an interrupted write
        with ws.fs.open(path, "rb") as handle, np.load(io.BytesIO(handle.read()), allow_pickle=False) as data:
            for key, vector in zip(data["keys"].tolist(), data["embeddings"], strict=True):
                if key in keys:
                    found[key] = vector
    return found


class Attribute(beam.DoFn):
    """(shard, [ShardFinal, chunk counts...]) -> the shard's embeddings and attributions rows, written out."""

    def __init__(self, workspace: str, scan_id: str, model_version: str, device: str = "cpu"):
        self.workspace, self.scan_id, self.model_version, self.device = workspace, scan_id, model_version, device

    def setup(self) -> None:
        from lida_core.index import query_decider

        self.ws = Workspace(self.workspace)
        meta = self.ws.model_meta(self.model_version)
        self.fingerprint = meta["fingerprint"]
        self.decider, self.index = query_decider(self.ws, self.model_version, meta, self.ws.config())
        if self.index is not None and self.device == "cuda":
            self.index.exact_device = "cuda"  # exact matmul + top-k on the GPU; FAISS on CPU otherwise
        self.index_version = self.index.version if self.index else "none"
        self.embedded = embedded_elsewhere(self.ws, self.model_version, self.scan_id)

    def process(self, element):
        shard, values = element
        finals = [v for v in values if isinstance(v, ShardFinal)]
        if len(finals) != 1:
            raise RuntimeError(f"scan {self.scan_id}: shard {shard} has {len(finals)} images-table verdicts, expected 1")
        if self.ws.exists(attributions_part(self.scan_id, shard)):
            # A retry of a bundle that had finished (its staged embeddings are gone): the shard is done.
            yield shard, 0
            return
        # A shard's images that the images table made duplicates of another shard's are not attributed.
        repeats = finals[0].repeats
        staged_rows = pq.ParquetFile(io.BytesIO(self.ws.read_bytes(f"{_scan_dir(self.scan_id)}/{shard}.rows.parquet")))
        # a shard staged before the images table had jpeg_quality: its JPEGs take the one JPEG threshold
        rows = staged_rows.read(columns=[c for c in ("uri", "image_id", "key", "format", "status", "jpeg_quality", "height", "width")
                                         if c in staged_rows.schema_arrow.names]).to_pylist()
        rows = sorted((r for r in rows if r["status"] == "ok" and r["key"] not in repeats), key=lambda r: r["key"])
        ok = frozenset(r["key"] for r in rows)
        staged = read_staged(self.ws, self.scan_id, shard, self.model_version, ok)
        if len(staged) != len(ok):
            raise RuntimeError(f"scan {self.scan_id}: shard {shard} has {len(staged)} embeddings for {len(ok)} images")
        emb = np.asarray([staged[r["key"]] for r in rows], dtype=np.float32)
        decisions = search_and_decide(self.decider, self.index, emb, [r["format"] in JPEG_FORMATS for r in rows],
                                      self.model_version, [r.get("jpeg_quality") for r in rows],
                                      [(r.get("height"), r.get("width")) for r in rows])  # small images' thresholds
        now = utc_now()
        known = self.embedded.contains([r["image_id"] for r in rows])
        attributions, embeddings = [], []
        for i, (r, decision) in enumerate(zip(rows, decisions, strict=True)):
            attributions.append({"scan_id": self.scan_id, "uri": r["uri"], "image_id": r["image_id"], **decision,
                                 "model_version": self.model_version, "index_version": self.index_version,
                                 "fingerprint": self.fingerprint, "scanned_at": now})
            if not known[i]:  # one row per image and model, whichever scan saw it first
                embeddings.append({"image_id": r["image_id"], "model_version": self.model_version,
                                   "fingerprint": self.fingerprint, "embedding": emb[i].tolist()})
        if embeddings:  # a shard of errors, repeats and images embedded before has no embeddings file
            self._write("embeddings", f"{table_folder('embeddings', self.model_version)}/scan-{self.scan_id}-{shard}.parquet",
                        embeddings, emb.shape[1])
        # Attributions last, even when empty: their presence marks the shard done.
        self._write("attributions", attributions_part(self.scan_id, shard), attributions, None)
        with contextlib.suppress(OSError):  # only disk space is at stake: a later run of this scan skips the shard
            self.ws.fs.rm(self.ws.path(staged_dir(self.scan_id, shard)), recursive=True)
        yield shard, len(rows)

    def _write(self, table_name: str, rel: str, rows: list[dict], dim: int | None) -> None:
        schema = schemas.schema(table_name, dim or 1)
        self.ws.write_table(rel, table_name, pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table(), dim or 1)


def embedded_elsewhere(ws: Workspace, model_version: str, scan_id: str) -> ImageIds:
    """Image ids this model already has embeddings for, from other scans (a re-run rewrites its own files).

    Every attribution worker holds this set, and it grows with the workspace's history, so it is
    kept as sorted digests (`lida_core.idset`, 32 bytes an id) rather than strings (~150 bytes).
    """
    folder = ws.path(table_folder("embeddings", model_version))
    if not ws.fs.exists(folder):
        return ImageIds()
    own = re.compile(rf"scan-{re.escape(scan_id)}-\d{{6}}\.parquet")

    def columns():  # one file's ids at a time: only their digests stay
        for path in ws.fs.find(folder):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".parquet") and not name.startswith(".") and not own.fullmatch(name):
                with ws.fs.open(path, "rb") as handle:
                    yield pq.read_table(handle, columns=["image_id"])["image_id"]

    return ImageIds(columns())


class EmbedAndAttribute(beam.PTransform):
    """(chunks of decoded images, the images table's per-shard verdicts) -> embeddings and attributions, per shard.

    The embedding runs where the shard was decoded (fused, no hand-off of pixels) and its
    vectors are staged beside the shard's tar; only chunk counts join the verdicts in one group
    per shard, so attribution waits for the images table without holding every embedding.
    """

    def __init__(self, workspace: str, scan_id: str, model_version: str, batch_size: int = 32, threads: int = 1,
                 device: str = "cpu"):
        super().__init__()
        self.workspace, self.scan_id, self.model_version = workspace, scan_id, model_version
        self.batch_size, self.threads, self.device = batch_size, threads, device

    def expand(self, inputs):
        chunks, verdicts = inputs
        handler = EmbedderHandler(self.workspace, self.model_version, self.batch_size, self.threads, self.device).with_no_batching()
        staged = (
            chunks
            | "Embed" >> RunInference(handler)
            | "Stage" >> beam.ParDo(StageEmbeddings(self.workspace, self.scan_id, self.model_version))
        )
        return (
            (staged, verdicts)
            | "WithVerdicts" >> beam.Flatten()
            | "GroupShard" >> beam.GroupByKey()
            | "Attribute" >> beam.ParDo(Attribute(self.workspace, self.scan_id, self.model_version, self.device))
        )


def new_scan_id() -> str:
    return utc_stamp() + "-" + uuid.uuid4().hex[:6]


def summary(images: pa.Table, ws: Workspace, scan_id: str) -> dict:
    statuses = {c["values"]: c["counts"] for c in pc.value_counts(images["status"]).to_pylist()}  # in order of appearance
    predicted: dict[str, int] = {}
    attributions = ws.read_parquet(table_folder("attributions", scan_id), columns=["predicted_source"])
    if attributions is not None:
        predicted = {c["values"]: c["counts"] for c in pc.value_counts(attributions["predicted_source"]).to_pylist()}
    errors = [(r["uri"], r["error"]) for r in images.filter(pc.equal(images["status"], "error")).to_pylist()]
    return {"scan_id": scan_id, "images": len(images), "status": statuses, "predicted": dict(sorted(predicted.items())),
            "errors": errors}


def check_ready(ws: Workspace, model_version: str):
    """What the workers will need, checked here before any shard is written: the weights load, the
    model has its decisions, and the published index is this model's (one line each, exit 2).
    Returns the loaded model."""
    from lida_core.index import query_decider
    from lida_core.lifecycle import load_model

    loaded = load_model(ws, model_version)
    query_decider(ws, model_version, ws.model_meta(model_version), ws.config())
    return loaded


def warm_up(model) -> None:
    """Start loading a model's compiled loops on a thread (srm's: numba's cache, ~0.7 s a process).

    The first chunk of every worker waited on that load. Begun in a worker's `load_model`, it
    overlaps the first images' decoding; begun by the driver, it overlaps the plan and Beam's
    start-up, which is what local worker threads (the same process) see. Once loaded, a call is free.
    """
    if reads_pixels(model):
        from lida_core import srm

        threading.Thread(target=srm.warm_up, name="lida-srm-warm-up", daemon=True).start()


@contextlib.contextmanager
def watch_shards(ws: Workspace, scan_id: str, shards: Sequence[int], report, every: float = 2.0):
    """While the pipeline runs, call `report(committed, total)` as this run's shards commit.

    The driver cannot see inside Beam's workers; it lists the scan's folder (one listing every
    `every` seconds) for the commit markers the workers write. `report` gets a last call on exit.
    """
    names = {f"{shard_name(i)}.rows.parquet" for i in shards}

    def committed() -> int:
        try:
            return sum(1 for path in ws.ls(_scan_dir(scan_id)) if path.rsplit("/", 1)[-1] in names)
        except OSError:  # a progress listing never fails a scan
            return 0

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            report(committed(), len(names))

    thread = threading.Thread(target=loop, name="lida-shard-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        report(committed(), len(names))


def run_scan(
    ws: Workspace,
    paths: Sequence[str],
    scan_id: str | None = None,
    runner: str = "local",
    runner_options: Sequence[str] = (),
    device: str = "cpu",
    progress=None,
    beam_args: Sequence[str] | None = None,
    shard_progress=None,
) -> dict:
    """`lida scan`: the whole job, resumable under the same scan id.

    `beam_args`, when given, are Beam's own pipeline flags (`--runner=DataflowRunner ...`) and
    replace `runner` / `runner_options` (see `run`). `shard_progress(committed, total)` is
    called every few seconds while the pipeline runs (`watch_shards`).
    """
    from pipelines.runners import parse_runner_options, pipeline_options

    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    parse_runner_options(runner_options)  # bad options fail here, before the lock and the plan
    ws.require()
    scan_id = scan_id or new_scan_id()
    if not scan_id.replace("-", "").replace("_", "").isascii() or not scan_id.replace("-", "").replace("_", "").isalnum() \
            or len(scan_id) > 100:
        raise WorkspaceError(f"invalid scan id {scan_id[:120]!r}: up to 100 ASCII letters, digits, - and _")
    with ws.lock(f"scan {scan_id}"):
        model_version = ws.require_model_version()
        loaded = check_ready(ws, model_version)
        if runner == "local":  # worker threads share this process (pipelines/runners.py)
            warm_up(loaded.model)
        del loaded
        plan = plan_scan(ws, scan_id, paths)
        shards = list(enumerate(plan["shards"]))
        # A `lida compact` that died mid-swap is finished first; shards it merged count as done.
        compaction.recover(ws, table_folder("attributions", scan_id))
        compaction.recover(ws, table_folder("embeddings", model_version))
        attributed = {p.rsplit("/", 1)[-1] for p in ws.ls(table_folder("attributions", scan_id))}
        attributed |= {attributions_part(scan_id, s).rsplit("/", 1)[-1] for s in compaction.covered_shards(ws, scan_id)}
        todo = [(i, uris) for i, uris in shards if attributions_part(scan_id, shard_name(i)).rsplit("/", 1)[-1] not in attributed]
        files = sum(len(u) for _, u in shards)
        say(f"scan {scan_id}: {files} files in {len(shards)} shards; {len(todo)} shards to do")
        # torch threads per worker: the cores shared out among the workers running side by side
        workers = int(parse_runner_options(runner_options).get("workers", os.cpu_count() or 1))
        threads = max(1, (os.cpu_count() or 1) // workers) if runner in ("local", "dask") else max(1, os.cpu_count() or 1)
        # One pipeline, so worker start-up is paid once. Each shard is written and its images
        # embedded in one pass (decoded once); the images table, written when every shard is
        # committed, then joins the embeddings per shard for attribution.
        with pipeline_options(runner, runner_options, beam_args=beam_args, partitions=len(todo)) as options:
            pipeline = beam.Pipeline(options=options)
            committed, chunks = pipeline | "Shard" >> Shard(ws.url, scan_id, [i for i, _ in todo])
            verdicts = (
                committed
                | "AllShardsCommitted" >> beam.combiners.ToList()
                | "ImagesTable" >> beam.ParDo(ImagesTable(ws.url, scan_id, len(shards)))
            )
            _ = (chunks, verdicts) | "EmbedAttribute" >> EmbedAndAttribute(ws.url, scan_id, model_version, threads=threads,
                                                                            device=device)
            with watch_shards(ws, scan_id, [i for i, _ in todo], shard_progress) if shard_progress else contextlib.nullcontext():
                outcome = pipeline.run()
                outcome.wait_until_finish()
            counters = beam_counters(outcome)
        images = pq.read_table(io.BytesIO(ws.read_bytes(table_folder("images", scan_id), "part-00000.parquet")))
        images = images.append_column("scan_id", pa.array([scan_id] * len(images)))
        say(f"scan {scan_id}: done")
        result = summary(images, ws, scan_id)
        result["model_version"] = model_version
        result["counters"] = counters  # Beam's own Metrics for this run's shards ({} where a runner keeps none)
        result["seconds"] = round(time.perf_counter() - started, 3)  # this run, start-up included
        result["files_per_second"] = round(len(images) / max(result["seconds"], 1e-9), 2)
        # Written last: a scan without it was interrupted and is resumed by its id.
        ws.write_json(f"{_scan_dir(scan_id)}/done.json", {**result, "finished_at": utc_now().isoformat()})
        return result


def planned_uris(ws: Workspace, scan_id: str) -> list[str]:
    return [u for shard in ws.read_json(f"{_scan_dir(scan_id)}/plan.json")["shards"] for u in shard]


def run(argv: Sequence[str] | None = None) -> dict:
    """The scan job as a Beam program: `python -m pipelines.scan --workspace WS --input PATH [--scan-id ID] [beam flags]`.

    Flags lida does not know go to Beam unchanged, as for any Beam pipeline (for example
    `--runner=FlinkRunner --flink_master=host:8081`). Without `--runner`, the local runner.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines.scan", description=run.__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--input", action="append", required=True, help="file, folder or fsspec URL (repeatable)")
    parser.add_argument("--scan-id")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    known, beam_args = parser.parse_known_args(argv)
    result = run_scan(Workspace(known.workspace), known.input, known.scan_id, device=known.device,
                      progress=lambda m: print(m, file=sys.stderr), beam_args=beam_args)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    run()
