//! Compaction: a closed partition's small files become one file holding the
//! same rows in WAL order; other hubs' files, puts in flight, big files and
//! open hours are left alone; a merge cut short by a crash is finished or
//! dropped on recovery, never duplicating or losing a row.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt as _};
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use watershed_event::{parse_rfc3339_micros, AccountId, Clock};
use watershed_lake::{
    encode, CommitLog, CompactConfig, CompactStats, Compactor, EncodeOptions, Lake, LakePath, Memory,
    OpenMerge, PartitionKey,
};

#[derive(Debug)]
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now_micros(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

const SOURCE: &str = "wal-00000000000000aa";
const HOUR: i64 = 3_600_000_000;

fn partition(hour: &str) -> PartitionKey {
    let t = parse_rfc3339_micros(format!("2024-05-01T{hour}:30:00Z")).unwrap();
    PartitionKey::at("orders", &AccountId::new("111111111111").unwrap(), t)
}

/// `rows` rows for WAL record `record`: ids `r<record>-<i>`, values
/// `record * 1000 + i`; `extra` adds a column (another schema version).
fn batch(record: u64, rows: usize, extra: bool) -> RecordBatch {
    let mut fields =
        vec![Field::new("event_id", DataType::Utf8, false), Field::new("v", DataType::Int64, false)];
    let ids: Vec<String> = (0..rows).map(|i| format!("r{record}-{i}")).collect();
    let vals: Vec<i64> =
        (0..rows).map(|i| i64::try_from(record * 1000).unwrap() + i64::try_from(i).unwrap()).collect();
    let mut cols: Vec<Arc<dyn Array>> =
        vec![Arc::new(StringArray::from(ids)), Arc::new(Int64Array::from(vals))];
    if extra {
        fields.push(Field::new("w", DataType::Int64, true));
        cols.push(Arc::new(Int64Array::from(vec![Some(1); rows])));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

fn file_bytes(path: &LakePath, source: &str, records: &[u64], rows: usize, extra: bool) -> Bytes {
    let batches: Vec<RecordBatch> = records.iter().map(|&r| batch(r, rows, extra)).collect();
    let meta = vec![
        ("watershed.source".to_owned(), source.to_owned()),
        ("watershed.records".to_owned(), records.iter().map(u64::to_string).collect::<Vec<_>>().join(",")),
    ];
    Bytes::from(encode(&path.0, &batches[0].schema(), &batches, meta, EncodeOptions::default()).unwrap())
}

/// Compaction settings for this lake's files: merged up to `target_bytes`,
/// the other settings the defaults.
fn config(target_bytes: u64) -> CompactConfig {
    CompactConfig { target_bytes, source: SOURCE.to_owned(), ..CompactConfig::default() }
}

struct Lakeside {
    dir: tempfile::TempDir,
    lake: Lake,
    log: Arc<Mutex<CommitLog>>,
    clock: Arc<TestClock>,
}

/// A local store whose deletes fail while `fail` is set, and whose puts
/// fail while `fail_puts` is; its listings also name the `ghosts` (files
/// listed an instant before another writer deleted them).
#[derive(Debug)]
struct FailingStore {
    inner: object_store::local::LocalFileSystem,
    fail: Arc<AtomicBool>,
    fail_puts: Arc<AtomicBool>,
    ghosts: Arc<Mutex<Vec<ObjectMeta>>>,
}

impl std::fmt::Display for FailingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailingStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FailingStore {
    async fn put_opts(&self, l: &ObjPath, p: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
        if self.fail_puts.load(Ordering::Relaxed) {
            return Err(object_store::Error::Generic { store: "test", source: "puts fail".into() });
        }
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &ObjPath,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &ObjPath, o: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        if self.fail.load(Ordering::Relaxed) {
            return locations
                .map(|_| Err(object_store::Error::Generic { store: "test", source: "deletes fail".into() }))
                .boxed();
        }
        self.inner.delete_stream(locations)
    }
    fn list(&self, p: Option<&ObjPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let ghosts: Vec<_> = self
            .ghosts
            .lock()
            .unwrap()
            .iter()
            .filter(|g| p.is_none_or(|p| g.location.prefix_matches(p)))
            .cloned()
            .map(Ok)
            .collect();
        self.inner.list(p).chain(futures::stream::iter(ghosts)).boxed()
    }
    async fn list_with_delimiter(&self, p: Option<&ObjPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(p).await
    }
    async fn copy_opts(&self, f: &ObjPath, t: &ObjPath, o: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(f, t, o).await
    }
}

impl Lakeside {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        Self::with_lake(dir, lake).await
    }

    /// A lake whose deletes fail while the first returned flag is set,
    /// and puts while the second is.
    async fn failing() -> (Self, Arc<AtomicBool>, Arc<AtomicBool>) {
        let (s, store) = Self::over_failing_store().await;
        (s, store.fail.clone(), store.fail_puts.clone())
    }

    /// A lake whose listings also name the files in the returned list,
    /// which are not there.
    async fn haunted() -> (Self, Arc<Mutex<Vec<ObjectMeta>>>) {
        let (s, store) = Self::over_failing_store().await;
        (s, store.ghosts.clone())
    }

    /// A lake over a [`FailingStore`] that fails nothing yet, and the
    /// store (its flags and ghosts are shared).
    async fn over_failing_store() -> (Self, Arc<FailingStore>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lake")).unwrap();
        let inner = object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("lake")).unwrap();
        let store = Arc::new(FailingStore {
            inner,
            fail: Arc::default(),
            fail_puts: Arc::default(),
            ghosts: Arc::default(),
        });
        let lake = Lake::new(store.clone(), 2);
        (Self::with_lake(dir, lake).await, store)
    }

    async fn with_lake(dir: tempfile::TempDir, lake: Lake) -> Self {
        let (log, _) = CommitLog::open(&dir.path().join("commits.log"), &lake, SOURCE, 0).await.unwrap();
        let now = parse_rfc3339_micros("2024-05-01T12:10:00Z").unwrap();
        Self { dir, lake, log: Arc::new(Mutex::new(log)), clock: Arc::new(TestClock(AtomicI64::new(now))) }
    }

    /// Write and commit (through the log, as the lake writer does) a file
    /// of `source` holding `records`.
    async fn commit(
        &self,
        key: &PartitionKey,
        source: &str,
        records: &[u64],
        rows: usize,
        extra: bool,
    ) -> LakePath {
        let path = key.file(source, records[0], *records.last().unwrap());
        self.log.lock().unwrap().intent(&path, &key.dir(), records).unwrap().wait().unwrap();
        self.lake.put_create(&path, file_bytes(&path, source, records, rows, extra)).await.unwrap();
        if source == SOURCE {
            self.log.lock().unwrap().commit(&path).unwrap();
        }
        path
    }

    fn compactor(&self, target_bytes: u64) -> Compactor {
        self.compactor_over(self.log.clone(), config(target_bytes), Arc::default())
    }

    fn compactor_over(
        &self,
        log: Arc<Mutex<CommitLog>>,
        config: CompactConfig,
        stats: Arc<CompactStats>,
    ) -> Compactor {
        Compactor::new(self.lake.clone(), log, self.clock.clone(), config, stats)
    }

    /// A compactor that only plans (targets of 64 MiB), over `log` (opened
    /// with [`CommitLog::open_read_only`]).
    fn planner(&self, log: CommitLog) -> Compactor {
        self.compactor_over(Arc::new(Mutex::new(log)), config(64 << 20), Arc::default()).plan_only()
    }

    async fn files(&self, key: &PartitionKey) -> Vec<String> {
        files_of(&self.lake, key).await
    }

    async fn rows(&self, path: &str) -> (Vec<String>, String) {
        rows_of(&self.lake, path).await
    }
}

/// The ids of `path`'s rows, in order, and its `watershed.records`.
async fn rows_of(lake: &Lake, path: &str) -> (Vec<String>, String) {
    let bytes = lake.get(path).await.unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
    let records = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == "watershed.records").and_then(|k| k.value.clone()))
        .unwrap_or_default();
    let mut ids = Vec::new();
    for b in builder.build().unwrap() {
        let b = b.unwrap();
        let col = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        ids.extend(col.iter().map(|v| v.unwrap().to_owned()));
    }
    (ids, records)
}

