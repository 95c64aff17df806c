//! The hub's per-event work for a 1,000-event request of the reference
//! mix: envelope, validation, protection and column building
//! (`Ingestor::process`), then the WAL record and the Parquet encoding of
//! the resulting batches, each on its own.

// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use watershed_event::AccountId;
use watershed_hub::dedupe::Dedupe;
use watershed_hub::ingest::Ingestor;
use watershed_hub::metrics::Metrics;
use watershed_hub::sample::Samples;
use watershed_protect::{Keyring, LocalKeyring};
use watershed_schema::{Limits, Registry};

/// When the requests arrive: 2024-05-02T00:00:00Z, after every event's
/// time (an event dated more than a day after its receipt is refused).
const RECEIVED: i64 = 1_714_608_000_000_000;

/// This crate's directory. Cargo sets it when it runs the binary; the
/// compile-time value can name another checkout that shared the target
/// directory.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

const ACCOUNT: &str = "123456789012";

fn bench(c: &mut Criterion) {
    let registry = Arc::new(Registry::load(&manifest_dir().join("../../schemas")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let keyring: Arc<dyn Keyring> = Arc::new(LocalKeyring::open_local(dir.path()).unwrap());
    let ingestor = Ingestor::new(
        registry,
        keyring.clone(),
        Arc::new(Dedupe::new(1 << 30)),
        Limits::default(),
        Arc::new(Metrics::default()),
    );
    let account = AccountId::new(ACCOUNT).unwrap();
    let mut samples = Samples::new(42, 1_714_564_800);
    // Distinct ids per iteration so dedupe never short-cuts the work.
    let mut next_batch = move || -> Vec<String> { (0..1000).map(|_| samples.event(ACCOUNT)).collect() };
    // Warm the keyring with the workload's data subjects.
    for _ in 0..10 {
        let b = next_batch();
        let refs: Vec<&[u8]> = b.iter().map(|e| e.as_bytes()).collect();
        let out = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
        // The benchmark measures accepted events, not the reject path.
        assert!(out.response.accepted >= 900, "{:?}", out.response.rejected.first());
    }
    keyring.sync().unwrap();

    let mut g = c.benchmark_group("hub");
    g.throughput(Throughput::Elements(1000));
    g.sample_size(20);
    g.bench_function("process/1000 events", |b| {
        b.iter_batched(
            &mut next_batch,
            |batch| {
                let refs: Vec<&[u8]> = batch.iter().map(|e| e.as_bytes()).collect();
                black_box(ingestor.process(&account, None, RECEIVED, &refs).unwrap())
            },
            criterion::BatchSize::LargeInput,
        );
    });
    let batch = next_batch();
    let refs: Vec<&[u8]> = batch.iter().map(|e| e.as_bytes()).collect();
    let processed = ingestor.process(&account, None, RECEIVED, &refs).unwrap();
    g.bench_function("wal record/1000 events", |b| {
        b.iter(|| {
            let mut w = watershed_hub::wal::RecordEncoder::new(&account, 0, None, 700_000);
            for (i, e) in refs.iter().enumerate() {
                w.accepted(&i.to_string(), e);
            }
            black_box(w.finish())
        });
    });
    // The WAL record's codec against the alternatives, on the same raw
    // events (what a record holds of a request).
    let raw: Vec<u8> = refs.iter().flat_map(|e| e.iter().copied().chain([b'\n'])).collect();
    for level in [-5, -1, 1] {
        let mut z = zstd::bulk::Compressor::new(level).unwrap();
        let ratio = raw.len() as f64 / z.compress(&raw).unwrap().len() as f64;
        g.bench_function(format!("wal codec/zstd {level} ({ratio:.2}x)"), |b| {
            b.iter(|| black_box(z.compress(&raw).unwrap()));
        });
    }
    for acceleration in [1, 4, 8] {
        let mode = Some(lz4::block::CompressionMode::FAST(acceleration));
        let ratio = raw.len() as f64 / lz4::block::compress(&raw, mode, false).unwrap().len() as f64;
        g.bench_function(format!("wal codec/lz4 fast {acceleration} ({ratio:.2}x)"), |b| {
            b.iter(|| black_box(lz4::block::compress(&raw, mode, false).unwrap()));
        });
    }
    g.bench_function("parquet encode/1000 events", |b| {
        b.iter(|| {
            for (k, batch) in &processed.parts {
                let bytes = watershed_lake::encode(
                    &k.dir(),
                    &batch.schema(),
                    std::slice::from_ref(batch),
                    Vec::new(),
                    watershed_lake::EncodeOptions::default(),
                )
                .unwrap();
                black_box(bytes);
            }
        });
    });
    // A file as the writer rolls it: one partition's batches from many
    // requests.
    let mut parts: std::collections::HashMap<String, Vec<arrow::array::RecordBatch>> = Default::default();
    for _ in 0..50 {
        let batch = next_batch();
        let refs: Vec<&[u8]> = batch.iter().map(|e| e.as_bytes()).collect();
        for (k, b) in ingestor.process(&account, None, RECEIVED, &refs).unwrap().parts {
            parts.entry(k.dir()).or_default().push(b);
        }
    }
    let (path, batches) =
        parts.iter().max_by_key(|(_, v)| v.iter().map(|b| b.num_rows()).sum::<usize>()).unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function(format!("parquet encode/file of {rows} events in {} batches", batches.len()), |b| {
        b.iter(|| {
            black_box(
                watershed_lake::encode(
                    path,
                    &batches[0].schema(),
                    batches,
                    Vec::new(),
                    watershed_lake::EncodeOptions::default(),
                )
                .unwrap(),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
