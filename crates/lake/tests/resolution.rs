//! Mixed schema versions, checked against Avro's own schema resolution.
//!
//! An event validated against an older version of its subject is written
//! under the latest version's columns (`TableLayout`'s projections). Avro
//! defines what a reader schema reads of data written with a writer schema;
//! this test makes random backward-compatible evolutions (fields added with
//! defaults, dropped, renamed through aliases, promoted int→long→float→
//! double and string↔bytes, made nullable, enum symbols added or removed
//! with a default symbol, all of it nested in records, arrays and maps),
//! random events of the older version, and checks that the rows the lake
//! writes (through Parquet and back) hold exactly what apache-avro reads of
//! the same event encoded with the writer schema and decoded with the
//! reader schema. The registry must accept every evolution as BACKWARD.
//!
//! The generator is driven by a seed (proptest picks the seeds); a failing
//! case prints both schemas and the event.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value as Avro;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array,
    Float64Array, Int32Array, Int64Array, StringArray, Time32MillisecondArray, Time64MicrosecondArray,
    TimestampMicrosecondArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, TimeUnit};
use base64::Engine as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value as Json};
use watershed_lake::{encode, EncodeOptions, EventMeta, TableBuilder, TableLayout};
use watershed_schema::{validate_json_append, Limits, Registry, Tape, UnknownFields};

/// A payload type, with names for the named Avro types.
#[derive(Debug, Clone)]
enum Ty {
    Bool,
    Int,
    Long,
    Float,
    Double,
    Str,
    Bytes,
    Fixed(String, usize),
    Date,
    TimeMillis,
    TimeMicros,
    TsMillis,
    TsMicros,
    /// Precision, scale.
    Decimal(u32, u32),
    Enum(String, Vec<String>, Option<String>),
    Array(Box<Ty>),
    Map(Box<Ty>),
    Record(String, Vec<Fld>),
}

#[derive(Debug, Clone)]
struct Fld {
    name: String,
    aliases: Vec<String>,
    ty: Ty,
    nullable: bool,
    /// In Avro's spelling.
    default: Option<Json>,
}

struct Gen {
    rng: ChaCha8Rng,
    names: usize,
    /// Whether `ty` may make decimals (apache-avro takes no decimal
    /// default, so fields added with one cannot hold any).
    decimals: bool,
}