/// The files of `key`'s partition, sorted.
async fn files_of(lake: &Lake, key: &PartitionKey) -> Vec<String> {
    let mut v: Vec<String> =
        lake.list(Some(&key.dir())).await.unwrap().into_iter().map(|m| m.location.to_string()).collect();
    v.sort();
    v
}

fn expected_ids(records: &[u64], rows: usize) -> Vec<String> {
    records.iter().flat_map(|r| (0..rows).map(move |i| format!("r{r}-{i}"))).collect()
}

/// Five small files of a closed hour become one, rows in WAL order, with
/// the union of their records; another hub's file, a put in flight, a big
/// file and the open hour's files stay; recovery still counts the merged
/// records as committed; the open hour is merged once it closes.
#[tokio::test]
async fn small_files_of_a_closed_partition_are_merged_in_wal_order() {
    let s = Lakeside::new().await;
    let closed = partition("07");
    let open = partition("12");
    for r in [3, 1, 5, 2, 4] {
        s.commit(&closed, SOURCE, &[r * 10, r * 10 + 1], 50, false).await;
    }
    let theirs = s.commit(&closed, "wal-00000000000000bb", &[7], 50, false).await;
    // An intent whose commit line has not come yet: a put in flight.
    let in_flight = closed.file(SOURCE, 90, 90);
    s.log.lock().unwrap().intent(&in_flight, &closed.dir(), &[90]).unwrap().wait().unwrap();
    s.lake.put_create(&in_flight, file_bytes(&in_flight, SOURCE, &[90], 50, false)).await.unwrap();
    let big = s.commit(&closed, SOURCE, &[100], 20_000, false).await;
    let big_size = s.lake.get(&big.0).await.unwrap().len() as u64;
    s.commit(&open, SOURCE, &[200], 10, false).await;
    s.commit(&open, SOURCE, &[201], 10, false).await;

    // Files of at least half the target are big enough.
    let target = 2 * big_size;
    let compactor = s.compactor(target);
    let stop = AtomicBool::new(false);
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!((report.partitions, report.merges, report.inputs, report.rows), (1, 1, 5, 500), "{report:?}");
    assert_eq!(report.failures, 0);

    let files = s.files(&closed).await;
    let merged = format!("{}/{SOURCE}-{:016x}-{:016x}-merged.parquet", closed.dir(), 10, 51);
    assert_eq!(files, {
        let mut v = vec![merged.clone(), theirs.0.clone(), in_flight.0.clone(), big.0.clone()];
        v.sort();
        v
    });
    let (ids, records) = s.rows(&merged).await;
    let order = [10, 11, 20, 21, 30, 31, 40, 41, 50, 51];
    assert_eq!(ids, expected_ids(&order, 50), "rows in WAL order");
    assert_eq!(records, "10,11,20,21,30,31,40,41,50,51");
    assert_eq!(s.files(&open).await.len(), 2, "the open hour is left alone");

    // A second pass finds nothing more to do in the closed hour.
    let again = compactor.run_once(&stop).await.unwrap();
    assert_eq!(again.merges, 0, "{again:?}");

    // The log still tells recovery the merged records are in the lake.
    s.log.lock().unwrap().commit(&in_flight).unwrap();
    let (_, committed) =
        CommitLog::open(&s.dir.path().join("commits.log"), &s.lake, SOURCE, 0).await.unwrap();
    for r in order {
        assert!(committed.contains(&closed.dir(), r), "record {r}");
    }

    // Once its hour has ended an hour ago, the open partition is merged
    // too (it waited from the first pass); the file committed meanwhile in
    // the closed one joins the merged file there, still in WAL order.
    s.clock.0.store(parse_rfc3339_micros("2024-05-01T14:00:00Z").unwrap(), Ordering::Relaxed);
    let later = compactor.run_once(&stop).await.unwrap();
    assert_eq!((later.merges, later.inputs), (2, 4), "{later:?}");
    assert_eq!(s.files(&open).await.len(), 1);
    let remerged = format!("{}/{SOURCE}-{:016x}-{:016x}-merged.parquet", closed.dir(), 10, 90);
    assert_eq!(s.files(&closed).await, {
        let mut v = vec![remerged.clone(), theirs.0.clone(), big.0.clone()];
        v.sort();
        v
    });
    let (ids, records) = s.rows(&remerged).await;
    let mut order = order.to_vec();
    order.push(90);
    assert_eq!(ids, expected_ids(&order, 50));
    assert!(records.ends_with(",51,90"), "{records}");
}

/// Files of different schemas (a table's versions) are merged separately,
/// each run in WAL order; a stop request leaves the rest for later.
#[tokio::test]
async fn files_of_different_schemas_are_merged_separately() {
    let s = Lakeside::new().await;
    let key = partition("08");
    for r in [1, 2] {
        s.commit(&key, SOURCE, &[r], 10, false).await;
    }
    for r in [3, 4, 5] {
        s.commit(&key, SOURCE, &[r], 10, true).await;
    }
    let compactor = s.compactor(64 << 20);
    let stopped = compactor.run_once(&AtomicBool::new(true)).await.unwrap();
    assert_eq!(stopped.merges, 0);
    assert_eq!(s.files(&key).await.len(), 5);

    let mut calls = Vec::new();
    let report = compactor
        .run_once_with(&AtomicBool::new(false), &mut |done, total, r| calls.push((done, total, r.merges)))
        .await
        .unwrap();
    assert_eq!((report.merges, report.inputs), (2, 5), "{report:?}");
    assert_eq!(calls, vec![(0, 1, 0), (1, 1, 2)], "progress per partition, then the total");
    let files = s.files(&key).await;
    assert_eq!(files.len(), 2, "{files:?}");
    let (a, _) = s.rows(&files[0]).await;
    let (b, _) = s.rows(&files[1]).await;
    assert_eq!(a, expected_ids(&[1, 2], 10));
    assert_eq!(b, expected_ids(&[3, 4, 5], 10));
}

