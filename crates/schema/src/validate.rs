//! Schema-driven JSON validation that decodes straight into a [`Tape`].
//!
//! The validator drives `serde_json`'s streaming parser with the compiled
//! schema ([`Node`]) as a `DeserializeSeed`: every JSON value is checked
//! against its schema type as it is read and written into the tape in
//! schema order. No `serde_json::Value` is built, strings without escapes
//! are read in place, and the JSON path of a failure is assembled only when
//! there is a failure. See `docs/SCHEMAS.md` for the JSON→Avro rules.

use std::fmt;

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use watershed_event::{parse_rfc3339_micros, Reason};

use crate::node::{Kind, Node, Record};
use crate::subject::UnknownFields;
use crate::tape::{Slot, Tape};

/// Limits applied while validating one event.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted event, in bytes of JSON.
    pub max_event_bytes: usize,
    /// Deepest accepted nesting of records, arrays and maps.
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_event_bytes: 1024 * 1024, max_depth: 64 }
    }
}

/// Why one event was rejected: a reason code, the JSON path of the
/// offending value (such as `$.customer.cards[1]`) and a human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The stable reason code.
    pub reason: Reason,
    /// JSONPath of the offending value, `$` for the whole payload.
    pub path: String,
    /// What was wrong, in words. Never contains the offending value of a
    /// field (it may be a protected one).
    pub detail: String,
}

impl Violation {
    /// A violation at the root.
    #[must_use]
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self { reason, path: "$".into(), detail: detail.into() }
    }

    /// The same violation under a path prefix, such as `$.detail`.
    #[must_use]
    pub fn under(mut self, prefix: &str) -> Self {
        self.path = format!("{prefix}{}", &self.path[1..]);
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}: {}", self.reason, self.path, self.detail)
    }
}

/// Validate one JSON payload against `node` (a record), writing the decoded
/// values into `tape` (which is cleared first).
///
/// # Errors
/// A [`Violation`] with the reason code and JSON path of the first problem.
pub fn validate_json(
    node: &Node,
    json: &[u8],
    unknown: UnknownFields,
    limits: Limits,
    tape: &mut Tape,
) -> Result<(), Violation> {
    tape.clear();
    if json.len() > limits.max_event_bytes {
        return Err(Violation::new(
            Reason::TooLarge,
            format!("payload is {} bytes; the limit is {}", json.len(), limits.max_event_bytes),
        ));
    }
    let mut ctx = Ctx { tape, unknown, limits, depth: 0, failure: None };
    let mut de = serde_json::Deserializer::from_slice(json);
    let result = Seed { node, ctx: &mut ctx }.deserialize(&mut de).and_then(|slot| {
        de.end()?;
        Ok(slot)
    });
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(match ctx.failure.take() {
            Some(f) => f.into_violation(),
            None => Violation::new(Reason::MalformedJson, e.to_string()),
        }),
    }
}

/// Decode one JSON value of type `node` (a default value, say) into
/// `tape`, returning its slot. The tape is not cleared.
///
/// # Errors
/// A [`Violation`] when the value does not fit `node`.
pub fn decode_value(node: &Node, json: &[u8], tape: &mut Tape) -> Result<Slot, Violation> {
    let mut ctx =
        Ctx { tape, unknown: UnknownFields::Reject, limits: Limits::default(), depth: 0, failure: None };
    let mut de = serde_json::Deserializer::from_slice(json);
    let result = Seed { node, ctx: &mut ctx }.deserialize(&mut de).and_then(|slot| {
        de.end()?;
        Ok(slot)
    });
    result.map_err(|e| match ctx.failure.take() {
        Some(f) => f.into_violation(),
        None => Violation::new(Reason::MalformedJson, e.to_string()),
    })
}

struct Failure {
    reason: Reason,
    detail: String,
    /// Path segments, innermost first.
    segments: Vec<Segment>,
}

