//! WAL records: the bytes of one request's outcome, and the dedupe
//! identities of its events kept when it retires.

use std::sync::Mutex;

use watershed_event::{AccountId, TimestampMicros};

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

/// A finished record: what [`Wal::append`](super::Wal::append) writes.
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
pub(super) fn ids_start(ids: &mut Vec<u8>, account: &str) {
    ids.clear();
    put_str16(ids, account);
    ids.extend_from_slice(&0u32.to_le_bytes());
}

pub(super) fn ids_push(ids: &mut Vec<u8>, r: Retired<'_>) {
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

pub(super) fn ids_done(ids: &mut [u8], count: u32) {
    let at = 2 + usize::from(u16::from_le_bytes([ids[0], ids[1]]));
    ids[at..at + 4].copy_from_slice(&count.to_le_bytes());
}

/// Push the identity a refused event is deduplicated by (as
/// [`crate::dedupe::Dedupe::dead_key`]).
pub(super) fn push_refused(ids: &mut Vec<u8>, id: &str, raw: &[u8]) {
    if id.is_empty() {
        ids_push(ids, Retired::RejectedBytes(&crate::dedupe::raw_digest(raw)));
    } else {
        ids_push(ids, Retired::Rejected(id));
    }
}

/// Call `f` with the account and identity of every event in `ids` (the
/// identities of one or more records). False when they do not parse.
pub(super) fn read_ids(ids: &[u8], f: &mut impl FnMut(&str, Retired<'_>)) -> bool {
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

/// Put `s` with a 16-bit length: its first 65,534 bytes at most, cut at a
/// character boundary so what is read back is still text (an event id is
/// far shorter; a violation's path, which names the event's own keys,
/// might not be).
pub(super) fn put_str16(buf: &mut Vec<u8>, s: &str) {
    let b = watershed_event::prefix_within(s, u16::MAX as usize - 1).as_bytes();
    buf.extend_from_slice(&u16::try_from(b.len()).expect("capped").to_le_bytes());
    buf.extend_from_slice(b);
}

pub(super) fn put_bytes32(buf: &mut Vec<u8>, b: &[u8]) {
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
    pub(super) bufs: Mutex<Vec<Vec<u8>>>,
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

pub(super) struct Cursor<'a>(&'a [u8]);

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
pub(super) const WAL_ZSTD_LEVEL: i32 = -5;

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
pub(super) fn ids_of(record: &WalRecord, ids: &mut Vec<u8>) {
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
