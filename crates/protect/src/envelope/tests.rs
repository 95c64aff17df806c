//! The keyring's tests.

use std::io::Write;

use super::*;
use crate::fsutil::stamp;
use crate::fsutil::torn::tear_next_write;

/// An attribution for audited calls.
fn by() -> crate::Access {
    crate::Access { principal: "ops".into(), purpose: "test".into() }
}

/// However many subjects pass through, at most the configured number
/// of keys stay unwrapped (and in the per-subject index); keys dropped
/// from memory are unwrapped again, the same keys, when used.
#[test]
fn unwrapped_keys_in_memory_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let kr = LocalKeyring::open_local(dir.path()).unwrap().with_cached_keys(64);
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push(kr.data_cipher(&a, Some(&format!("s-{i}"))).unwrap().id());
        let held = lock(&kr.state).cache.len();
        assert!(held <= 64, "{held} keys held after {i} subjects");
        let hot: usize = kr.hot.shards.iter().map(|s| lock(s).len()).sum();
        assert!(hot <= 64, "{hot} index entries after {i} subjects");
    }
    kr.sync().unwrap();
    let batch: Vec<String> = (0..1000).map(|i| format!("s-{i}")).collect();
    let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
    let again: Vec<KeyId> = kr.data_ciphers(&a, &batch).unwrap().iter().map(|c| c.id()).collect();
    assert_eq!(again, ids, "the same keys, unwrapped again");
    assert!(lock(&kr.state).cache.len() <= 64);
    let c = kr.cipher_by_id(&ids[0]).unwrap();
    let mut rng = ChaCha20Rng::from_entropy();
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    c.encrypt_into(b"plain", &mut rng, &mut buf, &mut out);
    let d = crate::Decryptor::new(&kr);
    let access = crate::Access { principal: "p".into(), purpose: "test".into() };
    let text = String::from_utf8(out).unwrap();
    assert_eq!(d.decrypt(&access, &[&text]).unwrap()[0].as_ref().unwrap().expose_str().unwrap(), "plain");
}

fn log_lines(kr: &LocalKeyring) -> Vec<String> {
    std::fs::read_to_string(&kr.path).unwrap().lines().map(str::to_owned).collect()
}

/// A key log line's JSON, its checksum checked and cut off.
fn json(line: &str) -> &str {
    std::str::from_utf8(super::line::checked(line.as_bytes()).unwrap()).unwrap()
}

/// `json` as a key log line: with its checksum, without the newline.
fn sealed(json: &str) -> String {
    let mut line = json.as_bytes().to_vec();
    watershed_event::sealed::seal(&mut line, 0);
    line.pop();
    String::from_utf8(line).unwrap()
}

fn ino(path: &Path) -> u64 {
    stamp(path).unwrap().ino
}

/// Keys of `n` subjects `s-0`… of one account, synced; the keyring and
/// each key's line.
fn subjects(dir: &Path, n: usize) -> (LocalKeyring, Vec<(KeyId, String)>) {
    let a = AccountId::new("111111111111").unwrap();
    let kr = LocalKeyring::open_local(dir).unwrap();
    let ids: Vec<KeyId> = (0..n).map(|i| kr.data_cipher(&a, Some(&format!("s-{i}"))).unwrap().id()).collect();
    kr.sync().unwrap();
    let lines = log_lines(&kr);
    let keys = ids
        .into_iter()
        .map(|id| {
            let l = lines.iter().find(|l| l.contains(&id.to_hex())).unwrap().clone();
            (id, l)
        })
        .collect();
    (kr, keys)
}

/// Through `kr`, the keys numbered `erased` read as erased and those
/// numbered `kept` unwrap.
fn assert_keys(kr: &LocalKeyring, keys: &[(KeyId, String)], erased: &[usize], kept: &[usize]) {
    for &i in erased {
        assert!(matches!(kr.cipher_by_id(&keys[i].0), Err(Error::KeyErased { .. })), "s-{i} is not erased");
    }
    for &i in kept {
        assert_eq!(kr.cipher_by_id(&keys[i].0).unwrap().id(), keys[i].0, "s-{i}");
    }
}

