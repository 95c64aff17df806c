"""Read each case_N.parquet under DIR with DuckDB and with pyarrow and
compare its `detail` column with case_N.json, the values the hub wrote
(written by tests/readers.rs). Values are compared in one normal form:
bytes {"b64"}, decimals {"dec": plain text}, dates as days, times and
timestamps as microseconds (cast in Arrow: Python's dates stop at year
1), maps {"map": sorted [key, value] pairs} (an empty map reads as [], as
pyarrow gives it), records as objects. Prints a JSON report; exits 1 on a mismatch."""

import base64
import decimal
import json
import pathlib
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq


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


def main() -> None:
    root = pathlib.Path(sys.argv[1])
    con = duckdb.connect()
    report = {"cases": 0, "rows": 0, "mismatches": []}
    for expected_path in sorted(root.glob("case_*.json")):
        spec = json.loads(expected_path.read_text())
        path = expected_path.with_suffix(".parquet")
        readers = {
            "pyarrow": lambda: plain(pq.read_table(path).column("detail")),
            "duckdb": lambda: plain(
                con.sql(f"SELECT detail FROM read_parquet('{path}')").to_arrow_table().column("detail")
            ),
        }
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
