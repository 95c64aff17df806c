//! Protection: round trips, token determinism and separation, nonce
//! uniqueness, crypto-shredding, rotation, and the keyring's file rules.

use std::collections::HashSet;

use proptest::prelude::*;
use watershed_event::AccountId;
use watershed_protect::{Access, BatchProtector, Decryptor, Error, Keyring, LocalKeyring};
use watershed_schema::{validate_json, Limits, Registry, Slot, Tape, UnknownFields};

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn acct(s: &str) -> AccountId {
    AccountId::new(s).unwrap()
}

fn access() -> Access {
    Access { principal: "auditor@example".into(), purpose: "case-1".into() }
}

fn payments() -> (Registry, tempfile::TempDir, LocalKeyring) {
    let reg = Registry::load(&manifest_dir().join("../../schemas")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kr = LocalKeyring::open_local(&dir.path().join("keyring")).unwrap();
    (reg, dir, kr)
}

fn payment(customer: &str, pan: &str, holder: &str) -> String {
    serde_json::json!({
        "payment_id": "p-1", "customer_id": customer, "amount": "19.99", "currency": "EUR",
        "card": {"pan": pan, "holder_name": holder, "brand": "VISA", "expiry": "12/29"},
        "merchant": {"id": "m-1", "name": "Shop", "mcc": 5411, "country": "DE"},
        "authorized_at": "2024-05-01T12:00:00Z", "risk_score": 0.12, "three_ds": true
    })
    .to_string()
}

/// Validate `json` onto `tape`, which may hold other events; its root.
fn append_valid(node: &watershed_schema::Node, json: &str, tape: &mut Tape) -> Slot {
    watershed_schema::validate_json_append(
        node,
        json.as_bytes(),
        UnknownFields::Reject,
        Limits::default(),
        tape,
    )
    .unwrap()
}

/// Validate and protect one payment; return (customer token, masked pan,
/// holder ciphertext, expiry slot).
fn protect_payment(
    reg: &Registry,
    kr: &LocalKeyring,
    account: &str,
    json: &str,
) -> (String, String, String, Slot) {
    let (_, v) = reg.resolve("com.example.payments", "PaymentAuthorized", None).unwrap();
    let mut tape = Tape::new();
    validate_json(&v.node, json.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape).unwrap();
    let mut p = BatchProtector::new(kr);
    p.protect(&acct(account), &v.protect, &mut tape).unwrap();
    kr.sync().unwrap();
    let Slot::Record(card) = tape.slot(4) else { panic!("card") };
    (
        tape.str(tape.slot(1)).to_owned(),
        tape.str(tape.slot(card)).to_owned(),
        tape.str(tape.slot(card + 1)).to_owned(),
        tape.slot(card + 3),
    )
}

#[test]
fn each_action_on_the_payment_schema() {
    let (reg, _dir, kr) = payments();
    let (token, pan, holder, expiry) =
        protect_payment(&reg, &kr, "111111111111", &payment("c-42", "4111111111111111", "Ada Lovelace"));
    assert_eq!(pan, "************1111");
    assert_eq!(expiry, Slot::Null, "redacted");
    assert_eq!(token.len(), 22);
    assert_ne!(token, "c-42");
    assert!(holder.starts_with("wse1.") && !holder.contains("Ada"));
    let out = Decryptor::new(&kr).decrypt(&access(), &[&holder]).unwrap();
    assert_eq!(out[0].as_ref().unwrap().expose_str().unwrap(), "Ada Lovelace");
    let audit = std::fs::read_to_string(watershed_protect::Audited::audit_log(&kr).path()).unwrap();
    assert!(
        audit.contains("\"action\":\"decrypt\"")
            && audit.contains("auditor@example")
            && !audit.contains("Ada")
    );
    // Nobody and no reason is not an audit record: refused, nothing decrypted or logged.
    for (principal, purpose, field) in [("", "case-1", "principal"), ("auditor@example", " \t", "purpose")] {
        let anonymous = Access { principal: principal.into(), purpose: purpose.into() };
        match Decryptor::new(&kr).decrypt(&anonymous, &[&holder]) {
            Err(e @ Error::Unattributed { .. }) => assert!(e.to_string().contains(field), "{e}"),
            other => panic!("{principal:?}/{purpose:?}: {other:?}"),
        }
    }
    let after = std::fs::read_to_string(watershed_protect::Audited::audit_log(&kr).path()).unwrap();
    assert_eq!(after, audit, "no record for a refused call");
}

#[test]
fn shredding_erases_one_subject_only() {
    let (reg, dir, kr) = payments();
    let (_, _, alice_ct, _) =
        protect_payment(&reg, &kr, "111111111111", &payment("alice", "4111111111111111", "Alice A"));
    let (_, _, bob_ct, _) =
        protect_payment(&reg, &kr, "111111111111", &payment("bob", "4111111111111111", "Bob B"));
    let (_, _, other_acct_alice, _) =
        protect_payment(&reg, &kr, "222222222222", &payment("alice", "4111111111111111", "Alice A"));

    // Forget through a second handle, as the CLI does beside a running hub.
    let cli = LocalKeyring::open_local(&dir.path().join("keyring")).unwrap();
    let erased = cli.forget(&acct("111111111111"), "alice", &access()).unwrap();
    assert_eq!(erased.key_ids.len(), 1);

    let out = Decryptor::new(&kr).decrypt(&access(), &[&alice_ct, &bob_ct, &other_acct_alice]).unwrap();
    match &out[0] {
        Err(e @ Error::KeyErased { .. }) => assert!(e.to_string().starts_with("key_erased")),
        other => panic!("expected key_erased, got {other:?}"),
    }
    assert_eq!(out[1].as_ref().unwrap().expose_str().unwrap(), "Bob B");
    assert_eq!(out[2].as_ref().unwrap().expose_str().unwrap(), "Alice A", "other account unaffected");
    assert!(matches!(
        cli.forget(&acct("111111111111"), "alice", &access()),
        Err(Error::NothingToForget { .. })
    ));
    let audit = std::fs::read_to_string(dir.path().join("keyring/audit.log")).unwrap();
    assert!(audit.contains("\"action\":\"forget\"") && !audit.contains("alice"), "{audit}");
    // The erased key is gone from the file, not only from memory.
    let log = std::fs::read_to_string(dir.path().join("keyring/keys.log")).unwrap();
    let id = erased.key_ids[0].to_hex();
    // Each line is JSON, then a tab and its checksum (none on shredded lines).
    let json = |l: &str| l.rsplit_once('\t').map_or(l, |(json, _)| json).to_owned();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(&json(l)).unwrap()).collect();
    assert!(
        !lines.iter().any(|l| l["op"] == "data_key" && l["id"] == id.as_str()),
        "erased key material is still in the log"
    );
    assert!(
        lines.iter().any(|l| l["op"] == "erased" && l["ids"][0] == id.as_str()),
        "erasure tombstone missing"
    );
}

