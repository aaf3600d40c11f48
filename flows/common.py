"""What the flows share: offline Prefect settings, content hashes of inbox files, known image ids.

"New since the last successful run" is decided by content: a file whose sha256 is already in a
finished scan's `images` table (or in the gallery) is not redone, wherever it lies now. Hashing
means reading every inbox file, so hashes are cached per workspace by (URI, size, modification
stamp): a file that has not changed is not read again.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from lida_core.inputs import InputReadError, input_info, read_input
from lida_core.workspace import Workspace, table_folder

HASH_CACHE = Workspace.run_path("flows", "hashes.parquet")
HASH_THREADS = min(16, 2 * (os.cpu_count() or 1))  # file reads wait on storage; hashing uses every core
# Seconds between task retries (a busy workspace, a flaky store); tests set LIDA_RETRY_DELAY_S=0.
RETRY_DELAY_S = float(os.environ.get("LIDA_RETRY_DELAY_S", "30"))


def offline_prefect() -> None:
    """No analytics, no telemetry, and time for a temporary local server to start on a slow machine."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def prefect_console_logging(level: int) -> None:
    """Prefect's own console lines (flow and task run names, states) on stderr, at `level`.

    `lida` configures the root logger before Prefect is imported, and Prefect then leaves the
    root alone: its records reached the plain root handler ("INFO:prefect.task_runs:...") with
    no run or task names. Its console handler and formatter go on the `prefect` logger
    instead, with the formats from Prefect's logging settings (so `PREFECT_LOGGING_*`
    overrides still apply).
    """
    import logging

    # Prefect (re)configures its loggers' levels when it sets up logging: its own setting
    # carries the level, unless the user set one.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging.getLevelName(level))
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH, ensure_logging_setup, load_logging_config
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # first, or its set-up would drop the handler added here
    settings = load_logging_config(DEFAULT_LOGGING_SETTINGS_PATH)["formatters"]["standard"]
    handler = PrefectConsoleHandler(stream=sys.stderr)
    handler.setFormatter(PrefectFormatter(settings["format"], settings.get("datefmt"), flow_run_fmt=settings.get("flow_run_fmt"),
                                          task_run_fmt=settings.get("task_run_fmt")))
    logger = logging.getLogger("prefect")
    for old in [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def content_hashes(ws: Workspace, uris: Iterable[str], progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """URI -> sha256 of its bytes (the image_id), reading only files whose size or stamp changed."""
    uris = list(uris)
    cached: dict[str, tuple[int, str, str]] = {}
    if ws.exists(HASH_CACHE):
        table = pq.read_table(io.BytesIO(ws.read_bytes(HASH_CACHE)))
        for uri, size, stamp, image_id in zip(*(table[c].to_pylist() for c in ("uri", "size", "stamp", "image_id")), strict=True):
            cached[uri] = (size, stamp, image_id)
    out: dict[str, str] = {}
    fresh: dict[str, tuple[int, str, str]] = {}
    to_read: list[tuple[str, int, str]] = []
    for uri in uris:
        try:
            size, stamp = input_info(uri)
        except InputReadError:
            # Not a file lida reads (a FIFO, a device, over the byte cap): the scan records it as an
            # error row under the id of its name, which then counts as seen like any other image.
            out[uri] = hashlib.sha256(uri.encode()).hexdigest()
            continue
        except OSError:
            continue  # gone since it was listed: the next run sees it if it comes back
        hit = cached.get(uri)
        if hit and stamp and hit[0] == size and hit[1] == stamp:
            out[uri] = hit[2]
            fresh[uri] = hit
        else:
            to_read.append((uri, size, stamp))

    def digest(job: tuple[str, int, str]) -> tuple[str | None, bool]:
        """(image_id or None when the file is gone, whether to cache it)."""
        try:
            return hashlib.sha256(read_input(job[0])).hexdigest(), True
        except InputReadError:  # an error row under the id of its name, as above; read again next time
            return hashlib.sha256(job[0].encode()).hexdigest(), False
        except OSError:
            return None, False

    # Reading and hashing release the GIL: threads overlap file reads (local disks, object
    # stores) and share the hashing among the cores. Blocks keep the queue of futures short.
    done = len(uris) - len(to_read)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        for start in range(0, len(to_read), 500):
            block = to_read[start : start + 500]
            for (uri, size, stamp), (image_id, keep) in zip(block, pool.map(digest, block), strict=True):
                if image_id is not None:
                    out[uri] = image_id
                if keep:
                    fresh[uri] = (size, stamp, image_id)
            done += len(block)
            if progress:
                progress(done, len(uris))
    if fresh and any(cached.get(u) != v for u, v in fresh.items()):
        merged = {**cached, **fresh}
        names = sorted(merged)
        table = pa.table({"uri": names, "size": [merged[u][0] for u in names], "stamp": [merged[u][1] for u in names],
                          "image_id": [merged[u][2] for u in names]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        ws.write_bytes(HASH_CACHE, sink.getvalue())
    return out


def table_image_ids(ws: Workspace, table: str, partitions: Iterable[str]) -> set[str]:
    """image_id values of the named partitions of a workspace table (their values: scan ids or model versions)."""
    ids: set[str] = set()
    for partition in partitions:
        found = ws.read_parquet(table_folder(table, partition), columns=["image_id"])
        if found is not None:
            ids.update(found["image_id"].to_pylist())
    return ids
