//! The write-ahead log: what the hub accepted (and rejected), durable
//! before any acknowledgement.
//!
//! - **Records.** One per request: account, receive time, collector, and
//!   each event's outcome, id and raw bytes; zstd-compressed (a fast
//!   negative level) by the request handler, framed as
//!   `len u32 | crc32 u32 | seq u64 | payload`.
//! - **Group commit.** One thread writes every record waiting in its
//!   bounded queue, then fsyncs once and answers them all. Before the
//!   write it runs the [`BeforeWrite`] hook once for the group: the hub
//!   makes its new protection keys durable there, off the request path.
//! - **Segments** (`<first seq>.wal`) roll by size, once the open
//!   segment's first record is committed to the lake (so under steady load
//!   a segment spans about one roll age of the lake's partitions), and on
//!   [`WeakWal::seal`]. A sealed segment
//!   whose records are all committed is *retired*: once the dedupe
//!   identities of its events (account and event id; a digest of the
//!   bytes of a refused event without an id) are durable in an id file
//!   (`<n>.ids`), the segment is deleted. Raw events therefore stay on
//!   disk only until their rows are committed. A thread of its own
//!   (`watershed-wal-retire`) appends each fsynced group's ids to the id
//!   file as they come (none waits in memory for its segment to retire),
//!   fsyncs it before deleting a segment, and deletes. A segment's ids
//!   are tens of megabytes under load; on the WAL thread they held up
//!   every acknowledgement while they were written.
//! - **Id files** hold the dedupe window across restarts; the oldest is
//!   deleted once newer events alone fill the window.
//! - **Recovery** reads every id file (the dedupe window) and every
//!   segment, truncates a torn tail of the last of each, and hands each
//!   record to the hub, which re-buffers what no committed file covers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{io, Error, Result};

const FRAME_HEADER: usize = 16;

/// An id file takes frames until it is a quarter of a segment (at least
/// this); then a new one starts.
const IDS_FILE_MIN_BYTES: u64 = 1 << 10;

/// How long the retire thread waits before trying a failed retirement
/// again.
const RETIRE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

mod files;
mod record;
mod retire;
#[cfg(test)]
pub(crate) mod tests;
mod writer;

use files::{read_ids_file, read_segment, OnBad};
pub use record::{decode_record, BufferPool, Finished, RecordEncoder, Retired, WalEvent, WalRecord};
use retire::{RetireMsg, Retirer};
use writer::Writer;

/// The WAL's identity: 16 hex digits, random, made once per WAL directory
/// (`log.id`, fsynced) and kept for good. Lake files are named by it and
/// by the records they hold, so two hubs writing one lake (each numbering
/// its records from 1) never name two files alike, and a rewrite after a
/// crash still gets the same name.
///
/// # Errors
/// [`Error::Io`], or [`Error::WalCorrupt`] for a `log.id` that is not
/// 16 hex digits.
pub fn identity(dir: &Path) -> Result<String> {
    let path = dir.join("log.id");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_ascii_lowercase());
            }
            Err(Error::WalCorrupt { path, detail: format!("{id:?} is not a WAL identity (16 hex digits)") })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore as _;
            let mut b = [0u8; 8];
            rand::rngs::OsRng.fill_bytes(&mut b);
            let id = crate::hex(&b);
            let tmp = dir.join("log.id.tmp");
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            writeln!(f, "{id}").and_then(|()| f.sync_all()).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
            Ok(id)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// The number of a WAL file named `<20 digits><suffix>` (`.wal` for a
