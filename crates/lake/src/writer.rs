//! The lake writer: partition buffers under one memory budget, rolled into
//! Parquet files by size and age, committed create-only.
//!
//! Policy, in order of precedence:
//! - a buffer reaching `roll_bytes` is flushed at once;
//! - when buffered bytes reach the memory budget's high-water mark, the
//!   largest buffers flush first until usage is back under the low mark;
//! - when more than `max_open_partitions` buffers are open, the least
//!   recently written ones flush (late events cannot open partitions
//!   without bound);
//! - a buffer older than `roll_age` flushes; buffers of late partitions
//!   (event hour older than `late_after`) wait `late_roll_age` instead, so a
//!   trickle of late events coalesces into few files.
//!
//! Flushes run concurrently (encoding on the blocking pool), each file
//! named by the WAL records it covers and recorded in the commit log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use watershed_event::{Clock, TimestampMicros};

use crate::commit::CommitLog;
use crate::encode::{encode, EncodeOptions, WRITE_ROWS};
use crate::error::Result;
use crate::partition::PartitionKey;
use crate::store::{Lake, Put};

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Flush a partition when its buffer reaches this many Arrow bytes.
    pub roll_bytes: usize,
    /// Flush a partition this long after its first buffered row.
    pub roll_age: Duration,
    /// The same, for late partitions.
    pub late_roll_age: Duration,
    /// A partition is late when its hour ended this long before now.
    pub late_after: Duration,
    /// Flush least-recently-written buffers beyond this many.
    pub max_open_partitions: usize,
    /// Concurrent flushes.
    pub flush_concurrency: usize,
    /// Parquet settings.
    pub encode: EncodeOptions,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            roll_bytes: 64 << 20,
            roll_age: Duration::from_secs(60),
            late_roll_age: Duration::from_secs(600),
            late_after: Duration::from_secs(3600),
            max_open_partitions: 1024,
            flush_concurrency: 2,
            encode: EncodeOptions::default(),
        }
    }
}

/// Bytes held by the pipeline, against a budget. Ingest refuses new work
/// (503) while usage is at or over the budget.
#[derive(Debug)]
pub struct Memory {
    used: AtomicUsize,
    budget: usize,
}

impl Memory {
    /// A budget of `budget` bytes.
    #[must_use]
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), budget })
    }
    /// Bytes in use.
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    /// The budget.
    #[must_use]
    pub fn budget(&self) -> usize {
        self.budget
    }
    /// Whether new work must wait.
    #[must_use]
    pub fn full(&self) -> bool {
        self.used() >= self.budget
    }
    /// Account for `n` more bytes.
    pub fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }
    /// Release `n` bytes.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One partition's rows from one WAL record.
#[derive(Debug)]
pub struct Part {
    /// Where the rows go.
    pub key: PartitionKey,
    /// The rows.
    pub batch: RecordBatch,
    /// The WAL record they came from.
    pub record: u64,
}

/// A message to the writer.
#[derive(Debug)]
pub enum Msg {
    /// Buffer these parts (their bytes are already added to [`Memory`]).
    Parts(Vec<Part>),
    /// Flush everything and reply when it is committed.
    FlushAll(tokio::sync::oneshot::Sender<()>),
}

/// Told about every committed file.
pub trait CommitSink: Send + Sync {
    /// `records` of `partition` are now in the lake.
    fn committed(&self, partition: &PartitionKey, records: &[u64]);
}

/// Counters the writer keeps for metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Files committed.
    pub files: AtomicU64,
    /// Bytes of Parquet committed.
    pub bytes: AtomicU64,
    /// Rows committed.
    pub rows: AtomicU64,
    /// Open partition buffers.
    pub open_partitions: AtomicU64,
    /// Sizes of committed files, and flush durations, for histograms.
    pub recent: Mutex<Vec<(u64, f64)>>,
    /// Flush failures (each retried).
    pub failures: AtomicU64,
}

struct Buffer {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    /// Trailing batches not yet joined into one chunk, and their rows.
    loose: usize,
    loose_rows: usize,
    records: Vec<u64>,
    bytes: usize,
    rows: usize,
    opened: TimestampMicros,
    touched: TimestampMicros,
    late: bool,
}

