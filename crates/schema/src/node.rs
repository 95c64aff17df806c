//! The compiled form of an Avro payload schema: a tree of [`Node`]s that
//! the validator walks while it decodes JSON, and that the lake maps to
//! Arrow types. Compiling resolves named references, reads the
//! `watershed.*` field attributes and rejects what JSON payloads cannot
//! carry, listing every problem.

use std::collections::HashMap;

use apache_avro::schema::{Name, RecordSchema, Schema};
use serde_json::Value;

/// How a protected field is protected at ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protect {
    /// The value becomes null, irreversibly.
    Redact,
    /// All but the last `keep` characters become `*`.
    Mask {
        /// How many trailing characters stay readable.
        keep: u32,
    },
    /// A keyed HMAC-SHA256 token, deterministic per account.
    Tokenize,
    /// AES-256-GCM under the (account, data subject) data key.
    Encrypt,
}

impl Protect {
    /// The attribute spelling: `redact`, `mask`, `tokenize` or `encrypt`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Protect::Redact => "redact",
            Protect::Mask { .. } => "mask",
            Protect::Tokenize => "tokenize",
            Protect::Encrypt => "encrypt",
        }
    }
}

/// The type of a value in a payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Only `null`.
    Null,
    /// `true` / `false`.
    Boolean,
    /// 32-bit integer.
    Int,
    /// 64-bit integer.
    Long,
    /// 32-bit float.
    Float,
    /// 64-bit float.
    Double,
    /// UTF-8 text.
    String,
    /// Bytes, base64 in JSON.
    Bytes,
    /// Fixed-size bytes, base64 in JSON.
    Fixed {
        /// The byte length.
        size: usize,
    },
    /// A uuid string.
    Uuid,
    /// Days since the epoch.
    Date,
    /// Milliseconds since midnight.
    TimeMillis,
    /// Microseconds since midnight.
    TimeMicros,
    /// UTC milliseconds since the epoch.
    TimestampMillis,
    /// UTC microseconds since the epoch.
    TimestampMicros,
    /// A fixed-point decimal.
    Decimal {
        /// Total significant digits.
        precision: u8,
        /// Digits after the point.
        scale: u8,
    },
    /// One of a set of symbols.
    Enum {
        /// The symbols, in declaration order.
        symbols: Vec<String>,
        /// The symbol that an older version's symbol this enum lacks reads
        /// as (Avro's enum `default`).
        default: Option<String>,
    },
    /// A list of one item type.
    Array(Box<Node>),
    /// A string-keyed map of one value type.
    Map(Box<Node>),
    /// A record of named fields.
    Record(Record),
}

impl Kind {
    /// A short name for messages: `long`, `timestamp-millis`, `record Order`.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Kind::Null => "null".into(),
            Kind::Boolean => "boolean".into(),
            Kind::Int => "int".into(),
            Kind::Long => "long".into(),
            Kind::Float => "float".into(),
            Kind::Double => "double".into(),
            Kind::String => "string".into(),
            Kind::Bytes => "bytes".into(),
            Kind::Fixed { size } => format!("fixed({size})"),
            Kind::Uuid => "uuid".into(),
            Kind::Date => "date".into(),
            Kind::TimeMillis => "time-millis".into(),
            Kind::TimeMicros => "time-micros".into(),
            Kind::TimestampMillis => "timestamp-millis".into(),
            Kind::TimestampMicros => "timestamp-micros".into(),
            Kind::Decimal { precision, scale } => format!("decimal({precision},{scale})"),
            Kind::Enum { .. } => "enum".into(),
            Kind::Array(_) => "array".into(),
            Kind::Map(_) => "map".into(),
            Kind::Record(r) => format!("record {}", r.name),
        }
    }

    /// Whether values of this kind can be masked, tokenized or encrypted
    /// (strings and uuids; enums are text in the lake but keep their symbols).
    #[must_use]
    pub fn is_text(&self) -> bool {
        matches!(self, Kind::String | Kind::Uuid)
    }
}

/// A type plus whether `null` is allowed (a `["null", T]` union).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The non-null type.
    pub kind: Kind,
    /// Whether `null` is accepted.
    pub nullable: bool,
}