impl Gen {
    fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    fn p(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    fn ty(&mut self, depth: u32) -> Ty {
        let leaf = depth >= 3 || self.p(0.6);
        if leaf {
            match self.rng.gen_range(0..15) {
                0 => Ty::Bool,
                1 => Ty::Int,
                2 => Ty::Long,
                3 => Ty::Float,
                4 => Ty::Double,
                5 => Ty::Str,
                6 => Ty::Bytes,
                7 => Ty::Fixed(self.name("F"), self.rng.gen_range(1..5)),
                8 => Ty::Date,
                9 => Ty::TsMicros,
                10 => Ty::TimeMillis,
                11 => Ty::TimeMicros,
                12 => Ty::TsMillis,
                13 if self.decimals => {
                    let p = self.rng.gen_range(1..=18);
                    Ty::Decimal(p, self.rng.gen_range(0..=p))
                }
                _ => {
                    let n = self.rng.gen_range(1..5);
                    Ty::Enum(self.name("E"), (0..n).map(|i| format!("S{i}")).collect(), None)
                }
            }
        } else {
            match self.rng.gen_range(0..3) {
                0 => Ty::Array(Box::new(self.ty(depth + 1))),
                1 => Ty::Map(Box::new(self.ty(depth + 1))),
                _ => self.record(depth + 1),
            }
        }
    }

    fn record(&mut self, depth: u32) -> Ty {
        let n = self.rng.gen_range(1..5);
        let fields = (0..n)
            .map(|i| Fld {
                name: format!("f{i}"),
                aliases: Vec::new(),
                ty: self.ty(depth),
                nullable: self.p(0.3),
                default: None,
            })
            .collect();
        Ty::Record(self.name("N"), fields)
    }

    /// A reader type that can read data of `ty` (Avro resolution).
    fn evolve(&mut self, ty: &Ty) -> Ty {
        match ty {
            Ty::Int => [Ty::Int, Ty::Long, Ty::Float, Ty::Double][self.rng.gen_range(0..4)].clone(),
            Ty::Long => [Ty::Long, Ty::Float, Ty::Double][self.rng.gen_range(0..3)].clone(),
            Ty::Float => [Ty::Float, Ty::Double][self.rng.gen_range(0..2)].clone(),
            Ty::Str if self.p(0.3) => Ty::Bytes,
            Ty::Bytes if self.p(0.3) => Ty::Str,
            Ty::Enum(name, symbols, _) => {
                let mut symbols = symbols.clone();
                let mut default = None;
                if self.p(0.3) {
                    symbols.push(format!("S{}", 10 + symbols.len()));
                }
                if symbols.len() > 1 && self.p(0.4) {
                    symbols.remove(self.rng.gen_range(0..symbols.len()));
                    default = Some(symbols[self.rng.gen_range(0..symbols.len())].clone());
                }
                Ty::Enum(name.clone(), symbols, default)
            }
            Ty::Array(item) => Ty::Array(Box::new(self.evolve(item))),
            Ty::Map(value) => Ty::Map(Box::new(self.evolve(value))),
            Ty::Record(name, fields) => {
                let mut out = Vec::new();
                for f in fields {
                    let roll = self.rng.gen_range(0..10);
                    if roll == 0 {
                        continue; // dropped: the reader ignores it
                    }
                    let (name, aliases) = if roll == 1 {
                        (format!("{}_renamed", f.name), vec![f.name.clone()])
                    } else {
                        (f.name.clone(), Vec::new())
                    };
                    out.push(Fld {
                        name,
                        aliases,
                        ty: self.evolve(&f.ty),
                        nullable: f.nullable || self.p(0.15),
                        default: None,
                    });
                }
                let added = self.rng.gen_range(0..3);
                for i in 0..added.max(usize::from(out.is_empty())) {
                    self.decimals = false;
                    let ty = self.ty(2);
                    self.decimals = true;
                    let nullable = self.p(0.3);
                    let default = if nullable { Json::Null } else { self.default(&ty) };
                    out.push(Fld {
                        name: format!("new{i}"),
                        aliases: Vec::new(),
                        ty,
                        nullable,
                        default: Some(default),
                    });
                }
                Ty::Record(name.clone(), out)
            }
            other => other.clone(),
        }
    }

    /// A default for `ty` in Avro's spelling (bytes as one character per
    /// byte: ASCII here, where apache-avro, which takes a default's UTF-8
    /// bytes, agrees with the specification).
    fn default(&mut self, ty: &Ty) -> Json {
        match ty {
            Ty::Bool => json!(self.p(0.5)),
            Ty::Int | Ty::Date => json!(self.rng.gen_range(-1000..1000)),
            Ty::TimeMillis => json!(self.rng.gen_range(0..86_400_000)),
            Ty::Long | Ty::TsMicros | Ty::TsMillis => json!(self.rng.gen_range(-1_000_000i64..1_000_000)),
            Ty::TimeMicros => json!(self.rng.gen_range(0..86_400_000_000i64)),
            Ty::Decimal(..) => unreachable!("no decimal defaults"),
            Ty::Float | Ty::Double => json!(f64::from(self.rng.gen_range(-1000..1000)) / 4.0),
            Ty::Str => json!(self.text()),
            Ty::Bytes => {
                let n = self.rng.gen_range(0..4);
                json!(self.ascii(n))
            }
            Ty::Fixed(_, n) => json!(self.ascii(*n)),
            Ty::Enum(_, symbols, _) => json!(symbols[self.rng.gen_range(0..symbols.len())]),
            Ty::Array(item) => {
                Json::Array((0..self.rng.gen_range(0..3)).map(|_| self.default(item)).collect())
            }
            Ty::Map(value) => Json::Object(
                (0..self.rng.gen_range(0..3)).map(|i| (format!("k{i}"), self.default(value))).collect(),
            ),
            Ty::Record(_, fields) => Json::Object(
                fields
                    .iter()
                    .map(|f| {
                        let v = if f.nullable { Json::Null } else { self.default(&f.ty) };
                        (f.name.clone(), v)
                    })
                    .collect(),
            ),
        }
    }

    fn ascii(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(self.rng.gen_range(0x20u8..0x7f))).collect()
    }

    fn text(&mut self) -> String {
        const PARTS: [&str; 8] = ["a", "Z", "\"", "\\", "é", "\u{1F600}", "\n", "\u{0}"];
        (0..self.rng.gen_range(0..5)).map(|_| PARTS[self.rng.gen_range(0..PARTS.len())]).collect()
    }

