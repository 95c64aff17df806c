//! Event envelopes: EventBridge events and CloudEvents structured JSON,
//! read without copying their strings. The payload (`detail` or `data`)
//! is kept as raw JSON for the schema validator.

use std::borrow::Cow;

use serde::Deserialize;
use watershed_event::Reason;
use watershed_schema::scan::{Num, Peek, Scanner, SyntaxError};
use watershed_schema::{SchemaVersion, Violation};

/// A decoded envelope.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// The event id.
    pub id: Cow<'a, str>,
    /// `source`.
    pub source: Cow<'a, str>,
    /// `detail-type` (EventBridge) or `type` (CloudEvents).
    pub detail_type: Cow<'a, str>,
    /// The account the event claims, if any.
    pub account: Option<Cow<'a, str>>,
    /// `time`, if given.
    pub time: Option<Cow<'a, str>>,
    /// `region` (EventBridge).
    pub region: Option<Cow<'a, str>>,
    /// `resources` (EventBridge).
    pub resources: Vec<Cow<'a, str>>,
    /// The payload JSON.
    pub payload: &'a [u8],
    /// Where the payload sits, for error paths: `$.detail` or `$.data`.
    pub payload_path: &'static str,
    /// The schema version the event names, if any.
    pub schema_version: Option<SchemaVersion>,
    /// What the payload was validated as while the envelope was read (the
    /// token `validate` returned), when it was.
    pub prevalidated: Option<Prevalidated>,
}

impl Envelope<'_> {
    /// The id, source and type, for the dead-letter row of an event
    /// refused after its envelope was read.
    #[must_use]
    pub fn partial(&self) -> Partial {
        Partial {
            id: Some(self.id.to_string()),
            source: Some(self.source.to_string()),
            detail_type: Some(self.detail_type.to_string()),
        }
    }
}

/// A caller's note of how a payload was validated in the envelope pass:
/// (subject index, schema version).
pub type Prevalidated = (usize, SchemaVersion);

/// Called when the envelope reader reaches the payload with the route
/// already known: `(source, detail_type, raw, start)`. It may validate the
/// payload in place and return the end offset and a token; `None` (or a
/// validation failure) means the payload is read later instead.
pub type Validate<'v> = dyn FnMut(&str, &str, &[u8], usize) -> Option<(usize, Prevalidated)> + 'v;

/// Best-effort id, source and type of an event that failed to decode,
/// for the dead-letter row.
#[derive(Debug, Default)]
pub struct Partial {
    /// The id, if readable and an id by [`decode`]'s rules (at most
    /// [`MAX_ID_BYTES`], not only whitespace, no control characters). It names the event in
    /// the response and its dead-letter row, and identifies a retried
    /// reject, so it is kept whole or not at all: an event whose id
    /// breaks the rules is known by its bytes instead, as one without an
    /// id is.
    pub id: Option<String>,
    /// The source, if readable.
    pub source: Option<String>,
    /// The type, if readable.
    pub detail_type: Option<String>,
}

#[derive(Default)]
struct Fields<'a> {
    id: Option<Cow<'a, str>>,
    source: Option<Cow<'a, str>>,
    detail_type: Option<Cow<'a, str>>,
    ce_type: Option<Cow<'a, str>>,
    specversion: bool,
    account: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    region: Option<Cow<'a, str>>,
    /// CloudEvents' `datacontenttype`.
    content_type: Option<Cow<'a, str>>,
    resources: Vec<Cow<'a, str>>,
    /// `resources` was given (an empty array leaves `resources` empty).
    has_resources: bool,
    detail: Option<&'a [u8]>,
    data: Option<&'a [u8]>,
    /// A CloudEvent's binary payload was sent (not read: payloads are JSON).
    data_base64: bool,
    version: Option<SchemaVersion>,
    /// Set when the payload was validated in the envelope pass, with the
    /// schema version then known.
    pre: Option<(Prevalidated, Option<SchemaVersion>, bool)>,
}

enum Bad {
    Syntax(SyntaxError),
    Field(&'static str, &'static str),
}

impl From<SyntaxError> for Bad {
    fn from(e: SyntaxError) -> Self {
        Bad::Syntax(e)
    }
}