/// A merge logged before a crash: finished on recovery when its file is in
/// the lake with the records it named (the replaced files are deleted),
/// dropped when its file never landed or holds other records (the replaced
/// files stay). Either way each row is in exactly one file.
#[tokio::test]
async fn a_merge_cut_short_is_finished_or_dropped_on_recovery() {
    for case in ["put", "not put", "another writer's file"] {
        let s = Lakeside::new().await;
        let key = partition("09");
        let a = s.commit(&key, SOURCE, &[1], 10, false).await;
        let b = s.commit(&key, SOURCE, &[2], 10, false).await;
        let out = LakePath(format!("{}/{SOURCE}-{:016x}-{:016x}-merged.parquet", key.dir(), 1, 2));
        let m = OpenMerge {
            path: out.0.clone(),
            partition: key.dir(),
            inputs: vec![a.0.clone(), b.0.clone()],
            records: vec![1, 2],
        };
        s.log.lock().unwrap().merge(&m).unwrap();
        match case {
            "put" => {
                s.lake.put_create(&out, file_bytes(&out, SOURCE, &[1, 2], 10, false)).await.unwrap();
            }
            "another writer's file" => {
                s.lake.put_create(&out, file_bytes(&out, SOURCE, &[7], 10, false)).await.unwrap();
            }
            _ => {}
        }
        // The crash: the log is dropped with the merge open.
        let path = s.dir.path().join("commits.log");
        drop(s.log);
        let (log, committed) = CommitLog::open(&path, &s.lake, SOURCE, 0).await.unwrap();
        assert!(log.open_merges().is_empty(), "{case}");
        assert!(committed.contains(&key.dir(), 1) && committed.contains(&key.dir(), 2), "{case}");
        let files = files_of(&s.lake, &key).await;
        let mut want = match case {
            "put" => vec![out.0.clone()],
            "not put" => vec![a.0.clone(), b.0.clone()],
            _ => vec![a.0.clone(), b.0.clone(), out.0.clone()],
        };
        want.sort();
        assert_eq!(files, want, "{case}");
        let log_text = std::fs::read_to_string(&path).unwrap();
        assert!(!log_text.contains("\"merge\""), "{case}: settled merges leave the log: {log_text}");
    }
}

/// Change the line of the log at `path` that contains `needle`, keeping it
/// valid JSON (a digit of its records becomes another), as damage on disk
/// might; returns the log's bytes after.
fn damage_line(path: &std::path::Path, needle: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let line = lines.iter_mut().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle} in {text}"));
    let at = line.find("\"records\":[").expect("a line with records") + "\"records\":[".len();
    let digit = line.as_bytes()[at];
    line.replace_range(at..=at, if digit == b'9' { "8" } else { "9" });
    let damaged = lines.join("\n") + "\n";
    std::fs::write(path, &damaged).unwrap();
    damaged.into_bytes()
}

/// A damaged line of the commit log (valid JSON still, but not what was
/// written: its checksum tells) is not believed: the log is copied aside,
/// and what the line held is rebuilt from the lake's files, so the
/// records of a file whose intent it was are still committed (a restart
/// does not write its rows again) and the damaged records are not. The
/// rebuilt log needs no second rebuild.
#[tokio::test]
async fn a_damaged_commit_log_is_rebuilt_from_the_lake() {
    let s = Lakeside::new().await;
    let (k9, k10) = (partition("09"), partition("10"));
    let lost = s.commit(&k9, SOURCE, &[1, 2], 10, false).await;
    s.commit(&k10, SOURCE, &[3], 10, false).await;
    s.commit(&k9, SOURCE, &[4, 5], 10, false).await;
    // Another hub's file, which this hub's log never named.
    let theirs = k10.file("wal-00000000000000bb", 6, 6);
    s.lake.put_create(&theirs, file_bytes(&theirs, "wal-00000000000000bb", &[6], 10, false)).await.unwrap();
    let path = s.dir.path().join("commits.log");
    drop(s.log);
    let name = lost.0.rsplit_once('/').unwrap().1.to_owned();
    let damaged = damage_line(&path, &format!("\"op\":\"intent\",\"path\":\"{}", lost.0));
    assert!(!String::from_utf8_lossy(&damaged).contains("[1,2]"), "the damage changed the records");

    let (log, committed) = CommitLog::open(&path, &s.lake, SOURCE, 0).await.unwrap();
    assert_eq!((committed.damaged_lines, committed.recovered), (1, 1), "{name}");
    for (key, r) in [(&k9, 1), (&k9, 2), (&k10, 3), (&k9, 4), (&k9, 5)] {
        assert!(committed.contains(&key.dir(), r), "record {r}");
    }
    assert!(!committed.contains(&k9.dir(), 9), "the damaged line's records are not believed");
    assert!(!committed.contains(&k10.dir(), 6), "another hub's file is not this one's");
    assert_eq!(std::fs::read(path.with_extension("log.damaged")).unwrap(), damaged, "kept aside");
    drop(log);

    let (_, again) = CommitLog::open(&path, &s.lake, SOURCE, 0).await.unwrap();
    assert_eq!((again.damaged_lines, again.recovered), (0, 0));
    for (key, r) in [(&k9, 1), (&k9, 2), (&k10, 3), (&k9, 4), (&k9, 5)] {
        assert!(again.contains(&key.dir(), r), "record {r} after the rebuild");
    }
}

