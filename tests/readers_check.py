"""Read each case_N.parquet under DIR with DuckDB and with pyarrow and
compare its `detail` column with case_N.json, the values the hub wrote
(written by tests/readers.rs). Values are compared in one normal form:
bytes {"b64"}, decimals {"dec": plain text}, dates as days, times and
timestamps as microseconds (cast in Arrow: Python's dates stop at year
1), maps {"map": sorted [key, value] pairs} (an empty map reads as [], as
pyarrow gives it), records as objects.

Each case's table (tables/case_N, one Hive partition) is also read
through the DuckDB view of case_N.duckdb.sql (`watershed lake ddl`),
which must give the same values, the partition values typed; and the
Athena, Spark and Trino statements (case_N.<dialect>.sql) are parsed with
sqlglot, and their `detail` column must declare the file's type as
pyarrow reads it (`declared`, below: the mapping docs/LAKE.md gives).
Prints a JSON report; exits 1 on a mismatch."""

import base64
import decimal
import json
import logging
import pathlib
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot
from sqlglot import exp


def nested(t, leaf):
    """`t` with `leaf` applied to every type in it that is not nested."""
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(nested(t.field(i).type, leaf)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(t.key_field, t.item_field.with_type(nested(t.item_type, leaf)))
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(nested(t.value_type, leaf)))
    return leaf(t)


def micros(t):
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz=t.tz)
    return t


def integers(t):
    if pa.types.is_date32(t):
        return pa.int32()
    if pa.types.is_time(t) or pa.types.is_timestamp(t):
        return pa.int64()
    return t


def plain(column):
    """A column's values, dates, times and timestamps as integers."""
    column = column.cast(nested(column.type, micros))
    return column.cast(nested(column.type, integers)).to_pylist()


def norm(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, decimal.Decimal):
        return {"dec": format(v, "f")}
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    if isinstance(v, list):
        if all(isinstance(e, tuple) and len(e) == 2 for e in v) and v:
            return {"map": sorted([[k, norm(x)] for k, x in v], key=lambda e: e[0])}
        return [norm(x) for x in v]
    raise TypeError(f"unexpected value {v!r} ({type(v).__name__})")


def declared(t, dialect):
    """The type a catalog of `dialect` declares for a column of pyarrow type `t`."""
    hive = dialect in ("athena", "spark")

    def pick(h, trino):
        return h if hive else trino

    if pa.types.is_struct(t):
        fields = [t.field(i) for i in range(t.num_fields)]
        if hive:
            return "struct<" + ",".join(f"`{f.name}`:{declared(f.type, dialect)}" for f in fields) + ">"
        return "row(" + ", ".join(f'"{f.name}" {declared(f.type, dialect)}' for f in fields) + ")"
    if pa.types.is_map(t):
        return pick(f"map<string,{declared(t.item_type, dialect)}>", f"map(varchar, {declared(t.item_type, dialect)})")
    if pa.types.is_list(t):
        return pick(f"array<{declared(t.value_type, dialect)}>", f"array({declared(t.value_type, dialect)})")
    if pa.types.is_decimal(t):
        return f"decimal({t.precision},{t.scale})"
    if pa.types.is_time32(t):
        return pick("int", "integer")  # milliseconds since midnight
    if pa.types.is_time64(t):
        return "bigint"  # microseconds since midnight
    if pa.types.is_timestamp(t):
        return "timestamp"
    scalar = {
        pa.string(): ("string", "varchar"),
        pa.bool_(): ("boolean", "boolean"),
        pa.int32(): ("int", "integer"),
        pa.int64(): ("bigint", "bigint"),
        pa.float32(): ("float", "real"),
        pa.float64(): ("double", "double"),
        pa.binary(): ("binary", "varbinary"),
        pa.date32(): ("date", "date"),
    }
    return pick(*scalar[t])


def catalog_mismatches(root, table, file_schema):
    """What the Athena, Spark and Trino statements for `table` get wrong."""
    found = []
    want_detail = file_schema.field("detail").type
    for dialect in ("athena", "spark", "trino"):
        sql = (root / f"{table}.{dialect}.sql").read_text()
        try:
            statements = sqlglot.parse(sql, read=dialect, error_level=sqlglot.ErrorLevel.RAISE)
        except Exception as e:
            found.append({"dialect": dialect, "error": repr(e)})
            continue
        creates = [s for s in statements if isinstance(s, exp.Create) and s.kind == "TABLE"]
        if len(creates) != 1:
            found.append({"dialect": dialect, "error": f"{len(creates)} CREATE TABLE statements"})
            continue
        columns = {c.name: c.args["kind"] for c in creates[0].find_all(exp.ColumnDef)}
        got = columns.get("detail")
        # Athena's statements are Hive DDL (its queries are Trino's).
        types = "hive" if dialect == "athena" else dialect
        want = exp.DataType.build(declared(want_detail, dialect), dialect=types)
        if got is None or got.sql(dialect=types) != want.sql(dialect=types):
            found.append({
                "dialect": dialect,
                "got": got.sql(dialect=types) if got is not None else None,
                "want": want.sql(dialect=types),
            })
        names = [f.name for f in file_schema] + ["account", "date", "hour"]
        if not set(names) <= set(columns):
            found.append({"dialect": dialect, "missing": sorted(set(names) - set(columns))})
    return found


def main() -> None:
    # sqlglot logs each statement it keeps as a plain command (MSCK
    # REPAIR, CALL): expected here.
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    root = pathlib.Path(sys.argv[1])
    con = duckdb.connect()
    report = {"cases": 0, "rows": 0, "mismatches": []}
    for expected_path in sorted(root.glob("case_*.json")):
        spec = json.loads(expected_path.read_text())
        path = expected_path.with_suffix(".parquet")
        table = path.stem
        con.execute((root / f"{table}.duckdb.sql").read_text())
        readers = {
            "pyarrow": lambda: plain(pq.read_table(path).column("detail")),
            "duckdb": lambda: plain(
                con.sql(f"SELECT detail FROM read_parquet('{path}')").to_arrow_table().column("detail")
            ),
            "duckdb view": lambda: plain(
                con.sql(f"SELECT detail FROM watershed.{table}").to_arrow_table().column("detail")
            ),
        }
        partitions = con.sql(
            f"SELECT DISTINCT account, date::VARCHAR, hour, typeof(account), typeof(date), typeof(hour) "
            f"FROM watershed.{table}"
        ).fetchall()
        if partitions != [("012345678901", "2024-05-01", 7, "VARCHAR", "DATE", "INTEGER")]:
            report["mismatches"].append({"case": spec["case"], "reader": "duckdb view", "partitions": partitions})
        for m in catalog_mismatches(root, table, pq.read_schema(path)):
            report["mismatches"].append({"case": spec["case"], **m})
        report["cases"] += 1
        report["rows"] += len(spec["rows"])
        for name, read in readers.items():
            try:
                got = [norm(v) for v in read()]
            except Exception as e:  # a reader that cannot read the file is a finding
                report["mismatches"].append({"case": spec["case"], "reader": name, "error": repr(e)})
                continue
            for i, (g, want) in enumerate(zip(got, spec["rows"])):
                if g != want:
                    report["mismatches"].append(
                        {"case": spec["case"], "reader": name, "row": i, "got": g, "want": want}
                    )
                    break
            if len(got) != len(spec["rows"]):
                report["mismatches"].append({"case": spec["case"], "reader": name, "rows": len(got)})
    print(json.dumps(report, default=str))
    sys.exit(1 if report["mismatches"] or not report["cases"] else 0)


if __name__ == "__main__":
    main()