/// segment, `.ids` for an id file), as the WAL names them; any other name
/// (`5.wal`, `+0000000000000000005.wal`, a copy's) is not the WAL's.
#[must_use]
pub fn file_number(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What the WAL and the lake writer share: the records not yet fully
/// committed to the lake (record seq → parts left), the segment bytes on
/// disk, and the records the WAL asks to be committed early.
#[derive(Debug, Default)]
pub struct Pending {
    map: Mutex<BTreeMap<u64, u32>>,
    /// The WAL thread, told when records are fully committed so it
    /// retires their segments without waiting for the next append.
    retire: Mutex<Option<mpsc::WeakSender<Msg>>>,
    /// The first record of the oldest segment on disk (0 until the WAL
    /// is open): nothing before it can be replayed.
    oldest: AtomicU64,
    /// Bytes of the segments on disk (raw events not yet deleted).
    raw_bytes: AtomicU64,
    /// Records before this one are to be committed now (0: none), so the
    /// segments holding them can go: see [`WalOptions::max_raw_bytes`].
    commit_before: AtomicU64,
}

impl Pending {
    /// Register `parts` lake parts for `seq` (none: nothing to wait for).
    pub fn register(&self, seq: u64, parts: u32) {
        if parts > 0 {
            self.map.lock().expect("pending lock").insert(seq, parts);
        }
    }

    /// One part of each of `records` is committed.
    pub fn committed(&self, records: &[u64]) {
        let mut done = false;
        let mut m = self.map.lock().expect("pending lock");
        for r in records {
            if let Some(n) = m.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    m.remove(r);
                    done = true;
                }
            }
        }
        drop(m);
        if done {
            let tx = self.retire.lock().expect("pending lock").as_ref().and_then(mpsc::WeakSender::upgrade);
            // A full queue means a group commit is coming, which retires too.
            if let Some(tx) = tx {
                let _ = tx.try_send(Msg::Retire);
            }
        }
    }

    /// The first record of the oldest WAL segment: what a restart could
    /// replay starts there (0 while the WAL is not open yet).
    #[must_use]
    pub fn oldest_segment(&self) -> u64 {
        self.oldest.load(Ordering::Acquire)
    }

    /// Bytes of the segments on disk: raw events waiting for the lake, and
    /// committed ones not yet deleted.
    #[must_use]
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes.load(Ordering::Relaxed)
    }

    /// Records before this seq are to be committed now, so the WAL can
    /// delete its oldest segments (0: nothing is asked).
    #[must_use]
    pub fn commit_before(&self) -> u64 {
        self.commit_before.load(Ordering::Relaxed)
    }

    /// The lowest record seq still waiting, if any.
    #[must_use]
    pub fn low_watermark(&self) -> Option<u64> {
        self.map.lock().expect("pending lock").keys().next().copied()
    }

    /// Records waiting.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.lock().expect("pending lock").len()
    }

    /// Whether nothing waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Segment {
    first: u64,
    last: Option<u64>,
    events: u64,
    bytes: u64,
    path: PathBuf,
}

/// An id file: the identities of retired segments' events.
struct IdsFile {
    /// The number in its name (names sort in the order files started).
    name: u64,
    /// The last record whose ids it holds.
    last: u64,
    events: u64,
    bytes: u64,
    path: PathBuf,
}

/// What the WAL thread is asked to do.
#[derive(Debug)]
enum Msg {
    /// Write a record.
    Append(Append),
    /// Retire what is committed.
    Retire,
    /// Seal the open segment (if it holds records), then answer.
    Seal(oneshot::Sender<()>),
    /// While writes fail, try a write of [`PROBE_BYTES`] (and its fsync)
    /// in the log's directory; answer whether the log takes records
    /// again.
    Probe(oneshot::Sender<bool>),
}

/// The size of [`Msg::Probe`]'s write: about a large group of records, so
/// that a disk with a few bytes free does not pass for one with room.
pub(super) const PROBE_BYTES: usize = 256 << 10;

#[derive(Debug)]
struct Append {
    payload: Vec<u8>,
    ids: Vec<u8>,
    events: u32,
    parts: u32,
    reply: oneshot::Sender<Result<Appended, Failed>>,
}

/// A record written and fsynced.
#[derive(Debug)]
pub struct Appended {
    /// Its sequence number.
    pub seq: u64,
    /// The payload's buffer, given back for reuse.
    pub buffer: Vec<u8>,
}