/// A compiled record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's full name.
    pub name: String,
    /// Fields in declaration order.
    pub fields: Vec<Field>,
    /// Field name (and alias) to index.
    pub lookup: HashMap<String, usize>,
}

impl Record {
    /// The index of the field called `name`, by name or alias. `hint` is
    /// the index expected next (producers usually write fields in schema
    /// order), checked first.
    #[must_use]
    pub fn index_of(&self, name: &[u8], hint: usize) -> Option<usize> {
        if let Some(f) = self.fields.get(hint) {
            if short_eq(f.name.as_bytes(), name) {
                return Some(hint);
            }
        }
        if self.fields.len() <= 32 {
            if let Some(i) = self.fields.iter().position(|f| short_eq(f.name.as_bytes(), name)) {
                return Some(i);
            }
            if self.lookup.len() == self.fields.len() {
                return None; // no aliases to consult
            }
        }
        self.lookup.get(std::str::from_utf8(name).ok()?).copied()
    }

    /// The index in `writer` of the field that this (reader) record's
    /// field `ri` reads, as Avro resolution matches them: by name, else a
    /// writer field named by one of the reader field's aliases. `None`
    /// when the writer lacks it (the reader's default applies).
    #[must_use]
    pub fn writer_field(&self, ri: usize, writer: &Record) -> Option<usize> {
        let name = &self.fields[ri].name;
        writer
            .fields
            .iter()
            .position(|wf| &wf.name == name)
            .or_else(|| writer.fields.iter().position(|wf| self.lookup.get(&wf.name) == Some(&ri)))
    }
}

/// Byte equality for short strings (field names, enum symbols) without a
/// `memcmp` call: two overlapping word loads for 4 to 16 bytes.
#[inline]
#[must_use]
pub(crate) fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w8 = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let w4 = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
    match n {
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

/// A compiled record field.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    /// The field name.
    pub name: String,
    /// Its type.
    pub node: Node,
    /// The Avro default, when the schema gives one.
    pub default: Option<Value>,
    /// The default as payload JSON text (bytes in base64; decoded when a
    /// payload omits the field, and written for events of versions without
    /// it). Checked to decode when the schema is compiled; `None` without a
    /// default.
    pub default_json: Option<String>,
    /// The protection action, from `"watershed.protect"`.
    pub protect: Option<Protect>,
    /// Whether `"watershed.data_subject": true` marks this field.
    pub data_subject: bool,
}

/// Compile an Avro schema into a [`Node`], collecting every problem as a
/// message (without the file name, which the caller prefixes).
pub(crate) fn compile(schema: &Schema, problems: &mut Vec<String>) -> Node {
    let mut names = HashMap::new();
    collect_names(schema, None, &mut names);
    let mut c = Compiler { names, problems, depth: 0 };
    c.node(schema, "")
}

/// Gather named types (records, enums, fixed) for resolving `Ref`s.
pub(crate) fn collect_names<'a>(schema: &'a Schema, ns: Option<&str>, out: &mut HashMap<String, &'a Schema>) {
    let full = |n: &Name| n.fullname(n.namespace.clone().or_else(|| ns.map(str::to_owned)));
    match schema {
        Schema::Record(r) => {
            let inner_ns = r.name.namespace.clone().or_else(|| ns.map(str::to_owned));
            out.insert(full(&r.name), schema);
            out.insert(r.name.name.clone(), schema);
            for f in &r.fields {
                collect_names(&f.schema, inner_ns.as_deref(), out);
            }
        }
        Schema::Enum(e) => {
            out.insert(full(&e.name), schema);
            out.insert(e.name.name.clone(), schema);
        }
        Schema::Fixed(f) => {
            out.insert(full(&f.name), schema);
            out.insert(f.name.name.clone(), schema);
        }
        Schema::Array(a) => collect_names(&a.items, ns, out),
        Schema::Map(m) => collect_names(&m.types, ns, out),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, ns, out)),
        _ => {}
    }
}

/// Resolve a named reference against `names`.
pub(crate) fn resolve<'a>(schema: &'a Schema, names: &HashMap<String, &'a Schema>) -> &'a Schema {
    if let Schema::Ref { name } = schema {
        if let Some(s) = names.get(&name.fullname(None)).or_else(|| names.get(&name.name)) {
            return s;
        }
    }
    schema
}