/// Decode one event.
///
/// # Errors
/// `malformed_json` for invalid JSON, `bad_envelope` for JSON that is not
/// an EventBridge event or CloudEvent.
pub fn decode(raw: &[u8]) -> Result<Envelope<'_>, Violation> {
    decode_with(raw, &mut |_, _, _, _| None)
}

/// [`decode`], offering the payload to `validate` as soon as the route is
/// known (EventBridge puts `detail` last, after `source` and
/// `detail-type`), so the payload is read once.
///
/// # Errors
/// As [`decode`].
pub fn decode_with<'a>(raw: &'a [u8], validate: &mut Validate<'_>) -> Result<Envelope<'a>, Violation> {
    let f = match read(raw, validate) {
        Ok(f) => f,
        Err(Bad::Syntax(e)) => {
            return Err(Violation::new(Reason::MalformedJson, format!("{} at byte {}", e.what, e.at)));
        }
        Err(Bad::Field(field, what)) => {
            // Report bad JSON before a bad shape, as a parser would.
            let mut sc = Scanner::new(raw);
            if let Err(e) = sc.skip(128, &mut Vec::new()).and_then(|()| sc.end()) {
                return Err(Violation::new(Reason::MalformedJson, format!("{} at byte {}", e.what, e.at)));
            }
            let path = member_path(field);
            return Err(Violation {
                reason: Reason::BadEnvelope,
                path,
                detail: format!("not an event envelope: {what}"),
            });
        }
    };
    let missing = |f: &str| Violation {
        reason: Reason::BadEnvelope,
        path: member_path(f),
        detail: format!("{f} is required"),
    };
    let cloud = f.specversion;
    // CloudEvents' `type` and `data` without `specversion`.
    let looks_cloud = !cloud && (f.ce_type.is_some() || f.data.is_some());
    let (detail_type, payload, payload_path, dt_name, p_name) = if cloud {
        (f.ce_type, f.data, "$.data", "type", "data")
    } else {
        (f.detail_type, f.detail, "$.detail", "detail-type", "detail")
    };
    let id = f.id.filter(|s| !s.is_empty()).ok_or_else(|| missing("id"))?;
    check_id(&id)?;
    if let Some(ct) = f.content_type.as_deref().filter(|ct| cloud && !json_media_type(ct)) {
        return Err(Violation {
            reason: Reason::BadEnvelope,
            path: "$.datacontenttype".into(),
            detail: format!(
                "datacontenttype {ct:?} is not JSON: the payload is validated as JSON against the schema \
                 (send application/json, a +json type, or no datacontenttype)"
            ),
        });
    }
    // Valid only if it was the payload of this kind of envelope, under the
    // version the whole envelope names.
    let prevalidated = f.pre.and_then(|(token, version_then, was_data)| {
        (was_data == cloud && version_then == f.version).then_some(token)
    });
    Ok(Envelope {
        id,
        source: f.source.ok_or_else(|| missing("source"))?,
        detail_type: detail_type.ok_or_else(|| {
            let mut v = missing(dt_name);
            if looks_cloud {
                v.detail.push_str(
                    r#" (with "type" and "data", this reads as a CloudEvent: add "specversion": "1.0")"#,
                );
            }
            v
        })?,
        account: f.account,
        time: f.time,
        region: f.region,
        resources: f.resources,
        payload: payload.ok_or_else(|| match (cloud, f.data_base64) {
            (true, true) => Violation {
                reason: Reason::BadEnvelope,
                path: "$.data_base64".into(),
                detail: "a binary payload (data_base64) cannot be validated against the schema; send the \
                         payload as JSON in data"
                    .into(),
            },
            _ => missing(p_name),
        })?,
        payload_path,
        schema_version: f.version,
        prevalidated,
    })
}

/// Whether a CloudEvent's `datacontenttype` says its `data` is JSON
/// (CloudEvents' JSON format: `application/json` or any `+json` type;
/// `text/json` too), parameters such as `charset` aside, in any case
/// (compared in place: most CloudEvents producers set it on every event).
fn json_media_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim().as_bytes();
    essence.eq_ignore_ascii_case(b"application/json")
        || essence.eq_ignore_ascii_case(b"text/json")
        || essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
}

