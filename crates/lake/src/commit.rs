//! The commit log: the explicit commit point of every lake file.
//!
//! Before a file is put, an `intent` line names its path, partition and the
//! WAL records it covers, and is fsynced; after the create-only put, a
//! `commit` line follows. On recovery an intent without a commit is
//! committed if its file exists (the put is atomic) and dropped otherwise.
//! An `abandon` line withdraws an intent whose put found another writer's
//! file under its name.
//!
//! Compaction ([`crate::Compactor`]) logs a `merge` line (the merged file,
//! the files it replaces and the WAL records it holds) before its put, and
//! a `merged` line once the replaced files are deleted. On recovery a
//! merge without `merged` is finished (the replaced files deleted) if its
//! file exists and holds those records, and dropped otherwise (its inputs
//! were never touched).
//! Recovery then skips, per partition, exactly the WAL records that a
//! committed file already holds, so a crash never duplicates or loses rows.
//!
//! Only the lines recovery could not do without are fsynced: `intent`,
//! `merge` and `abandon`. A `commit` or `merged` line that a power loss
//! takes changes nothing, since recovery checks the store for it as above,
//! so they are written without one. Intents are group-committed:
//! [`CommitLog::intent`] writes the line and returns an [`Unsynced`], whose
//! [`Unsynced::wait`] blocks until an `fdatasync` started after the write
//! returns, one for every writer waiting then. Flushing thousands of small
//! partitions at once (a backfill, a shutdown) thus costs one log fsync
//! per group of concurrent puts instead of two per file.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::partition::LakePath;
use crate::store::Lake;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Intent { path: String, partition: String, records: Vec<u64> },
    Commit { path: String },
    Abandon { path: String },
    Merge { path: String, partition: String, inputs: Vec<String>, records: Vec<u64> },
    Merged { path: String },
}

impl From<&OpenMerge> for Line {
    fn from(m: &OpenMerge) -> Self {
        Line::Merge {
            path: m.path.clone(),
            partition: m.partition.clone(),
            inputs: m.inputs.clone(),
            records: m.records.clone(),
        }
    }
}

/// A merge logged and not yet finished: its file may be in the lake, and
/// the files it replaces may not all be deleted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenMerge {
    /// The merged file.
    pub path: String,
    /// Its partition directory.
    pub partition: String,
    /// The files it replaces.
    pub inputs: Vec<String>,
    /// The WAL records it holds.
    pub records: Vec<u64>,
}

/// The append-only commit log (one per hub data directory).
#[derive(Debug)]
pub struct CommitLog {
    path: PathBuf,
    /// Shared with the syncer, which fsyncs it without the log's lock.
    file: Arc<File>,
    syncer: Arc<Syncer>,
    /// Its size now, and after the last compaction.
    bytes: u64,
    compacted: u64,
    /// Intents of this run not yet committed or abandoned: puts in flight.
    pending: HashSet<String>,
    /// Merges logged and not yet finished.
    merges: HashMap<String, OpenMerge>,
    /// Partition directories that received a committed file since
    /// [`CommitLog::take_touched`] was last called.
    touched: HashSet<String>,
    /// A line found damaged while running: the log is not compacted
    /// again (the next start rebuilds it from the lake).
    damaged: bool,
    /// A failed write could not be cut back off the log: no line is
    /// appended after its remains.
    broken: bool,
}

/// Makes the log's lines durable: one `fdatasync` covers every line
/// written before it started (group commit).
#[derive(Debug)]
struct Syncer {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug)]
struct SyncState {
    /// The log's file (syncing needs no lock on the log, so writers append
    /// while a sync runs).
    file: Arc<File>,
    path: PathBuf,
    /// Lines written, and lines known durable.
    written: u64,
    durable: u64,
    /// Whether a waiter is running an `fdatasync` now.
    syncing: bool,
    /// `fdatasync`s run.
    syncs: u64,
}

impl Syncer {
    fn new(file: Arc<File>, path: &Path) -> Self {
        Self {
            state: Mutex::new(SyncState {
                file,
                path: path.to_owned(),
                written: 0,
                durable: 0,
                syncing: false,
                syncs: 0,
            }),
            done: Condvar::new(),
        }
    }

    /// Count a line written; returns its number.
    fn wrote(&self) -> u64 {
        let mut st = self.state.lock().expect("sync lock");
        st.written += 1;
        st.written
    }

    /// The log was rewritten (and fsynced) into `file`, holding every line
    /// written so far.
    fn replaced(&self, file: Arc<File>) {
        let mut st = self.state.lock().expect("sync lock");
        st.file = file;
        st.durable = st.written;
        drop(st);
        self.done.notify_all();
    }

