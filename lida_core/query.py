"""`lida query`: DuckDB SQL over the workspace tables, each a view named after its table."""

from __future__ import annotations

import duckdb

import schemas
from lida_core.workspace import TABLES, Workspace


def connect(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table (empty tables are empty views, not errors)."""
    ws.require()
    con = duckdb.connect()
    if not ws.local:
        con.register_filesystem(ws.fs)
    for name in schemas.TABLES:
        files = [p for p in ws.fs.find(ws.path(TABLES, name)) if p.endswith(".parquet")] if ws.exists(TABLES, name) else []
        if files:
            pattern = ws.uri(TABLES, name) + "/**/*.parquet"
            con.execute(f"create view {name} as select * from read_parquet('{pattern}', hive_partitioning=true)")
        else:
            columns = ", ".join(f'cast(null as varchar) as "{f.name}"' for f in schemas.schema(name, 1))
            con.execute(f"create view {name} as select {columns} where false")
    return con


def run_query(ws: Workspace, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(ws)
    try:
        relation = con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).strip().splitlines()[0]) from None
    if relation is None:
        return [], []
    return list(relation.columns), relation.fetchall()


class QueryError(ValueError):
    """SQL that DuckDB refused."""
