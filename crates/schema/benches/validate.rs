//! Validate one payment payload (the detail of a ~700-byte EventBridge
//! event) into a reused tape.

// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use watershed_schema::{validate_json, Limits, Registry, Tape};

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn bench(c: &mut Criterion) {
    let reg = Registry::load(&manifest_dir().join("../../schemas")).unwrap();
    let mut g = c.benchmark_group("validate");
    for (source, dt, payload) in
        [("com.example.payments", "PaymentAuthorized", PAYMENT), ("com.example.identity", "UserLogin", LOGIN)]
    {
        let (s, v) = reg.resolve(source, dt, None).unwrap();
        let mut tape = Tape::new();
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{}/{}B", s.name, payload.len()), |b| {
            b.iter(|| {
                validate_json(
                    &v.node,
                    black_box(payload.as_bytes()),
                    s.config.unknown_fields,
                    Limits::default(),
                    &mut tape,
                )
                .unwrap();
            });
        });
    }
    g.finish();
}

const PAYMENT: &str = r#"{"payment_id":"pay_8c1f2e7a9b","customer_id":"cus_51HqLyJ2eZvKYlo2C","amount":"149.99","currency":"EUR","card":{"pan":"4111111111111111","holder_name":"Ada Lovelace","brand":"VISA","expiry":"12/29"},"merchant":{"id":"mer_0042","name":"Example Books GmbH","mcc":5942,"country":"DE"},"authorized_at":"2024-05-01T12:00:00.123Z","risk_score":0.0731,"three_ds":true,"acquirer_ref":"ACQ-7781-2231","channel":"WEB"}"#;
const LOGIN: &str = r#"{"user_id":"usr_7f3a9c2e","username":"ada.lovelace@example.com","ip_address":"203.0.113.42","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36","outcome":"SUCCESS","mfa":"WEBAUTHN","session_id":"sess_9d8c7b6a5f4e3d2c","logged_in_at":"2024-05-01T12:00:00.123456Z","attempt":1,"geo":{"country":"GB","city":"London"}}"#;

criterion_group!(benches, bench);
criterion_main!(benches);
