"""Table schemas: the contract's columns, and validation that refuses bad rows."""

import datetime as dt

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import schemas

CONTRACT_COLUMNS = {
    "images": ["scan_id", "uri", "image_id", "status", "error", "format", "width", "height", "bytes", "shard", "key"],
    "embeddings": ["image_id", "model_version", "fingerprint", "embedding"],
    "attributions": [
        "scan_id", "uri", "image_id", "predicted_source", "is_generated", "real_score", "top1_similarity",
        "topk_sources", "topk_similarities", "model_version", "index_version", "scanned_at",
    ],
    "gallery": ["image_id", "uri", "source", "added_at", "model_version", "embedding"],
}


def test_every_contract_column_is_in_its_schema():
    for table, columns in CONTRACT_COLUMNS.items():
        names = schemas.schema(table, embedding_dim=8).names
        assert [c for c in columns if c not in names] == [], table


def images_rows(**override):
    row = dict(
        scan_id="s1", uri="file:///a b/é.png", image_id="ab" * 32, status="ok", error=None, format="PNG",
        width=4, height=3, jpeg_quality=None, bytes=120, shard="000000", key="k0", scanned_at=dt.datetime(2026, 11, 27, tzinfo=dt.UTC),
    )
    row.update(override)
    return pa.Table.from_pylist([row])


def test_validate_casts_and_accepts_good_rows():
    table = schemas.validate(images_rows(), "images")
    assert table.schema.field("width").type == pa.int32()


def test_validate_refuses_bad_rows():
    with pytest.raises(schemas.SchemaError, match="not in"):
        schemas.validate(images_rows(status="maybe"), "images")
    with pytest.raises(schemas.SchemaError, match="null values"):
        schemas.validate(images_rows(uri=None), "images")
    with pytest.raises(schemas.SchemaError, match="missing columns"):
        schemas.validate(images_rows().drop(["bytes"]), "images")
    with pytest.raises(schemas.SchemaError, match="unexpected columns"):
        schemas.validate(images_rows().append_column("extra", pa.array([1])), "images")
    with pytest.raises(schemas.SchemaError, match="unknown table"):
        schemas.schema("nope")


def test_embeddings_are_fixed_size_float32_lists_readable_by_duckdb(tmp_path):
    rows = pa.table({
        "image_id": ["x", "y"], "model_version": ["v1", "v1"], "fingerprint": ["b3-scale-full-crop128"] * 2,
        "embedding": [[0.5, 1.0, 2.0], [1.0, 0.0, -1.0]],
    })
    table = schemas.validate(rows, "embeddings", embedding_dim=3)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    with pytest.raises(schemas.SchemaError):
        schemas.validate(rows, "embeddings", embedding_dim=4)
    with pytest.raises(schemas.SchemaError, match="embedding dimension"):
        schemas.schema("embeddings")
    (tmp_path / "model_version=v1").mkdir()
    pq.write_table(table.drop(["model_version"]), tmp_path / "model_version=v1" / "part-0.parquet")
    got = duckdb.sql(
        f"select model_version, embedding[1] as first from read_parquet('{tmp_path}/**/*.parquet', hive_partitioning=true) order by first"
    ).fetchall()
    assert got == [("v1", 0.5), ("v1", 1.0)]