/// Why a group was not written.
#[derive(Clone, Debug)]
enum Failed {
    BeforeWrite(String),
    Io(String),
}

/// Run by the WAL thread before it writes a group of records, for state
/// that must be durable before any of them is. A failure fails the whole
/// group, written or not, with the hook's message.
pub type BeforeWrite = Box<dyn FnMut() -> std::result::Result<(), String> + Send>;

/// Handle to the WAL writer thread.
#[derive(Debug, Clone)]
pub struct Wal {
    tx: mpsc::Sender<Msg>,
    /// Bytes on disk, for metrics.
    pub size: Arc<AtomicU64>,
    /// Groups of appends whose write failed and was cut back, or whose
    /// new protection keys could not be stored first (a full disk): each
    /// answered with an error, nothing of them stored. For metrics.
    pub write_failures: Arc<AtomicU64>,
    /// Why the last write failed, while no write has succeeded since (see
    /// [`Wal::failing`]).
    failing: Arc<std::sync::Mutex<Option<String>>>,
    /// Turns true when the writer thread (and its retire thread) ended.
    stopped: watch::Receiver<bool>,
    /// Why the log needs a restart, once it does (see [`Wal::failure`]).
    failed: Arc<OnceLock<String>>,
}

/// Note the first failure after which the log needs a restart.
pub(super) fn note_failure(failed: &OnceLock<String>, why: &str) {
    if failed.set(why.to_owned()).is_ok() {
        tracing::error!(
            error = %why,
            "the write-ahead log needs a restart; until then /healthz answers 503, and so does ingest once \
             it cannot append"
        );
    }
}

/// A [`Wal`] handle that does not keep its writer thread alive.
#[derive(Debug, Clone)]
pub struct WeakWal {
    tx: mpsc::WeakSender<Msg>,
}

impl WeakWal {
    /// Seal the open segment, so that every record acknowledged so far
    /// is in a sealed segment, retired (deleted) as soon as its records
    /// are committed. Returns once sealed.
    ///
    /// # Errors
    /// [`Error::Stopped`] if the writer thread is gone.
    pub async fn seal(&self) -> Result<()> {
        let tx = self.tx.upgrade().ok_or(Error::Stopped("wal writer"))?;
        let (reply, rx) = oneshot::channel();
        tx.send(Msg::Seal(reply)).await.map_err(|_| Error::Stopped("wal writer"))?;
        drop(tx);
        rx.await.map_err(|_| Error::Stopped("wal writer"))
    }
}

/// WAL settings.
#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    /// Roll segments at this size.
    pub segment_bytes: u64,
    /// The bound on segment bytes on disk. From half of it, the records
    /// holding the oldest segments are asked to be committed
    /// ([`Pending::commit_before`]) until the segments left hold a quarter
    /// of it; the hub refuses new requests while the segments hold all of
    /// it (the lake cannot commit). At least eight segments.
    pub max_raw_bytes: u64,
    /// Keep the ids of at least this many newer events before deleting an
    /// id file (the dedupe window).
    pub retain_events: u64,
    /// Start even when a segment other than the newest is damaged: replay
    /// its records up to the damage, keep a copy of the file as
    /// `<name>.damaged`, and cut the rest off (its records not yet
    /// committed to the lake are lost). Otherwise such damage stops the
    /// start.
    pub salvage: bool,
}

