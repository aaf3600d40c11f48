"""Input listing: PATH arguments (files, folders recursively, fsspec URLs) -> image URIs.

Files named explicitly are always taken; inside folders, files with an image extension are
taken (case-insensitive), hidden files and folders are skipped. Results are sorted and
de-duplicated so that runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable

import fsspec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif")


class InputError(ValueError):
    """A PATH argument that names nothing usable."""


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/") if part not in ("", ".", ".."))


def list_inputs(paths: Iterable[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    found: set[str] = set()
    for raw in paths:
        fs, root = fsspec.core.url_to_fs(str(raw))
        if not fs.exists(root):
            raise InputError(f"{raw}: no such file or folder")
        if fs.isdir(root):
            for path in fs.find(root):
                relative = path[len(root.rstrip("/")) :]
                if _is_hidden(relative) or not path.lower().endswith(extensions):
                    continue
                found.add(fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path)
        else:
            found.add(str(raw) if "://" in str(raw) else root)
    return sorted(found)


def read_input(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as handle:
        return handle.read()


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