/// A merge whose line the damage took, left unfinished by a crash (its
/// file put, its inputs not yet deleted): the rebuild finds the merged
/// file, and the files of its partition whose records and rows it holds,
/// and finishes the merge, so the rows are in the lake once. A file whose
/// records it holds but not every row of (here another writer's file of
/// the same records under this WAL identity) is left, and every record
/// still counts committed.
#[tokio::test]
async fn a_merge_whose_line_was_damaged_is_finished_from_the_rows() {
    let s = Lakeside::new().await;
    let key = partition("09");
    let a = s.commit(&key, SOURCE, &[1], 10, false).await;
    let b = s.commit(&key, SOURCE, &[2, 3], 10, false).await;
    let out = LakePath(format!("{}/{SOURCE}-{:016x}-{:016x}-merged.parquet", key.dir(), 1, 3));
    let m = OpenMerge {
        path: out.0.clone(),
        partition: key.dir(),
        inputs: vec![a.0.clone(), b.0.clone()],
        records: vec![1, 2, 3],
    };
    s.log.lock().unwrap().merge(&m).unwrap();
    s.lake.put_create(&out, file_bytes(&out, SOURCE, &[1, 2, 3], 10, false)).await.unwrap();
    let Lakeside { dir, lake, log, .. } = s;
    let path = dir.path().join("commits.log");
    drop(log);
    damage_line(&path, "\"op\":\"merge\"");

    let (log, committed) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
    assert!(log.open_merges().is_empty());
    assert_eq!(files_of(&lake, &key).await, vec![out.0.clone()], "the inputs are deleted");
    assert_eq!(rows_of(&lake, &out.0).await.0, expected_ids(&[1, 2, 3], 10));
    for r in 1..=3 {
        assert!(committed.contains(&key.dir(), r), "record {r}");
    }
    drop(log);

    // A file whose records the merged file holds, but not all its rows
    // (records 2 and 3 again, with more rows), and the log damaged again.
    let twin = LakePath(format!("{}/{SOURCE}-{:016x}-{:016x}.parquet", key.dir(), 2, 3));
    lake.put_create(&twin, file_bytes(&twin, SOURCE, &[2, 3], 15, false)).await.unwrap();
    std::fs::write(&path, b"not a commit log line\n").unwrap();
    let (log, committed) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
    assert!(log.open_merges().is_empty());
    assert_eq!(files_of(&lake, &key).await, {
        let mut v = vec![out.0.clone(), twin.0.clone()];
        v.sort();
        v
    });
    for r in 1..=3 {
        assert!(committed.contains(&key.dir(), r), "record {r}");
    }
}

/// The hour of a partition directory bounds when it is closed: at the
/// hour's end plus `after`, not before.
#[tokio::test]
async fn a_partition_is_compacted_only_after_its_hour_ended_plus_the_delay() {
    let s = Lakeside::new().await;
    let key = partition("11");
    s.commit(&key, SOURCE, &[1], 10, false).await;
    s.commit(&key, SOURCE, &[2], 10, false).await;
    let compactor = s.compactor(64 << 20);
    let stop = AtomicBool::new(false);
    // 12:10: the hour ended 10 minutes ago.
    assert_eq!(compactor.run_once(&stop).await.unwrap().merges, 0);
    s.clock.0.store(parse_rfc3339_micros("2024-05-01T12:59:59Z").unwrap(), Ordering::Relaxed);
    assert_eq!(compactor.run_once(&stop).await.unwrap().merges, 0);
    s.clock.0.fetch_add(HOUR / 3600, Ordering::Relaxed);
    assert_eq!(compactor.run_once(&stop).await.unwrap().merges, 1);
}

/// A merge cut short by the store is settled by the next pass, its file
/// checked before any input is deleted. Deletes failing: the merged file
/// is in (readers see the rows twice meanwhile, and the pass reports a
/// failure); the next pass deletes the inputs. The put failing: the
/// inputs are untouched; the next pass finds no merged file, drops the
/// merge, and merges the files again.
#[tokio::test]
async fn a_merge_cut_short_by_the_store_is_settled_by_the_next_pass() {
    for put_fails in [false, true] {
        let (s, deletes_fail, puts_fail) = Lakeside::failing().await;
        let key = partition("10");
        for r in [1, 2, 3] {
            s.commit(&key, SOURCE, &[r], 10, false).await;
        }
        let compactor = s.compactor(64 << 20);
        let stop = AtomicBool::new(false);
        let failing = if put_fails { &puts_fail } else { &deletes_fail };
        failing.store(true, Ordering::Relaxed);
        let report = compactor.run_once(&stop).await.unwrap();
        let (merges, files) = if put_fails { (0, 3) } else { (1, 4) };
        assert_eq!((report.merges, report.failures), (merges, 1), "put fails: {put_fails}: {report:?}");
        assert_eq!(s.files(&key).await.len(), files, "put fails: {put_fails}");
        assert_eq!(s.log.lock().unwrap().open_merges().len(), 1, "open until settled");

        failing.store(false, Ordering::Relaxed);
        let report = compactor.run_once(&stop).await.unwrap();
        assert_eq!((report.merges, report.failures), (1 - merges, 0), "put fails: {put_fails}: {report:?}");
        let files = s.files(&key).await;
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(s.log.lock().unwrap().open_merges().is_empty());
        assert_eq!(s.rows(&files[0]).await.0, expected_ids(&[1, 2, 3], 10));
    }
}

/// A pass that cannot settle a merge (its inputs' deletion failed again)
/// leaves the partition alone: merging the merge's inputs (still there)
/// again, with a new file, put their rows in two files for good.
#[tokio::test]
async fn a_partition_whose_merge_is_still_open_is_not_merged_again() {
    let (s, deletes_fail, _) = Lakeside::failing().await;
    let key = partition("07");
    let compactor = s.compactor(64 << 20);
    let stop = AtomicBool::new(false);
    s.commit(&key, SOURCE, &[1], 10, false).await;
    s.commit(&key, SOURCE, &[2], 10, false).await;
    deletes_fail.store(true, Ordering::Relaxed);
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!((report.merges, report.failures), (1, 1), "{report:?}");
    s.commit(&key, SOURCE, &[3], 10, false).await;
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!((report.merges, report.failures), (0, 1), "left alone while the merge is open: {report:?}");
    deletes_fail.store(false, Ordering::Relaxed);
    for _ in 0..2 {
        assert_eq!(compactor.run_once(&stop).await.unwrap().failures, 0);
    }
    let files = s.files(&key).await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(s.rows(&files[0]).await.0, expected_ids(&[1, 2, 3], 10), "every row once, in WAL order");
}

/// A big file between two small ones keeps them apart: their merged file
/// would span its records, so the partition's files in the order of
/// their records would not hold its rows in WAL order.
#[tokio::test]
async fn small_files_are_not_merged_across_a_big_file() {
    let s = Lakeside::new().await;
    let key = partition("06");
    s.commit(&key, SOURCE, &[1], 10, false).await;
    let big = s.commit(&key, SOURCE, &[2], 20_000, false).await;
    let big_size = s.lake.get(&big.0).await.unwrap().len() as u64;
    s.commit(&key, SOURCE, &[3], 10, false).await;
    s.commit(&key, SOURCE, &[4], 10, false).await;
    let compactor = s.compactor(2 * big_size);
    let report = compactor.run_once(&AtomicBool::new(false)).await.unwrap();
    assert_eq!((report.merges, report.inputs), (1, 2), "only the files after it: {report:?}");
    let mut rows = Vec::new();
    for f in s.files(&key).await {
        rows.extend(s.rows(&f).await.0);
    }
    let mut want = expected_ids(&[1], 10);
    want.extend(expected_ids(&[2], 20_000));
    want.extend(expected_ids(&[3, 4], 10));
    assert_eq!(rows, want, "in WAL order, file by file");
}