    /// Block until line `seq` is durable: wait for the sync under way, or
    /// run one for every line written so far.
    fn sync_through(&self, seq: u64) -> Result<()> {
        let mut st = self.state.lock().expect("sync lock");
        loop {
            if st.durable >= seq {
                return Ok(());
            }
            if st.syncing {
                st = self.done.wait(st).expect("sync lock");
                continue;
            }
            st.syncing = true;
            let (file, target, path) = (st.file.clone(), st.written, st.path.clone());
            drop(st);
            let synced = file.sync_data();
            st = self.state.lock().expect("sync lock");
            st.syncing = false;
            st.syncs += 1;
            if synced.is_ok() {
                st.durable = st.durable.max(target);
            }
            self.done.notify_all();
            // A failed sync is this waiter's error; the others wake and
            // try again themselves.
            synced.map_err(io(&path))?;
        }
    }
}

/// A line written to the commit log and not yet known to be durable.
#[derive(Debug)]
#[must_use = "the line is durable only once `wait` returns"]
pub struct Unsynced {
    syncer: Arc<Syncer>,
    seq: u64,
}

impl Unsynced {
    /// Block until the line is on disk (an `fdatasync` shared with every
    /// line written before it started). Blocking: async callers run it
    /// with `spawn_blocking`.
    ///
    /// # Errors
    /// [`Error::Io`] when the sync fails; the line must then be taken as
    /// not written.
    pub fn wait(self) -> Result<()> {
        self.syncer.sync_through(self.seq)
    }
}

/// A running log is compacted once it is this large and twice its size
/// after the last compaction.
const COMPACT_AT: u64 = 16 << 20;

/// What recovery learned: which (partition, WAL record) pairs are in the
/// lake already.
#[derive(Debug, Default)]
pub struct Committed {
    set: HashSet<(String, u64)>,
    /// Files committed, for reporting.
    pub files: usize,
    /// Lines of the log found damaged (a torn last line is not counted).
    pub damaged_lines: usize,
    /// Files whose intents the damage took, found again in the lake.
    pub recovered: usize,
}

impl Committed {
    /// Whether the rows of WAL record `record` for `partition` are in the
    /// lake.
    #[must_use]
    pub fn contains(&self, partition: &str, record: u64) -> bool {
        self.set.contains(&(partition.to_owned(), record))
    }
}

/// Copy the damaged log at `path` aside, to the first free name of
/// `commits.log.damaged`, `commits.log.damaged.1`, ...; returns it.
fn keep_aside(path: &Path) -> Result<PathBuf> {
    let mut n = 0;
    loop {
        let mut name = path.as_os_str().to_owned();
        name.push(if n == 0 { ".damaged".to_owned() } else { format!(".damaged.{n}") });
        let copy = PathBuf::from(name);
        if !copy.exists() {
            std::fs::copy(path, &copy).map_err(io(&copy))?;
            return Ok(copy);
        }
        n += 1;
    }
}

/// Rebuild from the lake what damaged log lines held (see
/// [`CommitLog::open`]): adds an intent and a commit for every file of
/// `source` in the lake that may hold a record at or after
/// `oldest_record` and that `intents` does not name. Returns the files
/// added.
async fn recover(
    lake: &Lake,
    source: &str,
    oldest_record: u64,
    intents: &mut HashMap<String, (String, Vec<u64>)>,
    committed: &mut HashSet<String>,
    merges: &mut HashMap<String, OpenMerge>,
) -> Result<usize> {
    let mut added = 0;
    let mut merged_files = Vec::new();
    for meta in lake.list(None).await? {
        let file = meta.location.to_string();
        let Some((partition, name)) = file.rsplit_once('/') else { continue };
        let Some((_, last)) = crate::compact::name_range(name, source) else { continue };
        if last < oldest_record {
            continue;
        }
        if intents.contains_key(&file) {
            continue;
        }
        let records = match crate::compact::footer(lake, &file, meta.size)
            .await
            .and_then(|footer| crate::compact::records_of(&file, &footer))
        {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(
                    path = %file,
                    error = %e,
                    "cannot read which records a lake file holds; a restart may write its rows again"
                );
                continue;
            }
        };
        tracing::warn!(path = %file, records = records.len(), "found a committed file the damaged commit log had lost");
        if name.ends_with("-merged.parquet") && !merges.contains_key(&file) {
            merged_files.push(file.clone());
        }
        intents.insert(file.clone(), (partition.to_owned(), records));
        committed.insert(file);
        added += 1;
    }
    for m in merged_files {
        if let Some(merge) = lost_merge(lake, source, &m, intents).await? {
            tracing::warn!(
                path = %m,
                inputs = merge.inputs.len(),
                "a merge the damaged commit log had lost left files whose every row the merged file holds; \
                 finishing it"
            );
            merges.insert(m, merge);
        }
    }
    Ok(added)
}