/// The longest event id accepted, in bytes of UTF-8. Ids are kept whole in
/// the write-ahead log's id files (the dedupe window) and in the lake; a
/// UUID is 36 bytes, a Kinesis shard and sequence number under 100.
pub const MAX_ID_BYTES: usize = 1024;

/// Refuse an id that is too long, that is only whitespace (a client's
/// blank id: every such event of the account would dedupe into the
/// first), or that holds a control character (U+0000 to U+001F, U+007F
/// to U+009F: the characters CloudEvents forbids in its strings; a
/// newline in an id breaks every log line and export that prints it).
fn check_id(id: &str) -> Result<(), Violation> {
    let bad = |detail: String| Violation { reason: Reason::BadEnvelope, path: "$.id".into(), detail };
    if id.len() > MAX_ID_BYTES {
        return Err(bad(format!("id is {} bytes long; at most {MAX_ID_BYTES} are accepted", id.len())));
    }
    if id.trim().is_empty() {
        return Err(bad(format!(
            "id is only whitespace ({} bytes): events are deduplicated by id, so every event with this \
             id would be taken for the first",
            id.len()
        )));
    }
    // Control characters are rare: one pass over the bytes finds whether
    // any (C0, DEL, or the lead byte of a C1) is there at all.
    if id.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
        if let Some((at, c)) = id.char_indices().find(|(_, c)| c.is_control()) {
            return Err(bad(format!(
                "id holds a control character (U+{:04X}) at byte {at}; ids are printable text",
                u32::from(c)
            )));
        }
    }
    Ok(())
}

/// The keys of an EventBridge event in the order EventBridge writes them.
const EVENTBRIDGE_ORDER: [&[u8]; 9] =
    [b"version", b"id", b"detail-type", b"source", b"account", b"time", b"region", b"resources", b"detail"];