enum Segment {
    Field(String),
    Index(usize),
}

impl Failure {
    fn into_violation(self) -> Violation {
        let mut path = String::from("$");
        for s in self.segments.iter().rev() {
            match s {
                Segment::Field(f) => {
                    path.push('.');
                    path.push_str(f);
                }
                Segment::Index(i) => {
                    path.push('[');
                    path.push_str(&i.to_string());
                    path.push(']');
                }
            }
        }
        Violation { reason: self.reason, path, detail: self.detail }
    }
}

struct Ctx<'t> {
    tape: &'t mut Tape,
    unknown: UnknownFields,
    limits: Limits,
    depth: u32,
    failure: Option<Failure>,
}

impl Ctx<'_> {
    fn fail<E: de::Error>(&mut self, reason: Reason, detail: String) -> E {
        self.failure = Some(Failure { reason, detail, segments: Vec::new() });
        E::custom(reason.as_str())
    }

    fn mismatch<E: de::Error>(&mut self, node: &Node, got: &str) -> E {
        let nullable = if node.nullable { " or null" } else { "" };
        self.fail(Reason::TypeMismatch, format!("expected {}{nullable}, got {got}", node.kind.name()))
    }

    fn at(&mut self, seg: impl FnOnce() -> Segment) {
        if let Some(f) = self.failure.as_mut() {
            f.segments.push(seg());
        }
    }

    fn enter<E: de::Error>(&mut self) -> Result<(), E> {
        self.depth += 1;
        if self.depth > self.limits.max_depth {
            return Err(self.fail(Reason::TooDeep, format!("nesting deeper than {}", self.limits.max_depth)));
        }
        Ok(())
    }
}

