//! The lake writer: partition buffers under one memory budget, rolled into
//! Parquet files by size and age, committed create-only.
//!
//! Each open partition encodes its rows into an in-memory Parquet file as
//! they arrive, in chunks of [`CHUNK_ROWS`] rows, one chunk at a time on
//! the blocking pool; rolling a file encodes the tail and writes the footer.
//!
//! Policy, in order of precedence:
//! - a buffer that has taken in `roll_bytes` Arrow bytes is flushed at once;
//! - when usage reaches the memory budget's high-water mark, the buffers
//!   with the most unencoded rows are encoded first (waiting for each);
//!   if that is not enough, the buffers holding the most memory flush
//!   until open buffers hold less than the low mark;
//! - when more than `max_open_partitions` buffers are open, the least
//!   recently written ones flush (late events cannot open partitions
//!   without bound; each one flushed early is a small file, so the bound
//!   is high and the memory budget, which charges each partition its
//!   rows, its batches' arrays and [`PARTITION_BYTES`], is what usually
//!   decides; see [`batch_bytes`]);
//! - a buffer older than `roll_age` flushes; buffers of late partitions
//!   (event hour older than `late_after`) wait `late_roll_age` instead, so a
//!   trickle of late events coalesces into few files;
//! - a buffer holding a WAL record older than [`CommitSink::commit_before`]
//!   flushes at once: the WAL is over its bound, and these records keep
//!   its oldest segments on disk.
//!
//! Flushes run concurrently, each file named by the WAL records it covers
//! and recorded in the commit log.

mod flush;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use watershed_event::{Clock, TimestampMicros};

use self::flush::FlushCtx;
use crate::commit::CommitLog;
use crate::encode::{EncodeOptions, FileEncoder};
use crate::memory::{batch_bytes, Memory};
use crate::partition::PartitionKey;
use crate::store::Lake;

/// Rows of a partition encoded into its open file at a time. Small enough
/// that a chunk (a few milliseconds of encoding) barely delays the
/// requests queued behind it on one core; large enough that the column
/// writers work in bulk.
const CHUNK_ROWS: usize = 2048;

/// The same, in Arrow bytes, for tables with wide rows.
const CHUNK_BYTES: usize = 8 << 20;

/// What a partition's buffer costs beyond its rows (its entry, key and
/// bookkeeping), counted against the memory budget so that the budget
/// bounds how many partitions can be open, whatever their size.
const PARTITION_BYTES: usize = 1024;

/// A partition's newest unencoded batch is joined with the one before it
/// when that one holds fewer rows than this and not more than twice the
/// newest's: each batch costs about half a kilobyte per array beyond its
/// rows, which an event or two per partition and request (late events,
/// backfills) would otherwise multiply. Joining like with like keeps the
/// batches few (about the logarithm of the rows) and copies each row a
/// few times at most; batches of requests that bring a partition many
/// rows at once are left alone.
const JOIN_ROWS: usize = 64;

/// Under memory pressure, partitions with at least this many unencoded
/// bytes are encoded before any file is flushed early (below it, an
/// encoder's own buffers would outweigh the saving).
const RELIEF_BYTES: usize = 1 << 20;

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
    /// What the records' numbers count, in file names
    /// (`<source>-<first>-<last>.parquet`) and in each file's
    /// `watershed.source` metadata: the hub uses its WAL's identity, so
    /// hubs sharing a lake never name two files alike.
    pub source: String,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            roll_bytes: 64 << 20,
            roll_age: Duration::from_secs(60),
            late_roll_age: Duration::from_secs(600),
            late_after: Duration::from_secs(3600),
            max_open_partitions: 8192,
            flush_concurrency: 4,
            encode: EncodeOptions::default(),
            source: "wal".to_owned(),
        }
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

    /// The oldest WAL record a restart could still replay: commit-log
    /// entries wholly before it are dropped when the log is compacted.
    fn oldest_needed(&self) -> u64;

    /// Partitions holding a WAL record older than this are to be committed
    /// now (0: none): the WAL's oldest segments, kept on disk until their
    /// records are committed, hold more than its bound allows.
    fn commit_before(&self) -> u64 {
        0
    }
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
    /// Flush failures: store failures (each retried) and files that could
    /// not be encoded (their rows stay in the WAL).
    pub failures: AtomicU64,
    /// Partitions flushed before their roll age or size because they held
    /// the WAL's oldest records ([`CommitSink::commit_before`]).
    pub wal_flushes: AtomicU64,
    /// Why a partition's file could not be encoded (the first such
    /// failure). Its rows stay in the WAL, which does not let them go
    /// until a restart replays them: the writer needs one.
    pub unencodable: Mutex<Option<String>>,
}