/// A file of the lake that cannot be read (its footer, or its pages,
/// damaged on disk) is named, counted as a failure once and left as it
/// is; the small files on either side of it are merged without it (a
/// merge across it would hold its neighbours' rows out of WAL order).
#[tokio::test]
async fn a_damaged_file_is_left_alone_and_merged_around() {
    // (merges, unreadable files) of three passes: a damaged footer is found while
    // planning, a damaged page by the merge that reads it (the next pass
    // merges around it).
    for (what, damage, passes) in [
        (
            "a footer",
            (|b: &mut Vec<u8>| {
                let n = b.len();
                b[n - 40..n - 8].fill(0xff);
            }) as fn(&mut Vec<u8>),
            [(2, 1), (0, 0), (0, 0)],
        ),
        ("the first page", |b: &mut Vec<u8>| b[4..36].fill(0xff), [(0, 1), (2, 0), (0, 0)]),
    ] {
        let s = Lakeside::new().await;
        let key = partition("06");
        let mut paths = Vec::new();
        for r in 1..=5 {
            paths.push(s.commit(&key, SOURCE, &[r], 200, false).await);
        }
        let on_disk = s.dir.path().join("lake").join(&paths[2].0);
        let mut bytes = std::fs::read(&on_disk).unwrap();
        damage(&mut bytes);
        std::fs::write(&on_disk, &bytes).unwrap();

        let compactor = s.compactor(64 << 20);
        let stop = AtomicBool::new(false);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let report = compactor.run_once(&stop).await.unwrap();
            assert_eq!(report.failures, 0, "{what}");
            seen.push((report.merges, report.unreadable));
        }
        assert_eq!(seen, passes, "{what}: merged around it, reported once");
        assert_eq!(std::fs::read(&on_disk).unwrap(), bytes, "{what}: the damaged file is left as it is");
        let files = s.files(&key).await;
        let merged = |a: u64, b: u64| format!("{}/{SOURCE}-{a:016x}-{b:016x}-merged.parquet", key.dir());
        assert_eq!(files, vec![merged(1, 2), paths[2].0.clone(), merged(4, 5)], "{what}");
        assert_eq!(s.rows(&merged(1, 2)).await.0, expected_ids(&[1, 2], 200), "{what}");
        assert_eq!(s.rows(&merged(4, 5)).await.0, expected_ids(&[4, 5], 200), "{what}");
    }
}

/// A put in flight (its commit line not yet written), or a file the
/// writer is about to put, between two small files keeps them apart:
/// merged without it, their file would later be merged with it and hold
/// its rows out of WAL order.
#[tokio::test]
async fn small_files_are_not_merged_across_a_put_in_flight() {
    let s = Lakeside::new().await;
    let key = partition("08");
    let compactor = s.compactor(64 << 20);
    let stop = AtomicBool::new(false);
    s.commit(&key, SOURCE, &[1], 10, false).await;
    let in_flight = key.file(SOURCE, 2, 2);
    s.log.lock().unwrap().intent(&in_flight, &key.dir(), &[2]).unwrap().wait().unwrap();
    s.lake.put_create(&in_flight, file_bytes(&in_flight, SOURCE, &[2], 10, false)).await.unwrap();
    s.commit(&key, SOURCE, &[3], 10, false).await;
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!(report.merges, 0, "{report:?}");
    s.log.lock().unwrap().commit(&in_flight).unwrap();
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!((report.merges, report.inputs), (1, 3), "{report:?}");
    let files = s.files(&key).await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(s.rows(&files[0]).await.0, expected_ids(&[1, 2, 3], 10), "in WAL order");

    // So does a file the writer has taken to encode, reserved before its
    // intent is logged and not in the lake yet.
    let key = partition("09");
    s.commit(&key, SOURCE, &[4], 10, false).await;
    let reserved = key.file(SOURCE, 5, 5);
    s.log.lock().unwrap().reserve(&reserved);
    s.commit(&key, SOURCE, &[6], 10, false).await;
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!(report.merges, 0, "{report:?}");
    // Its put and commit then make the partition one to look at again.
    s.log.lock().unwrap().intent(&reserved, &key.dir(), &[5]).unwrap().wait().unwrap();
    s.lake.put_create(&reserved, file_bytes(&reserved, SOURCE, &[5], 10, false)).await.unwrap();
    s.log.lock().unwrap().commit(&reserved).unwrap();
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!((report.merges, report.inputs), (1, 3), "{report:?}");
    let files = s.files(&key).await;
    assert_eq!(s.rows(&files[0]).await.0, expected_ids(&[4, 5, 6], 10), "in WAL order");
}

/// Late events reach a closed partition as small files, one per pass
/// here. The partition's big file is not rewritten to add one of them:
/// the late files are merged among themselves, and the big file only
/// once they add a quarter of its size. Over 40 passes the bytes written
/// stay a small multiple of the data, the partition keeps a few files,
/// and every row is there once.
#[tokio::test]
async fn late_files_do_not_rewrite_a_big_file_each_pass() {
    let s = Lakeside::new().await;
    let key = partition("05");
    let big = s.commit(&key, SOURCE, &[1], 20_000, false).await;
    let big_size = s.lake.get(&big.0).await.unwrap().len() as u64;
    let compactor = s.compactor(64 << 20);
    let stop = AtomicBool::new(false);
    let mut records = vec![1];
    let (mut written, mut max_files, mut big_rewritten_at) = (0u64, 0usize, None);
    for pass in 0..40u64 {
        let r = 100 + pass;
        s.commit(&key, SOURCE, &[r], 200, false).await;
        records.push(r);
        let report = compactor.run_once(&stop).await.unwrap();
        assert_eq!(report.failures, 0, "{report:?}");
        written += report.bytes_out;
        let files = s.files(&key).await;
        max_files = max_files.max(files.len());
        if pass == 0 {
            assert_eq!(report.merges, 0, "one late file alone is left as it is");
        }
        if pass == 1 {
            assert_eq!((report.merges, report.inputs), (1, 2), "two late files merged together");
            assert!(files.contains(&big.0), "the big file untouched: {files:?}");
        }
        if big_rewritten_at.is_none() && !files.contains(&big.0) {
            big_rewritten_at = Some(pass);
        }
    }
    let late_bytes = written;
    assert!(
        late_bytes < 6 * big_size,
        "40 late files cost {late_bytes} bytes of merges against a big file of {big_size}"
    );
    assert!(max_files <= 6, "the partition keeps a few files, not one per late file: {max_files}");
    let rewritten = big_rewritten_at.expect("the big file is merged once the late files are worth it");
    assert!(rewritten > 1, "not on the first late files: pass {rewritten}");
    let mut ids = Vec::new();
    for f in s.files(&key).await {
        ids.extend(s.rows(&f).await.0);
    }
    ids.sort();
    let mut expected = expected_ids(&[1], 20_000);
    for &r in &records[1..] {
        expected.extend(expected_ids(&[r], 200));
    }
    expected.sort();
    assert_eq!(ids, expected, "every row once");
}

