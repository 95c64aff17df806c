//! Compaction: the small files of a closed partition merged into files of
//! about a target size, so analysts do not open a file per minute of
//! data.
//!
//! Files roll by age (`lake.roll_age_secs`) to keep the lake fresh, which
//! at low volume makes many small files per hourly partition. Once a
//! partition's hour has ended `after` ago, a pass merges its files smaller
//! than half the target, in WAL order, into files of up to the target
//! size, leaving a big file out of a merge that would add little to it
//! ([`REWRITE_RATIO`]). Each hub compacts only the files it wrote (their names carry its
//! WAL identity), so hubs sharing a lake never merge the same file.
//!
//! A merge is crash-safe through the commit log: a `merge` line (the new
//! file, the files it replaces, the WAL records it holds) is fsynced
//! before the create-only put, the replaced files are deleted after it,
//! and a `merged` line closes it. Recovery finishes a merge whose file is
//! in the lake and drops one whose file is not (its inputs were never
//! touched). The replaced files' own commit entries stay as they were, so
//! WAL recovery still knows their records are in the lake. A file whose
//! put may be in flight (an intent not yet committed) is never merged.
//!
//! Merges count against the lake writer's memory budget (see
//! [`Compactor::with_memory`]): a merge holds its output and one input at
//! a time, so a merge's inputs add up to at most about a quarter of the
//! budget, and a merge starts only when its memory fits under the
//! budget's high mark beside what the writer holds, waiting for room up
//! to [`CompactConfig::memory_wait`]; otherwise it and the rest of the
//! pass are left to a later pass.
//!
//! Readers see either the small files or the merged one, except for the
//! moment between the merged file's put and the deletion of the files it
//! replaces, when a query listing the partition counts those rows twice
//! (or fails reading a file just deleted). Plain Hive layouts have no
//! atomic swap; the window is one put and a few deletes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use futures::StreamExt as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use watershed_event::Clock;

use crate::commit::{CommitLog, OpenMerge};
use crate::encode::{EncodeOptions, FileEncoder};
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::partition::{dir_hour_end, LakePath};
use crate::store::{Lake, Put};

/// Rows read from an input file per batch.
const READ_ROWS: usize = 8192;

/// A file is rewritten into a merge only when the files after it in the
/// merge add at least `1 / REWRITE_RATIO` of its size. Late events reach
/// a closed partition as small files, one per `late_roll_age_secs`; without
/// this, each pass would rewrite the partition's merged file whole to add
/// one of them (64 MB written for a few KB). With it, the late files are
/// merged among themselves until together they are worth the rewrite:
/// files of a partition stay few (their sizes grow geometrically) and each
/// byte is rewritten a few times, not once per late file.
const REWRITE_RATIO: u64 = 4;

/// Compaction settings.
#[derive(Debug, Clone)]
pub struct CompactConfig {
    /// Merged files grow up to about this many bytes; files of at least
    /// half of it are left as they are.
    pub target_bytes: u64,
    /// A partition is compacted once its hour ended this long ago.
    pub after: Duration,
    /// Parquet settings of merged files (the lake writer's).
    pub encode: EncodeOptions,
    /// The WAL identity whose files this compactor merges (the lake
    /// writer's `source`).
    pub source: String,
    /// How long a merge waits for room in the memory budget before it is
    /// left to a later pass.
    pub memory_wait: Duration,
}

impl Default for CompactConfig {
    fn default() -> Self {
        Self {
            target_bytes: 128 << 20,
            after: Duration::from_secs(3600),
            encode: EncodeOptions::default(),
            source: "wal".to_owned(),
            memory_wait: Duration::from_secs(30),
        }
    }
}

/// Room reserved in a merged file's buffer beyond its inputs' bytes and
/// an eighth (see `encode_run`).
const OUTPUT_SLACK: u64 = 64 << 10;

/// How often a merge waiting for room looks at the memory budget again.
const MEMORY_POLL: Duration = Duration::from_millis(100);

/// Counters, for metrics.
#[derive(Debug, Default)]
pub struct CompactStats {
    /// Merged files written.
    pub merges: AtomicU64,
    /// Files replaced by merged files.
    pub inputs: AtomicU64,
    /// Bytes of the replaced files.
    pub bytes_in: AtomicU64,
    /// Bytes of the merged files.
    pub bytes_out: AtomicU64,
    /// Merges that failed (retried on a later pass), and files found
    /// unreadable (left as they are).
    pub failures: AtomicU64,
    /// Merges left to a later pass for want of room in the memory budget.
    pub deferred: AtomicU64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    /// Closed partitions looked at.
    pub partitions: usize,
    /// Merged files written.
    pub merges: usize,
    /// Files they replaced.
    pub inputs: usize,
    /// Rows moved.
    pub rows: u64,
    /// Bytes of the replaced files.
    pub bytes_in: u64,
    /// Bytes of the merged files.
    pub bytes_out: u64,
    /// Merges that failed (their inputs are untouched or still to be
    /// deleted; a later pass retries).
    pub failures: usize,
    /// Merges left to a later pass: the memory budget had no room for
    /// them within [`CompactConfig::memory_wait`].
    pub deferred: usize,
    /// A plan's merges cut short earlier, which a real pass settles before
    /// anything else; their partitions are left out of the plan.
    pub unsettled: usize,
    /// A plan's partitions whose files changed while it read them (a
    /// running hub merged them meanwhile); left out of the plan.
    pub changed: usize,
    /// Files found unreadable (damaged), left as they are from now on and
    /// named in the log (counted in [`CompactStats::failures`] too).
    pub unreadable: usize,
    /// Files of uploads a crash left unfinished, removed
    /// ([`Lake::sweep_abandoned_uploads`]; not by a plan).
    pub abandoned_uploads: usize,
}