/// Read the envelope's fields in one pass; the payload is located, not
/// parsed (the validator reads it with its schema).
fn read<'a>(raw: &'a [u8], validate: &mut Validate<'_>) -> Result<Fields<'a>, Bad> {
    // One UTF-8 pass over the whole event (fast over long runs) spares one
    // per envelope string; an event that fails it is checked string by
    // string, so the error names the place.
    let mut sc = std::str::from_utf8(raw).map_or_else(|_| Scanner::new(raw), Scanner::from_text);
    if sc.peek()? != Peek::Object {
        return Err(Bad::Field("", "expected a JSON object"));
    }
    sc.pos += 1;
    let mut f = Fields::default();
    let mut scratch = Vec::new();
    let mut key_scratch = Vec::new();
    let mut expect = 0;
    if sc.eat(b'}') {
        sc.end()?;
        return Ok(f);
    }
    loop {
        sc.ws();
        if sc.peek()? != Peek::String {
            return Err(Bad::Syntax(SyntaxError { what: "expected a string key", at: sc.pos }));
        }
        // EventBridge writes its keys in one order: the expected one is
        // matched in place. Others are read and compared as bytes (no
        // UTF-8 check for the known ones).
        let key: &[u8] = match EVENTBRIDGE_ORDER.get(expect) {
            Some(&k) if sc.key_eq(k) => {
                expect += 1;
                k
            }
            _ => {
                let key = sc.bytes(&mut key_scratch)?;
                if !sc.eat(b':') {
                    return Err(Bad::Syntax(SyntaxError { what: "expected ':'", at: sc.pos }));
                }
                expect = EVENTBRIDGE_ORDER.iter().position(|&k| k == key).map_or(usize::MAX, |i| i + 1);
                key
            }
        };
        let text_slot = match key {
            b"id" => Some(("id", &mut f.id)),
            b"source" => Some(("source", &mut f.source)),
            b"detail-type" => Some(("detail-type", &mut f.detail_type)),
            b"type" => Some(("type", &mut f.ce_type)),
            b"account" => Some(("account", &mut f.account)),
            b"time" => Some(("time", &mut f.time)),
            b"region" => Some(("region", &mut f.region)),
            b"datacontenttype" => Some(("datacontenttype", &mut f.content_type)),
            _ => None,
        };
        if let Some((name, slot)) = text_slot {
            if slot.is_some() {
                return Err(Bad::Field(name, "the field appears twice"));
            }
            if sc.peek()? != Peek::String {
                if !unset(&mut sc)? {
                    return Err(Bad::Field(name, "must be a string"));
                }
            } else {
                *slot = Some(sc.cow()?);
            }
            if !sc.next_or_close(b'}')? {
                break;
            }
            continue;
        }
        match key {
            b"specversion" if unset(&mut sc)? => {}
            b"specversion" => {
                if f.specversion {
                    return Err(Bad::Field("specversion", "the field appears twice"));
                }
                if sc.peek()? != Peek::String {
                    return Err(Bad::Field("specversion", "must be a string"));
                }
                // CloudEvents 1.0 (every 1.0.x) names itself "1.0"; 0.3's
                // attributes differ (`datacontentencoding`, `schemaurl`).
                if sc.cow()? != "1.0" {
                    return Err(Bad::Field(
                        "specversion",
                        "only CloudEvents 1.0 is accepted: \"specversion\": \"1.0\"",
                    ));
                }
                f.specversion = true;
            }
            b"resources" if unset(&mut sc)? => {}
            b"resources" => {
                if std::mem::replace(&mut f.has_resources, true) {
                    return Err(Bad::Field("resources", "the field appears twice"));
                }
                if sc.peek()? != Peek::Array {
                    return Err(Bad::Field("resources", "must be an array of strings"));
                }
                sc.pos += 1;
                if !sc.eat(b']') {
                    loop {
                        if sc.peek()? != Peek::String {
                            return Err(Bad::Field("resources", "must be an array of strings"));
                        }
                        f.resources.push(sc.cow()?);
                        if !sc.next_or_close(b']')? {
                            break;
                        }
                    }
                }
            }
            b"detail" | b"data" => {
                sc.ws();
                let start = sc.pos;
                let is_data = key == b"data";
                let dt = if is_data { f.ce_type.as_deref() } else { f.detail_type.as_deref() };
                let inline = match (f.source.as_deref(), dt) {
                    (Some(source), Some(dt)) if f.pre.is_none() => validate(source, dt, raw, start),
                    _ => None,
                };
                match inline {
                    Some((end, token)) => {
                        sc.pos = end;
                        f.pre = Some((token, f.version, is_data));
                    }
                    None => sc.skip(128, &mut scratch)?,
                }
                let value = &raw[start..sc.pos];
                let slot = if is_data { &mut f.data } else { &mut f.detail };
                if slot.replace(value).is_some() {
                    return Err(Bad::Field(
                        if is_data { "data" } else { "detail" },
                        "the field appears twice",
                    ));
                }
            }
            b"schema-version" | b"schemaversion" if unset(&mut sc)? => {}
            b"schema-version" | b"schemaversion" => {
                let name = if key == b"schema-version" { "schema-version" } else { "schemaversion" };
                if f.version.is_some() {
                    return Err(Bad::Field(name, "the field appears twice (or both spellings are given)"));
                }
                let ok = sc.peek()? == Peek::Number;
                let v = if ok { sc.number()? } else { Num::Int(-1) };
                match v {
                    Num::Int(n) if (1..=i64::from(u32::MAX)).contains(&n) && ok => {
                        f.version = Some(u32::try_from(n).unwrap_or(u32::MAX));
                    }
                    _ => return Err(Bad::Field(name, "must be a positive integer")),
                }
            }
            _ => {
                f.data_base64 |= key == b"data_base64";
                sc.skip(128, &mut scratch)?;
            }
        }
        if !sc.next_or_close(b'}')? {
            break;
        }
    }
    sc.end()?;
    Ok(f)
}

/// Consume a `null` attribute value, which leaves the attribute unset
/// (CloudEvents' JSON format: "When decoding attributes and a null value
/// is encountered, it MUST be treated as the equivalent of unset or
/// omitted"; producers that serialise absent fields as `null` send
/// EventBridge envelopes the same way). Not for payloads: `"data": null`
/// is a null payload.
fn unset(sc: &mut Scanner<'_>) -> Result<bool, Bad> {
    if sc.peek()? == Peek::Null {
        sc.literal(b"null")?;
        Ok(true)
    } else {
        Ok(false)
    }
}

