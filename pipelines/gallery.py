"""`lida gallery add` as a Beam job: read and decode in chunks, embed with the scan's handler, stage rows.

The rows reach the gallery table only after the index holds them (`gallery.index_with`); the
gallery's table and index themselves are `lida_core/gallery.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa

from lida_core import failpoints, gallery, lifecycle
from lida_core.decode import decode_inputs
from lida_core.workspace import Workspace, table_folder, utc_stamp


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
        self.jpeg_space = self.ws.config().jpeg_space  # a JPEG read as the workspace's models read it

    def process(self, element):
        number, uris = element
        decoded = decode_inputs(uris, keep_bytes=True, jpeg_space=self.jpeg_space)
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

        from lida_core.workspace import utc_now

        (number, stubs), embeddings = element
        now = utc_now()
        rows = [{**stub, "source": self.source, "added_at": now, "model_version": self.model_version,
                 "fingerprint": self.fingerprint, "embedding": vector.tolist()} for stub, vector in zip(stubs, embeddings, strict=True)]
        self.ws.write_table(f"{self.run}/parts/part-{number:06d}.parquet", "gallery", pa.Table.from_pylist(rows),
                            len(rows[0]["embedding"]))
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

    run = ws.run_path("gallery-add", f"{utc_stamp()}-{uuid.uuid4().hex[:6]}")
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

    gallery.check_source_name(source)
    uris = list_inputs(paths)
    if not uris:
        raise WorkspaceError("no images found in the given paths")
    version = ws.require_model_version()
    lifecycle.load_model(ws, version)  # weights that do not load fail here, in one line, not in every worker
    existing = gallery.table(ws, version)
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
    result["index"] = gallery.index_with(ws, version, staged)
    failpoints.reached("gallery:indexed")
    if run:
        for path in sorted(ws.ls(run, "parts")):
            name = path.rsplit("/", 1)[-1]
            ws.replace(f"{run}/parts/{name}",
                       f"{table_folder('gallery', version)}/part-{run.rsplit('/', 1)[-1]}-{name[len('part-'):]}")
        ws.fs.rm(ws.path(run), recursive=True)
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
            result = gallery.reindex(ws)
    else:
        if not known.source or not known.input:
            parser.error("--source and at least one --input are required (or --reindex)")
        result = add(ws, known.source, known.input, beam_args=beam_args or None)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    run()