/// Merges the small files of closed partitions (see the module docs).
pub struct Compactor {
    lake: Lake,
    log: Arc<Mutex<CommitLog>>,
    clock: Arc<dyn Clock>,
    config: CompactConfig,
    stats: Arc<CompactStats>,
    /// Whether the whole lake was listed once (after that, only the
    /// partitions the commit log reports new files in are looked at).
    scanned: AtomicBool,
    /// Partitions with new files whose hour is not closed yet.
    waiting: Mutex<BTreeSet<String>>,
    /// Files found unreadable (a damaged footer or page): left as they
    /// are, reported once, and merged around like a big file.
    damaged: Mutex<BTreeSet<String>>,
    /// Only count what a pass would merge (see [`Compactor::plan_only`]).
    plan_only: bool,
    /// The budget merges are charged to (see [`Compactor::with_memory`]).
    memory: Option<Arc<Memory>>,
}

impl std::fmt::Debug for Compactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compactor").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A small file of this compactor's source.
struct Small {
    path: String,
    size: u64,
    first: u64,
    last: u64,
}

/// A small file whose footer was read: what a merge needs to know of it
/// before its rows are read (one input at a time, as they are encoded).
struct Input {
    path: String,
    size: u64,
    first: u64,
    last: u64,
    schema: SchemaRef,
    records: Vec<u64>,
    rows: u64,
}

/// Bytes read from the end of a file for its footer; a footer larger
/// than this is read with the whole file.
const FOOTER_READ: u64 = 64 << 10;

/// The reader builder of `path`'s footer (metadata only: no rows are read
/// through it), from its last bytes.
pub(crate) async fn footer(
    lake: &Lake,
    path: &str,
    size: u64,
) -> Result<ParquetRecordBatchReaderBuilder<Bytes>> {
    if size > FOOTER_READ {
        let tail = lake.get_range(path, size - FOOTER_READ..size).await?;
        if let Ok(builder) = reading(path, || ParquetRecordBatchReaderBuilder::try_new(tail)) {
            return Ok(builder);
        }
    }
    let bytes = lake.get(path).await?;
    reading(path, || ParquetRecordBatchReaderBuilder::try_new(bytes))
}

/// Run `read`, which reads file `path`, as an error naming the file when
/// it fails, or when the reader panics (a damaged file it does not
/// survive).
fn reading<T>(path: &str, read: impl FnOnce() -> parquet::errors::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(r) => r.map_err(parquet_err(path)),
        Err(panic) => {
            let why = watershed_event::panic_message(&*panic);
            Err(parquet_err(path)(parquet::errors::ParquetError::General(format!(
                "the reader panicked: {why}"
            ))))
        }
    }
}

fn parquet_err(path: &str) -> impl FnOnce(parquet::errors::ParquetError) -> Error + '_ {
    move |e| Error::Parquet { path: path.to_owned(), source: Box::new(e) }
}

/// The WAL records a file's `watershed.records` metadata lists.
pub(crate) fn records_of(path: &str, builder: &ParquetRecordBatchReaderBuilder<Bytes>) -> Result<Vec<u64>> {
    let kv = builder.metadata().file_metadata().key_value_metadata();
    let text = kv
        .and_then(|kv| kv.iter().find(|k| k.key == "watershed.records"))
        .and_then(|k| k.value.clone())
        .unwrap_or_default();
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                parquet_err(path)(parquet::errors::ParquetError::General(format!(
                    "watershed.records holds {s:?}, not a record number"
                )))
            })
        })
        .collect()
}

/// A file's Arrow schema without the file's own key-value metadata (which
/// the Parquet reader adds to it, and which names each file's records).
fn file_schema(builder: &ParquetRecordBatchReaderBuilder<Bytes>) -> SchemaRef {
    let schema = builder.schema();
    let mut metadata = schema.metadata().clone();
    metadata.retain(|k, _| !k.starts_with("watershed."));
    Arc::new(arrow::datatypes::Schema::new_with_metadata(schema.fields().clone(), metadata))
}