/// Pull what can be read from an event that failed to decode.
#[must_use]
pub fn partial(raw: &[u8]) -> Partial {
    #[derive(Deserialize)]
    struct P {
        id: Option<serde_json::Value>,
        source: Option<serde_json::Value>,
        #[serde(rename = "detail-type")]
        detail_type: Option<serde_json::Value>,
        #[serde(rename = "type")]
        ce_type: Option<serde_json::Value>,
    }
    let s = |v: Option<serde_json::Value>| v.and_then(|v| v.as_str().map(|s| s.chars().take(256).collect()));
    let id = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(id)) if !id.is_empty() && check_id(&id).is_ok() => Some(id),
        _ => None,
    };
    match serde_json::from_slice::<P>(raw) {
        Ok(p) => Partial { id: id(p.id), source: s(p.source), detail_type: s(p.detail_type.or(p.ce_type)) },
        Err(_) => Partial::default(),
    }
}

/// The data subject of a refused event, as far as it can be read: the
/// value at the first of the dotted `paths` found under the payload
/// (`data` for a CloudEvent, else `detail`), taken as protection takes it
/// (a string, or an integer in decimal; an empty string names no one).
#[must_use]
pub fn raw_subject(raw: &[u8], paths: &[&str]) -> Option<String> {
    use serde_json::Value;
    if paths.is_empty() {
        return None;
    }
    let event: Value = serde_json::from_slice(raw).ok()?;
    let payload = if event.get("specversion").is_some() { event.get("data") } else { event.get("detail") }?;
    paths.iter().find_map(|path| {
        let value = path.split('.').try_fold(payload, |v, name| v.get(name))?;
        match value {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => n.as_i64().map(|n| n.to_string()),
            _ => None,
        }
    })
}

