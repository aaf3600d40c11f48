"""`lida query`: DuckDB SQL over the workspace tables, each a view named after its table.

Analyst SQL runs read-only: only queries (SELECT, WITH, VALUES, EXPLAIN, DESCRIBE, SHOW) are
taken, and for a local workspace DuckDB may open files under the workspace's tables folder
only (no `read_csv('/etc/...')`, no `COPY ... TO`, no `ATTACH`), a setting the SQL cannot undo.
Hive partition values stay text: a scan id such as `2026-11-27` is not turned into a DATE.
"""

from __future__ import annotations

import duckdb

import schemas
from lida_core.workspace import TABLES, Workspace

_READ_ONLY = {"SELECT", "EXPLAIN"}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(ws: Workspace) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table (empty tables are empty views, not errors), locked to the tables."""
    ws.require()
    con = duckdb.connect()
    if not ws.local:
        con.register_filesystem(ws.fs)
    for name in schemas.TABLES:
        files = [p for p in ws.fs.find(ws.path(TABLES, name)) if p.endswith(".parquet")] if ws.exists(TABLES, name) else []
        if files:
            pattern = ws.uri(TABLES, name) + "/**/*.parquet"
            con.execute(f"create view {name} as select * from read_parquet({_literal(pattern)}, hive_partitioning=true, "
                        f"hive_types_autocast=false, union_by_name=true)")
        else:
            columns = ", ".join(f'cast(null as varchar) as "{f.name}"' for f in schemas.schema(name, 1))
            con.execute(f"create view {name} as select {columns} where false")
    if ws.local:
        con.execute(f"set allowed_directories=[{_literal(ws.path(TABLES) + '/')}]")
        con.execute("set enable_external_access=false")
    con.execute("set lock_configuration=true")
    return con


def run_query(ws: Workspace, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(ws)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).strip().splitlines()[0]) from None
    for statement in statements:
        kind = statement.type.name
        if kind not in _READ_ONLY:
            raise QueryError(f"lida query runs read-only SQL (SELECT); got {kind}")
    try:
        relation = con.sql(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).strip().splitlines()[0]) from None
    if relation is None:
        return [], []
    return list(relation.columns), relation.fetchall()


class QueryError(ValueError):
    """SQL that DuckDB refused, or that would write."""