impl Buffer {
    /// Join the trailing small batches (one per request) into one chunk
    /// of exactly sized arrays, the unit the Parquet encoder is fed.
    /// Request batches carry their builders' spare capacity; joining
    /// early frees it (and the small batches) for the next requests to
    /// reuse instead of holding it until the file rolls. Returns the
    /// bytes freed.
    fn join_loose(&mut self) -> usize {
        let (loose, start) = (self.loose, self.batches.len() - self.loose);
        self.loose = 0;
        self.loose_rows = 0;
        if loose < 2 {
            return 0;
        }
        let before: usize = self.batches[start..].iter().map(RecordBatch::get_array_memory_size).sum();
        match arrow::compute::concat_batches(&self.schema, &self.batches[start..]) {
            Ok(joined) => {
                let after = joined.get_array_memory_size();
                self.batches.truncate(start);
                self.batches.push(joined);
                let saved = before.saturating_sub(after);
                self.bytes -= saved;
                saved
            }
            // One schema per buffer, so this does not happen; the encoder
            // joins whatever is left loose.
            Err(e) => {
                tracing::warn!(error = %e, "could not join buffered batches; leaving them as they are");
                0
            }
        }
    }
}

/// The writer task's state.
pub struct LakeWriter {
    cfg: WriterConfig,
    lake: Lake,
    memory: Arc<Memory>,
    log: Arc<Mutex<CommitLog>>,
    sink: Arc<dyn CommitSink>,
    clock: Arc<dyn Clock>,
    stats: Arc<WriterStats>,
    buffers: HashMap<PartitionKey, Buffer>,
    buffered: usize,
    flushing: JoinSet<()>,
    permits: Arc<Semaphore>,
}

impl LakeWriter {
    /// A writer; run it with [`LakeWriter::run`].
    #[must_use]
    pub fn new(
        cfg: WriterConfig,
        lake: Lake,
        memory: Arc<Memory>,
        log: CommitLog,
        sink: Arc<dyn CommitSink>,
        clock: Arc<dyn Clock>,
        stats: Arc<WriterStats>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(cfg.flush_concurrency.max(1)));
        Self {
            cfg,
            lake,
            memory,
            log: Arc::new(Mutex::new(log)),
            sink,
            clock,
            stats,
            buffers: HashMap::new(),
            buffered: 0,
            flushing: JoinSet::new(),
            permits,
        }
    }

    /// Process messages until the channel closes, then flush everything.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Parts(parts)) => {
                        self.add(parts);
                        self.enforce().await;
                    }
                    Some(Msg::FlushAll(done)) => {
                        self.flush_all().await;
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = tick.tick() => self.roll_aged().await,
                Some(_) = self.flushing.join_next(), if !self.flushing.is_empty() => {}
            }
        }
        self.flush_all().await;
    }

    fn add(&mut self, parts: Vec<Part>) {
        let now = self.clock.now_micros();
        let late_cut = now - i64::try_from(self.cfg.late_after.as_micros()).unwrap_or(i64::MAX);
        for p in parts {
            let bytes = p.batch.get_array_memory_size();
            let rows = p.batch.num_rows();
            // A table's layout is fixed for the writer's lifetime (the
            // registry is loaded once at start), so one buffer, and one
            // file, has one schema.
            let buf = self.buffers.entry(p.key.clone()).or_insert_with(|| Buffer {
                schema: p.batch.schema(),
                batches: Vec::new(),
                loose: 0,
                loose_rows: 0,
                records: Vec::new(),
                bytes: 0,
                rows: 0,
                opened: now,
                touched: now,
                late: partition_end(&p.key) < late_cut,
            });
            debug_assert_eq!(buf.schema, p.batch.schema(), "one schema per partition buffer");
            buf.batches.push(p.batch);
            if buf.records.last() != Some(&p.record) {
                buf.records.push(p.record);
            }
            buf.bytes += bytes;
            buf.rows += rows;
            buf.touched = now;
            self.buffered += bytes;
            buf.loose += 1;
            buf.loose_rows += rows;
            if buf.loose_rows >= WRITE_ROWS {
                let saved = buf.join_loose();
                self.buffered -= saved;
                self.memory.release(saved);
            }
        }
        self.stats.open_partitions.store(self.buffers.len() as u64, Ordering::Relaxed);
    }

    async fn enforce(&mut self) {
        let full: Vec<PartitionKey> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.bytes >= self.cfg.roll_bytes)
            .map(|(k, _)| k.clone())
            .collect();
        for k in full {
            self.flush_key(&k).await;
        }
        let high = self.memory.budget() / 10 * 8;
        let low = self.memory.budget() / 2;
        if self.memory.used() >= high {
            let mut by_size: Vec<(usize, PartitionKey)> =
                self.buffers.iter().map(|(k, b)| (b.bytes, k.clone())).collect();
            by_size.sort_by_key(|x| std::cmp::Reverse(x.0));
            for (_, k) in by_size {
                if self.buffered < low {
                    break;
                }
                self.flush_key(&k).await;
            }
        }
        if self.buffers.len() > self.cfg.max_open_partitions {
            let mut by_age: Vec<(TimestampMicros, PartitionKey)> =
                self.buffers.iter().map(|(k, b)| (b.touched, k.clone())).collect();
            by_age.sort();
            let excess = self.buffers.len() - self.cfg.max_open_partitions;
            for (_, k) in by_age.into_iter().take(excess) {
                self.flush_key(&k).await;
            }
        }
    }

    async fn roll_aged(&mut self) {
        let now = self.clock.now_micros();
        let age = |late: bool| {
            let d = if late { self.cfg.late_roll_age } else { self.cfg.roll_age };
            i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
        };
        let due: Vec<PartitionKey> = self
            .buffers
            .iter()
            .filter(|(_, b)| now - b.opened >= age(b.late))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            self.flush_key(&k).await;
        }
    }

    async fn flush_all(&mut self) {
        let keys: Vec<PartitionKey> = self.buffers.keys().cloned().collect();
        for k in keys {
            self.flush_key(&k).await;
        }
        while self.flushing.join_next().await.is_some() {}
    }

    async fn flush_key(&mut self, key: &PartitionKey) {
        if let Some(buf) = self.buffers.remove(key) {
            self.buffered -= buf.bytes;
            self.stats.open_partitions.store(self.buffers.len() as u64, Ordering::Relaxed);
            // Wait for a flush slot here: this is what pushes back on the
            // writer's channel, and so on ingest, when the store is slow.
            let permit = self.permits.clone().acquire_owned().await.expect("never closed");
            self.spawn_flush(key.clone(), buf, permit);
        }
    }

    fn spawn_flush(&mut self, key: PartitionKey, buf: Buffer, permit: tokio::sync::OwnedSemaphorePermit) {
        let ctx = FlushCtx {
            lake: self.lake.clone(),
            log: self.log.clone(),
            sink: self.sink.clone(),
            memory: self.memory.clone(),
            stats: self.stats.clone(),
            encode: self.cfg.encode,
        };
        self.flushing.spawn(async move {
            let _permit = permit;
            ctx.flush(key, buf).await;
        });
    }
}

