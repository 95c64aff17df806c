//! The per-event pipeline on envelopes whose `detail` comes after `source`
//! and `detail-type` (as EventBridge writes them), so the payload is
//! validated in the envelope pass, and on the same events with the keys
//! in other orders: the outcomes must be identical.

use std::sync::Arc;

use arrow::array::{AsArray, Int32Array};
use watershed_event::AccountId;
use watershed_hub::dedupe::Dedupe;
use watershed_hub::ingest::Ingestor;
use watershed_hub::metrics::Metrics;
use watershed_protect::LocalKeyring;
use watershed_schema::{Limits, Registry};

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

/// When the requests arrive: 2024-05-02T00:00:00Z, after every event's
/// time (an event dated more than a day after its receipt is refused).
const RECEIVED: i64 = 1_714_608_000_000_000;

const DETAIL: &str = r#"{"payment_id":"p","customer_id":"c-1","amount":"1.00","currency":"EUR","card":{"pan":"4111111111111111","holder_name":"Ada","brand":"VISA","expiry":"1/30"},"merchant":{"id":"m","name":"n","mcc":1,"country":"DE"},"authorized_at":"2024-05-01T00:00:00Z","risk_score":0.5,"three_ds":true}"#;

fn event(id: &str, detail: &str, version: &str, detail_last: bool) -> String {
    let head = format!(
        r#""id":"{id}","source":"com.example.payments","detail-type":"PaymentAuthorized","time":"2024-05-01T00:00:00Z""#
    );
    if detail_last {
        format!(r#"{{{head}{version},"detail":{detail}}}"#)
    } else {
        format!(r#"{{"detail":{detail}{version},{head}}}"#)
    }
}

/// An ingestor over the repository's schemas and a fresh local keyring.
fn ingestor() -> (tempfile::TempDir, Ingestor) {
    let reg = Arc::new(Registry::load(&manifest_dir().join("../../schemas")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(LocalKeyring::open_local(dir.path()).unwrap());
    let dedupe = Arc::new(Dedupe::new(10_000));
    (dir, Ingestor::new(reg, keyring, dedupe, Limits::default(), Arc::new(Metrics::default())))
}

#[test]
fn inline_and_deferred_validation_agree() {
    let (_dir, ingestor) = ingestor();
    let account = AccountId::new("111111111111").unwrap();
    let bad = DETAIL.replace("EUR", "DOGE");
    for detail_last in [true, false] {
        let p = if detail_last { "a" } else { "b" };
        let events = [
            event(&format!("{p}1"), DETAIL, "", detail_last),
            event(&format!("{p}2"), &bad, "", detail_last),
            event(&format!("{p}3"), DETAIL, r#","schema-version":1"#, detail_last),
            // The version named after the payload still applies.
            format!(
                r#"{{"id":"{p}4","source":"com.example.payments","detail-type":"PaymentAuthorized","time":"2024-05-01T00:00:00Z","detail":{DETAIL},"schema-version":1}}"#
            ),
            // A CloudEvent with a stray `detail`: only `data` counts.
            format!(
                r#"{{"specversion":"1.0","id":"{p}5","source":"com.example.payments","type":"PaymentAuthorized","time":"2024-05-01T00:00:00Z","detail":{bad},"data":{DETAIL}}}"#
            ),
        ];
        let refs: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
        let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
        assert_eq!(out.response.accepted, 4, "detail_last={detail_last}: {:?}", out.response);
        let r = &out.response.rejected;
        assert_eq!((r.len(), r[0].reason, r[0].path.as_str()), (1, "bad_enum", "$.detail.currency"));
        let (_, batch) = out.parts.iter().find(|(k, _)| k.table == "payments").unwrap();
        let versions =
            batch.column_by_name("schema_version").unwrap().as_any().downcast_ref::<Int32Array>().unwrap();
        let ids = batch.column_by_name("event_id").unwrap().as_string::<i32>();
        let got: Vec<(String, i32)> =
            (0..batch.num_rows()).map(|i| (ids.value(i).to_owned(), versions.value(i))).collect();
        assert_eq!(
            got,
            [(format!("{p}1"), 2), (format!("{p}3"), 1), (format!("{p}4"), 1), (format!("{p}5"), 2)],
            "detail_last={detail_last}"
        );
    }
}

/// A request is processed in chunks of events (the tape holds one chunk
/// at a time): rejects on both sides of chunk boundaries, a duplicate of
/// an event from an earlier chunk, and subjects recurring across chunks
/// give the same outcome as events judged one by one.
#[test]
fn outcomes_do_not_depend_on_chunk_boundaries() {
    let (_dir, ingestor) = ingestor();
    let account = AccountId::new("111111111111").unwrap();
    let bad_at = [0usize, 127, 128, 255, 256, 399];
    let events: Vec<String> = (0..400)
        .map(|i| {
            // Event 300 repeats event 10's id: a duplicate across chunks.
            let id = if i == 300 { "e10".to_string() } else { format!("e{i}") };
            let detail = DETAIL.replace("c-1", &format!("c-{}", i % 7));
            let detail = if bad_at.contains(&i) { detail.replace("EUR", "DOGE") } else { detail };
            event(&id, &detail, "", i % 2 == 0)
        })
        .collect();
    let refs: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
    let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
    let rejected: Vec<(usize, &str)> = out.response.rejected.iter().map(|r| (r.index, r.reason)).collect();
    assert_eq!(rejected, bad_at.iter().map(|&i| (i, "bad_enum")).collect::<Vec<_>>());
    assert_eq!((out.response.accepted, out.response.duplicates), (400 - bad_at.len() - 1, 1));
    let (_, batch) = out.parts.iter().find(|(k, _)| k.table == "payments").unwrap();
    let ids = batch.column_by_name("event_id").unwrap().as_string::<i32>();
    let expected: Vec<String> =
        (0..400).filter(|i| !bad_at.contains(i) && *i != 300).map(|i| format!("e{i}")).collect();
    assert_eq!((0..batch.num_rows()).map(|i| ids.value(i).to_owned()).collect::<Vec<_>>(), expected);
    // Every row's holder name is a ciphertext under its subject's key.
    let holders = batch.column_by_name("detail").unwrap().as_struct().column_by_name("card").unwrap();
    let holders = holders.as_struct().column_by_name("holder_name").unwrap().as_string::<i32>();
    assert_eq!(holders.iter().filter(|h| h.is_some_and(|h| h.starts_with("wse1."))).count(), expected.len());
}

/// The `raw` column of the dead letters of `out`.
fn dead_letters(out: &watershed_hub::ingest::Processed) -> Vec<String> {
    let (_, batch) = out.parts.iter().find(|(k, _)| k.table == watershed_lake::DEAD_LETTERS).unwrap();
    let raw = batch.column_by_name("raw").unwrap().as_string::<i32>();
    raw.iter().map(|r| r.unwrap().to_owned()).collect()
}

/// A refused event's raw bytes are stored encrypted: under its data
/// subject's key when the subject can be read (so forgetting the subject
/// erases its dead letters too), else under the account's key. With
/// `raw = "plain"` they are stored as received.
#[test]
fn dead_letters_are_encrypted_and_erased_with_their_subject() {
    use watershed_protect::{Access, Decryptor, Error, Keyring};
    let reg = Arc::new(Registry::load(&manifest_dir().join("../../schemas")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(LocalKeyring::open_local(dir.path()).unwrap());
    let new = |raw| {
        Ingestor::new(
            reg.clone(),
            keyring.clone(),
            Arc::new(Dedupe::new(10_000)),
            Limits::default(),
            Arc::new(Metrics::default()),
        )
        .with_dead_letter_raw(raw)
    };
    let account = AccountId::new("111111111111").unwrap();
    let bad = DETAIL.replace("EUR", "DOGE");
    let events = [
        event("alice-bad", &bad.replace("c-1", "alice"), "", true),
        event("bob-bad", &bad.replace("c-1", "bob"), "", false),
        // Refused before its payload is read: no subject, the account's key.
        event("unrouted", DETAIL, "", true).replace("PaymentAuthorized", "PaymentRefunded"),
        r#"{"id":"torn","detail":{"card":{"pan":"4111111111111111""#.to_owned(),
    ];
    let refs: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
    let out =
        new(watershed_hub::ingest::DeadLetterRaw::Encrypt).process(&account, None, RECEIVED, &refs).unwrap();
    let dead = dead_letters(&out);
    assert_eq!(dead.len(), 4);
    for raw in &dead {
        assert!(raw.starts_with("wse1.") && !raw.contains("4111"), "{raw}");
    }
    let access = Access { principal: "auditor".into(), purpose: "case-1".into() };
    let decrypt = |raw: &str| Decryptor::new(&*keyring).decrypt(&access, &[raw]).unwrap().pop().unwrap();
    for (raw, sent) in dead.iter().zip(&events) {
        assert_eq!(decrypt(raw).unwrap().expose(), sent.as_str(), "decrypts to the event as received");
    }
    keyring.forget(&account, "alice", &access).unwrap();
    assert!(matches!(decrypt(&dead[0]), Err(Error::KeyErased { .. })), "erased with its subject");
    for raw in &dead[1..] {
        assert!(decrypt(raw).is_ok(), "other subjects and the account's key stay readable");
    }

    let out =
        new(watershed_hub::ingest::DeadLetterRaw::Plain).process(&account, None, RECEIVED, &refs).unwrap();
    assert_eq!(dead_letters(&out), events);
}

/// A keyring that fails every key request while `down` is set.
#[derive(Debug)]
struct Flaky {
    inner: LocalKeyring,
    down: std::sync::atomic::AtomicBool,
}

impl Flaky {
    fn check(&self) -> watershed_protect::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(watershed_protect::Error::Io {
                path: "kms".into(),
                source: std::io::Error::other("the key service is unreachable"),
            })
        } else {
            Ok(())
        }
    }
}

impl watershed_protect::Keyring for Flaky {
    fn token_key(&self, account: &AccountId) -> watershed_protect::Result<watershed_protect::SecretKey> {
        self.check()?;
        self.inner.token_key(account)
    }
    fn data_cipher(
        &self,
        account: &AccountId,
        subject: Option<&str>,
    ) -> watershed_protect::Result<Arc<watershed_protect::DataCipher>> {
        self.check()?;
        self.inner.data_cipher(account, subject)
    }
    fn data_ciphers_received(
        &self,
        account: &AccountId,
        subjects: &[&str],
        received_at: i64,
    ) -> watershed_protect::Result<Vec<Arc<watershed_protect::DataCipher>>> {
        self.check()?;
        self.inner.data_ciphers_received(account, subjects, received_at)
    }
    fn sync(&self) -> watershed_protect::Result<()> {
        self.inner.sync()
    }
    fn cipher_by_id(
        &self,
        id: &watershed_protect::KeyId,
    ) -> watershed_protect::Result<Arc<watershed_protect::DataCipher>> {
        self.inner.cipher_by_id(id)
    }
    fn erased_keys(&self) -> watershed_protect::Result<usize> {
        self.inner.erased_keys()
    }
    fn subject_keys(
        &self,
        account: &AccountId,
        subjects: &[&str],
        by: &watershed_protect::Access,
    ) -> watershed_protect::Result<Vec<Option<watershed_protect::Erasure>>> {
        self.inner.subject_keys(account, subjects, by)
    }
    fn forget(
        &self,
        account: &AccountId,
        subject: &str,
        by: &watershed_protect::Access,
    ) -> watershed_protect::Result<watershed_protect::Erasure> {
        self.inner.forget(account, subject, by)
    }
    fn rotate(&self, by: &watershed_protect::Access) -> watershed_protect::Result<String> {
        self.inner.rotate(by)
    }
}

/// When the keyring fails, a refused event cannot be stored without its
/// plaintext, so the request fails as a whole: nothing is kept, its
/// dedupe claims are released, and the same request succeeds once the
/// keyring is back.
#[test]
fn a_keyring_failure_stores_nothing_and_the_retry_succeeds() {
    let reg = Arc::new(Registry::load(&manifest_dir().join("../../schemas")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(Flaky {
        inner: LocalKeyring::open_local(dir.path()).unwrap(),
        down: std::sync::atomic::AtomicBool::new(true),
    });
    let ingestor = Ingestor::new(
        reg,
        keyring.clone(),
        Arc::new(Dedupe::new(10_000)),
        Limits::default(),
        Arc::new(Metrics::default()),
    );
    let account = AccountId::new("111111111111").unwrap();
    let events = [
        event("ok-1", DETAIL, "", true),
        event("bad", &DETAIL.replace("EUR", "DOGE"), "", true),
        "not json".to_owned(),
        event("ok-2", DETAIL, "", false),
    ];
    let refs: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
    let e = ingestor.process(&account, None, RECEIVED, &refs).unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
    keyring.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
    assert_eq!((out.response.accepted, out.response.duplicates, out.response.rejected.len()), (2, 0, 2));
    assert_eq!(dead_letters(&out).len(), 2, "each reject stored once the keyring is back");
}

/// A request's batches hold their rows, not the builders' room for more:
/// the memory budget counts these bytes, and an event alone in its
/// partition (late events, backfills) would otherwise count as ~150 KB.
#[test]
fn batches_are_sized_to_their_rows() {
    let (_dir, ingestor) = ingestor();
    let account = AccountId::new("111111111111").unwrap();
    let one = event("one", DETAIL, "", true);
    let out = ingestor.process(&account, None, RECEIVED, &[one.as_bytes()]).unwrap();
    let (_, batch) = out.parts.iter().find(|(k, _)| k.table == "payments").unwrap();
    let size = batch.get_array_memory_size();
    assert!(size < 8 * 1024, "one event's batch holds {size} bytes");

    let many: Vec<String> = (0..500).map(|i| event(&format!("m{i}"), DETAIL, "", true)).collect();
    let refs: Vec<&[u8]> = many.iter().map(|e| e.as_bytes()).collect();
    let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
    let (_, batch) = out.parts.iter().find(|(k, _)| k.table == "payments").unwrap();
    let per_row = batch.get_array_memory_size() / batch.num_rows();
    assert!(per_row < DETAIL.len() * 2, "{per_row} bytes per row");
}