impl WriterStats {
    /// Why the writer needs a restart, if it does: a file it could not
    /// encode (see [`WriterStats::unencodable`]).
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.unencodable.lock().map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }
}

struct Buffer {
    schema: SchemaRef,
    /// Batches not yet handed to the encoder, and their rows and
    /// (memory-budget) bytes.
    loose: Vec<RecordBatch>,
    loose_rows: usize,
    loose_bytes: usize,
    /// The file being encoded, or the chunk being encoded into it.
    encoder: Encoder,
    records: Vec<u64>,
    /// The oldest of `records` (parts may arrive slightly out of order).
    oldest_record: u64,
    /// Arrow bytes buffered since the file was opened (the roll measure).
    bytes: usize,
    /// Bytes this buffer holds against the memory budget: the loose
    /// batches plus the encoded file (updated by the encoding job).
    charge: Arc<AtomicUsize>,
    rows: usize,
    opened: TimestampMicros,
    touched: TimestampMicros,
    late: bool,
}

/// A partition's Parquet file while it is open.
enum Encoder {
    /// Nothing encoded yet.
    Empty,
    /// Ready for the next chunk.
    Idle(Box<FileEncoder>),
    /// Encoding a chunk on the blocking pool (or done, the encoder
    /// waiting in the handle for the next chunk), with the memory charged
    /// for the chunk and the file so far (released if the task panics).
    Busy(tokio::task::JoinHandle<ChunkResult>, usize),
    /// A chunk failed to encode; see [`Buffer::settle`].
    Failed(String),
}

/// The encoder back from a chunk, or the error and the chunk's batches
/// and bytes (still counted against the budget).
type ChunkResult = std::result::Result<Box<FileEncoder>, (crate::Error, Vec<RecordBatch>, usize)>;

impl Buffer {
    /// The first and last WAL records of the buffer: its file's name.
    fn first_record(&self) -> u64 {
        self.records.iter().min().copied().unwrap_or(0)
    }

    fn last_record(&self) -> u64 {
        self.records.iter().max().copied().unwrap_or(0)
    }

    /// Whether the unencoded rows make a chunk.
    fn chunk_ready(&self) -> bool {
        self.loose_rows >= CHUNK_ROWS || self.loose_bytes >= CHUNK_BYTES
    }

    /// Whether four chunks' worth wait: the writer then waits to encode.
    fn chunk_overdue(&self) -> bool {
        self.loose_rows >= 4 * CHUNK_ROWS || self.loose_bytes >= 4 * CHUNK_BYTES
    }

    /// Join the newest unencoded batches while they are small and alike
    /// (see [`JOIN_ROWS`]), charging the joined batch's size instead of
    /// theirs.
    fn join_small(&mut self, memory: &Memory) {
        while let [.., older, newer] = &self.loose[..] {
            let (o, n) = (older.num_rows(), newer.num_rows());
            if o >= JOIN_ROWS || o > 2 * n {
                return;
            }
            let Ok(joined) = arrow::compute::concat_batches(&self.schema, [older, newer]) else {
                return; // one schema per buffer: only a bug gets here; keep the batches
            };
            let before = batch_bytes(older) + batch_bytes(newer);
            let after = batch_bytes(&joined);
            self.loose.truncate(self.loose.len() - 2);
            self.loose.push(joined);
            memory.add(after);
            memory.release(before);
            self.loose_bytes = self.loose_bytes + after - before;
            self.charge.fetch_add(after, Ordering::Relaxed);
            self.charge.fetch_sub(before, Ordering::Relaxed);
        }
    }