struct Compiler<'a, 'p> {
    names: HashMap<String, &'a Schema>,
    problems: &'p mut Vec<String>,
    depth: usize,
}

impl<'a> Compiler<'a, '_> {
    fn node(&mut self, schema: &'a Schema, path: &str) -> Node {
        let at = if path.is_empty() { "the payload".to_owned() } else { format!("field \"{path}\"") };
        match schema {
            Schema::Union(u) => {
                let variants = u.variants();
                let non_null: Vec<&Schema> = variants.iter().filter(|v| !matches!(v, Schema::Null)).collect();
                let nullable = non_null.len() < variants.len();
                match non_null.as_slice() {
                    [] => Node { kind: Kind::Null, nullable: true },
                    [one] => {
                        let mut n = self.node(one, path);
                        n.nullable = nullable;
                        n
                    }
                    _ => {
                        self.problems.push(format!(
                            "{at}: unions other than [\"null\", T] are not supported in JSON payloads"
                        ));
                        Node { kind: Kind::Null, nullable: true }
                    }
                }
            }
            other => Node { kind: self.kind(other, path, &at), nullable: false },
        }
    }

    fn kind(&mut self, schema: &'a Schema, path: &str, at: &str) -> Kind {
        let schema = resolve(schema, &self.names);
        match schema {
            Schema::Null => Kind::Null,
            Schema::Boolean => Kind::Boolean,
            Schema::Int => Kind::Int,
            Schema::Long => Kind::Long,
            Schema::Float => Kind::Float,
            Schema::Double => Kind::Double,
            Schema::Bytes => Kind::Bytes,
            Schema::String => Kind::String,
            Schema::Uuid => Kind::Uuid,
            Schema::Date => Kind::Date,
            Schema::TimeMillis => Kind::TimeMillis,
            Schema::TimeMicros => Kind::TimeMicros,
            Schema::TimestampMillis | Schema::LocalTimestampMillis => Kind::TimestampMillis,
            Schema::TimestampMicros | Schema::LocalTimestampMicros => Kind::TimestampMicros,
            Schema::Fixed(f) => Kind::Fixed { size: f.size },
            Schema::Decimal(d) => {
                if d.precision == 0 || d.precision > 38 || d.scale > d.precision {
                    self.problems.push(format!(
                        "{at}: decimal({},{}) is outside 1..=38 digits with scale <= precision",
                        d.precision, d.scale
                    ));
                }
                #[allow(clippy::cast_possible_truncation)]
                Kind::Decimal { precision: d.precision.min(38) as u8, scale: d.scale.min(38) as u8 }
            }
            Schema::Enum(e) => Kind::Enum { symbols: e.symbols.clone(), default: e.default.clone() },
            Schema::Array(a) => Kind::Array(Box::new(self.nested(&a.items, path, "[]"))),
            Schema::Map(m) => Kind::Map(Box::new(self.nested(&m.types, path, "{}"))),
            Schema::Record(r) => self.record(r, path),
            Schema::Union(_) => {
                self.problems.push(format!("{at}: nested unions are not valid Avro"));
                Kind::Null
            }
            Schema::Ref { name } => {
                self.problems.push(format!("{at}: unknown type reference {}", name.fullname(None)));
                Kind::Null
            }
            other => {
                self.problems.push(format!("{at}: type {other:?} is not supported in payloads"));
                Kind::Null
            }
        }
    }

    fn nested(&mut self, schema: &'a Schema, path: &str, suffix: &str) -> Node {
        self.node(schema, &format!("{path}{suffix}"))
    }

    fn record(&mut self, r: &'a RecordSchema, path: &str) -> Kind {
        self.depth += 1;
        if self.depth > 32 {
            self.problems.push(format!(
                "record {}: nesting deeper than 32 levels (recursive records are not supported)",
                r.name.fullname(None)
            ));
            self.depth -= 1;
            return Kind::Null;
        }
        let mut fields = Vec::with_capacity(r.fields.len());
        let mut lookup = HashMap::new();
        for (i, f) in r.fields.iter().enumerate() {
            let fpath = if path.is_empty() { f.name.clone() } else { format!("{path}.{}", f.name) };
            let node = self.node(&f.schema, &fpath);
            let (protect, data_subject) = self.attributes(&fpath, f, &node);
            lookup.insert(f.name.clone(), i);
            for alias in f.aliases.iter().flatten() {
                lookup.entry(alias.clone()).or_insert(i);
            }
            let default_json = f.default.as_ref().and_then(|d| match checked_default(&node, d) {
                Ok(text) => Some(text),
                Err(why) => {
                    self.problems.push(format!(
                        "field \"{fpath}\": the default {} does not fit {}: {why}",
                        cut(&d.to_string(), 80),
                        node.kind.name()
                    ));
                    None
                }
            });
            fields.push(Field {
                name: f.name.clone(),
                node,
                default_json,
                default: f.default.clone(),
                protect,
                data_subject,
            });
        }
        self.depth -= 1;
        Kind::Record(Record { name: r.name.fullname(None), fields, lookup })
    }

    fn attributes(
        &mut self,
        path: &str,
        f: &apache_avro::schema::RecordField,
        node: &Node,
    ) -> (Option<Protect>, bool) {
        let attrs = &f.custom_attributes;
        for key in attrs.keys().filter(|k| k.starts_with("watershed.")) {
            if !matches!(key.as_str(), "watershed.protect" | "watershed.mask_keep" | "watershed.data_subject")
            {
                self.problems.push(format!(
                    "field \"{path}\": unknown attribute \"{key}\" (known: watershed.protect, watershed.mask_keep, watershed.data_subject)"
                ));
            }
        }
        let protect = match attrs.get("watershed.protect") {
            None => None,
            Some(Value::String(s)) => match s.as_str() {
                "redact" => Some(Protect::Redact),
                "tokenize" => Some(Protect::Tokenize),
                "encrypt" => Some(Protect::Encrypt),
                "mask" => match attrs.get("watershed.mask_keep") {
                    None => Some(Protect::Mask { keep: 4 }),
                    Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                        Some(keep) => Some(Protect::Mask { keep }),
                        None => {
                            self.problems.push(format!(
                                "field \"{path}\": \"watershed.mask_keep\" must be a non-negative integer, got {v}"
                            ));
                            None
                        }
                    },
                },
                other => {
                    self.problems.push(format!(
                        "field \"{path}\": \"watershed.protect\" is {other:?}; use redact, mask, tokenize or encrypt"
                    ));
                    None
                }
            },
            Some(v) => {
                self.problems
                    .push(format!("field \"{path}\": \"watershed.protect\" must be a string, got {v}"));
                None
            }
        };
        if attrs.contains_key("watershed.mask_keep") && !matches!(protect, Some(Protect::Mask { .. })) {
            self.problems.push(format!(
                "field \"{path}\": \"watershed.mask_keep\" needs \"watershed.protect\": \"mask\""
            ));
        }
        if let Some(p) = protect {
            let leaf = leaf_kind(node);
            if !matches!(p, Protect::Redact) && !leaf.is_text() {
                self.problems.push(format!(
                    "field \"{path}\": \"{}\" needs a string or uuid value (or an array or map of them), not {}",
                    p.as_str(),
                    leaf.name()
                ));
            }
        }
        let data_subject = match attrs.get("watershed.data_subject") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.problems.push(format!(
                    "field \"{path}\": \"watershed.data_subject\" must be true or false, got {v}"
                ));
                false
            }
        };
        if data_subject && !matches!(node.kind, Kind::String | Kind::Uuid | Kind::Int | Kind::Long) {
            self.problems.push(format!(
                "field \"{path}\": the data subject must be a string, uuid, int or long, not {}",
                node.kind.name()
            ));
        }
        (protect, data_subject)
    }
}

