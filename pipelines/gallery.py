"""Gallery changes and their index: add (incremental index update), reindex (full rebuild)."""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from lida_core import failpoints, lifecycle
from lida_core import index as gallery_index
from lida_core.workspace import TABLES, Workspace, utc_stamp


def _gallery_rows(ws: Workspace, version: str, staged: pa.Table | None) -> pa.Table:
    """(image_id, source, embedding) of a model's gallery table, followed by staged rows."""
    parts = [t.select(["image_id", "source", "embedding"]) for t in (lifecycle.gallery_table(ws, version), staged)
             if t is not None and len(t)]
    if not parts:
        return pa.table({"image_id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                         "embedding": pa.array([], pa.list_(pa.float32()))})
    return pa.concat_tables([p.cast(parts[0].schema) for p in parts])


def reindex(ws: Workspace, version: str | None = None, staged: pa.Table | None = None) -> dict:
    """Rebuild the index of a model version (the current one) from its gallery rows (plus `staged` rows); published atomically."""
    config = ws.config()
    version = version or ws.require_model_version()
    table = _gallery_rows(ws, version, staged)
    if len(table):
        vectors = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    else:  # an empty gallery still gets an (empty) index of the model's dimension
        vectors = np.zeros((0, lifecycle.load_model(ws, version).model.embedding_dim), np.float32)
    manifest = gallery_index.build_index(ws, version, config.fingerprint, table["image_id"].to_pylist(),
                                         table["source"].to_pylist(), vectors, config.unknown_accept, config.index_memory_mb)
    return {k: manifest[k] for k in ("index_version", "model_version", "count", "dimension", "kind", "unknown_threshold")}


def add(ws: Workspace, source: str, paths: Sequence[str], progress=lifecycle.quiet, runner: str = "local",
        runner_options: Sequence[str] = (), beam_args: Sequence[str] | None = None) -> dict:
    """`lida gallery add`: register, embed through the scan's embed job, extend the index without a full rebuild.

    One lock covers both, so two adds at once cannot each extend the same old index.
    """
    ws.require()
    with ws.lock("gallery add"):
        return _add_locked(ws, source, paths, progress, runner, runner_options, beam_args)


CHUNK = 32


class ReadGalleryChunk(beam.DoFn):
    """(chunk number, URIs) -> (row stubs, decoded pixels); keeps the original bytes as blobs."""

    def __init__(self, workspace: str, run: str):
        self.workspace, self.run = workspace, run

    def setup(self) -> None:
        self.ws = Workspace(self.workspace)

    def process(self, element):
        number, uris = element
        decoded = lifecycle.decode_inputs(uris, keep_bytes=True)
        stubs = tuple({"image_id": self.ws.put_blob(raw), "uri": uri} for uri, raw in zip(decoded.uris, decoded.raw, strict=True))
        self.ws.write_json(f"{self.run}/{number:06d}.read.json", {"errors": decoded.errors, "decoded": len(stubs)})
        if stubs:
            yield (number, stubs), decoded.pixels


class WriteGalleryChunk(beam.DoFn):
    """((chunk number, row stubs), embeddings) -> one staged gallery Parquet part per chunk (fixed name: a retry rewrites it).

    Parts are staged under the run's folder and moved into the gallery table only after the
    index holds them (`_add_locked`), so a killed add never lists images the index lacks.
    """

    def __init__(self, workspace: str, source: str, model_version: str, run: str):
        self.workspace, self.source, self.model_version, self.run = workspace, source, model_version, run

    def setup(self) -> None:
        self.ws = Workspace(self.workspace)
        self.fingerprint = self.ws.model_meta(self.model_version)["fingerprint"]

    def process(self, element):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        import schemas
        from lida_core.workspace import utc_now

        (number, stubs), embeddings = element
        now = utc_now()
        rows = [{**stub, "source": self.source, "added_at": now, "model_version": self.model_version,
                 "fingerprint": self.fingerprint, "embedding": vector.tolist()} for stub, vector in zip(stubs, embeddings, strict=True)]
        table = schemas.validate(pa.Table.from_pylist(rows), "gallery", embedding_dim=len(rows[0]["embedding"]))
        buffer = io.BytesIO()
        pq.write_table(table.drop(["model_version"]), buffer)
        self.ws.write_bytes(f"{self.run}/parts/part-{number:06d}.parquet", buffer.getvalue())
        yield len(rows)


def embed_into_gallery(ws: Workspace, source: str, uris: Sequence[str], model_version: str, runner: str = "local",
                       runner_options: Sequence[str] = (), beam_args: Sequence[str] | None = None
                       ) -> tuple[int, list[tuple[str, str]], str]:
    """The Beam job: read + decode in chunks, embed with the scan's RunInference handler, stage gallery rows.

    Returns (images embedded, errors, the run folder whose `parts/` hold the staged rows).
    """
    import uuid

    from apache_beam.ml.inference.base import RunInference

    from pipelines.runners import pipeline_options
    from pipelines.scan import EmbedderHandler

    run = f"runs/gallery-add/{utc_stamp()}-{uuid.uuid4().hex[:6]}"
    chunks = [(n, list(uris[i : i + CHUNK])) for n, i in enumerate(range(0, len(uris), CHUNK))]
    handler = EmbedderHandler(ws.url, model_version).with_no_batching()
    with (pipeline_options(runner, runner_options, beam_args=beam_args) as options,
          beam.Pipeline(options=options) as pipeline):
        _ = (pipeline
             | "Chunks" >> beam.Create(chunks)
             | "Spread" >> beam.Reshuffle()
             | "Read" >> beam.ParDo(ReadGalleryChunk(ws.url, run))
             | "Embed" >> RunInference(handler)
             | "Write" >> beam.ParDo(WriteGalleryChunk(ws.url, source, model_version, run)))
    errors, decoded = [], 0
    for number, _ in chunks:
        report = ws.read_json(f"{run}/{number:06d}.read.json")
        errors += [tuple(e) for e in report["errors"]]
        decoded += report["decoded"]
    return decoded, errors, run


def _add_locked(ws: Workspace, source: str, paths: Sequence[str], progress, runner: str = "local",
                runner_options: Sequence[str] = (), beam_args: Sequence[str] | None = None) -> dict:
    import hashlib

    from lida_core.inputs import list_inputs, read_input
    from lida_core.workspace import WorkspaceError

    lifecycle.check_source_name(source)
    uris = list_inputs(paths)
    if not uris:
        raise WorkspaceError("no images found in the given paths")
    version = ws.require_model_version()
    lifecycle.load_model(ws, version)  # weights that do not load fail here, in one line, not in every worker
    existing = lifecycle.gallery_table(ws, version)
    known = set(zip(existing["image_id"].to_pylist(), existing["source"].to_pylist(), strict=True))
    # Content already registered for this source (or twice in this add) is not embedded again.
    todo, seen, already, unreadable = [], set(), 0, []
    for n, uri in enumerate(uris, 1):
        try:
            digest = hashlib.sha256(read_input(uri)).hexdigest()
        except OSError as exc:
            unreadable.append((uri, f"unreadable: {exc}"))
            continue
        if (digest, source) in known or digest in seen:
            already += 1
        else:
            seen.add(digest)
            todo.append(uri)
        progress("hash", {"done": n, "total": len(uris)})
    added, errors, run = embed_into_gallery(ws, source, todo, version, runner, runner_options, beam_args) if todo else (0, [], None)
    errors = unreadable + errors
    if not added and not already:
        raise WorkspaceError(f"none of the {len(uris)} files could be decoded (first: {errors[0][1]})")
    result = {"source": source, "added": added, "already_registered": already, "errors": errors, "model_version": version}
    staged = ws.read_parquet(run, "parts") if run else None
    failpoints.reached("gallery:staged")
    # The index first, then the rows: a kill in between leaves rows staged (an add re-run embeds
    # them again), never rows listed in the gallery that the index does not hold.
    result["index"] = _index_with(ws, version, staged)
    failpoints.reached("gallery:indexed")
    if run:
        for path in sorted(ws.ls(run, "parts")):
            name = path.rsplit("/", 1)[-1]
            ws.write_bytes(f"{TABLES}/gallery/model_version={version}/part-{run.rsplit('/', 1)[-1]}-{name[len('part-'):]}",
                           ws.read_bytes(run, "parts", name))
        ws.fs.rm(ws.path(run), recursive=True)
    return result


def _index_with(ws: Workspace, version: str, staged) -> dict:
    """The model's index extended by `staged` gallery rows (and by any row it misses): incremental when it can be."""
    config = ws.config()
    current = gallery_index.index_for_model(ws, version)
    if current is None or current.model_version != version:
        return reindex(ws, version, staged)
    table = _gallery_rows(ws, version, staged)
    indexed = set(zip(current.image_ids, current.sources, strict=True))
    new, seen = [], set()
    for i, pair in enumerate(zip(table["image_id"].to_pylist(), table["source"].to_pylist(), strict=True)):
        if pair not in indexed and pair not in seen:
            seen.add(pair)
            new.append(i)
    if not new:
        return {"index_version": current.version, "count": len(current.image_ids), "incremental": True}
    if not gallery_index.fits_after_adding(current, len(new), config.index_memory_mb):
        return reindex(ws, version, staged)  # the gallery outgrew its index type (or the budget changed): rebuild
    vectors = np.asarray([table["embedding"][i].as_py() for i in new], dtype=np.float32)
    manifest = gallery_index.add_to_index(ws, current, [table["image_id"][i].as_py() for i in new],
                                          [table["source"][i].as_py() for i in new], vectors, config.unknown_accept)
    return {"index_version": manifest["index_version"], "count": manifest["count"], "incremental": True}


def attribute_files(ws: Workspace, paths: Sequence[str]) -> list[dict]:
    """`lida attribute`: decisions for a few files now, in this process (no Beam, no server)."""
    from lida_core.decode import JPEG_FORMATS, DecodeError, decode_image
    from lida_core.inputs import InputError, display_uri, list_inputs, read_input

    config = ws.config()
    loaded = lifecycle.load_model(ws)
    decider, index = gallery_index.query_decider(ws, loaded.version, loaded.meta, config)
    results, good, pixels, jpeg = [], [], [], []
    listed: list[tuple[str, str | None]] = []  # (URI, why it cannot be listed), in the order given
    for path in paths:
        try:
            listed += [(u, None) for u in list_inputs([path])]
        except InputError as exc:  # a missing path is that path's answer, not the end of every other's
            listed.append((display_uri(str(path)), "no such file or folder" if "no such" in str(exc) else str(exc)))
    for uri, problem in listed:
        if problem:
            results.append({"uri": uri, "error": problem})
            continue
        try:
            decoded = decode_image(read_input(uri), uri)
            pixels.append(decoded.pixels)
            jpeg.append(decoded.format in JPEG_FORMATS)
            good.append(len(results))
            results.append({"uri": uri})
        except (DecodeError, OSError) as exc:
            results.append({"uri": uri, "error": getattr(exc, "reason", str(exc))})
    if pixels:
        decisions = gallery_index.search_and_decide(decider, index, loaded.embed(pixels), jpeg, loaded.version)
        for position, decision in zip(good, decisions, strict=True):
            results[position].update(decision)
            results[position].update(model_version=loaded.version, index_version=index.version if index else "none",
                                     fingerprint=config.fingerprint)
    return results


def adapt_and_reindex(ws: Workspace, epochs: int | None = None, lr: float | None = None, seed: int = 0,
                      progress=lifecycle.quiet) -> dict:
    """`lida adapt`: one lock over adaptation and the index rebuild, so no scan sees the new model before its index."""
    ws.require()
    with ws.lock("adapt"):
        built = {}
        result = lifecycle.adapt_version(ws, epochs, lr, seed, progress, lock=False,
                                         before_current=lambda version: built.update(reindex(ws, version)))
        if result["promoted"]:
            result["index"] = built
    return result


def run(argv: Sequence[str] | None = None) -> dict:
    """The gallery-add job as a Beam program: `python -m pipelines.gallery --workspace WS --source NAME --input PATH [beam flags]`.

    Registers, embeds and extends the index like `lida gallery add`; with `--reindex` it only
    rebuilds the index. Flags lida does not know go to Beam unchanged.
    """
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m pipelines.gallery", description=run.__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--source")
    parser.add_argument("--input", action="append", default=[])
    parser.add_argument("--reindex", action="store_true")
    known, beam_args = parser.parse_known_args(argv)
    ws = Workspace(known.workspace).require()
    if known.reindex:
        with ws.lock("reindex"):
            result = reindex(ws)
    else:
        if not known.source or not known.input:
            parser.error("--source and at least one --input are required (or --reindex)")
        result = add(ws, known.source, known.input, beam_args=beam_args or None)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    run()
