//! The per-event pipeline on envelopes whose `detail` comes after `source`
//! and `detail-type` (as EventBridge writes them), so the payload is
//! validated in the envelope pass, and on the same events with the keys
//! in other orders: the outcomes must be identical. And generated
//! payments, whatever their strings hold, land in their columns as sent,
//! and every event of any request, damaged or not, is accounted for once.

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
        assert_eq!(decrypt(raw).unwrap().expose(), sent.as_bytes(), "decrypts to the event as received");
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

/// A refused event's id names it whole or not at all: long ids that
/// share a beginning are different events, each stored as a dead letter
/// (an id cut short would have made the second a "retried reject" of the
/// first), and an id that breaks the id rules is no id (the event is
/// known by its bytes). A retry of the request stores none again.
#[test]
fn refused_events_with_long_or_bad_ids_are_each_stored_once() {
    let (_dir, ingestor) = ingestor();
    let account = AccountId::new("111111111111").unwrap();
    let bad = DETAIL.replace("EUR", "DOGE");
    let (long, too_long) = ("x".repeat(300), "y".repeat(2000));
    let events = [
        event(&format!("{long}1"), &bad, "", true),
        event(&format!("{long}2"), &bad, "", true),
        event(&format!("{too_long}1"), DETAIL, "", true),
        event(&format!("{too_long}2"), DETAIL, "", true),
        event("a\\nb", DETAIL, "", true),
    ];
    assert!(events[4].contains(r#""id":"a\nb""#), "{}", events[4]);
    let refs: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
    let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
    let got: Vec<(&str, Option<usize>)> =
        out.response.rejected.iter().map(|r| (r.reason, r.id.as_ref().map(String::len))).collect();
    assert_eq!(
        got,
        [
            ("bad_enum", Some(301)),
            ("bad_enum", Some(301)),
            ("bad_envelope", None),
            ("bad_envelope", None),
            ("bad_envelope", None)
        ]
    );
    let (_, batch) = out.parts.iter().find(|(k, _)| k.table == watershed_lake::DEAD_LETTERS).unwrap();
    let ids = batch.column_by_name("event_id").unwrap().as_string::<i32>();
    let ids: Vec<Option<String>> = ids.iter().map(|i| i.map(str::to_owned)).collect();
    assert_eq!(ids, [Some(format!("{long}1")), Some(format!("{long}2")), None, None, None]);
    let again = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
    assert_eq!(again.response.rejected.len(), 5, "reported again");
    assert!(again.parts.iter().all(|(k, _)| k.table != watershed_lake::DEAD_LETTERS), "but not stored again");
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

/// A generated payment: what is sent, and what its row must hold.
#[derive(Debug, Clone)]
struct Payment {
    id: String,
    payment_id: String,
    customer: String,
    cents: i64,
    currency: &'static str,
    pan: String,
    holder: String,
    brand: String,
    merchant: (String, String, i32, String),
    at_ms: i64,
    risk: f64,
    three_ds: bool,
}

impl Payment {
    fn json(&self) -> String {
        let (mid, mname, mcc, country) = &self.merchant;
        let amount = format!(
            "{}{}.{:02}",
            if self.cents < 0 { "-" } else { "" },
            self.cents.abs() / 100,
            self.cents.abs() % 100
        );
        let at = chrono::DateTime::from_timestamp_millis(self.at_ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        serde_json::json!({
            "id": self.id, "source": "com.example.payments", "detail-type": "PaymentAuthorized",
            "time": "2024-05-01T00:00:00Z",
            "detail": {
                "payment_id": self.payment_id, "customer_id": self.customer, "amount": amount,
                "currency": self.currency,
                "card": {"pan": self.pan, "holder_name": self.holder, "brand": self.brand, "expiry": "01/30"},
                "merchant": {"id": mid, "name": mname, "mcc": mcc, "country": country},
                "authorized_at": at, "risk_score": self.risk, "three_ds": self.three_ds,
            }
        })
        .to_string()
    }
}

/// Strings with what JSON must escape, and text beyond ASCII.
fn text() -> impl proptest::strategy::Strategy<Value = String> {
    proptest::string::string_regex("([a-z0-9 ]|\"|\\\\|/|\n|\t|\u{0}|é|€|😀|\u{2028}){0,20}").unwrap()
}

fn payment() -> impl proptest::strategy::Strategy<Value = Payment> {
    use proptest::prelude::*;
    (
        ("[a-z0-9-]{1,36}", text(), "[a-z0-9_]{1,12}", -99_999_999_999i64..99_999_999_999, 0usize..4),
        ("[0-9]{4,19}", text(), text(), (text(), text(), any::<i32>(), text())),
        (1_500_000_000_000i64..1_800_000_000_000, -1e9f64..1e9, any::<bool>()),
    )
        .prop_map(
            |(
                (id, payment_id, customer, cents, cur),
                (pan, holder, brand, merchant),
                (at_ms, risk, three_ds),
            )| {
                Payment {
                    id,
                    payment_id,
                    customer,
                    cents,
                    currency: ["EUR", "USD", "GBP", "JPY"][cur],
                    pan,
                    holder,
                    brand,
                    merchant,
                    at_ms,
                    risk,
                    three_ds,
                }
            },
        )
}

/// One event of a generated request: a valid payment, the same with a
/// byte changed or cut short, or arbitrary bytes.
fn any_event() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    prop_oneof![
        3 => payment().prop_map(|p| p.json().into_bytes()),
        2 => (payment(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(p, at, b)| {
            let mut e = p.json().into_bytes();
            let i = at.index(e.len());
            e[i] = b;
            e
        }),
        1 => (payment(), any::<prop::sample::Index>()).prop_map(|(p, at)| {
            let e = p.json().into_bytes();
            e[..at.index(e.len())].to_vec()
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Whatever a request holds, every event is accounted for once:
    /// accepted (a row), a duplicate of an earlier one, or rejected (a
    /// dead letter) at its own index; nothing panics, nothing is dropped.
    #[test]
    fn every_event_of_any_request_is_accounted_for(events in proptest::collection::vec(any_event(), 1..40)) {
        let (_dir, ingestor) = ingestor();
        let account = AccountId::new("111111111111").unwrap();
        let refs: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
        let r = &out.response;
        proptest::prop_assert_eq!(r.accepted + r.duplicates + r.rejected.len(), events.len(), "{:?}", r);
        let indexes: Vec<usize> = r.rejected.iter().map(|x| x.index).collect();
        proptest::prop_assert!(indexes.windows(2).all(|w| w[0] < w[1]), "one answer per event, in order: {:?}", indexes);
        proptest::prop_assert!(indexes.iter().all(|&i| i < events.len()));
        let rows = |table: &str| -> usize {
            out.parts.iter().filter(|(k, _)| k.table == table).map(|(_, b)| b.num_rows()).sum()
        };
        proptest::prop_assert_eq!(rows("payments"), r.accepted);
        // A reject repeating an earlier one of the request (the same id,
        // or the same bytes) is reported again but stored once.
        proptest::prop_assert!(rows(watershed_lake::DEAD_LETTERS) <= r.rejected.len());
        proptest::prop_assert!(rows(watershed_lake::DEAD_LETTERS) > 0 || r.rejected.is_empty());
    }

    /// Whatever their strings hold, payments land in their columns as
    /// sent: text unchanged, the decimal, the timestamp, the double and
    /// the flag exact, the masked card number keeping its last four
    /// digits (none of a four-digit one), the encrypted name a
    /// ciphertext, the redacted expiry gone.
    #[test]
    fn payments_land_in_their_columns_as_sent(payments in proptest::collection::vec(payment(), 1..12)) {
        use arrow::array::{Array, BooleanArray, Decimal128Array, Float64Array, StructArray, TimestampMillisecondArray};
        let (_dir, ingestor) = ingestor();
        let account = AccountId::new("111111111111").unwrap();
        // Ids unique within the request: a repeat is a duplicate.
        let mut payments = payments;
        for (i, p) in payments.iter_mut().enumerate() {
            p.id = format!("{i}-{}", p.id);
        }
        let events: Vec<String> = payments.iter().map(Payment::json).collect();
        let refs: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
        let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
        proptest::prop_assert!(out.response.rejected.is_empty(), "{:?}", out.response.rejected);
        proptest::prop_assert_eq!(out.response.accepted, payments.len());
        let (_, batch) = out.parts.iter().find(|(k, _)| k.table == "payments").unwrap();
        let detail = batch.column_by_name("detail").unwrap().as_struct();
        let field = |s: &StructArray, name: &str| s.column_by_name(name).unwrap_or_else(|| panic!("{name}")).clone();
        let string = |s: &StructArray, name: &str, i: usize| {
            let c = field(s, name);
            c.as_string::<i32>().value(i).to_owned()
        };
        let (card, merchant) = (field(detail, "card"), field(detail, "merchant"));
        let (card, merchant) = (card.as_struct(), merchant.as_struct());
        let ids = batch.column_by_name("event_id").unwrap().as_string::<i32>();
        for (i, p) in payments.iter().enumerate() {
            proptest::prop_assert_eq!(ids.value(i), p.id.as_str());
            proptest::prop_assert_eq!(string(detail, "payment_id", i), p.payment_id.clone());
            proptest::prop_assert_eq!(string(detail, "currency", i), p.currency);
            let amount = field(detail, "amount");
            proptest::prop_assert_eq!(amount.as_any().downcast_ref::<Decimal128Array>().unwrap().value(i), i128::from(p.cents));
            proptest::prop_assert_eq!(string(card, "brand", i), p.brand.clone());
            let pan = string(card, "pan", i);
            let digits = p.pan.chars().count();
            proptest::prop_assert_eq!(pan.chars().count(), digits, "a mask keeps the length");
            // The last four digits stay, unless that is all there is.
            let kept = if digits > 4 { 4 } else { 0 };
            proptest::prop_assert_eq!(&pan[pan.len() - kept..], &p.pan[p.pan.len() - kept..]);
            proptest::prop_assert!(pan[..pan.len() - kept].chars().all(|c| c == '*'), "{pan}");
            proptest::prop_assert!(string(card, "holder_name", i).starts_with("wse1."));
            let expiry = field(card, "expiry");
            proptest::prop_assert!(expiry.is_null(i) || !expiry.as_string::<i32>().value(i).contains("30"));
            let (mid, mname, mcc, country) = &p.merchant;
            proptest::prop_assert_eq!(&string(merchant, "id", i), mid);
            proptest::prop_assert_eq!(&string(merchant, "name", i), mname);
            proptest::prop_assert_eq!(field(merchant, "mcc").as_any().downcast_ref::<Int32Array>().unwrap().value(i), *mcc);
            proptest::prop_assert_eq!(&string(merchant, "country", i), country);
            let at = field(detail, "authorized_at");
            proptest::prop_assert_eq!(at.as_any().downcast_ref::<TimestampMillisecondArray>().unwrap().value(i), p.at_ms);
            let risk = field(detail, "risk_score");
            proptest::prop_assert_eq!(risk.as_any().downcast_ref::<Float64Array>().unwrap().value(i).to_bits(), p.risk.to_bits());
            let flag = field(detail, "three_ds");
            proptest::prop_assert_eq!(flag.as_any().downcast_ref::<BooleanArray>().unwrap().value(i), p.three_ds);
        }
    }
}
