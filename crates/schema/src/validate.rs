//! Schema-driven JSON validation that decodes straight into a [`Tape`].
//!
//! A recursive descent over the compiled schema ([`Node`]) drives a small
//! JSON scanner (`scan.rs`): every value is checked against its schema type
//! as it is read and written into the tape in schema order. No
//! `serde_json::Value` is built, strings without escapes are read in place,
//! and the JSON path of a failure is assembled only when there is one. See
//! `docs/SCHEMAS.md` for the JSON→Avro rules.

use std::fmt;

use base64::Engine as _;
use watershed_event::{parse_rfc3339_micros, Reason};

use crate::literal::{fits_precision, is_uuid, parse_date, parse_decimal, plain_decimal};
use crate::node::{Kind, Node, Record};
use crate::scan::{Num, Peek, Scanner, SyntaxError};
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
    validate_json_append(node, json, unknown, limits, tape).map(|_| ())
}

/// Validate the payload that starts at byte `start` of `json` (inside a
/// larger document, such as an event envelope), so a caller can validate
/// a payload in the same pass that reads its envelope. The payload's
/// values are added to `tape` after the events already there, and its
/// root slot is returned with the offset just past it. A refused payload
/// leaves `tape` as it was, so one tape can collect a whole request's
/// valid events.
///
/// # Errors
/// A [`Violation`] as [`validate_json`] reports it, with paths relative to
/// the payload.
pub fn validate_append(
    node: &Node,
    json: &[u8],
    start: usize,
    unknown: UnknownFields,
    limits: Limits,
    tape: &mut Tape,
) -> Result<(Slot, usize), Violation> {
    append(node, json, start, false, unknown, limits, tape)
}

/// [`validate_json`] without clearing, as [`validate_append`] does: the
/// whole of `json` is the payload.
///
/// # Errors
/// A [`Violation`] as [`validate_json`] reports it.
pub fn validate_json_append(
    node: &Node,
    json: &[u8],
    unknown: UnknownFields,
    limits: Limits,
    tape: &mut Tape,
) -> Result<Slot, Violation> {
    if json.len() > limits.max_event_bytes {
        return Err(Violation::new(
            Reason::TooLarge,
            format!("payload is {} bytes; the limit is {}", json.len(), limits.max_event_bytes),
        ));
    }
    append(node, json, 0, true, unknown, limits, tape).map(|(root, _)| root)
}

/// Validate the value at `start` (followed only by whitespace, with
/// `whole`) and append it to `tape`; a refused value leaves the tape as it
/// was.
fn append(
    node: &Node,
    json: &[u8],
    start: usize,
    whole: bool,
    unknown: UnknownFields,
    limits: Limits,
    tape: &mut Tape,
) -> Result<(Slot, usize), Violation> {
    let mark = tape.mark();
    let mut ctx = Ctx::new(json, tape, unknown, limits);
    ctx.sc.pos = start;
    let read = ctx.value(node).and_then(|root| if whole { ctx.end().map(|()| root) } else { Ok(root) });
    match read {
        Ok(root) => Ok((root, ctx.sc.pos)),
        Err(()) => {
            let v = ctx.violation();
            tape.truncate(mark);
            Err(v)
        }
    }
}

/// Decode one JSON value of type `node` (a default value, say) into
/// `tape`, returning its slot. The tape is not cleared.
///
/// # Errors
/// A [`Violation`] when the value does not fit `node`.
pub fn decode_value(node: &Node, json: &[u8], tape: &mut Tape) -> Result<Slot, Violation> {
    let mut ctx = Ctx::new(json, tape, UnknownFields::Reject, Limits::default());
    match ctx.value(node).and_then(|slot| ctx.end().map(|()| slot)) {
        Ok(slot) => Ok(slot),
        Err(()) => Err(ctx.violation()),
    }
}

struct Failure {
    reason: Reason,
    detail: String,
    /// Path segments, innermost first (unused for malformed JSON).
    segments: Vec<Segment>,
}

enum Segment {
    Field(String),
    Index(usize),
}

/// The longest path a violation carries, in bytes: a path names the
/// event's own keys (an unknown field, a map key), which may be as long
/// as the event. A longer one is cut at a character boundary and ends
/// with `…`.
pub const MAX_PATH_BYTES: usize = 1024;