/// A plan (`lake compact --dry-run`) counts the merges a pass would
/// make, and writes nothing: the lake's files and the commit log are as
/// they were. A merge cut short earlier is neither settled nor planned
/// over: it is counted as unsettled and its partition left out. A real
/// pass then makes the merges the plan counted.
#[tokio::test]
async fn a_plan_counts_the_merges_and_changes_nothing() {
    let s = Lakeside::new().await;
    let (key, cut) = (partition("03"), partition("04"));
    for r in 1..=4 {
        s.commit(&key, SOURCE, &[r], 10, false).await;
    }
    let a = s.commit(&cut, SOURCE, &[11], 10, false).await;
    let b = s.commit(&cut, SOURCE, &[12], 10, false).await;
    let out = LakePath(format!("{}/{SOURCE}-{:016x}-{:016x}-merged.parquet", cut.dir(), 11, 12));
    let m = OpenMerge {
        path: out.0.clone(),
        partition: cut.dir(),
        inputs: vec![a.0, b.0],
        records: vec![11, 12],
    };
    s.log.lock().unwrap().merge(&m).unwrap();
    s.lake.put_create(&out, file_bytes(&out, SOURCE, &[11, 12], 10, false)).await.unwrap();
    let path = s.dir.path().join("commits.log");
    let log_before = std::fs::read(&path).unwrap();
    let files_before = (s.files(&key).await, s.files(&cut).await);

    let read_only = CommitLog::open_read_only(&path, &s.lake).await.unwrap();
    assert_eq!(read_only.open_merges().len(), 1, "the cut-short merge stays open");
    let plan = s.planner(read_only).run_once(&AtomicBool::new(false)).await.unwrap();
    assert_eq!((plan.partitions, plan.merges, plan.inputs, plan.rows), (1, 1, 4, 40), "{plan:?}");
    assert_eq!((plan.unsettled, plan.bytes_out, plan.failures), (1, 0, 0), "{plan:?}");
    assert_eq!(std::fs::read(&path).unwrap(), log_before, "the commit log is untouched");
    assert_eq!((s.files(&key).await, s.files(&cut).await), files_before, "the lake is untouched");
    let leftovers: Vec<_> =
        std::fs::read_dir(s.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains("plan")), "{leftovers:?}");

    let done = s.compactor(64 << 20).run_once(&AtomicBool::new(false)).await.unwrap();
    assert_eq!((done.merges, done.inputs, done.rows), (plan.merges, plan.inputs, plan.rows), "{done:?}");
    assert_eq!(s.files(&cut).await, vec![out.0.clone()], "the real pass settles the cut-short merge");
}

/// A plan may run beside the hub that writes the lake: a file whose
/// intent is logged but whose put has not landed when the plan opens the
/// log is in flight, not the plan's to count even once it lands; a file
/// listed and then deleted (merged by the hub meanwhile) leaves its
/// partition out, counted as changed, rather than failing the plan.
#[tokio::test]
async fn a_plan_beside_a_running_hub_leaves_out_puts_in_flight_and_vanished_files() {
    let (s, ghosts) = Lakeside::haunted().await;
    let (key, busy) = (partition("03"), partition("04"));
    for r in 1..=3 {
        s.commit(&key, SOURCE, &[r], 10, false).await;
    }
    // The hub's next file of the partition: intent logged, put in flight.
    let in_flight = key.file(SOURCE, 4, 4);
    s.log.lock().unwrap().intent(&in_flight, &key.dir(), &[4]).unwrap().wait().unwrap();
    for r in 11..=12 {
        s.commit(&busy, SOURCE, &[r], 10, false).await;
    }
    let gone = busy.file(SOURCE, 13, 13);
    ghosts.lock().unwrap().push(ObjectMeta {
        location: ObjPath::from(gone.0.as_str()),
        last_modified: chrono::Utc::now(),
        size: 100,
        e_tag: None,
        version: None,
    });

    let path = s.dir.path().join("commits.log");
    let read_only = CommitLog::open_read_only(&path, &s.lake).await.unwrap();
    assert!(read_only.is_pending(&in_flight.0), "an intent whose file is not there yet is in flight");
    // The put lands while the plan runs.
    s.lake.put_create(&in_flight, file_bytes(&in_flight, SOURCE, &[4], 10, false)).await.unwrap();
    let plan = s.planner(read_only).run_once(&AtomicBool::new(false)).await.unwrap();
    assert_eq!((plan.partitions, plan.merges, plan.inputs, plan.rows), (2, 1, 3, 30), "{plan:?}");
    assert_eq!((plan.changed, plan.unsettled, plan.failures), (1, 0, 0), "{plan:?}");
    assert_eq!(s.files(&key).await.len(), 4, "the lake is untouched");
}

/// Merges are charged to the lake writer's memory budget: a merge's
/// inputs add up to at most a quarter of the budget (more merged files,
/// each within it), a merge waits for room under the budget's high mark
/// and is left to a later pass when none comes, and its memory is given
/// back when it is done, whether it succeeded or failed.
#[tokio::test]
async fn merges_are_charged_to_the_memory_budget() {
    let (s, _, puts_fail) = Lakeside::failing().await;
    let key = partition("09");
    let mut size = 0;
    for r in 1..=6 {
        let path = s.commit(&key, SOURCE, &[r], 5000, false).await;
        size = size.max(s.lake.get(&path.0).await.unwrap().len());
    }
    let other = partition("08");
    for r in [7, 8] {
        s.commit(&other, SOURCE, &[r], 5000, false).await;
    }
    // Room for three files per merge: inputs of `c` bytes charge at most
    // 3.125 c and 64 KiB, under the high mark (80%) of the budget.
    let memory = Memory::new(((3 * size + size / 2) * 25 / 8 + (64 << 10)) * 10 / 8);
    let config = CompactConfig { memory_wait: Duration::from_millis(300), ..config(64 << 20) };
    let stats = Arc::new(CompactStats::default());
    let compactor = s.compactor_over(s.log.clone(), config, stats.clone()).with_memory(memory.clone());
    let stop = AtomicBool::new(false);

    // The writer holds the budget up to its high mark: no room. The pass
    // ends there (the other partition is not looked at, so it does not
    // wait for room as well).
    let writer = memory.high_mark();
    memory.add(writer);
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!(
        (report.partitions, report.merges, report.deferred, report.failures),
        (1, 0, 1, 0),
        "{report:?}"
    );
    assert_eq!(stats.deferred.load(Ordering::Relaxed), 1);
    assert_eq!((s.files(&key).await.len(), s.files(&other).await.len()), (6, 2), "nothing merged");
    assert_eq!(memory.used(), writer, "nothing charged while waiting");

    // Room, but the merged file cannot be put: charged, then given back.
    memory.release(writer);
    puts_fail.store(true, Ordering::Relaxed);
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!(
        (report.partitions, report.merges, report.failures),
        (2, 0, 3),
        "all merges tried: {report:?}"
    );
    assert_eq!(memory.used(), 0, "a failed merge gives its memory back");

    // The store works again: two merges of three files each, and the
    // other partition's.
    puts_fail.store(false, Ordering::Relaxed);
    let report = compactor.run_once(&stop).await.unwrap();
    assert_eq!((report.merges, report.inputs, report.deferred), (3, 8, 0), "{report:?}");
    assert_eq!(s.files(&other).await.len(), 1);
    assert_eq!(memory.used(), 0, "given back after each merge");
    let files = s.files(&key).await;
    assert_eq!(files.len(), 2, "{files:?}");
    let (a, _) = s.rows(&files[0]).await;
    let (b, _) = s.rows(&files[1]).await;
    assert_eq!(a, expected_ids(&[1, 2, 3], 5000));
    assert_eq!(b, expected_ids(&[4, 5, 6], 5000));
}

