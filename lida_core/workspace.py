"""The workspace: the one module that knows where everything lives.

    WORKSPACE/
      config.json                 profile, fingerprint, calibration targets, inboxes, schedules
      models/vNNNN/               immutable model versions: model.pt + meta.json
      models/CURRENT              the current version's name, replaced atomically
      blobs/ab/<sha256>           original bytes of gallery and calibration images
      tables/<name>/...           Hive-partitioned Parquet tables (schemas/)
      indexes/iNNNN/ + CURRENT    published attribution indexes
      runs/<job>/                 resumable training state, staged gallery rows, the flows' hash cache
      evals/<stamp>-<k>shot.*     `lida eval` results (JSON and Markdown)
      shards/<scan_id>/           WebDataset shards of scans
      lock                        held by a process that writes

A local path or any fsspec URL works. Locally, publication is atomic (write under a temporary
name, then `os.replace`/`rename`); on object stores the pointer is written last, so readers
follow the pointer and never see a half-written version.

Over 400 lines on purpose: every path, the lock, the config's checks and version publication
are the one place that knows the layout above.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

import schemas
from lida_core.fingerprint import FingerprintSettings

CONFIG = "config.json"
MODELS = "models"
INDEXES = "indexes"
BLOBS = "blobs"
TABLES = "tables"
RUNS = "runs"
EVALS = "evals"
SHARDS = "shards"
CURRENT = "CURRENT"
LOCK = "lock"
_VERSION = re.compile(r"^v(\d{4,})$")


class WorkspaceError(Exception):
    """A problem with the workspace the user can act on (missing, locked, inconsistent)."""


def table_folder(name: str, value: str) -> str:
    """`tables/<name>/<column>=<value>`: one partition of table `name` (its column from schemas/<name>.json)."""
    (column,) = schemas.partition_columns(name)
    return f"{TABLES}/{name}/{column}={value}"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def utc_stamp() -> str:
    """Now as a compact UTC stamp for names (scan ids, evaluations, runs): 20261129T131500Z."""
    return utc_now().strftime("%Y%m%dT%H%M%SZ")


DETECTIONS = ("prototype", "contrast", "quadratic")  # real/generated rules (decide.py)
# When each flow runs (cron, in `timezone`), unless config.json's `schedules` says otherwise.
DEFAULT_SCHEDULES = {"scan": "0 2 * * *", "reindex": "0 3 * * 0", "adapt": "0 4 * * 0"}


@dataclass
class WorkspaceConfig:
    profile: str
    fingerprint: str
    target_fpr: float = 0.05  # false-positive rate on real images for the detection threshold
    unknown_accept: float = 0.95  # share of known-generator images kept above the open-set threshold
    decision: str = "knn"  # knn | centroid
    detection: str | None = None  # prototype | contrast | quadratic; None: the profile's default
    k: int = 5
    top_k: int = 5
    inboxes: list[str] = field(default_factory=list)
    labelled_inbox: str | None = None
    adapt_min_new: int = 20  # newly labelled images (of known sources) that trigger an adaptation run
    schedules: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SCHEDULES))
    timezone: str = "UTC"  # the zone the schedules' cron strings are read in (an IANA name)
    # A fixed detection threshold in place of the calibrated one: the paper hand-sets 0.85 on the
    # similarity to the real prototype (`lida config detection prototype`, `lida config real_threshold 0.85`).
    real_threshold: float | None = None
    index_memory_mb: int = 4096  # the attribution index's memory: over it, compressed codes (index.choose_index)
    created_at: str = ""

    @property
    def jpeg_space(self) -> str:
        """How this workspace's models read a colour JPEG ("rgb" or "ycc"): part of its fingerprint settings."""
        return FingerprintSettings.parse(self.fingerprint).jpeg

    @classmethod
    def from_dict(cls, data: dict) -> WorkspaceConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise WorkspaceError(f"config.json: unknown settings {sorted(unknown)}")
        try:
            config = cls(**data)
            FingerprintSettings.parse(config.fingerprint)
        except (TypeError, ValueError) as exc:
            raise WorkspaceError(f"config.json: {exc}") from None
        if not 0 < config.target_fpr < 1 or not 0 < config.unknown_accept <= 1:
            raise WorkspaceError("config.json: target_fpr and unknown_accept must lie in (0, 1)")
        if not isinstance(config.inboxes, list) or not all(isinstance(i, str) for i in config.inboxes):
            raise WorkspaceError("config.json: inboxes must be a list of paths or URLs")
        if not isinstance(config.adapt_min_new, int) or config.adapt_min_new < 1:
            raise WorkspaceError("config.json: adapt_min_new must be a positive integer")
        if not isinstance(config.index_memory_mb, int) or isinstance(config.index_memory_mb, bool) or config.index_memory_mb < 1:
            raise WorkspaceError("config.json: index_memory_mb must be a positive integer (MiB)")
        if not isinstance(config.schedules, dict) or set(config.schedules) - set(DEFAULT_SCHEDULES):
            raise WorkspaceError("config.json: schedules maps scan, reindex and adapt to cron strings")
        for name, value in (("k", config.k), ("top_k", config.top_k)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1000:
                raise WorkspaceError(f"config.json: {name} must be an integer from 1 to 1000, got {value!r}")
        for job, cron in config.schedules.items():
            _check_cron(job, cron)
        _check_timezone(config.timezone)
        if config.real_threshold is not None and (isinstance(config.real_threshold, bool) or not isinstance(config.real_threshold, (int, float))
                                                  or not math.isfinite(config.real_threshold)):
            raise WorkspaceError("config.json: real_threshold must be a finite number or null (calibrated)")
        if config.decision not in ("knn", "centroid"):
            raise WorkspaceError("config.json: decision must be 'knn' or 'centroid'")
        if config.detection is not None and config.detection not in DETECTIONS:
            raise WorkspaceError("config.json: detection must be 'prototype', 'contrast', 'quadratic' or null (the profile's)")
        return config


def _check_cron(job: str, cron: object) -> None:
    """A five-field cron string that the scheduler accepts (minute 0-59, hour 0-23, ...)."""
    import datetime as _dt

    from cronsim import CronSim, CronSimError

    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise WorkspaceError(f"config.json: schedules.{job} must be a cron string of five fields, got {cron!r}")
    try:
        CronSim(cron, _dt.datetime(2026, 1, 1))
    except CronSimError as exc:
        raise WorkspaceError(f"config.json: schedules.{job} {cron!r} is not a valid cron string ({exc})") from None


def _check_timezone(name: object) -> None:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(str(name))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise WorkspaceError(f"config.json: timezone {name!r} is not an IANA time zone (for example UTC, Europe/Paris)") from None
    if not isinstance(name, str):
        raise WorkspaceError("config.json: timezone must be a string")


class Workspace:
    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------ paths and atomic I/O

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """A URL for other tools (DuckDB, Beam workers) to open the same place."""
        path = self.path(*parts)
        return path if self.local else self.fs.unstrip_protocol(path)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def ls(self, *parts: str) -> list[str]:
        """Paths of what a folder holds; [] when it does not exist."""
        folder = self.path(*parts)
        return self.fs.ls(folder, detail=False) if self.fs.exists(folder) else []

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as handle:
            return handle.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write under a temporary name in the same folder, then rename over the target."""
        with self.open_atomic(rel) as handle:
            handle.write(data)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator:
        """A file handle to stream into; the target appears (renamed into place) only when the block ends without error."""
        target = self.path(rel)
        folder = target.rsplit("/", 1)[0]
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as handle:
                yield handle
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.rm(tmp)
            raise
        self._replace(tmp, target)

    def _replace(self, source: str, target: str) -> None:
        """Rename a file over `target` (full paths): atomic locally; a copy-and-delete move on object stores."""
        if self.local:
            os.replace(source, target)
        else:
            self.fs.mv(source, target)

    def replace(self, source: str, target: str) -> None:
        """Rename workspace file `source` over `target` (both relative to the workspace; the target's folder is made)."""
        target = self.path(target)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self._replace(self.path(source), target)

    def read_json(self, *parts: str) -> dict:
        try:
            return json.loads(self.read_bytes(*parts))
        except FileNotFoundError:
            raise
        except (ValueError, UnicodeDecodeError) as exc:
            raise WorkspaceError(f"{self.path(*parts)}: not valid JSON ({exc})") from None

    def write_json(self, rel: str, data: dict) -> None:
        self.write_bytes(rel, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())

    def read_parquet(self, *parts: str, columns: list[str] | None = None, name_prefix: str = ""):
        """All Parquet files under a folder (recursively, in name order) as one Arrow table.

        Files whose name starts with `name_prefix` only; temporary files (dot names) never.
        None when the folder does not exist or holds no such file.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.path(*parts)
        if not self.fs.exists(folder):
            return None
        tables = []
        for path in sorted(p for p in self.fs.find(folder) if p.endswith(".parquet") and "/." not in p
                           and p.rsplit("/", 1)[-1].startswith(name_prefix)):
            with self.fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle, columns=columns))
        return pa.concat_tables(tables) if tables else None

    def write_table(self, rel: str, name: str, table, embedding_dim: int | None = None, drop_partition: bool = True):
        """Validate `table` against table `name`'s schema and write it as Parquet at `rel`, atomically.

        The partition column is dropped (the folder names it: `table_folder`) unless `drop_partition`
        is false, for staging files read back before the table is written. Returns the validated table.
        """
        import pyarrow.parquet as pq

        table = schemas.validate(table, name, embedding_dim=embedding_dim)
        with self.open_atomic(rel) as handle:
            pq.write_table(table.drop(schemas.partition_columns(name)) if drop_partition else table, handle)
        return table

    # ------------------------------------------------------------ config

    def is_initialised(self) -> bool:
        return self.exists(CONFIG)

    def require(self) -> Workspace:
        if not self.is_initialised():
            raise WorkspaceError(f"no lida workspace at {self.url} (run 'lida init' first, or pass --workspace)")
        return self

    def config(self) -> WorkspaceConfig:
        self.require()
        return WorkspaceConfig.from_dict(self.read_json(CONFIG))

    def save_config(self, config: WorkspaceConfig) -> None:
        self.write_json(CONFIG, asdict(config))

    # ------------------------------------------------------------ model versions

    def versions(self, folder: str, prefix: str) -> list[str]:
        """The published versions in `folder` (`<prefix>NNNN` names), oldest first."""
        pattern = re.compile(rf"^{prefix}(\d{{4,}})$")
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.ls(folder)]
        return sorted((n for n in names if pattern.match(n)), key=lambda n: int(n[len(prefix):]))

    def publish_version(self, folder: str, prefix: str, first: int, files: dict[str, bytes],
                        meta_file: str, meta: Callable[[str], dict]) -> str:
        """Publish `files` as the next version folder of `folder` (`<prefix>NNNN`, numbered from `first`); its name.

        The folder is assembled under a hidden name and renamed into place; `meta(version)` is
        written into it as `meta_file` for the name it is about to take. A name that exists is
        never reused (a concurrent publisher's rename wins and this one takes the next), so
        nothing published is ever overwritten. Model versions and index versions both publish here.
        """
        staging = self.path(folder, f".staging-{uuid.uuid4().hex}")
        self.fs.makedirs(staging, exist_ok=True)
        for name, data in files.items():
            with self.fs.open(f"{staging}/{name}", "wb") as handle:
                handle.write(data)
        while True:
            existing = self.versions(folder, prefix)
            version = f"{prefix}{(int(existing[-1][len(prefix):]) + 1) if existing else first:04d}"
            with self.fs.open(f"{staging}/{meta_file}", "wb") as handle:
                handle.write((json.dumps(meta(version), indent=2, sort_keys=True, default=str) + "\n").encode())
            target = self.path(folder, version)
            if self.local:
                try:
                    os.rename(staging, target)  # fails if the target exists: never overwrite
                    return version
                except OSError:
                    if not os.path.exists(target):
                        raise
                    continue
            if not self.fs.exists(target):
                self.fs.mv(staging, target, recursive=True)
                return version

    def model_versions(self) -> list[str]:
        return self.versions(MODELS, "v")

    def current_model_version(self) -> str | None:
        try:
            version = self.read_bytes(MODELS, CURRENT).decode().strip()
        except FileNotFoundError:
            return None
        if not _VERSION.match(version) or not self.exists(MODELS, version, "meta.json"):
            raise WorkspaceError(f"models/CURRENT points at {version!r}, which is not a published model version")
        return version

    def require_model_version(self) -> str:
        version = self.require().current_model_version()
        if version is None:
            raise WorkspaceError(f"workspace {self.url} has no model yet (run 'lida init')")
        return version

    def publish_model_version(self, files: dict[str, bytes], meta: dict) -> str:
        """Write a new immutable version folder, then return its name (CURRENT is not moved).

        The folder is assembled under a temporary name and renamed into place; a name that
        exists is never reused, so nothing published is ever overwritten.
        """
        digest = hashlib.sha256(files["model.pt"]).hexdigest() if "model.pt" in files else None
        return self.publish_version(MODELS, "v", 0, files, "meta.json", lambda version: {
            **meta, "version": version, "sha256": digest, "created_at": utc_now().isoformat()})

    def set_current_model(self, version: str) -> None:
        if not self.exists(MODELS, version, "meta.json"):
            raise WorkspaceError(f"model version {version} does not exist")
        self.write_bytes(f"{MODELS}/{CURRENT}", (version + "\n").encode())

    def model_meta(self, version: str) -> dict:
        try:
            return self.read_json(MODELS, version, "meta.json")
        except FileNotFoundError:
            raise WorkspaceError(f"model version {version} does not exist") from None

    def model_file(self, version: str) -> str:
        return self.uri(MODELS, version, "model.pt")

    def model_bytes(self, version: str) -> bytes:
        """The version's weights, checked against the sha256 recorded when it was published."""
        meta = self.model_meta(version)
        data = self.read_bytes(MODELS, version, "model.pt")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise WorkspaceError(f"model version {version}: weights do not match their recorded sha256")
        return data

    # ------------------------------------------------------------ content-addressed blobs

    def put_blob(self, data: bytes) -> str:
        image_id = hashlib.sha256(data).hexdigest()
        rel = f"{BLOBS}/{image_id[:2]}/{image_id}"
        if not self.exists(rel):
            self.write_bytes(rel, data)
        return image_id

    def get_blob(self, image_id: str) -> bytes:
        if not re.fullmatch(r"[0-9a-f]{64}", image_id):
            raise WorkspaceError(f"not an image id: {image_id!r}")
        try:
            return self.read_bytes(BLOBS, image_id[:2], image_id)
        except FileNotFoundError:
            raise WorkspaceError(f"image {image_id} is missing from the workspace blobs") from None

    # ------------------------------------------------------------ runs (resumable state)

    @staticmethod
    def run_path(job: str, name: str = "") -> str:
        return f"{RUNS}/{job}/{name}".rstrip("/")

    # ------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """One writer at a time; locally a flock, which a dead process releases by dying."""
        self.fs.makedirs(self.root, exist_ok=True)
        rel = self.path(LOCK)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "since": utc_now().isoformat()}
        if self.local:
            fd = self._flock(rel, owner)
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(rel)  # while still holding it: a waiter that opened this file sees it is gone and retries
                os.close(fd)
            return
        if self.fs.exists(rel):
            holder = self._lock_holder()
            raise WorkspaceError(f"workspace {self.url} is busy: {holder.get('purpose', '?')} since {holder.get('since', '?')}")
        with self.fs.open(rel, "w") as handle:
            json.dump(owner, handle)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(rel)

    def _flock(self, rel: str, owner: dict) -> int:
        """Hold the local lock file with flock: the kernel releases it when its process dies, so no stale lock
        is ever taken over by hand (that takeover let two processes hold the lock at once)."""
        import fcntl

        while True:
            fd = os.open(rel, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._lock_holder()
                raise WorkspaceError(
                    f"workspace {self.url} is busy: {holder.get('purpose', '?')} (pid {holder.get('pid', '?')} "
                    f"on {holder.get('host', '?')} since {holder.get('since', '?')}); try again when it ends"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(rel).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder removed after we opened it
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(owner).encode())
                return fd
            os.close(fd)

    def _lock_holder(self) -> dict:
        try:
            with self.fs.open(self.path(LOCK), "r") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return {}


FIXED_SETTINGS = ("profile", "fingerprint", "created_at")  # chosen at init: the models depend on them


def set_config_value(ws: Workspace, key: str, values: list[str]) -> WorkspaceConfig:
    """`lida config KEY VALUE...`: one setting, checked like config.json itself, saved under the lock."""
    with ws.lock("config"):
        data = asdict(ws.config())
        head, _, tail = key.partition(".")
        if head not in data:
            raise WorkspaceError(f"no setting {key!r}; settings: {', '.join(sorted(data))}")
        if head in FIXED_SETTINGS:
            raise WorkspaceError(f"{head} is fixed when the workspace is made (the models depend on it)")
        current = data[head]
        if tail:
            if not isinstance(current, dict) or len(values) != 1:
                raise WorkspaceError(f"{key}: expected one value for an entry of {head}")
            data[head] = {**current, tail: values[0]}
        elif isinstance(current, list) or head == "inboxes":
            data[head] = [] if values == ["none"] else list(values)
        elif len(values) != 1:
            raise WorkspaceError(f"{key} takes one value")
        elif head in ("labelled_inbox", "detection"):  # optional settings: "none" clears them
            data[head] = None if values[0] == "none" else values[0]
        elif head == "real_threshold":
            try:
                data[head] = None if values[0] == "none" else float(values[0])
            except ValueError:
                raise WorkspaceError(f"{key}: {values[0]!r} is not a number") from None
        else:
            kind = type(current)
            try:
                data[head] = kind(values[0]) if kind is not dict else json.loads(values[0])
            except ValueError:
                noun = {"int": "an integer", "float": "a number"}.get(kind.__name__, kind.__name__)
                raise WorkspaceError(f"{key}: {values[0]!r} is not {noun}") from None
        config = WorkspaceConfig.from_dict(data)
        ws.save_config(config)
    return config


def scan_ids(ws: Workspace) -> dict[str, bool]:
    """Every scan id with a plan, and whether it finished (images, embeddings and attributions written)."""
    found = {}
    for path in sorted(ws.ls(SHARDS)):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if ws.exists(f"{SHARDS}/{name}/plan.json"):
            found[name] = ws.exists(f"{SHARDS}/{name}/done.json")
    return found
