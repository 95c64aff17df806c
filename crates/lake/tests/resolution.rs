//! Mixed schema versions, checked against Avro's own schema resolution.
//!
//! An event validated against an older version of its subject is written
//! under the latest version's columns (`TableLayout`'s projections). Avro
//! defines what a reader schema reads of data written with a writer schema;
//! this test makes random backward-compatible evolutions (fields added with
//! defaults, dropped, renamed through aliases, promoted int→long→float→
//! double, string↔bytes and uuid→string, made nullable, enum symbols added or removed
//! with a default symbol, all of it nested in records, arrays and maps),
//! random events of the older version, and checks that the rows the lake
//! writes (through Parquet and back) hold exactly what apache-avro reads of
//! the same event encoded with the writer schema and decoded with the
//! reader schema. The registry must accept every evolution as BACKWARD.
//!
//! The generator is driven by a seed (proptest picks the seeds); a failing
//! case prints both schemas and the event.

use apache_avro::types::Value as Avro;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array,
    Float64Array, Int32Array, Int64Array, StringArray, Time32MillisecondArray, Time64MicrosecondArray,
    TimestampMicrosecondArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value as Json};
use watershed_lake::{encode, EncodeOptions};

mod support;
use support::{avro_json, random_record, registry, rows, Fld, Gen, Ty};

/// A value, compared by content: what apache-avro reads and what the lake
/// wrote come to this.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Null,
    Bool(bool),
    Int(i64),
    F32(u32),
    F64(u64),
    Str(String),
    Bytes(Vec<u8>),
    Dec(i128),
    List(Vec<V>),
    Map(Vec<(String, V)>),
    Rec(Vec<V>),
}

fn from_avro(v: &Avro) -> V {
    match v {
        Avro::Null => V::Null,
        Avro::Boolean(b) => V::Bool(*b),
        Avro::Int(i) | Avro::Date(i) | Avro::TimeMillis(i) => V::Int(i64::from(*i)),
        Avro::Long(i) | Avro::TimestampMicros(i) | Avro::TimestampMillis(i) | Avro::TimeMicros(i) => {
            V::Int(*i)
        }
        Avro::Decimal(d) => {
            let b = Vec::<u8>::try_from(d).unwrap();
            let mut full = [if b.first().is_some_and(|x| x & 0x80 != 0) { 0xff } else { 0 }; 16];
            full[16 - b.len()..].copy_from_slice(&b);
            V::Dec(i128::from_be_bytes(full))
        }
        Avro::Float(f) => V::F32(f.to_bits()),
        Avro::Double(f) => V::F64(f.to_bits()),
        Avro::String(s) | Avro::Enum(_, s) => V::Str(s.clone()),
        Avro::Uuid(u) => V::Str(u.to_string()),
        Avro::Bytes(b) | Avro::Fixed(_, b) => V::Bytes(b.clone()),
        Avro::Union(_, v) => from_avro(v),
        Avro::Array(items) => V::List(items.iter().map(from_avro).collect()),
        Avro::Map(m) => {
            let mut e: Vec<(String, V)> = m.iter().map(|(k, v)| (k.clone(), from_avro(v))).collect();
            e.sort_by(|a, b| a.0.cmp(&b.0));
            V::Map(e)
        }
        Avro::Record(fields) => V::Rec(fields.iter().map(|(_, v)| from_avro(v)).collect()),
        other => panic!("unexpected Avro value {other:?}"),
    }
}

fn from_arrow(a: &ArrayRef, i: usize) -> V {
    if a.data_type() == &DataType::Null || a.is_null(i) {
        return V::Null;
    }
    match a.data_type() {
        DataType::Boolean => V::Bool(a.as_any().downcast_ref::<BooleanArray>().unwrap().value(i)),
        DataType::Int32 => V::Int(i64::from(a.as_any().downcast_ref::<Int32Array>().unwrap().value(i))),
        DataType::Date32 => V::Int(i64::from(a.as_any().downcast_ref::<Date32Array>().unwrap().value(i))),
        DataType::Int64 => V::Int(a.as_any().downcast_ref::<Int64Array>().unwrap().value(i)),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            V::Int(a.as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap().value(i))
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            V::Int(a.as_any().downcast_ref::<TimestampMillisecondArray>().unwrap().value(i))
        }
        DataType::Time32(TimeUnit::Millisecond) => {
            V::Int(i64::from(a.as_any().downcast_ref::<Time32MillisecondArray>().unwrap().value(i)))
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            V::Int(a.as_any().downcast_ref::<Time64MicrosecondArray>().unwrap().value(i))
        }
        DataType::Decimal128(..) => V::Dec(a.as_any().downcast_ref::<Decimal128Array>().unwrap().value(i)),
        DataType::Float32 => V::F32(a.as_any().downcast_ref::<Float32Array>().unwrap().value(i).to_bits()),
        DataType::Float64 => V::F64(a.as_any().downcast_ref::<Float64Array>().unwrap().value(i).to_bits()),
        DataType::Utf8 => V::Str(a.as_any().downcast_ref::<StringArray>().unwrap().value(i).to_owned()),
        DataType::Binary => V::Bytes(a.as_any().downcast_ref::<BinaryArray>().unwrap().value(i).to_vec()),
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(i);
            V::List((0..items.len()).map(|j| from_arrow(&items, j)).collect())
        }
        DataType::Map(..) => {
            let entries = a.as_map().value(i);
            let keys = entries.column(0).as_string::<i32>();
            let mut e: Vec<(String, V)> = (0..entries.len())
                .map(|j| (keys.value(j).to_owned(), from_arrow(entries.column(1), j)))
                .collect();
            e.sort_by(|a, b| a.0.cmp(&b.0));
            V::Map(e)
        }
        DataType::Struct(_) => {
            let s = a.as_struct();
            V::Rec(s.columns().iter().map(|c| from_arrow(c, i)).collect())
        }
        other => panic!("unexpected column type {other}"),
    }
}