/// An event whose data-subject field is empty names no one: its values are
/// encrypted under the account's key, as an event without the field would
/// be, not under a key of subject `""` that every such event would share
/// (and that forgetting `""` would shred for all of them at once).
#[test]
fn an_empty_data_subject_uses_the_accounts_key() {
    let (reg, _dir, kr) = payments();
    let a = acct("111111111111");
    let key_of = |ct: &str| watershed_protect::cipher::parse(ct).unwrap().key_id;
    let (_, _, empty, _) =
        protect_payment(&reg, &kr, "111111111111", &payment("", "4111111111111111", "Nobody"));
    let account_key = kr.data_cipher(&a, None).unwrap().id();
    assert_eq!(key_of(&empty), account_key);
    let (_, _, named, _) =
        protect_payment(&reg, &kr, "111111111111", &payment("c-9", "4111111111111111", "Ann"));
    assert_ne!(key_of(&named), account_key, "a named subject has its own key");
    // The batch path notes no subject for it either.
    let (_, v) = reg.resolve("com.example.payments", "PaymentAuthorized", None).unwrap();
    let mut tape = Tape::new();
    let root = append_valid(&v.node, &payment("", "4111111111111111", "Nobody"), &mut tape);
    let mut p = BatchProtector::new(&kr);
    assert!(!p.note(&v.protect, &tape, root).needs_key());
    assert!(matches!(kr.forget(&a, "", &access()), Err(Error::NothingToForget { .. })), "no key of \"\"");
    kr.sync().unwrap();
}

/// A running hub's keyring notices an erasure made by another process
/// within its refresh interval: new events of the erased subject get a new
/// key, never the erased one, while other subjects keep theirs.
#[test]
fn a_running_keyring_stops_using_an_erased_key() {
    let (_, dir, kr) = payments();
    let a = acct("111111111111");
    let alice = kr.data_cipher(&a, Some("alice")).unwrap().id();
    let bob = kr.data_cipher(&a, Some("bob")).unwrap().id();
    kr.sync().unwrap();
    assert_eq!(kr.data_cipher(&a, Some("alice")).unwrap().id(), alice, "the index answers repeat lookups");

    let cli = LocalKeyring::open_local(&dir.path().join("keyring")).unwrap();
    cli.forget(&a, "alice", &access()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(250));
    let fresh = kr.data_cipher(&a, Some("alice")).unwrap().id();
    assert_ne!(fresh, alice, "the erased key is not used again");
    assert_eq!(kr.data_cipher(&a, Some("bob")).unwrap().id(), bob, "other subjects keep their keys");
    kr.sync().unwrap();
}