/// One step of [`any_history_of_commits_passes_and_restarts_keeps_every_row_once`].
#[derive(Debug, Clone)]
enum Step {
    /// Commit a file of the next record: `rows` rows into closed hour
    /// `hour`, under the table's older schema or (with `extra`) its newer.
    Commit { hour: usize, rows: usize, extra: bool },
    /// A compaction pass while the store fails puts or deletes, or not.
    Pass { puts_fail: bool, deletes_fail: bool },
    /// A restart: the commit log is read back from disk (recovery settles
    /// merges cut short).
    Restart,
    /// Put a file of the next record whose commit line has not come yet
    /// (the lake writer's put in flight).
    Begin { hour: usize, rows: usize },
    /// Write the commit line of the oldest put in flight.
    Finish,
}

/// The ids of every file of `key`'s partition, each file's in its order.
async fn partition_rows(s: &Lakeside, key: &PartitionKey) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for f in s.files(key).await {
        out.push(s.rows(&f).await.0);
    }
    out
}

/// The WAL record of an id `r<record>-<i>`.
fn record_of(id: &str) -> u64 {
    id[1..id.find('-').unwrap()].parse().unwrap()
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..Default::default() })]

    /// Whatever the history of commits (two schema versions; puts whose
    /// commit line comes later), compaction passes under failing puts and
    /// deletes, and restarts: no row is ever
    /// missing from the lake (between a failed delete and the next pass a
    /// row may be in two files), every file holds its rows in WAL order,
    /// and once the store works again a restart and passes leave every
    /// row in exactly one file, the files in the order of their records
    /// holding the rows in WAL order, with the commit log counting every
    /// record committed. And a plan (`--dry-run`) beside the running hub
    /// counts the merges, inputs and rows of the pass `lake compact` makes
    /// once the hub has stopped.
    #[test]
    fn any_history_of_commits_passes_and_restarts_keeps_every_row_once(
        target in prop_oneof![Just(3_000u64), Just(30_000), Just(64 << 20)],
        steps in proptest::collection::vec(
            prop_oneof![
                3 => (0usize..3, 1usize..80, any::<bool>())
                    .prop_map(|(hour, rows, extra)| Step::Commit { hour, rows, extra }),
                2 => (any::<bool>(), any::<bool>())
                    .prop_map(|(puts_fail, deletes_fail)| Step::Pass { puts_fail, deletes_fail }),
                1 => Just(Step::Restart),
                1 => (0usize..3, 1usize..80).prop_map(|(hour, rows)| Step::Begin { hour, rows }),
                1 => Just(Step::Finish),
            ],
            1..30,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (s, store) = Lakeside::over_failing_store().await;
            let keys = [partition("05"), partition("06"), partition("07")];
            let compactor = s.compactor(target);
            let stop = AtomicBool::new(false);
            let log_path = s.dir.path().join("commits.log");
            // Per partition: the rows committed, as `rows` of each record.
            let mut committed: Vec<Vec<(u64, usize)>> = vec![Vec::new(); keys.len()];
            let mut next = 1u64;
            let mut in_flight: std::collections::VecDeque<LakePath> = std::collections::VecDeque::new();
            let expected = |committed: &[(u64, usize)]| {
                let mut ids: Vec<String> =
                    committed.iter().flat_map(|&(r, rows)| expected_ids(&[r], rows)).collect();
                ids.sort();
                ids
            };
            for step in &steps {
                match *step {
                    Step::Commit { hour, rows, extra } => {
                        s.commit(&keys[hour], SOURCE, &[next], rows, extra).await;
                        committed[hour].push((next, rows));
                        next += 1;
                    }
                    Step::Pass { puts_fail: false, deletes_fail: false }
                        if s.log.lock().unwrap().open_merges().is_empty() =>
                    {
                        // A plan (`lake compact --dry-run`, over the log
                        // read as it stands, beside the running hub) counts
                        // the merges that `lake compact` makes once the hub
                        // has stopped: a restart, then a compactor's first
                        // pass.
                        let read_only = CommitLog::open_read_only(&log_path, &s.lake).await.unwrap();
                        let plan = s
                            .compactor_over(Arc::new(Mutex::new(read_only)), config(target), Arc::default())
                            .plan_only()
                            .run_once(&stop)
                            .await
                            .unwrap();
                        let (log, _) = CommitLog::open(&log_path, &s.lake, SOURCE, 0).await.unwrap();
                        *s.log.lock().unwrap() = log;
                        in_flight.clear();
                        let fresh = s.compactor(target);
                        let report = fresh.run_once(&stop).await.unwrap();
                        prop_assert_eq!(
                            (plan.merges, plan.inputs, plan.rows),
                            (report.merges, report.inputs, report.rows),
                            "the plan against the pass"
                        );
                    }
                    Step::Pass { puts_fail, deletes_fail } => {
                        store.fail_puts.store(puts_fail, Ordering::Relaxed);
                        store.fail.store(deletes_fail, Ordering::Relaxed);
                        let report = compactor.run_once(&stop).await;
                        store.fail_puts.store(false, Ordering::Relaxed);
                        store.fail.store(false, Ordering::Relaxed);
                        prop_assert!(report.is_ok(), "{:?}", report);
                    }
                    Step::Restart => {
                        // A restart resolves intents: a put in flight whose
                        // file is there counts as committed.
                        let (log, _) = CommitLog::open(&log_path, &s.lake, SOURCE, 0).await.unwrap();
                        *s.log.lock().unwrap() = log;
                        in_flight.clear();
                    }
                    Step::Begin { hour, rows } => {
                        let key = &keys[hour];
                        let path = key.file(SOURCE, next, next);
                        s.log.lock().unwrap().intent(&path, &key.dir(), &[next]).unwrap().wait().unwrap();
                        s.lake.put_create(&path, file_bytes(&path, SOURCE, &[next], rows, false)).await.unwrap();
                        committed[hour].push((next, rows));
                        in_flight.push_back(path);
                        next += 1;
                    }
                    Step::Finish => {
                        if let Some(path) = in_flight.pop_front() {
                            s.log.lock().unwrap().commit(&path).unwrap();
                        }
                    }
                }
                for (i, key) in keys.iter().enumerate() {
                    let files = partition_rows(&s, key).await;
                    let mut have: Vec<String> = files.iter().flatten().cloned().collect();
                    have.sort();
                    have.dedup();
                    prop_assert_eq!(have, expected(&committed[i]), "no row missing in {}", key.dir());
                    for f in &files {
                        let records: Vec<u64> = f.iter().map(|id| record_of(id)).collect();
                        prop_assert!(records.is_sorted(), "rows in WAL order in {}: {:?}", key.dir(), records);
                    }
                }
            }
            // The puts in flight are committed, the store works again: a
            // restart and passes settle everything.
            for path in in_flight.drain(..) {
                s.log.lock().unwrap().commit(&path).unwrap();
            }
            let (log, _) = CommitLog::open(&log_path, &s.lake, SOURCE, 0).await.unwrap();
            *s.log.lock().unwrap() = log;
            for _ in 0..4 {
                let report = compactor.run_once(&stop).await.unwrap();
                prop_assert_eq!(report.failures, 0, "{:?}", report);
            }
            prop_assert!(s.log.lock().unwrap().open_merges().is_empty());
            let (_, recovered) = CommitLog::open(&log_path, &s.lake, SOURCE, 0).await.unwrap();
            for (i, key) in keys.iter().enumerate() {
                let mut have: Vec<String> = partition_rows(&s, key).await.into_iter().flatten().collect();
                // The files in the order of their records hold the rows in
                // WAL order.
                let records: Vec<u64> = have.iter().map(|id| record_of(id)).collect();
                prop_assert!(records.is_sorted(), "WAL order across the files of {}: {:?}", key.dir(), records);
                have.sort();
                prop_assert_eq!(have, expected(&committed[i]), "every row once in {}", key.dir());
                for &(r, _) in &committed[i] {
                    prop_assert!(recovered.contains(&key.dir(), r), "record {} of {}", r, key.dir());
                }
            }
            Ok(())
        })?;
    }
}

