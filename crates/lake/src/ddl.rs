//! Catalog DDL for the lake's tables: the statements that declare each
//! table, with its latest schema's columns and the Hive partition columns
//! (`account`, `date`, `hour`), in the SQL of the engine that reads it.
//!
//! - [`Dialect::Duckdb`]: a view per table over `read_parquet`, typed by
//!   the latest schema whatever files exist (older files' missing fields
//!   read as NULL, an empty table reads as no rows).
//! - [`Dialect::Athena`]: Hive DDL (`CREATE EXTERNAL TABLE … STORED AS
//!   PARQUET`), as Athena, Glue and a Hive metastore take it.
//! - [`Dialect::Spark`]: Spark SQL data-source tables (`USING parquet`).
//! - [`Dialect::Trino`]: Trino's Hive connector (`external_location`).
//!
//! The statements are generated from the Arrow schemas the writer uses
//! ([`crate::schema`]), so they cannot drift from the files.

use std::fmt::Write as _;

use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};

use crate::schema::PROTECT_KEY;

/// The partition columns every table has, in path order.
pub const PARTITION_COLUMNS: [&str; 3] = ["account", "date", "hour"];

/// The SQL engine the statements are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// DuckDB: views over `read_parquet`.
    Duckdb,
    /// Athena, Glue or a Hive metastore: Hive DDL.
    Athena,
    /// Spark SQL: data-source tables.
    Spark,
    /// Trino's Hive connector.
    Trino,
}

impl Dialect {
    /// Every dialect, in the order the CLI lists them.
    pub const ALL: [Dialect; 4] = [Dialect::Duckdb, Dialect::Athena, Dialect::Spark, Dialect::Trino];

    /// The dialect's name on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Duckdb => "duckdb",
            Dialect::Athena => "athena",
            Dialect::Spark => "spark",
            Dialect::Trino => "trino",
        }
    }

    /// The dialect of a name on the command line.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// Why statements could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two fields of one record differ only in case: every engine here
    /// matches column and field names without regard to case.
    #[error(
        "table {table}: fields {first:?} and {second:?} of {record} differ only in case, and DuckDB, Athena, \
         Spark and Trino match names without regard to case, so they cannot be declared apart"
    )]
    CaseCollision {
        /// The table.
        table: String,
        /// The record holding both (`detail`, `detail.customer`, …).
        record: String,
        /// The first field's name.
        first: String,
        /// The second field's name.
        second: String,
    },
    /// A column type with no equivalent in the dialect (the lake writes
    /// none; a guard for schemas built elsewhere).
    #[error("table {table}: column {path} has type {ty}, which {dialect} DDL cannot declare")]
    Unsupported {
        /// The table.
        table: String,
        /// The column.
        path: String,
        /// The Arrow type.
        ty: String,
        /// The dialect.
        dialect: &'static str,
    },
    /// Athena reads tables from S3 only.
    #[error(
        "Athena reads tables from S3: pass the lake's S3 location (s3://bucket/prefix), not {location:?}"
    )]
    NotS3 {
        /// The location given.
        location: String,
    },
    /// A location or name that cannot be written into a SQL string.
    #[error("{what} {value:?} holds a control character")]
    ControlCharacter {
        /// What the value is.
        what: &'static str,
        /// The value.
        value: String,
    },
}

/// One table to declare.
#[derive(Debug, Clone, Copy)]
pub struct Table<'a> {
    /// The table's name in the lake (its directory).
    pub name: &'a str,
    /// The Arrow schema of its files (the latest one).
    pub schema: &'a Schema,
    /// A line saying what the table holds (its subject and version);
    /// written as the table's comment.
    pub about: &'a str,
}

/// Where the tables are and what to call them.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// The engine.
    pub dialect: Dialect,
    /// The lake's root as the engine reads it: a local path (DuckDB), a
    /// `file://` URL or an `s3://` URL; tables are `<location>/<table>`.
    pub location: &'a str,
    /// The database (schema) the tables are created in.
    pub database: &'a str,
}

