"""Run one SQL query over a Watershed lake with DuckDB and print the rows
as JSON. `{lake}` in the query is replaced by the lake directory. Used by
the end-to-end tests as an independent reader of the Parquet files."""

import json
import sys

import duckdb


def main() -> None:
    lake, sql = sys.argv[1], sys.argv[2]
    con = duckdb.connect()
    rows = con.execute(sql.replace("{lake}", lake)).fetchall()
    print(json.dumps([list(r) for r in rows], default=str))


if __name__ == "__main__":
    main()