/// The end of a partition's hour, in microseconds.
fn partition_end(key: &PartitionKey) -> TimestampMicros {
    watershed_event::parse_rfc3339_micros(&format!("{}T{:02}:59:59.999999Z", key.date, key.hour)).unwrap_or(0)
}

struct FlushCtx {
    lake: Lake,
    log: Arc<Mutex<CommitLog>>,
    sink: Arc<dyn CommitSink>,
    memory: Arc<Memory>,
    stats: Arc<WriterStats>,
    encode: EncodeOptions,
}

impl FlushCtx {
    /// Flush one buffer, retrying with backoff until it is committed:
    /// acknowledged rows are never dropped.
    async fn flush(&self, key: PartitionKey, buf: Buffer) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            match self.try_flush(&key, &buf).await {
                Ok(size) => {
                    let secs = started.elapsed().as_secs_f64();
                    self.stats.files.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(size as u64, Ordering::Relaxed);
                    self.stats.rows.fetch_add(buf.rows as u64, Ordering::Relaxed);
                    if let Ok(mut r) = self.stats.recent.lock() {
                        r.push((size as u64, secs));
                    }
                    self.memory.release(buf.bytes);
                    return;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(partition = %key, error = %e, retry_in_ms = backoff.as_millis(), "lake flush failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn try_flush(&self, key: &PartitionKey, buf: &Buffer) -> Result<usize> {
        let first = *buf.records.iter().min().unwrap_or(&0);
        let last = *buf.records.iter().max().unwrap_or(&0);
        let path = key.file("wal", first, last);
        let meta = vec![
            ("watershed.source".to_owned(), "wal".to_owned()),
            (
                "watershed.records".to_owned(),
                buf.records.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            ),
        ];
        let (schema, batches, p) = (buf.schema.clone(), buf.batches.clone(), path.0.clone());
        let opts = self.encode;
        let bytes = tokio::task::spawn_blocking(move || encode(&p, &schema, &batches, meta, opts))
            .await
            .expect("encoding does not panic")?;
        let size = bytes.len();
        let partition = key.dir();
        self.log.lock().expect("commit log lock").intent(&path, &partition, &buf.records)?;
        let put = self.lake.put_create(&path, bytes.into()).await?;
        if put == Put::AlreadyExists {
            tracing::info!(path = %path, "file already committed by an earlier run; keeping it");
        }
        self.log.lock().expect("commit log lock").commit(&path)?;
        self.sink.committed(key, &buf.records);
        tracing::info!(path = %path, rows = buf.rows, bytes = size, "committed parquet file");
        Ok(size)
    }
}