/// Events received before their subject was forgotten, but protected
/// only after it (replayed from the WAL after a crash), are as unreadable
/// as if they had been stored in time: a replaying protector encrypts them
/// under an erased key's id and creates no new key. Events received after
/// the erasure get a new, readable key; other subjects are untouched.
#[test]
fn replayed_events_of_a_forgotten_subject_stay_erased() {
    let (reg, dir, kr) = payments();
    let a = acct("111111111111");
    let (_, v) = reg.resolve("com.example.payments", "PaymentAuthorized", None).unwrap();
    let erased = kr.data_cipher(&a, Some("alice")).unwrap().id();
    kr.data_cipher(&a, Some("bob")).unwrap();
    kr.sync().unwrap();
    let received = chrono::Utc::now().timestamp_micros();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let cli = LocalKeyring::open_local(&dir.path().join("keyring")).unwrap();
    cli.forget(&a, "alice", &access()).unwrap();
    let later = chrono::Utc::now().timestamp_micros() + 1;

    // Protect two payments of alice's and one of bob's as replay does.
    let replay = |received_at: i64, customer: &str| {
        let mut tape = Tape::new();
        let json = payment(customer, "4111111111111111", "Ada Lovelace");
        validate_json(&v.node, json.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape).unwrap();
        let root = tape.root();
        let mut p = BatchProtector::replaying(&kr, received_at);
        let noted = p.note(&v.protect, &tape, root);
        p.fetch(&a).unwrap();
        p.protect_noted(&a, &v.protect, &mut tape, root, noted).unwrap();
        let Slot::Record(card) = tape.slot(4) else { panic!("card") };
        let holder = tape.str(tape.slot(card + 1)).to_owned();
        // A dead letter of the same subject, encrypted whole.
        let mut whole = Vec::new();
        p.encrypt_whole(&a, Some(customer), json.as_bytes(), &mut whole).unwrap();
        (holder, String::from_utf8(whole).unwrap())
    };
    let (before, before_whole) = replay(received, "alice");
    kr.sync().unwrap();
    let cli = LocalKeyring::open_local(&dir.path().join("keyring")).unwrap();
    assert!(
        matches!(cli.forget(&a, "alice", &access()), Err(Error::NothingToForget { .. })),
        "replaying an event received before the erasure created a key"
    );
    let (after, _) = replay(later, "alice");
    let (bob, _) = replay(received, "bob");
    kr.sync().unwrap();
    let out = Decryptor::new(&kr).decrypt(&access(), &[&before, &before_whole, &after, &bob]).unwrap();
    for (i, o) in out[..2].iter().enumerate() {
        match o {
            Err(Error::KeyErased { key_id, .. }) => assert_eq!(*key_id, erased.to_hex(), "value {i}"),
            other => panic!("value {i}: expected key_erased, got {other:?}"),
        }
    }
    assert_eq!(out[2].as_ref().unwrap().expose_str().unwrap(), "Ada Lovelace", "received after the erasure");
    assert_eq!(out[3].as_ref().unwrap().expose_str().unwrap(), "Ada Lovelace", "another subject");
}

#[test]
fn rotation_keeps_old_ciphertexts_readable() {
    let (reg, _dir, kr) = payments();
    let (_, _, before, _) =
        protect_payment(&reg, &kr, "111111111111", &payment("alice", "4111111111111111", "Alice A"));
    let new_master = kr.rotate(&access()).unwrap();
    assert_eq!(new_master, "mk-2");
    let (_, _, after, _) =
        protect_payment(&reg, &kr, "111111111111", &payment("alice", "4111111111111111", "Alice A"));
    let id = |ct: &str| watershed_protect::cipher::parse(ct).unwrap().key_id;
    assert_ne!(id(&before), id(&after), "new data key after rotation");
    let out = Decryptor::new(&kr).decrypt(&access(), &[&before, &after]).unwrap();
    assert!(out.iter().all(|r| r.as_ref().unwrap().expose_str().unwrap() == "Alice A"));
    // Shredding covers every generation of the subject's key.
    assert_eq!(kr.forget(&acct("111111111111"), "alice", &access()).unwrap().key_ids.len(), 2);
}