fn blob(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json(line)).unwrap();
    v["wrapped"]["blob"].as_str().unwrap().to_owned()
}

/// `forget` overwrites the subject's key lines where they are, the same
/// length, and appends the erasure: the log is not rewritten, its
/// other lines stay where they were, and every reader (this keyring,
/// a new one) sees the erasure and the other keys.
#[test]
fn forget_shreds_the_subjects_lines_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 20);
    let (before, ino_before) = (log_lines(&kr), ino(&kr.path));
    let e = kr.forget(&a, "s-3", &by()).unwrap();
    assert_eq!(e.key_ids, vec![keys[3].0]);
    let after = log_lines(&kr);
    assert_eq!(ino(&kr.path), ino_before, "the log was rewritten");
    assert_eq!(after.len(), before.len() + 1, "one erasure line appended");
    let shredded: Vec<(&String, &String)> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert_eq!(shredded.len(), 1, "exactly the subject's line changed");
    let (old, new) = shredded[0];
    assert_eq!(old.len(), new.len());
    assert!(
        new.starts_with(r#"{"op":"shredded""#) && new.trim_end_matches('}').trim_end().len() == 16,
        "{new}"
    );
    let text = std::fs::read_to_string(&kr.path).unwrap();
    assert!(!text.contains(&blob(&keys[3].1)), "the wrapped key is still in the log");
    assert!(text.contains(&blob(&keys[4].1)));
    for reader in [&kr, &LocalKeyring::open_local(dir.path()).unwrap()] {
        assert_keys(reader, &keys, &[3], &[4]);
        assert_eq!(reader.data_cipher(&a, Some("s-5")).unwrap().id(), keys[5].0);
    }
    assert!(matches!(kr.forget(&a, "s-3", &by()), Err(Error::NothingToForget { .. })));
    // New events of the subject get a new key, here and in a new reader.
    let other = LocalKeyring::open_local(dir.path()).unwrap();
    let new = other.data_cipher(&a, Some("s-3")).unwrap().id();
    assert_ne!(new, keys[3].0);
    assert_ne!(kr.data_cipher(&a, Some("s-3")).unwrap().id(), keys[3].0);
}

/// A keyring beside the one that forgets reads only what was appended
/// to the log (its own keys, never read back, stay unplaced), and
/// still sees the erasure.
#[test]
fn a_running_keyring_reads_only_the_appended_erasure() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (hub, keys) = subjects(dir.path(), 5);
    let cli = LocalKeyring::open_local(dir.path()).unwrap();
    cli.forget(&a, "s-1", &by()).unwrap();
    assert_keys(&hub, &keys, &[1], &[]);
    let st = lock(&hub.state);
    assert_eq!(st.read_len, std::fs::metadata(&hub.path).unwrap().len());
    assert!(st.state.data_keys[&keys[0].0].at.is_none(), "the whole log was read again");
}