/// The merge that made `merged` (a file the rebuild found), when a crash
/// cut it short after its put and the damage took its line: the files of
/// its partition and WAL identity whose records it holds and whose every
/// row it holds too. Only those rows decide: a file is named as an input
/// (and so deleted when the merge is settled) only if deleting it loses
/// nothing, whoever wrote it.
async fn lost_merge(
    lake: &Lake,
    source: &str,
    merged: &str,
    intents: &HashMap<String, (String, Vec<u64>)>,
) -> Result<Option<OpenMerge>> {
    let Some((partition, records)) = intents.get(merged) else { return Ok(None) };
    let held: HashSet<u64> = records.iter().copied().collect();
    let mut candidates = Vec::new();
    for (file, (p, recs)) in intents {
        let ours =
            file.rsplit_once('/').is_some_and(|(_, name)| crate::compact::name_range(name, source).is_some());
        if file == merged
            || p != partition
            || !ours
            || recs.is_empty()
            || !recs.iter().all(|r| held.contains(r))
        {
            continue;
        }
        if lake.exists(&LakePath(file.clone())).await? {
            candidates.push(file.clone());
        }
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    let within = match crate::compact::rows_within(lake, &candidates, merged).await {
        Ok(within) => within,
        Err(e) => {
            // Its inputs stay: rows possibly twice, none lost.
            tracing::warn!(path = %merged, error = %e, "cannot read a merged file to find its inputs' rows");
            return Ok(None);
        }
    };
    let mut inputs: Vec<String> =
        candidates.into_iter().zip(within).filter_map(|(file, within)| within.then_some(file)).collect();
    inputs.sort();
    let mut records = records.clone();
    records.sort_unstable();
    Ok((!inputs.is_empty()).then(|| OpenMerge {
        path: merged.to_owned(),
        partition: partition.clone(),
        inputs,
        records,
    }))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

/// `lines` as the log's text (see [`encode_line`]).
fn text_of(lines: &[Line]) -> Vec<u8> {
    let mut buf = Vec::new();
    for l in lines {
        encode_line(l, &mut buf);
    }
    buf
}

/// Append `line` to `buf` as the log holds it: its JSON, sealed with its
/// checksum ([`watershed_event::sealed`]).
fn encode_line(line: &Line, buf: &mut Vec<u8>) {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, line).expect("serialisable");
    watershed_event::sealed::seal(buf, start);
}

/// One line of the log, without its newline. A line with no tab was
/// written before lines carried a checksum, and is read as JSON alone.
fn decode_line(raw: &[u8]) -> std::result::Result<Line, String> {
    let json = watershed_event::sealed::unseal(raw).map_err(|e| e.to_string())?;
    let json = std::str::from_utf8(json).map_err(|_| "not UTF-8".to_owned())?;
    serde_json::from_str(json).map_err(|e| format!("not a log line: {e}"))
}

/// The log's lines as read back.
#[derive(Debug, Default)]
struct ReadBack {
    lines: Vec<Line>,
    /// Lines that are not whole (1-based number, what is wrong), other
    /// than a torn last line.
    damaged: Vec<(usize, String)>,
    /// Whether the last line was torn (a crash during its write).
    torn: bool,
}

impl ReadBack {
    /// The log at `path` (none yet reads as empty). Its text after the
    /// last newline, if any, is the last line's write cut short by a
    /// crash unless it is whole; any other line that is not whole is
    /// damage.
    fn from(path: &Path) -> Result<Self> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(path)(e)),
        };
        let mut read = Self::default();
        let mut pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        let tail = pieces.pop().unwrap_or_default();
        for (i, raw) in pieces.into_iter().enumerate() {
            match decode_line(raw) {
                Ok(line) => read.lines.push(line),
                Err(why) => read.damaged.push((i + 1, why)),
            }
        }
        if !tail.is_empty() {
            match decode_line(tail) {
                Ok(line) => read.lines.push(line),
                Err(_) => read.torn = true,
            }
        }
        Ok(read)
    }

    /// The damaged lines, for a message: their numbers and the first's
    /// fault.
    fn describe(&self) -> String {
        let numbers: Vec<String> = self.damaged.iter().take(10).map(|(n, _)| n.to_string()).collect();
        let more = if self.damaged.len() > 10 {
            format!(" and {} more", self.damaged.len() - 10)
        } else {
            String::new()
        };
        let first = self.damaged.first().map_or("", |(_, why)| why.as_str());
        format!("line {}{more} ({first})", numbers.join(", "))
    }
}