/// `schema` with every `uuid` logical type left out.
fn without_uuids(schema: Json) -> Json {
    match schema {
        Json::Object(o) => Json::Object(
            o.into_iter()
                .filter(|(k, v)| !(k == "logicalType" && v == "uuid"))
                .map(|(k, v)| (k, without_uuids(v)))
                .collect(),
        ),
        Json::Array(a) => Json::Array(a.into_iter().map(without_uuids).collect()),
        other => other,
    }
}

/// One random case: writer and reader schemas and one event of the
/// writer's, checked as the module docs say.
fn case(seed: u64) {
    let mut g = Gen { rng: ChaCha8Rng::seed_from_u64(seed), names: 0, decimals: true };
    let writer = random_record(&mut g);
    let reader = g.evolve(&writer);
    let events: Vec<(Json, Avro)> = (0..3).map(|_| g.value(&writer)).collect();
    compare(&writer, &reader, &events, &format!("seed {seed}"));
}

/// Check that the lake's rows of `events` (of `writer`) under `reader`
/// hold what apache-avro reads of them.
fn compare(writer: &Ty, reader: &Ty, events: &[(Json, Avro)], what: &str) {
    let (wtext, rtext) = (avro_json(writer, false).to_string(), avro_json(reader, false).to_string());
    let say = format!(
        "{what}\nwriter {wtext}\nreader {rtext}\nevents {:?}",
        events.iter().map(|e| e.0.to_string()).collect::<Vec<_>>()
    );

    // apache-avro: encode with the writer schema, decode with the reader.
    // The writer's uuids are plain strings to apache-avro (the same bytes:
    // a logical type does not change the encoding), since it cannot
    // resolve a uuid value against a reader's `string`, which Avro allows.
    let ws = apache_avro::Schema::parse_str(&without_uuids(avro_json(writer, false)).to_string())
        .unwrap_or_else(|e| panic!("{e}\n{say}"));
    let rs = apache_avro::Schema::parse_str(&avro_json(reader, true).to_string())
        .unwrap_or_else(|e| panic!("{e}\n{say}"));
    let expected: Vec<V> = events
        .iter()
        .map(|(_, a)| {
            let bytes = apache_avro::to_avro_datum(&ws, a.clone()).unwrap_or_else(|e| panic!("{e}\n{say}"));
            let read = apache_avro::from_avro_datum(&ws, &mut bytes.as_slice(), Some(&rs))
                .unwrap_or_else(|e| panic!("apache-avro cannot resolve: {e}\n{say}"));
            from_avro(&read)
        })
        .collect();

    // The hub's path: the registry (BACKWARD), validation against v1, rows
    // under v2's columns, Parquet, and back.
    let reg = registry(&[&wtext, &rtext], &say);
    let (layout, batch) = rows(&reg, events.iter().map(|e| &e.0), &say);
    let file = encode("t.parquet", &layout.schema, &[batch], Vec::new(), EncodeOptions::default())
        .unwrap_or_else(|e| panic!("{e}\n{say}"));
    let read: Vec<_> = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(file))
        .unwrap()
        .build()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let batch = arrow::compute::concat_batches(&read[0].schema(), &read).unwrap();
    let detail = batch.column_by_name("detail").unwrap();
    let got: Vec<V> = (0..batch.num_rows()).map(|i| from_arrow(detail, i)).collect();
    assert_eq!(got, expected, "{say}");
}

#[test]
fn an_enum_symbol_the_latest_version_lacks_reads_as_its_default_symbol() {
    let field = |symbols: &[&str], default: Option<&str>| Fld {
        name: "status".into(),
        aliases: Vec::new(),
        ty: Ty::Enum(
            "Status".into(),
            symbols.iter().map(|s| (*s).to_owned()).collect(),
            default.map(Into::into),
        ),
        nullable: false,
        default: None,
    };
    let writer = Ty::Record("R".into(), vec![field(&["NEW", "OLD", "GONE"], None)]);
    let reader = Ty::Record("R".into(), vec![field(&["NEW", "OLD"], Some("OLD"))]);
    let event = |i: u32, s: &str| {
        (json!({"status": s}), Avro::Record(vec![("status".into(), Avro::Enum(i, s.into()))]))
    };
    // Before, the lake wrote "GONE", a symbol the table's enum lacks.
    compare(&writer, &reader, &[event(0, "NEW"), event(2, "GONE")], "example");
}

#[test]
fn a_bytes_default_is_the_bytes_of_its_characters() {
    let a = Fld { name: "a".into(), aliases: Vec::new(), ty: Ty::Int, nullable: false, default: None };
    let tag = Fld {
        name: "tag".into(),
        aliases: Vec::new(),
        ty: Ty::Bytes,
        nullable: false,
        default: Some(json!("abcd")),
    };
    let writer = Ty::Record("R".into(), vec![a.clone()]);
    let reader = Ty::Record("R".into(), vec![a, tag]);
    // Before, "abcd" was read as base64 (the three bytes 69 B7 1D).
    compare(
        &writer,
        &reader,
        &[(json!({"a": 1}), Avro::Record(vec![("a".into(), Avro::Int(1))]))],
        "example",
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn older_versions_read_as_avro_resolution_reads_them(seed in any::<u64>()) {
        case(seed);
    }
}
