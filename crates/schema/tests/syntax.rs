//! The validator reads JSON as serde_json does: a document serde_json
//! refuses is refused, one serde_json reads is never called malformed,
//! and one the validator accepts decodes to the same values as
//! serde_json's own rewriting of it (keys sorted, escapes and numbers
//! spelled its way), also where it skips the values of unknown fields it
//! drops. The documents are a valid event of every type with a few bytes
//! changed, inserted or taken out.

use proptest::prelude::*;
use watershed_event::{damage, Reason};
use watershed_schema::{validate_json, Kind, Limits, Node, Registry, Slot, Tape, UnknownFields};

fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

const VALID: &str = r#"{
  "b": true, "i": -5, "l": 9007199254740993, "f": 1.5, "d": 2.25e-3, "s": "h\u00e9llo \"q\" \\ \/ \ud83d\ude00 é",
  "by": "AQID", "fx": "AAECAw==", "u": "123e4567-e89b-12d3-a456-426614174000",
  "day": "2024-05-01", "tms": "2024-05-01T12:00:00.250Z", "tus": 1714564800000001,
  "dec": "1234.5", "e": "GREEN", "arr": [1, -2, 3e2, 40.0], "m": {"k": "v", "k2": "\t"}, "opt": null,
  "rec": {"x": 1, "deep": [{"a": 1}, {}]}
}"#;

/// What damage puts in: the shared pieces, and members of this schema
/// (known, unknown with nested values to skip, a map's key again).
fn pieces() -> Vec<&'static [u8]> {
    let ours: [&[u8]; 5] = [
        b"\"x\": 1",
        b"\"i\": 2",
        b"\"k\": \"w\"",
        b"\"x\": [1, {\"y\": \"\\u00e9\"}, -2.5e3], ",
        b"\"z\": {\"a\": [true, null, \"\\\"\"]}, ",
    ];
    damage::PIECES.iter().copied().chain(ours).collect()
}

/// The values a tape holds for `slot` of type `node`, in a form that
/// does not depend on where in the tape they were written.
fn dump(node: &Node, tape: &Tape, slot: Slot, out: &mut String) {
    use std::fmt::Write as _;
    match slot {
        Slot::Record(start) => {
            let Kind::Record(r) = &node.kind else { panic!("a record slot for {}", node.kind.name()) };
            out.push('{');
            for (i, f) in r.fields.iter().enumerate() {
                let _ = write!(out, "{}=", f.name);
                dump(&f.node, tape, tape.slot(start + i as u32), out);
                out.push(',');
            }
            out.push('}');
        }
        Slot::List { start, len } => {
            let Kind::Array(item) = &node.kind else { panic!("a list slot for {}", node.kind.name()) };
            out.push('[');
            for i in 0..len {
                dump(item, tape, tape.slot(start + i), out);
                out.push(',');
            }
            out.push(']');
        }
        Slot::Map { start, len } => {
            let Kind::Map(value) = &node.kind else { panic!("a map slot for {}", node.kind.name()) };
            // serde_json's map is sorted by key: compare as sorted.
            let mut entries: Vec<(String, String)> = (0..len)
                .map(|i| {
                    let mut v = String::new();
                    dump(value, tape, tape.slot(start + 2 * i + 1), &mut v);
                    (tape.str(tape.slot(start + 2 * i)).to_owned(), v)
                })
                .collect();
            entries.sort();
            let _ = write!(out, "{entries:?}");
        }
        Slot::Str { .. } => {
            let _ = write!(out, "{:?}", tape.str(slot));
        }
        Slot::Bytes { .. } => {
            let _ = write!(out, "{:?}", tape.bytes(slot));
        }
        Slot::Decimal(_) => {
            let _ = write!(out, "dec{:?}", tape.decimal(slot));
        }
        // serde_json writes -0 as 0.
        Slot::Float(x) => {
            let _ = write!(out, "{:?}", x + 0.0);
        }
        Slot::Double(x) => {
            let _ = write!(out, "{:?}", x + 0.0);
        }
        other => {
            let _ = write!(out, "{other:?}");
        }
    }
}

fn check(node: &Node, doc: &[u8], unknown: UnknownFields) -> Result<(), TestCaseError> {
    let mut tape = Tape::new();
    let ours = validate_json(node, doc, unknown, Limits::default(), &mut tape);
    let theirs = serde_json::from_slice::<serde_json::Value>(doc);
    let shown = String::from_utf8_lossy(doc);
    match (&ours, &theirs) {
        // JSON's grammar has no limit on exponents; serde_json refuses
        // numbers past f64's range. The validator takes them where it only
        // skips a value (an unknown field it drops).
        (Ok(()), Err(e)) if e.to_string().starts_with("number out of range") => {}
        (Ok(()), Err(e)) => {
            return Err(TestCaseError::fail(format!("accepted what serde_json refuses ({e}): {shown}")));
        }
        (Err(v), Ok(_)) if v.reason == Reason::MalformedJson => {
            return Err(TestCaseError::fail(format!(
                "called malformed ({v}) what serde_json reads: {shown}"
            )));
        }
        _ => {}
    }
    if let (Ok(()), Ok(value)) = (ours, theirs) {
        let mut ours = String::new();
        dump(node, &tape, tape.root(), &mut ours);
        let again = serde_json::to_vec(&value).expect("serialises");
        let mut tape2 = Tape::new();
        validate_json(node, &again, unknown, Limits::default(), &mut tape2).map_err(|v| {
            TestCaseError::fail(format!(
                "accepted {shown} but not serde_json's rewriting {} ({v})",
                String::from_utf8_lossy(&again)
            ))
        })?;
        let mut theirs = String::new();
        dump(node, &tape2, tape2.root(), &mut theirs);
        prop_assert_eq!(ours, theirs, "{}", shown);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn reads_json_as_serde_json_does(
        edits in proptest::collection::vec((any::<usize>(), 0u8..3, any::<prop::sample::Index>()), 1..4),
        compact: bool,
        drop_unknown: bool,
    ) {
        let reg = Registry::load(&manifest_dir().join("tests/fixtures/sink")).expect("fixture loads");
        let (_, v) = reg.resolve("test", "AllTypes", None).expect("AllTypes");
        let mut doc = if compact {
            serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(VALID).expect("valid JSON"))
                .expect("serialises")
        } else {
            VALID.as_bytes().to_vec()
        };
        let pieces = pieces();
        for (at, how, piece) in &edits {
            damage::apply(&mut doc, *at, *how, piece.get::<&[u8]>(&pieces));
        }
        // Dropping unknown fields skips their values: that reading too.
        let unknown = if drop_unknown { UnknownFields::Drop } else { UnknownFields::Reject };
        check(&v.node, &doc, unknown)?;
    }
}

#[test]
fn the_unchanged_event_is_accepted() {
    let reg = Registry::load(&manifest_dir().join("tests/fixtures/sink")).expect("fixture loads");
    let (_, v) = reg.resolve("test", "AllTypes", None).expect("AllTypes");
    let mut tape = Tape::new();
    validate_json(&v.node, VALID.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape).unwrap();
    check(&v.node, VALID.as_bytes(), UnknownFields::Reject).unwrap();
}
