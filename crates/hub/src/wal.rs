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

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use watershed_event::{AccountId, TimestampMicros};

use crate::error::{io, Error, Result};

const FRAME_HEADER: usize = 16;

/// An id file takes frames until it is a quarter of a segment (at least
/// this); then a new one starts.
const IDS_FILE_MIN_BYTES: u64 = 1 << 10;

/// How long the retire thread waits before trying a failed retirement
/// again.
const RETIRE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// One event in a WAL record.
#[derive(Debug, Clone, PartialEq)]
pub struct WalEvent {
    /// Rejection (reason, path, detail), or `None` when accepted.
    pub rejected: Option<(String, String, String)>,
    /// The event id, when known.
    pub id: String,
    /// The event as received.
    pub raw: Vec<u8>,
}

/// A decoded WAL record (recovery only; the hot path encodes directly).
#[derive(Debug, Clone, PartialEq)]
pub struct WalRecord {
    /// The authenticated account.
    pub account: AccountId,
    /// When the hub received the request.
    pub received_at: TimestampMicros,
    /// The forwarding collector.
    pub collector: Option<String>,
    /// The events.
    pub events: Vec<WalEvent>,
}

/// Encodes a record straight from borrowed request data.
#[derive(Debug)]
pub struct RecordEncoder {
    buf: Vec<u8>,
    count_at: usize,
    count: u32,
    /// The events' dedupe identities, kept when the record retires.
    ids: Vec<u8>,
}

/// A finished record: what [`Wal::append`] writes.
#[derive(Debug)]
pub struct Finished {
    /// The compressed record.
    pub payload: Vec<u8>,
    /// Its events' dedupe identities (see [`Retired`]), uncompressed.
    pub ids: Vec<u8>,
}

/// The dedupe identity of an event of a retired record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired<'a> {
    /// An accepted event's id.
    Accepted(&'a str),
    /// A refused event's id.
    Rejected(&'a str),
    /// The SHA-256 of a refused event without an id.
    RejectedBytes(&'a [u8; 32]),
}

/// Start the identities of a record of `account`; `ids_done` patches the
/// count in.
fn ids_start(ids: &mut Vec<u8>, account: &str) {
    ids.clear();
    put_str16(ids, account);
    ids.extend_from_slice(&0u32.to_le_bytes());
}

fn ids_push(ids: &mut Vec<u8>, r: Retired<'_>) {
    match r {
        Retired::Accepted(id) => {
            ids.push(0);
            put_str16(ids, id);
        }
        Retired::Rejected(id) => {
            ids.push(1);
            put_str16(ids, id);
        }
        Retired::RejectedBytes(d) => {
            ids.push(2);
            ids.extend_from_slice(d);
        }
    }
}

fn ids_done(ids: &mut [u8], count: u32) {
    let at = 2 + usize::from(u16::from_le_bytes([ids[0], ids[1]]));
    ids[at..at + 4].copy_from_slice(&count.to_le_bytes());
}

/// Push the identity a refused event is deduplicated by (as
/// [`crate::dedupe::Dedupe::dead_key`]).
fn push_refused(ids: &mut Vec<u8>, id: &str, raw: &[u8]) {
    if id.is_empty() {
        ids_push(ids, Retired::RejectedBytes(&crate::dedupe::raw_digest(raw)));
    } else {
        ids_push(ids, Retired::Rejected(id));
    }
}

/// Call `f` with the account and identity of every event in `ids` (the
/// identities of one or more records). False when they do not parse.
fn read_ids(ids: &[u8], f: &mut impl FnMut(&str, Retired<'_>)) -> bool {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (b.get(..n)?, b.get(n..)?);
        *b = rest;
        Some(head)
    }
    fn str16<'a>(b: &mut &'a [u8]) -> Option<&'a str> {
        let n = usize::from(u16::from_le_bytes(take(b, 2)?.try_into().ok()?));
        std::str::from_utf8(take(b, n)?).ok()
    }
    fn record(b: &mut &[u8], f: &mut impl FnMut(&str, Retired<'_>)) -> Option<()> {
        let account = str16(b)?;
        let count = u32::from_le_bytes(take(b, 4)?.try_into().ok()?);
        for _ in 0..count {
            let r = match take(b, 1)?[0] {
                0 => Retired::Accepted(str16(b)?),
                1 => Retired::Rejected(str16(b)?),
                2 => Retired::RejectedBytes(take(b, 32)?.try_into().ok()?),
                _ => return None,
            };
            f(account, r);
        }
        Some(())
    }
    let mut b = ids;
    while !b.is_empty() {
        if record(&mut b, f).is_none() {
            return false;
        }
    }
    true
}

fn put_str16(buf: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize - 1)];
    buf.extend_from_slice(&u16::try_from(b.len()).expect("capped").to_le_bytes());
    buf.extend_from_slice(b);
}

fn put_bytes32(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&u32::try_from(b.len()).expect("events are capped far below 4 GiB").to_le_bytes());
    buf.extend_from_slice(b);
}

impl RecordEncoder {
    /// Start a record; `capacity` is the expected encoded size (the sum of
    /// the events' sizes is a good guess).
    #[must_use]
    pub fn new(
        account: &AccountId,
        received_at: TimestampMicros,
        collector: Option<&str>,
        capacity: usize,
    ) -> Self {
        Self::in_buffer(Vec::with_capacity(capacity.saturating_add(256)), account, received_at, collector)
    }

    /// Start a record in `buf` (cleared first), for a buffer kept from an
    /// earlier record.
    #[must_use]
    pub fn in_buffer(
        mut buf: Vec<u8>,
        account: &AccountId,
        received_at: TimestampMicros,
        collector: Option<&str>,
    ) -> Self {
        buf.clear();
        buf.push(1u8);
        put_str16(&mut buf, account.as_str());
        buf.extend_from_slice(&received_at.to_le_bytes());
        match collector {
            Some(c) => {
                buf.push(1);
                put_str16(&mut buf, c);
            }
            None => buf.push(0),
        }
        let count_at = buf.len();
        buf.extend_from_slice(&0u32.to_le_bytes());
        // An event's identity is about a sixteenth of its bytes.
        let mut ids = Vec::with_capacity(buf.capacity() / 16);
        ids_start(&mut ids, account.as_str());
        Self { buf, count_at, count: 0, ids }
    }

    /// Add an accepted event.
    pub fn accepted(&mut self, id: &str, raw: &[u8]) {
        self.buf.push(0);
        put_str16(&mut self.buf, id);
        put_bytes32(&mut self.buf, raw);
        self.count += 1;
        ids_push(&mut self.ids, Retired::Accepted(id));
    }

    /// Add a rejected event.
    pub fn rejected(&mut self, id: &str, reason: &str, path: &str, detail: &str, raw: &[u8]) {
        self.buf.push(1);
        put_str16(&mut self.buf, id);
        put_str16(&mut self.buf, reason);
        put_str16(&mut self.buf, path);
        put_bytes32(&mut self.buf, detail.as_bytes());
        put_bytes32(&mut self.buf, raw);
        self.count += 1;
        push_refused(&mut self.ids, id, raw);
    }

    /// Events added.
    #[must_use]
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no event was added.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The record's buffer, unfinished (to keep it for reuse).
    #[must_use]
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The compressed payload and the identities.
    #[must_use]
    pub fn finish(self) -> Finished {
        self.finish_pooled(&BufferPool::default())
    }

    /// The compressed payload, in a buffer from `pool`, and the
    /// identities; the record's own buffer goes back to `pool`.
    #[must_use]
    pub fn finish_pooled(mut self, pool: &BufferPool) -> Finished {
        let c = self.count.to_le_bytes();
        self.buf[self.count_at..self.count_at + 4].copy_from_slice(&c);
        ids_done(&mut self.ids, self.count);
        let mut out = pool.take(zstd::zstd_safe::compress_bound(self.buf.len()));
        // A fast negative level: the WAL is short-lived and this runs per
        // request on the ack path (about 6x smaller at a third of level
        // 1's time on the reference workload).
        COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            let c = match &mut *c {
                Some(c) => c,
                None => c.insert(
                    zstd::bulk::Compressor::new(WAL_ZSTD_LEVEL)
                        .expect("a valid zstd level allocates a context"),
                ),
            };
            c.compress_to_buffer(&self.buf, &mut out).expect("the output holds the compression bound");
        });
        pool.give(std::mem::take(&mut self.buf));
        Finished { payload: out, ids: self.ids }
    }
}