#[test]
fn keyring_files_are_private_and_tamper_is_detected() {
    let (reg, dir, kr) = payments();
    let (_, _, ct, _) = protect_payment(&reg, &kr, "111111111111", &payment("alice", "4111", "Alice A"));
    #[cfg(unix)]
    for f in ["keys.log", "master.json", "audit.log"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("keyring").join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let mut raw = ct.into_bytes();
    let n = raw.len();
    raw[n - 3] = if raw[n - 3] == b'A' { b'B' } else { b'A' };
    let out = Decryptor::new(&kr).decrypt(&access(), &[std::str::from_utf8(&raw).unwrap(), "plain"]).unwrap();
    assert!(matches!(out[0], Err(Error::BadCiphertext { .. })));
    assert!(matches!(out[1], Err(Error::BadCiphertext { .. })));
}

#[test]
fn redacting_an_array_nulls_the_field_itself() {
    use watershed_schema::{Kind, Node, Protect};
    let strings =
        Node { kind: Kind::Array(Box::new(Node { kind: Kind::String, nullable: false })), nullable: false };
    let (node, plan) = one_field("tags", strings, Protect::Redact);
    let mut tape = Tape::new();
    validate_json(&node, br#"{"tags":["a","b"]}"#, UnknownFields::Reject, Limits::default(), &mut tape)
        .unwrap();
    let (_, kr) = shared_keyring();
    BatchProtector::new(kr).protect(&acct("123456789012"), &plan, &mut tape).unwrap();
    assert_eq!(tape.slot(0), Slot::Null, "the list is gone, not its items one by one");
}

#[test]
fn short_values_are_masked_entirely() {
    let mut out = Vec::new();
    watershed_protect::mask("123", 4, &mut out);
    assert_eq!(out, b"***");
    out.clear();
    watershed_protect::mask("zürich-1234", 4, &mut out);
    assert_eq!(String::from_utf8(out).unwrap(), "*******1234");
}

fn shared_keyring() -> &'static (tempfile::TempDir, LocalKeyring) {
    static KR: std::sync::OnceLock<(tempfile::TempDir, LocalKeyring)> = std::sync::OnceLock::new();
    KR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let kr = LocalKeyring::open_local(dir.path()).unwrap();
        (dir, kr)
    })
}

/// A record schema of one protected field, and its protection plan.
fn one_field(
    name: &str,
    field: watershed_schema::Node,
    action: watershed_schema::Protect,
) -> (watershed_schema::Node, watershed_schema::ProtectPlan) {
    use watershed_schema::{Field, FieldAction, Kind, Node, ProtectPlan, Record};
    let node = Node {
        kind: Kind::Record(Record {
            name: "T".into(),
            fields: vec![Field {
                name: name.into(),
                node: field,
                default: None,
                default_json: None,
                protect: Some(action),
                data_subject: false,
            }],
            lookup: [(name.to_owned(), 0)].into_iter().collect(),
        }),
        nullable: false,
    };
    let plan = ProtectPlan {
        actions: vec![FieldAction { path: vec![0], name: name.into(), action }],
        data_subject: None,
    };
    (node, plan)
}

fn string_tape(value: &str) -> (watershed_schema::Node, watershed_schema::ProtectPlan, Tape) {
    use watershed_schema::{Kind, Node, Protect};
    let (node, plan) = one_field("v", Node { kind: Kind::String, nullable: false }, Protect::Encrypt);
    let mut tape = Tape::new();
    let json = serde_json::json!({ "v": value }).to_string();
    validate_json(&node, json.as_bytes(), UnknownFields::Reject, Limits::default(), &mut tape).unwrap();
    (node, plan, tape)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn encrypt_then_decrypt_round_trips(value in "\\PC{0,200}", account in "[0-9]{12}") {
        let (_, kr) = shared_keyring();
        let (_, plan, mut tape) = string_tape(&value);
        BatchProtector::new(kr).protect(&acct(&account), &plan, &mut tape).unwrap();
        let ct = tape.str(tape.slot(0)).to_owned();
        prop_assert!(ct.starts_with("wse1."));
        let out = Decryptor::new(kr).decrypt(&access(), &[&ct]).unwrap();
        prop_assert_eq!(out[0].as_ref().unwrap().expose_str().unwrap(), value.as_str());
    }

    #[test]
    fn tokens_are_deterministic_and_account_separated(value in "\\PC{0,64}", a in "[0-9]{12}", b in "[0-9]{12}") {
        prop_assume!(a != b);
        let (_, kr) = shared_keyring();
        let mac = |acc: &str| {
            use hmac::Mac;
            let k = kr.token_key(&acct(acc)).unwrap();
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(k.expose()).unwrap()
        };
        let tok = |acc: &str| { let mut o = Vec::new(); watershed_protect::tokenize(&mac(acc), value.as_bytes(), &mut o); String::from_utf8(o).unwrap() };
        prop_assert_eq!(tok(&a), tok(&a));
        prop_assert_ne!(tok(&a), tok(&b));
        prop_assert_eq!(tok(&a).len(), 22);
    }

    #[test]
    fn nonces_never_repeat(n in 100usize..400) {
        let (_, kr) = shared_keyring();
        let mut p = BatchProtector::new(kr);
        let mut seen = HashSet::new();
        let (_, plan, template) = string_tape("same plaintext");
        for _ in 0..n {
            let mut tape = template.clone();
            p.protect(&acct("123456789012"), &plan, &mut tape).unwrap();
            let parsed = watershed_protect::cipher::parse(tape.str(tape.slot(0))).unwrap();
            prop_assert!(seen.insert(parsed.nonce), "nonce reused");
        }
    }
}