/// Replace the log at `path` with `lines` (a temporary file, fsynced, then
/// renamed over it, and the directory fsynced); returns the new log open
/// for appending, and its size.
fn rewrite(path: &Path, lines: &[Line]) -> Result<(File, u64)> {
    let tmp = path.with_extension("tmp");
    let buf = text_of(lines);
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&buf).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent().and_then(|d| File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    let file = OpenOptions::new().append(true).open(path).map_err(io(path))?;
    Ok((file, buf.len() as u64))
}

/// [`rewrite`]'s result without touching the log: `lines` in an unnamed
/// temporary file (a read-only log's writes go there), so a plan needs no
/// write access to the log's directory and leaves nothing behind.
fn scratch(lines: &[Line]) -> Result<(File, u64)> {
    let tmp = std::env::temp_dir();
    let buf = text_of(lines);
    let mut f = tempfile::tempfile().map_err(io(&tmp))?;
    f.write_all(&buf).map_err(io(&tmp))?;
    Ok((f, buf.len() as u64))
}

impl CommitLog {
    /// Open (creating) the log at `path`, resolve pending intents against
    /// `lake`, and compact it to the entries that still cover records at
    /// or after `oldest_record` (older WAL is gone).
    ///
    /// A log damaged on disk (a line other than a torn last one that is
    /// not whole) is copied aside (`commits.log.damaged`) and what its
    /// lines held is rebuilt from the lake: every file of `source` (the
    /// WAL identity that names the hub's files) that may hold a record at
    /// or after `oldest_record` and that no intent names is read (its
    /// footer lists its records) and counted committed, so a lost intent
    /// neither loses nor duplicates rows. A merge whose line was lost and
    /// that a crash cut short (its file put, its inputs not all deleted)
    /// is rebuilt from rows: the files of the merged file's partition
    /// whose records and every row it holds are its inputs, and the merge
    /// is settled (a file with a row it lacks is left: rows perhaps twice,
    /// never lost).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Store`].
    pub async fn open(
        path: &Path,
        lake: &Lake,
        source: &str,
        oldest_record: u64,
    ) -> Result<(Self, Committed)> {
        Self::open_as(path, lake, Some(source), oldest_record).await
    }

    /// The log at `path` as it stands, for a plan (`lake compact
    /// --dry-run`), which may run beside the hub appending to it: intents
    /// are resolved against `lake` by looking only (one whose file is not
    /// there yet stays pending: its put may be in flight), unfinished
    /// merges stay open (not settled), and neither the log nor the lake
    /// is written. Lines the returned log is given go to a scratch file,
    /// removed at once, never to `path`. Damaged lines are reported and
    /// passed over (recovering them is the hub's, at its start).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Store`].
    pub async fn open_read_only(path: &Path, lake: &Lake) -> Result<Self> {
        Ok(Self::open_as(path, lake, None, 0).await?.0)
    }

    /// `source` is `None` for a read-only log.
    async fn open_as(
        path: &Path,
        lake: &Lake,
        source: Option<&str>,
        oldest_record: u64,
    ) -> Result<(Self, Committed)> {
        let read_only = source.is_none();
        let mut intents: HashMap<String, (String, Vec<u64>)> = HashMap::new();
        let mut committed: HashSet<String> = HashSet::new();
        let mut merges: HashMap<String, OpenMerge> = HashMap::new();
        let mut read = ReadBack::from(path)?;
        let whole = read.damaged.is_empty() && !read.torn;
        if !read.damaged.is_empty() {
            let what = read.describe();
            if read_only {
                tracing::warn!(log = %path.display(), damaged = %what, "the commit log is damaged; the plan reads its other lines");
            } else {
                let kept = keep_aside(path)?;
                tracing::error!(
                    log = %path.display(),
                    damaged = %what,
                    copy = %kept.display(),
                    "the commit log is damaged; rebuilding what its damaged lines held from the lake's files"
                );
            }
        } else if read.torn && !read_only {
            // Most likely a crash during the last line's write (an intent
            // or merge whose put never started), but damage to the line's
            // end reads the same: the lake answers which. (Beside a
            // running hub, a plan's torn last line is an append under way.)
            tracing::warn!(log = %path.display(), "the commit log's last line is torn; checking the lake's files");
        }
        for line in std::mem::take(&mut read.lines) {
            match line {
                Line::Intent { path, partition, records } => {
                    intents.insert(path, (partition, records));
                }
                Line::Commit { path } => {
                    committed.insert(path);
                }
                Line::Abandon { path } => {
                    intents.remove(&path);
                    merges.remove(&path);
                }
                Line::Merge { path, partition, inputs, records } => {
                    merges.insert(path.clone(), OpenMerge { path, partition, inputs, records });
                }
                Line::Merged { path } => {
                    merges.remove(&path);
                }
            }
        }
        let recovered = match source {
            Some(source) if !whole => {
                recover(lake, source, oldest_record, &mut intents, &mut committed, &mut merges).await?
            }
            _ => 0,
        };
        let mut out = Committed { recovered, damaged_lines: read.damaged.len(), ..Committed::default() };
        let mut keep = Vec::new();
        let mut pending = HashSet::new();
        for (file, (partition, records)) in intents {
            let done = committed.contains(&file) || lake.exists(&LakePath(file.clone())).await?;
            if !done && read_only {
                // A hub running beside a plan may have this put in
                // flight: the file is not the plan's to merge.
                keep.push(Line::Intent { path: file.clone(), partition, records });
                pending.insert(file);
                continue;
            }
            if !done {
                tracing::info!(path = %file, "dropping an unfinished lake write; its records will be rewritten");
                continue;
            }
            if records.iter().any(|&r| r >= oldest_record) {
                for &r in &records {
                    out.set.insert((partition.clone(), r));
                }
                keep.push(Line::Intent { path: file.clone(), partition, records });
                keep.push(Line::Commit { path: file });
            }
            out.files += 1;
        }
        let mut open_merges = HashMap::new();
        for m in merges.into_values() {
            if read_only || crate::compact::settle(lake, &m).await? == crate::compact::Settled::Open {
                keep.push(Line::from(&m));
                open_merges.insert(m.path.clone(), m);
            }
        }
        let (file, bytes) = if read_only { scratch(&keep)? } else { rewrite(path, &keep)? };
        let file = Arc::new(file);
        let syncer = Arc::new(Syncer::new(file.clone(), path));
        let log = Self {
            path: path.to_owned(),
            file,
            syncer,
            bytes,
            compacted: bytes,
            pending,
            merges: open_merges,
            touched: HashSet::new(),
            damaged: false,
            broken: false,
        };
        Ok((log, out))
    }

