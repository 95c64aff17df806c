//! Validation: one case per reason code, plus the decoded values of a
//! valid event of every supported type.

use watershed_event::Reason;
use watershed_schema::{validate_json, Limits, Registry, Slot, Tape, UnknownFields, Version};

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn registry() -> Registry {
    Registry::load(&manifest_dir().join("tests/fixtures/sink")).expect("fixture loads")
}

const VALID: &str = r#"{
  "b": true, "i": -5, "l": 9007199254740993, "f": 1.5, "d": 2.25, "s": "h\u00e9llo",
  "by": "AQID", "fx": "AAECAw==", "u": "123e4567-e89b-12d3-a456-426614174000",
  "day": "2024-05-01", "tms": "2024-05-01T12:00:00.250Z", "tus": 1714564800000001,
  "dec": "1234.5", "e": "GREEN", "arr": [1, 2, 3], "m": {"k": "v"}, "opt": null,
  "rec": {"x": 1, "deep": [{"a": 1}]}
}"#;

fn with(field: &str, value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(VALID).unwrap();
    v[field] = serde_json::from_str(value).unwrap();
    v.to_string()
}

fn without(field: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(VALID).unwrap();
    v.as_object_mut().unwrap().remove(field);
    v.to_string()
}

fn run(v: &Version, json: &str, limits: Limits) -> Result<Tape, watershed_schema::Violation> {
    let mut tape = Tape::new();
    validate_json(&v.node, json.as_bytes(), UnknownFields::Reject, limits, &mut tape).map(|()| tape)
}

fn reject(json: &str) -> (Reason, String) {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let e = run(v, json, Limits::default()).expect_err("must be rejected");
    (e.reason, e.path)
}

#[test]
fn valid_event_decodes_every_type() {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let tape = run(v, VALID, Limits::default()).unwrap();
    let s = |i: u32| tape.slot(i);
    assert_eq!(s(0), Slot::Bool(true));
    assert_eq!(s(1), Slot::Int(-5));
    assert_eq!(s(2), Slot::Long(9_007_199_254_740_993), "longs beyond 2^53 stay exact");
    assert_eq!(s(3), Slot::Float(1.5));
    assert_eq!(s(4), Slot::Double(2.25));
    assert_eq!(tape.str(s(5)), "héllo");
    assert_eq!(tape.bytes(s(6)), &[1, 2, 3]);
    assert_eq!(tape.bytes(s(7)), &[0, 1, 2, 3]);
    assert_eq!(tape.str(s(8)), "123e4567-e89b-12d3-a456-426614174000");
    assert_eq!(s(9), Slot::Int(19844));
    assert_eq!(s(10), Slot::Long(1_714_564_800_250));
    assert_eq!(s(11), Slot::Long(1_714_564_800_000_001));
    assert_eq!(tape.decimal(s(12)), Some(123_450));
    assert_eq!(s(13), Slot::Enum(1));
    let Slot::List { start, len } = s(14) else { panic!("array") };
    assert_eq!(len, 3);
    assert_eq!(tape.slot(start + 2), Slot::Long(3));
    let Slot::Map { start, len } = s(15) else { panic!("map") };
    assert_eq!((len, tape.str(tape.slot(start)), tape.str(tape.slot(start + 1))), (1, "k", "v"));
    assert_eq!(s(16), Slot::Null);
    assert_eq!(s(17), Slot::Int(7), "missing field takes its default");
    let Slot::Record(r) = s(18) else { panic!("record") };
    assert_eq!(tape.slot(r), Slot::Int(1));
}