/// Buffers kept between requests for WAL records and their compressed
/// payloads. Both are about the size of a request, and a fresh one per
/// request is memory the kernel must fault in and zero each time. At most
/// [`BufferPool::KEEP`] buffers of up to [`BufferPool::KEEP_BYTES`] wait.
#[derive(Debug, Default)]
pub struct BufferPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers kept at most.
    pub const KEEP: usize = 8;
    /// Larger buffers (a maximal request's) are dropped, not kept.
    pub const KEEP_BYTES: usize = 8 << 20;

    /// An empty buffer with room for `capacity` bytes: a kept one when
    /// there is one (the first large enough, else the largest).
    #[must_use]
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = bufs
            .iter()
            .position(|b| b.capacity() >= capacity)
            .or_else(|| (0..bufs.len()).max_by_key(|&i| bufs[i].capacity()));
        let mut b = i.map(|i| bufs.swap_remove(i)).unwrap_or_default();
        drop(bufs);
        b.reserve(capacity);
        b
    }

    /// Keep `buf` for a later [`BufferPool::take`].
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > Self::KEEP_BYTES {
            return;
        }
        buf.clear();
        let mut bufs = self.bufs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if bufs.len() < Self::KEEP {
            bufs.push(buf);
        }
    }
}

thread_local! {
    /// One zstd context per thread, reused: a fresh context per record
    /// would allocate and initialise its tables every request.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> Option<usize> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    }
    fn str16(&mut self) -> Option<String> {
        let n = self.u16()?;
        self.take(n).map(|b| String::from_utf8_lossy(b).into_owned())
    }
    fn bytes32(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()?;
        self.take(n).map(<[u8]>::to_vec)
    }
}

/// zstd level of WAL records.
const WAL_ZSTD_LEVEL: i32 = -5;

/// Decode a compressed record payload.
#[must_use]
pub fn decode_record(payload: &[u8]) -> Option<WalRecord> {
    let raw = zstd::stream::decode_all(payload).ok()?;
    let mut c = Cursor(&raw);
    if c.u8()? != 1 {
        return None;
    }
    let account = AccountId::new(c.str16()?).ok()?;
    let received_at = i64::from_le_bytes(c.take(8)?.try_into().ok()?);
    let collector = if c.u8()? == 1 { Some(c.str16()?) } else { None };
    let n = c.u32()?;
    let mut events = Vec::with_capacity(n.min(100_000));
    for _ in 0..n {
        let status = c.u8()?;
        let id = c.str16()?;
        let rejected = if status == 1 {
            let reason = c.str16()?;
            let path = c.str16()?;
            let detail = String::from_utf8_lossy(&c.bytes32()?).into_owned();
            Some((reason, path, detail))
        } else {
            None
        };
        events.push(WalEvent { rejected, id, raw: c.bytes32()? });
    }
    Some(WalRecord { account, received_at, collector, events })
}

/// The identities of a decoded record, as [`RecordEncoder`] makes them.
fn ids_of(record: &WalRecord, ids: &mut Vec<u8>) {
    let mut one = Vec::new();
    ids_start(&mut one, record.account.as_str());
    for e in &record.events {
        match e.rejected {
            None => ids_push(&mut one, Retired::Accepted(&e.id)),
            Some(_) => push_refused(&mut one, &e.id, &e.raw),
        }
    }
    ids_done(&mut one, u32::try_from(record.events.len()).expect("a record's events fit u32"));
    ids.extend_from_slice(&one);
}

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
}

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
    /// Turns true when the writer thread (and its retire thread) ended.
    stopped: watch::Receiver<bool>,
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
                    let n = p.file_name()?.to_str()?.strip_suffix(suffix)?.parse::<u64>().ok()?;
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
                (true, _) => OnBad::CutTail,
                (false, true) => OnBad::Salvage,
                (false, false) => OnBad::Fail,
            };
            let seg =
                read_segment(&path, first, on_bad, &mut next, &mut replay, (ids_through, &mut missing_ids))?;
            segments.push(seg);
        }
        let on_disk = segments.iter().map(|s| s.bytes).sum::<u64>();
        pending.raw_bytes.store(on_disk, Ordering::Relaxed);
        let size = Arc::new(AtomicU64::new(on_disk + ids_files.iter().map(|f| f.bytes).sum::<u64>()));
        let (tx, rx) = mpsc::channel(1024);
        *pending.retire.lock().expect("pending lock") = Some(tx.downgrade());
        let (retire_tx, retire_rx) = std::sync::mpsc::channel();
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
            retire: retire_tx,
            written_ids: Vec::new(),
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
        Ok(Self { tx, size, stopped })
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

/// What a bad frame in a file means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OnBad {
    /// The newest file, whose unacknowledged last write may be torn: it
    /// is cut off there.
    CutTail,
    /// Damage: an error.
    Fail,
    /// Damage the operator chose to start without: a copy of the file is
    /// kept as `<name>.damaged`, then it is cut off there.
    Salvage,
}

/// Read the frames of `path`, oldest first, passing each (seq, payload,
/// offset) to `each`; returns the bytes of whole frames. A bad frame is
/// handled as `on_bad` says; under [`OnBad::Salvage`] so is a frame that
/// `each` finds undecodable ([`Error::WalCorrupt`]).
fn read_frames(
    path: &Path,
    on_bad: OnBad,
    mut each: impl FnMut(u64, &[u8], usize) -> Result<()>,
) -> Result<u64> {
    let mut f = OpenOptions::new().read(true).write(true).open(path).map_err(io(path))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(io(path))?;
    let (mut off, mut frames) = (0usize, 0usize);
    while off < data.len() {
        let frame = parse_frame(&data[off..]);
        let bad = match frame {
            Some((seq, payload, _)) => match each(seq, payload, off) {
                Ok(()) => None,
                Err(Error::WalCorrupt { detail, .. }) if on_bad == OnBad::Salvage => Some(detail),
                Err(e) => return Err(e),
            },
            None => Some(format!(
                "bad frame at offset {off} of {} bytes, after {frames} readable frames; \
                 the rest of the file cannot be read",
                data.len()
            )),
        };
        if let Some(detail) = bad {
            match on_bad {
                OnBad::CutTail => {
                    tracing::warn!(file = %path.display(), offset = off, "truncating a torn tail (unacknowledged writes)");
                }
                OnBad::Fail => return Err(Error::WalCorrupt { path: path.to_owned(), detail }),
                OnBad::Salvage => {
                    let aside = path.with_extension("wal.damaged");
                    // The copy is durable before the original is cut.
                    std::fs::copy(path, &aside)
                        .and_then(|_| File::open(&aside)?.sync_all())
                        .map_err(io(&aside))?;
                    tracing::error!(
                        file = %path.display(),
                        %detail,
                        frames_replayed = frames,
                        bytes_lost = data.len() - off,
                        kept_as = %aside.display(),
                        "salvaging a damaged WAL segment: its records after the damage are cut off, \
                         and those not yet committed to the lake are lost"
                    );
                }
            }
            f.set_len(off as u64).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            break;
        }
        off += frame.map_or(0, |(_, _, len)| len);
        frames += 1;
    }
    Ok(off as u64)
}

/// Read a segment, passing each record to `replay`, and the ids of each
/// record after `ids_through` to `ids`.
fn read_segment(
    path: &Path,
    first: u64,
    on_bad: OnBad,
    next: &mut u64,
    replay: &mut impl FnMut(u64, WalRecord) -> Result<()>,
    (ids_through, ids): (u64, &mut Vec<WrittenIds>),
) -> Result<Segment> {
    let mut seg = Segment { first, last: None, events: 0, bytes: 0, path: path.to_owned() };
    seg.bytes = read_frames(path, on_bad, |seq, payload, _| {
        let record = decode_record(payload).ok_or_else(|| Error::WalCorrupt {
            path: path.to_owned(),
            detail: format!("undecodable record {seq}"),
        })?;
        seg.events += record.events.len() as u64;
        seg.last = Some(seq);
        *next = seq + 1;
        if seq > ids_through {
            let mut one = Vec::new();
            ids_of(&record, &mut one);
            ids.push(WrittenIds { through: seq, events: record.events.len() as u64, ids: one });
        }
        replay(seq, record)
    })
    .map_err(|e| match e {
        Error::WalCorrupt { path, detail } => Error::WalCorrupt {
            detail: format!(
                "{detail}. The hub does not start without the records of a damaged segment: \
                 restore the file from a copy, or start once with wal.salvage = true \
                 (WATERSHED_WAL__SALVAGE=true) to replay its records up to the damage, keep \
                 the file as {}.damaged and cut the rest off (its records not yet committed \
                 to the lake are then lost)",
                path.display()
            ),
            path,
        },
        e => e,
    })?;
    Ok(seg)
}

