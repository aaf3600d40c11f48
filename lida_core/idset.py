"""A large set of image ids held compactly: sorted 32-byte digests, not Python strings.

A scan's attribution workers each need to know which images their model has already embedded
in other scans (one embeddings row per image and model). Held as a `frozenset` of 64-character
hex strings, that set costs about 150 bytes an id per worker and grows with the workspace's
whole history: 1.5 GB across 10 workers at a million past images. Here each id is its SHA-256
digest, 32 bytes in one sorted numpy array, and membership is a binary search.

- An id that is 64 lowercase hex digits (every image id lida writes: the SHA-256 of the file's
  bytes) is stored as the 32 bytes it spells, decoded in blocks straight from Arrow's buffers.
- Any other string (an id written by another tool) is stored as the SHA-256 of its UTF-8
  bytes under a prefix, so it cannot be mistaken for a hex id short of a SHA-256 collision.
Membership is therefore exact for lida's ids and exact up to SHA-256 for any other.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST = 32
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_BLOCK = 65536  # ids decoded at a time: bounds the temporaries for a large compacted file
_OTHER = b"lida image id, not hex:"
_LOWER_HEX = re.compile(r"[0-9a-f]{64}")


def _other(text: str) -> bytes:
    return hashlib.sha256(_OTHER + text.encode("utf-8", "surrogatepass")).digest()


def _decode_hex(chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """n x 64 ASCII bytes -> (n x 32 digests, whether each row was lowercase hex)."""
    nibbles = _HEX[chars]
    good = (nibbles < 16).all(axis=1)
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2], good


def digests(ids: pa.Array | pa.ChunkedArray | Iterable[str]) -> np.ndarray:
    """The ids' digests (n x 32 uint8, in order; nulls dropped)."""
    if isinstance(ids, pa.ChunkedArray):
        parts = [digests(chunk) for chunk in ids.chunks]
        return np.concatenate(parts) if parts else np.empty((0, DIGEST), np.uint8)
    if not isinstance(ids, pa.Array):
        ids = pa.array(list(ids), type=pa.string())
    ids = ids.drop_null()
    out = np.empty((len(ids), DIGEST), np.uint8)
    hexlike = pc.equal(pc.binary_length(ids), 64).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(hexlike)
    if len(rows):
        fixed = ids.filter(pa.array(hexlike)).cast(pa.binary(64))
        chars = np.frombuffer(fixed.buffers()[1], np.uint8)[fixed.offset * 64:(fixed.offset + len(fixed)) * 64].reshape(-1, 64)
        for start in range(0, len(rows), _BLOCK):
            decoded, good = _decode_hex(chars[start:start + _BLOCK])
            block = rows[start:start + _BLOCK]
            out[block[good]] = decoded[good]
            hexlike[block[~good]] = False  # 64 characters but not lowercase hex: hashed below
    for i in np.flatnonzero(~hexlike):
        out[i] = np.frombuffer(_other(ids[int(i)].as_py()), np.uint8)
    return out


class ImageIds:
    """An immutable set of image ids: `id in ids`, `ids.contains([...])`, `len(ids)`; about 32 bytes an id."""

    def __init__(self, columns: Iterable[pa.Array | pa.ChunkedArray | Iterable[str]] = ()):
        parts = [digests(c) for c in columns]  # `columns` may be a generator: one file's strings alive at a time
        flat = np.concatenate(parts) if parts else np.empty((0, DIGEST), np.uint8)
        del parts
        keys = np.ascontiguousarray(flat).view(f"S{DIGEST}").ravel()
        keys.sort()  # in place; 'S32' compares as bytes, and with every entry 32 bytes long no two distinct ones tie
        first = np.ones(len(keys), bool)
        np.not_equal(keys[1:], keys[:-1], out=first[1:])
        self._sorted = keys[first] if not first.all() else keys  # without repeats

    def __len__(self) -> int:
        return len(self._sorted)

    @property
    def nbytes(self) -> int:
        return self._sorted.nbytes

    def contains(self, ids: pa.Array | pa.ChunkedArray | Iterable[str]) -> np.ndarray:
        """A bool per id (nulls dropped first), in order."""
        keys = np.ascontiguousarray(digests(ids)).view(f"S{DIGEST}").ravel()
        if not len(self._sorted):
            return np.zeros(len(keys), bool)
        at = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        return self._sorted[at] == keys

    def __contains__(self, image_id: object) -> bool:
        if not isinstance(image_id, str) or not len(self._sorted):
            return False
        if len(image_id) == 64 and _LOWER_HEX.fullmatch(image_id):
            key = bytes.fromhex(image_id)
        else:
            key = _other(image_id)
        probe = np.frombuffer(key, f"S{DIGEST}")  # an array, not a scalar: a scalar drops trailing NUL bytes
        at = min(int(np.searchsorted(self._sorted, probe)[0]), len(self._sorted) - 1)
        return bool((self._sorted[at:at + 1] == probe)[0])