#[test]
fn key_order_does_not_matter() {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let mut obj: Vec<(String, serde_json::Value)> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(VALID)
            .unwrap()
            .into_iter()
            .collect();
    obj.reverse();
    let reversed = format!(
        "{{{}}}",
        obj.iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let a = run(v, VALID, Limits::default()).unwrap();
    let b = run(v, &reversed, Limits::default()).unwrap();
    for i in 0..19 {
        let (x, y) = (a.slot(i), b.slot(i));
        match (x, y) {
            (Slot::Str { .. }, Slot::Str { .. }) => assert_eq!(a.str(x), b.str(y)),
            (Slot::Bytes { .. }, Slot::Bytes { .. }) => assert_eq!(a.bytes(x), b.bytes(y)),
            (Slot::Decimal(_), Slot::Decimal(_)) => assert_eq!(a.decimal(x), b.decimal(y)),
            (Slot::List { len: l1, .. }, Slot::List { len: l2, .. })
            | (Slot::Map { len: l1, .. }, Slot::Map { len: l2, .. }) => {
                assert_eq!(l1, l2);
            }
            (Slot::Record(_), Slot::Record(_)) => {}
            _ => assert_eq!(x, y, "slot {i}"),
        }
    }
}

#[test]
fn every_reason_code() {
    use Reason::*;
    let cases: Vec<(String, Reason, &str)> = vec![
        ("{\"b\": tru".into(), MalformedJson, "$"),
        ("[1,2]".into(), TypeMismatch, "$"),
        (without("i"), MissingField, "$.i"),
        (with("i", "\"5\""), TypeMismatch, "$.i"),
        (with("b", "null"), TypeMismatch, "$.b"),
        (with("i", "1.5"), TypeMismatch, "$.i"),
        (with("rec", r#"{"x": "no"}"#), TypeMismatch, "$.rec.x"),
        (with("arr", r#"[1, "two"]"#), TypeMismatch, "$.arr[1]"),
        (with("zzz", "1"), UnknownField, "$.zzz"),
        (VALID.replacen("\"b\": true,", "\"b\": true, \"b\": false,", 1), DuplicateField, "$.b"),
        (with("e", "\"BLUE\""), BadEnum, "$.e"),
        (with("tms", "\"yesterday\""), BadTimestamp, "$.tms"),
        (with("day", "\"2024-13-01\""), BadDate, "$.day"),
        (with("u", "\"not-a-uuid\""), BadUuid, "$.u"),
        (with("by", "\"***\""), BadBytes, "$.by"),
        (with("fx", "\"AQID\""), BadBytes, "$.fx"),
        (with("dec", "\"1.234\""), BadDecimal, "$.dec"),
        (with("dec", "\"12345.6\""), OutOfRange, "$.dec"),
        (with("i", "2147483648"), OutOfRange, "$.i"),
        (with("f", "1e300"), OutOfRange, "$.f"),
        (VALID.replacen("\"d\": 2.25", "\"d\": -1e400", 1), OutOfRange, "$.d"),
        (with("m", r#"{"k": 1}"#), TypeMismatch, "$.m.k"),
        (with("rec", r#"{"x": 1, "deep": [{"a": "x"}]}"#), TypeMismatch, "$.rec.deep[0].a"),
    ];
    for (json, reason, path) in cases {
        let (got, got_path) = reject(&json);
        assert_eq!((got, got_path.as_str()), (reason, path), "for {json}");
    }
}

/// A path names the event's own keys as JSONPath (RFC 9535) reads them:
/// a key that is not a plain name is bracketed and quoted, so `a.b` is
/// one step, not two; and a path is at most `MAX_PATH_BYTES` long.
#[test]
fn paths_quote_odd_keys_and_are_bounded() {
    use watershed_schema::MAX_PATH_BYTES;
    for (key, path) in [
        ("zzz", "$.zzz"),
        ("café", "$.café"),
        ("_x9", "$._x9"),
        ("a.b", "$['a.b']"),
        ("x]", "$['x]']"),
        ("9lives", "$['9lives']"),
        ("", "$['']"),
        ("it's", r"$['it\'s']"),
        (r"back\slash", r"$['back\\slash']"),
        ("new\nline", r"$['new\u000aline']"),
        ("with space", "$['with space']"),
    ] {
        let (reason, got) = reject(&with(key, "1"));
        assert_eq!((reason, got.as_str()), (Reason::UnknownField, path), "key {key:?}");
    }
    let (reason, got) = reject(&with("m", r#"{"a.b": 1}"#));
    assert_eq!((reason, got.as_str()), (Reason::TypeMismatch, "$.m['a.b']"), "a map key");
    let long = "é".repeat(3000);
    let (reason, got) = reject(&with(&long, "1"));
    assert_eq!(reason, Reason::UnknownField);
    assert!(got.len() <= MAX_PATH_BYTES && got.ends_with('…') && got.starts_with("$.éé"), "{}", got.len());
}

/// A map key given twice (also when escaped differently) is refused: a
/// Parquet map with a repeated key makes DuckDB refuse the whole file.
/// Small maps are checked pairwise and large ones sorted: both ways.
#[test]
fn a_map_key_given_twice_is_refused() {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let map = |entries: &str| VALID.replacen(r#""m": {"k": "v"}"#, &format!(r#""m": {{{entries}}}"#), 1);
    let many = |n: usize| (0..n).map(|i| format!(r#""k{i}": "v""#)).collect::<Vec<_>>();
    let cases = [
        map(r#""k": "a", "k": "b""#),
        map(r#""k": "a", "x": "b", "\u006b": "c""#),
        map(&[many(40), vec![r#""k7": "again""#.into()]].concat().join(", ")),
        map(&[vec![r#""k39": "first""#.into()], many(40)].concat().join(", ")),
    ];
    for json in &cases {
        let e = run(v, json, Limits::default()).expect_err("must be rejected");
        assert_eq!(e.reason, Reason::DuplicateField, "for {json}");
        assert!(e.path == "$.m.k" || e.path == "$.m.k7" || e.path == "$.m.k39", "{} for {json}", e.path);
    }
    for n in [0, 2, 16, 17, 40, 1000] {
        let tape = run(v, &map(&many(n).join(", ")), Limits::default()).expect("distinct keys pass");
        let Slot::Map { len, .. } = tape.slot(15) else { panic!("map") };
        assert_eq!(len as usize, n);
    }
    // Keys differing only in case or by a prefix are distinct.
    run(v, &map(r#""k": "a", "K": "b", "kk": "c""#), Limits::default()).expect("distinct keys pass");
}

/// An integer written with a point or an exponent is read when it is
/// exact; beyond 2^53 it is out of range, never rounded or called a
/// fraction.
#[test]
fn integers_written_with_a_point_or_an_exponent() {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let written = |field: &str, old: &str, new: &str| {
        VALID.replacen(&format!("\"{field}\": {old}"), &format!("\"{field}\": {new}"), 1)
    };
    for (i, expect) in [("1e2", 100), ("-2.0", -2), ("2.5e1", 25)] {
        let tape = run(v, &written("i", "-5", i), Limits::default()).unwrap();
        assert_eq!(tape.slot(1), Slot::Int(expect), "{i}");
    }
    for (l, says) in [
        ("1e16", "beyond 2^53"),
        ("9.1e15", "beyond 2^53"),
        ("1e19", "does not fit a long"),
        ("1e400", "does not fit a long"),
        ("-1e400", "does not fit a long"),
    ] {
        let e = run(v, &written("l", "9007199254740993", l), Limits::default()).unwrap_err();
        assert_eq!((e.reason, e.path.as_str()), (Reason::OutOfRange, "$.l"), "{l}");
        assert!(e.detail.contains(says), "{l}: {}", e.detail);
    }
    for i in ["1.5e308", "1e10"] {
        let e = run(v, &written("i", "-5", i), Limits::default()).unwrap_err();
        assert_eq!(
            (e.reason, e.detail.as_str()),
            (Reason::OutOfRange, "the number does not fit an int"),
            "{i}"
        );
    }
    let e = run(v, &written("i", "-5", "2.5"), Limits::default()).unwrap_err();
    assert_eq!(e.reason, Reason::TypeMismatch);
}

#[test]
fn size_and_depth_limits() {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let e = run(v, VALID, Limits { max_event_bytes: 100, max_depth: 64 }).unwrap_err();
    assert_eq!(e.reason, Reason::TooLarge);
    let e = run(v, VALID, Limits { max_event_bytes: 1 << 20, max_depth: 2 }).unwrap_err();
    assert_eq!((e.reason, e.path.as_str()), (Reason::TooDeep, "$.rec.deep"));
}

#[test]
fn routing_errors() {
    let reg = registry();
    assert_eq!(reg.resolve("nope", "AllTypes", None).unwrap_err().reason, Reason::UnknownSubject);
    assert_eq!(reg.resolve("test", "AllTypes", Some(9)).unwrap_err().reason, Reason::UnknownVersion);
    assert!(reg.resolve("test", "AllTypes", Some(1)).is_ok());
}

#[test]
fn unknown_fields_can_be_dropped() {
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let mut tape = Tape::new();
    let json = with("extra", r#"{"nested": [1, {"x": 2}]}"#);
    validate_json(&v.node, json.as_bytes(), UnknownFields::Drop, Limits::default(), &mut tape).unwrap();
}

/// A detail says what was wrong without the value: the value may be a
/// protected one, and details are stored in plaintext with dead letters.
#[test]
fn violations_never_echo_values() {
    let (_, path) = reject(&with("s", "12"));
    assert_eq!(path, "$.s");
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    for (field, value) in [
        ("u", "\"4111-1111-1111-1111\""),
        ("e", "\"GREEN4111\""),
        ("i", "41114111411"),
        ("l", "411141114111411141114111"),
        ("f", "4111e300"),
        ("dec", "\"41114111.5\""),
        ("dec", "41114111"),
        ("dec", "4111411.1"),
        ("day", "\"4111-01-41\""),
        ("tms", "\"4111\""),
        ("by", "\"4111*\""),
    ] {
        let e = run(v, &with(field, value), Limits::default()).unwrap_err();
        assert!(!e.detail.contains("4111"), "{field}={value}: {}", e.detail);
    }
}

#[test]
fn example_schemas_accept_their_sample_events() {
    let reg = Registry::load(&manifest_dir().join("../../schemas")).unwrap();
    let (_, v) = reg.resolve("com.example.payments", "PaymentAuthorized", None).unwrap();
    let payment = r#"{"payment_id":"p-1","customer_id":"c-42","amount":"19.99","currency":"EUR",
      "card":{"pan":"4111111111111111","holder_name":"Ada Lovelace","brand":"VISA","expiry":"12/29"},
      "merchant":{"id":"m-1","name":"Shop","mcc":5411,"country":"DE"},
      "authorized_at":"2024-05-01T12:00:00Z","risk_score":0.12,"three_ds":true}"#;
    let mut tape = Tape::new();
    validate_json(&v.node, payment.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape).unwrap();
    // v2 defaults: acquirer_ref null, channel "WEB" (symbol 0).
    assert_eq!(tape.slot(9), Slot::Null);
    assert_eq!(tape.slot(10), Slot::Enum(0));
}

#[test]
fn one_tape_holds_many_events_and_a_refused_one_leaves_no_trace() {
    use watershed_schema::{validate_append, validate_json_append};
    let reg = registry();
    let (_, v) = reg.resolve("test", "AllTypes", None).unwrap();
    let mut tape = Tape::new();
    let first =
        validate_json_append(&v.node, VALID.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape)
            .unwrap();
    let mark = tape.mark();
    // Refused deep inside (after many values were written): the tape is
    // as it was.
    let bad = with("rec", r#"{"x": 1, "deep": [{"a": "no"}]}"#);
    assert!(validate_json_append(
        &v.node,
        bad.as_bytes(),
        UnknownFields::Reject,
        Limits::default(),
        &mut tape
    )
    .is_err());
    assert_eq!(tape.mark(), mark);
    // A payload inside a larger document, appended after the first.
    let doc = format!(r#"{{"detail": {}, "x": 1}}"#, with("s", r#""second""#));
    let start = doc.find(": ").unwrap() + 2;
    let (second, end) =
        validate_append(&v.node, doc.as_bytes(), start, UnknownFields::Reject, Limits::default(), &mut tape)
            .unwrap();
    assert_eq!(&doc[end..], r#", "x": 1}"#);
    let (Slot::Record(a), Slot::Record(b)) = (first, second) else { panic!("records") };
    assert_eq!(a, 0);
    assert!(b > a);
    assert_eq!(tape.str(tape.slot(a + 5)), "héllo");
    assert_eq!(tape.str(tape.slot(b + 5)), "second");
    assert_eq!(tape.slot(b + 1), Slot::Int(-5));
}

#[test]
fn a_missing_schema_directory_is_named_as_such() {
    let missing = manifest_dir().join("tests/fixtures/no-such-dir");
    let e = Registry::load(&missing).unwrap_err();
    assert!(matches!(e, watershed_schema::Error::Dir { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.starts_with("schema directory ") && text.contains("no-such-dir"), "{text}");
}
