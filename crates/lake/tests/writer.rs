//! The writer's policies with an injected clock: partition count is
//! bounded, late partitions wait longer before rolling, every row reaches a
//! committed file exactly once and in order, open partitions hold encoded
//! pages, memory pressure encodes before it flushes, partitions fed an
//! event at a time are charged what they hold, and (a property test) any
//! order of parts under any settings, over a store whose puts fail, lands
//! every row once, in order.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use watershed_event::{AccountId, Clock};
use watershed_lake::{
    batch_bytes, CommitLog, CommitSink, Lake, LakeWriter, Memory, Msg, Part, PartitionKey, WriterConfig,
    WriterStats,
};

#[derive(Debug)]
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_micros(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Committed files (partition, records), their count, and the WAL's
/// `commit_before` as the test sets it.
#[derive(Default)]
struct Sink(Mutex<Vec<(String, Vec<u64>)>>, AtomicU64, AtomicU64);

impl CommitSink for Sink {
    fn committed(&self, partition: &PartitionKey, records: &[u64]) {
        self.0.lock().unwrap().push((partition.dir(), records.to_vec()));
        self.1.fetch_add(1, Ordering::Relaxed);
    }
    fn oldest_needed(&self) -> u64 {
        0
    }
    fn commit_before(&self) -> u64 {
        self.2.load(Ordering::Relaxed)
    }
}

const HOUR: i64 = 3_600_000_000;

fn batch(n: u64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
    RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![i64::try_from(n).unwrap()]))]).unwrap()
}

/// A writer running on its own task over a lake in a temporary directory.
struct Harness {
    dir: tempfile::TempDir,
    tx: tokio::sync::mpsc::Sender<Msg>,
    task: tokio::task::JoinHandle<()>,
    clock: Arc<TestClock>,
    sink: Arc<Sink>,
    stats: Arc<WriterStats>,
    memory: Arc<Memory>,
    /// The writer's commit log (compaction shares it).
    log: Arc<Mutex<CommitLog>>,
    lake: Lake,
}

impl Harness {
    async fn start(cfg: WriterConfig, budget: usize, now: i64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 4).unwrap();
        Self::start_on(dir, lake, cfg, budget, now).await
    }

    /// [`Harness::start`] over `lake`, whose files are under `dir`.
    async fn start_on(
        dir: tempfile::TempDir,
        lake: Lake,
        cfg: WriterConfig,
        budget: usize,
        now: i64,
    ) -> Self {
        let (log, _) = CommitLog::open(&dir.path().join("commits.log"), &lake, "t", u64::MAX).await.unwrap();
        let clock = Arc::new(TestClock(AtomicI64::new(now)));
        let (sink, stats, memory) =
            (Arc::new(Sink::default()), Arc::new(WriterStats::default()), Memory::new(budget));
        let writer = LakeWriter::new(
            cfg,
            lake.clone(),
            memory.clone(),
            log,
            sink.clone(),
            clock.clone(),
            stats.clone(),
        );
        let log = writer.commit_log();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let task = tokio::spawn(writer.run(rx));
        Self { dir, tx, task, clock, sink, stats, memory, log, lake }
    }

    /// Hand over one partition's rows, counted against the budget as the
    /// pipeline does.
    async fn send(&self, key: PartitionKey, batch: RecordBatch, record: u64) {
        self.memory.add(batch_bytes(&batch));
        self.tx.send(Msg::Parts(vec![Part { key, batch, record }])).await.unwrap();
    }

    /// Wait until no file has been committed for 300 ms (at most 10 s):
    /// flushes of evicted partitions finish on their own time, after the
    /// message that evicted them.
    async fn settle(&self) {
        let mut last = (self.sink.1.load(Ordering::Relaxed), std::time::Instant::now());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while last.1.elapsed() < Duration::from_millis(300) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let n = self.sink.1.load(Ordering::Relaxed);
            if n != last.0 {
                last = (n, std::time::Instant::now());
            }
        }
    }

    /// Wait (at most 10 s) until `n` files are committed, then for quiet:
    /// work the writer's half-second tick starts lands after it.
    async fn wait_flushed(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.flushed().len() < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.settle().await;
    }

    fn flushed(&self) -> Vec<String> {
        self.sink.0.lock().unwrap().iter().map(|(p, _)| p.clone()).collect()
    }

    /// Flush everything and stop the writer; the lake stays for reading.
    async fn finish(self) -> (tempfile::TempDir, Arc<Sink>, Arc<WriterStats>, Arc<Memory>) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx.send(Msg::FlushAll(done)).await.unwrap();
        wait.await.unwrap();
        drop(self.tx);
        self.task.await.unwrap();
        (self.dir, self.sink, self.stats, self.memory)
    }
}