impl Failure {
    fn into_violation(self) -> Violation {
        let mut path = String::from("$");
        if self.reason != Reason::MalformedJson {
            for s in self.segments.iter().rev() {
                match s {
                    Segment::Field(f) => push_member(&mut path, f),
                    Segment::Index(i) => {
                        path.push('[');
                        path.push_str(&i.to_string());
                        path.push(']');
                    }
                }
            }
        }
        if path.len() > MAX_PATH_BYTES {
            let end = watershed_event::prefix_within(&path, MAX_PATH_BYTES - '…'.len_utf8()).len();
            path.truncate(end);
            path.push('…');
        }
        Violation { reason: self.reason, path, detail: self.detail }
    }
}

/// Append member `name` to a JSONPath (RFC 9535): `.name` when the name
/// is a shorthand name (a letter, `_` or non-ASCII, then those or
/// digits; every Avro field name is one), else `['name']` with `'`, `\`
/// and control characters escaped, so that a key such as `a.b` or `x]`
/// cannot be read as two steps.
pub fn push_member(path: &mut String, name: &str) {
    let first = |c: char| c.is_ascii_alphabetic() || c == '_' || !c.is_ascii();
    let shorthand = name.chars().next().is_some_and(first)
        && name.chars().all(|c| first(c) || c.is_ascii_digit())
        && !name.chars().any(char::is_control);
    if shorthand {
        path.push('.');
        path.push_str(name);
        return;
    }
    path.push_str("['");
    for c in name.chars() {
        match c {
            '\'' => path.push_str("\\'"),
            '\\' => path.push_str("\\\\"),
            c if c.is_control() => path.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => path.push(c),
        }
    }
    path.push_str("']");
}

/// Failures carry no data: the details are in [`Ctx::failure`].
type R<T> = Result<T, ()>;

struct Ctx<'a, 't> {
    sc: Scanner<'a>,
    tape: &'t mut Tape,
    unknown: UnknownFields,
    limits: Limits,
    depth: u32,
    failure: Option<Failure>,
    kbuf: Vec<u8>,
    vbuf: Vec<u8>,
}

impl<'a, 't> Ctx<'a, 't> {
    fn new(json: &'a [u8], tape: &'t mut Tape, unknown: UnknownFields, limits: Limits) -> Self {
        Self {
            sc: Scanner::new(json),
            tape,
            unknown,
            limits,
            depth: 0,
            failure: None,
            kbuf: Vec::new(),
            vbuf: Vec::new(),
        }
    }

    fn violation(&mut self) -> Violation {
        self.failure
            .take()
            .map_or_else(|| Violation::new(Reason::MalformedJson, "invalid JSON"), Failure::into_violation)
    }

    fn fail(&mut self, reason: Reason, detail: String) {
        self.failure = Some(Failure { reason, detail, segments: Vec::new() });
    }

    fn syntax(&mut self, e: SyntaxError) {
        self.fail(Reason::MalformedJson, format!("{} at byte {}", e.what, e.at));
    }

    fn mismatch(&mut self, node: &Node, got: &str) {
        let nullable = if node.nullable { " or null" } else { "" };
        self.fail(Reason::TypeMismatch, format!("expected {}{nullable}, got {got}", node.kind.name()));
    }

    fn at(&mut self, seg: impl FnOnce() -> Segment) {
        if let Some(f) = self.failure.as_mut() {
            f.segments.push(seg());
        }
    }

    fn end(&mut self) -> R<()> {
        self.sc.end().map_err(|e| self.syntax(e))
    }

    fn enter(&mut self) -> R<()> {
        self.depth += 1;
        if self.depth > self.limits.max_depth {
            let d = self.limits.max_depth;
            self.fail(Reason::TooDeep, format!("nesting deeper than {d}"));
            return Err(());
        }
        Ok(())
    }

    fn value(&mut self, node: &Node) -> R<Slot> {
        let peek = self.sc.peek().map_err(|e| self.syntax(e))?;
        match peek {
            Peek::Null => {
                self.sc.literal(b"null").map_err(|e| self.syntax(e))?;
                if node.nullable || node.kind == Kind::Null {
                    Ok(Slot::Null)
                } else {
                    self.mismatch(node, "null");
                    Err(())
                }
            }
            Peek::True | Peek::False => {
                let v = peek == Peek::True;
                self.sc.literal(if v { b"true" } else { b"false" }).map_err(|e| self.syntax(e))?;
                if node.kind == Kind::Boolean {
                    Ok(Slot::Bool(v))
                } else {
                    self.mismatch(node, "boolean");
                    Err(())
                }
            }
            Peek::Number => match self.sc.number().map_err(|e| self.syntax(e))? {
                Num::Int(v) => integer(node, self, i128::from(v)),
                Num::Float { value, text } => float(node, self, value, text),
            },
            Peek::String => {
                let mut buf = std::mem::take(&mut self.vbuf);
                let r = match self.sc.bytes(&mut buf) {
                    Ok(s) => string(node, self, s),
                    Err(e) => {
                        self.syntax(e);
                        Err(())
                    }
                };
                self.vbuf = buf;
                r
            }
            Peek::Array => match &node.kind {
                Kind::Array(item) => self.array(item),
                _ => {
                    self.mismatch(node, "array");
                    Err(())
                }
            },
            Peek::Object => match &node.kind {
                Kind::Record(r) => self.record(r),
                Kind::Map(v) => self.map(v),
                _ => {
                    self.mismatch(node, "object");
                    Err(())
                }
            },
        }
    }