/// Which of the files `inners` hold only rows the file `outer` holds
/// too (each file's rows counted as a multiset, against the same file
/// `outer`): deleting such a file loses no row. `outer` is decoded once,
/// whatever the number of `inners` (a merged file of up to
/// `lake.compact_target_bytes`), and rows are held by a keyed 128-bit
/// hash and a count per file, not whole. A file whose schema differs from
/// `outer`'s or that cannot be read (logged) is not within.
///
/// # Errors
/// [`Error::Store`] or [`Error::Parquet`] when `outer` cannot be read.
pub(crate) async fn rows_within(lake: &Lake, inners: &[String], outer: &str) -> Result<Vec<bool>> {
    use arrow::row::{RowConverter, SortField};
    let outer_bytes = lake.get(outer).await?;
    let ob = reading(outer, || ParquetRecordBatchReaderBuilder::try_new(outer_bytes))?;
    let mut within = vec![false; inners.len()];
    let fields: Vec<SortField> =
        ob.schema().fields().iter().map(|f| SortField::new(f.data_type().clone())).collect();
    if !RowConverter::supports_fields(&fields) {
        return Ok(within);
    }
    let arrow = |e: arrow::error::ArrowError| parquet::errors::ParquetError::ArrowError(e.to_string());
    let converter = RowConverter::new(fields).map_err(|e| parquet_err(outer)(arrow(e)))?;
    let hashers = [ahash::RandomState::new(), ahash::RandomState::new()];
    let key =
        |row: &[u8]| (u128::from(hashers[1].hash_one(row)) << 64) | u128::from(hashers[0].hash_one(row));
    // Each row: the first file holding it and how many more times
    // `outer` must hold it for that file; other files holding it too,
    // each with its own count, in `shared`.
    let mut want: std::collections::HashMap<u128, (usize, u64)> = std::collections::HashMap::new();
    let mut shared: std::collections::HashMap<u128, Vec<(usize, u64)>> = std::collections::HashMap::new();
    let outer_fields = file_schema(&ob).fields().clone();
    for (i, inner) in inners.iter().enumerate() {
        let keys = async {
            let bytes = lake.get(inner).await?;
            let ib = reading(inner, || ParquetRecordBatchReaderBuilder::try_new(bytes))?;
            if file_schema(&ib).fields() != &outer_fields {
                return Ok(None);
            }
            reading(inner, || {
                let mut keys = Vec::new();
                for batch in ib.build()? {
                    let rows = converter.convert_columns(batch.map_err(arrow)?.columns()).map_err(arrow)?;
                    keys.extend(rows.iter().map(|row| key(row.as_ref())));
                }
                Ok(Some(keys))
            })
        };
        let keys = match keys.await {
            Ok(Some(keys)) => keys,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(path = %inner, error = %e, "cannot compare a file's rows with a merged file's");
                continue;
            }
        };
        within[i] = true;
        for k in keys {
            let first = want.entry(k).or_insert((i, 0));
            if first.0 == i {
                first.1 += 1;
                continue;
            }
            let others = shared.entry(k).or_default();
            match others.iter_mut().find(|(f, _)| *f == i) {
                Some((_, n)) => *n += 1,
                None => others.push((i, 1)),
            }
        }
    }
    if !want.is_empty() {
        reading(outer, || {
            for batch in ob.build()? {
                let rows = converter.convert_columns(batch.map_err(arrow)?.columns()).map_err(arrow)?;
                for row in &rows {
                    let k = key(row.as_ref());
                    let Some(first) = want.get_mut(&k) else { continue };
                    first.1 = first.1.saturating_sub(1);
                    for (_, n) in shared.get_mut(&k).into_iter().flatten() {
                        *n = n.saturating_sub(1);
                    }
                }
            }
            Ok(())
        })?;
    }
    for &(file, missing) in want.values().chain(shared.values().flatten()) {
        if missing > 0 {
            within[file] = false;
        }
    }
    Ok(within)
}

/// `(first, last)` from a file name `<source>-<first>-<last>[-merged].parquet`.
pub(crate) fn name_range(name: &str, source: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(source)?.strip_prefix('-')?.strip_suffix(".parquet")?;
    let rest = rest.strip_suffix("-merged").unwrap_or(rest);
    let (first, last) = rest.split_once('-')?;
    // Exactly as the hub writes them (`from_str_radix` alone would also
    // take a sign): a file named otherwise is not this hub's.
    let hex16 = |s: &str| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex16(first) || !hex16(last) {
        return None;
    }
    Some((u64::from_str_radix(first, 16).ok()?, u64::from_str_radix(last, 16).ok()?))
}

/// What became of an open merge (see [`settle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Its file is in the lake and the files it replaces are deleted.
    Finished,
    /// Its file never landed (or the name holds another writer's file):
    /// the files it would replace stay, untouched.
    Dropped,
    /// Its file is in the lake, but deleting a replaced file failed.
    Open,
}

/// Settle a merge left open: by a crash (found by [`CommitLog::open`]), or
/// by a put or a delete that failed in an earlier pass. A merge whose
/// file is in the lake holding exactly the records it named is finished
/// (the files it replaces are deleted); one whose file is not there is
/// dropped, its inputs untouched; so is one whose name holds a file of
/// other records (another hub of the same WAL identity).
///
/// # Errors
/// [`Error::Store`] or [`Error::Parquet`] when the file cannot be checked.
pub(crate) async fn settle(lake: &Lake, m: &OpenMerge) -> Result<Settled> {
    if !lake.exists(&LakePath(m.path.clone())).await? {
        tracing::info!(path = %m.path, "dropping an unfinished merge; its files stay as they were");
        return Ok(Settled::Dropped);
    }
    let bytes = lake.get(&m.path).await?;
    let builder = reading(&m.path, || ParquetRecordBatchReaderBuilder::try_new(bytes))?;
    let mut held = records_of(&m.path, &builder)?;
    held.sort_unstable();
    if held != m.records {
        tracing::warn!(
            path = %m.path,
            "the lake holds another writer's file under a merge's name; the merge is dropped and its files stay"
        );
        return Ok(Settled::Dropped);
    }
    Ok(if delete_inputs(lake, m).await { Settled::Finished } else { Settled::Open })
}