/// Read an id file: its frames (as a segment's; the seq is the last
/// record's), passing each identity to `remember`. A torn tail of the
/// newest file is cut off: the segments it came from were deleted only
/// after it was fsynced, so it held nothing they needed.
fn read_ids_file(
    path: &Path,
    name: u64,
    newest: bool,
    remember: &mut impl FnMut(&str, Retired<'_>),
) -> Result<IdsFile> {
    let mut file = IdsFile { name, last: 0, events: 0, bytes: 0, path: path.to_owned() };
    let on_bad = if newest { OnBad::CutTail } else { OnBad::Fail };
    file.bytes = read_frames(path, on_bad, |last, ids, off| {
        let ok = read_ids(ids, &mut |account, r| {
            file.events += 1;
            remember(account, r);
        });
        if !ok {
            let detail = format!("undecodable ids at offset {off}");
            return Err(Error::WalCorrupt { path: path.to_owned(), detail });
        }
        file.last = last;
        Ok(())
    })?;
    Ok(file)
}

/// Append a frame of `payload` under `seq` to `out`: the inverse of
/// [`parse_frame`].
fn push_frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    out.extend_from_slice(
        &u32::try_from(payload.len()).expect("frames are capped far below 4 GiB").to_le_bytes(),
    );
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

fn parse_frame(b: &[u8]) -> Option<(u64, &[u8], usize)> {
    if b.len() < FRAME_HEADER {
        return None;
    }
    let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let payload = b.get(FRAME_HEADER..FRAME_HEADER + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[8..16]);
    h.update(payload);
    (h.finalize() == crc).then_some((seq, payload, FRAME_HEADER + len))
}

/// Write `frames` to a segment.
#[cfg(not(test))]
fn write_frames(file: &mut File, path: &Path, frames: &[u8]) -> Result<()> {
    file.write_all(frames).map_err(io(path))
}

/// [`write_frames`], failing on demand: after [`tests::tear_next_write`],
/// the next write into that directory stops after a few bytes with an
/// error, as a full disk would.
#[cfg(test)]
fn write_frames(file: &mut File, path: &Path, frames: &[u8]) -> Result<()> {
    if let Some(keep) = tests::torn_write(path) {
        file.write_all(&frames[..keep.min(frames.len())]).map_err(io(path))?;
        return Err(io(path)(std::io::Error::other("no space left on device (simulated)")));
    }
    file.write_all(frames).map_err(io(path))
}

/// Make a segment's written data durable.
#[cfg(not(test))]
fn sync_segment(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(io(path))
}

/// [`sync_segment`], failing on demand: after [`tests::fail_next_sync`],
/// the next fsync in that directory fails, as it does after a device
/// error.
#[cfg(test)]
fn sync_segment(file: &File, path: &Path) -> Result<()> {
    if tests::sync_fails(path) {
        return Err(io(path)(std::io::Error::other("input/output error (simulated)")));
    }
    file.sync_data().map_err(io(path))
}

/// Make the frames appended to an id file durable.
#[cfg(not(test))]
fn sync_ids(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(io(path))
}

/// [`sync_ids`], held up or failing on demand (`tests::hold_ids_writes`,
/// `tests::fail_ids_sync_after`), as a slow or failing disk would.
#[cfg(test)]
fn sync_ids(file: &File, path: &Path) -> Result<()> {
    tests::hold_ids_write(path);
    if tests::ids_sync_fails(path) {
        return Err(io(path)(std::io::Error::other("input/output error (simulated)")));
    }
    file.sync_data().map_err(io(path))
}

struct Writer {
    dir: PathBuf,
    opts: WalOptions,
    segments: Vec<Segment>,
    file: Option<File>,
    next: u64,
    pending: Arc<Pending>,
    size: Arc<AtomicU64>,
    before_write: Option<BeforeWrite>,
    /// The frames of a group, reused.
    frames: Vec<u8>,
    /// Why the log stopped taking records: an fsync failed (what reached
    /// the disk is unknown), or a failed write could not be cut back. It
    /// answers every later append with an error until a restart recovers
    /// from what is on disk.
    broken: Option<String>,
    /// Written records' ids and sealed, committed segments go to the
    /// retire thread.
    retire: std::sync::mpsc::Sender<RetireMsg>,
    /// The ids of the group's records written so far, sent once fsynced.
    written_ids: Vec<WrittenIds>,
}

/// The identities of the `events` events of the records up to `through`,
/// as they were written to a segment.
struct WrittenIds {
    through: u64,
    events: u64,
    ids: Vec<u8>,
}

/// What the WAL thread hands the retire thread, done in order.
enum RetireMsg {
    Ids(WrittenIds),
    /// A sealed segment whose records are all committed.
    Retire(RetireJob),
}

/// A sealed segment whose records are all committed: once the ids of its
/// events are durable in an id file, it is deleted.
struct RetireJob {
    /// Its last record (none: it held no record).
    last: Option<u64>,
    path: PathBuf,
    bytes: u64,
    /// The first record of the next segment: the oldest one on disk once
    /// this segment is deleted.
    then_oldest: u64,
}

/// The retire thread. It appends the identities of every record written
/// to the WAL to the newest id file as they come (so none is held in
/// memory while its segment waits for the lake), fsyncs that file before
/// a segment is deleted (and before a new one starts), deletes committed
/// segments, and deletes the id files the dedupe window no longer needs.
/// Messages are done in order; one that fails is retried, and later ones
/// wait for it, so a segment is never deleted before its ids are durable.
struct Retirer {
    dir: PathBuf,
    opts: WalOptions,
    /// Oldest first; the last one takes new frames until it is large.
    ids_files: Vec<IdsFile>,
    pending: Arc<Pending>,
    size: Arc<AtomicU64>,
    queue: VecDeque<RetireMsg>,
    /// The newest id file, open for appends.
    file: Option<File>,
    /// The last record whose ids are appended, and durable.
    appended_through: u64,
    durable_through: u64,
    /// Why no segment is deleted until a restart: an id file fsync
    /// failed (what reached the disk is unknown). The restart rebuilds
    /// the ids of every segment still on disk.
    broken: Option<String>,
}

/// Frames gathered for the open segment and not yet written.
#[derive(Default)]
struct Chunk {
    records: u64,
    events: u64,
    /// The records' identities.
    ids: Vec<u8>,
}

impl Writer {
    fn open_segment(&mut self) -> Result<()> {
        if let Some(s) = self.segments.last() {
            if s.bytes < self.opts.segment_bytes {
                let f = OpenOptions::new().append(true).open(&s.path).map_err(io(&s.path))?;
                self.file = Some(f);
                return Ok(());
            }
        }
        self.roll()
    }

    fn roll(&mut self) -> Result<()> {
        if let Some(f) = &self.file {
            f.sync_data().map_err(io(&self.dir))?;
        }
        self.file = None;
        let path = self.dir.join(format!("{:020}.wal", self.next));
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let f = opts.open(&path).map_err(io(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.segments.push(Segment { first: self.next, last: None, events: 0, bytes: 0, path });
        self.file = Some(f);
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch = Vec::with_capacity(256);
        let mut seals = Vec::new();
        // A `Retire` only wakes the loop: it retires after every message.
        let take = |m, batch: &mut Vec<Append>, seals: &mut Vec<oneshot::Sender<()>>| match m {
            Msg::Append(a) => batch.push(a),
            Msg::Retire => {}
            Msg::Seal(reply) => seals.push(reply),
        };
        while let Some(first) = rx.blocking_recv() {
            take(first, &mut batch, &mut seals);
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut batch, &mut seals),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let result = match self.before_write.as_mut().map_or(Ok(()), |f| f()) {
                    Ok(()) => self.write_batch(&batch).map_err(|e| Failed::Io(e.to_string())),
                    Err(e) => Err(Failed::BeforeWrite(e)),
                };
                for (i, a) in batch.drain(..).enumerate() {
                    let reply = result
                        .as_ref()
                        .map(|first| Appended { seq: first + i as u64, buffer: a.payload })
                        .map_err(Clone::clone);
                    let _ = a.reply.send(reply);
                }
            }
            // Sealed after the group: every record acknowledged before the
            // request is in a sealed segment.
            if !seals.is_empty() {
                let open = self.segments.last().is_some_and(|s| s.last.is_some());
                if open && self.broken.is_none() {
                    if let Err(e) = self.roll() {
                        tracing::error!(error = %e, "cannot seal the open WAL segment");
                        self.broken = Some(e.to_string());
                    }
                }
                for reply in seals.drain(..) {
                    let _ = reply.send(());
                }
            }
            if let Err(e) = self.retire() {
                tracing::error!(error = %e, "cannot retire committed WAL segments");
            }
            self.note_pressure();
        }
        if let Err(e) = self.retire() {
            tracing::error!(error = %e, "cannot retire committed WAL segments");
        }
        if let Some(f) = self.file.take() {
            let _ = f.sync_data();
        }
    }

    /// Write all, fsync once; returns the first seq. The group's frames
    /// are gathered in one buffer and written with one call per segment.
    ///
    /// A record is counted (its seq taken, its bytes added to the segment)
    /// only once its frame is written. A write that fails is cut back off
    /// the segment, so no torn frame is ever followed by later records
    /// (recovery would take it for the torn tail and drop them); when the
    /// cut, a roll or the fsync fails, the log is marked broken instead.
    fn write_batch(&mut self, batch: &[Append]) -> Result<u64> {
        if let Some(why) = &self.broken {
            let why =
                format!("the write-ahead log stopped after an earlier failure ({why}); restart the hub");
            return Err(Error::Io { path: self.dir.clone(), source: std::io::Error::other(why) });
        }
        let first = self.next;
        let mut frames = std::mem::take(&mut self.frames);
        frames.clear();
        let result = (|| {
            let mut chunk = Chunk::default();
            for a in batch {
                let open = self.segments.last().map_or(0, |s| s.bytes) + frames.len() as u64;
                if open >= self.opts.segment_bytes {
                    self.write_chunk(&mut frames, &mut chunk)?;
                    self.roll().inspect_err(|e| self.broken = Some(e.to_string()))?;
                }
                push_frame(&mut frames, self.next + chunk.records, &a.payload);
                chunk.records += 1;
                chunk.events += u64::from(a.events);
                chunk.ids.extend_from_slice(&a.ids);
            }
            self.write_chunk(&mut frames, &mut chunk)?;
            let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
            let synced = sync_segment(self.file.as_ref().expect("a segment is open"), &path);
            if let Err(e) = &synced {
                self.broken = Some(e.to_string());
            }
            synced
        })();
        // Kept for the next group, unless one huge group grew it.
        if frames.capacity() <= BufferPool::KEEP_BYTES {
            self.frames = frames;
        }
        if result.is_err() {
            // Whether these records reached the disk is unknown: a restart
            // finds out, and rebuilds the ids of those that did.
            self.written_ids.clear();
        }
        result?;
        // On to the id file, once durable (the id of a record a power
        // loss could still take must not be remembered: the client's
        // retry would be taken for a duplicate). A segment's ids are thus
        // not held in memory while it waits for the lake (up to a late
        // partition's roll age). A send fails only if the retire thread
        // panicked; the segment then stays, and a restart rebuilds its ids.
        for w in self.written_ids.drain(..) {
            let _ = self.retire.send(RetireMsg::Ids(w));
        }
        // Registered before the ack, so the lake cannot commit parts of a
        // record the WAL does not know is pending.
        for (i, a) in batch.iter().enumerate() {
            self.pending.register(first + i as u64, a.parts);
        }
        Ok(first)
    }

    /// Write the gathered `frames` to the open segment and count them, or
    /// cut the segment back to its last whole record.
    fn write_chunk(&mut self, frames: &mut Vec<u8>, chunk: &mut Chunk) -> Result<()> {
        let seg = self.segments.last_mut().expect("a segment is open");
        let file = self.file.as_mut().expect("a segment is open");
        let written = write_frames(file, &seg.path, frames);
        if let Err(e) = written {
            if let Err(cut) = file.set_len(seg.bytes) {
                self.broken = Some(format!("{e}; cutting the segment back failed: {cut}"));
            }
            return Err(e);
        }
        seg.bytes += frames.len() as u64;
        seg.events += chunk.events;
        if chunk.records > 0 {
            let through = self.next + chunk.records - 1;
            seg.last = Some(through);
            self.written_ids.push(WrittenIds {
                through,
                events: chunk.events,
                ids: std::mem::take(&mut chunk.ids),
            });
        }
        self.size.fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.pending.raw_bytes.fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.next += chunk.records;
        frames.clear();
        *chunk = Chunk::default();
        Ok(())
    }

    /// Retire what is committed: seal the open segment once its first
    /// record is committed, and hand the sealed segments whose records
    /// are all committed to the retire thread (which writes their ids,
    /// then deletes them).
    fn retire(&mut self) -> Result<()> {
        let watermark = self.pending.low_watermark().unwrap_or(self.next);
        // Waiting for every record of the open segment to be committed
        // would, under steady load, never happen: sealing once its first
        // one is bounds how long a raw event stays on disk to about two
        // roll ages.
        let open_started = self.segments.last().is_some_and(|s| s.last.is_some() && s.first < watermark);
        if open_started && self.broken.is_none() {
            self.roll().inspect_err(|e| self.broken = Some(e.to_string()))?;
        }
        let done = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.last.is_none_or(|l| l < watermark))
            .count();
        if done == 0 {
            return Ok(());
        }
        let then_oldest: Vec<u64> = self.segments[1..=done].iter().map(|s| s.first).collect();
        for (s, then_oldest) in self.segments.drain(..done).zip(then_oldest) {
            let job = RetireJob { last: s.last, path: s.path, bytes: s.bytes, then_oldest };
            // The retire thread outlives this one; a send fails only if
            // it panicked, and the segment then stays for the next start.
            if self.retire.send(RetireMsg::Retire(job)).is_err() {
                return Err(Error::Stopped("wal retire thread"));
            }
        }
        Ok(())
    }

    /// Publish the first record of the oldest segment.
    fn note_oldest(&self) {
        let oldest = self.segments.first().map_or(self.next, |s| s.first);
        self.pending.oldest.store(oldest, Ordering::Release);
    }

    /// Ask for early commits when the segments not yet retired hold half
    /// of [`WalOptions::max_raw_bytes`] or more: every record before
    /// the newest segments that fit in a quarter of it is to be committed
    /// (all records, if the open segment alone is over it; it is then
    /// sealed once its first record is committed). Without this a late
    /// partition, which waits `late_roll_age` to collect its trickle, would
    /// keep every newer segment on disk meanwhile.
    fn note_pressure(&self) {
        let max = self.opts.max_raw_bytes;
        let held: u64 = self.segments.iter().map(|s| s.bytes).sum();
        let before = if held < max / 2 {
            0
        } else {
            let (mut kept, mut before) = (0u64, self.next);
            for s in self.segments.iter().rev() {
                kept += s.bytes;
                if kept > max / 4 {
                    break;
                }
                before = s.first;
            }
            before
        };
        let was = self.pending.commit_before.swap(before, Ordering::Relaxed);
        if was == 0 && before > 0 {
            tracing::warn!(
                segment_bytes = held,
                max_raw_bytes = max,
                before,
                "the write-ahead log holds over half of wal.max_raw_bytes: committing the partitions \
                 that hold its oldest records before their roll age"
            );
        } else if was > 0 && before == 0 {
            tracing::info!(
                segment_bytes = held,
                "the write-ahead log is back under half of wal.max_raw_bytes"
            );
        }
    }
}

