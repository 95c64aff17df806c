//! Random Avro payload schemas, their evolutions and their events, for
//! the tests that check the lake and the validator against apache-avro.
#![allow(dead_code)] // each test uses its part

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value as Avro;
use base64::Engine as _;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value as Json};
use watershed_lake::{EventMeta, TableBuilder, TableLayout};
use watershed_schema::{validate_json_append, Limits, Registry, Tape, UnknownFields};

/// A payload type, with names for the named Avro types.
#[derive(Debug, Clone)]
pub(crate) enum Ty {
    Bool,
    Int,
    Long,
    Float,
    Double,
    Str,
    /// A string with the `uuid` logical type.
    Uuid,
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
pub(crate) struct Fld {
    pub(crate) name: String,
    pub(crate) aliases: Vec<String>,
    pub(crate) ty: Ty,
    pub(crate) nullable: bool,
    /// In Avro's spelling.
    pub(crate) default: Option<Json>,
}

pub(crate) struct Gen {
    pub(crate) rng: ChaCha8Rng,
    pub(crate) names: usize,
    /// Whether `ty` may make decimals (apache-avro takes no decimal
    /// default, so fields added with one cannot hold any).
    pub(crate) decimals: bool,
}

impl Gen {
    pub(crate) fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}{}", self.names)
    }

    pub(crate) fn p(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    pub(crate) fn ty(&mut self, depth: u32) -> Ty {
        let leaf = depth >= 3 || self.p(0.6);
        if leaf {
            match self.rng.gen_range(0..16) {
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
                14 => Ty::Uuid,
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

    pub(crate) fn record(&mut self, depth: u32) -> Ty {
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
    pub(crate) fn evolve(&mut self, ty: &Ty) -> Ty {
        match ty {
            Ty::Int => [Ty::Int, Ty::Long, Ty::Float, Ty::Double][self.rng.gen_range(0..4)].clone(),
            Ty::Long => [Ty::Long, Ty::Float, Ty::Double][self.rng.gen_range(0..3)].clone(),
            Ty::Float => [Ty::Float, Ty::Double][self.rng.gen_range(0..2)].clone(),
            Ty::Str if self.p(0.3) => Ty::Bytes,
            Ty::Uuid if self.p(0.3) => Ty::Str,
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
    pub(crate) fn default(&mut self, ty: &Ty) -> Json {
        match ty {
            Ty::Bool => json!(self.p(0.5)),
            Ty::Int | Ty::Date => json!(self.rng.gen_range(-1000..1000)),
            Ty::TimeMillis => json!(self.rng.gen_range(0..86_400_000)),
            Ty::Long | Ty::TsMicros | Ty::TsMillis => json!(self.rng.gen_range(-1_000_000i64..1_000_000)),
            Ty::TimeMicros => json!(self.rng.gen_range(0..86_400_000_000i64)),
            Ty::Decimal(..) => unreachable!("no decimal defaults"),
            Ty::Float | Ty::Double => json!(f64::from(self.rng.gen_range(-1000..1000)) / 4.0),
            Ty::Str => json!(self.text()),
            Ty::Uuid => json!(self.uuid()),
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

    pub(crate) fn ascii(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(self.rng.gen_range(0x20u8..0x7f))).collect()
    }

    /// A UUID in its 8-4-4-4-12 form, lowercase (apache-avro reads a
    /// uuid into a number, and prints it lowercase).
    pub(crate) fn uuid(&mut self) -> String {
        let v: u128 = self.rng.gen();
        let h = format!("{v:032x}");
        format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
    }

    pub(crate) fn text(&mut self) -> String {
        const PARTS: [&str; 13] =
            ["a", "Z", "\"", "\\", "é", "\u{1F600}", "\n", "\u{0}", ".", "'", "]", " ", "1"];
        (0..self.rng.gen_range(0..5)).map(|_| PARTS[self.rng.gen_range(0..PARTS.len())]).collect()
    }

    /// A value of `ty`: as a payload writes it, and as an Avro value.
    pub(crate) fn value(&mut self, ty: &Ty) -> (Json, Avro) {
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
            Ty::Uuid => {
                let u = self.uuid();
                // A uuid is a string in Avro's encoding; the test encodes
                // with the logical type left out (see `resolution.rs`).
                (json!(u), Avro::String(u))
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
                let text = decimal_text(i128::from(v), *scale);
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
pub(crate) fn decimal_text(unscaled: i128, scale: u32) -> String {
    let digits = format!("{:0>width$}", unscaled.unsigned_abs(), width = scale as usize + 1);
    let (int, frac) = digits.split_at(digits.len() - scale as usize);
    let sign = if unscaled < 0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

pub(crate) fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The Avro schema JSON of `ty`. With `aliased`, a field renamed through an
/// alias is named by its alias instead: apache-avro's resolution matches
/// fields by name only, and values are compared by position, so this is
/// what Avro's alias rule reads.
pub(crate) fn avro_json(ty: &Ty, aliased: bool) -> Json {
    match ty {
        Ty::Bool => json!("boolean"),
        Ty::Int => json!("int"),
        Ty::Long => json!("long"),
        Ty::Float => json!("float"),
        Ty::Double => json!("double"),
        Ty::Str => json!("string"),
        Ty::Uuid => json!({"type": "string", "logicalType": "uuid"}),
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

/// A random payload schema: record `R`.
pub(crate) fn random_record(g: &mut Gen) -> Ty {
    let Ty::Record(_, fields) = g.record(0) else { unreachable!("record makes records") };
    Ty::Record("R".into(), fields)
}

/// A registry of one BACKWARD subject (`t`/`T`) with these versions (schema
/// texts, v1 first); panics naming `say` when it does not load.
pub(crate) fn registry(versions: &[&str], say: &str) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("t.subject");
    std::fs::create_dir(&s).unwrap();
    std::fs::write(
        s.join("subject.toml"),
        "source = \"t\"\ndetail_type = \"T\"\ncompatibility = \"BACKWARD\"\n",
    )
    .unwrap();
    for (i, text) in versions.iter().enumerate() {
        std::fs::write(s.join(format!("v{}.avsc", i + 1)), text).unwrap();
    }
    Registry::load(dir.path()).unwrap_or_else(|e| panic!("the registry refuses: {e}\n{say}"))
}

/// The rows the hub writes for `events` of the subject's v1 (validated
/// against it, under the latest version's columns), with their layout.
pub(crate) fn rows<'j>(
    registry: &Registry,
    events: impl IntoIterator<Item = &'j Json>,
    say: &str,
) -> (Arc<TableLayout>, arrow::array::RecordBatch) {
    let subject = &registry.subjects()[0];
    let layout = TableLayout::new(subject);
    let mut rows = TableBuilder::with_capacity(Arc::clone(&layout), 8);
    let mut tape = Tape::new();
    for (i, event) in events.into_iter().enumerate() {
        let root = validate_json_append(
            &subject.versions[0].node,
            event.to_string().as_bytes(),
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
    (layout, batch)
}