#[tokio::test]
async fn late_partitions_are_bounded_and_coalesce() {
    let now = 1_000 * HOUR;
    let cfg = WriterConfig {
        roll_age: Duration::from_secs(60),
        late_roll_age: Duration::from_secs(600),
        late_after: Duration::from_secs(3600),
        max_open_partitions: 4,
        ..WriterConfig::default()
    };
    let w = Harness::start(cfg, 1 << 30, now).await;
    let account = AccountId::new("111111111111").unwrap();

    // A trickle of late events across 10 old hours, plus current ones.
    let mut record: u64 = 0;
    for round in 0..3 {
        for h in 0..10 {
            record += 1;
            w.send(PartitionKey::at("t", &account, now - (48 + h) * HOUR), batch(record), record).await;
        }
        record += 1;
        w.send(PartitionKey::at("t", &account, now), batch(record), record).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            w.stats.open_partitions.load(Ordering::Relaxed) <= 4,
            "round {round}: open partitions are bounded"
        );
    }
    // Two minutes later the current partition has rolled, late ones have not.
    w.settle().await;
    let before = w.flushed().len();
    w.clock.0.store(now + 120_000_000, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let rolled = w.flushed().split_off(before);
    assert!(
        rolled.iter().all(|p| p.contains(&PartitionKey::at("t", &account, now).date)),
        "only the current hour rolled: {rolled:?}"
    );
    assert!(!rolled.is_empty(), "the current partition rolled by age");
    let (_dir, sink, _, _) = w.finish().await;

    // Every record is committed exactly once.
    let mut all: Vec<u64> = sink.0.lock().unwrap().iter().flat_map(|(_, r)| r.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=record).collect::<Vec<_>>());
    // The bound forced early flushes, so there are more files than hours,
    // but far fewer than events.
    let files = sink.1.load(Ordering::Relaxed);
    assert!(files < record, "{files} files for {record} events");
}

/// When the WAL asks for its records before some seq to be committed, the
/// partitions holding any of them flush at once, late or not, whatever
/// their roll age; partitions holding only newer records stay open.
#[tokio::test]
async fn partitions_holding_the_wals_oldest_records_commit_when_it_asks() {
    let now = 1_000 * HOUR;
    let cfg = WriterConfig {
        roll_age: Duration::from_secs(3600),
        late_roll_age: Duration::from_secs(3600),
        ..WriterConfig::default()
    };
    let w = Harness::start(cfg, 1 << 30, now).await;
    let account = AccountId::new("111111111111").unwrap();
    let late = PartitionKey::at("t", &account, now - 48 * HOUR);
    let current = PartitionKey::at("t", &account, now);
    let other = PartitionKey::at("u", &account, now);
    // The late partition took record 1 and, later, 6; the current one 2..=5;
    // the other table only 7 (parts arrive slightly out of order).
    w.send(late.clone(), batch(1), 1).await;
    for r in 2..=5 {
        w.send(current.clone(), batch(r), r).await;
    }
    w.send(other.clone(), batch(7), 7).await;
    w.send(late.clone(), batch(6), 6).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(w.flushed().is_empty(), "nothing is due by age or size");

    w.sink.2.store(2, Ordering::Relaxed);
    w.wait_flushed(1).await;
    assert_eq!(w.flushed(), vec![late.dir()], "only the partition holding record 1");
    assert_eq!(w.stats.wal_flushes.load(Ordering::Relaxed), 1);

    w.sink.2.store(7, Ordering::Relaxed);
    w.wait_flushed(2).await;
    assert_eq!(w.flushed(), vec![late.dir(), current.dir()], "then the one holding 2..=5, not 7's");
    w.sink.2.store(0, Ordering::Relaxed);
    // Record 8 reopens the late partition; nothing more is asked for.
    w.send(late.clone(), batch(8), 8).await;
    w.settle().await;
    assert_eq!(w.flushed().len(), 2);
    let (_dir, sink, stats, _) = w.finish().await;
    assert_eq!(stats.wal_flushes.load(Ordering::Relaxed), 2);
    let files = sink.0.lock().unwrap().clone();
    assert_eq!(files[0].1, vec![1, 6]);
    assert_eq!(files[1].1, vec![2, 3, 4, 5]);
    let mut all: Vec<u64> = files.iter().flat_map(|(_, r)| r.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=8).collect::<Vec<_>>(), "every record exactly once");
}