impl Retirer {
    fn run(mut self, rx: &std::sync::mpsc::Receiver<RetireMsg>) {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            // With a failed message waiting, wake to retry it.
            let next = if self.queue.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(RETIRE_RETRY)
            };
            match next {
                Ok(m) => self.queue.push_back(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.queue.extend(rx.try_iter());
            self.work();
        }
        // The WAL thread stopped: one last try, and what was appended
        // made durable.
        self.work();
        if self.queue.is_empty() {
            // Failures are logged; the next start rebuilds what is missing.
            let _ = self.sync();
        } else {
            tracing::error!(
                waiting = self.queue.len(),
                "committed WAL segments could not be retired; the next start retires them"
            );
        }
    }

    /// Do the queued messages in order, up to the first that fails
    /// (logged; it stays queued), then drop the id files no longer needed.
    fn work(&mut self) {
        if self.broken.is_some() {
            // Nothing more is deleted: the segments stay for the restart.
            self.queue.clear();
            return;
        }
        while let Some(msg) = self.queue.pop_front() {
            let failed = match msg {
                RetireMsg::Ids(w) => match self.append(&w) {
                    Ok(()) => None,
                    Err(e) => {
                        self.queue.push_front(RetireMsg::Ids(w));
                        Some(e)
                    }
                },
                RetireMsg::Retire(job) => {
                    let started = std::time::Instant::now();
                    match self.retire(&job) {
                        Ok(()) => {
                            // Only now can nothing before it be replayed.
                            self.pending.oldest.store(job.then_oldest, Ordering::Release);
                            tracing::debug!(
                                segment = %job.path.display(),
                                ms = started.elapsed().as_millis(),
                                "retired a committed WAL segment"
                            );
                            None
                        }
                        Err(e) => {
                            self.queue.push_front(RetireMsg::Retire(job));
                            Some(e)
                        }
                    }
                }
            };
            if self.broken.is_some() {
                self.queue.clear();
                return;
            }
            if let Some(e) = failed {
                tracing::error!(
                    error = %e,
                    "cannot write the WAL's id file or delete a committed segment; \
                     the segment stays on disk and this is retried"
                );
                return;
            }
        }
        if let Err(e) = self.drop_old_ids() {
            tracing::error!(error = %e, "cannot delete a WAL id file the dedupe window no longer needs");
        }
    }