    /// Whether `path` was logged as an intent and is not yet committed (or
    /// abandoned): its put may be in flight, and only the writer may touch
    /// it.
    #[must_use]
    pub fn is_pending(&self, path: &str) -> bool {
        self.pending.contains(path)
    }

    /// The log's file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Mark `path` pending before its intent is logged: the writer has
    /// taken its rows to encode them, and compaction must not merge the
    /// files around it meanwhile (see [`CommitLog::pending_in`]).
    /// [`CommitLog::intent`] follows, or [`CommitLog::release`].
    pub fn reserve(&mut self, path: &LakePath) {
        self.pending.insert(path.0.clone());
    }

    /// Withdraw a [`CommitLog::reserve`] whose file will not be put.
    pub fn release(&mut self, path: &LakePath) {
        self.pending.remove(&path.0);
    }

    /// The pending files of partition directory `dir` (puts in flight, or
    /// about to be), whether or not they are in the lake yet.
    #[must_use]
    pub fn pending_in(&self, dir: &str) -> Vec<String> {
        self.pending.iter().filter(|p| p.rsplit_once('/').is_some_and(|(d, _)| d == dir)).cloned().collect()
    }

    /// Partition directories that received a committed file since the
    /// last call.
    pub fn take_touched(&mut self) -> HashSet<String> {
        std::mem::take(&mut self.touched)
    }

    /// Merges logged and not finished (their inputs not all deleted yet).
    #[must_use]
    pub fn open_merges(&self) -> Vec<OpenMerge> {
        self.merges.values().cloned().collect()
    }

    /// The partition directories with a merge not yet finished (a
    /// retention pass leaves them to compaction).
    #[must_use]
    pub fn merging_partitions(&self) -> std::collections::BTreeSet<String> {
        self.merges.values().map(|m| m.partition.clone()).collect()
    }

    /// Log a merge before its file is put: `path` will hold the rows of
    /// `inputs` (of `partition`), WAL records `records`.
    ///
    /// # Errors
    /// [`Error::Io`]; the put must not happen then.
    pub fn merge(&mut self, m: &OpenMerge) -> Result<()> {
        self.append(&Line::from(m))?.wait()?;
        self.merges.insert(m.path.clone(), m.clone());
        Ok(())
    }