    /// Wait for the chunk in flight, if any, and take the encoder (`None`
    /// before the first chunk). A failed chunk's rows return to the loose
    /// batches.
    async fn settle(
        &mut self,
        key: &PartitionKey,
        memory: &Memory,
    ) -> std::result::Result<Option<Box<FileEncoder>>, String> {
        match std::mem::replace(&mut self.encoder, Encoder::Empty) {
            Encoder::Empty => Ok(None),
            Encoder::Idle(f) => Ok(Some(f)),
            Encoder::Failed(e) => {
                self.encoder = Encoder::Failed(e.clone());
                Err(e)
            }
            Encoder::Busy(job, charged) => match job.await {
                Ok(Ok(e)) => Ok(Some(e)),
                Err(join) => {
                    // A panic in the encoder (a bug) took the chunk and the
                    // file with it. Their rows are not committed, so their
                    // WAL records stay and replay on the next start; the
                    // writer goes on with the other partitions.
                    tracing::error!(partition = %key, error = %join, "encoding a chunk did not finish; its rows stay in the WAL");
                    memory.release(charged);
                    self.charge.fetch_sub(charged, Ordering::Relaxed);
                    let msg = format!("encoding a chunk did not finish: {join}");
                    self.encoder = Encoder::Failed(msg.clone());
                    Err(msg)
                }
                Ok(Err((e, chunk, bytes))) => {
                    tracing::error!(partition = %key, error = %e, "encoding a chunk failed; its rows stay in the WAL");
                    let msg = e.to_string();
                    self.loose_rows += chunk.iter().map(RecordBatch::num_rows).sum::<usize>();
                    self.loose.splice(0..0, chunk);
                    self.loose_bytes += bytes;
                    self.encoder = Encoder::Failed(msg.clone());
                    Err(msg)
                }
            },
        }
    }

