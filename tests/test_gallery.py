"""The gallery table as the fits read it: its row order and which registration a re-added image keeps."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from lida_core import gallery
from lida_core.workspace import Workspace, table_folder


def _rows(registrations, when):
    return [{"image_id": image, "uri": uri, "source": source, "added_at": when, "model_version": "v0001",
             "fingerprint": "low3-scaled", "embedding": np.ones(4, dtype=np.float32).tolist()}
            for image, source, uri in registrations]


def test_rows_come_in_registration_order_whatever_the_part_files_are_named(tmp_path):
    """Part files carry random names; the rows a fit reads follow registration time, and a re-add keeps the first."""
    ws = Workspace(str(tmp_path / "ws"))
    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=1)
    folder = table_folder("gallery", "v0001")
    # the later registration lands in the part whose name sorts first
    ws.write_table(f"{folder}/part-0000.parquet", "gallery",
                   pa.Table.from_pylist(_rows([("a" * 64, "real", "again.png"), ("b" * 64, "gen", "b.png")], late)), 4)
    ws.write_table(f"{folder}/part-ffff.parquet", "gallery",
                   pa.Table.from_pylist(_rows([("c" * 64, "gen", "c.png"), ("a" * 64, "real", "first.png")], early)), 4)
    rows = gallery.table(ws, "v0001")
    assert rows["uri"].to_pylist() == ["c.png", "first.png", "b.png"]  # by time, then source and id; the re-add dropped
    assert rows["model_version"].to_pylist() == ["v0001"] * 3
    # the same registrations written the other way round read back the same
    other = Workspace(str(tmp_path / "other"))
    other.write_table(f"{folder}/part-0000.parquet", "gallery",
                      pa.Table.from_pylist(_rows([("c" * 64, "gen", "c.png"), ("a" * 64, "real", "first.png")], early)), 4)
    other.write_table(f"{folder}/part-ffff.parquet", "gallery",
                      pa.Table.from_pylist(_rows([("a" * 64, "real", "again.png"), ("b" * 64, "gen", "b.png")], late)), 4)
    assert gallery.table(other, "v0001").to_pylist() == rows.to_pylist()
