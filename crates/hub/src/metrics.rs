//! Prometheus metrics, served as text on `/metrics`.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use watershed_lake::{CompactStats, WriterStats};

/// Labels by account.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabel {
    /// The account id.
    pub account: String,
}

/// Labels of the TLS certificate `serve` serves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// `tls.cert_file`.
    pub cert_file: String,
}

/// Labels by account and reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// The account id.
    pub account: String,
    /// The reason code.
    pub reason: String,
}

/// Labels by a refused request's error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// The `error` code of the response (`busy`, `unavailable`,
    /// `too_large`, `timeout`, `bad_request`, `unauthenticated`, `bad_credentials`,
    /// `internal`).
    pub reason: String,
}

/// The WAL's bytes on disk.
#[derive(Debug, Clone, Copy)]
pub struct WalStats {
    /// Segments and id files.
    pub total: u64,
    /// Segments (raw events).
    pub raw: u64,
    /// Groups of appends that failed and were cut back (a full disk).
    pub write_failures: u64,
}

/// Every metric the hub exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Held while rendering.
    render: std::sync::Mutex<()>,
    /// Accepted events.
    pub accepted: Family<AccountLabel, Counter>,
    /// Rejected events (also in the dead-letter table).
    pub rejected: Family<RejectLabel, Counter>,
    /// Redelivered events dropped by the dedupe window.
    pub duplicates: Family<AccountLabel, Counter>,
    /// Request body bytes.
    pub bytes: Counter,
    /// Requests (batches).
    pub batches: Counter,
    /// Requests refused as a whole (4xx, 503, 500), by error code; 503
    /// `busy` is backpressure.
    pub refused: Family<RefusedLabel, Counter>,
    /// Events whose time is more than an hour before receipt.
    pub late: Counter,
    /// Ingest-to-ack latency, seconds.
    pub ack_latency: Histogram,
    /// 1 while the hub can go on; 0 once it needs a restart (`/healthz`
    /// says why).
    pub healthy: Gauge,
    /// WAL bytes on disk.
    pub wal_bytes: Gauge,
    /// WAL segment bytes on disk (raw events), bounded by
    /// `wal.max_raw_bytes`.
    pub wal_raw_bytes: Gauge,
    /// Partitions committed before their roll age because they held the
    /// WAL's oldest records.
    pub wal_flushes: Counter,
    /// Failed WAL writes the log recovered from (each group's requests
    /// answered 503).
    pub wal_write_failures: Counter,
    /// Bytes held against the memory budget.
    pub memory_bytes: Gauge,
    /// Bytes of request bodies in flight, bounded by
    /// `memory.requests_bytes`.
    pub request_bytes: Gauge,
    /// Open partition buffers.
    pub open_partitions: Gauge,
    /// Parquet files committed.
    pub files: Counter,
    /// Committed file sizes, bytes.
    pub file_size: Histogram,
    /// Flush duration, seconds.
    pub flush_latency: Histogram,
    /// Failed flush attempts (retried).
    pub flush_failures: Counter,
    /// Client connections open.
    pub connections: Gauge,
    /// Merged files written by compaction.
    pub compactions: Counter,
    /// Files replaced by merged files.
    pub compacted_files: Counter,
    /// Failed merges (retried).
    pub compaction_failures: Counter,
    /// Merges left to a later pass for want of room in the memory budget.
    pub compactions_deferred: Counter,
    /// Partitions deleted by retention.
    pub retention_partitions: Counter,
    /// Files deleted by retention.
    pub retention_files: Counter,
    /// Bytes of the files deleted by retention.
    pub retention_bytes: Counter,
    /// Files retention could not delete yet, and failed passes.
    pub retention_failures: Counter,
    /// Unix time at which the served TLS certificate expires (no sample
    /// without `[tls]`); follows renewals.
    pub tls_expiry: Family<CertLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("watershed");
        let m = Self {
            accepted: Family::default(),
            rejected: Family::default(),
            duplicates: Family::default(),
            bytes: Counter::default(),
            batches: Counter::default(),
            refused: Family::default(),
            late: Counter::default(),
            ack_latency: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            healthy: Gauge::default(),
            wal_bytes: Gauge::default(),
            wal_raw_bytes: Gauge::default(),
            wal_flushes: Counter::default(),
            wal_write_failures: Counter::default(),
            memory_bytes: Gauge::default(),
            request_bytes: Gauge::default(),
            open_partitions: Gauge::default(),
            files: Counter::default(),
            file_size: Histogram::new(exponential_buckets(4096.0, 4.0, 12)),
            flush_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            flush_failures: Counter::default(),
            connections: Gauge::default(),
            compactions: Counter::default(),
            compacted_files: Counter::default(),
            compaction_failures: Counter::default(),
            compactions_deferred: Counter::default(),
            retention_partitions: Counter::default(),
            retention_files: Counter::default(),
            retention_bytes: Counter::default(),
            retention_failures: Counter::default(),
            tls_expiry: Family::default(),
            registry: Registry::default(),
            render: std::sync::Mutex::new(()),
        };
        registry.register("events_accepted", "Events accepted", m.accepted.clone());
        registry.register("events_rejected", "Events rejected, by reason", m.rejected.clone());
        registry.register("events_duplicate", "Redelivered events dropped by dedupe", m.duplicates.clone());
        registry.register("ingest_bytes", "Request body bytes received", m.bytes.clone());
        registry.register("ingest_batches", "Ingest requests", m.batches.clone());
        registry.register(
            "http_connections",
            "Client connections open (at most limits.max_connections)",
            m.connections.clone(),
        );
        registry.register(
            "requests_refused",
            "Ingest requests refused as a whole, by error code (busy is backpressure)",
            m.refused.clone(),
        );
        registry.register("events_late", "Events more than an hour older than receipt", m.late.clone());
        registry.register("ack_latency_seconds", "Ingest-to-ack latency", m.ack_latency.clone());
        registry.register(
            "healthy",
            "1 while the hub can go on; 0 once it needs a restart (/healthz says why)",
            m.healthy.clone(),
        );
        registry.register("wal_bytes", "Write-ahead log bytes on disk", m.wal_bytes.clone());
        registry.register(
            "wal_raw_bytes",
            "Write-ahead log segment bytes (raw events) on disk, bounded by wal.max_raw_bytes",
            m.wal_raw_bytes.clone(),
        );
        registry.register(
            "wal_early_commits",
            "Partitions committed before their roll age because they held the write-ahead log's oldest records",
            m.wal_flushes.clone(),
        );
        registry.register(
            "wal_write_failures",
            "Group commits whose write-ahead log write failed and was cut back, nothing stored (a full disk): \
             their requests were answered 503",
            m.wal_write_failures.clone(),
        );
        registry.register("memory_bytes", "Bytes held against the memory budget", m.memory_bytes.clone());
        registry.register(
            "request_bytes",
            "Bytes of request bodies in flight, as received and decompressed, bounded by memory.requests_bytes",
            m.request_bytes.clone(),
        );
        registry.register("open_partitions", "Open partition buffers", m.open_partitions.clone());
        registry.register("files_written", "Parquet files committed", m.files.clone());
        registry.register("file_size_bytes", "Committed Parquet file sizes", m.file_size.clone());
        registry.register("flush_seconds", "Time to encode and commit a file", m.flush_latency.clone());
        registry.register("flush_failures", "Failed flush attempts (retried)", m.flush_failures.clone());
        registry.register("compactions", "Merged files written by compaction", m.compactions.clone());
        registry.register(
            "compacted_files",
            "Small files replaced by merged files",
            m.compacted_files.clone(),
        );
        registry.register(
            "compaction_failures",
            "Failed merges (retried on a later pass)",
            m.compaction_failures.clone(),
        );
        registry.register(
            "compactions_deferred",
            "Merges left to a later pass for want of room in the memory budget",
            m.compactions_deferred.clone(),
        );
        registry.register(
            "retention_partitions",
            "Partitions deleted by retention, past their table's period",
            m.retention_partitions.clone(),
        );
        registry.register("retention_files", "Files deleted by retention", m.retention_files.clone());
        registry.register(
            "retention_bytes",
            "Bytes of the files deleted by retention",
            m.retention_bytes.clone(),
        );
        registry.register(
            "retention_failures",
            "Files retention could not delete yet (retried), and failed retention passes",
            m.retention_failures.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the served TLS certificate expires",
            m.tls_expiry.clone(),
        );
        Self { registry, ..m }
    }
}