    /// Append `written` to the newest id file (a new one when it is
    /// large; the old one is fsynced first), without fsync. A failed
    /// write is cut back, so later frames stay readable.
    fn append(&mut self, written: &WrittenIds) -> Result<()> {
        let WrittenIds { through, events, ref ids } = *written;
        let full = (self.opts.segment_bytes / 4).max(IDS_FILE_MIN_BYTES);
        let newest_full = self.ids_files.last().is_none_or(|f| f.bytes >= full);
        if self.file.is_none() && !newest_full {
            let f = self.ids_files.last().expect("not full, so there is one");
            self.file = Some(OpenOptions::new().append(true).open(&f.path).map_err(io(&f.path))?);
        }
        if newest_full {
            self.sync()?;
            // Names sort in the order the files were started.
            let name = self.ids_files.last().map_or(through, |f| f.name.max(through - 1) + 1);
            let path = self.dir.join(format!("{name:020}.ids"));
            let mut options = OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(&path).map_err(io(&path))?;
            // Its name is durable before any segment relies on it.
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
            self.ids_files.push(IdsFile { name, last: 0, events: 0, bytes: 0, path });
            self.file = Some(file);
        }
        let f = self.ids_files.last_mut().expect("one was just ensured");
        let file = self.file.as_mut().expect("opened above");
        let mut frame = Vec::with_capacity(FRAME_HEADER + ids.len());
        push_frame(&mut frame, through, ids);
        if let Err(e) = file.write_all(&frame) {
            let _ = file.set_len(f.bytes);
            return Err(io(&f.path)(e));
        }
        f.bytes += frame.len() as u64;
        f.last = through;
        f.events += events;
        self.size.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.appended_through = through;
        Ok(())
    }

    /// Make what was appended to the newest id file durable. Written
    /// without fsync as they come, the ids reach the disk in the
    /// background; only this fsync, before a segment is deleted, waits. If
    /// it fails, nobody knows what reached the disk: no segment is deleted
    /// until a restart, which rebuilds the ids of those still on disk.
    fn sync(&mut self) -> Result<()> {
        let (Some(file), Some(f)) = (&self.file, self.ids_files.last()) else { return Ok(()) };
        if self.appended_through <= self.durable_through {
            return Ok(());
        }
        if let Err(e) = sync_ids(file, &f.path) {
            tracing::error!(
                file = %f.path.display(),
                error = %e,
                "cannot fsync the WAL id file: committed WAL segments are kept until a restart"
            );
            self.broken = Some(e.to_string());
            return Err(e);
        }
        self.durable_through = self.appended_through;
        Ok(())
    }

