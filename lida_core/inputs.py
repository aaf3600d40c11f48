"""Input listing: PATH arguments (files, folders recursively, fsspec URLs) -> image URIs, and reading them safely.

Files named explicitly are always taken. Inside folders, `list_inputs` takes files with an
image extension (case-insensitive) and skips hidden files and folders: what gallery, pretrain
and eval read. A scan takes `every_entry=True`: every file, whatever its name, and every
folder it cannot list, so that each directory entry gets its row in the images table (an
error with a reason where it is not an image). Results are sorted and de-duplicated so that
runs are reproducible.

File names are text everywhere in lida (Beam's coders, Parquet, JSON). A local name that is
not valid UTF-8 is carried with its undecodable bytes written as `\\xHH` (`display_uri`), and
`read_input` maps it back to the bytes on disk.

`read_input` reads at most `max_bytes` and only regular files (a FIFO, a device or
`/dev/zero` behind a symlink would block or exhaust memory), and raises `InputReadError`
(an OSError) with a short reason otherwise.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable

import fsspec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # above any photograph or generator output; bounds memory per file
_ESCAPED = re.compile(rb"\\x([0-9a-fA-F]{2})")


class InputError(ValueError):
    """A PATH argument that names nothing usable."""


class InputReadError(OSError):
    """An input that exists but is not read: not a regular file, or larger than the byte cap."""


def display_uri(uri: str) -> str:
    """The name as valid UTF-8: bytes a local file name holds that are not UTF-8 become `\\xHH`."""
    try:
        uri.encode("utf-8")
        return uri
    except UnicodeEncodeError:
        return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _local_path(uri: str) -> str | bytes:
    """The path to open for a local URI: the `display_uri` escape undone when the literal name does not exist."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "\\x" in path and not os.path.lexists(path):
        raw = _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), path.encode("utf-8"))
        if os.path.lexists(raw):
            return raw
    return path


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/") if part not in ("", ".", ".."))