/// The lake's running totals a render mirrors into counters.
#[derive(Debug, Clone, Copy)]
pub struct LakeTotals<'a> {
    /// The writer's.
    pub writer: &'a WriterStats,
    /// Compaction's.
    pub compaction: &'a CompactStats,
    /// Retention's.
    pub retention: &'a watershed_lake::retention::RetentionStats,
}

impl Metrics {
    /// Pull gauges from the pipeline and render the text format.
    #[must_use]
    pub fn render(
        &self,
        healthy: bool,
        wal: WalStats,
        memory: usize,
        requests: usize,
        lake: LakeTotals<'_>,
    ) -> String {
        let LakeTotals { writer, compaction, retention } = lake;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        // The lake's totals, mirrored into counters: one render at a time,
        // so two scrapes cannot both add the same increase.
        let _one = self.render.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let total = |c: &Counter, v: &std::sync::atomic::AtomicU64| {
            c.inc_by(v.load(Ordering::Relaxed).saturating_sub(c.get()));
        };
        self.healthy.set(i64::from(healthy));
        self.wal_bytes.set(g(wal.total));
        self.wal_raw_bytes.set(g(wal.raw));
        total(&self.wal_flushes, &writer.wal_flushes);
        self.wal_write_failures.inc_by(wal.write_failures.saturating_sub(self.wal_write_failures.get()));
        self.memory_bytes.set(g(memory as u64));
        self.request_bytes.set(g(requests as u64));
        self.open_partitions.set(g(writer.open_partitions.load(Ordering::Relaxed)));
        total(&self.files, &writer.files);
        total(&self.flush_failures, &writer.failures);
        total(&self.compactions, &compaction.merges);
        total(&self.compacted_files, &compaction.inputs);
        total(&self.compaction_failures, &compaction.failures);
        total(&self.compactions_deferred, &compaction.deferred);
        total(&self.retention_partitions, &retention.partitions);
        total(&self.retention_files, &retention.files);
        total(&self.retention_bytes, &retention.bytes);
        total(&self.retention_failures, &retention.failures);
        if let Ok(mut recent) = writer.recent.lock() {
            for (size, secs) in recent.drain(..) {
                #[allow(clippy::cast_precision_loss)]
                self.file_size.observe(size as f64);
                self.flush_latency.observe(secs);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value<'a>(text: &'a str, name: &str) -> &'a str {
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{name} in {text}"))
    }

    /// The lake's totals are counters (`_total`, so `rate()` applies), and
    /// each render adds only what grew since the last.
    #[test]
    fn the_lakes_totals_are_counters_that_follow_their_source() {
        let m = Metrics::default();
        let (writer, compaction) = (WriterStats::default(), CompactStats::default());
        let wal = WalStats { total: 0, raw: 0, write_failures: 1 };
        writer.files.store(3, Ordering::Relaxed);
        compaction.deferred.store(2, Ordering::Relaxed);
        let retention = watershed_lake::retention::RetentionStats::default();
        retention.files.store(4, Ordering::Relaxed);
        let first = m.render(
            true,
            wal,
            0,
            0,
            LakeTotals { writer: &writer, compaction: &compaction, retention: &retention },
        );
        for name in [
            "files_written",
            "flush_failures",
            "wal_early_commits",
            "wal_write_failures",
            "compactions",
            "compacted_files",
            "compaction_failures",
            "compactions_deferred",
            "retention_partitions",
            "retention_files",
            "retention_bytes",
            "retention_failures",
        ] {
            assert!(first.contains(&format!("# TYPE watershed_{name} counter\n")), "{name}: {first}");
        }
        assert_eq!(value(&first, "watershed_files_written_total"), "3");
        assert_eq!(value(&first, "watershed_compactions_deferred_total"), "2");
        assert_eq!(value(&first, "watershed_retention_files_total"), "4");
        assert_eq!(value(&first, "watershed_wal_write_failures_total"), "1");
        let again = m.render(
            true,
            wal,
            0,
            0,
            LakeTotals { writer: &writer, compaction: &compaction, retention: &retention },
        );
        assert_eq!(value(&again, "watershed_files_written_total"), "3", "a second scrape adds nothing");
        assert_eq!(value(&again, "watershed_wal_write_failures_total"), "1");
        writer.files.store(5, Ordering::Relaxed);
        let later = m.render(
            true,
            wal,
            0,
            0,
            LakeTotals { writer: &writer, compaction: &compaction, retention: &retention },
        );
        assert_eq!(value(&later, "watershed_files_written_total"), "5");
        assert_eq!(value(&later, "watershed_open_partitions"), "0", "gauges keep their names");
    }
}