    /// Make the ids of `job`'s records durable, then delete it.
    fn retire(&mut self, job: &RetireJob) -> Result<()> {
        if job.last.is_some_and(|l| l > self.durable_through) {
            self.sync()?;
        }
        match std::fs::remove_file(&job.path) {
            Ok(()) => {}
            // Deleted by an earlier try whose result was lost.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&job.path)(e)),
        }
        // The deletion is made durable before the first replayable record
        // moves past the segment (the commit log is then compacted past
        // its records): a segment that came back after a power loss would
        // be replayed into the lake again.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        self.size.fetch_sub(job.bytes, Ordering::Relaxed);
        self.pending.raw_bytes.fetch_sub(job.bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Delete the oldest id files (never the newest, which takes appends)
    /// while newer ones alone hold the dedupe window. They may also hold
    /// the ids of records still in segments; a restart rebuilds those.
    fn drop_old_ids(&mut self) -> Result<()> {
        while self.ids_files.len() > 1 {
            let newer = self.ids_files[1..].iter().map(|f| f.events).sum::<u64>();
            if newer < self.opts.retain_events {
                break;
            }
            let f = self.ids_files.remove(0);
            std::fs::remove_file(&f.path).map_err(io(&f.path))?;
            self.size.fetch_sub(f.bytes, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure to provoke once in a directory's segments.
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        /// The next write stops after so many bytes with an error.
        Tear(usize),
        /// The next fsync fails.
        Sync,
        /// The fsync of an id file after this many more fails.
        SyncIds(usize),
    }

    /// Faults waiting for their directory's next write or fsync.
    static FAULTS: Mutex<Vec<(PathBuf, Fault)>> = Mutex::new(Vec::new());

    fn inject(dir: &Path, fault: Fault) {
        FAULTS.lock().unwrap().push((dir.to_owned(), fault));
    }

    /// Take the first fault of segment `path`'s directory that `kind` picks.
    fn take(path: &Path, kind: impl Fn(Fault) -> bool) -> Option<Fault> {
        let mut faults = FAULTS.lock().unwrap();
        let i = faults.iter().position(|(dir, f)| path.parent() == Some(dir.as_path()) && kind(*f))?;
        Some(faults.swap_remove(i).1)
    }

    /// Make the next write into a segment of `dir` stop after `keep`
    /// bytes with an error.
    fn tear_next_write(dir: &Path, keep: usize) {
        inject(dir, Fault::Tear(keep));
    }

    fn fail_next_sync(dir: &Path) {
        inject(dir, Fault::Sync);
    }

    /// Make the id file fsync after `skip` more in `dir` fail.
    fn fail_ids_sync_after(dir: &Path, skip: usize) {
        inject(dir, Fault::SyncIds(skip));
    }

    /// Whether the fsync of id file `path` is to fail (once).
    pub(super) fn ids_sync_fails(path: &Path) -> bool {
        let mut faults = FAULTS.lock().unwrap();
        let Some(i) = faults
            .iter()
            .position(|(dir, f)| path.parent() == Some(dir.as_path()) && matches!(f, Fault::SyncIds(_)))
        else {
            return false;
        };
        match faults[i].1 {
            Fault::SyncIds(0) => {
                faults.swap_remove(i);
                true
            }
            Fault::SyncIds(n) => {
                faults[i].1 = Fault::SyncIds(n - 1);
                false
            }
            _ => unreachable!("picked above"),
        }
    }

    /// Directories whose id file writes are held up (a slow disk).
    static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Hold up id file writes in `dir` until [`release_ids_writes`].
    fn hold_ids_writes(dir: &Path) {
        HELD.lock().unwrap().push(dir.to_owned());
    }

    fn release_ids_writes(dir: &Path) {
        HELD.lock().unwrap().retain(|d| d != dir);
    }

    /// Wait while id file writes in `path`'s directory are held up.
    pub(super) fn hold_ids_write(path: &Path) {
        while HELD.lock().unwrap().iter().any(|d| path.parent() == Some(d.as_path())) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Whether the write to segment `path` is to be torn, and after how
    /// many bytes (once).
    pub(super) fn torn_write(path: &Path) -> Option<usize> {
        match take(path, |f| matches!(f, Fault::Tear(_)))? {
            Fault::Tear(keep) => Some(keep),
            Fault::Sync | Fault::SyncIds(_) => None,
        }
    }

    /// Whether the fsync of segment `path` is to fail (once).
    pub(super) fn sync_fails(path: &Path) -> bool {
        take(path, |f| f == Fault::Sync).is_some()
    }

    /// Options without a bound on the segments on disk.
    fn unbounded(segment_bytes: u64, retain_events: u64) -> WalOptions {
        WalOptions { segment_bytes, retain_events, salvage: false, max_raw_bytes: u64::MAX }
    }

    /// A record of one accepted event `id` of 100 bytes.
    fn record(id: &str) -> Finished {
        let mut e = RecordEncoder::new(&AccountId::new("111111111111").unwrap(), 0, None, 0);
        e.accepted(id, &[b'x'; 100]);
        e.finish()
    }

    /// Open the WAL in `dir` with no hook, ignoring what it replays.
    fn open_empty(dir: &Path, opts: WalOptions, pending: Arc<Pending>) -> Wal {
        Wal::open(dir, opts, pending, None, |_, _| Ok(()), |_, _| {}).unwrap()
    }

    /// Open the WAL in `dir` again (a restart): the log and the (seq, first
    /// event id) of every record it replayed.
    fn reopen(dir: &Path, opts: WalOptions) -> (Wal, Vec<(u64, String)>) {
        reopen_remembering(dir, opts, |_, _| {})
    }

    /// [`reopen`], passing the identities from the id files to `remember`.
    fn reopen_remembering(
        dir: &Path,
        opts: WalOptions,
        remember: impl FnMut(&str, Retired<'_>),
    ) -> (Wal, Vec<(u64, String)>) {
        let mut seen = Vec::new();
        let wal = Wal::open(
            dir,
            opts,
            Arc::new(Pending::default()),
            None,
            |seq, r| {
                seen.push((seq, r.events[0].id.clone()));
                Ok(())
            },
            remember,
        )
        .unwrap();
        (wal, seen)
    }

    /// Open the WAL in `dir` again, with every replayed record pending
    /// (one lake part each), as the hub re-buffers them.
    fn reopen_pending(dir: &Path, opts: WalOptions) -> (Wal, Arc<Pending>) {
        let pending = Arc::new(Pending::default());
        let registered = pending.clone();
        let replay = move |seq, _| {
            registered.register(seq, 1);
            Ok(())
        };
        (Wal::open(dir, opts, pending.clone(), None, replay, |_, _| {}).unwrap(), pending)
    }

    /// Open the WAL in `dir` again: the log, the accepted event ids its id
    /// files remember (in order) and the records it replayed.
    fn reopen_accepted_ids(dir: &Path, opts: WalOptions) -> (Wal, Vec<String>, Vec<(u64, String)>) {
        let mut remembered = Vec::new();
        let (wal, replayed) = reopen_remembering(dir, opts, |_, r| {
            if let Retired::Accepted(id) = r {
                remembered.push(id.to_owned());
            }
        });
        (wal, remembered, replayed)
    }

    /// After a failed fsync nobody knows what reached the disk, so the log
    /// refuses every later append (nothing more is acknowledged) until a
    /// restart recovers from what is on disk; then it takes records again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_stops_the_log_until_restart() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 0);
        let wal = open_empty(dir.path(), opts, Arc::default());
        assert_eq!(wal.append(record("a"), 1, 1).await.unwrap().seq, 1);
        fail_next_sync(dir.path());
        let e = wal.append(record("b"), 1, 1).await.unwrap_err().to_string();
        assert!(e.contains("input/output error"), "{e}");
        let e = wal.append(record("c"), 1, 1).await.unwrap_err().to_string();
        assert!(e.contains("stopped after an earlier failure") && e.contains("restart"), "{e}");
        wal.close().await;
        // The restart replays what is on disk: the acknowledged "a", and
        // "b", whose frame is whole (its client got an error and retries;
        // the dedupe window keeps the retry from storing it twice).
        let (wal, seen) = reopen(dir.path(), opts);
        assert_eq!(seen, [(1, "a".to_owned()), (2, "b".to_owned())]);
        assert_eq!(wal.append(record("d"), 1, 1).await.unwrap().seq, 3, "appends again after the restart");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_is_cut_back_and_later_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 0);
        let wal = open_empty(dir.path(), opts, Arc::default());
        assert_eq!(wal.append(record("a"), 1, 1).await.unwrap().seq, 1);
        tear_next_write(dir.path(), 10);
        assert!(wal.append(record("b"), 1, 1).await.is_err(), "the torn write fails its group");
        // The log goes on, with the failed record's seq unused.
        assert_eq!(wal.append(record("c"), 1, 1).await.unwrap().seq, 2);
        wal.close().await;
        let (_, seen) = reopen(dir.path(), opts);
        assert_eq!(
            seen,
            [(1, "a".to_owned()), (2, "c".to_owned())],
            "no torn frame hides an acknowledged record"
        );
    }

    /// Once its records are committed, a segment is gone: only the ids of
    /// its events stay (in id files), as long as the dedupe window needs
    /// them, and they come back on a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_records_leave_only_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(4096, 40);
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        let a = AccountId::new("111111111111").unwrap();
        let mut e = RecordEncoder::new(&a, 0, None, 0);
        e.accepted("ok-1", b"{\"pan\":\"SECRET-4111\"}");
        e.rejected("bad-1", "bad_enum", "$.detail.e", "the value is not one of A", b"SECRET-bad");
        e.rejected("", "malformed_json", "$", "expected a value", b"SECRET-{");
        assert_eq!(wal.append(e.finish(), 3, 1).await.unwrap().seq, 1);
        let secret_on_disk = || {
            std::fs::read_dir(dir.path()).unwrap().any(|f| {
                let bytes = std::fs::read(f.unwrap().path()).unwrap();
                bytes.windows(6).any(|w| w == b"SECRET")
                    || zstd::stream::decode_all(&bytes[FRAME_HEADER.min(bytes.len())..])
                        .is_ok_and(|d| d.windows(6).any(|w| w == b"SECRET"))
            })
        };
        assert!(secret_on_disk(), "the record is in its segment until committed");
        pending.committed(&[1]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while secret_on_disk() {
            assert!(std::time::Instant::now() < deadline, "the committed record stayed on disk");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // More records, each committed at once: the oldest id files go once
        // newer events alone fill the window of 40.
        for i in 2..=200u64 {
            assert_eq!(wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap().seq, i);
            pending.committed(&[i]);
        }
        wal.close().await;
        let mut remembered = Vec::new();
        let (wal, replayed) = reopen_remembering(dir.path(), opts, |_, r| {
            remembered.push(match r {
                Retired::Accepted(id) | Retired::Rejected(id) => id.to_owned(),
                Retired::RejectedBytes(d) => {
                    assert_eq!(*d, crate::dedupe::raw_digest(b"SECRET-{"));
                    "digest".to_owned()
                }
            });
        });
        assert_eq!(replayed.len(), 0, "everything was committed");
        assert!(remembered.len() >= 40, "the window is kept: {remembered:?}");
        assert!(remembered.len() < 120, "the oldest ids were deleted: {remembered:?}");
        assert!(!remembered.contains(&"ok-1".to_owned()), "{remembered:?}");
        let newest: Vec<String> = (161..=200).map(|i| format!("id-{i}")).collect();
        assert!(newest.iter().all(|id| remembered.contains(id)), "{remembered:?}");
        assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 201, "seqs go on after the id files");
    }

    /// Flip a byte in the middle of the oldest of the (at least two)
    /// `*.<ext>` files in `dir`, as bad blocks would; returns the files,
    /// oldest first, and the damaged file's new bytes.
    fn damage_the_oldest(dir: &Path, ext: &str) -> (Vec<PathBuf>, Vec<u8>) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        files.sort();
        assert!(files.len() >= 2, "{files:?}");
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&files[0], &bytes).unwrap();
        (files, bytes)
    }

    /// Damage to a segment other than the newest (whose torn tail is cut
    /// off) stops the start with an error that names the file, where the
    /// damage is, and what the operator can do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_segment_stops_the_start_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(4096, 0);
        let wal = open_empty(dir.path(), opts, Arc::default());
        for i in 1..=100u64 {
            wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap();
        }
        wal.close().await;
        let (segs, damaged) = damage_the_oldest(dir.path(), "wal");
        let Err(e) =
            Wal::open(dir.path(), opts, Arc::new(Pending::default()), None, |_, _| Ok(()), |_, _| {})
        else {
            panic!("a damaged segment did not stop the start");
        };
        let e = e.to_string();
        let name = segs[0].file_name().unwrap().to_str().unwrap();
        for part in
            [name, "bad frame at offset", "readable frames", "restore the file", "WATERSHED_WAL__SALVAGE"]
        {
            assert!(e.contains(part), "{part:?} not in: {e}");
        }
        assert_eq!(std::fs::read(&segs[0]).unwrap(), damaged, "a failed start changes nothing");

        // Salvaged: the records before the damage and every later segment
        // replay once, the damaged file is kept aside, and the log goes on.
        let (wal, seen) = reopen(dir.path(), WalOptions { salvage: true, ..opts });
        let ids: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
        assert!(ids.contains(&"id-1") && ids.contains(&"id-100"), "{ids:?}");
        assert!(ids.len() < 100, "the records after the damage are cut off: {ids:?}");
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "a record replayed twice");
        assert_eq!(std::fs::read(segs[0].with_extension("wal.damaged")).unwrap(), damaged);
        assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 101);
        wal.close().await;
        // The segment now ends where the damage was: no salvage needed.
        let (_, again) = reopen(dir.path(), opts);
        assert!(again.iter().all(|(_, id)| id == "next" || ids.contains(&id.as_str())), "{again:?}");
    }

    /// A damaged id file (not the newest, whose torn tail is cut off) does
    /// not stop the start: the ids before the damage and those of the other
    /// files are remembered, the file is kept aside, and the log goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_id_file_is_set_aside_and_the_log_starts() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(4096, 1000);
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        for i in 1..=200u64 {
            assert_eq!(wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap().seq, i);
            pending.committed(&[i]);
        }
        wal.close().await;
        let (ids, _) = damage_the_oldest(dir.path(), "ids");
        let mut remembered = Vec::new();
        // (`reopen_remembering` fails the test if the start fails.)
        let (wal, _) = reopen_remembering(dir.path(), opts, |_, r| {
            if let Retired::Accepted(id) = r {
                remembered.push(id.to_owned());
            }
        });
        assert!(remembered.contains(&"id-1".to_owned()), "the ids before the damage are kept");
        assert!(remembered.contains(&"id-200".to_owned()), "the other files are read");
        assert!(remembered.len() < 200, "the damaged file's tail is not read");
        assert!(!ids[0].exists());
        assert!(ids[0].with_extension("ids.damaged").exists(), "the damaged file is kept aside");
        assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 201);
    }

    /// Under steady load the open segment is never wholly committed: it is
    /// sealed once its first record is, and retired once its last is. A
    /// seal on request puts every acknowledged record in a sealed segment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_seal_once_their_first_record_is_committed_and_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 0);
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        let wait_for = |want: &[&str]| {
            let what = format!("segments {want:?}");
            wait_until(&what, || segment_names(dir.path()) == want);
        };
        for i in 1..=3 {
            wal.append(record(&format!("r{i}")), 1, 1).await.unwrap();
        }
        wait_for(&[&seg(1)]);
        assert_eq!(pending.oldest_segment(), 1, "what a restart could replay starts there");
        // The first record is committed, the later ones not: sealed, kept.
        pending.committed(&[1]);
        wait_for(&[&seg(1), &seg(4)]);
        wal.append(record("r4"), 1, 1).await.unwrap();
        pending.committed(&[2, 3]);
        wait_for(&[&seg(4)]);
        // Sealed on request while r4 is pending; gone once it is committed.
        wal.downgrade().seal().await.unwrap();
        wait_for(&[&seg(4), &seg(5)]);
        pending.committed(&[4]);
        wait_for(&[&seg(5)]);
        // Moved just after the deletion is durable.
        wait_until("the oldest replayable record moved", || pending.oldest_segment() == 5);
        drop(wal);
    }

    /// The name of the segment whose first record is `first`.
    fn seg(first: u64) -> String {
        format!("{first:020}.wal")
    }

    /// The `.wal` files in `dir`, by name.
    fn segment_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".wal"))
            .collect();
        v.sort();
        v
    }

    /// Wait (up to 5 s) until `done`.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "still waiting: {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A WAL's identity is made once and kept; another directory gets
    /// another; a damaged one stops the start rather than renaming files.
    #[test]
    fn the_identity_is_made_once_and_kept() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let id = identity(a.path()).unwrap();
        assert_eq!(id.len(), 16);
        assert_eq!(identity(a.path()).unwrap(), id, "kept");
        assert_ne!(identity(b.path()).unwrap(), id, "one per directory");
        std::fs::write(a.path().join("log.id"), "zz\n").unwrap();
        let e = identity(a.path()).unwrap_err().to_string();
        assert!(e.contains("log.id") && e.contains("not a WAL identity"), "{e}");
    }

    /// Segments retire in order, so a record the lake keeps open (a late
    /// partition's) holds every newer segment on disk. From half of
    /// `max_raw_bytes` the WAL asks for every record before its newest
    /// quarter's worth of segments to be committed, on a restart too;
    /// once they are, the segments go and it asks for nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_half_its_bound_the_wal_asks_for_its_oldest_records() {
        let dir = tempfile::tempdir().unwrap();
        let max = 32 << 10;
        let opts = WalOptions { max_raw_bytes: max, ..unbounded(4096, 0) };
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        let sizes = || -> Vec<(u64, u64)> {
            segment_names(dir.path())
                .iter()
                .map(|n| {
                    let first = n.strip_suffix(".wal").unwrap().parse().unwrap();
                    (first, std::fs::metadata(dir.path().join(n)).unwrap().len())
                })
                .collect()
        };
        let on_disk = || sizes().iter().map(|s| s.1).sum::<u64>();
        // Record 1 stays pending; every later one is committed at once.
        let mut n = 0u64;
        while on_disk() < max / 2 {
            assert_eq!(pending.commit_before(), 0, "nothing is asked below half the bound");
            n = wal.append(record(&format!("e{n}")), 1, 1).await.unwrap().seq;
            if n > 1 {
                pending.committed(&[n]);
            }
        }
        wait_until("asked for the oldest records", || pending.commit_before() > 0);
        assert_eq!(pending.raw_bytes(), on_disk());
        let asked = |before: u64| {
            let s = sizes();
            let kept: u64 = s.iter().filter(|x| x.0 >= before).map(|x| x.1).sum();
            let older = s.iter().rev().find(|x| x.0 < before).map_or(0, |x| x.1);
            assert!(kept <= max / 4 && kept + older > max / 4, "before {before}: {s:?}");
            assert!(s.iter().any(|x| x.0 == before), "the first record of a segment: {s:?}");
        };
        asked(pending.commit_before());
        wal.close().await;

        // A restart with the records replayed and pending asks at once.
        let (wal, pending) = reopen_pending(dir.path(), opts);
        assert_eq!(pending.raw_bytes(), on_disk());
        let before = pending.commit_before();
        asked(before);
        let records: Vec<u64> = (1..before).collect();
        pending.committed(&records);
        wait_until("the committed segments retired", || pending.raw_bytes() <= max / 4);
        wait_until("nothing asked any more", || pending.commit_before() == 0);
        assert_eq!(pending.raw_bytes(), on_disk());
        assert!(sizes()[0].0 >= before, "{:?}", sizes());
        wal.close().await;
    }

    /// A retiring segment's ids are tens of megabytes under load: while
    /// their write is held up (a slow disk), appends are still written
    /// and acknowledged, the segment stays until its ids are durable, and
    /// the oldest replayable record moves only once it is deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_id_file_write_holds_up_no_append() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 1000);
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        assert_eq!(wal.append(record("r1"), 1, 1).await.unwrap().seq, 1);
        hold_ids_writes(dir.path());
        // Committed: sealed, and handed over to be retired.
        pending.committed(&[1]);
        wait_until("segment 1 sealed", || segment_names(dir.path()) == [seg(1), seg(2)]);
        for i in 2..=20u64 {
            let appended = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                wal.append(record(&format!("r{i}")), 1, 1),
            )
            .await
            .expect("an append is acknowledged while a retirement waits for the disk");
            assert_eq!(appended.unwrap().seq, i);
        }
        assert_eq!(segment_names(dir.path()), [seg(1), seg(2)], "kept until its ids are durable");
        assert_eq!(pending.oldest_segment(), 1, "its records could still be replayed");
        release_ids_writes(dir.path());
        wait_until("segment 1 retired", || segment_names(dir.path()) == [seg(2)]);
        assert_eq!(pending.oldest_segment(), 2);
        wal.close().await;
        let (_, remembered, replayed) = reopen_accepted_ids(dir.path(), opts);
        // Every acknowledged record's id is in the id files (those still
        // in a segment as well, written ahead), each once.
        let want: Vec<String> = (1..=20).map(|i| format!("r{i}")).collect();
        assert_eq!(remembered, want);
        assert_eq!(replayed.len(), 19, "the uncommitted records are replayed: {replayed:?}");
    }

    /// After an id file fsync fails nobody knows what reached the disk:
    /// no committed segment is deleted until a restart (appends go on),
    /// which keeps every id once and then retires them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_id_file_fsync_keeps_the_segments_until_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 1000);
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        for i in 1..=3u64 {
            assert_eq!(wal.append(record(&format!("r{i}")), 1, 1).await.unwrap().seq, i);
        }
        fail_ids_sync_after(dir.path(), 0);
        pending.committed(&[1, 2, 3]);
        let fault_taken = || !FAULTS.lock().unwrap().iter().any(|(d, _)| d == dir.path());
        wait_until("the id file fsync tried", fault_taken);
        assert_eq!(wal.append(record("r4"), 1, 1).await.unwrap().seq, 4, "appends go on");
        pending.committed(&[4]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(segment_names(dir.path()).contains(&seg(1)), "kept: {:?}", segment_names(dir.path()));
        wal.close().await;
        // The restart retires them once committed; every id is kept once.
        let (wal, pending) = reopen_pending(dir.path(), opts);
        pending.committed(&[1, 2, 3, 4]);
        wait_until("retired after the restart", || !segment_names(dir.path()).contains(&seg(1)));
        wal.close().await;
        let (wal, remembered, replayed) = reopen_accepted_ids(dir.path(), opts);
        assert_eq!(remembered, ["r1", "r2", "r3", "r4"], "every id once");
        assert!(replayed.is_empty(), "{replayed:?}");
        assert_eq!(wal.append(record("r5"), 1, 1).await.unwrap().seq, 5);
    }

    /// Ids the id files lost (a torn tail) are rebuilt at the start from
    /// the segments still on disk, before those can be deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ids_missing_from_the_id_files_are_rebuilt_from_the_segments() {
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 1000);
        let wal = open_empty(dir.path(), opts, Arc::default());
        for i in 1..=3u64 {
            wal.append(record(&format!("r{i}")), 1, 1).await.unwrap();
        }
        wal.close().await;
        for p in std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()) {
            if p.extension().is_some_and(|e| e == "ids") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let (wal, pending) = reopen_pending(dir.path(), opts);
        pending.committed(&[1, 2, 3]);
        wait_until("the replayed segment retired", || !segment_names(dir.path()).contains(&seg(1)));
        wal.close().await;
        let (_, remembered, _) = reopen_accepted_ids(dir.path(), opts);
        assert_eq!(remembered, ["r1", "r2", "r3"]);
    }

    #[test]
    fn id_files_round_trip_every_kind_of_identity() {
        let a = AccountId::new("111111111111").unwrap();
        let mut e = RecordEncoder::new(&a, 0, None, 0);
        e.accepted("ok-1", b"{}");
        e.rejected("bad-1", "bad_enum", "$", "", b"{}");
        e.rejected("", "malformed_json", "$", "", b"{");
        let f = e.finish();
        let mut from_record = Vec::new();
        ids_of(&decode_record(&f.payload).unwrap(), &mut from_record);
        assert_eq!(from_record, f.ids, "recovery rebuilds the identities the encoder made");
        let mut got = Vec::new();
        assert!(read_ids(&f.ids, &mut |acct, r| got.push(format!("{acct} {r:?}"))));
        let digest = crate::dedupe::raw_digest(b"{");
        assert_eq!(
            got,
            [
                "111111111111 Accepted(\"ok-1\")".to_owned(),
                "111111111111 Rejected(\"bad-1\")".to_owned(),
                format!("111111111111 {:?}", Retired::RejectedBytes(&digest)),
            ]
        );
        assert!(!read_ids(&f.ids[..f.ids.len() - 1], &mut |_, _| {}), "a cut record does not parse");
    }

    #[test]
    fn records_round_trip() {
        let a = AccountId::new("111111111111").unwrap();
        let mut e = RecordEncoder::new(&a, 42, Some("col-1"), 0);
        e.accepted("id-1", b"{\"x\":1}");
        e.rejected("id-2", "bad_enum", "$.detail.e", "the value is not one of A", b"{}");
        let r = decode_record(&e.finish().payload).unwrap();
        assert_eq!(r.account, a);
        assert_eq!((r.received_at, r.collector.as_deref()), (42, Some("col-1")));
        assert_eq!(r.events[0], WalEvent { rejected: None, id: "id-1".into(), raw: b"{\"x\":1}".to_vec() });
        assert_eq!(r.events[1].rejected.as_ref().unwrap().0, "bad_enum");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_recovery_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let opts = unbounded(256, 1000);
        let pending = Arc::new(Pending::default());
        let wal = open_empty(dir.path(), opts, pending.clone());
        let mut handles = Vec::new();
        for i in 0..20 {
            let wal = wal.clone();
            let a = a.clone();
            handles.push(tokio::spawn(async move {
                let mut e = RecordEncoder::new(&a, i, None, 0);
                e.accepted(&format!("id-{i}"), &[b'x'; 100]);
                wal.append(e.finish(), 1, 1).await.unwrap().seq
            }));
        }
        let mut seqs: Vec<u64> = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        assert_eq!(pending.len(), 20);
        pending.committed(&(1..=10).collect::<Vec<_>>());
        wal.close().await;
        // Tear the tail of the newest segment.
        let mut segs: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let len = std::fs::metadata(last).unwrap().len();
        OpenOptions::new().write(true).open(last).unwrap().set_len(len - 3).unwrap();
        let mut remembered = Vec::new();
        let (wal, seen) = reopen_remembering(dir.path(), opts, |account, r| {
            remembered.push((account.to_owned(), format!("{r:?}")));
        });
        // Segments whose records were all committed were retired; every
        // uncommitted record but the torn one replays. Every record's id
        // went to the id files once it was fsynced.
        assert!(seen.len() < 19, "committed segments retired: {seen:?}");
        let seen_seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
        assert!((11..=19).all(|s| seen_seqs.contains(&s)), "the uncommitted records replay: {seen_seqs:?}");
        assert!(!seen_seqs.contains(&20), "the torn record is dropped");
        assert_eq!(remembered.len(), 20, "{remembered:?}");
        assert!(remembered.iter().all(|(account, r)| account == "111111111111" && r.starts_with("Accepted")));
        let next = wal.append(RecordEncoder::new(&a, 0, None, 0).finish(), 0, 0).await.unwrap().seq;
        assert_eq!(next, 20, "seqs continue after the torn record");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_before_write_hook_fails_its_group_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let opts = unbounded(1 << 20, 0);
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        // The hook fails on its second call only.
        let hook: BeforeWrite = Box::new(move || match counted.fetch_add(1, Ordering::SeqCst) {
            1 => Err("cannot store new protection keys: disk full".into()),
            _ => Ok(()),
        });
        let wal =
            Wal::open(dir.path(), opts, Arc::new(Pending::default()), Some(hook), |_, _| Ok(()), |_, _| {})
                .unwrap();
        let record = |id: &str| {
            let mut e = RecordEncoder::new(&a, 0, None, 0);
            e.accepted(id, b"{}");
            e.finish()
        };
        assert_eq!(wal.append(record("id-1"), 1, 1).await.unwrap().seq, 1);
        let err = wal.append(record("id-2"), 1, 1).await.unwrap_err();
        assert!(
            matches!(&err, Error::BeforeWal(m) if m == "cannot store new protection keys: disk full"),
            "{err:?}"
        );
        assert_eq!(wal.append(record("id-3"), 1, 1).await.unwrap().seq, 2, "the failed record took no seq");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "once per group");
        wal.close().await;
        let (_, seen) = reopen(dir.path(), opts);
        assert_eq!(seen, vec![(1, "id-1".to_string()), (2, "id-3".to_string())]);
    }

    #[test]
    fn buffers_are_kept_within_bounds_and_records_survive_reuse() {
        let pool = BufferPool::default();
        let a = AccountId::new("111111111111").unwrap();
        // A record finished in a reused buffer decodes like a fresh one.
        for round in 0..3 {
            let mut e = RecordEncoder::in_buffer(pool.take(1 << 10), &a, round, None);
            e.accepted(&format!("id-{round}"), b"{\"x\":1}");
            let payload = e.finish_pooled(&pool).payload;
            let r = decode_record(&payload).unwrap();
            assert_eq!((r.received_at, r.events[0].id.as_str()), (round, format!("id-{round}").as_str()));
            pool.give(payload);
        }
        let kept = pool.bufs.lock().unwrap().len();
        assert!((1..=2).contains(&kept), "the record's and the payload's buffers are reused: {kept}");
        // Large buffers are dropped; at most KEEP are kept.
        pool.give(Vec::with_capacity(BufferPool::KEEP_BYTES + 1));
        for _ in 0..2 * BufferPool::KEEP {
            pool.give(Vec::with_capacity(4096));
        }
        let bufs = pool.bufs.lock().unwrap();
        assert_eq!(bufs.len(), BufferPool::KEEP);
        assert!(bufs.iter().all(|b| b.capacity() <= BufferPool::KEEP_BYTES && b.is_empty()));
    }
}