    /// A value of `ty`: as a payload writes it, and as an Avro value.
    fn value(&mut self, ty: &Ty) -> (Json, Avro) {
        match ty {
            Ty::Bool => {
                let b = self.p(0.5);
                (json!(b), Avro::Boolean(b))
            }
            Ty::Int => {
                let v: i32 = self.rng.gen();
                (json!(v), Avro::Int(v))
            }
            Ty::Long => {
                let v: i64 = self.rng.gen();
                (json!(v), Avro::Long(v))
            }
            Ty::Float => {
                #[allow(clippy::cast_precision_loss)]
                let v = self.rng.gen_range(-1_000_000i32..1_000_000) as f32 / 8.0;
                (json!(f64::from(v)), Avro::Float(v))
            }
            Ty::Double => {
                #[allow(clippy::cast_precision_loss)]
                let v = self.rng.gen_range(-(1i64 << 40)..(1i64 << 40)) as f64 / 1024.0;
                (json!(v), Avro::Double(v))
            }
            Ty::Str => {
                let s = self.text();
                (json!(s), Avro::String(s))
            }
            Ty::Bytes => {
                // Valid UTF-8 (bytes may be read as a string), with NUL and
                // a two-byte character among them.
                let b = self.text().into_bytes();
                (json!(b64(&b)), Avro::Bytes(b))
            }
            Ty::Fixed(_, n) => {
                let b: Vec<u8> = (0..*n).map(|_| self.rng.gen()).collect();
                (json!(b64(&b)), Avro::Fixed(*n, b))
            }
            Ty::Date => {
                let v = self.rng.gen_range(-3_652_424..=2_932_896);
                (json!(v), Avro::Date(v))
            }
            Ty::TsMicros => {
                let v = self.rng.gen_range(-62_135_596_800_000_000..=253_402_300_799_999_999);
                (json!(v), Avro::TimestampMicros(v))
            }
            Ty::TsMillis => {
                let v = self.rng.gen_range(-62_135_596_800_000..=253_402_300_799_999);
                (json!(v), Avro::TimestampMillis(v))
            }
            Ty::TimeMillis => {
                let v = self.rng.gen_range(0..86_400_000);
                (json!(v), Avro::TimeMillis(v))
            }
            Ty::TimeMicros => {
                let v = self.rng.gen_range(0..86_400_000_000);
                (json!(v), Avro::TimeMicros(v))
            }
            Ty::Decimal(p, scale) => {
                let max = 10i64.pow(*p) - 1;
                let v = self.rng.gen_range(-max..=max);
                let text = decimal_text(v, *scale);
                let a = Avro::Decimal(apache_avro::Decimal::from(i128::from(v).to_be_bytes()));
                // Written as a string, or as a number when that is exact.
                if *scale == 0 && v.unsigned_abs() < 1 << 53 && self.p(0.5) {
                    (json!(v), a)
                } else {
                    (json!(text), a)
                }
            }
            Ty::Enum(_, symbols, _) => {
                let i = self.rng.gen_range(0..symbols.len());
                (json!(symbols[i]), Avro::Enum(u32::try_from(i).unwrap(), symbols[i].clone()))
            }
            Ty::Array(item) => {
                let (js, avs) = (0..self.rng.gen_range(0..4)).map(|_| self.value(item)).unzip();
                (Json::Array(js), Avro::Array(avs))
            }
            Ty::Map(value) => {
                let mut js = Map::new();
                let mut avs = HashMap::new();
                for _ in 0..self.rng.gen_range(0..4) {
                    let k = self.text();
                    let (j, a) = self.value(value);
                    js.insert(k.clone(), j);
                    avs.insert(k, a);
                }
                (Json::Object(js), Avro::Map(avs))
            }
            Ty::Record(_, fields) => {
                let mut js = Map::new();
                let mut avs = Vec::new();
                for f in fields {
                    if f.nullable && self.p(0.3) {
                        // Null, or left out: a nullable field may be omitted.
                        if self.p(0.5) {
                            js.insert(f.name.clone(), Json::Null);
                        }
                        avs.push((f.name.clone(), Avro::Union(0, Box::new(Avro::Null))));
                        continue;
                    }
                    let (j, a) = self.value(&f.ty);
                    js.insert(f.name.clone(), j);
                    let a = if f.nullable { Avro::Union(1, Box::new(a)) } else { a };
                    avs.push((f.name.clone(), a));
                }
                (Json::Object(js), Avro::Record(avs))
            }
        }
    }
}