struct Seed<'n, 'c, 't> {
    node: &'n Node,
    ctx: &'c mut Ctx<'t>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_, '_, '_> {
    type Value = Slot;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Slot, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_, '_, '_> {
    type Value = Slot;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} value", self.node.kind.name())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Slot, E> {
        if self.node.nullable || self.node.kind == Kind::Null {
            Ok(Slot::Null)
        } else {
            Err(self.ctx.mismatch(self.node, "null"))
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<Slot, E> {
        self.visit_unit()
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Slot, E> {
        match self.node.kind {
            Kind::Boolean => Ok(Slot::Bool(v)),
            _ => Err(self.ctx.mismatch(self.node, "boolean")),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Slot, E> {
        integer(self.node, self.ctx, i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Slot, E> {
        integer(self.node, self.ctx, i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Slot, E> {
        let node = self.node;
        match node.kind {
            Kind::Double => Ok(Slot::Double(v)),
            #[allow(clippy::cast_possible_truncation)]
            Kind::Float => {
                let f = v as f32;
                if f.is_finite() {
                    Ok(Slot::Float(f))
                } else {
                    Err(self.ctx.fail(Reason::OutOfRange, format!("{v} does not fit a float")))
                }
            }
            Kind::Decimal { precision, scale } => {
                let text = v.to_string();
                decimal(self.ctx, &text, precision, scale)
            }
            Kind::Int
            | Kind::Long
            | Kind::Date
            | Kind::TimeMillis
            | Kind::TimeMicros
            | Kind::TimestampMillis
            | Kind::TimestampMicros =>
            {
                #[allow(clippy::cast_possible_truncation)]
                if v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 {
                    integer(node, self.ctx, v as i128)
                } else {
                    Err(self.ctx.fail(
                        Reason::TypeMismatch,
                        format!("expected {}, got a number with a fraction", node.kind.name()),
                    ))
                }
            }
            _ => Err(self.ctx.mismatch(node, "number")),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot, E> {
        string(self.node, self.ctx, v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot, E> {
        string(self.node, self.ctx, v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot, A::Error> {
        let Kind::Array(item) = &self.node.kind else {
            return Err(self.ctx.mismatch(self.node, "array"));
        };
        self.ctx.enter()?;
        let mark = self.ctx.tape.pending.len();
        let mut i = 0usize;
        loop {
            match seq.next_element_seed(Seed { node: item, ctx: self.ctx }) {
                Ok(Some(slot)) => self.ctx.tape.pending.push(slot),
                Ok(None) => break,
                Err(e) => {
                    self.ctx.at(|| Segment::Index(i));
                    return Err(e);
                }
            }
            i += 1;
        }
        self.ctx.depth -= 1;
        let (start, len) = self.ctx.tape.seal_pending(mark);
        Ok(Slot::List { start, len })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Slot, A::Error> {
        match &self.node.kind {
            Kind::Record(r) => record(r, self.ctx, map),
            Kind::Map(value) => json_map(value, self.ctx, map),
            _ => Err(self.ctx.mismatch(self.node, "object")),
        }
    }
}

fn record<'de, A: MapAccess<'de>>(r: &Record, ctx: &mut Ctx<'_>, mut map: A) -> Result<Slot, A::Error> {
    ctx.enter()?;
    let start = ctx.tape.reserve_record(r.fields.len());
    let mut hint = 0;
    while let Some(key) = map.next_key_seed(KeySeed)? {
        let name: &str = &key;
        let Some(i) = r.index_of(name, hint) else {
            if ctx.unknown == UnknownFields::Drop {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let e = ctx.fail(Reason::UnknownField, format!("field is not in {}", r.name));
            ctx.at(|| Segment::Field(name.to_owned()));
            return Err(e);
        };
        hint = i + 1;
        let field = &r.fields[i];
        let slot_index = start as usize + i;
        if ctx.tape.slots[slot_index] != Slot::Unset {
            let e = ctx.fail(Reason::DuplicateField, "field appears twice in one object".into());
            ctx.at(|| Segment::Field(field.name.clone()));
            return Err(e);
        }
        match map.next_value_seed(Seed { node: &field.node, ctx }) {
            Ok(slot) => ctx.tape.slots[slot_index] = slot,
            Err(e) => {
                ctx.at(|| Segment::Field(field.name.clone()));
                return Err(e);
            }
        }
    }
    for (i, field) in r.fields.iter().enumerate() {
        let slot_index = start as usize + i;
        if ctx.tape.slots[slot_index] != Slot::Unset {
            continue;
        }
        let slot = match &field.default {
            Some(serde_json::Value::Null) | None if field.node.nullable => Slot::Null,
            Some(default) => match (Seed { node: &field.node, ctx: &mut *ctx }).deserialize(default) {
                Ok(slot) => slot,
                Err(_) => {
                    let e = ctx.fail(
                        Reason::TypeMismatch,
                        format!("the schema default for this field does not fit {}", field.node.kind.name()),
                    );
                    ctx.at(|| Segment::Field(field.name.clone()));
                    return Err(e);
                }
            },
            None => {
                let e = ctx.fail(
                    Reason::MissingField,
                    format!("required {} field is absent", field.node.kind.name()),
                );
                ctx.at(|| Segment::Field(field.name.clone()));
                return Err(e);
            }
        };
        ctx.tape.slots[slot_index] = slot;
    }
    ctx.depth -= 1;
    Ok(Slot::Record(start))
}

fn json_map<'de, A: MapAccess<'de>>(value: &Node, ctx: &mut Ctx<'_>, mut map: A) -> Result<Slot, A::Error> {
    ctx.enter()?;
    let mark = ctx.tape.pending.len();
    while let Some(key) = map.next_key_seed(KeySeed)? {
        let k = ctx.tape.push_str(&key);
        match map.next_value_seed(Seed { node: value, ctx }) {
            Ok(v) => {
                ctx.tape.pending.push(k);
                ctx.tape.pending.push(v);
            }
            Err(e) => {
                ctx.at(|| Segment::Field(key.to_string()));
                return Err(e);
            }
        }
    }
    ctx.depth -= 1;
    let (start, len) = ctx.tape.seal_pending(mark);
    Ok(Slot::Map { start, len: len / 2 })
}

fn integer<E: de::Error>(node: &Node, ctx: &mut Ctx<'_>, v: i128) -> Result<Slot, E> {
    let range = |lo: i128, hi: i128, what: &str, ctx: &mut Ctx<'_>| -> Result<i128, E> {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ctx.fail(Reason::OutOfRange, format!("{v} does not fit {what}")))
        }
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    match &node.kind {
        Kind::Int => Ok(Slot::Int(range(i32::MIN.into(), i32::MAX.into(), "an int", ctx)? as i32)),
        Kind::Long => Ok(Slot::Long(range(i64::MIN.into(), i64::MAX.into(), "a long", ctx)? as i64)),
        Kind::Date => {
            Ok(Slot::Int(range(-3_652_424, 2_932_896, "a date (days since 1970-01-01)", ctx)? as i32))
        }
        Kind::TimeMillis => Ok(Slot::Int(range(0, 86_399_999, "a time of day in milliseconds", ctx)? as i32)),
        Kind::TimeMicros => {
            Ok(Slot::Long(range(0, 86_399_999_999, "a time of day in microseconds", ctx)? as i64))
        }
        Kind::TimestampMillis => {
            Ok(Slot::Long(
                range(-62_135_596_800_000, 253_402_300_799_999, "a timestamp in milliseconds", ctx)? as i64,
            ))
        }
        Kind::TimestampMicros => Ok(Slot::Long(range(
            -62_135_596_800_000_000,
            253_402_300_799_999_999,
            "a timestamp in microseconds",
            ctx,
        )? as i64)),
        Kind::Float => Ok(Slot::Float(v as f32)),
        Kind::Double => Ok(Slot::Double(v as f64)),
        Kind::Decimal { precision, scale } => {
            let unscaled = v.checked_mul(10i128.pow(u32::from(*scale)));
            match unscaled {
                Some(u) if digits(u) <= u32::from(*precision) => Ok(ctx.tape.push_decimal(u)),
                _ => {
                    Err(ctx
                        .fail(Reason::OutOfRange, format!("{v} does not fit decimal({precision},{scale})")))
                }
            }
        }
        _ => Err(ctx.mismatch(node, "number")),
    }
}

fn string<E: de::Error>(node: &Node, ctx: &mut Ctx<'_>, v: &str) -> Result<Slot, E> {
    match &node.kind {
        Kind::String => Ok(ctx.tape.push_str(v)),
        Kind::Uuid => {
            if is_uuid(v) {
                Ok(ctx.tape.push_str(v))
            } else {
                Err(ctx.fail(
                    Reason::BadUuid,
                    "expected a uuid like 123e4567-e89b-12d3-a456-426614174000".into(),
                ))
            }
        }
        Kind::Enum { symbols } => match symbols.iter().position(|s| s == v) {
            #[allow(clippy::cast_possible_truncation)]
            Some(i) => Ok(Slot::Enum(i as u32)),
            None => Err(ctx.fail(Reason::BadEnum, format!("{v:?} is not one of {}", symbols.join(", ")))),
        },
        Kind::TimestampMillis | Kind::TimestampMicros => match parse_rfc3339_micros(v) {
            Some(us) if node.kind == Kind::TimestampMicros => Ok(Slot::Long(us)),
            Some(us) => Ok(Slot::Long(us.div_euclid(1000))),
            None => Err(ctx.fail(
                Reason::BadTimestamp,
                "expected an RFC 3339 timestamp like 2024-05-01T12:00:00Z".into(),
            )),
        },
        Kind::Date => match chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d") {
            #[allow(clippy::cast_possible_truncation)]
            Ok(d) => Ok(Slot::Int((d - chrono::NaiveDate::default()).num_days() as i32)),
            Err(_) => Err(ctx.fail(Reason::BadDate, "expected a date like 2024-05-01".into())),
        },
        Kind::TimeMillis | Kind::TimeMicros => match chrono::NaiveTime::parse_from_str(v, "%H:%M:%S%.f") {
            Ok(t) => {
                let us = (t - chrono::NaiveTime::MIN).num_microseconds().unwrap_or(0);
                #[allow(clippy::cast_possible_truncation)]
                Ok(if node.kind == Kind::TimeMillis { Slot::Int((us / 1000) as i32) } else { Slot::Long(us) })
            }
            Err(_) => Err(ctx.fail(Reason::BadTimestamp, "expected a time of day like 13:45:00.250".into())),
        },
        Kind::Bytes | Kind::Fixed { .. } => match base64::engine::general_purpose::STANDARD.decode(v) {
            Ok(b) => match node.kind {
                Kind::Fixed { size } if b.len() != size => {
                    Err(ctx.fail(Reason::BadBytes, format!("expected {size} bytes, got {}", b.len())))
                }
                _ => Ok(ctx.tape.push_bytes(&b)),
            },
            Err(_) => Err(ctx.fail(Reason::BadBytes, "expected base64 (RFC 4648, with padding)".into())),
        },
        Kind::Decimal { precision, scale } => decimal(ctx, v, *precision, *scale),
        _ => Err(ctx.mismatch(node, "string")),
    }
}

/// Parse `-?digits(.digits)?([eE][+-]?digits)?` exactly into an unscaled
/// value at `scale`. More fraction digits than `scale` is an error, never a
/// silent rounding.
fn decimal<E: de::Error>(ctx: &mut Ctx<'_>, text: &str, precision: u8, scale: u8) -> Result<Slot, E> {
    match parse_decimal(text, scale) {
        Some(u) if digits(u) <= u32::from(precision) => Ok(ctx.tape.push_decimal(u)),
        Some(_) => {
            Err(ctx.fail(Reason::OutOfRange, format!("{text} does not fit decimal({precision},{scale})")))
        }
        None => Err(ctx.fail(
            Reason::BadDecimal,
            format!("expected a decimal number with at most {scale} digits after the point"),
        )),
    }
}

pub(crate) fn parse_decimal(text: &str, scale: u8) -> Option<i128> {
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (neg, m) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa),
    };
    let (int, frac) = m.split_once('.').unwrap_or((m, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    if m.contains('.') && frac.is_empty() {
        return None;
    }
    let mut value: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    // value * 10^(exp - frac.len()) expressed at `scale`.
    let shift = i64::from(scale) + i64::from(exp) - i64::try_from(frac.len()).ok()?;
    if shift >= 0 {
        value = value.checked_mul(10i128.checked_pow(u32::try_from(shift).ok()?)?)?;
    } else {
        let div = 10i128.checked_pow(u32::try_from(-shift).ok()?)?;
        if value % div != 0 {
            return None;
        }
        value /= div;
    }
    Some(if neg { -value } else { value })
}

fn digits(v: i128) -> u32 {
    let mut v = v.unsigned_abs();
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Map keys, borrowed from the input when they hold no escapes.
struct KeySeed;

enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl std::ops::Deref for Key<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Key<'de>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
        Ok(Key::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_decimal;

    #[test]
    fn decimals_parse_exactly() {
        assert_eq!(parse_decimal("12.34", 2), Some(1234));
        assert_eq!(parse_decimal("-0.5", 2), Some(-50));
        assert_eq!(parse_decimal("1e2", 0), Some(100));
        assert_eq!(parse_decimal("1.5e-1", 2), Some(15));
        assert_eq!(parse_decimal("1.234", 2), None, "no silent rounding");
        assert_eq!(parse_decimal("1.", 2), None);
        assert_eq!(parse_decimal("abc", 2), None);
        assert_eq!(parse_decimal("", 2), None);
    }
}
