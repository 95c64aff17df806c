//! Properties of the request input path, against serde_json as the
//! reference reader: a body splits into exactly the events it holds,
//! however they are laid out, and an envelope reads back the fields it
//! was written with (or is refused with the rule it broke), whatever its
//! strings hold and in whatever order its keys come. No input makes
//! either panic.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use watershed_event::Reason;
use watershed_hub::body::{split, Framing};
use watershed_hub::envelope::{decode, MAX_ID_BYTES};

/// Strings that stress a JSON reader: quotes, backslashes, brackets,
/// commas and braces (what a splitter must not take for structure),
/// control characters (escaped on output), and non-ASCII text.
fn tricky() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::char::range('a', 'z'),
            1 => prop::sample::select(vec!['"', '\\', '[', ']', '{', '}', ',', ':', ' ', '\n', '\t', '\u{0}', '\u{7f}', '\u{85}', 'é', '€', '😀', '\u{2028}']),
        ],
        0..24,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

/// Any JSON value, a few levels deep.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Exact in binary and short in decimal: any reader gets the same
        // double back.
        (-1_000_000i32..1_000_000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        tricky().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((tricky(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A JSON object (what an event is).
fn object() -> impl Strategy<Value = Value> {
    prop::collection::vec((tricky(), value()), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

fn parsed(events: &[&[u8]]) -> Vec<Value> {
    events.iter().map(|e| serde_json::from_slice(e).expect("each split event is JSON")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A JSON array of events, compact or pretty-printed, splits into its
    /// elements.
    #[test]
    fn an_array_splits_into_its_elements(events in prop::collection::vec(value(), 0..8), pretty: bool) {
        let body = if pretty { serde_json::to_vec_pretty(&events) } else { serde_json::to_vec(&events) }.unwrap();
        let got = split(&body, 1000, Framing::Shape).unwrap();
        prop_assert_eq!(parsed(&got), events);
    }

    /// NDJSON splits into its lines, with `\n` or `\r\n` endings, blank
    /// lines and a byte order mark ignored, declared or not. (A body that
    /// is one object is one event either way.)
    #[test]
    fn ndjson_splits_into_its_lines(
        events in prop::collection::vec(object(), 1..8),
        crlf: bool,
        blank_lines: bool,
        bom: bool,
    ) {
        let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let mut body = if bom { watershed_hub::body::BOM.to_vec() } else { Vec::new() };
        for e in &events {
            body.extend(serde_json::to_vec(e).unwrap());
            body.extend(end);
            if blank_lines {
                body.extend(b"  ");
                body.extend(end);
            }
        }
        for framing in [Framing::Shape, Framing::Lines] {
            let got = split(&body, 1000, framing).unwrap();
            prop_assert_eq!(parsed(&got), events.clone());
        }
    }

    /// JSON objects one after another, pretty-printed (`jq .`) or compact
    /// with nothing or spaces between them (Kinesis Firehose), split into
    /// the objects, also where the first is on a line of its own (`{}`,
    /// or a first event written compact before pretty-printed ones).
    #[test]
    fn objects_one_after_another_split_into_the_objects(
        events in prop::collection::vec(object(), 2..8),
        pretty: bool,
        first_compact: bool,
        between in prop::sample::select(vec!["", " ", "\n", "\r\n", "\n\n", "\t "]),
    ) {
        let text = |e: &Value| if pretty { serde_json::to_vec_pretty(e) } else { serde_json::to_vec(e) }.unwrap();
        let mut texts: Vec<Vec<u8>> = events.iter().map(text).collect();
        if first_compact {
            texts[0] = serde_json::to_vec(&events[0]).unwrap();
        }
        let body = texts.join(between.as_bytes());
        let got = split(&body, 1000, Framing::Shape).unwrap();
        prop_assert_eq!(parsed(&got), events);
    }

    /// Declared NDJSON is one event per line whatever the lines hold:
    /// arrays, numbers, strings, one object.
    #[test]
    fn declared_ndjson_is_one_event_per_line(events in prop::collection::vec(value(), 1..8)) {
        let mut body = Vec::new();
        for e in &events {
            body.extend(serde_json::to_vec(e).unwrap());
            body.push(b'\n');
        }
        let got = split(&body, 1000, Framing::Lines).unwrap();
        prop_assert_eq!(parsed(&got), events);
    }

    /// Whatever the bytes, splitting answers (events or an error) and
    /// never panics; the events it finds lie within the body.
    #[test]
    fn any_body_is_answered(body in prop::collection::vec(any::<u8>(), 0..256), json_ish in prop::collection::vec(prop::sample::select(b"[]{}\",:\\ \n\r0an".to_vec()), 0..64)) {
        for (b, framing) in [(&body, Framing::Shape), (&json_ish, Framing::Shape), (&body, Framing::Lines), (&json_ish, Framing::Lines)] {
            if let Ok(events) = split(b, 1000, framing) {
                for e in events {
                    let range = b.as_ptr_range();
                    prop_assert!(range.contains(&e.as_ptr()) || e.is_empty());
                }
            }
        }
    }

    /// An EventBridge event reads back as written, whatever its strings
    /// hold and however its keys are ordered; an id that breaks a rule is
    /// refused as `bad_envelope` at `$.id`, never misread.
    #[test]
    fn an_eventbridge_event_reads_back_as_written(
        id in prop_oneof![3 => tricky(), 1 => "[a-z0-9-]{36}", 1 => (1000usize..1100).prop_map(|n| "x".repeat(n))],
        source in tricky(),
        detail_type in tricky(),
        region in tricky(),
        account in "[0-9]{12}",
        detail in object(),
        order in Just((0..8).collect::<Vec<usize>>()).prop_shuffle(),
    ) {
        prop_assume!(!source.is_empty() && !detail_type.is_empty());
        let fields = [
            ("version", json!("0")),
            ("id", json!(id)),
            ("detail-type", json!(detail_type)),
            ("source", json!(source)),
            ("account", json!(account)),
            ("region", json!(region)),
            ("resources", json!(["arn:aws:x", region])),
            ("detail", detail.clone()),
        ];
        // serde_json writes keys in insertion order (preserve_order) or
        // sorted; build the text by hand to control the order.
        let body = format!(
            "{{{}}}",
            order.iter().map(|&i| format!("{}:{}", json!(fields[i].0), fields[i].1)).collect::<Vec<_>>().join(",")
        );
        let bad_id = id.trim().is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control);
        match decode(body.as_bytes()) {
            Ok(e) => {
                prop_assert!(!bad_id, "{id:?} was accepted");
                prop_assert_eq!(&*e.id, &id);
                prop_assert_eq!(&*e.source, &source);
                prop_assert_eq!(&*e.detail_type, &detail_type);
                prop_assert_eq!(e.account.as_deref(), Some(&*account));
                prop_assert_eq!(e.region.as_deref(), Some(&*region));
                prop_assert_eq!(e.resources.iter().map(|r| &**r).collect::<Vec<_>>(), vec!["arn:aws:x", &*region]);
                prop_assert_eq!(serde_json::from_slice::<Value>(e.payload).unwrap(), detail);
                prop_assert_eq!(e.payload_path, "$.detail");
            }
            Err(v) => {
                prop_assert!(bad_id, "{body} refused: {v:?}");
                prop_assert_eq!((v.reason, v.path.as_str()), (Reason::BadEnvelope, "$.id"));
            }
        }
    }

    /// A CloudEvent reads back as written.
    #[test]
    fn a_cloudevent_reads_back_as_written(id in "[A-Za-z0-9._-]{1,40}", source in tricky(), ty in tricky(), data in value(), version in prop::option::of(1u32..5)) {
        prop_assume!(!source.is_empty() && !ty.is_empty());
        let mut e = json!({"specversion": "1.0", "id": id, "source": source, "type": ty, "data": data});
        if let Some(v) = version {
            e["schemaversion"] = json!(v);
        }
        let body = serde_json::to_vec(&e).unwrap();
        let got = decode(&body).unwrap();
        prop_assert_eq!((&*got.id, &*got.source, &*got.detail_type), (&*id, &*source, &*ty));
        prop_assert_eq!(serde_json::from_slice::<Value>(got.payload).unwrap(), data);
        prop_assert_eq!(got.schema_version, version);
    }

    /// Cutting a valid event short, or changing one of its bytes, gets an
    /// answer (the event, or a violation with a reason), never a panic;
    /// a cut event is never accepted.
    #[test]
    fn damaged_events_are_answered(detail in object(), cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), byte: u8) {
        let e = json!({"id": "1", "source": "s", "detail-type": "T", "detail": detail});
        let body = serde_json::to_vec(&e).unwrap();
        let short = &body[..cut.index(body.len())];
        prop_assert!(decode(short).is_err(), "a cut event was accepted: {}", String::from_utf8_lossy(short));
        let mut changed = body.clone();
        changed[at.index(body.len())] = byte;
        let _ = decode(&changed);
    }
}