/// Many subjects in one call: one erasure line each, every line
/// shredded, unknown subjects answered `None`, one audit record per
/// subject erased.
#[test]
fn forgetting_many_subjects_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 30);
    let out = kr.forget_subjects(&a, &["s-2", "nobody", "s-7", "s-9", "s-7"], &by()).unwrap();
    let ids: Vec<Option<Vec<KeyId>>> = out.iter().map(|e| e.as_ref().map(|e| e.key_ids.clone())).collect();
    let seven = Some(vec![keys[7].0]);
    assert_eq!(ids, vec![Some(vec![keys[2].0]), None, seven.clone(), Some(vec![keys[9].0]), seven]);
    let text = std::fs::read_to_string(&kr.path).unwrap();
    for i in [2, 7, 9] {
        assert!(!text.contains(&blob(&keys[i].1)), "s-{i}'s key is still in the log");
    }
    assert_eq!(log_lines(&kr).iter().filter(|l| l.contains(r#""op":"erased""#)).count(), 3);
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    assert_eq!(audit.lines().filter(|l| l.contains(r#""action":"forget""#)).count(), 3);
    assert_keys(&LocalKeyring::open_local(dir.path()).unwrap(), &keys, &[7], &[8]);
}

/// Erasures and rotations say who asked and why; with a blank principal
/// or purpose nothing is erased, rotated or audited.
#[test]
fn erasure_and_rotation_are_attributed() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 3);
    let master = || std::fs::read(dir.path().join("master.json")).unwrap();
    let before = (std::fs::read(&kr.path).unwrap(), master());
    let blank =
        |principal: &str, purpose: &str| Access { principal: principal.into(), purpose: purpose.into() };
    for (anonymous, field) in [(blank("", "GDPR-1"), "principal"), (blank("dpo", " \t"), "purpose")] {
        let refused = |r: Result<()>| matches!(r, Err(Error::Unattributed { field: f }) if f == field);
        assert!(refused(kr.forget(&a, "s-1", &anonymous).map(drop)), "{anonymous:?}");
        assert!(refused(kr.forget_subjects(&a, &["s-1", "s-2"], &anonymous).map(drop)), "{anonymous:?}");
        assert!(refused(kr.rotate(&anonymous).map(drop)), "{anonymous:?}");
    }
    assert_eq!((std::fs::read(&kr.path).unwrap(), master()), before, "nothing erased or rotated");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default(),
        "",
        "nothing audited"
    );
    assert_keys(&kr, &keys, &[], &[0, 1, 2]);
    kr.forget(&a, "s-1", &blank("dpo", "GDPR-1")).unwrap();
    kr.rotate(&blank("ops", "CHG-2")).unwrap();
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let records: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let who = |r: &serde_json::Value| {
        [&r["action"], &r["principal"], &r["purpose"]].map(|v| v.as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(
        records.iter().map(who).collect::<Vec<_>>(),
        [["forget", "dpo", "GDPR-1"], ["rotate", "ops", "CHG-2"]]
    );
}

/// `subject_keys` answers as `forget_subjects` would, and erases
/// nothing: the log, the audit log and the keys are as they were.
#[test]
fn subject_keys_is_forget_without_the_erasure() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 10);
    let before = std::fs::read(&kr.path).unwrap();
    let asked = ["s-2", "nobody", "s-7", "s-7"];
    let anonymous = crate::Access { principal: " ".into(), purpose: "test".into() };
    assert!(matches!(kr.subject_keys(&a, &asked, &anonymous), Err(crate::Error::Unattributed { .. })));
    let found = kr.subject_keys(&a, &asked, &by()).unwrap();
    assert_eq!(std::fs::read(&kr.path).unwrap(), before, "the key log is untouched");
    // Audited as a dry run: who asked, why, and of which subjects (by
    // reference), since the answer says whose data the hub holds.
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
    assert!(!audit.contains(r#""action":"forget""#), "nothing erased");
    let records: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 1, "{audit}");
    let r = &records[0];
    assert_eq!(
        (&r["action"], &r["principal"], &r["purpose"]),
        (&"forget_dry_run".into(), &"ops".into(), &"test".into())
    );
    assert_eq!((r["subject_refs"].as_array().unwrap().len(), &r["with_keys"]), (3, &2.into()), "{r}");
    assert!(!audit.contains("s-2") && !audit.contains("nobody"), "subjects appear only as references");
    let other = AccountId::new("222222222222").unwrap();
    assert!(kr.subject_keys(&other, &["s-2"], &by()).unwrap()[0].is_none(), "keys are per account");
    let erased = kr.forget_subjects(&a, &asked, &by()).unwrap();
    let view = |v: &[Option<Erasure>]| -> Vec<Option<(Vec<KeyId>, String)>> {
        v.iter().map(|e| e.as_ref().map(|e| (e.key_ids.clone(), e.subject_ref.clone()))).collect()
    };
    assert_eq!(view(&found), view(&erased));
    assert_eq!(found[0].as_ref().unwrap().key_ids, vec![keys[2].0]);
}

/// Once shredded lines would be half the log, `forget` compacts it
/// instead: the log never holds more shredded bytes than live ones.
#[test]
fn the_log_is_compacted_once_half_of_it_is_shredded() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 40);
    let first = ino(&kr.path);
    let mut compacted = false;
    for i in 0..30 {
        kr.forget(&a, &format!("s-{i}"), &by()).unwrap();
        let text = std::fs::read_to_string(&kr.path).unwrap();
        let shredded: usize =
            text.lines().filter(|l| l.starts_with(r#"{"op":"shredded""#)).map(|l| l.len() + 1).sum();
        assert!(shredded * 2 <= text.len(), "{shredded} of {} bytes shredded", text.len());
        compacted |= ino(&kr.path) != first;
    }
    assert!(compacted, "never compacted");
    assert_keys(&LocalKeyring::open_local(dir.path()).unwrap(), &keys, &[29], &[35]);
    // Still shredded in place after the compaction.
    let before = ino(&kr.path);
    kr.forget(&a, "s-39", &by()).unwrap();
    assert_eq!(ino(&kr.path), before);
}

/// A crash after the erasure was written but before the key's line
/// was shredded: the next open shreds it. A key written twice (a write
/// repeated after a failed fsync) loses both lines.
#[test]
fn lines_left_by_a_crash_are_shredded_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (kr, keys) = subjects(dir.path(), 10);
    let path = kr.path.clone();
    drop(kr);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    // The line of s-4 written again, then the erasure of s-4 and s-6.
    writeln!(f, "{}", keys[4].1).unwrap();
    for i in [4, 6] {
        let v: serde_json::Value = serde_json::from_str(json(&keys[i].1)).unwrap();
        let line = Line::Erased {
            ids: vec![keys[i].0.to_hex()],
            account: "111111111111".into(),
            subject_ref: v["subject_ref"].as_str().map(str::to_owned),
            erased_at: chrono::Utc::now().to_rfc3339(),
        };
        writeln!(f, "{}", serde_json::to_string(&line).unwrap()).unwrap();
    }
    drop(f);
    let kr = LocalKeyring::open_local(dir.path()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for i in [4, 6] {
        assert!(!text.contains(&blob(&keys[i].1)), "s-{i}'s key is still in the log");
    }
    assert_keys(&kr, &keys, &[4, 6], &[5]);
}

/// A last line torn by a crash is cut off at open, so the next key is
/// a line of its own and the log reads back whole.
#[test]
fn a_torn_last_line_is_cut_off_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 3);
    let path = kr.path.clone();
    drop(kr);
    let whole = std::fs::read(&path).unwrap();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"op":"data_key","id":"00112233"#).unwrap();
    drop(f);
    let kr = LocalKeyring::open_local(dir.path()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole, "the torn line is still there");
    let new = kr.data_cipher(&a, Some("s-new")).unwrap().id();
    kr.sync().unwrap();
    let again = LocalKeyring::open_local(dir.path()).unwrap();
    assert_eq!(again.data_cipher(&a, Some("s-new")).unwrap().id(), new);
    assert_eq!(again.data_cipher(&a, Some("s-1")).unwrap().id(), keys[1].0);
}

/// A crash may tear the last line after any of its bytes, including
/// just after an inner object's `}` (the `wrapped` key's): whatever is
/// left of it, the keyring opens, with the keys before it, and a new key
/// written after it reads back.
#[test]
fn a_last_line_torn_after_any_byte_is_cut_off_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 3);
    let path = kr.path.clone();
    drop(kr);
    let text = std::fs::read(&path).unwrap();
    let last = &keys[2].1;
    assert!(text.ends_with(format!("{last}\n").as_bytes()), "s-2's line is the last");
    let before = &text[..text.len() - last.len() - 1];
    for cut in 1..=last.len() {
        let mut torn = before.to_vec();
        torn.extend_from_slice(&last.as_bytes()[..cut]);
        std::fs::write(&path, &torn).unwrap();
        let kr = LocalKeyring::open_local(dir.path())
            .unwrap_or_else(|e| panic!("torn after {cut} bytes ({:?}): {e}", &last[..cut]));
        assert_keys(&kr, &keys, &[], &[0, 1]);
        let new = kr.data_cipher(&a, Some("s-new")).unwrap().id();
        kr.sync().unwrap();
        let again = LocalKeyring::open_local(dir.path()).unwrap();
        assert_eq!(again.cipher_by_id(&new).unwrap().id(), new, "torn after {cut} bytes");
    }
}

