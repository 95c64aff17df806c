//! The envelope reader reads JSON as serde_json does: an event serde_json
//! refuses is refused, one it reads is never called malformed, and an
//! event the reader accepts has the id, source, type, account, time,
//! region, resources and payload serde_json finds in it. Also when the
//! payload is validated in the same pass as the envelope (the hub's own
//! reading). The events are an EventBridge event and a CloudEvent with a
//! few bytes changed, inserted or taken out.

use proptest::prelude::*;
use serde_json::Value;
use watershed_event::{damage, Reason};
use watershed_hub::envelope::{self, Envelope};
use watershed_schema::{validate_append, validate_json, Limits, Registry, Tape, UnknownFields};

fn schemas() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from)
        .join("../../schemas")
}

const PAYMENT: &str = r#"{"payment_id":"p-1","customer_id":"c-\u0034\u0032","amount":"19.99","currency":"EUR",
  "card":{"pan":"4111111111111111","holder_name":"Ada \"L\" Lovelace","brand":"VISA","expiry":"12/29"},
  "merchant":{"id":"m-1","name":"Shop","mcc":5411,"country":"DE"},
  "authorized_at":"2024-05-01T12:00:00Z","risk_score":1.2e-1,"three_ds":true}"#;

fn eventbridge() -> String {
    format!(
        r#"{{"version":"0","id":"e-\u00e9-1","detail-type":"PaymentAuthorized","source":"com.example.payments",
  "account":"111111111111","time":"2024-05-01T12:00:00Z","region":"eu-west-1",
  "resources":["arn:a", "arn:\/b"],"schema-version":2,"detail":{PAYMENT}}}"#
    )
}

fn cloudevent() -> String {
    format!(
        r#"{{"specversion":"1.0","id":"c-1","source":"com.example.payments","type":"PaymentAuthorized",
  "time":"2024-05-01T12:00:00Z","datacontenttype":"application/json","subject":"x","data":{PAYMENT},
  "ext":{{"a":[1,null,"\ud83d\ude00"]}}}}"#
    )
}

/// What damage puts in: the shared pieces, and envelope attributes
/// (again, unset, or new).
fn pieces() -> Vec<&'static [u8]> {
    let ours: [&[u8]; 10] = [
        b"\\u0069",
        b"\"id\": \"z\", ",
        b"\"source\": null, ",
        b"\"resources\": [\"r\"], ",
        b"\"detail\": {}, ",
        b"\"data\": {}, ",
        b"\"x\": [1, {\"y\": \"\\\"\"}], ",
        b"\"account\": \"222222222222\", ",
        b"\"schema-version\": 1, ",
        b"\"specversion\": \"1.0\", ",
    ];
    damage::PIECES.iter().copied().chain(ours).collect()
}

/// A string attribute as serde_json reads it: absent and `null` are unset.
fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => panic!("{key} accepted as text: {other}"),
    }
}

fn same_as_serde_json(e: &Envelope<'_>, v: &Value, shown: &str) -> Result<(), TestCaseError> {
    let cloud = v.get("specversion").is_some_and(|s| s == "1.0");
    let (dt, payload) = if cloud { ("type", "data") } else { ("detail-type", "detail") };
    prop_assert_eq!(Some(e.id.to_string()), text(v, "id"), "id of {}", shown);
    prop_assert_eq!(Some(e.source.to_string()), text(v, "source"), "source of {}", shown);
    prop_assert_eq!(Some(e.detail_type.to_string()), text(v, dt), "type of {}", shown);
    prop_assert_eq!(e.account.as_deref().map(str::to_owned), text(v, "account"), "account of {}", shown);
    prop_assert_eq!(e.time.as_deref().map(str::to_owned), text(v, "time"), "time of {}", shown);
    prop_assert_eq!(e.region.as_deref().map(str::to_owned), text(v, "region"), "region of {}", shown);
    let resources: Vec<String> = e.resources.iter().map(|r| r.to_string()).collect();
    let expected: Vec<String> = match v.get("resources") {
        None | Some(Value::Null) => Vec::new(),
        Some(r) => serde_json::from_value(r.clone())
            .map_err(|err| TestCaseError::fail(format!("resources accepted as strings ({err}): {shown}")))?,
    };
    prop_assert_eq!(resources, expected, "resources of {}", shown);
    let version = ["schema-version", "schemaversion"].iter().find_map(|k| v.get(*k).and_then(Value::as_u64));
    prop_assert_eq!(e.schema_version.map(u64::from), version, "schema version of {}", shown);
    let ours: Value = serde_json::from_slice(e.payload)
        .map_err(|err| TestCaseError::fail(format!("payload is not JSON ({err}): {shown}")))?;
    prop_assert_eq!(Some(&ours), v.get(payload), "payload of {}", shown);
    Ok(())
}

