//! Protect one validated payment (tokenize, mask, encrypt, redact) and
//! validate + protect together, with keys set up once per batch as the hub
//! does.

// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use watershed_event::AccountId;
use watershed_protect::{BatchProtector, DataCipher, KeyId, LocalKeyring, SecretKey};
use watershed_schema::{validate_json, Limits, Registry, Tape};

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

const PAYMENT: &str = r#"{"payment_id":"pay_8c1f2e7a9b","customer_id":"cus_51HqLyJ2eZvKYlo2C","amount":"149.99","currency":"EUR","card":{"pan":"4111111111111111","holder_name":"Ada Lovelace","brand":"VISA","expiry":"12/29"},"merchant":{"id":"mer_0042","name":"Example Books GmbH","mcc":5942,"country":"DE"},"authorized_at":"2024-05-01T12:00:00.123Z","risk_score":0.0731,"three_ds":true,"acquirer_ref":"ACQ-7781-2231","channel":"WEB"}"#;

fn bench(c: &mut Criterion) {
    let reg = Registry::load(&manifest_dir().join("../../schemas")).unwrap();
    let (s, v) = reg.resolve("com.example.payments", "PaymentAuthorized", None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kr = LocalKeyring::open_local(dir.path()).unwrap();
    let account = AccountId::new("123456789012").unwrap();
    let mut template = Tape::new();
    validate_json(&v.node, PAYMENT.as_bytes(), s.config.unknown_fields, Limits::default(), &mut template)
        .unwrap();
    let mut p = BatchProtector::new(&kr);
    p.protect(&account, &v.protect, &mut template.clone()).unwrap();

    let mut g = c.benchmark_group("protect");
    g.throughput(Throughput::Elements(1));
    g.bench_function("payment/4 fields", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |tape| p.protect(black_box(&account), &v.protect, tape).unwrap(),
            BatchSize::SmallInput,
        );
    });
    let mut tape = Tape::new();
    g.bench_function("payment/validate+protect", |b| {
        b.iter(|| {
            validate_json(
                &v.node,
                black_box(PAYMENT.as_bytes()),
                s.config.unknown_fields,
                Limits::default(),
                &mut tape,
            )
            .unwrap();
            p.protect(&account, &v.protect, &mut tape).unwrap();
        });
    });
    // The reference login: 3 protected fields (tokenize, encrypt, redact).
    let (s2, v2) = reg.resolve("com.example.identity", "UserLogin", None).unwrap();
    g.bench_function("login/validate+protect", |b| {
        b.iter(|| {
            validate_json(
                &v2.node,
                black_box(LOGIN.as_bytes()),
                s2.config.unknown_fields,
                Limits::default(),
                &mut tape,
            )
            .unwrap();
            p.protect(&account, &v2.protect, &mut tape).unwrap();
        });
    });
    // Keying one data key from its raw bytes (AES key schedule and GHASH
    // key): what each encryption under a not-yet-keyed subject pays.
    let raw = SecretKey::new([7; 32]);
    g.bench_function("data key/setup", |b| {
        b.iter(|| DataCipher::new(KeyId([1; 16]), black_box(&raw)));
    });
    g.finish();
}

const LOGIN: &str = r#"{"user_id":"usr_7f3a9c2e","username":"ada.lovelace@example.com","ip_address":"203.0.113.42","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","outcome":"SUCCESS","mfa":"WEBAUTHN","session_id":"sess_9d8c7b6a5f4e3d2c","logged_in_at":"2024-05-01T12:00:00.123456Z","attempt":1,"geo":{"country":"GB","city":"London"}}"#;

criterion_group!(benches, bench);
criterion_main!(benches);