/// A log cut back and written again with a line boundary where a
/// reader stopped (a failed write cut back, then another process's
/// append): the reader sees that the line it read last is not there
/// any more and reads the whole log, instead of reading on from a
/// place whose lines it never saw.
#[test]
fn a_log_rewritten_under_a_reader_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (reader, _) = subjects(dir.path(), 3);
    let other = LocalKeyring::open_local(dir.path()).unwrap();
    let gone = other.data_cipher(&a, Some("s-gone")).unwrap().id();
    other.sync().unwrap();
    drop(other);
    assert_eq!(reader.cipher_by_id(&gone).unwrap().id(), gone);
    let lines = log_lines(&reader);
    let line = lines.last().unwrap();
    assert!(line.contains(&gone.to_hex()));
    // The same length, another key, where the read stopped.
    let replaced = KeyId::random();
    let text = std::fs::read_to_string(&reader.path).unwrap();
    let cut = text.len() - line.len() - 1;
    let f = OpenOptions::new().write(true).open(&reader.path).unwrap();
    f.set_len(cut as u64).unwrap();
    let mut f = OpenOptions::new().append(true).open(&reader.path).unwrap();
    writeln!(f, "{}", sealed(&json(line).replace(&gone.to_hex(), &replaced.to_hex()))).unwrap();
    drop(f);
    let later = LocalKeyring::open_local(dir.path()).unwrap();
    let next = later.data_cipher(&a, Some("s-next")).unwrap().id();
    later.sync().unwrap();
    assert_eq!(reader.cipher_by_id(&next).unwrap().id(), next);
    assert!(
        matches!(reader.cipher_by_id(&gone), Err(Error::UnknownKey { .. })),
        "a key no longer in the log is still known"
    );
}

