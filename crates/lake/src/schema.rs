//! The analysts' contract: how a subject's latest schema becomes the Arrow
//! (and Parquet) schema of its lake table, and the dead-letter table's
//! schema. Partition values (`account`, `date`, `hour`) are in the path
//! only, never columns (Hive convention).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use watershed_schema::{Kind, Node};

/// Arrow (and Parquet) field metadata naming a field's protection action.
pub const PROTECT_KEY: &str = "watershed.protect";

/// The timezone of every timestamp column.
pub const UTC: &str = "UTC";

/// Envelope columns, in order, before `detail`.
pub const ENVELOPE_COLUMNS: [&str; 9] = [
    "event_id",
    "source",
    "detail_type",
    "event_time",
    "received_at",
    "region",
    "resources",
    "schema_version",
    "collector",
];

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

/// The Arrow type of a payload node. Every field is nullable: redacted
/// values are null, and nullability flags help no reader.
#[must_use]
pub fn arrow_type(node: &Node) -> DataType {
    match &node.kind {
        Kind::Null => DataType::Null,
        Kind::Boolean => DataType::Boolean,
        Kind::Int => DataType::Int32,
        Kind::Long => DataType::Int64,
        Kind::Float => DataType::Float32,
        Kind::Double => DataType::Float64,
        Kind::String | Kind::Uuid | Kind::Enum { .. } => DataType::Utf8,
        Kind::Bytes | Kind::Fixed { .. } => DataType::Binary,
        Kind::Date => DataType::Date32,
        Kind::TimeMillis => DataType::Time32(TimeUnit::Millisecond),
        Kind::TimeMicros => DataType::Time64(TimeUnit::Microsecond),
        Kind::TimestampMillis => DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into())),
        Kind::TimestampMicros => ts(),
        #[allow(clippy::cast_possible_wrap)]
        Kind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale as i8),
        Kind::Array(item) => DataType::List(Arc::new(Field::new("item", arrow_type(item), true))),
        Kind::Map(value) => DataType::Map(
            Arc::new(Field::new(
                "entries",
                DataType::Struct(Fields::from(vec![
                    Field::new("key", DataType::Utf8, false),
                    Field::new("value", arrow_type(value), true),
                ])),
                false,
            )),
            false,
        ),
        Kind::Record(r) => DataType::Struct(
            r.fields
                .iter()
                .map(|f| {
                    let field = Field::new(&f.name, arrow_type(&f.node), true);
                    match f.protect {
                        // Readers see how a column is protected; the
                        // encoder skips dictionaries for ciphertexts.
                        Some(p) => field.with_metadata(std::collections::HashMap::from([(
                            PROTECT_KEY.to_owned(),
                            p.as_str().to_owned(),
                        )])),
                        None => field,
                    }
                })
                .collect::<Vec<_>>()
                .into(),
        ),
    }
}

/// The schema of a subject's table, from its latest version.
#[must_use]
pub fn table_schema(latest: &Node) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("detail_type", DataType::Utf8, false),
        Field::new("event_time", ts(), false),
        Field::new("received_at", ts(), false),
        Field::new("region", DataType::Utf8, true),
        Field::new("resources", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), true),
        Field::new("schema_version", DataType::Int32, false),
        Field::new("collector", DataType::Utf8, true),
        Field::new("detail", arrow_type(latest), true),
    ]))
}

/// The schema of the `_dead_letters` table.
#[must_use]
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
        Field::new("detail_type", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, true),
        Field::new("detail", DataType::Utf8, false),
        Field::new("received_at", ts(), false),
        Field::new("collector", DataType::Utf8, true),
        Field::new("raw", DataType::Utf8, false),
    ]))
}