/// Delete the files a merge replaced; whether all are gone.
async fn delete_inputs(lake: &Lake, m: &OpenMerge) -> bool {
    let mut all = true;
    for input in &m.inputs {
        if let Err(e) = lake.delete(input).await {
            tracing::warn!(path = %input, merged_into = %m.path, error = %e, "cannot delete a merged file yet; retried later");
            all = false;
        }
    }
    all
}

impl Compactor {
    /// A compactor of `lake`, logging to `log` (the lake writer's, see
    /// [`crate::LakeWriter::commit_log`]).
    #[must_use]
    pub fn new(
        lake: Lake,
        log: Arc<Mutex<CommitLog>>,
        clock: Arc<dyn Clock>,
        config: CompactConfig,
        stats: Arc<CompactStats>,
    ) -> Self {
        Self {
            lake,
            log,
            clock,
            config,
            stats,
            scanned: AtomicBool::new(false),
            waiting: Mutex::new(BTreeSet::new()),
            damaged: Mutex::new(BTreeSet::new()),
            plan_only: false,
            memory: None,
        }
    }

    /// Charge merges to `memory` (the lake writer's budget): a merge's
    /// inputs add up to at most about a quarter of the budget (merged
    /// files are smaller than the target size when that is less), and a merge
    /// starts only once its memory (its output, reserved at once, and
    /// twice its largest input) fits under the budget's high mark, so the
    /// writer and compaction together stay within the budget.
    #[must_use]
    pub fn with_memory(mut self, memory: Arc<Memory>) -> Self {
        self.memory = Some(memory);
        self
    }

    /// The most input bytes one merge takes: the target, or less when
    /// the memory budget has no room for that. Inputs of `c` bytes charge
    /// at most `3.125 c` and [`OUTPUT_SLACK`] ([`merge_charge`], the
    /// largest input as big as all of them), so a merge of this size fits
    /// under the high mark of a budget the writer leaves idle.
    fn merge_bytes(&self) -> u64 {
        let cap = self.memory.as_ref().map_or(u64::MAX, |m| {
            let room = u64::try_from(m.high_mark()).unwrap_or(u64::MAX).saturating_sub(OUTPUT_SLACK);
            room / 25 * 8
        });
        self.config.target_bytes.min(cap)
    }

    /// Wait until `charge` bytes fit under the memory budget's high mark
    /// and take them (released when the returned charge drops); `None`
    /// when they did not fit within [`CompactConfig::memory_wait`] or
    /// `stop` was set.
    async fn admit(&self, charge: usize, stop: &AtomicBool) -> Option<Charged> {
        let Some(memory) = &self.memory else { return Some(Charged(None)) };
        let started = std::time::Instant::now();
        loop {
            if memory.used().saturating_add(charge) <= memory.high_mark() {
                memory.add(charge);
                return Some(Charged(Some((memory.clone(), charge))));
            }
            if stop.load(Ordering::Relaxed) || started.elapsed() >= self.config.memory_wait {
                return None;
            }
            tokio::time::sleep(MEMORY_POLL).await;
        }
    }

    /// A compactor whose passes write and delete nothing: each merge a
    /// pass would make is counted in its report as if made (`bytes_out`
    /// stays 0), and merges cut short earlier are counted as `unsettled`.
    /// Give it a log opened with [`CommitLog::open_read_only`]. It may run
    /// beside the hub that owns the lake: a partition whose files vanish
    /// while it reads them (merged meanwhile) is counted as `changed` and
    /// left out.
    #[must_use]
    pub fn plan_only(mut self) -> Self {
        self.plan_only = true;
        self
    }

    /// One pass: finish open merges, then merge the small files of every
    /// closed partition that may have some (all of them on the first pass,
    /// then those that received files since). Stops between merges once
    /// `stop` is set. A failed merge is counted and logged, and the pass
    /// goes on.
    ///
    /// # Errors
    /// [`Error::Store`] when the lake cannot be listed.
    pub async fn run_once(&self, stop: &AtomicBool) -> Result<CompactReport> {
        self.run_once_with(stop, &mut |_, _, _| {}).await
    }