    fn array(&mut self, item: &Node) -> R<Slot> {
        self.enter()?;
        self.sc.pos += 1;
        let mark = self.tape.pending.len();
        if !self.sc.eat(b']') {
            let mut i = 0usize;
            loop {
                match self.value(item) {
                    Ok(slot) => self.tape.pending.push(slot),
                    Err(()) => {
                        self.at(|| Segment::Index(i));
                        return Err(());
                    }
                }
                i += 1;
                if !self.sc.next_or_close(b']').map_err(|e| self.syntax(e))? {
                    break;
                }
            }
        }
        self.depth -= 1;
        let (start, len) = self.tape.seal_pending(mark);
        Ok(Slot::List { start, len })
    }

    fn map(&mut self, value: &Node) -> R<Slot> {
        self.enter()?;
        self.sc.pos += 1;
        let mark = self.tape.pending.len();
        if !self.sc.eat(b'}') {
            loop {
                let mut kb = std::mem::take(&mut self.kbuf);
                let k = match self.sc.key(&mut kb) {
                    Ok(key) => self.tape.push_utf8(key),
                    Err(e) => {
                        self.syntax(e);
                        return Err(());
                    }
                };
                self.kbuf = kb;
                match self.value(value) {
                    Ok(v) => {
                        self.tape.pending.push(k);
                        self.tape.pending.push(v);
                    }
                    Err(()) => {
                        let name = self.tape.str(k).to_owned();
                        self.at(|| Segment::Field(name));
                        return Err(());
                    }
                }
                if !self.sc.next_or_close(b'}').map_err(|e| self.syntax(e))? {
                    break;
                }
            }
        }
        // A key given twice would make a Parquet map that DuckDB refuses
        // to read ("Map keys must be unique"): the whole file, for one
        // event. Refused as a record's repeated field is.
        if let Some(key) = self.tape.repeated_key(mark) {
            let name = self.tape.str(key).to_owned();
            self.fail(Reason::DuplicateField, "key appears twice in one map".into());
            self.at(|| Segment::Field(name));
            return Err(());
        }
        self.depth -= 1;
        let (start, len) = self.tape.seal_pending(mark);
        Ok(Slot::Map { start, len: len / 2 })
    }

    fn record(&mut self, r: &Record) -> R<Slot> {
        self.enter()?;
        self.sc.pos += 1;
        let start = self.tape.reserve_record(r.fields.len());
        let mut hint = 0;
        if !self.sc.eat(b'}') {
            loop {
                // Producers usually write fields in schema order: the
                // expected key is matched in place before any scanning.
                let found = if r.fields.get(hint).is_some_and(|f| self.sc.key_eq(f.name.as_bytes())) {
                    Ok(hint)
                } else {
                    let mut kb = std::mem::take(&mut self.kbuf);
                    let found = match self.sc.key(&mut kb) {
                        Ok(key) => {
                            r.index_of(key, hint).ok_or_else(|| String::from_utf8_lossy(key).into_owned())
                        }
                        Err(e) => {
                            self.syntax(e);
                            return Err(());
                        }
                    };
                    self.kbuf = kb;
                    found
                };
                match found {
                    Err(name) => {
                        if self.unknown == UnknownFields::Drop {
                            let depth = self.limits.max_depth.saturating_sub(self.depth);
                            let mut vb = std::mem::take(&mut self.vbuf);
                            let skipped = self.sc.skip(depth.max(1), &mut vb);
                            self.vbuf = vb;
                            skipped.map_err(|e| self.syntax(e))?;
                        } else {
                            self.fail(Reason::UnknownField, format!("field is not in {}", r.name));
                            self.at(|| Segment::Field(name));
                            return Err(());
                        }
                    }
                    Ok(i) => {
                        hint = i + 1;
                        let field = &r.fields[i];
                        let slot_index = start as usize + i;
                        if self.tape.slots[slot_index] != Slot::Unset {
                            self.fail(Reason::DuplicateField, "field appears twice in one object".into());
                            self.at(|| Segment::Field(field.name.clone()));
                            return Err(());
                        }
                        match self.value(&field.node) {
                            Ok(slot) => self.tape.slots[slot_index] = slot,
                            Err(()) => {
                                self.at(|| Segment::Field(field.name.clone()));
                                return Err(());
                            }
                        }
                    }
                }
                if !self.sc.next_or_close(b'}').map_err(|e| self.syntax(e))? {
                    break;
                }
            }
        }
        for (i, field) in r.fields.iter().enumerate() {
            let slot_index = start as usize + i;
            if self.tape.slots[slot_index] != Slot::Unset {
                continue;
            }
            let slot = match (&field.default, &field.default_json) {
                (Some(serde_json::Value::Null) | None, _) if field.node.nullable => Slot::Null,
                (_, Some(json)) => {
                    let mut sub =
                        Ctx::new(json.as_bytes(), &mut *self.tape, UnknownFields::Reject, self.limits);
                    match sub.value(&field.node) {
                        Ok(slot) => slot,
                        Err(()) => {
                            let what = field.node.kind.name();
                            self.fail(
                                Reason::TypeMismatch,
                                format!("the schema default for this field does not fit {what}"),
                            );
                            self.at(|| Segment::Field(field.name.clone()));
                            return Err(());
                        }
                    }
                }
                _ => {
                    let what = field.node.kind.name();
                    self.fail(Reason::MissingField, format!("required {what} field is absent"));
                    self.at(|| Segment::Field(field.name.clone()));
                    return Err(());
                }
            };
            self.tape.slots[slot_index] = slot;
        }
        self.depth -= 1;
        Ok(Slot::Record(start))
    }
}

