//! Field defaults: read as Avro spells them, checked when the schema loads,
//! and never a way around protection.

use watershed_schema::{validate_json_append, Limits, Registry, Slot, Tape, UnknownFields};

/// A registry of one subject with these versions (`v1.avsc`, ...), each
/// the fields of record `R`.
fn load(versions: &[&str]) -> watershed_schema::Result<Registry> {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("t.subject");
    std::fs::create_dir(&s).unwrap();
    std::fs::write(
        s.join("subject.toml"),
        "source = \"t\"\ndetail_type = \"T\"\ncompatibility = \"BACKWARD\"\n",
    )
    .unwrap();
    for (i, fields) in versions.iter().enumerate() {
        let schema = format!(r#"{{"type":"record","name":"R","fields":[{fields}]}}"#);
        std::fs::write(s.join(format!("v{}.avsc", i + 1)), schema).unwrap();
    }
    Registry::load(dir.path())
}

fn problems(versions: &[&str]) -> String {
    match load(versions) {
        Ok(_) => panic!("loads, but should not: {versions:?}"),
        Err(e) => e.to_string(),
    }
}

const A: &str = r#"{"name":"a","type":"int"}"#;

#[test]
fn bytes_and_fixed_defaults_are_the_bytes_of_their_code_points() {
    // Avro spells a bytes or fixed default as a string with one character
    // (U+0000 to U+00FF) per byte; payloads carry base64. "abcd" is the
    // four bytes a b c d, not base64 for three others.
    let v2 = [
        A,
        r#"{"name":"b","type":"bytes","default":"\u00ff\u0000ab"}"#,
        r#"{"name":"c","type":{"type":"fixed","name":"F","size":2},"default":"xy"}"#,
        r#"{"name":"d","type":{"type":"array","items":"bytes"},"default":["abcd",""]}"#,
        r#"{"name":"e","type":["null","bytes"],"default":null}"#,
    ]
    .join(",");
    let reg = load(&[A, &v2]).unwrap();
    let latest = reg.subjects()[0].latest();
    let mut tape = Tape::new();
    let root = validate_json_append(
        &latest.node,
        br#"{"a":1}"#,
        UnknownFields::Reject,
        Limits::default(),
        &mut tape,
    )
    .unwrap();
    let Slot::Record(start) = root else { panic!("a record") };
    assert_eq!(tape.bytes(tape.slot(start + 1)), b"\xff\x00ab");
    assert_eq!(tape.bytes(tape.slot(start + 2)), b"xy");
    let Slot::List { start: items, len: 2 } = tape.slot(start + 3) else { panic!("a list of two") };
    assert_eq!(tape.bytes(tape.slot(items)), b"abcd");
    assert_eq!(tape.bytes(tape.slot(items + 1)), b"");
    assert_eq!(tape.slot(start + 4), Slot::Null);
}

#[test]
fn a_default_that_does_not_fit_its_type_is_refused_when_the_schema_loads() {
    // Before, these loaded and then every event without the field was
    // refused as type_mismatch (and older versions' events got null).
    let p = problems(&[A, &format!(r#"{A},{{"name":"b","type":"int","default":3000000000}}"#)]);
    assert!(
        p.contains(r#"field "b": the default 3000000000 does not fit int: the number does not fit an int"#),
        "{p}"
    );
    let p = problems(&[&format!(r#"{A},{{"name":"b","type":"bytes","default":"\u0100"}}"#)]);
    assert!(p.contains(r#"field "b": the default "Ā" does not fit bytes: a bytes or fixed default is a string of characters \u0000 to \u00ff"#), "{p}");
    let p = problems(&[&format!(
        r#"{A},{{"name":"b","type":{{"type":"fixed","name":"F","size":2}},"default":"abc"}}"#
    )]);
    assert!(
        p.contains(r#"field "b": the default "abc" does not fit fixed(2): expected 2 bytes, got 3"#),
        "{p}"
    );
}

#[test]
fn a_protected_field_added_with_a_default_must_default_to_null() {
    // v1's events are written under v2's columns with v2's defaults, which
    // the lake writes as they are: a tokenized column would hold the
    // default in clear beside tokens.
    let email = |default: &str| {
        format!(
            r#"{A},{{"name":"email","type":["string","null"],"default":{default},"watershed.protect":"tokenize"}}"#
        )
    };
    let p = problems(&[A, &email(r#""nobody@example.com""#)]);
    assert!(
        p.contains(
            r#"field "email" holds protected values and has a non-null default, but v1 has no such field"#
        ),
        "{p}"
    );
    // Nested: a record added with a default whose fields are protected.
    let addr = format!(
        r#"{A},{{"name":"addr","type":{{"type":"record","name":"Addr","fields":[{{"name":"street","type":"string","watershed.protect":"encrypt"}}]}},"default":{{"street":"unknown"}}}}"#
    );
    let p = problems(&[A, &addr]);
    assert!(p.contains(r#"field "addr" holds protected values"#), "{p}");
    // A null default, or a field every earlier version has, is fine.
    let nullable = format!(
        r#"{A},{{"name":"email","type":["null","string"],"default":null,"watershed.protect":"tokenize"}}"#
    );
    load(&[A, &nullable]).unwrap();
    load(&[&email(r#""nobody@example.com""#), &email(r#""nobody@example.com""#)]).unwrap();
}