/// A field's Avro default as payload JSON text (what [`crate::decode_value`]
/// reads when an event omits the field, and what the lake writes for
/// events of versions without it), checked to decode.
fn checked_default(node: &Node, avro: &Value) -> Result<String, String> {
    let text = payload_default(node, avro)?.to_string();
    let mut tape = crate::Tape::new();
    match crate::decode_value(node, text.as_bytes(), &mut tape) {
        Ok(_) => Ok(text),
        Err(v) if v.path == "$" => Err(v.detail),
        Err(v) => Err(format!("{} (at {})", v.detail, v.path)),
    }
}

/// An Avro default written as a payload writes the value. They differ for
/// `bytes` and `fixed`: Avro spells a default as a string of code points
/// U+0000 to U+00FF, one per byte (`"\u00ff"` is the byte 0xFF), where a
/// payload carries base64. Every other type is spelt alike.
fn payload_default(node: &Node, avro: &Value) -> Result<Value, String> {
    use base64::Engine as _;
    if avro.is_null() {
        return Ok(Value::Null);
    }
    Ok(match (&node.kind, avro) {
        (Kind::Bytes | Kind::Fixed { .. }, Value::String(s)) => {
            let bytes =
                s.chars().map(|c| u8::try_from(u32::from(c))).collect::<Result<Vec<u8>, _>>().map_err(
                    |_| {
                        "a bytes or fixed default is a string of characters \\u0000 to \\u00ff, one per byte"
                            .to_owned()
                    },
                )?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        (Kind::Array(item), Value::Array(items)) => {
            Value::Array(items.iter().map(|v| payload_default(item, v)).collect::<Result<_, _>>()?)
        }
        (Kind::Map(value), Value::Object(entries)) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), payload_default(value, v)?)))
                .collect::<Result<_, String>>()?,
        ),
        (Kind::Record(r), Value::Object(entries)) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let v = match r.lookup.get(k) {
                        Some(&i) => payload_default(&r.fields[i].node, v)?,
                        None => v.clone(),
                    };
                    Ok((k.clone(), v))
                })
                .collect::<Result<_, String>>()?,
        ),
        _ => avro.clone(),
    })
}

