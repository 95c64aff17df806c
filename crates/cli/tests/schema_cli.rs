//! `watershed schema check|list` and `watershed keys` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn watershed(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_watershed")).args(args).current_dir(cwd).output().expect("runs")
}

fn repo() -> PathBuf {
    manifest_dir().join("../..")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, s).unwrap();
}

#[test]
fn check_passes_on_the_examples() {
    let o = watershed(&["schema", "check", "schemas"], &repo());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).starts_with("ok: 4 subjects, 6 versions"), "{}", text(&o));
    let o = watershed(&["schema", "list", "schemas"], &repo());
    assert!(o.status.success());
    let out = text(&o);
    assert!(out.contains("payments.payment_authorized  table=payments"), "{out}");
    assert!(out.contains("protect encrypt   card.holder_name"), "{out}");
    assert!(out.contains("data subject: customer_id"), "{out}");
}

#[test]
fn check_lists_every_problem_with_file_field_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("schemas");
    write(&s.join("orders/subject.toml"), "source = \"shop\"\ndetail_type = \"Order\"\n");
    let v = |total: &str, extra: &str| {
        format!(
            r#"{{"type":"record","name":"Order","fields":[{{"name":"id","type":"string"}},{{"name":"total","type":"{total}"}}{extra}]}}"#
        )
    };
    write(&s.join("orders/v1.avsc"), &v("double", ""));
    write(
        &s.join("orders/v2.avsc"),
        &v("double", r#",{"name":"note","type":["null","string"],"default":null}"#),
    );
    write(&s.join("orders/v3.avsc"), &v("string", r#",{"name":"qty","type":"int"}"#));
    // A second subject with attribute mistakes and a bad mode.
    write(
        &s.join("logins/subject.toml"),
        "source = \"idp\"\ndetail_type = \"Login\"\ncompatibility = \"SIDEWAYS\"\n",
    );
    write(&s.join("logins/v1.avsc"), r#"{"type":"record","name":"L","fields":[]}"#);
    write(&s.join("users/subject.toml"), "source = \"idp\"\ndetail_type = \"User\"\n");
    write(
        &s.join("users/v1.avsc"),
        r#"{"type":"record","name":"U","fields":[
            {"name":"age","type":"int","watershed.protect":"tokenize"},
            {"name":"email","type":"string","watershed.protect":"scramble"},
            {"name":"id","type":"string","watershed.data_subject":true},
            {"name":"id2","type":"string","watershed.data_subject":true}]}"#,
    );
    let o = watershed(&["schema", "check", "schemas"], dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    for want in [
        "schemas/orders/v3.avsc: field \"total\" changed double→string: not BACKWARD-compatible with v2",
        "schemas/orders/v3.avsc: field \"qty\" added without a default: old data has no value for it: not BACKWARD-compatible with v2",
        "schemas/logins/subject.toml: unknown variant `SIDEWAYS`",
        "schemas/users/v1.avsc: field \"age\": \"tokenize\" needs a string or uuid value",
        "schemas/users/v1.avsc: field \"email\": \"watershed.protect\" is \"scramble\"; use redact, mask, tokenize or encrypt",
        "schemas/users/v1.avsc: field \"id2\": a second data subject",
        "problem(s) in schemas",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn keys_forget_and_decrypt_from_the_command_line() {
    use watershed_protect::{BatchProtector, Keyring, LocalKeyring};
    use watershed_schema::{validate_json, Limits, Registry, Tape, UnknownFields};
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::load(&repo().join("schemas")).unwrap();
    let (_, v) = reg.resolve("com.example.identity", "UserLogin", None).unwrap();
    let kr = LocalKeyring::open_local(&dir.path().join("data/keyring")).unwrap();
    let mut ct = Vec::new();
    for user in ["u-1", "u-2"] {
        let json = format!(
            r#"{{"user_id":"{user}","username":"ada","ip_address":"10.0.0.7","user_agent":"x","outcome":"SUCCESS","logged_in_at":"2024-05-01T00:00:00Z","attempt":1}}"#
        );
        let mut tape = Tape::new();
        validate_json(&v.node, json.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape).unwrap();
        BatchProtector::new(&kr).protect(&"123456789012".parse().unwrap(), &v.protect, &mut tape).unwrap();
        kr.sync().unwrap();
        ct.push(tape.str(tape.slot(2)).to_owned());
    }
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let dec = |value: &str| {
        watershed(
            &["keys", "decrypt", "--principal", "p", "--purpose", "t", "--data-dir", data, value],
            dir.path(),
        )
    };
    let o = dec(&ct[0]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "10.0.0.7");
    let forget = |by: &[&str]| {
        let args = ["keys", "forget", "--account", "123456789012", "--subject", "u-1", "--data-dir", data];
        watershed(&[&args[..], by].concat(), dir.path())
    };
    // An erasure names who asked and why, or nothing is erased.
    let o = forget(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--principal") && text(&o).contains("--purpose"), "{}", text(&o));
    let o = forget(&["--principal", "dpo", "--purpose", " "]);
    assert!(!o.status.success() && text(&o).contains("purpose is empty"), "{}", text(&o));
    assert!(dec(&ct[0]).status.success(), "nothing erased without an attribution");
    let o = forget(&["--principal", "dpo", "--purpose", "request 7"]);
    assert!(o.status.success(), "{}", text(&o));
    let audit = std::fs::read_to_string(std::path::Path::new(data).join("keyring/audit.log")).unwrap();
    let erasure = audit.lines().find(|l| l.contains(r#""action":"forget""#)).expect("the erasure is audited");
    assert!(
        erasure.contains(r#""principal":"dpo""#) && erasure.contains(r#""purpose":"request 7""#),
        "{erasure}"
    );
    let o = dec(&ct[0]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("key_erased"), "{}", text(&o));
    assert!(dec(&ct[1]).status.success(), "the other subject stays readable");
    let o = watershed(
        &[
            "keys",
            "forget",
            "--principal",
            "p",
            "--purpose",
            "t",
            "--account",
            "../etc",
            "--subject",
            "u-1",
            "--data-dir",
            data,
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "bad account ids are refused by the parser");
}

/// A listing piped into a reader that stops early (`| head`) ends quietly
/// with status 141, as a tool killed by SIGPIPE does; it was a panic with
/// a backtrace.
#[test]
fn a_closed_stdout_ends_a_listing_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_watershed"))
        .args(["schema", "list", "schemas"])
        .current_dir(repo())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(141), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}