fn float(node: &Node, ctx: &mut Ctx<'_, '_>, v: f64, text: &str) -> R<Slot> {
    match node.kind {
        // `1e400` parses as infinity: refused, never stored as one.
        Kind::Double if v.is_finite() => Ok(Slot::Double(v)),
        Kind::Double => {
            ctx.fail(Reason::OutOfRange, "the number does not fit a double".into());
            Err(())
        }
        #[allow(clippy::cast_possible_truncation)]
        Kind::Float => {
            let f = v as f32;
            if f.is_finite() {
                Ok(Slot::Float(f))
            } else {
                ctx.fail(Reason::OutOfRange, "the number does not fit a float".into());
                Err(())
            }
        }
        Kind::Decimal { precision, scale } => decimal(ctx, text, precision, scale),
        Kind::Int
        | Kind::Long
        | Kind::Date
        | Kind::TimeMillis
        | Kind::TimeMicros
        | Kind::TimestampMillis
        | Kind::TimestampMicros => {
            if !text.contains(['.', 'e', 'E']) {
                ctx.fail(Reason::OutOfRange, format!("the number does not fit {}", node.kind.name()));
                return Err(());
            }
            let what = node.kind.name();
            if v.is_finite() && v.fract() != 0.0 {
                ctx.fail(Reason::TypeMismatch, format!("expected {what}, got a number with a fraction"));
                return Err(());
            }
            // Integral, written with a point or an exponent: exact below
            // 2^53. Above, one beyond the type (or beyond f64: `1e400`
            // saturates) does not fit; one within it would be rounded.
            #[allow(clippy::cast_possible_truncation)]
            let slot = integer(node, ctx, v as i128)?;
            if v.abs() < 9.007_199_254_740_992e15 {
                Ok(slot)
            } else {
                ctx.fail(
                    Reason::OutOfRange,
                    format!(
                        "{text} is beyond 2^53, where a number with a point or an exponent is not exact; \
                         write {what} values this large as plain integers"
                    ),
                );
                Err(())
            }
        }
        _ => {
            ctx.mismatch(node, "number");
            Err(())
        }
    }
}

fn integer(node: &Node, ctx: &mut Ctx<'_, '_>, v: i128) -> R<Slot> {
    let range = |lo: i128, hi: i128, what: &str, ctx: &mut Ctx<'_, '_>| -> R<i128> {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            ctx.fail(Reason::OutOfRange, format!("the number does not fit {what}"));
            Err(())
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
                Some(u) if fits_precision(u, *precision) => Ok(ctx.tape.push_decimal(u)),
                _ => {
                    ctx.fail(
                        Reason::OutOfRange,
                        format!("the number does not fit decimal({precision},{scale})"),
                    );
                    Err(())
                }
            }
        }
        _ => {
            ctx.mismatch(node, "number");
            Err(())
        }
    }
}

/// Record `reason` and `detail` as the failure.
fn fail(ctx: &mut Ctx<'_, '_>, reason: Reason, detail: &str) -> R<Slot> {
    ctx.fail(reason, detail.to_owned());
    Err(())
}