def _walk_local(root: str) -> tuple[list[str], list[str]]:
    """(files, folders that could not be listed) under a local folder, symlinked folders not followed."""
    files, unreadable = [], []
    stack = [os.fsencode(root)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    else:
                        files.append(entry.path)
        except OSError:
            unreadable.append(folder)
    return [display_uri(os.fsdecode(f)) for f in files], [display_uri(os.fsdecode(f)) for f in unreadable]


def list_inputs(paths: Iterable[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS, every_entry: bool = False) -> list[str]:
    found: set[str] = set()
    for raw in paths:
        if _is_local(str(raw)):  # a name in its `display_uri` form (a plan, a flow) is mapped back to the bytes on disk
            mapped = _local_path(str(raw))
            raw = os.fsdecode(mapped) if isinstance(mapped, bytes) else raw
        fs, root = fsspec.core.url_to_fs(str(raw))
        local = fs.protocol in ("file", ("file", "local"))
        if not fs.exists(root):
            raise InputError(f"{display_uri(str(raw))}: no such file or folder")
        if fs.isdir(root):
            if local:
                files, unreadable = _walk_local(root)
                found.update(unreadable if every_entry else [])
            else:
                files = [fs.unstrip_protocol(p) for p in fs.find(root)]
            for path in files:
                relative = path[len(root.rstrip("/")) :] if local else path
                if every_entry or (not _is_hidden(relative) and path.lower().endswith(extensions)):
                    found.add(path)
        else:
            found.add(display_uri(str(raw)) if "://" in str(raw) else display_uri(root))
    return sorted(found)


def _too_large(size: int, max_bytes: int) -> InputReadError:
    return InputReadError(f"too large: {size} bytes, over the {max_bytes}-byte limit")


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _check_local(path: str | bytes, max_bytes: int) -> os.stat_result:
    info = os.stat(path)  # follows symlinks: what would be read
    if stat.S_ISDIR(info.st_mode):
        raise InputReadError("a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a character device" if stat.S_ISCHR(info.st_mode)
                else "a block device" if stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a special file")
        raise InputReadError(f"not a regular file ({kind})")
    if info.st_size > max_bytes:
        raise _too_large(info.st_size, max_bytes)
    return info


def input_info(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[int, str]:
    """(size, modification stamp) of an input that `read_input` would read; InputReadError where it would not."""
    if _is_local(uri):
        info = _check_local(_local_path(uri), max_bytes)
        return int(info.st_size), f"mtime={info.st_mtime_ns}"
    fs, path = fsspec.core.url_to_fs(uri)
    info = fs.info(path)
    size = int(info.get("size") or 0)
    if size > max_bytes:
        raise _too_large(size, max_bytes)
    stamp = next((f"{k}={info[k]}" for k in ("mtime", "LastModified", "updated", "ETag", "etag", "md5Hash", "last_modified")
                  if info.get(k) is not None), "")
    return size, stamp


def read_input(uri: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes: regular files only, at most `max_bytes` (InputReadError otherwise)."""
    if _is_local(uri):
        path = _local_path(uri)
        size = _check_local(path, max_bytes).st_size
        with open(path, "rb") as handle:
            # As many bytes as stat says, plus one to see a file that grew since: a read of n
            # bytes allocates n first, and max_bytes (256 MiB) for every file cost 0.09 ms each.
            data = handle.read(size + 1)
            if len(data) > size:
                data += handle.read(max_bytes + 1 - len(data))
    else:
        with fsspec.open(uri, "rb") as handle:
            size = getattr(handle, "size", None)
            if size is not None and size > max_bytes:
                raise _too_large(size, max_bytes)
            data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputReadError(f"too large: over the {max_bytes}-byte limit")
    return data


def labelled_folders(root: str) -> dict[str, list[str]]:
    """DIR with one sub-folder per source -> {source: [image URIs]} (sources sorted)."""
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise InputError(f"{root}: not a folder")
    out: dict[str, list[str]] = {}
    for entry in sorted(fs.ls(base, detail=True), key=lambda e: e["name"]):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] == "directory" and not name.startswith("."):
            files = list_inputs([entry["name"] if "://" not in root else fs.unstrip_protocol(entry["name"])])
            if files:
                out[name] = files
    if not out:
        raise InputError(f"{root}: expected one sub-folder of images per source, found none")
    return out


GENIMAGE_SPLITS = ("train", "val")
GENIMAGE_CLASSES = {"ai": None, "nature": "real"}  # None: the generator's own folder name


def genimage_folders(root: str) -> dict[str, dict[str, list[str]]] | None:
    """GenImage's layout, DIR/<generator>/{train,val}/{ai,nature}/ -> {split: {source: [image URIs]}}.

    `ai` images are labelled by their generator's folder; every generator's `nature` images are
    one source, `real`. None when DIR is not laid out so (then it is one sub-folder per source).
    """
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise InputError(f"{root}: not a folder")

    def children(path: str) -> dict[str, str]:
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["name"] for e in fs.ls(path, detail=True)
                if e["type"] == "directory" and not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")}

    generators = children(base)
    layout = {g: {s: children(p) for s, p in children(path).items() if s in GENIMAGE_SPLITS} for g, path in generators.items()}
    laid_out = {g for g, splits in layout.items() if any(set(c) & set(GENIMAGE_CLASSES) for c in splits.values())}
    if not laid_out:
        return None
    if laid_out != set(generators):
        raise InputError(f"{root}: mixes GenImage folders (<generator>/{{train,val}}/{{ai,nature}}) with others: "
                         f"{', '.join(sorted(set(generators) - laid_out))}")
    if "real" in generators:
        raise InputError(f"{root}: a generator folder named 'real' would be mixed with the nature images")
    out: dict[str, dict[str, list[str]]] = {}
    for generator, splits in sorted(layout.items()):
        for split, classes in splits.items():
            for cls, path in classes.items():
                if cls not in GENIMAGE_CLASSES:
                    continue
                files = list_inputs([path if "://" not in root else fs.unstrip_protocol(path)])
                if files:
                    out.setdefault(split, {}).setdefault(GENIMAGE_CLASSES[cls] or generator, []).extend(files)
    return {split: dict(sorted(groups.items())) for split, groups in out.items()}