/// The statements declaring `tables`, one script.
///
/// # Errors
/// [`Error`] when a table cannot be declared in the dialect.
pub fn generate(tables: &[Table<'_>], opts: &Options<'_>) -> Result<String, Error> {
    for (what, value) in [("location", opts.location), ("database", opts.database)] {
        if value.chars().any(char::is_control) {
            return Err(Error::ControlCharacter { what, value: value.to_owned() });
        }
    }
    if opts.dialect == Dialect::Athena && !opts.location.starts_with("s3://") {
        return Err(Error::NotS3 { location: opts.location.to_owned() });
    }
    let root = opts.location.trim_end_matches('/');
    let mut out = String::new();
    let d = opts.dialect;
    let db = quote(d, opts.database);
    let _ =
        writeln!(out, "-- Watershed lake tables, {} dialect; generated by `watershed lake ddl`.", d.name());
    match d {
        Dialect::Duckdb => {
            let _ = writeln!(out, "CREATE SCHEMA IF NOT EXISTS {db};");
        }
        Dialect::Athena | Dialect::Spark => {
            let _ = writeln!(
                out,
                "-- Partitions appear as the hub writes them: run MSCK REPAIR TABLE again to see new ones."
            );
            let _ = writeln!(out, "CREATE DATABASE IF NOT EXISTS {db};");
        }
        Dialect::Trino => {
            let _ = writeln!(out, "-- Partitions appear as the hub writes them: call system.sync_partition_metadata again to see new ones.");
            let _ = writeln!(out, "CREATE SCHEMA IF NOT EXISTS {db};");
        }
    }
    for t in tables {
        check_case(t.name, "", t.schema.fields())?;
        out.push('\n');
        let about: String = t.about.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let _ = writeln!(out, "-- {about}");
        let location = format!("{root}/{}", t.name);
        match d {
            Dialect::Duckdb => duckdb_view(&mut out, t, &db, &location)?,
            Dialect::Athena | Dialect::Spark | Dialect::Trino => {
                table(&mut out, d, t, opts.database, &location)?
            }
        }
    }
    Ok(out)
}

/// Fails on two fields of one record whose names differ only in case.
fn check_case(table: &str, record: &str, fields: &Fields) -> Result<(), Error> {
    let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
    for f in fields {
        if let Some(first) = seen.iter().find(|s| s.eq_ignore_ascii_case(f.name())) {
            return Err(Error::CaseCollision {
                table: table.to_owned(),
                record: if record.is_empty() { "the table".to_owned() } else { record.to_owned() },
                first: (*first).to_owned(),
                second: f.name().clone(),
            });
        }
        seen.push(f.name());
        let path = if record.is_empty() { f.name().clone() } else { format!("{record}.{}", f.name()) };
        check_case_in(table, &path, f.data_type())?;
    }
    Ok(())
}

fn check_case_in(table: &str, path: &str, ty: &DataType) -> Result<(), Error> {
    match ty {
        DataType::Struct(fields) => check_case(table, path, fields),
        DataType::List(item) => check_case_in(table, &format!("{path}[]"), item.data_type()),
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => {
                check_case_in(table, &format!("{path}{{}}"), kv[1].data_type())
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// An identifier, quoted for the dialect.
fn quote(d: Dialect, name: &str) -> String {
    match d {
        Dialect::Duckdb | Dialect::Trino => format!("\"{}\"", name.replace('"', "\"\"")),
        Dialect::Athena | Dialect::Spark => format!("`{}`", name.replace('`', "``")),
    }
}

/// A string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The dialect's type for an Arrow type.
fn sql_type(d: Dialect, table: &str, path: &str, ty: &DataType) -> Result<String, Error> {
    let hive = matches!(d, Dialect::Athena | Dialect::Spark);
    let t = match ty {
        DataType::Utf8 => pick(d, "VARCHAR", "string", "varchar"),
        DataType::Boolean => pick(d, "BOOLEAN", "boolean", "boolean"),
        // Avro's null type: Parquet stores it as an INT32 column of nulls.
        DataType::Int32 | DataType::Null => pick(d, "INTEGER", "int", "integer"),
        DataType::Int64 => pick(d, "BIGINT", "bigint", "bigint"),
        DataType::Float32 => pick(d, "FLOAT", "float", "real"),
        DataType::Float64 => pick(d, "DOUBLE", "double", "double"),
        DataType::Binary => pick(d, "BLOB", "binary", "varbinary"),
        DataType::Date32 => pick(d, "DATE", "date", "date"),
        DataType::Decimal128(p, s) => {
            let name = if d == Dialect::Duckdb { "DECIMAL" } else { "decimal" };
            format!("{name}({p},{s})")
        }
        DataType::Timestamp(_, Some(_)) => pick(d, "TIMESTAMPTZ", "timestamp", "timestamp"),
        // A time of day: DuckDB has the type; a Hive metastore's tables
        // (Athena, Spark, Trino's Hive connector) have none, so the
        // column's stored integer (milli- or microseconds since midnight)
        // is declared.
        DataType::Time32(TimeUnit::Millisecond) => pick(d, "TIME", "int", "integer"),
        DataType::Time64(TimeUnit::Microsecond) => pick(d, "TIME", "bigint", "bigint"),
        DataType::List(item) => {
            let inner = sql_type(d, table, &format!("{path}[]"), item.data_type())?;
            match d {
                Dialect::Duckdb => format!("{inner}[]"),
                Dialect::Athena | Dialect::Spark => format!("array<{inner}>"),
                Dialect::Trino => format!("array({inner})"),
            }
        }
        DataType::Map(entries, _) => {
            let DataType::Struct(kv) = entries.data_type() else {
                return Err(unsupported(d, table, path, ty));
            };
            if kv.len() != 2 || kv[0].data_type() != &DataType::Utf8 {
                return Err(unsupported(d, table, path, ty));
            }
            let value = sql_type(d, table, &format!("{path}{{}}"), kv[1].data_type())?;
            match d {
                Dialect::Duckdb => format!("MAP(VARCHAR, {value})"),
                Dialect::Athena | Dialect::Spark => format!("map<string,{value}>"),
                Dialect::Trino => format!("map(varchar, {value})"),
            }
        }
        DataType::Struct(fields) => {
            let mut parts = Vec::with_capacity(fields.len());
            for f in fields {
                let inner = sql_type(d, table, &format!("{path}.{}", f.name()), f.data_type())?;
                let name = quote(d, f.name());
                parts.push(if hive { format!("{name}:{inner}") } else { format!("{name} {inner}") });
            }
            match d {
                Dialect::Duckdb => format!("STRUCT({})", parts.join(", ")),
                Dialect::Athena | Dialect::Spark => format!("struct<{}>", parts.join(",")),
                Dialect::Trino => format!("row({})", parts.join(", ")),
            }
        }
        _ => return Err(unsupported(d, table, path, ty)),
    };
    Ok(t)
}

fn pick(d: Dialect, duckdb: &str, hive: &str, trino: &str) -> String {
    match d {
        Dialect::Duckdb => duckdb,
        Dialect::Athena | Dialect::Spark => hive,
        Dialect::Trino => trino,
    }
    .to_owned()
}

fn unsupported(d: Dialect, table: &str, path: &str, ty: &DataType) -> Error {
    Error::Unsupported {
        table: table.to_owned(),
        path: path.to_owned(),
        ty: ty.to_string(),
        dialect: d.name(),
    }
}

/// The partition columns' types.
fn partition_types(d: Dialect) -> [(&'static str, String); 3] {
    [
        ("account", pick(d, "VARCHAR", "string", "varchar")),
        ("date", pick(d, "DATE", "date", "date")),
        ("hour", pick(d, "INTEGER", "int", "integer")),
    ]
}

/// What a column's comment says: the protected fields under it, by path.
fn protected(prefix: &str, field: &Field, out: &mut Vec<String>) {
    if let Some(action) = field.metadata().get(PROTECT_KEY) {
        out.push(format!("{prefix} ({action})"));
    }
    match field.data_type() {
        DataType::Struct(fields) => {
            for f in fields {
                protected(&format!("{prefix}.{}", f.name()), f, out);
            }
        }
        DataType::List(item) => protected(&format!("{prefix}[]"), item, out),
        DataType::Map(entries, _) => {
            if let DataType::Struct(kv) = entries.data_type() {
                if kv.len() == 2 {
                    protected(&format!("{prefix}{{}}"), &kv[1], out);
                }
            }
        }
        _ => {}
    }
}

fn column_comment(field: &Field) -> Option<String> {
    let mut found = Vec::new();
    protected(field.name(), field, &mut found);
    (!found.is_empty()).then(|| format!("protected: {}", found.join(", ")))
}

/// Cuts `s` to at most `max` bytes, ending in `…` when cut.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max - '…'.len_utf8();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// A Hive-style table (Athena, Spark, Trino).
fn table(out: &mut String, d: Dialect, t: &Table<'_>, database: &str, location: &str) -> Result<(), Error> {
    let name = format!("{}.{}", quote(d, database), quote(d, t.name));
    let mut columns = Vec::with_capacity(t.schema.fields().len() + 3);
    for f in t.schema.fields() {
        let mut c = format!("  {} {}", quote(d, f.name()), sql_type(d, t.name, f.name(), f.data_type())?);
        if let Some(mut comment) = column_comment(f) {
            if d == Dialect::Athena {
                // The Glue catalog refuses a column comment over 255 bytes.
                cut(&mut comment, 255);
            }
            let _ = write!(c, " COMMENT {}", literal(&comment));
        }
        columns.push(c);
    }
    let partitions = partition_types(d);
    match d {
        Dialect::Athena => {
            let _ = writeln!(out, "CREATE EXTERNAL TABLE IF NOT EXISTS {name} (\n{}\n)", columns.join(",\n"));
            let _ = writeln!(out, "COMMENT {}", literal(t.about));
            let parts: Vec<String> =
                partitions.iter().map(|(n, ty)| format!("{} {ty}", quote(d, n))).collect();
            let _ = writeln!(out, "PARTITIONED BY ({})", parts.join(", "));
            let _ = writeln!(out, "STORED AS PARQUET\nLOCATION {};", literal(&format!("{location}/")));
            let _ = writeln!(out, "MSCK REPAIR TABLE {name};");
        }
        Dialect::Spark => {
            // A data-source table lists its partition columns with the
            // others, and names them again in PARTITIONED BY.
            columns.extend(partitions.iter().map(|(n, ty)| format!("  {} {ty}", quote(d, n))));
            let _ = writeln!(out, "CREATE TABLE IF NOT EXISTS {name} (\n{}\n)", columns.join(",\n"));
            let _ = writeln!(out, "USING parquet");
            let parts: Vec<String> = partitions.iter().map(|(n, _)| quote(d, n)).collect();
            let _ = writeln!(out, "PARTITIONED BY ({})", parts.join(", "));
            let _ = writeln!(out, "LOCATION {}", literal(location));
            let _ = writeln!(out, "COMMENT {};", literal(t.about));
            let _ = writeln!(out, "MSCK REPAIR TABLE {name};");
        }
        Dialect::Trino => {
            columns.extend(partitions.iter().map(|(n, ty)| format!("  {} {ty}", quote(d, n))));
            let _ = writeln!(out, "CREATE TABLE IF NOT EXISTS {name} (\n{}\n)", columns.join(",\n"));
            let _ = writeln!(out, "COMMENT {}", literal(t.about));
            let parts: Vec<String> = partitions.iter().map(|(n, _)| literal(n)).collect();
            let _ = writeln!(
                out,
                "WITH (\n  format = 'PARQUET',\n  external_location = {},\n  partitioned_by = ARRAY[{}]\n);",
                literal(location),
                parts.join(", ")
            );
            let _ = writeln!(
                out,
                "CALL system.sync_partition_metadata(schema_name => {}, table_name => {}, mode => 'ADD');",
                literal(database),
                literal(t.name)
            );
        }
        Dialect::Duckdb => unreachable!("DuckDB tables are views"),
    }
    Ok(())
}

/// A DuckDB view: the latest columns, typed, over whatever files exist.
///
/// An empty relation of the latest types is unioned by name with the
/// files (read by name, so files from before a field was added take
/// part), and every column is cast to its latest type: fields the latest
/// version dropped are left out, fields older files lack read as NULL,
/// and a table with no files yet reads as no rows of the right types.
fn duckdb_view(out: &mut String, t: &Table<'_>, db: &str, location: &str) -> Result<(), Error> {
    let d = Dialect::Duckdb;
    let name = format!("{db}.{}", quote(d, t.name));
    let mut typed = Vec::new();
    let mut select = Vec::new();
    for f in t.schema.fields() {
        let ty = sql_type(d, t.name, f.name(), f.data_type())?;
        let q = quote(d, f.name());
        typed.push(format!("CAST(NULL AS {ty}) AS {q}"));
        select.push(format!("  CAST({q} AS {ty}) AS {q}"));
    }
    let partitions = partition_types(d);
    for (n, ty) in &partitions {
        let q = quote(d, n);
        typed.push(format!("CAST(NULL AS {ty}) AS {q}"));
        select.push(format!("  {q}"));
    }
    let hive_types: Vec<String> = partitions.iter().map(|(n, ty)| format!("{}: {ty}", literal(n))).collect();
    let glob = format!("{location}/*/*/*/*.parquet");
    let _ = writeln!(out, "CREATE OR REPLACE VIEW {name} AS\nSELECT\n{}", select.join(",\n"));
    let _ = writeln!(out, "FROM (\n  SELECT {}\n  WHERE false", typed.join(", "));
    let _ = writeln!(out, "  UNION ALL BY NAME");
    let _ = writeln!(
        out,
        "  SELECT * FROM read_parquet({}, hive_partitioning = true, hive_types = {{{}}}, union_by_name = true, allow_empty = true)\n);",
        literal(&glob),
        hive_types.join(", ")
    );
    let mut comment = t.about.to_owned();
    for f in t.schema.fields() {
        if let Some(c) = column_comment(f) {
            let _ = write!(comment, "; {c}");
        }
    }
    let _ = writeln!(out, "COMMENT ON VIEW {name} IS {};", literal(&comment));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;

    fn schema(detail: Vec<Field>) -> Schema {
        Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("detail", DataType::Struct(detail.into()), true),
        ])
    }

    fn opts(dialect: Dialect) -> Options<'static> {
        Options { dialect, location: "s3://bucket/it's/lake/", database: "watershed" }
    }

    #[test]
    fn case_collisions_are_named() {
        let s = schema(vec![Field::new(
            "customer",
            DataType::Struct(
                vec![Field::new("email", DataType::Utf8, true), Field::new("Email", DataType::Utf8, true)]
                    .into(),
            ),
            true,
        )]);
        let t = Table { name: "orders", schema: &s, about: "x" };
        for d in Dialect::ALL {
            let e = generate(&[t], &opts(d)).unwrap_err().to_string();
            assert!(e.contains("\"email\" and \"Email\" of detail.customer differ only in case"), "{e}");
        }
    }

    #[test]
    fn athena_needs_s3_and_strings_are_escaped() {
        let s = schema(vec![Field::new("n", DataType::Null, true)]);
        let t = Table { name: "orders", schema: &s, about: "subject o, version 1" };
        let e = generate(&[t], &Options { dialect: Dialect::Athena, location: "/tmp/lake", database: "w" })
            .unwrap_err();
        assert!(e.to_string().contains("Athena reads tables from S3"), "{e}");
        let sql = generate(&[t], &opts(Dialect::Athena)).unwrap();
        assert!(sql.contains("LOCATION 's3://bucket/it''s/lake/orders/'"), "{sql}");
        assert!(sql.contains("`detail` struct<`n`:int>"), "{sql}");
        let e = generate(&[t], &Options { dialect: Dialect::Spark, location: "file:///a\nb", database: "w" })
            .unwrap_err();
        assert!(e.to_string().contains("location \"file:///a\\nb\" holds a control character"), "{e}");
    }

    #[test]
    fn protected_fields_are_in_the_comment() {
        let tagged = |name: &str, action: &str| {
            Field::new(name, DataType::Utf8, true)
                .with_metadata(HashMap::from([(PROTECT_KEY.to_owned(), action.to_owned())]))
        };
        let s = schema(vec![
            tagged("email", "mask"),
            Field::new(
                "cards",
                DataType::List(Arc::new(Field::new(
                    "item",
                    DataType::Struct(vec![tagged("pan", "encrypt")].into()),
                    true,
                ))),
                true,
            ),
        ]);
        let t = Table { name: "orders", schema: &s, about: "x" };
        for d in Dialect::ALL {
            let sql = generate(&[t], &opts(d)).unwrap();
            assert!(
                sql.contains("protected: detail.email (mask), detail.cards[].pan (encrypt)"),
                "{d:?}: {sql}"
            );
        }
    }

    #[test]
    fn athena_column_comments_fit_the_glue_catalog() {
        let fields: Vec<Field> = (0..40)
            .map(|i| {
                Field::new(format!("é_field_{i}"), DataType::Utf8, true)
                    .with_metadata(HashMap::from([(PROTECT_KEY.to_owned(), "tokenize".to_owned())]))
            })
            .collect();
        let s = schema(fields);
        let t = Table { name: "orders", schema: &s, about: "x" };
        let sql = generate(&[t], &opts(Dialect::Athena)).unwrap();
        let line = sql.lines().find(|l| l.contains("COMMENT 'protected")).unwrap();
        let comment = line.split("COMMENT '").nth(1).unwrap().trim_end_matches("',").trim_end_matches('\'');
        assert!(comment.len() <= 255 && comment.ends_with('…'), "{} bytes: {comment}", comment.len());
        let spark = generate(&[t], &opts(Dialect::Spark)).unwrap();
        assert!(spark.contains("é_field_39 (tokenize)"), "other dialects keep the whole comment");
    }
}