/// Fields of `reader` that `writer` lacks and that would be written with a
/// non-null default holding protected values: the lake writes a writer
/// version's events under the reader's columns with the default as it is,
/// where the validator would have protected it. Fields match as the lake's
/// projection matches them (by name, then by reader alias), through
/// records, arrays and maps. Each is its dotted path.
pub(crate) fn unprotected_defaults(reader: &Node, writer: &Node, path: &str, out: &mut Vec<String>) {
    match (&reader.kind, &writer.kind) {
        (Kind::Record(r), Kind::Record(w)) => {
            for (ri, rf) in r.fields.iter().enumerate() {
                let fpath = if path.is_empty() { rf.name.clone() } else { format!("{path}.{}", rf.name) };
                match r.writer_field(ri, w) {
                    Some(wi) => unprotected_defaults(&rf.node, &w.fields[wi].node, &fpath, out),
                    None if rf.default.as_ref().is_some_and(|d| !d.is_null())
                        && (rf.protect.is_some() || protects(&rf.node)) =>
                    {
                        out.push(fpath);
                    }
                    None => {}
                }
            }
        }
        (Kind::Array(r), Kind::Array(w)) | (Kind::Map(r), Kind::Map(w)) => {
            unprotected_defaults(r, w, path, out);
        }
        _ => {}
    }
}

/// Whether any field under `node` is protected.
fn protects(node: &Node) -> bool {
    match &node.kind {
        Kind::Record(r) => r.fields.iter().any(|f| f.protect.is_some() || protects(&f.node)),
        Kind::Array(inner) | Kind::Map(inner) => protects(inner),
        _ => false,
    }
}

/// `s` cut to at most `max` characters, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// The element type under arrays and maps.
fn leaf_kind(node: &Node) -> &Kind {
    match &node.kind {
        Kind::Array(inner) | Kind::Map(inner) => leaf_kind(inner),
        k => k,
    }
}

#[cfg(test)]
mod tests {
    use super::short_eq;

    #[test]
    fn short_eq_is_byte_equality() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(short_eq(&a, &a.clone()));
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 1;
                assert!(!short_eq(&a, &b), "length {n}, differing at {at}");
            }
            assert!(!short_eq(&a, &a[..n.saturating_sub(1)]) || n == 0);
        }
    }
}