    /// Record that the merge into `path` is finished: its file is in the
    /// lake and the files it replaces are deleted. Not fsynced: recovery
    /// finishes a merge whose line is lost by checking the store.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn merged(&mut self, path: &str) -> Result<()> {
        let _unsynced = self.append(&Line::Merged { path: path.to_owned() })?;
        self.merges.remove(path);
        Ok(())
    }

    /// Whether the log has grown enough since its last compaction for
    /// [`CommitLog::compact`] to be worth its cost.
    #[must_use]
    pub fn wants_compaction(&self) -> bool {
        !self.damaged && self.bytes >= COMPACT_AT.max(2 * self.compacted)
    }

    /// Rewrite the log while running, keeping every intent not yet
    /// committed (a put in flight) and the committed files that hold a
    /// record at or after `oldest_record`, the oldest WAL record a restart
    /// could replay. Without it the log grows for as long as the hub runs.
    ///
    /// # Errors
    /// [`Error::Io`]; the log is left as it was then. [`Error::LogDamaged`]
    /// when a line of it is damaged: the log is left as it is, and not
    /// compacted again while the hub runs (a rewrite would lose what the
    /// damaged line held; the next start rebuilds it from the lake).
    pub fn compact(&mut self, oldest_record: u64) -> Result<()> {
        let read = ReadBack::from(&self.path)?;
        if !read.damaged.is_empty() {
            self.damaged = true;
            return Err(Error::LogDamaged { path: self.path.clone(), lines: read.describe() });
        }
        let mut intents: Vec<(String, String, Vec<u64>)> = Vec::new();
        let mut committed: HashSet<String> = HashSet::new();
        // A torn last line is the remains of a write that failed and
        // could not be cut back: its writer was told it failed.
        for line in read.lines {
            match line {
                Line::Intent { path, partition, records } => intents.push((path, partition, records)),
                Line::Commit { path } => {
                    committed.insert(path);
                }
                Line::Abandon { path } => intents.retain(|(file, _, _)| *file != path),
                Line::Merge { .. } | Line::Merged { .. } => {}
            }
        }
        let mut keep = Vec::new();
        for (file, partition, records) in intents {
            let done = committed.contains(&file);
            if !done || records.iter().any(|&r| r >= oldest_record) {
                keep.push(Line::Intent { path: file.clone(), partition, records });
                if done {
                    keep.push(Line::Commit { path: file });
                }
            }
        }
        for m in self.merges.values() {
            keep.push(Line::from(m));
        }
        let before = self.bytes;
        let (file, bytes) = rewrite(&self.path, &keep)?;
        let file = Arc::new(file);
        self.syncer.replaced(file.clone());
        (self.file, self.bytes, self.compacted, self.broken) = (file, bytes, bytes, false);
        tracing::info!(log = %self.path.display(), before, after = bytes, "compacted the commit log");
        Ok(())
    }

    /// Write `line` (one `write`: a crash tears at most this line), to be
    /// made durable by the returned [`Unsynced`]. A write that fails is
    /// cut back off the log, so the next line starts on a line of its
    /// own (a partial line before it would make it unreadable).
    fn append(&mut self, line: &Line) -> Result<Unsynced> {
        if self.broken {
            return Err(Error::Io {
                path: self.path.clone(),
                source: std::io::Error::other(
                    "an earlier write to the commit log failed and could not be cut back; restart the hub",
                ),
            });
        }
        let mut buf = Vec::with_capacity(256);
        encode_line(line, &mut buf);
        if let Err(e) = (&*self.file).write_all(&buf) {
            if let Err(cut) = self.file.set_len(self.bytes) {
                tracing::error!(log = %self.path.display(), error = %cut, "cannot cut a failed write back off the commit log");
                self.broken = true;
            }
            return Err(io(&self.path)(e));
        }
        self.bytes += buf.len() as u64;
        Ok(Unsynced { syncer: self.syncer.clone(), seq: self.syncer.wrote() })
    }

    /// Record the intent to put `path` holding `records` of `partition`.
    /// The put may happen once the returned [`Unsynced`]'s `wait` returns
    /// (outside this log's lock, so that concurrent intents share one
    /// fsync).
    ///
    /// # Errors
    /// [`Error::Io`]; the put must not happen then.
    pub fn intent(&mut self, path: &LakePath, partition: &str, records: &[u64]) -> Result<Unsynced> {
        self.pending.insert(path.0.clone());
        self.append(&Line::Intent {
            path: path.0.clone(),
            partition: partition.to_owned(),
            records: records.to_vec(),
        })
    }

    /// Withdraw the intent to put `path`: the lake holds a file of
    /// another writer under that name, which recovery must not take for
    /// this one's.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn abandon(&mut self, path: &LakePath) -> Result<()> {
        self.append(&Line::Abandon { path: path.0.clone() })?.wait()?;
        self.pending.remove(&path.0);
        self.merges.remove(&path.0);
        Ok(())
    }

    /// `fdatasync`s of the log so far (not counting rewrites).
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.syncer.state.lock().expect("sync lock").syncs
    }

    /// Record that `path` is in the lake. Not fsynced: recovery takes an
    /// intent whose file exists for committed, so a lost `commit` line
    /// changes nothing.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn commit(&mut self, path: &LakePath) -> Result<()> {
        let _unsynced = self.append(&Line::Commit { path: path.0.clone() })?;
        self.pending.remove(&path.0);
        if let Some((dir, _)) = path.0.rsplit_once('/') {
            self.touched.insert(dir.to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "wal-00000000000000aa";

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
    }

    /// Compaction while running keeps what a restart needs: puts in flight
    /// and the files holding records it could replay; appends go on in
    /// the new log. It is wanted once the log passes 16 MiB.
    #[tokio::test]
    async fn a_running_log_compacts_to_what_a_restart_needs() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        let path = dir.path().join("commits.log");
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        let file = |n: u64| LakePath(format!("t/p/wal-{n}.parquet"));
        log.intent(&file(1), "t/p", &[1, 2]).unwrap().wait().unwrap();
        log.commit(&file(1)).unwrap();
        log.intent(&file(3), "t/p", &[2, 3, 4]).unwrap().wait().unwrap();
        log.commit(&file(3)).unwrap();
        log.intent(&file(5), "t/p", &[5]).unwrap().wait().unwrap();
        assert!(!log.wants_compaction(), "a small log is left alone");

        log.compact(3).unwrap();
        let kept = lines(&path);
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert!(kept.iter().all(|l| !l.contains("wal-1.")), "file 1 holds only records before 3");
        assert!(kept.iter().any(|l| l.contains("intent") && l.contains("wal-5.")), "the put in flight");
        assert!(!kept.iter().any(|l| l.contains("commit") && l.contains("wal-5.")));
        // The put in flight finishes after the compaction.
        lake.put_create(&file(5), bytes::Bytes::from_static(b"x")).await.unwrap();
        log.commit(&file(5)).unwrap();
        drop(log);
        let (_, committed) = CommitLog::open(&path, &lake, SOURCE, 3).await.unwrap();
        for r in [2, 3, 4, 5] {
            assert!(committed.contains("t/p", r), "record {r}");
        }
        assert!(!committed.contains("t/p", 1));

        // Past 16 MiB (and twice the size after the last compaction).
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        let records: Vec<u64> = (1_000_000..1_100_000).collect();
        let mut n = 100;
        while !log.wants_compaction() {
            log.intent(&file(n), "t/p", &records).unwrap().wait().unwrap();
            log.commit(&file(n)).unwrap();
            n += 1;
        }
        assert!(std::fs::metadata(&path).unwrap().len() >= COMPACT_AT);
        log.compact(2_000_000).unwrap();
        assert!(!log.wants_compaction());
        assert!(std::fs::metadata(&path).unwrap().len() < 1024, "{:?}", lines(&path));
    }

    /// Intents written before a sync starts share it; commits are not
    /// synced; a compaction makes every line written before it durable.
    /// Concurrent writers and waiters neither block each other for good
    /// nor lose a line: a reopened log holds every commit.
    #[tokio::test]
    async fn intents_written_together_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        let path = dir.path().join("commits.log");
        let file = |n: u64| LakePath(format!("t/p/wal-{n}.parquet"));
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        let pending: Vec<Unsynced> = (1..=3).map(|n| log.intent(&file(n), "t/p", &[n]).unwrap()).collect();
        assert_eq!(log.syncs(), 0, "writing syncs nothing");
        for p in pending {
            p.wait().unwrap();
        }
        assert_eq!(log.syncs(), 1, "one sync for the three");
        for n in 1..=3 {
            log.commit(&file(n)).unwrap();
        }
        assert_eq!(log.syncs(), 1, "commits are not synced");
        let p = log.intent(&file(4), "t/p", &[4]).unwrap();
        log.compact(0).unwrap();
        p.wait().unwrap();
        assert_eq!(log.syncs(), 1, "the rewrite made the intent durable");
        log.intent(&file(5), "t/p", &[5]).unwrap().wait().unwrap();
        assert_eq!(log.syncs(), 2, "appends after the rewrite sync the new file");

        let log = Arc::new(Mutex::new(log));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let n = 100 + t * 1000 + i;
                        let p = log.lock().unwrap().intent(&file(n), "t/p", &[n]).unwrap();
                        p.wait().unwrap();
                        log.lock().unwrap().commit(&file(n)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        let (_, committed) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        for t in 0..8u64 {
            for i in 0..50 {
                let n = 100 + t * 1000 + i;
                assert!(committed.contains("t/p", n), "record {n}");
            }
        }
    }

    /// An abandoned intent is not taken for a commit when its file exists
    /// (another writer's), in recovery or compaction; a later intent for
    /// the same name that is committed stands.
    #[tokio::test]
    async fn an_abandoned_intent_is_not_recovered_as_committed() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        let path = dir.path().join("commits.log");
        let file = |n: u64| LakePath(format!("t/p/wal-{n}.parquet"));
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        for n in [1, 2] {
            lake.put_create(&file(n), bytes::Bytes::from_static(b"theirs")).await.unwrap();
            log.intent(&file(n), "t/p", &[n]).unwrap().wait().unwrap();
            log.abandon(&file(n)).unwrap();
        }
        // File 2's name came free and a retry committed it.
        log.intent(&file(2), "t/p", &[2]).unwrap().wait().unwrap();
        log.commit(&file(2)).unwrap();
        log.compact(0).unwrap();
        assert!(lines(&path).iter().all(|l| !l.contains("wal-1.")), "{:?}", lines(&path));
        drop(log);
        let (_, committed) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        assert!(!committed.contains("t/p", 1), "file 1 is another writer's");
        assert!(committed.contains("t/p", 2));

        // The same without a compaction in between.
        std::fs::remove_file(&path).unwrap();
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        log.intent(&file(1), "t/p", &[1]).unwrap().wait().unwrap();
        log.abandon(&file(1)).unwrap();
        drop(log);
        let (_, committed) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        assert!(!committed.contains("t/p", 1));
    }

    /// Each line carries the CRC-32 of its JSON; a line of a log written
    /// before lines carried one is read as JSON alone. A damaged line,
    /// whatever is damaged, is refused with what is wrong.
    #[test]
    fn a_line_is_checked_against_its_checksum() {
        let line = Line::Commit { path: "t/p/f.parquet".to_owned() };
        let mut buf = Vec::new();
        encode_line(&line, &mut buf);
        let text = String::from_utf8(buf.clone()).unwrap();
        let (json, rest) = text.split_once('\t').unwrap();
        assert_eq!(json, r#"{"op":"commit","path":"t/p/f.parquet"}"#);
        assert_eq!(rest.len(), 9, "eight hex digits and a newline: {rest:?}");
        let raw = &buf[..buf.len() - 1];
        assert!(matches!(decode_line(raw), Ok(Line::Commit { path }) if path == "t/p/f.parquet"));
        assert!(matches!(decode_line(json.as_bytes()), Ok(Line::Commit { .. })), "a line without one");
        for at in 0..raw.len() {
            let mut bad = raw.to_vec();
            bad[at] ^= 0x01;
            assert!(decode_line(&bad).is_err(), "damage at {at}: {:?}", String::from_utf8_lossy(&bad));
        }
        assert!(decode_line(b"{\"op\":\"commit\",\"pa").is_err());
        assert!(decode_line(&[0xff, b'{']).unwrap_err().contains("UTF-8"));
        assert!(decode_line(br#"{"op":"commit","path":"x"}	+1234567"#)
            .unwrap_err()
            .contains("not a checksum"));
    }

    /// A running log found damaged is not compacted (a rewrite would lose
    /// what the damaged line held): the compaction fails naming the line,
    /// leaves the file as it is, and is not wanted again.
    #[tokio::test]
    async fn a_damaged_running_log_is_not_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        let path = dir.path().join("commits.log");
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        let file = |n: u64| LakePath(format!("t/p/wal-{n}.parquet"));
        for n in 1..=3 {
            log.intent(&file(n), "t/p", &[n]).unwrap().wait().unwrap();
            log.commit(&file(n)).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.iter().position(|&b| b == b'2').unwrap();
        bytes[at] = b'7';
        std::fs::write(&path, &bytes).unwrap();
        log.bytes = COMPACT_AT;
        assert!(log.wants_compaction());
        let e = log.compact(0).unwrap_err();
        assert!(matches!(e, Error::LogDamaged { .. }), "{e}");
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        assert!(e.to_string().contains(&format!("at line {line} (")), "{e}");
        assert!(!log.wants_compaction(), "not tried again while running");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the log is left as it is");
    }

    /// A write to the log that fails and cannot be cut back leaves the log
    /// refusing later lines (each would follow the failed one's remains on
    /// its line), with what to do; a restart reads it whole.
    #[tokio::test]
    async fn after_a_write_that_cannot_be_cut_back_no_line_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
        let path = dir.path().join("commits.log");
        let (mut log, _) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        let file = |n: u64| LakePath(format!("t/p/wal-{n}.parquet"));
        log.intent(&file(1), "t/p", &[1]).unwrap().wait().unwrap();
        // A handle neither writes nor truncates through.
        let good = std::mem::replace(&mut log.file, Arc::new(File::open(&path).unwrap()));
        assert!(log.intent(&file(2), "t/p", &[2]).is_err());
        log.file = good;
        let e = log.intent(&file(3), "t/p", &[3]).unwrap_err();
        assert!(e.to_string().contains("restart the hub"), "{e}");
        drop(log);
        let (_, committed) = CommitLog::open(&path, &lake, SOURCE, 0).await.unwrap();
        assert_eq!(committed.damaged_lines, 0);
    }
}