/// The ids of the rows of file `path`, or why it cannot be read.
async fn try_rows(lake: &Lake, path: &str) -> Result<Vec<String>, String> {
    let bytes = lake.get(path).await.map_err(|e| e.to_string())?;
    let read = std::panic::catch_unwind(|| -> Result<Vec<String>, String> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| e.to_string())?;
        let mut ids = Vec::new();
        for b in reader {
            let b = b.map_err(|e| e.to_string())?;
            let col = b.column(0).as_any().downcast_ref::<StringArray>().ok_or("not text")?;
            ids.extend(col.iter().map(|v| v.unwrap_or_default().to_owned()));
        }
        Ok(ids)
    });
    read.unwrap_or_else(|_| Err("the reader panicked".to_owned()))
}

/// Damage file 3 of five (of `rows` rows each) on disk, `len` bytes
/// from `at` (a fraction of its size) XORed with `mask`, and run three
/// compaction passes: they neither fail nor panic, every row of the
/// other files is in the lake exactly once, and the damaged file is
/// either left exactly as it is (the result: true) or merged with the
/// others (false; the damage did not stop it being read).
async fn damage_one(rows: &[usize], at: f64, len: usize, mask: u8) -> Result<bool, TestCaseError> {
    let s = Lakeside::new().await;
    let key = partition("06");
    let mut paths = Vec::new();
    for (r, &n) in (1u64..).zip(rows) {
        paths.push(s.commit(&key, SOURCE, &[r], n, false).await);
    }
    let damaged = &paths[2].0;
    let on_disk = s.dir.path().join("lake").join(damaged);
    let mut bytes = std::fs::read(&on_disk).unwrap();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let start = ((bytes.len() as f64) * at) as usize;
    let end = (start + len).min(bytes.len());
    for b in &mut bytes[start..end] {
        *b ^= mask;
    }
    std::fs::write(&on_disk, &bytes).unwrap();

    let compactor = s.compactor(64 << 20);
    let stop = AtomicBool::new(false);
    for _ in 0..3 {
        let report = compactor.run_once(&stop).await;
        prop_assert!(report.is_ok(), "{:?}", report);
    }
    let mut ids = Vec::new();
    let mut left = false;
    for f in s.files(&key).await {
        if &f == damaged {
            prop_assert_eq!(std::fs::read(&on_disk).unwrap(), bytes.clone(), "left exactly as it is");
            left = true;
            continue;
        }
        match try_rows(&s.lake, &f).await {
            Ok(v) => ids.extend(v),
            Err(e) => prop_assert!(false, "{} cannot be read: {}", f, e),
        }
    }
    for (r, &n) in (1u64..).zip(rows) {
        if r == 3 {
            continue;
        }
        let prefix = format!("r{r}-");
        let got: Vec<&String> = ids.iter().filter(|id| id.starts_with(&prefix)).collect();
        let want = expected_ids(&[r], n);
        prop_assert_eq!(got, want.iter().collect::<Vec<_>>(), "record {}'s rows, once, in order", r);
    }
    let files = s.files(&key).await;
    if left {
        let merged = |a: u64, b: u64| format!("{}/{SOURCE}-{a:016x}-{b:016x}-merged.parquet", key.dir());
        prop_assert_eq!(files, vec![merged(1, 2), damaged.clone(), merged(4, 5)], "merged around it");
    } else {
        prop_assert_eq!(files.len(), 1, "merged with the others");
    }
    Ok(left)
}

/// Damage that makes the Parquet reader panic while a merge reads the
/// file's pages (found by the property test below) fails that merge, not
/// compaction: the file is left alone and the others merged around it.
#[tokio::test]
async fn a_file_the_reader_panics_on_is_left_alone() {
    let left = damage_one(&[24, 224, 245, 228, 27], 0.408_593_064_312_124_7, 18, 217).await.unwrap();
    assert!(left);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..Default::default() })]

    /// Whatever bytes of one file are damaged on disk, no row of the
    /// others is lost (see [`damage_one`]).
    #[test]
    fn damage_to_one_file_loses_no_row_of_the_others(
        rows in proptest::collection::vec(1usize..300, 5),
        at in 0.0f64..1.0,
        len in 1usize..48,
        mask in 1u8..=255,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(damage_one(&rows, at, len, mask))?;
    }
}