#[tokio::test]
async fn many_small_batches_are_encoded_in_chunks_without_losing_or_reordering_rows() {
    use arrow::array::{Array, StringBuilder};
    let w = Harness::start(WriterConfig::default(), 1 << 30, 1_000 * HOUR).await;
    let account = AccountId::new("111111111111").unwrap();
    let key = PartitionKey::at("t", &account, 1_000 * HOUR);
    let schema = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Int64, false),
        Field::new("s", DataType::Utf8, true),
    ]));
    // 60 requests of 333 rows: several chunks encoded as they form, and a
    // loose tail. Builders keep spare capacity, as request batches do.
    let (requests, rows) = (60u64, 333u64);
    for r in 0..requests {
        let mut s = StringBuilder::with_capacity(1024, 1 << 16);
        for i in 0..rows {
            if i % 7 == 0 {
                s.append_null()
            } else {
                s.append_value(format!("value-{}", r * rows + i))
            }
        }
        let v = Int64Array::from_iter_values((0..rows).map(|i| i64::try_from(r * rows + i).unwrap()));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(v), Arc::new(s.finish())]).unwrap();
        w.send(key.clone(), b, r + 1).await;
    }
    let (dir, _, stats, memory) = w.finish().await;

    assert_eq!(memory.used(), 0, "every buffered byte is released exactly once");
    assert_eq!(stats.rows.load(Ordering::Relaxed), requests * rows);
    let files: Vec<_> =
        walk(dir.path()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    assert_eq!(files.len(), 1, "one file: {files:?}");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&files[0]).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut next = 0u64;
    for b in reader {
        let b = b.unwrap();
        let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let s = b.column(1).as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
        for i in 0..b.num_rows() {
            assert_eq!(v.value(i), i64::try_from(next).unwrap(), "rows keep their order");
            if (next % rows).is_multiple_of(7) {
                assert!(s.is_null(i));
            } else {
                assert_eq!(s.value(i), format!("value-{next}"));
            }
            next += 1;
        }
    }
    assert_eq!(next, requests * rows, "every row is in the file");
}

/// A backfill scattered over many partitions brings each an event or two
/// per request. Their one-row batches are joined as they arrive, so the
/// budget (which charges each batch its arrays' overhead) holds hundreds
/// of rows per partition rather than a few dozen batches, and joining
/// keeps every row, in order.
#[tokio::test]
async fn partitions_fed_an_event_at_a_time_hold_joined_batches() {
    let now = 1_000 * HOUR;
    let w = Harness::start(WriterConfig::default(), 1 << 30, now).await;
    let account = AccountId::new("111111111111").unwrap();
    let (partitions, per_partition) = (20u64, 300u64);
    let one_row = batch_bytes(&batch(0));
    for r in 0..per_partition {
        for p in 0..partitions {
            let key = PartitionKey::at("t", &account, now - (48 + i64::try_from(p).unwrap()) * HOUR);
            w.send(key, batch(r * partitions + p), r * partitions + p + 1).await;
        }
    }
    w.settle().await;
    let (held, sent) = (w.memory.used(), usize::try_from(partitions * per_partition).unwrap() * one_row);
    assert!(held < sent / 4, "{held} bytes held for {sent} sent as one-row batches");
    assert_eq!(w.flushed().len(), 0, "nothing flushed early");

    let (dir, _, stats, memory) = w.finish().await;
    assert_eq!(memory.used(), 0, "every buffered byte is released exactly once");
    assert_eq!(stats.rows.load(Ordering::Relaxed), partitions * per_partition);
    for file in walk(dir.path()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")) {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&file).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        let values: Vec<i64> = reader
            .flat_map(|b| {
                b.unwrap().column(0).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec()
            })
            .collect();
        assert_eq!(values.len(), usize::try_from(per_partition).unwrap(), "{}", file.display());
        let p = values[0];
        let want: Vec<i64> = (0..per_partition).map(|r| i64::try_from(r * partitions).unwrap() + p).collect();
        assert_eq!(values, want, "rows keep their order in {}", file.display());
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Rows of `width` pseudo-random base64 characters: neither a dictionary
/// nor zstd makes them smaller than about three quarters.
fn noise_batch(schema: &Arc<Schema>, first: u64, rows: u64, width: usize) -> RecordBatch {
    use arrow::array::StringArray;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = first.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let s = StringArray::from_iter_values((0..rows).map(|_| {
        (0..width)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(ALPHABET[usize::try_from(x % 64).unwrap()])
            })
            .collect::<String>()
    }));
    let v = Int64Array::from_iter_values((first..first + rows).map(|i| i64::try_from(i).unwrap()));
    RecordBatch::try_new(schema.clone(), vec![Arc::new(v), Arc::new(s)]).unwrap()
}