impl Wal {
    /// Open the WAL in `dir`: pass the identity of every event in the id
    /// files to `remember` (the dedupe window), pass every record of the
    /// segments to `replay` (oldest first), truncate a torn tail, and start
    /// the writer thread. `pending` decides which records are still needed;
    /// `before_write` runs before each group is written.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::WalCorrupt`] for damage before the tail.
    pub fn open(
        dir: &Path,
        opts: WalOptions,
        pending: Arc<Pending>,
        before_write: Option<BeforeWrite>,
        mut replay: impl FnMut(u64, WalRecord) -> Result<()>,
        mut remember: impl FnMut(&str, Retired<'_>),
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let numbered = |suffix: &str| -> Result<Vec<(u64, PathBuf)>> {
            let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
                .map_err(io(dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| {
                    let n = file_number(p.file_name()?.to_str()?, suffix)?;
                    Some((n, p))
                })
                .collect();
            v.sort();
            Ok(v)
        };
        let id_paths = numbered(".ids")?;
        let mut ids_files = Vec::new();
        let count = id_paths.len();
        for (i, (name, path)) in id_paths.into_iter().enumerate() {
            let newest = i + 1 == count;
            match read_ids_file(&path, name, newest, &mut remember) {
                Ok(f) => ids_files.push(f),
                // Id files are the dedupe window's memory, not data (their
                // events are in the lake): damage to one must not keep the
                // hub from starting. What it held before the damage is
                // remembered; the file is kept aside for inspection. Not
                // the newest: its last seq is where seqs go on.
                Err(Error::WalCorrupt { detail, .. }) if !newest => {
                    let aside = path.with_extension("ids.damaged");
                    tracing::error!(
                        file = %path.display(),
                        %detail,
                        kept_as = %aside.display(),
                        "a WAL id file is damaged: the event ids after the damage are out of the dedupe \
                         window, so a client's retry of one of those events would be stored again"
                    );
                    std::fs::rename(&path, &aside).map_err(io(&path))?;
                }
                Err(e) => return Err(e),
            }
        }
        let paths = numbered(".wal")?;
        let mut segments = Vec::new();
        let mut next = ids_files.iter().map(|f| f.last + 1).max().unwrap_or(1);
        if let Some((first, _)) = paths.first() {
            next = next.max(*first);
        }
        let count = paths.len();
        // The ids of the records still in segments that the id files do
        // not hold yet (a torn tail of the newest was cut off): appended
        // again, before any of those segments can be deleted.
        let ids_through = ids_files.iter().map(|f| f.last).max().unwrap_or(0);
        // The newest id file may hold appends a crashed process never
        // fsynced (still in the page cache): durable before it is relied on.
        if let Some(f) = ids_files.last() {
            File::open(&f.path).and_then(|f| f.sync_all()).map_err(io(&f.path))?;
        }
        let mut missing_ids = Vec::new();
        for (i, (first, path)) in paths.into_iter().enumerate() {
            let on_bad = match (i + 1 == count, opts.salvage) {
                (true, salvage) => OnBad::NewestSegment { first, durable_through: ids_through, salvage },
                (false, true) => OnBad::Salvage,
                (false, false) => OnBad::Fail,
            };
            let seg =
                read_segment(&path, first, on_bad, &mut next, &mut replay, (ids_through, &mut missing_ids))?;
            segments.push(seg);
        }
        // Never a seq the id files hold again: the newest segment may end
        // before its durable records (salvaged), and lake files are named
        // by the seqs they hold.
        next = next.max(ids_through + 1);
        let on_disk = segments.iter().map(|s| s.bytes).sum::<u64>();
        pending.raw_bytes.store(on_disk, Ordering::Relaxed);
        let size = Arc::new(AtomicU64::new(on_disk + ids_files.iter().map(|f| f.bytes).sum::<u64>()));
        let (tx, rx) = mpsc::channel(1024);
        *pending.retire.lock().expect("pending lock") = Some(tx.downgrade());
        let (retire_tx, retire_rx) = std::sync::mpsc::channel();
        let failed = Arc::new(OnceLock::new());
        let write_failures = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(std::sync::Mutex::new(None));
        let retirer = Retirer {
            dir: dir.to_owned(),
            opts,
            ids_files,
            pending: pending.clone(),
            size: size.clone(),
            queue: missing_ids.into_iter().map(RetireMsg::Ids).collect(),
            file: None,
            appended_through: ids_through,
            durable_through: ids_through,
            broken: None,
            failed: failed.clone(),
        };
        let mut w = Writer {
            dir: dir.to_owned(),
            opts,
            segments,
            file: None,
            next,
            pending,
            size: size.clone(),
            before_write,
            frames: Vec::new(),
            broken: None,
            failed: failed.clone(),
            retire: retire_tx,
            written_ids: Vec::new(),
            failing: 0,
            write_failures: write_failures.clone(),
            last_failure: failing.clone(),
        };
        w.open_segment()?;
        w.note_oldest();
        w.note_pressure();
        let retiring = std::thread::Builder::new()
            .name("watershed-wal-retire".into())
            .spawn(move || retirer.run(&retire_rx))
            .map_err(io(dir))?;
        let (stopped_tx, stopped) = watch::channel(false);
        std::thread::Builder::new()
            .name("watershed-wal".into())
            .spawn(move || {
                // Hands the last retirements over and drops its sender.
                w.run(rx);
                if retiring.join().is_err() {
                    tracing::error!("the WAL retire thread panicked");
                }
                let _ = stopped_tx.send(true);
            })
            .map_err(io(dir))?;
        Ok(Self { tx, size, write_failures, failing, stopped, failed })
    }

    /// Wait until the writer thread has stopped: once every handle is
    /// dropped (this one is consumed here), it writes what is queued,
    /// retires the segments whose records are committed, and waits for
    /// the retire thread to write their ids and delete them.
    pub async fn close(self) {
        let mut stopped = self.stopped.clone();
        drop(self);
        // An error means the thread is gone without saying so (a panic).
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// Why the last write failed (a full disk), while no write has
    /// succeeded since and the log has not been probed back to health
    /// ([`Wal::probe`]). Appends are refused then, nothing stored; the log
    /// needs no restart.
    #[must_use]
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// While [`Wal::failing`], try a write (and fsync) of the size of a
    /// large group in the log's directory: whether the log takes records
    /// again. It clears the failure when it does, so a hub out of a load
    /// balancer's rotation for a full disk comes back once space is
    /// freed, without a request of its own.
    pub async fn probe(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Probe(reply)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Why the log cannot go on without a restart, once that is so: a
    /// segment's fsync failed (what reached the disk is unknown), a failed
    /// write could not be cut back, or an id file's fsync failed (no
    /// committed segment can be deleted, so the log only grows), or its
    /// thread ended unasked (a panic; every append then fails). A restart
    /// recovers from what is on disk.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        if let Some(why) = self.failed.get() {
            return Some(why.clone());
        }
        // Only `close`, which consumes this handle, stops it otherwise; a
        // panic drops the sender without a word.
        let ended = *self.stopped.borrow() || self.stopped.has_changed().is_err();
        ended.then(|| "the write-ahead log's thread stopped unexpectedly".to_owned())
    }

    /// A handle that does not keep the writer thread alive.
    #[must_use]
    pub fn downgrade(&self) -> WeakWal {
        WeakWal { tx: self.tx.downgrade() }
    }

    /// Append a record (from [`RecordEncoder::finish`]) holding
    /// `events` events that became `parts` lake parts; returns its seq,
    /// and the payload's buffer, once it is fsynced.
    ///
    /// # Errors
    /// [`Error::Stopped`] if the writer thread is gone, [`Error::Io`] text
    /// if the write failed, [`Error::BeforeWal`] if the hook failed.
    pub async fn append(&self, record: Finished, events: u32, parts: u32) -> Result<Appended> {
        let (reply, rx) = oneshot::channel();
        let Finished { payload, ids } = record;
        self.tx
            .send(Msg::Append(Append { payload, ids, events, parts, reply }))
            .await
            .map_err(|_| Error::Stopped("wal writer"))?;
        match rx.await {
            Ok(Ok(appended)) => Ok(appended),
            Ok(Err(Failed::Io(e))) => {
                Err(Error::Io { path: PathBuf::from("wal"), source: std::io::Error::other(e) })
            }
            Ok(Err(Failed::BeforeWrite(e))) => Err(Error::BeforeWal(e)),
            Err(_) => Err(Error::Stopped("wal writer")),
        }
    }
}
