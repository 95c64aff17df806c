//! Loading a schema directory answers, whatever the files hold: the
//! registry loads, or it names what is wrong. No schema text, however
//! damaged or strange (mutations of the example schemas in `schemas/`),
//! makes loading panic.

use std::path::PathBuf;

use proptest::prelude::*;
use watershed_schema::Registry;

/// The repository's example schema directory. Cargo sets the crate's
/// directory when it runs the test; the compile-time value can name
/// another checkout that shared the target directory.
fn examples() -> PathBuf {
    let crate_dir: PathBuf =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into);
    crate_dir.join("../../schemas")
}

/// Every file of the example directory: (subject dir name, file name,
/// text), in a stable order.
fn example_files() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for s in std::fs::read_dir(examples()).unwrap() {
        let s = s.unwrap().path();
        if !s.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&s).unwrap() {
            let f = f.unwrap().path();
            out.push((
                s.file_name().unwrap().to_string_lossy().into_owned(),
                f.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    out.sort();
    out
}

/// Fragments a mutation inserts: JSON structure, Avro keywords and
/// values at the edges of what they allow, and TOML.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "null",
    "-1",
    "0",
    "1e400",
    "99999999999999999999",
    r#""type":"int""#,
    r#""type":"bytes""#,
    r#""type":{"type":"fixed","name":"F","size":0}"#,
    r#""logicalType":"decimal""#,
    r#""precision":0"#,
    r#""precision":39"#,
    r#""scale":40"#,
    r#""logicalType":"uuid""#,
    r#""logicalType":"timestamp-nanos""#,
    r#""logicalType":"date""#,
    r#""default":{}"#,
    r#""default":[]"#,
    r#""default":"\u00ff""#,
    r#""default":-1"#,
    r#""fields":[]"#,
    r#""symbols":[]"#,
    r#""symbols":["A","A"]"#,
    r#""aliases":["x","x"]"#,
    r#""items":"string""#,
    r#""values":"long""#,
    r#""type":["null","null"]"#,
    r#""type":["string","int"]"#,
    r#""type":"UserLogin""#,
    r#""name":"""#,
    r#""name":"1bad""#,
    r#""namespace":"a..b""#,
    r#""watershed.protect":"encrypt""#,
    r#""watershed.protect":"mask""#,
    r#""watershed.data_subject":true"#,
    r#""watershed.mask":"""#,
    "compatibility = \"NONE\"\n",
    "table = \"\"\n",
    "unknown_fields = \"keep\"\n",
    "source = 1\n",
    "\u{0}",
    "é",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Remove bytes `[at, at + len)` (fractions of the text's length).
    Delete(f64, usize),
    /// Insert a fragment at `at`.
    Insert(f64, usize),
    /// Replace `len` bytes at `at` by a fragment.
    Replace(f64, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0.0f64..1.0, 1usize..40).prop_map(|(a, l)| Mutation::Delete(a, l)),
        (0.0f64..1.0, 0..FRAGMENTS.len()).prop_map(|(a, f)| Mutation::Insert(a, f)),
        (0.0f64..1.0, 1usize..20, 0..FRAGMENTS.len()).prop_map(|(a, l, f)| Mutation::Replace(a, l, f)),
    ]
}

/// `text` with `m` applied, at a character boundary.
fn apply(text: &str, m: &Mutation) -> String {
    let at = |f: f64| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let mut i = ((text.len() as f64) * f) as usize;
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let end = |i: usize, len: usize| {
        let mut e = (i + len).min(text.len());
        while !text.is_char_boundary(e) {
            e += 1;
        }
        e
    };
    match *m {
        Mutation::Delete(a, len) => {
            let i = at(a);
            format!("{}{}", &text[..i], &text[end(i, len)..])
        }
        Mutation::Insert(a, f) => {
            let i = at(a);
            format!("{}{}{}", &text[..i], FRAGMENTS[f], &text[i..])
        }
        Mutation::Replace(a, len, f) => {
            let i = at(a);
            format!("{}{}{}", &text[..i], FRAGMENTS[f], &text[end(i, len)..])
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Mutations of one file of the example schemas: the registry loads
    /// or says what is wrong, and never panics.
    #[test]
    fn any_damage_to_a_schema_file_gets_an_answer(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let files = example_files();
        let target = which.index(files.len());
        let dir = tempfile::tempdir().unwrap();
        for (i, (subject, name, text)) in files.iter().enumerate() {
            let text = if i == target {
                mutations.iter().fold(text.clone(), |t, m| apply(&t, m))
            } else {
                text.clone()
            };
            std::fs::create_dir_all(dir.path().join(subject)).unwrap();
            std::fs::write(dir.path().join(subject).join(name), text).unwrap();
        }
        match Registry::load(dir.path()) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

/// The examples themselves load (so the mutations start from a registry
/// that does).
#[test]
fn the_examples_load() {
    Registry::load(&examples()).unwrap();
}

/// A name that is not an Avro name (a hyphen, a leading digit) is a
/// problem naming the file and where in it, not a crash of the Avro
/// parser (which panics on some of them).
#[test]
fn a_name_that_is_not_an_avro_name_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("t.subject");
    std::fs::create_dir(&s).unwrap();
    std::fs::write(s.join("subject.toml"), "source = \"t\"\ndetail_type = \"T\"\n").unwrap();
    for (schema, want) in [
        (r#"{"type":"record","name":"user-login","fields":[]}"#, r#"$.name: the name "user-login""#),
        (
            r#"{"type":"record","name":"R","fields":[{"name":"e","type":{"type":"enum","name":"1st","symbols":["A"]}}]}"#,
            r#"$.fields[0].type.name: the name "1st""#,
        ),
        (
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":["null","my-type"]}]}"#,
            r#"$.fields[0].type[1]: the type "my-type""#,
        ),
        (
            r#"{"type":"record","name":"R","aliases":["old name"],"fields":[]}"#,
            r#"$.aliases[0]: the alias "old name""#,
        ),
    ] {
        std::fs::write(s.join("v1.avsc"), schema).unwrap();
        let e = Registry::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("v1.avsc") && e.contains(want) && e.contains("is not an Avro name"),
            "{schema}: {e}"
        );
    }
    // Other attributes may hold anything.
    std::fs::write(
        s.join("v1.avsc"),
        r#"{"type":"record","name":"R","owner":{"name":"Jane Doe"},"fields":[{"name":"a","type":"string","x":{"name":"not checked"}}]}"#,
    )
    .unwrap();
    Registry::load(dir.path()).unwrap();
}