/// Key lines as written by hand (an escaped account, creation times
/// in other forms) read like the lines the keyring writes, and
/// compaction keeps every key: the same fields, the same instant of
/// creation, and a creation time that is not RFC 3339 as it was.
#[test]
fn hand_written_key_lines_read_alike_and_survive_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (kr, keys) = subjects(dir.path(), 3);
    let path = kr.path.clone();
    drop(kr);
    let text = std::fs::read_to_string(&path).unwrap();
    let created = |l: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(json(l)).unwrap();
        v["created"].as_str().unwrap().to_owned()
    };
    let zulu = created(&keys[0].1).replace("+00:00", "Z");
    // Written by hand: without a checksum, as lines were before they had one.
    let edited = json(&keys[0].1)
        .replace(r#""account":"111111111111""#, r#""account":"11111111111\u0031""#)
        .replace(&created(&keys[0].1), &zulu);
    let odd = json(&keys[1].1).replace(&created(&keys[1].1), "the day before launch");
    let text = text.replace(&keys[0].1, &edited).replace(&keys[1].1, &odd);
    std::fs::write(&path, text).unwrap();

    let kr = LocalKeyring::open_local(dir.path()).unwrap();
    assert_keys(&kr, &keys, &[], &[0, 1, 2]);
    assert_eq!(kr.data_cipher(&a, Some("s-0")).unwrap().id(), keys[0].0);
    let before = log_lines(&kr);
    {
        let mut st = lock(&kr.state);
        let _guard = kr.lock_file().unwrap();
        kr.compact(&mut st).unwrap();
    }
    let after = log_lines(&kr);
    let data_keys = |lines: &[String]| -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = lines
            .iter()
            .filter(|l| l.contains(r#""op":"data_key""#))
            .map(|l| serde_json::from_str(json(l)).unwrap())
            .collect();
        v.sort_by_key(|k| k["id"].as_str().unwrap().to_owned());
        v
    };
    let (before, after) = (data_keys(&before), data_keys(&after));
    assert_eq!(before.len(), 3);
    for (b, c) in before.iter().zip(&after) {
        let instant = |v: &serde_json::Value| {
            let t = v["created"].as_str().unwrap();
            chrono::DateTime::parse_from_rfc3339(t).map_or_else(|_| t.to_owned(), |t| t.to_rfc3339())
        };
        assert_eq!(instant(b), instant(c));
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("created");
            v
        };
        assert_eq!(strip(b), strip(c));
    }
    assert!(after.iter().any(|k| k["created"] == "the day before launch"));
    // The escaped account is the account: its subject is forgotten.
    assert_eq!(kr.forget(&a, "s-0", &by()).unwrap().key_ids, vec![keys[0].0]);
    assert_keys(&LocalKeyring::open_local(dir.path()).unwrap(), &keys, &[0], &[1, 2]);
}

