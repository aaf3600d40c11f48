"""`lida_core.idset.ImageIds`: the set of past image ids each attribution worker holds, exact and 32 bytes an id."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lida_core.idset import ImageIds, digests
from lida_core.workspace import Workspace, table_folder
from pipelines.scan import embedded_elsewhere


def _ids(start, stop):
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, stop)]


# Digests that differ only in zero bytes: an 'S32' array drops trailing NULs when it hands out a scalar.
ZEROS = ["00" * 32, "00" * 31 + "01", "01" + "00" * 31, "00" * 16 + "ff" + "00" * 15]
OTHERS = ["short", "X" * 64, "ABCDEF" * 10 + "abcd", "é" * 10, ""]  # not lowercase hex: hashed, still exact


def test_membership_is_exact_for_hex_ids_zero_bytes_and_other_strings():
    held = _ids(0, 3000) + ZEROS[:2] + OTHERS[:2]
    absent = _ids(3000, 6000) + ZEROS[2:] + OTHERS[2:]
    ids = ImageIds([pa.array(held[:1000]), pa.chunked_array([pa.array(held[1000:]), pa.array(held[:10])]), [None, *held[:5]]])
    assert len(ids) == len(held)  # repeats and nulls collapse
    assert ids.nbytes == 32 * len(held)
    assert all(i in ids for i in held) and not any(i in ids for i in absent)
    assert ids.contains(held).all() and not ids.contains(absent).any()
    assert list(ids.contains([absent[0], held[7], absent[1], held[0]])) == [False, True, False, True]
    assert 123 not in ids and None not in ids
    assert bytes(digests([held[0]])[0]).hex() == held[0]  # a lida id is stored as the bytes it spells
    assert not ImageIds().contains(held).any() and held[0] not in ImageIds()


def test_upper_case_hex_is_a_different_id():
    """Ids are compared as strings: the upper-case spelling of a lida id is another id."""
    lower = _ids(0, 1)[0]
    ids = ImageIds([[lower]])
    assert lower in ids and lower.upper() not in ids


def test_embedded_elsewhere_reads_other_scans_files_only(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    folder = tmp_path / "ws" / table_folder("embeddings", "m1")
    folder.mkdir(parents=True)
    for name, ids in (("scan-past-000000.parquet", _ids(0, 50)), ("compacted-0001.parquet", _ids(50, 80)),
                      ("scan-now-000000.parquet", _ids(80, 90)), (".scan-past-000001.parquet.tmp.parquet", _ids(90, 95))):
        pq.write_table(pa.table({"image_id": pa.array(ids, pa.string()), "model_version": ["m1"] * len(ids)}), folder / name)
    known = embedded_elsewhere(ws, "m1", "now")
    assert len(known) == 80
    flags = known.contains(_ids(0, 100))
    assert flags[:80].all() and not flags[80:].any()  # this scan's own files and temporary files are not read
    assert len(embedded_elsewhere(ws, "another-model", "now")) == 0
    assert np.array_equal(embedded_elsewhere(ws, "m1", "other").contains(_ids(80, 90)), np.ones(10, bool))
