//! Event envelopes: EventBridge events and CloudEvents structured JSON,
//! read without copying their strings. The payload (`detail` or `data`)
//! is kept as raw JSON for the schema validator.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use watershed_event::Reason;
use watershed_schema::{SchemaVersion, Violation};

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "detail-type")]
    detail_type: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    ce_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    specversion: Option<Cow<'a, str>>,
    #[serde(borrow)]
    account: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow)]
    region: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    resources: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    detail: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(rename = "schema-version")]
    schema_version: Option<SchemaVersion>,
    schemaversion: Option<SchemaVersion>,
}

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
    pub payload: &'a RawValue,
    /// Where the payload sits, for error paths: `$.detail` or `$.data`.
    pub payload_path: &'static str,
    /// The schema version the event names, if any.
    pub schema_version: Option<SchemaVersion>,
}

/// Best-effort id, source and type of an event that failed to decode,
/// for the dead-letter row.
#[derive(Debug, Default)]
pub struct Partial {
    /// The id, if readable.
    pub id: Option<String>,
    /// The source, if readable.
    pub source: Option<String>,
    /// The type, if readable.
    pub detail_type: Option<String>,
}

/// Decode one event.
///
/// # Errors
/// `malformed_json` for invalid JSON, `bad_envelope` for JSON that is not
/// an EventBridge event or CloudEvent.
pub fn decode(raw: &[u8]) -> Result<Envelope<'_>, Violation> {
    let r: Raw<'_> = serde_json::from_slice(raw).map_err(|e| {
        if e.is_data() {
            Violation::new(Reason::BadEnvelope, format!("not an event envelope: {e}"))
        } else {
            Violation::new(Reason::MalformedJson, e.to_string())
        }
    })?;
    let missing = |f: &str| Violation {
        reason: Reason::BadEnvelope,
        path: format!("$.{f}"),
        detail: format!("{f} is required"),
    };
    let cloud = r.specversion.is_some();
    let (detail_type, payload, payload_path, dt_name, p_name) = if cloud {
        (r.ce_type, r.data, "$.data", "type", "data")
    } else {
        (r.detail_type, r.detail, "$.detail", "detail-type", "detail")
    };
    let id = r.id.filter(|s| !s.is_empty()).ok_or_else(|| missing("id"))?;
    Ok(Envelope {
        id,
        source: r.source.ok_or_else(|| missing("source"))?,
        detail_type: detail_type.ok_or_else(|| missing(dt_name))?,
        account: r.account,
        time: r.time,
        region: r.region,
        resources: r.resources,
        payload: payload.ok_or_else(|| missing(p_name))?,
        payload_path,
        schema_version: r.schema_version.or(r.schemaversion),
    })
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
    match serde_json::from_slice::<P>(raw) {
        Ok(p) => Partial { id: s(p.id), source: s(p.source), detail_type: s(p.detail_type.or(p.ce_type)) },
        Err(_) => Partial::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventbridge_and_cloudevents() {
        let eb = br#"{"version":"0","id":"1","detail-type":"T","source":"s","account":"123","time":"2024-05-01T00:00:00Z","region":"eu-west-1","resources":["arn:x"],"detail":{"a":1}}"#;
        let e = decode(eb).unwrap();
        assert_eq!(
            (&*e.id, &*e.detail_type, e.payload.get(), e.resources.len()),
            ("1", "T", r#"{"a":1}"#, 1)
        );
        let ce =
            br#"{"specversion":"1.0","id":"2","type":"T","source":"s","data":{"b":2},"schemaversion":1}"#;
        let e = decode(ce).unwrap();
        assert_eq!((&*e.id, e.payload_path, e.schema_version), ("2", "$.data", Some(1)));
        assert_eq!(decode(b"[1]").unwrap_err().reason, Reason::BadEnvelope);
        assert_eq!(decode(b"{\"id\":").unwrap_err().reason, Reason::MalformedJson);
        assert_eq!(decode(br#"{"id":"1","source":"s","detail":{}}"#).unwrap_err().path, "$.detail-type");
    }
}