/// A data key line with a field the keyring does not know is an
/// error, as any other line that does not read (the fast path for
/// data key lines accepts nothing more).
#[test]
fn a_key_line_with_an_unknown_field_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (kr, keys) = subjects(dir.path(), 2);
    let path = kr.path.clone();
    drop(kr);
    let text = std::fs::read_to_string(&path).unwrap();
    let extra = sealed(&json(&keys[1].1).replace(r#""current":"#, r#""colour":"blue","current":"#));
    std::fs::write(&path, text.replace(&keys[1].1, &extra)).unwrap();
    match LocalKeyring::open_local(dir.path()) {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("colour"), "{detail}"),
        other => panic!("opened: {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_failed_key_log_write_is_cut_back_and_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let kr = LocalKeyring::open_local(dir.path()).unwrap();
    let first = kr.data_cipher(&a, Some("s-1")).unwrap().id();
    kr.sync().unwrap();
    let second = kr.data_cipher(&a, Some("s-2")).unwrap().id();
    tear_next_write(&kr.path, 20);
    assert!(kr.sync().is_err(), "the torn write fails the sync");
    kr.sync().unwrap();
    // The log reads back whole, with both keys.
    let other = LocalKeyring::open_local(dir.path()).unwrap();
    assert_eq!(other.data_cipher(&a, Some("s-1")).unwrap().id(), first);
    assert_eq!(other.data_cipher(&a, Some("s-2")).unwrap().id(), second);
}

/// `keys rotate` beside a running hub: the hub unwraps the keys rewrapped
/// under the new master key, and wraps its new keys under it.
#[test]
fn a_running_hub_takes_in_a_rotation_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let (made, keys) = subjects(dir.path(), 2);
    drop(made);
    let hub = LocalKeyring::open_local(dir.path()).unwrap();
    let new_master = LocalKeyring::open_local(dir.path()).unwrap().rotate(&by()).unwrap();
    assert_eq!(hub.cipher_by_id(&keys[0].0).unwrap().id(), keys[0].0, "rewrapped, and read");
    let fresh = hub.data_cipher(&a, Some("s-new")).unwrap().id();
    hub.sync().unwrap();
    let line = log_lines(&hub).into_iter().find(|l| l.contains(&fresh.to_hex())).unwrap();
    let v: serde_json::Value = serde_json::from_str(json(&line)).unwrap();
    assert_eq!(v["wrapped"]["master"], new_master.as_str(), "{line}");
    // Another rotation, through the hub's own keyring, knows both.
    let third = hub.rotate(&by()).unwrap();
    assert_ne!(third, new_master);
    let reader = LocalKeyring::open_local(dir.path()).unwrap();
    for id in [keys[1].0, fresh] {
        assert_eq!(reader.cipher_by_id(&id).unwrap().id(), id);
    }
}

/// One step of [`any_history_of_keys_erasures_rotations_and_restarts`]:
/// the hub's keyring, or a `keys` command (a keyring opened for it, on
/// the same directory).
#[derive(Debug, Clone)]
enum Step {
    /// The hub takes a key for subject `s` (new, or the subject's current
    /// one).
    Key { s: usize },
    /// The hub makes its new keys durable (before it acknowledges the
    /// events they encrypt).
    Sync,
    /// The hub reads key `i` of those made so far by its id (as
    /// `keys decrypt` and a cold cache do).
    Read { i: usize },
    /// `keys forget` of subject `s`.
    Forget { s: usize },
    /// `keys rotate`.
    Rotate,
    /// The hub restarts (its keys not yet synced are lost with it; their
    /// events were never acknowledged).
    Restart,
}

use proptest::strategy::Strategy as _;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Whatever the history of the hub's new keys, syncs, reads and
    /// restarts and of `keys forget` and `keys rotate` beside it: nothing
    /// fails on the way, and at the end a key made durable reads back
    /// (the same key, through a keyring opened afresh and through the
    /// hub's) unless its subject was forgotten after it was, and then
    /// reads as erased. (A key the hub held but had not made durable when
    /// its subject was forgotten may go either way: no event it encrypts
    /// was acknowledged before the erasure.)
    #[test]
    fn any_history_of_keys_erasures_rotations_and_restarts(
        steps in proptest::collection::vec(
            proptest::prop_oneof![
                4 => (0usize..4).prop_map(|s| Step::Key { s }),
                3 => proptest::strategy::Just(Step::Sync),
                2 => (0usize..64).prop_map(|i| Step::Read { i }),
                2 => (0usize..4).prop_map(|s| Step::Forget { s }),
                1 => proptest::strategy::Just(Step::Rotate),
                1 => proptest::strategy::Just(Step::Restart),
            ],
            1..40,
        ),
    ) {
        use proptest::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let subject = |s: usize| format!("s-{s}");
        let mut hub = LocalKeyring::open_local(dir.path()).unwrap();
        // Keys the hub made: (id, subject, made at step, synced at step).
        let mut keys: Vec<(KeyId, usize, usize, Option<usize>)> = Vec::new();
        // Erasures: (subject, at step).
        let mut forgets: Vec<(usize, usize)> = Vec::new();
        // Whether key `(s, made, synced)` is to read as erased (`None`:
        // either way).
        let erased = |forgets: &[(usize, usize)], s: usize, made: usize, synced: Option<usize>| {
            let mut erasures = forgets.iter().filter(|&&(fs, ft)| fs == s && ft > made);
            match synced {
                None => None,
                Some(at) if erasures.clone().any(|&(_, ft)| ft > at) => Some(true),
                Some(_) if erasures.next().is_some() => None,
                Some(_) => Some(false),
            }
        };
        for (t, step) in steps.iter().enumerate() {
            match *step {
                Step::Key { s } => {
                    let c = hub.data_cipher(&a, Some(&subject(s)));
                    prop_assert!(c.is_ok(), "{:?}", c.err());
                    let id = c.unwrap().id();
                    if !keys.iter().any(|&(i, ..)| i == id) {
                        keys.push((id, s, t, None));
                    }
                }
                Step::Sync => {
                    let r = hub.sync();
                    prop_assert!(r.is_ok(), "{:?}", r.err());
                    for key in keys.iter_mut().filter(|key| key.3.is_none()) {
                        key.3 = Some(t);
                    }
                }
                Step::Read { i } => {
                    let Some(&(id, s, made, synced)) = keys.get(i % keys.len().max(1)) else { continue };
                    match (hub.cipher_by_id(&id), erased(&forgets, s, made, synced)) {
                        (Ok(c), Some(false) | None) => prop_assert_eq!(c.id(), id),
                        (Err(Error::KeyErased { .. }), Some(true) | None) => {}
                        (got, want) => prop_assert!(false, "the hub reads key {:?} of s-{}: {:?}, erased: {:?}", id, s, got.map(|c| c.id()), want),
                    }
                }
                Step::Forget { s } => {
                    let cli = LocalKeyring::open_local(dir.path()).unwrap();
                    match cli.forget(&a, &subject(s), &by()) {
                        Ok(_) | Err(Error::NothingToForget { .. }) => forgets.push((s, t)),
                        Err(e) => prop_assert!(false, "forget: {}", e),
                    }
                }
                Step::Rotate => {
                    let cli = LocalKeyring::open_local(dir.path()).unwrap();
                    let r = cli.rotate(&by());
                    prop_assert!(r.is_ok(), "{:?}", r.err());
                }
                Step::Restart => {
                    hub = LocalKeyring::open_local(dir.path()).unwrap();
                    keys.retain(|key| key.3.is_some());
                }
            }
        }
        let fresh = LocalKeyring::open_local(dir.path()).unwrap();
        for &(id, s, made, synced) in &keys {
            let Some(want) = erased(&forgets, s, made, synced) else { continue };
            for (who, kr) in [("a fresh keyring", &fresh), ("the hub", &hub)] {
                match kr.cipher_by_id(&id) {
                    Ok(c) => prop_assert!(!want && c.id() == id, "{} reads key {:?} of s-{} back though erased", who, id, s),
                    Err(Error::KeyErased { .. }) => prop_assert!(want, "{} reads key {:?} of s-{} as erased", who, id, s),
                    Err(e) => prop_assert!(false, "{} reads key {:?} of s-{}: {}", who, id, s, e),
                }
            }
        }
    }
}