/// A JSON string (as checked UTF-8 bytes) for `node`.
fn string(node: &Node, ctx: &mut Ctx<'_, '_>, b: &[u8]) -> R<Slot> {
    match &node.kind {
        Kind::String => return Ok(ctx.tape.push_utf8(b)),
        Kind::Enum { symbols, .. } => {
            return match symbols.iter().position(|s| crate::node::short_eq(s.as_bytes(), b)) {
                #[allow(clippy::cast_possible_truncation)]
                Some(i) => Ok(Slot::Enum(i as u32)),
                None => {
                    let detail = format!("the value is not one of {}", symbols.join(", "));
                    fail(ctx, Reason::BadEnum, &detail)
                }
            };
        }
        _ => {}
    }
    // Uuids, timestamps, dates and plain decimals are ASCII shapes read as
    // bytes; the rest need the text.
    match &node.kind {
        Kind::Uuid => {
            if is_uuid(b) {
                Ok(ctx.tape.push_utf8(b))
            } else {
                fail(ctx, Reason::BadUuid, "expected a uuid like 123e4567-e89b-12d3-a456-426614174000")
            }
        }
        Kind::TimestampMillis | Kind::TimestampMicros => match parse_rfc3339_micros(b) {
            Some(us) if node.kind == Kind::TimestampMicros => Ok(Slot::Long(us)),
            Some(us) => Ok(Slot::Long(us.div_euclid(1000))),
            None => {
                fail(ctx, Reason::BadTimestamp, "expected an RFC 3339 timestamp like 2024-05-01T12:00:00Z")
            }
        },
        Kind::Date => match parse_date(b) {
            Some(days) => Ok(Slot::Int(days)),
            None => fail(ctx, Reason::BadDate, "expected a date like 2024-05-01"),
        },
        Kind::Decimal { precision, scale } => match plain_decimal(b, *scale) {
            Some(u) => unscaled(ctx, u, *precision, *scale),
            None => text(node, ctx, std::str::from_utf8(b).unwrap_or_default()),
        },
        _ => text(node, ctx, std::str::from_utf8(b).unwrap_or_default()),
    }
}

/// The rest of [`string`]: JSON strings read as text.
fn text(node: &Node, ctx: &mut Ctx<'_, '_>, v: &str) -> R<Slot> {
    match &node.kind {
        Kind::TimeMillis | Kind::TimeMicros => match chrono::NaiveTime::parse_from_str(v, "%H:%M:%S%.f") {
            Ok(t) => {
                let us = (t - chrono::NaiveTime::MIN).num_microseconds().unwrap_or(0);
                #[allow(clippy::cast_possible_truncation)]
                Ok(if node.kind == Kind::TimeMillis { Slot::Int((us / 1000) as i32) } else { Slot::Long(us) })
            }
            Err(_) => fail(ctx, Reason::BadTimestamp, "expected a time of day like 13:45:00.250"),
        },
        Kind::Bytes | Kind::Fixed { .. } => match base64::engine::general_purpose::STANDARD.decode(v) {
            Ok(b) => match node.kind {
                Kind::Fixed { size } if b.len() != size => {
                    let detail = format!("expected {size} bytes, got {}", b.len());
                    fail(ctx, Reason::BadBytes, &detail)
                }
                _ => Ok(ctx.tape.push_bytes(&b)),
            },
            Err(_) => fail(ctx, Reason::BadBytes, "expected base64 (RFC 4648, with padding)"),
        },
        Kind::Decimal { precision, scale } => decimal(ctx, v, *precision, *scale),
        _ => {
            ctx.mismatch(node, "string");
            Err(())
        }
    }
}

/// Parse a decimal literal exactly into an unscaled value at `scale`. More
/// fraction digits than `scale` is an error, never a silent rounding.
fn decimal(ctx: &mut Ctx<'_, '_>, text: &str, precision: u8, scale: u8) -> R<Slot> {
    match parse_decimal(text, scale) {
        Some(u) => unscaled(ctx, u, precision, scale),
        None => {
            ctx.fail(
                Reason::BadDecimal,
                format!("expected a decimal number with at most {scale} digits after the point"),
            );
            Err(())
        }
    }
}

/// A decimal's unscaled value `u`, if it fits.
fn unscaled(ctx: &mut Ctx<'_, '_>, u: i128, precision: u8, scale: u8) -> R<Slot> {
    if fits_precision(u, precision) {
        Ok(ctx.tape.push_decimal(u))
    } else {
        ctx.fail(Reason::OutOfRange, format!("the number does not fit decimal({precision},{scale})"));
        Err(())
    }
}