fn text_batch(schema: &Arc<Schema>, first: u64, rows: u64, width: usize) -> RecordBatch {
    use arrow::array::StringArray;
    let v = Int64Array::from_iter_values((first..first + rows).map(|i| i64::try_from(i % 100).unwrap()));
    // Low-cardinality text, as a status or a region column.
    let s = StringArray::from_iter_values((first..first + rows).map(|i| format!("{:0>width$}", i % 50)));
    RecordBatch::try_new(schema.clone(), vec![Arc::new(v), Arc::new(s)]).unwrap()
}

#[tokio::test]
async fn open_partitions_hold_encoded_bytes_and_pressure_encodes_before_it_flushes() {
    let budget = 4 << 20;
    let w = Harness::start(WriterConfig::default(), budget, 1_000 * HOUR).await;
    let account = AccountId::new("111111111111").unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Int64, false),
        Field::new("s", DataType::Utf8, false),
    ]));

    // Thirty thousand low-cardinality rows into one partition: encoded as
    // they arrive, the open file holds a fraction of their Arrow size.
    let big = PartitionKey::at("t", &account, 1_000 * HOUR);
    let mut arrow_bytes = 0;
    for r in 0..30u64 {
        let b = text_batch(&schema, r * 1000, 1000, 120);
        arrow_bytes += batch_bytes(&b);
        w.send(big.clone(), b, r + 1).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.memory.used() > arrow_bytes / 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "used {} of {arrow_bytes} Arrow bytes",
            w.memory.used()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(w.sink.1.load(Ordering::Relaxed), 0, "nothing rolled yet");

    // A small partition, then 2,000 wide rows (2 KB each) of compressible
    // text, too few rows for a chunk: they cross the budget's high mark,
    // and encoding them, not flushing anything, brings usage back down.
    let small = PartitionKey::at("u", &account, 1_000 * HOUR);
    w.send(small.clone(), text_batch(&schema, 0, 10, 120), 11).await;
    let wide = PartitionKey::at("v", &account, 1_000 * HOUR);
    w.send(wide.clone(), text_batch(&schema, 0, 1000, 2000), 12).await;
    w.send(wide.clone(), text_batch(&schema, 1000, 1000, 2000), 13).await;
    let high = budget / 10 * 8;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.memory.used() >= high {
        assert!(std::time::Instant::now() < deadline, "usage stayed at {}", w.memory.used());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // (A flush releases its memory just before the file is put.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let flushed = w.flushed();
    assert!(flushed.is_empty(), "encoding relieved the budget; nothing flushed early: {flushed:?}");

    // Then 2,000 wide rows that do not compress: encoding does not bring
    // usage down, so the partition holding the most memory flushes (not
    // the first one, which took in more Arrow bytes); the others stay open.
    let noise = PartitionKey::at("w", &account, 1_000 * HOUR);
    w.send(noise.clone(), noise_batch(&schema, 0, 1000, 2000), 14).await;
    w.send(noise.clone(), noise_batch(&schema, 1000, 1000, 2000), 15).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.sink.1.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "the budget never forced a flush");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let flushed = w.flushed();
    assert!(
        flushed.iter().all(|p| p.starts_with("w/")),
        "only the largest partition flushes; the others stay open: {flushed:?}"
    );

    let (_dir, _, _, memory) = w.finish().await;
    assert_eq!(memory.used(), 0);
}

