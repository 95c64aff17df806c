//! A candidate schema checked through its subject (`check_candidate`,
//! what the Schema Registry API's compatibility check answers) gets the
//! verdict the hub's start would give it as the subject's next version
//! file: each candidate is also written as `v<N+1>.avsc` into a copy of
//! the example schemas, and that directory loaded.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use watershed_schema::Registry;

fn examples() -> PathBuf {
    let crate_dir: PathBuf =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into);
    crate_dir.join("../../schemas")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn fields(schema: &mut Value) -> &mut Vec<Value> {
    schema["fields"].as_array_mut().unwrap()
}

/// Candidates made from a subject's latest schema, named.
fn candidates(latest: &str) -> Vec<(&'static str, String)> {
    let base: Value = serde_json::from_str(latest).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut s = base.clone();
        f(&mut s);
        serde_json::to_string_pretty(&s).unwrap()
    };
    let first_string = |s: &mut Value| -> usize {
        fields(s).iter().position(|f| f["type"] == json!("string")).expect("a string field")
    };
    vec![
        ("the same schema", with(&|_| {})),
        (
            "an optional field added",
            with(&|s| fields(s).push(json!({"name": "added", "type": ["null", "string"], "default": null}))),
        ),
        ("a required field added", with(&|s| fields(s).push(json!({"name": "added", "type": "long"})))),
        ("the first field removed", with(&|s| drop(fields(s).remove(0)))),
        (
            "a string field made an int",
            with(&|s| {
                let i = first_string(s);
                fields(s)[i]["type"] = json!("int");
            }),
        ),
        (
            "a string field made optional",
            with(&|s| {
                let i = first_string(s);
                fields(s)[i]["type"] = json!(["null", "string"]);
                fields(s)[i]["default"] = json!(null);
            }),
        ),
        (
            "a protected field with a default added",
            with(&|s| {
                fields(s).push(json!({"name": "added", "type": "string", "default": "x", "watershed.protect": "encrypt"}))
            }),
        ),
        (
            "a union of two types",
            with(&|s| fields(s).push(json!({"name": "added", "type": ["int", "string"], "default": 1}))),
        ),
        ("an unknown protection", with(&|s| fields(s)[0]["watershed.protect"] = json!("scramble"))),
        ("not a record", "\"string\"".to_owned()),
        ("not JSON", "{\"type\": \"record\",".to_owned()),
    ]
}

#[test]
fn a_candidate_gets_the_verdict_the_hub_start_gives_its_file() {
    let reg = Registry::load(&examples()).unwrap();
    let mut seen = [0usize; 3];
    for subject in reg.subjects() {
        let next = subject.latest().version + 1;
        for (what, text) in candidates(&subject.latest().text) {
            let said = format!("{} + {what}", subject.name);
            let verdict = subject.check_candidate(&text, None);
            let dir = tempfile::tempdir().unwrap();
            copy_dir(&examples(), dir.path());
            std::fs::write(dir.path().join(&subject.name).join(format!("v{next}.avsc")), &text).unwrap();
            let loaded = Registry::load(dir.path());
            match (&verdict, &loaded) {
                (Ok(problems), Ok(_)) if problems.is_empty() => seen[0] += 1,
                (Ok(problems), Err(e)) if !problems.is_empty() => {
                    seen[1] += 1;
                    for p in problems {
                        // The same problem, named by the directory's path.
                        let rest = p.split_once(".avsc: ").unwrap().1;
                        assert!(e.to_string().contains(rest), "{said}: {p:?} not in {e}");
                    }
                }
                (Err(invalid), Err(e)) => {
                    seen[2] += 1;
                    assert!(!invalid.is_empty(), "{said}");
                    for p in invalid {
                        let rest = p.split_once(".avsc: ").unwrap().1;
                        assert!(e.to_string().contains(rest), "{said}: {p:?} not in {e}");
                    }
                }
                _ => panic!("{said}: the check says {verdict:?}, loading says {:?}", loaded.err()),
            }
            // Checked against one version, a candidate is compatible with
            // the latest when the full check found nothing against it.
            if let Ok(problems) = &verdict {
                let latest = subject.check_candidate(&text, Some(subject.latest())).unwrap();
                let n = subject.latest().version;
                let (with, but) = (format!("with v{n}"), format!("but v{n} has"));
                let expected: Vec<&String> =
                    problems.iter().filter(|p| p.ends_with(&with) || p.contains(&but)).collect();
                assert_eq!(latest.iter().collect::<Vec<_>>(), expected, "{said}");
            }
        }
    }
    assert!(seen.iter().all(|&n| n > 0), "compatible, incompatible and invalid candidates: {seen:?}");
}

#[test]
fn a_version_is_found_by_its_schema_whatever_its_spacing() {
    let reg = Registry::load(&examples()).unwrap();
    for subject in reg.subjects() {
        for v in &subject.versions {
            let value: Value = serde_json::from_str(&v.text).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            assert_eq!(subject.find(&pretty).map(|f| f.version), Some(v.version), "{}", subject.name);
        }
        let mut changed: Value = serde_json::from_str(&subject.latest().text).unwrap();
        changed["doc"] = json!("another schema");
        assert!(subject.find(&changed.to_string()).is_none(), "{}", subject.name);
        assert!(subject.find("not json").is_none());
    }
}