/// The key log's lines as the keyring holds them, in a comparable form.
fn held_lines(kr: &LocalKeyring) -> Vec<String> {
    let mut lines: Vec<String> =
        lock(&kr.state).state.snapshot().iter().map(|l| serde_json::to_string(l).unwrap()).collect();
    lines.sort();
    lines
}

/// A digit of a key's `subject_ref` changed on disk leaves the line
/// valid JSON, and would attach the key to another subject (whose
/// erasure would then miss it): the line's checksum refuses it, naming
/// the line.
#[test]
fn a_key_line_damaged_on_disk_is_refused_by_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (kr, keys) = subjects(dir.path(), 3);
    let (path, lines) = (kr.path.clone(), log_lines(&kr));
    drop(kr);
    let number = lines.iter().position(|l| *l == keys[1].1).unwrap() + 1;
    let at = keys[1].1.find(r#""subject_ref":""#).unwrap() + r#""subject_ref":""#.len();
    let mut line = keys[1].1.clone().into_bytes();
    line[at] = if line[at] == b'0' { b'1' } else { b'0' };
    let line = String::from_utf8(line).unwrap();
    serde_json::from_str::<serde_json::Value>(json_unchecked(&line)).expect("still valid JSON");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(&keys[1].1, &line)).unwrap();
    match LocalKeyring::open_local(dir.path()) {
        Err(e @ Error::Corrupt { .. }) => {
            let e = e.to_string();
            assert!(e.contains(&format!("line {number} ")) && e.contains("checksum does not match"), "{e}");
        }
        other => panic!("opened: {:?}", other.map(|_| ())),
    }
}

