//! The lake's files read by DuckDB and pyarrow, for every payload type.
//!
//! Random payload schemas (every supported type but `uuid`, nested in
//! records, arrays and maps, nullable or not) and random events of them,
//! written as the hub writes a table (`TableBuilder`, `encode`); then
//! `tests/readers_check.py` reads every file with DuckDB and with pyarrow,
//! each its own Parquet reader, and compares each row's `detail` with what
//! was written. Each file is also put in a table's Hive layout with the
//! catalog DDL `watershed lake ddl` writes for it: DuckDB reads it again
//! through the generated view, and sqlglot parses the Athena, Spark and
//! Trino statements, whose columns must declare the file's types. The
//! run's seed is printed; `WATERSHED_READERS_SEED` runs one again.

#[path = "../crates/lake/tests/support/mod.rs"]
mod support;

use std::process::Command;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array,
    Float64Array, Int32Array, Int64Array, StringArray, Time32MillisecondArray, Time64MicrosecondArray,
    TimestampMicrosecondArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, TimeUnit};
use base64::Engine as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value as Json};
use support::{avro_json, decimal_text, random_record, registry, rows, Gen};
use watershed_lake::{ddl, encode, EncodeOptions};
use watershed_tests::{python, repo};

/// Row `i` of `a` in the normal form `readers_check.py` compares.
fn normal(a: &ArrayRef, i: usize) -> Json {
    if a.data_type() == &DataType::Null || a.is_null(i) {
        return Json::Null;
    }
    let any = a.as_any();
    match a.data_type() {
        DataType::Boolean => json!(any.downcast_ref::<BooleanArray>().unwrap().value(i)),
        DataType::Int32 => json!(any.downcast_ref::<Int32Array>().unwrap().value(i)),
        DataType::Int64 => json!(any.downcast_ref::<Int64Array>().unwrap().value(i)),
        DataType::Float32 => json!(f64::from(any.downcast_ref::<Float32Array>().unwrap().value(i))),
        DataType::Float64 => json!(any.downcast_ref::<Float64Array>().unwrap().value(i)),
        DataType::Utf8 => json!(any.downcast_ref::<StringArray>().unwrap().value(i)),
        DataType::Binary => json!({"b64": base64::engine::general_purpose::STANDARD
            .encode(any.downcast_ref::<BinaryArray>().unwrap().value(i))}),
        DataType::Decimal128(_, s) => {
            json!({"dec": decimal_text(any.downcast_ref::<Decimal128Array>().unwrap().value(i), u32::try_from(*s).expect("non-negative scale"))})
        }
        // Dates as days; times and timestamps as microseconds.
        DataType::Date32 => json!(any.downcast_ref::<Date32Array>().unwrap().value(i)),
        DataType::Time32(TimeUnit::Millisecond) => {
            json!(i64::from(any.downcast_ref::<Time32MillisecondArray>().unwrap().value(i)) * 1000)
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            json!(any.downcast_ref::<Time64MicrosecondArray>().unwrap().value(i))
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            json!(any.downcast_ref::<TimestampMillisecondArray>().unwrap().value(i) * 1000)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            json!(any.downcast_ref::<TimestampMicrosecondArray>().unwrap().value(i))
        }
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(i);
            Json::Array((0..items.len()).map(|j| normal(&items, j)).collect())
        }
        DataType::Map(..) => {
            let entries = a.as_map().value(i);
            if entries.is_empty() {
                return json!([]);
            }
            let keys = entries.column(0).as_string::<i32>();
            let mut e: Vec<(String, Json)> = (0..entries.len())
                .map(|j| (keys.value(j).to_owned(), normal(entries.column(1), j)))
                .collect();
            e.sort_by(|x, y| x.0.cmp(&y.0));
            json!({"map": e.into_iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()})
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Json::Object(
                fields.iter().zip(s.columns()).map(|(f, c)| (f.name().clone(), normal(c, i))).collect(),
            )
        }
        other => panic!("unexpected column type {other}"),
    }
}

/// Write case `n` (schema and events from `seed`) into `dir`.
fn write_case(dir: &std::path::Path, n: usize, seed: u64) {
    let mut g = Gen { rng: ChaCha8Rng::seed_from_u64(seed), names: 0, decimals: true };
    let ty = random_record(&mut g);
    let schema = avro_json(&ty, false).to_string();
    let events: Vec<Json> = (0..8).map(|_| g.value(&ty).0).collect();
    let say = format!("schema {schema}");
    let (layout, batch) = rows(&registry(&[&schema], &say), &events, &say);
    let detail = batch.column_by_name("detail").unwrap();
    let want: Vec<Json> = (0..batch.num_rows()).map(|i| normal(detail, i)).collect();
    let file =
        encode("case.parquet", &layout.schema, &[batch], Vec::new(), EncodeOptions::default()).unwrap();
    std::fs::write(dir.join(format!("case_{n:03}.parquet")), &file).unwrap();
    // The same file in a table's Hive layout, and the catalog DDL that
    // declares the table in every dialect (`readers_check.py` reads it
    // through DuckDB's view, and parses the others with sqlglot).
    let table = format!("case_{n:03}");
    let partition = dir.join("tables").join(&table).join("account=012345678901/date=2024-05-01/hour=07");
    std::fs::create_dir_all(&partition).unwrap();
    std::fs::write(partition.join("part.parquet"), &file).unwrap();
    let root = dir.join("tables");
    let t = ddl::Table { name: &table, schema: &layout.schema, about: &say };
    for dialect in ddl::Dialect::ALL {
        let location = match dialect {
            ddl::Dialect::Duckdb => root.to_str().unwrap().to_owned(),
            _ => "s3://bucket/lake".to_owned(),
        };
        let sql = ddl::generate(&[t], &ddl::Options { dialect, location: &location, database: "watershed" })
            .unwrap_or_else(|e| panic!("{say}: {e}"));
        std::fs::write(dir.join(format!("case_{n:03}.{}.sql", dialect.name())), sql).unwrap();
    }
    let spec = json!({"case": format!("{n} (seed {seed}) schema {schema}"), "rows": want});
    std::fs::write(dir.join(format!("case_{n:03}.json")), spec.to_string()).unwrap();
}

#[test]
fn duckdb_and_pyarrow_read_every_type_as_written() {
    let Some(py) = python() else { return };
    let seed = std::env::var("WATERSHED_READERS_SEED")
        .ok()
        .map_or_else(rand::random::<u64>, |s| s.parse().expect("WATERSHED_READERS_SEED is a number"));
    let cases = if std::env::var_os("WATERSHED_READERS_SEED").is_some() { 1 } else { 48 };
    eprintln!("readers: seed {seed} (WATERSHED_READERS_SEED={seed} runs its first case alone)");
    let dir = tempfile::tempdir().unwrap();
    for n in 0..cases {
        write_case(dir.path(), n, seed.wrapping_add(n as u64));
    }
    let out = Command::new(py)
        .arg(repo().join("tests/readers_check.py"))
        .arg(dir.path())
        .output()
        .expect("python runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the readers disagree with what was written (seed {seed}):\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("readers: {report}");
}
