"""Table schemas: the one place that knows each table's columns (see `<table>.json`).

Every writer calls `validate(table, name)` before writing. Embedding columns are
fixed-size float32 lists whose size is the model's embedding dimension, given at write time.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import pyarrow as pa

TABLES = ("images", "embeddings", "attributions", "gallery")

_SCALARS = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
    "list<string>": pa.list_(pa.string()),
    "list<float32>": pa.list_(pa.float32()),
}


class SchemaError(ValueError):
    """Rows that do not match their table's schema."""


@cache
def spec(name: str) -> dict:
    if name not in TABLES:
        raise SchemaError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    return json.loads(resources.files(__package__).joinpath(f"{name}.json").read_text(encoding="utf-8"))


def partition_columns(name: str) -> list[str]:
    return list(spec(name).get("partition_by", []))


def schema(name: str, embedding_dim: int | None = None) -> pa.Schema:
    """The Arrow schema of table `name`; tables with embeddings need `embedding_dim`."""
    fields = []
    for column in spec(name)["columns"]:
        kind = column["type"]
        if kind == "fixed_size_list<float32>":
            if not embedding_dim or embedding_dim < 1:
                raise SchemaError(f"table {name!r} needs an embedding dimension")
            arrow_type = pa.list_(pa.float32(), embedding_dim)
        else:
            arrow_type = _SCALARS[kind]
        fields.append(pa.field(column["name"], arrow_type, nullable=column["nullable"]))
    return pa.schema(fields)


def validate(table: pa.Table, name: str, embedding_dim: int | None = None) -> pa.Table:
    """Check columns, types, nulls and enumerations; return the table cast to the schema."""
    expected = schema(name, embedding_dim)
    missing = [f.name for f in expected if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in expected.names]
    if missing or extra:
        raise SchemaError(f"{name}: missing columns {missing}, unexpected columns {extra}")
    table = table.select(expected.names)
    for column in spec(name)["columns"]:
        values = table.column(column["name"])
        if not column["nullable"] and values.null_count:
            raise SchemaError(f"{name}.{column['name']}: {values.null_count} null values in a non-null column")
        allowed = column.get("enum")
        if allowed:
            bad = {v for v in values.to_pylist() if v is not None} - set(allowed)
            if bad:
                raise SchemaError(f"{name}.{column['name']}: values {sorted(bad)} not in {allowed}")
    try:
        table = table.cast(expected, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError) as exc:
        raise SchemaError(f"{name}: {exc}") from None
    return table