/// The one file a finished writer left in its lake: (path inside the lake,
/// bytes).
fn only_file(dir: &tempfile::TempDir) -> (std::path::PathBuf, Vec<u8>) {
    let lake = dir.path().join("lake");
    let files = walk(&lake);
    assert_eq!(files.len(), 1, "{files:?}");
    (files[0].strip_prefix(&lake).unwrap().to_owned(), std::fs::read(&files[0]).unwrap())
}

/// A create-only put that finds a file under its name: the same bytes (an
/// attempt whose put landed though it reported a failure) are kept as this
/// writer's; another writer's file (a hub running from a copy of this data
/// directory has the same WAL identity, so the same names) is left alone
/// and its name not taken for a commit: the rows stay uncommitted (in the
/// WAL) and the put is retried until the name is free.
#[tokio::test]
async fn a_name_taken_by_another_writer_is_never_taken_for_this_ones_file() {
    let now = 1_000 * HOUR;
    let account = AccountId::new("111111111111").unwrap();
    let key = PartitionKey::at("t", &account, now);
    let written = |n: u64| {
        let key = key.clone();
        async move {
            let w = Harness::start(WriterConfig::default(), 1 << 30, now).await;
            w.send(key, batch(n), 1).await;
            only_file(&w.finish().await.0)
        }
    };
    let (name, ours) = written(1).await;
    let (their_name, theirs) = written(99).await;
    assert_eq!(name, their_name, "same record, same name");
    assert_ne!(ours, theirs);

    // The same bytes already there: committed.
    let w = Harness::start(WriterConfig::default(), 1 << 30, now).await;
    let at = w.dir.path().join("lake").join(&name);
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::write(&at, &ours).unwrap();
    w.send(key.clone(), batch(1), 1).await;
    let (_dir, sink, stats, _) = w.finish().await;
    assert_eq!((sink.1.load(Ordering::Relaxed), stats.failures.load(Ordering::Relaxed)), (1, 0));

    // Another writer's file: not committed, not overwritten, retried.
    let w = Harness::start(WriterConfig::default(), 1 << 30, now).await;
    let at = w.dir.path().join("lake").join(&name);
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::write(&at, &theirs).unwrap();
    w.send(key.clone(), batch(1), 1).await;
    let (done, flushed) = tokio::sync::oneshot::channel();
    w.tx.send(Msg::FlushAll(done)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.stats.failures.load(Ordering::Relaxed) < 2 {
        assert!(std::time::Instant::now() < deadline, "the name clash is not reported as a failure");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(w.flushed().is_empty(), "their file is not taken for ours");
    assert_eq!(std::fs::read(&at).unwrap(), theirs, "and is left alone");
    let log = std::fs::read_to_string(w.dir.path().join("commits.log")).unwrap();
    assert!(log.contains("\"abandon\""), "{log}");
    // Once the name is free (the copy given its own identity and its file
    // moved away), the retry commits this writer's rows.
    std::fs::remove_file(&at).unwrap();
    flushed.await.unwrap();
    assert_eq!(w.flushed(), vec![key.dir()]);
    assert_eq!(std::fs::read(&at).unwrap(), ours);
    drop(w.tx);
    w.task.await.unwrap();
}

/// What a [`FlakyStore`] does with a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PutFault {
    /// Fails without writing.
    Lost,
    /// Writes the file, then reports a failure (a response lost on the
    /// way back).
    Landed,
}

/// A local store whose puts meet the queued faults in turn, then succeed.
#[derive(Debug)]
struct FlakyStore {
    inner: object_store::local::LocalFileSystem,
    faults: Mutex<std::collections::VecDeque<PutFault>>,
}

impl std::fmt::Display for FlakyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlakyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for FlakyStore {
    async fn put_opts(
        &self,
        l: &object_store::path::Path,
        p: object_store::PutPayload,
        o: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let fault = self.faults.lock().unwrap().pop_front();
        let failed = || object_store::Error::Generic { store: "flaky", source: "the put failed".into() };
        match fault {
            Some(PutFault::Lost) => Err(failed()),
            Some(PutFault::Landed) => {
                self.inner.put_opts(l, p, o).await?;
                Err(failed())
            }
            None => self.inner.put_opts(l, p, o).await,
        }
    }
    async fn put_multipart_opts(
        &self,
        l: &object_store::path::Path,
        o: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(
        &self,
        l: &object_store::path::Path,
        o: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        p: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(p)
    }
    async fn list_with_delimiter(
        &self,
        p: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(
        &self,
        f: &object_store::path::Path,
        t: &object_store::path::Path,
        o: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
}

/// One step of [`any_order_of_parts_lands_each_row_once_in_order`].
#[derive(Debug, Clone)]
enum Step {
    /// Hand partition `partition` a batch of `rows` rows whose text is
    /// `width` bytes long.
    Send { partition: usize, rows: u64, width: usize },
    /// Move the clock on.
    Advance { secs: u64 },
}

/// Partitions of the property test: hours before its start (the last ones
/// late), of two tables and two accounts.
const PARTITIONS: [(&str, &str, i64); 6] = [
    ("t", "111111111111", 0),
    ("t", "222222222222", 0),
    ("u", "111111111111", 1),
    ("t", "111111111111", 3),
    ("u", "222222222222", 50),
    ("t", "111111111111", 100),
];

fn rows_batch(schema: &Arc<Schema>, first: u64, rows: u64, width: usize) -> RecordBatch {
    use arrow::array::StringArray;
    let v = Int64Array::from_iter_values((first..first + rows).map(|i| i64::try_from(i).unwrap()));
    let s = StringArray::from_iter(
        (first..first + rows).map(|i| (i % 7 != 0).then(|| format!("{i}-{}", "x".repeat(width)))),
    );
    RecordBatch::try_new(schema.clone(), vec![Arc::new(v), Arc::new(s)]).unwrap()
}

/// Rows of `file`: (v, s).
fn file_rows(file: &std::path::Path) -> Vec<(i64, Option<String>)> {
    use arrow::array::{Array, StringArray};
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(file).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let s = b.column(1).as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..b.num_rows() {
            out.push((v.value(i), s.is_valid(i).then(|| s.value(i).to_owned())));
        }
    }
    out
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_time: 120_000, ..Default::default() })]

    /// Whatever the order of parts, the roll sizes and ages, the bound on
    /// open partitions, the memory budget (rolls, evictions, pressure
    /// flushes), the row-group size, the store's failed puts (retried:
    /// lost ones, and ones that landed though they reported a failure)
    /// and compaction merging closed partitions all along, every row sent
    /// lands in exactly one
    /// committed file of its partition, a partition's files in the order
    /// of their records hold its rows in the order sent, each record is
    /// reported committed once per partition, and every byte charged to
    /// the budget is released.
    #[test]
    fn any_order_of_parts_lands_each_row_once_in_order(
        roll_bytes in prop_oneof![Just(2_000usize), Just(30_000), Just(64 << 20)],
        max_open in 1usize..=4,
        budget in prop_oneof![Just(20_000usize), Just(200_000), Just(1 << 30)],
        row_group_rows in prop_oneof![Just(7usize), Just(100), Just(122_880)],
        faults in proptest::collection::vec(
            prop_oneof![Just(None), Just(Some(PutFault::Lost)), Just(Some(PutFault::Landed))],
            0..4,
        ),
        compact_target in proptest::option::of(prop_oneof![Just(3_000u64), Just(30_000), Just(64 << 20)]),
        steps in proptest::collection::vec(
            prop_oneof![
                4 => (0..PARTITIONS.len(), 1u64..300, 0usize..60)
                    .prop_map(|(partition, rows, width)| Step::Send { partition, rows, width }),
                1 => (0u64..2_000).prop_map(|secs| Step::Advance { secs }),
            ],
            1..40,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let now = 1_000 * HOUR;
            let cfg = WriterConfig {
                roll_bytes,
                roll_age: Duration::from_secs(60),
                late_roll_age: Duration::from_secs(600),
                max_open_partitions: max_open,
                flush_concurrency: 2,
                encode: watershed_lake::EncodeOptions { zstd_level: 1, row_group_rows },
                ..WriterConfig::default()
            };
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("lake")).unwrap();
            // Puts meet the faults in turn (`None`: that put succeeds).
            let store = FlakyStore {
                inner: object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("lake")).unwrap(),
                faults: Mutex::new(faults.iter().flatten().copied().collect()),
            };
            let store = Arc::new(store);
            let lake = Lake::new(store.clone(), 4);
            let w = Harness::start_on(dir, lake, cfg, budget, now).await;
            let schema = Arc::new(Schema::new(vec![
                Field::new("v", DataType::Int64, false),
                Field::new("s", DataType::Utf8, true),
            ]));
            // Compaction merging the closed partitions' files all along
            // (sharing the writer's commit log), when asked.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let compactor = compact_target.map(|target_bytes| {
                Arc::new(watershed_lake::Compactor::new(
                    w.lake.clone(),
                    w.log.clone(),
                    w.clock.clone(),
                    watershed_lake::CompactConfig {
                        target_bytes,
                        after: Duration::ZERO,
                        ..watershed_lake::CompactConfig::default()
                    },
                    Arc::default(),
                ))
            });
            let compacting = compactor.clone().map(|c| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = c.run_once(&std::sync::atomic::AtomicBool::new(false)).await;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            });
            let keys: Vec<PartitionKey> = PARTITIONS
                .iter()
                .map(|(table, account, hours)| {
                    PartitionKey::at(table, &AccountId::new(*account).unwrap(), now - hours * HOUR)
                })
                .collect();
            // Per partition: the rows sent, in order, and their records.
            let mut sent: Vec<Vec<(i64, Option<String>)>> = vec![Vec::new(); keys.len()];
            let mut records: Vec<Vec<u64>> = vec![Vec::new(); keys.len()];
            let (mut next_row, mut next_record) = (0u64, 1u64);
            for step in &steps {
                match *step {
                    Step::Send { partition, rows, width } => {
                        let b = rows_batch(&schema, next_row, rows, width);
                        for i in next_row..next_row + rows {
                            let s = (i % 7 != 0).then(|| format!("{i}-{}", "x".repeat(width)));
                            sent[partition].push((i64::try_from(i).unwrap(), s));
                        }
                        records[partition].push(next_record);
                        w.send(keys[partition].clone(), b, next_record).await;
                        next_row += rows;
                        next_record += 1;
                    }
                    Step::Advance { secs } => {
                        w.clock.0.fetch_add(i64::try_from(secs).unwrap() * 1_000_000, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                }
            }
            // A writer that cannot commit retries for good: that fails too.
            let finished = tokio::time::timeout(Duration::from_secs(20), w.finish()).await;
            prop_assert!(finished.is_ok(), "every file committed within 20 s");
            let (dir, sink, stats, memory) = finished.unwrap();
            if let (Some(c), Some(task)) = (&compactor, compacting) {
                stop.store(true, Ordering::Relaxed);
                task.await.unwrap();
                for _ in 0..3 {
                    let report = c.run_once(&std::sync::atomic::AtomicBool::new(false)).await;
                    prop_assert!(report.is_ok_and(|r| r.failures == 0), "the store works again");
                }
            }
            prop_assert_eq!(memory.used(), 0, "every byte charged is released once");
            prop_assert_eq!(stats.rows.load(Ordering::Relaxed), next_row);
            let files: Vec<_> = walk(dir.path())
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect();
            for (i, key) in keys.iter().enumerate() {
                let mut mine: Vec<_> = files
                    .iter()
                    .filter(|f| f.parent().unwrap().ends_with(key.dir()))
                    .collect();
                // `<source>-<first record>-<last record>.parquet`, fixed width.
                mine.sort();
                let got: Vec<_> = mine.iter().flat_map(|f| file_rows(f)).collect();
                prop_assert_eq!(&got, &sent[i], "partition {}: files {:?}", key.dir(), mine);
                let mut committed: Vec<u64> = sink
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(p, _)| *p == key.dir())
                    .flat_map(|(_, r)| r.clone())
                    .collect();
                committed.sort_unstable();
                prop_assert_eq!(&committed, &records[i], "partition {}", key.dir());
            }
            Ok(())
        })?;
    }
}