/// A batch's subject keys fetched in one call: the same keys one-by-one
/// lookups give, created once per subject (repeats included), and the
/// events protected with them read back; a forgotten subject gets a new
/// key in the next batch.
#[test]
fn batched_subject_keys_match_single_lookups() {
    let (reg, _dir, kr) = payments();
    let (_, v) = reg.resolve("com.example.payments", "PaymentAuthorized", None).unwrap();
    let account = acct("111111111111");
    let customers = ["c-1", "c-2", "c-1", "c-3", "c-2"];
    let mut tape = Tape::new();
    let mut p = BatchProtector::new(&kr);
    let mut events = Vec::new();
    for c in customers {
        let root = append_valid(&v.node, &payment(c, "4111111111111111", &format!("Holder {c}")), &mut tape);
        let noted = p.note(&v.protect, &tape, root);
        assert!(noted.needs_key());
        events.push((c, root, noted));
    }
    p.fetch(&account).unwrap();
    kr.sync().unwrap();
    let mut holders = Vec::new();
    for &(c, root, noted) in &events {
        p.protect_noted(&account, &v.protect, &mut tape, root, noted).unwrap();
        let Slot::Record(r) = root else { panic!("record") };
        let Slot::Record(card) = tape.slot(r + 4) else { panic!("card") };
        let holder = tape.str(tape.slot(card + 1)).to_owned();
        let out = Decryptor::new(&kr).decrypt(&access(), &[&holder]).unwrap();
        assert_eq!(out[0].as_ref().unwrap().expose_str().unwrap(), format!("Holder {c}"));
        holders.push((c, holder));
    }
    let ids: HashSet<_> = kr.data_ciphers(&account, &customers).unwrap().iter().map(|c| c.id()).collect();
    assert_eq!(ids.len(), 3, "one key per subject");
    let before = kr.data_ciphers(&account, &["c-2"]).unwrap()[0].id();
    kr.forget(&account, "c-2", &access()).unwrap();
    // Each event was encrypted under its own subject's key: forgetting one
    // subject shreds exactly that subject's values.
    for (c, holder) in &holders {
        let out = Decryptor::new(&kr).decrypt(&access(), &[holder]).unwrap();
        assert_eq!(out[0].is_ok(), *c != "c-2", "{c}");
    }
    let after = kr.data_ciphers(&account, &["c-1", "c-2"]).unwrap();
    assert_ne!(after[1].id(), before, "a forgotten subject starts over");
    assert_eq!(after[0].id(), kr.data_cipher(&account, Some("c-1")).unwrap().id());
}

/// Keys created on several threads while others sync (the hub's request
/// threads and its WAL thread) are all in the log once every sync that
/// followed their creation has returned: a second keyring over the same
/// directory finds each subject's key, not a new one.
#[test]
fn keys_created_while_other_threads_sync_are_all_durable() {
    let (_, dir, kr) = payments();
    let a = acct("111111111111");
    let made: Vec<(String, [u8; 16])> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (kr, a) = (&kr, &a);
                s.spawn(move || {
                    (0..200)
                        .map(|i| {
                            let subject = format!("subject-{t}-{i}");
                            let id = kr.data_cipher(a, Some(&subject)).unwrap().id();
                            if i % 7 == 0 {
                                kr.sync().unwrap();
                            }
                            (subject, id.0)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    kr.sync().unwrap();
    let other = LocalKeyring::open_local(&dir.path().join("keyring")).unwrap();
    for (subject, id) in &made {
        assert_eq!(other.data_cipher(&a, Some(subject)).unwrap().id().0, *id, "{subject} lost its key");
    }
}
