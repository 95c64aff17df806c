"""Comparators for `watershed bench`: NDJSON -> Parquet (zstd), one file per
event type, with pyarrow and with DuckDB (one thread). Prints one JSON
object of seconds per tool. The caller pins this process to one core."""

import json
import sys
import time

import duckdb
import pyarrow.json as pj
import pyarrow.parquet as pq


def main() -> None:
    out_dir, inputs = sys.argv[1], sys.argv[2:]
    t = time.perf_counter()
    for i, path in enumerate(inputs):
        table = pj.read_json(path)
        pq.write_table(table, f"{out_dir}/pyarrow-{i}.parquet", compression="zstd")
    pyarrow_s = time.perf_counter() - t

    con = duckdb.connect()
    con.execute("SET threads = 1")
    t = time.perf_counter()
    for i, path in enumerate(inputs):
        con.execute(
            f"COPY (SELECT * FROM read_json_auto('{path}')) TO '{out_dir}/duckdb-{i}.parquet' "
            "(FORMAT parquet, COMPRESSION zstd)"
        )
    duckdb_s = time.perf_counter() - t
    print(json.dumps({"pyarrow": pyarrow_s, "duckdb": duckdb_s}))


if __name__ == "__main__":
    main()