/// A line's JSON, its checksum cut off unchecked.
fn json_unchecked(line: &str) -> &str {
    line.rsplit_once('\t').map_or(line, |(json, _)| json)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    /// Any one byte of the key log changed on disk (a data key's line,
    /// the index and token keys', an erasure's, a shredded line's): the
    /// keyring either refuses to open, or opens holding exactly what it
    /// held before (a change that leaves the same meaning, such as a
    /// shredded line's padding turned to another kind of JSON space).
    /// Never a key moved to another subject or account, or an erasure
    /// lost. (The last newline is left out: a last line without one reads
    /// as a write a crash tore, and is cut off, as it must be.)
    #[test]
    fn any_damaged_byte_of_the_key_log_is_refused_or_harmless(at in 0usize..1 << 20, delta in 1u8..=255) {
        use proptest::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, _) = subjects(dir.path(), 4);
        kr.token_key(&a).unwrap();
        kr.data_cipher(&a, None).unwrap();
        kr.forget(&a, "s-2", &by()).unwrap();
        kr.sync().unwrap();
        let path = kr.path.clone();
        drop(kr);
        let whole = std::fs::read(&path).unwrap();
        let before = held_lines(&LocalKeyring::open_local(dir.path()).unwrap());
        let at = at % (whole.len() - 1);
        let mut damaged = whole.clone();
        damaged[at] = damaged[at].wrapping_add(delta);
        std::fs::write(&path, &damaged).unwrap();
        match LocalKeyring::open_local(dir.path()) {
            Err(Error::Corrupt { .. }) => {}
            Ok(kr) => prop_assert_eq!(held_lines(&kr), before, "byte {} changed from {:?}", at, whole[at] as char),
            Err(e) => prop_assert!(false, "byte {}: {}", at, e),
        }
    }
}