    /// [`Compactor::run_once`], calling `progress(done, total, report)`
    /// after each partition looked at (`total`: the partitions this pass
    /// may look at).
    ///
    /// # Errors
    /// As [`Compactor::run_once`].
    pub async fn run_once_with(
        &self,
        stop: &AtomicBool,
        progress: &mut (dyn FnMut(usize, usize, &CompactReport) + Send),
    ) -> Result<CompactReport> {
        let mut report = CompactReport::default();
        if !self.plan_only {
            report.abandoned_uploads = sweep_abandoned_uploads(&self.lake).await;
        }
        let mut open = self.log.lock().expect("commit log lock").open_merges();
        let mut unsettled = BTreeSet::new();
        if self.plan_only {
            // A plan settles nothing; those partitions are left out of it.
            report.unsettled = open.len();
            unsettled.extend(open.drain(..).map(|m| m.partition));
        }
        for m in open {
            // Never delete a merge's inputs before checking its file: its
            // put may have failed.
            match settle(&self.lake, &m).await {
                Ok(Settled::Finished) => self.log.lock().expect("commit log lock").merged(&m.path)?,
                Ok(Settled::Dropped) => {
                    self.log.lock().expect("commit log lock").abandon(&LakePath(m.path.clone()))?;
                }
                Ok(Settled::Open) => {
                    report.failures += 1;
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    self.leave_unsettled(m.partition, &mut unsettled);
                }
                Err(e) => {
                    report.failures += 1;
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %m.path, error = %e, "cannot settle an open merge yet; retried on the next pass");
                    self.leave_unsettled(m.partition, &mut unsettled);
                }
            }
        }
        let mut candidates = BTreeSet::new();
        if !self.scanned.load(Ordering::Relaxed) {
            // Streamed: a large lake's listing is not held whole. A
            // failure leaves the partitions waiting as they were.
            let mut listing = self.lake.store().list(None);
            while let Some(meta) = listing.next().await {
                let meta =
                    meta.map_err(|e| Error::Store { path: "the lake root".to_owned(), source: Box::new(e) })?;
                if let Some((dir, _)) = meta.location.as_ref().rsplit_once('/') {
                    candidates.insert(dir.to_owned());
                }
            }
            self.scanned.store(true, Ordering::Relaxed);
        }
        candidates.append(&mut self.waiting.lock().expect("lock"));
        candidates.extend(self.log.lock().expect("commit log lock").take_touched());
        let now = self.clock.now_micros();
        let after = i64::try_from(self.config.after.as_micros()).unwrap_or(i64::MAX);
        let total = candidates.len();
        for (done, dir) in candidates.into_iter().enumerate() {
            progress(done, total, &report);
            let Some(end) = dir_hour_end(&dir) else { continue };
            if end.saturating_add(after) > now {
                self.waiting.lock().expect("lock").insert(dir);
                continue;
            }
            if stop.load(Ordering::Relaxed) {
                // Looked at again on the next pass.
                self.waiting.lock().expect("lock").insert(dir);
                continue;
            }
            if unsettled.contains(&dir) {
                if !self.plan_only {
                    // Merged once its open merge is settled.
                    self.waiting.lock().expect("lock").insert(dir);
                }
                continue;
            }
            if report.deferred > 0 {
                // No room in the memory budget for a merge: the rest of
                // the pass would wait for it too. The next pass retries.
                self.waiting.lock().expect("lock").insert(dir);
                continue;
            }
            report.partitions += 1;
            match self.partition(&dir, stop, &mut report).await {
                // Stopped half way through it, perhaps.
                Ok(()) if stop.load(Ordering::Relaxed) => {
                    self.waiting.lock().expect("lock").insert(dir);
                }
                Ok(()) => {}
                Err(e) => {
                    report.failures += 1;
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(partition = %dir, error = %e, "cannot compact a partition; retried on the next pass");
                    self.waiting.lock().expect("lock").insert(dir);
                }
            }
        }
        progress(total, total, &report);
        Ok(report)
    }

    /// Leave partition `dir` out of this pass: a merge of it is still
    /// open (its put or its inputs' deletion failed), so its inputs and
    /// its merged file may both be there, and merging either again would
    /// put their rows in two files for good. The next pass settles the
    /// merge first, then merges the partition.
    fn leave_unsettled(&self, dir: String, unsettled: &mut BTreeSet<String>) {
        self.waiting.lock().expect("lock").insert(dir.clone());
        unsettled.insert(dir);
    }

    /// Leave file `path`, which cannot be read, out of merges from now on
    /// (reported the first time).
    fn set_aside(&self, dir: &str, path: &str, e: &Error, report: &mut CompactReport) {
        if self.damaged.lock().expect("lock").insert(path.to_owned()) {
            report.unreadable += 1;
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                partition = %dir,
                file = %path,
                error = %e,
                "cannot read a file of the lake; it is left as it is, and not merged"
            );
        }
    }

    /// Merge the small files of one partition.
    async fn partition(&self, dir: &str, stop: &AtomicBool, report: &mut CompactReport) -> Result<()> {
        let half = self.config.target_bytes / 2;
        let merge_bytes = self.merge_bytes();
        let mut small: Vec<Small> = Vec::new();
        // The WAL ranges of this hub's files that are not merged now (puts
        // in flight or about to be, in the lake or not yet, and big files):
        // a bin does not span one.
        // Its merged file would cover the other's range, so the
        // partition's files, in the order of their records, would no
        // longer hold its rows in WAL order (and once a put in flight is
        // merged with it, neither would the merged file).
        let listed = self.lake.list(Some(dir)).await?;
        // Pending after the listing: a put that lands meanwhile is one.
        let pending = self.log.lock().expect("commit log lock").pending_in(dir);
        let mut barriers: Vec<(u64, u64)> = pending
            .iter()
            .filter_map(|p| {
                name_range(p.rsplit_once('/').map_or(p.as_str(), |(_, n)| n), &self.config.source)
            })
            .collect();
        for meta in listed {
            let path = meta.location.to_string();
            let Some((parent, name)) = path.rsplit_once('/') else { continue };
            let Some((first, last)) = name_range(name, &self.config.source) else { continue };
            if parent != dir || pending.contains(&path) {
                continue;
            }
            if meta.size >= half || self.damaged.lock().expect("lock").contains(&path) {
                barriers.push((first, last));
                continue;
            }
            small.push(Small { path, size: meta.size, first, last });
        }
        small.sort_by_key(|s| (s.first, s.last));
        barriers.sort_unstable();
        let mut barriers = barriers.into_iter().peekable();
        // Consecutive files, in WAL order, up to the target size.
        let mut bins: Vec<Vec<Small>> = Vec::new();
        let mut bytes = 0;
        for s in small {
            let mut spans_a_barrier = false;
            while barriers.next_if(|&b| b < (s.first, s.last)).is_some() {
                spans_a_barrier = true;
            }
            match bins.last_mut() {
                Some(bin) if !spans_a_barrier && bytes + s.size <= merge_bytes => {
                    bytes += s.size;
                    bin.push(s);
                }
                _ => {
                    bytes = s.size;
                    bins.push(vec![s]);
                }
            }
        }
        for bin in &mut bins {
            // The oldest files of a bin (a merged file, then older late
            // merges) are left out while the rest is small beside them.
            let mut rest: u64 = bin.iter().map(|s| s.size).sum();
            let mut left_out = 0;
            while bin.len() - left_out > 1 {
                rest -= bin[left_out].size;
                if bin[left_out].size <= REWRITE_RATIO * rest {
                    break;
                }
                left_out += 1;
            }
            bin.drain(..left_out);
        }
        for bin in bins.into_iter().filter(|b| b.len() > 1) {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let mut runs: Vec<Vec<Input>> = Vec::new();
            for s in bin {
                let read = match footer(&self.lake, &s.path, s.size).await {
                    Ok(b) => records_of(&s.path, &b).map(|r| (b, r)),
                    // Beside a running hub, which merges and deletes
                    // files as it goes.
                    Err(Error::Store { source, .. })
                        if self.plan_only && matches!(*source, object_store::Error::NotFound { .. }) =>
                    {
                        report.changed += 1;
                        return Ok(());
                    }
                    Err(e) => Err(e),
                };
                let (builder, records) = match read {
                    Ok(r) => r,
                    Err(e @ Error::Parquet { .. }) => {
                        self.set_aside(dir, &s.path, &e, report);
                        // The files on either side are merged apart.
                        runs.push(Vec::new());
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let rows = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
                let input = Input {
                    path: s.path,
                    size: s.size,
                    first: s.first,
                    last: s.last,
                    schema: file_schema(&builder),
                    records,
                    rows,
                };
                // Files written under different schema versions of the
                // table are merged separately.
                match runs.last_mut() {
                    Some(run) if run.first().is_some_and(|i| i.schema == input.schema) => run.push(input),
                    _ => runs.push(vec![input]),
                }
            }
            for run in runs.into_iter().filter(|r| r.len() > 1) {
                if self.plan_only {
                    report.merges += 1;
                    report.inputs += run.len();
                    report.rows += run.iter().map(|i| i.rows).sum::<u64>();
                    report.bytes_in += run.iter().map(|i| i.size).sum::<u64>();
                    continue;
                }
                let Some(_charged) = self.admit(merge_charge(&run), stop).await else {
                    if !stop.load(Ordering::Relaxed) {
                        report.deferred += 1;
                        self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            partition = %dir,
                            "no room in the memory budget for a merge; left to a later pass"
                        );
                    }
                    self.waiting.lock().expect("lock").insert(dir.to_owned());
                    return Ok(());
                };
                let inputs: Vec<String> = run.iter().map(|i| i.path.clone()).collect();
                match self.merge(dir, run, report).await {
                    Ok(()) => {}
                    // An input's pages cannot be read: the next pass
                    // merges the others around it.
                    Err(ref e @ Error::Parquet { ref path, .. }) if inputs.contains(path) => {
                        self.set_aside(dir, path, e, report);
                        self.waiting.lock().expect("lock").insert(dir.to_owned());
                    }
                    Err(e) => {
                        report.failures += 1;
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(partition = %dir, error = %e, "cannot merge small files; retried on a later pass");
                        self.waiting.lock().expect("lock").insert(dir.to_owned());
                    }
                }
            }
        }
        Ok(())
    }

    /// Encode the rows of `run`, in order, as one file, and check it holds
    /// exactly their rows. The inputs are read one at a time, each encoded
    /// before the next is fetched: a merge holds its output and one input,
    /// not every input at once. All of it runs on one blocking thread (the
    /// reads through the runtime's handle), so the output grows in one
    /// thread's allocator pages.
    async fn encode_run(
        &self,
        path: &str,
        run: &[Input],
        meta: Vec<(String, String)>,
        rows: u64,
    ) -> Result<Bytes> {
        let rows_hint = usize::try_from(rows).unwrap_or(usize::MAX);
        let mut file = FileEncoder::for_rows(path, &run[0].schema, self.config.encode, rows_hint)?;
        // The merged file is about the size of its inputs: smaller as a
        // rule (longer column chunks compress better), a little larger
        // with smaller row groups than its inputs had. An eighth more is
        // room for that; pages reserved and never written are never
        // touched.
        let inputs_bytes = usize::try_from(run.iter().map(|i| i.size).sum::<u64>()).unwrap_or(0);
        let slack = usize::try_from(OUTPUT_SLACK).unwrap_or(0);
        file.reserve_output(inputs_bytes.saturating_add(inputs_bytes / 8).saturating_add(slack));
        let (lake, runtime) = (self.lake.clone(), tokio::runtime::Handle::current());
        let inputs: Vec<String> = run.iter().map(|i| i.path.clone()).collect();
        let out = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let mut file = file;
            for name in &inputs {
                let bytes = runtime.block_on(lake.get(name))?;
                let mut reader = reading(name, || {
                    ParquetRecordBatchReaderBuilder::try_new(bytes)
                        .and_then(|b| b.with_batch_size(READ_ROWS).build())
                })?;
                while let Some(batch) = reading(name, || {
                    reader
                        .next()
                        .transpose()
                        .map_err(|e| parquet::errors::ParquetError::ArrowError(e.to_string()))
                })? {
                    file.write_joined(&[batch])?;
                }
            }
            file.finish(meta)
        })
        .await
        // A panic encoding (a bug) fails this merge, not compaction.
        .unwrap_or_else(|e| {
            Err(parquet_err(path)(parquet::errors::ParquetError::General(format!(
                "merging did not finish: {e}"
            ))))
        })
        .map(Bytes::from)?;
        let written = ParquetRecordBatchReaderBuilder::try_new(out.clone())
            .map_err(parquet_err(path))?
            .metadata()
            .file_metadata()
            .num_rows();
        if u64::try_from(written).ok() != Some(rows) {
            return Err(parquet_err(path)(parquet::errors::ParquetError::General(format!(
                "the merged file holds {written} rows, its inputs {rows}"
            ))));
        }
        Ok(out)
    }

    /// Merge `run` (files of one schema, in WAL order) into one file:
    /// encode, log the merge, put, delete the inputs, log it finished.
    async fn merge(&self, dir: &str, run: Vec<Input>, report: &mut CompactReport) -> Result<()> {
        let first = run.iter().map(|i| i.first).min().unwrap_or(0);
        let last = run.iter().map(|i| i.last).max().unwrap_or(0);
        let path = format!("{dir}/{}-{first:016x}-{last:016x}-merged.parquet", self.config.source);
        if run.iter().any(|i| i.path == path) {
            return Ok(());
        }
        let mut records: Vec<u64> = run.iter().flat_map(|i| i.records.iter().copied()).collect();
        records.sort_unstable();
        records.dedup();
        let rows: u64 = run.iter().map(|i| i.rows).sum();
        let bytes_in: u64 = run.iter().map(|i| i.size).sum();
        let m = OpenMerge {
            path: path.clone(),
            partition: dir.to_owned(),
            inputs: run.iter().map(|i| i.path.clone()).collect(),
            records,
        };
        let meta = vec![
            ("watershed.source".to_owned(), self.config.source.clone()),
            (
                "watershed.records".to_owned(),
                m.records.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            ),
        ];
        let bytes = self.encode_run(&path, &run, meta, rows).await?;
        self.log.lock().expect("commit log lock").merge(&m)?;
        if self.lake.put_create(&LakePath(path.clone()), bytes.clone()).await? == Put::AlreadyExists
            && self.lake.get(&path).await? != bytes
        {
            self.log.lock().expect("commit log lock").abandon(&LakePath(path.clone()))?;
            return Err(Error::NameTaken { path });
        }
        if delete_inputs(&self.lake, &m).await {
            self.log.lock().expect("commit log lock").merged(&path)?;
        } else {
            // Readers see these rows twice until a later pass (or the
            // next start) deletes the rest.
            report.failures += 1;
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        let n = m.inputs.len();
        tracing::info!(
            path = %path,
            files = n,
            rows,
            bytes_in,
            bytes_out = bytes.len(),
            "merged small files"
        );
        report.merges += 1;
        report.inputs += n;
        report.rows += rows;
        report.bytes_in += bytes_in;
        report.bytes_out += bytes.len() as u64;
        self.stats.merges.fetch_add(1, Ordering::Relaxed);
        self.stats.inputs.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The memory a merge of `run` holds at most, as charged to the budget:
/// its output (reserved at once: the inputs' bytes and an eighth, see
/// `encode_run`) and twice its largest input (the input's bytes, and its
/// decoded rows and the open row group on their way to the output).
fn merge_charge(run: &[Input]) -> usize {
    let inputs: u64 = run.iter().map(|i| i.size).sum();
    let largest = run.iter().map(|i| i.size).max().unwrap_or(0);
    usize::try_from(inputs + inputs / 8 + OUTPUT_SLACK + 2 * largest).unwrap_or(usize::MAX)
}

/// Bytes of a merge charged to the memory budget, released on drop.
struct Charged(Option<(Arc<Memory>, usize)>);

impl Drop for Charged {
    fn drop(&mut self) {
        if let Some((memory, n)) = self.0.take() {
            memory.release(n);
        }
    }
}

/// Remove what crashed puts left in `lake` (see
/// [`Lake::sweep_abandoned_uploads`]), logging it; how many files.
pub async fn sweep_abandoned_uploads(lake: &Lake) -> usize {
    let lake = lake.clone();
    let swept =
        tokio::task::spawn_blocking(move || lake.sweep_abandoned_uploads(crate::ABANDONED_UPLOAD_AGE)).await;
    match swept {
        Ok(Ok(swept)) => {
            if !swept.files.is_empty() {
                tracing::warn!(
                    files = swept.files.len(),
                    bytes = swept.bytes,
                    first = %swept.files[0].display(),
                    "removed the files of uploads a crash left unfinished"
                );
            }
            swept.files.len()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot look for unfinished uploads in the lake");
            0
        }
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    /// Only a name as the hub writes it is one of its files: a sign, a
    /// short or long number, another source, another suffix are not.
    #[test]
    fn a_files_range_is_read_only_from_a_name_the_hub_writes() {
        let (one, two) = ("0000000000000001", "00000000000000ff");
        assert_eq!(name_range(&format!("wal-aa-{one}-{two}.parquet"), "wal-aa"), Some((1, 255)));
        assert_eq!(name_range(&format!("wal-aa-{one}-{two}-merged.parquet"), "wal-aa"), Some((1, 255)));
        for name in [
            format!("wal-aa-+000000000000001-{two}.parquet"),
            format!("wal-aa-{one}-+00000000000000f.parquet"),
            format!("wal-aa-000000000000001-{two}.parquet"),
            format!("wal-aa-{one}-{two}0.parquet"),
            format!("wal-bb-{one}-{two}.parquet"),
            format!("wal-aa-{one}-{two}.parquet.tmp"),
            format!("wal-aa-{one}-{two}-copy.parquet"),
        ] {
            assert_eq!(name_range(&name, "wal-aa"), None, "{name}");
        }
    }

    /// A file's footer read from its last bytes tells what reading the
    /// whole file does (schema, records, rows), for a file larger than
    /// the read and for one smaller.
    #[tokio::test]
    async fn the_footer_alone_tells_schema_records_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(dir.path(), 2).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        for (name, rows) in [("big.parquet", 60_000usize), ("small.parquet", 10)] {
            let ids: Vec<String> = (0..rows).map(|i| format!("id-{i}-{}", i * 7919)).collect();
            let vals: Vec<i64> = (0..rows).map(|i| i64::try_from(i * 31).unwrap()).collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(StringArray::from(ids)), Arc::new(Int64Array::from(vals))],
            )
            .unwrap();
            let meta = vec![("watershed.records".to_owned(), "3,5,8".to_owned())];
            let bytes = crate::encode(name, &schema, &[batch], meta, EncodeOptions::default()).unwrap();
            let size = bytes.len() as u64;
            assert_eq!(size > FOOTER_READ, rows > 10, "{name}: {size} bytes");
            lake.put_create(&LakePath(name.to_owned()), Bytes::from(bytes.clone())).await.unwrap();
            let whole = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).unwrap();
            let tail = footer(&lake, name, size).await.unwrap();
            assert_eq!(file_schema(&tail), file_schema(&whole), "{name}");
            assert_eq!(records_of(name, &tail).unwrap(), vec![3, 5, 8], "{name}");
            assert_eq!(tail.metadata().file_metadata().num_rows(), i64::try_from(rows).unwrap(), "{name}");
        }
    }

    /// Each file's rows are checked against the merged file as a
    /// multiset of their own, in one reading of the merged file: files
    /// that hold the same rows are each within; a row the merged file
    /// lacks or holds too few times, another schema, or bytes that are
    /// not Parquet put a file out.
    #[tokio::test]
    async fn which_files_hold_only_rows_of_a_merged_file() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(dir.path(), 2).unwrap();
        let put = |name: &str, rows: &[(&str, i64)], extra: bool| {
            let mut fields =
                vec![Field::new("event_id", DataType::Utf8, false), Field::new("v", DataType::Int64, false)];
            if extra {
                fields.push(Field::new("w", DataType::Int64, true));
            }
            let schema = Arc::new(Schema::new(fields));
            let mut columns: Vec<arrow::array::ArrayRef> = vec![
                Arc::new(StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            ];
            if extra {
                columns.push(Arc::new(Int64Array::from(vec![None; rows.len()])));
            }
            let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
            let bytes = crate::encode(name, &schema, &[batch], vec![], EncodeOptions::default()).unwrap();
            let (lake, name) = (&lake, name.to_owned());
            async move { lake.put_create(&LakePath(name), Bytes::from(bytes)).await.unwrap() }
        };
        put("merged.parquet", &[("a", 1), ("b", 2), ("b", 2), ("c", 3)], false).await;
        put("a.parquet", &[("a", 1)], false).await;
        put("bc.parquet", &[("b", 2), ("c", 3)], false).await;
        put("bc-again.parquet", &[("c", 3), ("b", 2)], false).await;
        put("bb.parquet", &[("b", 2), ("b", 2)], false).await;
        put("ccc.parquet", &[("c", 3), ("c", 3)], false).await;
        put("other-v.parquet", &[("a", 1), ("c", 4)], false).await;
        put("empty.parquet", &[], false).await;
        put("wider.parquet", &[("a", 1)], true).await;
        lake.put_create(&LakePath("garbage.parquet".into()), Bytes::from_static(b"not parquet"))
            .await
            .unwrap();
        let cases = [
            ("a.parquet", true),
            ("bc.parquet", true),
            ("bc-again.parquet", true),
            ("bb.parquet", true),
            ("ccc.parquet", false),
            ("other-v.parquet", false),
            ("empty.parquet", true),
            ("wider.parquet", false),
            ("garbage.parquet", false),
            ("missing.parquet", false),
        ];
        let names: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
        let within = rows_within(&lake, &names, "merged.parquet").await.unwrap();
        for ((name, want), got) in cases.iter().zip(within) {
            assert_eq!(got, *want, "{name}");
        }
        assert!(rows_within(&lake, &names, "missing.parquet").await.is_err(), "the merged file must be read");
    }
}