/// `unscaled` × 10^-`scale` in plain decimal notation.
fn decimal_text(unscaled: i64, scale: u32) -> String {
    let digits = format!("{:0>width$}", unscaled.unsigned_abs(), width = scale as usize + 1);
    let (int, frac) = digits.split_at(digits.len() - scale as usize);
    let sign = if unscaled < 0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The Avro schema JSON of `ty`. With `aliased`, a field renamed through an
/// alias is named by its alias instead: apache-avro's resolution matches
/// fields by name only, and values are compared by position, so this is
/// what Avro's alias rule reads.
fn avro_json(ty: &Ty, aliased: bool) -> Json {
    match ty {
        Ty::Bool => json!("boolean"),
        Ty::Int => json!("int"),
        Ty::Long => json!("long"),
        Ty::Float => json!("float"),
        Ty::Double => json!("double"),
        Ty::Str => json!("string"),
        Ty::Bytes => json!("bytes"),
        Ty::Fixed(name, size) => json!({"type": "fixed", "name": name, "size": size}),
        Ty::Date => json!({"type": "int", "logicalType": "date"}),
        Ty::TsMicros => json!({"type": "long", "logicalType": "timestamp-micros"}),
        Ty::TsMillis => json!({"type": "long", "logicalType": "timestamp-millis"}),
        Ty::TimeMillis => json!({"type": "int", "logicalType": "time-millis"}),
        Ty::TimeMicros => json!({"type": "long", "logicalType": "time-micros"}),
        Ty::Decimal(p, s) => json!({"type": "bytes", "logicalType": "decimal", "precision": p, "scale": s}),
        Ty::Enum(name, symbols, default) => {
            let mut e = json!({"type": "enum", "name": name, "symbols": symbols});
            if let Some(d) = default {
                e["default"] = json!(d);
            }
            e
        }
        Ty::Array(item) => json!({"type": "array", "items": avro_json(item, aliased)}),
        Ty::Map(value) => json!({"type": "map", "values": avro_json(value, aliased)}),
        Ty::Record(name, fields) => {
            let fields: Vec<Json> = fields
                .iter()
                .map(|f| {
                    let t = avro_json(&f.ty, aliased);
                    let name = if aliased { f.aliases.first().unwrap_or(&f.name) } else { &f.name };
                    let mut o =
                        json!({"name": name, "type": if f.nullable { json!(["null", t]) } else { t }});
                    if !aliased && !f.aliases.is_empty() {
                        o["aliases"] = json!(f.aliases);
                    }
                    if let Some(d) = &f.default {
                        o["default"] = d.clone();
                    }
                    o
                })
                .collect();
            json!({"type": "record", "name": name, "fields": fields})
        }
    }
}

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

/// One random case: writer and reader schemas and one event of the
/// writer's, checked as the module docs say.
fn case(seed: u64) {
    let mut g = Gen { rng: ChaCha8Rng::seed_from_u64(seed), names: 0, decimals: true };
    let Ty::Record(_, wf) = g.record(0) else { unreachable!() };
    let writer = Ty::Record("R".into(), wf);
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
    let ws = apache_avro::Schema::parse_str(&wtext).unwrap_or_else(|e| panic!("{e}\n{say}"));
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
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("t.evolving");
    std::fs::create_dir(&s).unwrap();
    std::fs::write(
        s.join("subject.toml"),
        "source = \"t\"\ndetail_type = \"T\"\ncompatibility = \"BACKWARD\"\n",
    )
    .unwrap();
    std::fs::write(s.join("v1.avsc"), &wtext).unwrap();
    std::fs::write(s.join("v2.avsc"), &rtext).unwrap();
    let reg = Registry::load(dir.path()).unwrap_or_else(|e| panic!("the registry refuses: {e}\n{say}"));
    let subject = &reg.subjects()[0];
    let layout = TableLayout::new(subject);
    let mut rows = TableBuilder::with_capacity(Arc::clone(&layout), events.len());
    let mut tape = Tape::new();
    for (i, (j, _)) in events.iter().enumerate() {
        let root = validate_json_append(
            &subject.versions[0].node,
            j.to_string().as_bytes(),
            UnknownFields::Reject,
            Limits::default(),
            &mut tape,
        )
        .unwrap_or_else(|e| panic!("event {i} refused: {e}\n{say}"));
        let meta = EventMeta {
            event_id: "e",
            source: "t",
            detail_type: "T",
            event_time: 0,
            received_at: 0,
            region: None,
            schema_version: 1,
            collector: None,
        };
        rows.append(&meta, std::iter::empty(), &tape, root);
    }
    let batch = rows.finish().unwrap();
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