/// What the hub does when the envelope reader reaches the payload:
/// validate it in place against the schema its route names.
fn inline_validation<'a>(
    registry: &'a Registry,
    tape: &'a mut Tape,
) -> impl FnMut(&str, &str, &[u8], usize) -> Option<(usize, envelope::Prevalidated)> + 'a {
    move |source, dt, raw, start| {
        let (_, v) = registry.resolve(source, dt, None).ok()?;
        let (_, end) =
            validate_append(&v.node, raw, start, UnknownFields::Reject, Limits::default(), tape).ok()?;
        Some((end, (0, v.version)))
    }
}

fn check(doc: &[u8], registry: &Registry, inline: bool) -> Result<(), TestCaseError> {
    let shown = String::from_utf8_lossy(doc).into_owned();
    let theirs = serde_json::from_slice::<Value>(doc);
    let mut tape = Tape::new();
    let ours = if inline {
        envelope::decode_with(doc, &mut inline_validation(registry, &mut tape))
    } else {
        envelope::decode(doc)
    };
    match (&ours, &theirs) {
        // JSON's grammar has no limit on exponents; serde_json refuses
        // numbers past f64's range. The reader takes them where it only
        // skips a value (an unknown field or extension).
        (Ok(_), Err(err)) if err.to_string().starts_with("number out of range") => {}
        (Ok(_), Err(err)) => {
            return Err(TestCaseError::fail(format!("accepted what serde_json refuses ({err}): {shown}")));
        }
        (Err(v), Ok(_)) if v.reason == Reason::MalformedJson => {
            return Err(TestCaseError::fail(format!(
                "called malformed ({v}) what serde_json reads: {shown}"
            )));
        }
        _ => {}
    }
    if let (Ok(e), Ok(v)) = (&ours, &theirs) {
        same_as_serde_json(e, v, &shown)?;
        // A payload validated in the envelope's pass is one the validator
        // accepts on its own too.
        if e.prevalidated.is_some() {
            let (_, version) = registry.resolve(&e.source, &e.detail_type, None).expect("resolved before");
            let mut alone = Tape::new();
            validate_json(&version.node, e.payload, UnknownFields::Reject, Limits::default(), &mut alone)
                .map_err(|v| TestCaseError::fail(format!("prevalidated, then refused ({v}): {shown}")))?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn reads_an_envelope_as_serde_json_does(
        edits in proptest::collection::vec((any::<usize>(), 0u8..3, any::<prop::sample::Index>()), 1..4),
        cloud: bool,
        compact: bool,
        inline: bool,
    ) {
        let registry = Registry::load(&schemas()).expect("schemas load");
        let text = if cloud { cloudevent() } else { eventbridge() };
        let mut doc = if compact {
            serde_json::to_vec(&serde_json::from_str::<Value>(&text).expect("valid JSON")).expect("serialises")
        } else {
            text.into_bytes()
        };
        let pieces = pieces();
        for (at, how, piece) in &edits {
            damage::apply(&mut doc, *at, *how, piece.get::<&[u8]>(&pieces));
        }
        check(&doc, &registry, inline)?;
    }
}

#[test]
fn the_unchanged_events_are_read_whole() {
    let registry = Registry::load(&schemas()).expect("schemas load");
    for doc in [eventbridge(), cloudevent()] {
        for inline in [false, true] {
            check(doc.as_bytes(), &registry, inline).unwrap();
        }
        let mut tape = Tape::new();
        let e = envelope::decode_with(doc.as_bytes(), &mut inline_validation(&registry, &mut tape)).unwrap();
        assert!(e.prevalidated.is_some(), "the payload is validated in the envelope's pass");
    }
}
