"""`lida compact`: merge a finished scan's small Parquet files into a few large ones, exactly once.

A scan writes one `attributions` file per shard and one `embeddings` file per shard and model,
so a nightly corpus leaves thousands of small files. Compaction rewrites, per partition:

- `attributions/scan_id=S/part-<shard>.parquet` of a finished scan S -> `part-c<n>.parquet`;
- `embeddings/model_version=V/scan-S-<shard>.parquet` of finished scans -> `compact-<n>.parquet`;

into files of at most FILE_BYTES of data, in row groups of about ROW_GROUP_BYTES. Only scans whose
`done.json` exists are touched, under the workspace lock, so no scan of theirs is running.

Exactly once, whatever kills the process (`failpoints`: `compact:staged`, `compact:swapping`):
1. the new files are written under `tables/.compact/` (outside every table: no reader sees them);
2. a journal, `_compaction.json` in the partition, names the staged files, their final names and
   the files they replace, with `state: swapping`;
3. the staged files are renamed into the partition, the replaced ones deleted, and the journal
   set to `state: done`.
A run that died before step 2 leaves only staging, removed by the next run. One that died in
step 3 is finished by the next `lida compact` or scan of that id (`recover`): renames and
deletes are redone where still needed. Between a death in step 3 and that recovery, a reader
may see some rows twice. The journal also lists every shard whose attributions a compacted file
holds (`covered_shards`), so a scan re-run under the same id still knows those shards are done.
"""

from __future__ import annotations

import contextlib
import io
import re
import uuid

import pyarrow.parquet as pq

from lida_core import failpoints
from lida_core.workspace import SHARDS, TABLES, Workspace, WorkspaceError, table_folder

JOURNAL = "_compaction.json"
STAGING = f"{TABLES}/.compact"
FILE_BYTES = 1024 * 2**20  # uncompressed data in one compacted file at most
ROW_GROUP_BYTES = 128 * 2**20  # Parquet row groups of about this much uncompressed data
_SHARD_PART = re.compile(r"part-(\d{6})\.parquet")
_COMPACTED = re.compile(r"(?:part-c|compact-)(\d+)\.parquet")


def _names(ws: Workspace, *parts: str) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in ws.ls(*parts))


def finished_scans(ws: Workspace) -> list[str]:
    """Scan ids whose done.json exists (their shards all have attributions)."""
    return [name for name in _names(ws, SHARDS) if ws.exists(SHARDS, name, "done.json")]


def covered_shards(ws: Workspace, scan_id: str) -> set[str]:
    """Shards of this scan whose attributions now sit in compacted files."""
    journal = _journal(ws, table_folder("attributions", scan_id))
    return set(journal.get("covered_shards", [])) if journal else set()


def _journal(ws: Workspace, folder: str) -> dict | None:
    try:
        return ws.read_json(folder, JOURNAL)
    except FileNotFoundError:
        return None


def recover(ws: Workspace, folder: str) -> bool:
    """Carry out the swap a journal in `folder` describes (state `swapping`), or finish the one a killed run left.

    Idempotent: each rename and delete is done only where still needed. True when there was a swap.
    """
    journal = _journal(ws, folder)
    if not journal or journal.get("state") != "swapping":
        return False
    for i, (staged, final) in enumerate(journal["moves"]):
        if ws.exists(staged):
            ws.replace(staged, f"{folder}/{final}")
            if i == 0:
                failpoints.reached("compact:swapping")
    for name in journal["replaces"]:
        if ws.exists(folder, name):
            ws.fs.rm(ws.path(folder, name))
    ws.write_json(f"{folder}/{JOURNAL}", {**journal, "state": "done"})
    return True


def _next_number(names: list[str]) -> int:
    numbers = [int(m.group(1)) for n in names if (m := _COMPACTED.fullmatch(n))]
    return max(numbers, default=0) + 1


def _rewrite(ws: Workspace, folder: str, inputs: list[str], prefix: str, covered: set[str] | None = None) -> int:
    """Merge `inputs` (file names in `folder`) into compacted files there; returns how many were written.

    Streams: one input file and one row group are in memory at a time.
    """
    number = _next_number(_names(ws, folder))
    stage = f"{STAGING}/{uuid.uuid4().hex}"
    moves: list[tuple[str, str]] = []
    with contextlib.ExitStack() as stack:
        writer, held = None, 0
        for name in inputs:
            table = pq.read_table(io.BytesIO(ws.read_bytes(folder, name)))
            if writer is not None and (held + table.nbytes > FILE_BYTES or writer.schema != table.schema):
                stack.close()  # closes the writer, then renames the staged file into place
                writer = None
            if writer is None:
                staged = f"{stage}/{len(moves):06d}"
                handle = stack.enter_context(ws.open_atomic(staged))
                writer = stack.enter_context(pq.ParquetWriter(handle, table.schema))
                moves.append((staged, f"{prefix}{number}.parquet"))
                number, held = number + 1, 0
            row_bytes = max(1, table.nbytes // max(table.num_rows, 1))
            writer.write_table(table, row_group_size=max(1024, ROW_GROUP_BYTES // row_bytes))
            held += table.nbytes
    failpoints.reached("compact:staged")
    journal = {"state": "swapping", "moves": moves, "replaces": inputs}
    if covered is not None:
        journal["covered_shards"] = sorted(covered)
    ws.write_json(f"{folder}/{JOURNAL}", journal)
    recover(ws, folder)  # the swap itself: the same steps a later run takes to finish a killed one
    return len(moves)


def compact(ws: Workspace, scan_ids: list[str] | None = None) -> dict:
    """Compact the finished scans' attributions and embeddings (all finished scans, or these); returns counts."""
    ws.require()
    with ws.lock("compact"):
        if ws.exists(STAGING):
            ws.fs.rm(ws.path(STAGING), recursive=True)  # staged by a run that died before its journal
        finished = finished_scans(ws)
        unknown = sorted(set(scan_ids or []) - set(finished))
        if unknown:
            raise WorkspaceError(f"no finished scan {', '.join(unknown)} (only scans with done.json are compacted)")
        chosen = scan_ids or finished
        out = {"scans": len(chosen), "files_before": 0, "files_after": 0, "recovered": 0}
        for scan_id in chosen:
            folder = table_folder("attributions", scan_id)
            out["recovered"] += recover(ws, folder)
            parts = [n for n in _names(ws, folder) if _SHARD_PART.fullmatch(n)]
            if len(parts) < 2:
                continue
            covered = covered_shards(ws, scan_id) | {_SHARD_PART.fullmatch(n).group(1) for n in parts}
            out["files_before"] += len(parts)
            out["files_after"] += _rewrite(ws, folder, parts, "part-c", covered)
        own = re.compile(rf"scan-({'|'.join(re.escape(s) for s in chosen)})-\d{{6}}\.parquet") if chosen else None
        for partition in _names(ws, TABLES, "embeddings"):
            folder = f"{TABLES}/embeddings/{partition}"
            out["recovered"] += recover(ws, folder)
            parts = [n for n in _names(ws, folder) if own and own.fullmatch(n)]
            if len(parts) < 2:
                continue
            out["files_before"] += len(parts)
            out["files_after"] += _rewrite(ws, folder, parts, "compact-")
        if ws.exists(STAGING):
            ws.fs.rm(ws.path(STAGING), recursive=True)
        return out