/// The JSONPath (RFC 9535) of the envelope's member `name` (`$` for the
/// envelope itself): `$.id`, `$['detail-type']`.
fn member_path(name: &str) -> String {
    let mut path = "$".to_owned();
    if !name.is_empty() {
        watershed_schema::push_member(&mut path, name);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_of_refused_events() {
        let eb = br#"{"source":"s","detail":{"customer":{"id":"alice"},"n":7,"f":1.5},"data":{"customer":{"id":"no"}}}"#;
        assert_eq!(raw_subject(eb, &["customer.id"]).as_deref(), Some("alice"));
        assert_eq!(raw_subject(eb, &["missing", "n"]).as_deref(), Some("7"), "first path found");
        assert_eq!(raw_subject(eb, &["f"]), None, "only strings and integers name subjects");
        assert_eq!(raw_subject(eb, &["customer"]), None);
        assert_eq!(raw_subject(eb, &[]), None);
        let ce = br#"{"specversion":"1.0","detail":{"id":"no"},"data":{"id":"bob"}}"#;
        assert_eq!(raw_subject(ce, &["id"]).as_deref(), Some("bob"), "a CloudEvent's payload is data");
        assert_eq!(raw_subject(b"{\"detail\":{\"id\":\"x\"", &["id"]), None, "malformed");
        assert_eq!(raw_subject(br#"{"detail":{"id":null}}"#, &["id"]), None);
        assert_eq!(raw_subject(br#"{"detail":{"id":""}}"#, &["id"]), None, "an empty id names no one");
    }

    #[test]
    fn ids_are_bounded_printable_text() {
        let with_id = |id: &str| format!(r#"{{"id":{id},"source":"s","detail-type":"T","detail":{{}}}}"#);
        let refused = |id: &str| {
            let v = decode(with_id(id).as_bytes()).unwrap_err();
            assert_eq!((v.reason, v.path.as_str()), (Reason::BadEnvelope, "$.id"), "{id}");
            v.detail
        };
        let longest = format!("\"{}\"", "é".repeat(MAX_ID_BYTES / 2));
        assert_eq!(decode(with_id(&longest).as_bytes()).unwrap().id.len(), MAX_ID_BYTES);
        assert_eq!(
            refused(&format!("\"{}\"", "x".repeat(5000))),
            "id is 5000 bytes long; at most 1024 are accepted"
        );
        assert_eq!(
            refused(r#""order\n42""#),
            "id holds a control character (U+000A) at byte 5; ids are printable text"
        );
        assert!(refused(r#""\u0000""#).contains("(U+0000) at byte 0"));
        assert!(refused("\"a\u{7f}\"").contains("(U+007F)"));
        assert!(refused("\"a\u{85}b\"").contains("(U+0085) at byte 1"), "a C1 control, unescaped");
        assert!(refused(r#""   ""#).starts_with("id is only whitespace (3 bytes)"));
        assert!(
            refused("\"\u{3000}\u{a0}\"").starts_with("id is only whitespace (5 bytes)"),
            "Unicode spaces"
        );
        // Other text, including what shares a C1 control's lead byte, is fine.
        let id = |id: &str| decode(with_id(id).as_bytes()).map(|e| e.id.into_owned());
        assert_eq!(id("\"caf\u{e9} \u{a0}\u{bf}\"").unwrap(), "caf\u{e9} \u{a0}\u{bf}");
        assert_eq!(id(r#""caf\u00e9""#).unwrap(), "caf\u{e9}");
    }

    /// A CloudEvent whose `datacontenttype` is not JSON is refused by that
    /// attribute, not as a payload of the wrong type; JSON types (with
    /// parameters, in any case) and no type are read.
    #[test]
    fn a_cloudevents_data_must_be_json() {
        let ce = |ct: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"1","type":"T","source":"s","datacontenttype":{ct},"data":{{}}}}"#
            )
        };
        for ok in [
            r#""application/json""#,
            r#""Application/JSON; charset=utf-8""#,
            r#""application/vnd.x+json""#,
            "null",
        ] {
            assert!(decode(ce(ok).as_bytes()).is_ok(), "{ok}");
        }
        let v = decode(ce(r#""text/plain""#).as_bytes()).unwrap_err();
        assert_eq!((v.reason, v.path.as_str()), (Reason::BadEnvelope, "$.datacontenttype"));
        assert!(v.detail.starts_with(r#"datacontenttype "text/plain" is not JSON"#), "{}", v.detail);
        assert_eq!(decode(ce("1").as_bytes()).unwrap_err().path, "$.datacontenttype");
        // An EventBridge event has no such attribute: a string there is ignored.
        let eb = br#"{"id":"1","source":"s","detail-type":"T","datacontenttype":"text/plain","detail":{}}"#;
        assert!(decode(eb).is_ok());
    }

    #[test]
    fn eventbridge_and_cloudevents() {
        let eb = br#"{"version":"0","id":"1","detail-type":"T","source":"s","account":"123","time":"2024-05-01T00:00:00Z","region":"eu-west-1","resources":["arn:x"],"detail":{"a":1}}"#;
        let e = decode(eb).unwrap();
        assert_eq!(
            (&*e.id, &*e.detail_type, e.payload, e.resources.len()),
            ("1", "T", &br#"{"a":1}"#[..], 1)
        );
        let ce =
            br#"{"specversion":"1.0","id":"2","type":"T","source":"s","data":{"b":2},"schemaversion":1}"#;
        let e = decode(ce).unwrap();
        assert_eq!((&*e.id, e.payload_path, e.schema_version), ("2", "$.data", Some(1)));
        let binary =
            br#"{"specversion":"1.0","id":"3","type":"T","source":"s","data_base64":"eyJiIjoyfQ=="}"#;
        let v = decode(binary).unwrap_err();
        assert_eq!((v.reason, v.path.as_str()), (Reason::BadEnvelope, "$.data_base64"));
        assert!(v.detail.contains("send the payload as JSON in data"), "{}", v.detail);
        let v = decode(br#"{"specversion":"1.0","id":"4","type":"T","source":"s"}"#).unwrap_err();
        assert_eq!((v.path.as_str(), v.detail.as_str()), ("$.data", "data is required"));
        assert_eq!(decode(b"[1]").unwrap_err().reason, Reason::BadEnvelope);
        assert_eq!(decode(b"{\"id\":").unwrap_err().reason, Reason::MalformedJson);
        let v = decode(br#"{"id":"1","source":"s","detail":{}}"#).unwrap_err();
        assert_eq!((v.path.as_str(), v.detail.as_str()), ("$['detail-type']", "detail-type is required"));
        // Another CloudEvents version is refused by name.
        for version in ["0.3", "1", "1.0.2", ""] {
            let raw =
                format!(r#"{{"specversion":"{version}","id":"5","type":"T","source":"s","data":{{}}}}"#);
            let v = decode(raw.as_bytes()).unwrap_err();
            assert_eq!((v.reason, v.path.as_str()), (Reason::BadEnvelope, "$.specversion"), "{version}");
            assert!(
                v.detail.contains(r#"only CloudEvents 1.0 is accepted: "specversion": "1.0""#),
                "{}",
                v.detail
            );
        }
        // A null attribute is an unset one (CloudEvents' JSON format, 2.2),
        // as its example events send them; a null payload stays a payload.
        let ce = br#"{"specversion":"1.0","type":"T","source":"s","subject":null,"id":"6","time":null,
            "account":null,"region":null,"schemaversion":null,"data":null}"#;
        let e = decode(ce).unwrap();
        assert_eq!((e.time, e.account, e.region, e.schema_version), (None, None, None, None));
        assert_eq!(e.payload, b"null");
        let eb = br#"{"id":"7","detail-type":"T","source":"s","resources":null,"time":null,"detail":{}}"#;
        assert!(decode(eb).unwrap().resources.is_empty());
        let v = decode(br#"{"specversion":"1.0","type":"T","source":"s","id":null,"data":{}}"#).unwrap_err();
        assert_eq!((v.path.as_str(), v.detail.as_str()), ("$.id", "id is required"));
        let v = decode(br#"{"specversion":null,"id":"8","type":"T","source":"s","data":{}}"#).unwrap_err();
        assert!(v.detail.ends_with(r#"add "specversion": "1.0")"#), "{}", v.detail);
        // A CloudEvent without its specversion is read as EventBridge's; say so.
        let v = decode(br#"{"id":"1","source":"s","type":"T","data":{}}"#).unwrap_err();
        assert_eq!(v.path, "$['detail-type']");
        assert!(v.detail.ends_with(r#"reads as a CloudEvent: add "specversion": "1.0")"#), "{}", v.detail);
        assert_eq!(decode(br#"{"id":1,"source":"s","detail":{}}"#).unwrap_err().path, "$.id");
        assert_eq!(decode(br#"{"id":"","source":"s","detail":{}}"#).unwrap_err().detail, "id is required");
        assert_eq!(decode(br#"{"id":"1","id":"2"}"#).unwrap_err().reason, Reason::BadEnvelope);
        assert_eq!(decode(br#"{"id":"1","resources":[1]}"#).unwrap_err().path, "$.resources");
        assert_eq!(decode(br#"{"id":"1","schema-version":0}"#).unwrap_err().path, "$['schema-version']");
        // Every envelope path is RFC 9535 JSONPath (read here by an
        // independent implementation) and selects the member at fault.
        for body in [
            &br#"{"id":"1","schema-version":0,"detail-type":"T","source":"s","detail":{}}"#[..],
            br#"{"id":"1","detail-type":7,"source":"s","detail":{}}"#,
            br#"{"id":"1","resources":[1],"detail-type":"T","source":"s","detail":{}}"#,
            br#"{"id":5,"detail-type":"T","source":"s","detail":{}}"#,
        ] {
            let v = decode(body).unwrap_err();
            let path =
                serde_json_path::JsonPath::parse(&v.path).unwrap_or_else(|e| panic!("{}: {e}", v.path));
            let event: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(path.query(&event).all().len(), 1, "{} in {}", v.path, String::from_utf8_lossy(body));
        }
        assert_eq!(decode(br#"{"id":"1", "x": [1, }"#).unwrap_err().reason, Reason::MalformedJson);
        assert_eq!(
            decode(br#"{"id":2,"#).unwrap_err().reason,
            Reason::MalformedJson,
            "bad JSON wins over bad shape"
        );
        let e = decode(br#"{"id":"\u0041","source":"s","detail-type":"T","detail":{"x":"\n"}}"#).unwrap();
        assert_eq!((&*e.id, e.payload), ("A", &br#"{"x":"\n"}"#[..]));
        assert!(matches!(e.id, Cow::Owned(_)));
        let e = decode(br#"{"id":"plain","source":"s","detail-type":"T","detail":{}}"#).unwrap();
        assert!(matches!(e.id, Cow::Borrowed("plain")), "strings without escapes are borrowed");
    }

    /// Keys matched in place in EventBridge's order read the same as keys
    /// in any other order, spacing or spelling.
    #[test]
    fn key_order_and_spelling_do_not_matter() {
        let members = [
            r#""version":"0""#,
            r#""id":"1""#,
            r#""detail-type":"T""#,
            r#""source":"s""#,
            r#""account":"123""#,
            r#""time":"2024-05-01T00:00:00Z""#,
            r#""region":"eu-west-1""#,
            r#""resources":["arn:x"]"#,
            r#""detail":{"a":1}"#,
        ];
        let fields = |doc: &str| {
            let e = decode(doc.as_bytes()).unwrap_or_else(|v| panic!("{doc}: {v}"));
            let text = |c: &Option<Cow<'_, str>>| c.as_deref().map(str::to_owned);
            (
                e.id.into_owned(),
                e.detail_type.into_owned(),
                e.source.into_owned(),
                text(&e.account),
                text(&e.time),
                text(&e.region),
                e.resources.len(),
                e.payload.to_vec(),
            )
        };
        let expected = fields(&format!("{{{}}}", members.join(",")));
        let mut reversed = members;
        reversed.reverse();
        let spaced = members.map(|m| m.replacen("\":", "\" : ", 1));
        let escaped = members.map(|m| m.replacen("\"detail\"", "\"d\\u0065tail\"", 1));
        for doc in [
            format!("{{{}}}", reversed.join(",")),
            format!("{{ {} }}", spaced.join(" , ")),
            format!("{{{}}}", escaped.join(",")),
            format!("{{{},{}}}", members[1..].join(","), members[0]),
        ] {
            assert_eq!(fields(&doc), expected, "{doc}");
        }
        // Invalid UTF-8 anywhere is found and placed.
        let bad =
            [&br#"{"id":"1","source":"s"#[..], b"\xff", br#"","detail-type":"T","detail":{}}"#].concat();
        let v = decode(&bad).unwrap_err();
        assert_eq!(
            (v.reason, v.detail.as_str()),
            (Reason::MalformedJson, "invalid UTF-8 in string at byte 20")
        );
        // A key seen in place and then again is still a duplicate.
        let twice = format!("{{{},{}}}", members[..3].join(","), members[1]);
        assert_eq!(
            decode(twice.as_bytes()).unwrap_err().detail,
            "not an event envelope: the field appears twice"
        );
        // So is every attribute read (serde_json would keep the last,
        // this reader would have kept both or the first); a null first
        // one is unset, as when it is absent.
        let eb = r#""id":"1","source":"s","detail-type":"T","detail":{}"#;
        for (extra, path) in [
            (r#""resources":[],"resources":["b"]"#, "$.resources"),
            (r#""schema-version":1,"schema-version":2"#, "$['schema-version']"),
            (r#""schema-version":1,"schemaversion":1"#, "$.schemaversion"),
            (r#""specversion":"1.0","specversion":"1.0","type":"T","data":{}"#, "$.specversion"),
        ] {
            let v = decode(format!("{{{eb},{extra}}}").as_bytes()).unwrap_err();
            assert_eq!((v.reason, v.path.as_str()), (Reason::BadEnvelope, path), "{extra}");
            assert!(v.detail.contains("appears twice"), "{extra}: {}", v.detail);
        }
        let doc = format!(r#"{{{eb},"resources":null,"resources":["b"]}}"#);
        assert_eq!(decode(doc.as_bytes()).unwrap().resources, ["b"]);
    }
}