    /// Hand the loose batches to the blocking pool to be encoded as the
    /// file's next rows. Waits for the previous chunk first, so chunks are
    /// written in arrival order and at most one per partition is in flight.
    async fn encode_loose(
        &mut self,
        key: &PartitionKey,
        memory: &Arc<Memory>,
        opts: EncodeOptions,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let file = match self.settle(key, memory).await {
            Ok(f) => f,
            Err(_) => return, // already failed: rows stay loose until the flush reports it
        };
        let chunk = std::mem::take(&mut self.loose);
        let bytes = std::mem::take(&mut self.loose_bytes);
        self.loose_rows = 0;
        let (schema, memory, name, charge) =
            (self.schema.clone(), memory.clone(), key.dir(), self.charge.clone());
        let charged = bytes + file.as_ref().map_or(0, |f| f.charged);
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            #[cfg(test)]
            assert!(
                !chunk.iter().any(|b| b.schema().metadata.contains_key(tests::PANIC)),
                "encoding panicked (simulated)"
            );
            let mut file = match file {
                Some(f) => f,
                None => match FileEncoder::new(&name, &schema, opts) {
                    Ok(f) => Box::new(f),
                    Err(e) => return Err((e, chunk, bytes)),
                },
            };
            match file.write_joined(&chunk) {
                Ok(()) => {
                    // The chunk's Arrow bytes are replaced by the growth of
                    // the encoded file (added first: `used` never dips).
                    let held = file.held();
                    memory.add(held);
                    memory.release(file.charged + bytes);
                    charge.fetch_add(held, Ordering::Relaxed);
                    charge.fetch_sub(file.charged + bytes, Ordering::Relaxed);
                    file.charged = held;
                    Ok(file)
                }
                Err(e) => {
                    // The file is dropped; the chunk goes back to the
                    // buffer, still counted.
                    memory.release(file.charged);
                    charge.fetch_sub(file.charged, Ordering::Relaxed);
                    Err((e, chunk, bytes))
                }
            }
        });
        self.encoder = Encoder::Busy(job, charged);
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
    flushing: JoinSet<()>,
    permits: Arc<Semaphore>,
    /// Chunks being encoded (one at a time).
    encoding: Arc<Semaphore>,
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
            flushing: JoinSet::new(),
            permits,
            encoding: Arc::new(Semaphore::new(1)),
        }
    }

    /// The commit log it writes, shared with a [`crate::Compactor`].
    #[must_use]
    pub fn commit_log(&self) -> Arc<Mutex<CommitLog>> {
        self.log.clone()
    }

    /// Process messages until the channel closes, then flush everything.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Parts(parts)) => {
                        self.add(parts).await;
                        self.enforce().await;
                    }
                    Some(Msg::FlushAll(done)) => {
                        self.flush_all().await;
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    self.roll_aged().await;
                    self.release_wal().await;
                    // Chunks skipped while another was encoding, in
                    // partitions that have had no request since.
                    let waiting = self
                        .buffers
                        .iter()
                        .filter(|(_, b)| b.chunk_ready())
                        .map(|(k, _)| k.clone())
                        .collect();
                    self.encode_ready(waiting).await;
                }
                Some(_) = self.flushing.join_next(), if !self.flushing.is_empty() => {}
            }
        }
        self.flush_all().await;
    }

    async fn add(&mut self, parts: Vec<Part>) {
        let now = self.clock.now_micros();
        let late_cut = now - i64::try_from(self.cfg.late_after.as_micros()).unwrap_or(i64::MAX);
        let mut ready = Vec::new();
        for p in parts {
            let bytes = batch_bytes(&p.batch);
            let rows = p.batch.num_rows();
            // A table's layout is fixed for the writer's lifetime (the
            // registry is loaded once at start), so one buffer, and one
            // file, has one schema.
            let memory = &self.memory;
            let buf = self.buffers.entry(p.key.clone()).or_insert_with(|| {
                // The partition's own cost is charged with its unencoded
                // rows, so the first encoded chunk (whose file's memory
                // is then counted instead) or the flush releases it.
                memory.add(PARTITION_BYTES);
                Buffer {
                    schema: p.batch.schema(),
                    loose: Vec::new(),
                    loose_rows: 0,
                    loose_bytes: PARTITION_BYTES,
                    encoder: Encoder::Empty,
                    records: Vec::new(),
                    oldest_record: p.record,
                    bytes: 0,
                    charge: Arc::new(AtomicUsize::new(PARTITION_BYTES)),
                    rows: 0,
                    opened: now,
                    touched: now,
                    late: p.key.hour_end() < late_cut,
                }
            });
            debug_assert_eq!(buf.schema, p.batch.schema(), "one schema per partition buffer");
            buf.loose.push(p.batch);
            if buf.records.last() != Some(&p.record) {
                buf.records.push(p.record);
            }
            buf.oldest_record = buf.oldest_record.min(p.record);
            buf.loose_rows += rows;
            buf.loose_bytes += bytes;
            buf.bytes += bytes;
            buf.rows += rows;
            buf.touched = now;
            buf.charge.fetch_add(bytes, Ordering::Relaxed);
            buf.join_small(&self.memory);
            if buf.chunk_ready() {
                ready.push(p.key);
            }
        }
        self.encode_ready(ready).await;
        self.stats.open_partitions.store(self.buffers.len() as u64, Ordering::Relaxed);
    }

    /// Hand the full chunks of `keys` to the encoder.
    async fn encode_ready(&mut self, keys: Vec<PartitionKey>) {
        // Encode full chunks as they form: an open partition then holds
        // compressed pages, and each chunk is encoded while its memory is
        // still warm instead of all at roll time. Encoding shares the
        // blocking pool with request processing, so one chunk is encoded
        // at a time and the writer does not wait for it (which would hold
        // up the requests behind it) unless a partition has four chunks'
        // worth waiting.
        for key in keys {
            let Some(buf) = self.buffers.get_mut(&key) else { continue };
            let busy = matches!(&buf.encoder, Encoder::Busy(job, _) if !job.is_finished());
            let must = buf.chunk_overdue();
            if !buf.chunk_ready() || (busy && !must) {
                continue;
            }
            let permit = match self.encoding.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) if must => self.encoding.clone().acquire_owned().await.expect("never closed"),
                Err(_) => continue,
            };
            buf.encode_loose(&key, &self.memory, self.cfg.encode, permit).await;
        }
    }

    async fn enforce(&mut self) {
        self.release_wal().await;
        let full: Vec<PartitionKey> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.bytes >= self.cfg.roll_bytes)
            .map(|(k, _)| k.clone())
            .collect();
        for k in full {
            self.flush_key(&k).await;
        }
        let high = self.memory.high_mark();
        let low = self.memory.budget() / 2;
        if self.memory.used() >= high && !self.relieve(high, low).await {
            let mut by_size: Vec<(usize, PartitionKey)> =
                self.buffers.iter().map(|(k, b)| (b.charge.load(Ordering::Relaxed), k.clone())).collect();
            by_size.sort_by_key(|x| std::cmp::Reverse(x.0));
            let mut open: usize = by_size.iter().map(|x| x.0).sum();
            for (size, k) in by_size {
                if open < low {
                    break;
                }
                open -= size;
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

    /// Under memory pressure, encode the unencoded rows of the partitions
    /// holding the most of them (at least [`RELIEF_BYTES`] each), waiting
    /// for each, before any file is flushed early: encoded rows take a
    /// fraction of the memory, and files stay large. Returns whether usage
    /// is back under `high`.
    async fn relieve(&mut self, high: usize, low: usize) -> bool {
        let mut by_loose: Vec<(usize, PartitionKey)> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.loose_bytes >= RELIEF_BYTES && !matches!(b.encoder, Encoder::Failed(_)))
            .map(|(k, b)| (b.loose_bytes, k.clone()))
            .collect();
        by_loose.sort_by_key(|x| std::cmp::Reverse(x.0));
        for (_, k) in by_loose {
            if self.memory.used() < low {
                break;
            }
            let Some(buf) = self.buffers.get_mut(&k) else { continue };
            let permit = self.encoding.clone().acquire_owned().await.expect("never closed");
            buf.encode_loose(&k, &self.memory, self.cfg.encode, permit).await;
            if let Ok(Some(file)) = buf.settle(&k, &self.memory).await {
                buf.encoder = Encoder::Idle(file);
            }
        }
        self.memory.used() < high
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

    /// Flush the partitions holding WAL records older than the sink's
    /// [`CommitSink::commit_before`], so the WAL can delete its oldest
    /// segments (a late partition would otherwise keep every newer segment
    /// on disk for its roll age).
    async fn release_wal(&mut self) {
        let before = self.sink.commit_before();
        if before == 0 {
            return;
        }
        let due: Vec<PartitionKey> =
            self.buffers.iter().filter(|(_, b)| b.oldest_record < before).map(|(k, _)| k.clone()).collect();
        for k in due {
            tracing::debug!(partition = %k, before, "committing early: the partition holds the WAL's oldest records");
            self.stats.wal_flushes.fetch_add(1, Ordering::Relaxed);
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
            source: self.cfg.source.clone(),
        };
        // Pending from now on, before the file is encoded and its intent
        // logged: compaction does not merge the partition's files around it
        // (whose merged file would later be merged with it, its rows out
        // of WAL order).
        let path = key.file(&ctx.source, buf.first_record(), buf.last_record());
        self.log.lock().expect("commit log lock").reserve(&path);
        self.flushing.spawn(async move {
            let _permit = permit;
            ctx.flush(key, buf, path).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use watershed_event::AccountId;

    use super::*;

    /// Schema metadata that makes encoding a chunk holding the batch panic.
    pub(super) const PANIC: &str = "watershed.test.panic";

    /// A buffer of `loose` batches under `schema`, charged to `memory`.
    fn buffer(schema: SchemaRef, loose: Vec<RecordBatch>, memory: &Memory) -> Buffer {
        let bytes = loose.iter().map(RecordBatch::get_array_memory_size).sum();
        let rows = loose.iter().map(RecordBatch::num_rows).sum();
        memory.add(bytes);
        Buffer {
            schema,
            loose,
            loose_rows: rows,
            loose_bytes: bytes,
            encoder: Encoder::Empty,
            records: vec![1],
            oldest_record: 1,
            bytes,
            charge: Arc::new(AtomicUsize::new(bytes)),
            rows,
            opened: 0,
            touched: 0,
            late: false,
        }
    }

    /// Flush `buf`, whose chunk failed: the flush reports it, commits
    /// nothing (the rows stay in the WAL) and releases the memory.
    async fn flush_fails(key: PartitionKey, buf: Buffer, memory: &Arc<Memory>) {
        struct NoCommits;
        impl CommitSink for NoCommits {
            fn committed(&self, partition: &PartitionKey, _: &[u64]) {
                panic!("{partition} must not be reported committed");
            }
            fn oldest_needed(&self) -> u64 {
                0
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        let (log, _) =
            CommitLog::open(&dir.path().join("commits.log"), &lake, "wal", u64::MAX).await.unwrap();
        let stats = Arc::new(WriterStats::default());
        let ctx = FlushCtx {
            lake,
            log: Arc::new(Mutex::new(log)),
            sink: Arc::new(NoCommits),
            memory: memory.clone(),
            stats: stats.clone(),
            encode: EncodeOptions::default(),
            source: "wal".into(),
        };
        let path = key.file("wal", 1, 1);
        ctx.log.lock().unwrap().reserve(&path);
        ctx.flush(key, buf, path.clone()).await;
        assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
        assert_eq!(stats.files.load(Ordering::Relaxed), 0);
        let why = stats.failure().expect("the writer needs a restart");
        assert!(why.starts_with("partition t/account=111111111111/"), "{why}");
        assert_eq!(memory.used(), 0);
        assert!(!ctx.log.lock().unwrap().is_pending(&path.0), "the reservation is withdrawn");
    }

    #[tokio::test]
    async fn a_chunk_that_fails_to_encode_keeps_its_rows_and_their_memory() {
        let memory = Memory::new(1 << 30);
        let key = PartitionKey::at("t", &AccountId::new("111111111111").unwrap(), 0);
        let ints = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let texts = Arc::new(Schema::new(vec![Field::new("v", DataType::Utf8, false)]));
        // A batch whose column does not match the file's schema (which the
        // writer never sends; this is the path a bug would take).
        let bad = RecordBatch::try_new(texts, vec![Arc::new(StringArray::from(vec!["x"; 10]))]).unwrap();
        let good = RecordBatch::try_new(ints.clone(), vec![Arc::new(Int64Array::from(vec![1; 10]))]).unwrap();
        let (bad_bytes, good_bytes) = (bad.get_array_memory_size(), good.get_array_memory_size());
        let mut buf = buffer(ints, vec![good, bad], &memory);
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        buf.encode_loose(&key, &memory, EncodeOptions::default(), permit).await;
        assert!(buf.settle(&key, &memory).await.is_err(), "the failure is reported");
        assert!(buf.settle(&key, &memory).await.is_err(), "and stays reported");
        assert_eq!(buf.loose.len(), 2, "the chunk's batches are back in the buffer");
        assert_eq!(buf.loose_bytes, bad_bytes + good_bytes);
        assert_eq!(memory.used(), bad_bytes + good_bytes, "still counted, released by the flush");
        flush_fails(key, buf, &memory).await;
    }

    #[tokio::test]
    async fn a_chunk_whose_encoding_panics_fails_its_partition_and_frees_its_memory() {
        let memory = Memory::new(1 << 30);
        let key = PartitionKey::at("t", &AccountId::new("111111111111").unwrap(), 0);
        let ints = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch = |schema: &SchemaRef, v: i64| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![v; 10]))]).unwrap()
        };
        // A first chunk encodes: the file holds it, charged as its size.
        let mut buf = buffer(ints.clone(), vec![batch(&ints, 1)], &memory);
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        buf.encode_loose(&key, &memory, EncodeOptions::default(), permit).await;
        let file = buf.settle(&key, &memory).await.unwrap().expect("the file holds the first chunk");
        buf.encoder = Encoder::Idle(file);
        assert!(memory.used() > 0);
        // The second chunk's encoding panics, taking the file with it.
        let panics = Arc::new(Schema::new_with_metadata(
            ints.fields().clone(),
            std::collections::HashMap::from([(PANIC.to_owned(), String::new())]),
        ));
        let second = batch(&panics, 2);
        memory.add(second.get_array_memory_size());
        buf.loose_bytes = second.get_array_memory_size();
        buf.charge.fetch_add(buf.loose_bytes, Ordering::Relaxed);
        buf.loose = vec![second];
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        buf.encode_loose(&key, &memory, EncodeOptions::default(), permit).await;
        let err = buf.settle(&key, &memory).await.unwrap_err();
        assert!(err.contains("encoding a chunk did not finish") && err.contains("panicked"), "{err}");
        assert!(buf.settle(&key, &memory).await.is_err(), "and stays reported");
        assert_eq!(memory.used(), 0, "the chunk's and the file's memory are released");
        assert_eq!(buf.charge.load(Ordering::Relaxed), 0);
        flush_fails(key, buf, &memory).await;
    }
}
