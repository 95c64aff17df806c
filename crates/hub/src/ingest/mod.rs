//! Turning a request's events into lake rows, dead letters and a WAL
//! record: decode the envelope, bind the account to the credential, check
//! the dedupe window, validate against the registry, protect, and route to
//! a partition. Each event is judged alone; one bad event never fails its
//! neighbours, and every reject becomes a dead-letter row.

use std::sync::Arc;

use arrow::array::RecordBatch;
use serde::Serialize;
use watershed_event::{parse_rfc3339_micros, AccountId, Reason, TimestampMicros};
use watershed_lake::{
    DeadLetter, DeadLetterBuilder, EventMeta, PartitionKey, TableBuilder, TableLayout, DEAD_LETTERS,
};
use watershed_protect::{BatchProtector, Keyring, Noted};
use watershed_schema::{
    validate_append, validate_json_append, Limits, Registry, Slot, SubjectEntry, Tape, Version, Violation,
};

use crate::dedupe::Dedupe;
use crate::envelope;
use crate::metrics::{AccountLabel, Metrics, RejectLabel};
use crate::wal::{BufferPool, Finished, RecordEncoder};

mod replay;

/// One rejected event in a response.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// Its position in the request.
    pub index: usize,
    /// Its id, when readable.
    pub id: Option<String>,
    /// The reason code.
    pub reason: &'static str,
    /// JSONPath of the problem.
    pub path: String,
    /// What was wrong.
    pub detail: String,
}

/// The per-event outcome of a request.
#[derive(Debug, Default, Serialize)]
pub struct IngestResponse {
    /// Events stored (durably, when this is sent).
    pub accepted: usize,
    /// Redeliveries of events already stored; not stored again.
    pub duplicates: usize,
    /// Events refused, each also stored as a dead letter.
    pub rejected: Vec<Rejection>,
}

/// A processed request, ready for the WAL and the lake.
#[derive(Debug)]
pub struct Processed {
    /// The response to send after the WAL write.
    pub response: IngestResponse,
    /// The WAL record, compressed (none when nothing needs storing).
    pub wal: Option<WalPayload>,
    /// Rows per partition.
    pub parts: Vec<(PartitionKey, RecordBatch)>,
    /// Dedupe keys claimed (released if the WAL write fails).
    pub claimed: Vec<crate::dedupe::Key>,
}

/// A request's WAL record, ready for [`crate::wal::Wal::append`].
#[derive(Debug)]
pub struct WalPayload {
    /// The record; give its payload's buffer back with
    /// [`Ingestor::reuse`] once written.
    pub record: Finished,
    /// Events in it.
    pub events: u32,
}

/// How a dead letter's `raw` column holds the refused event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterRaw {
    /// A `wse1.` ciphertext under the event's data-subject key when its
    /// subject can be read, else under the account's key: a refused event's
    /// sensitive fields are never stored in plaintext, are read through
    /// audited decryption, and are erased with their subject.
    #[default]
    Encrypt,
    /// The event as received, in plaintext. Only for lakes whose
    /// `_dead_letters` table is guarded like the producers' raw data.
    Plain,
}

/// The hub's per-event pipeline, shared by HTTP ingest and WAL replay.
pub struct Ingestor {
    pub(crate) registry: Arc<Registry>,
    layouts: Vec<Arc<TableLayout>>,
    keyring: Arc<dyn Keyring>,
    pub(crate) dedupe: Arc<Dedupe>,
    limits: Limits,
    raw: DeadLetterRaw,
    /// Furthest an event's time may be ahead of its receipt, µs.
    max_future: i64,
    /// Furthest an event's time may be before its receipt, µs (`None`: no
    /// bound).
    max_past: Option<i64>,
    pub(crate) metrics: Arc<Metrics>,
    /// Tapes of finished requests, kept for their buffers.
    tapes: std::sync::Mutex<Vec<Tape>>,
    /// WAL record buffers, kept for reuse.
    buffers: BufferPool,
}

impl std::fmt::Debug for Ingestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingestor").field("tables", &self.layouts.len()).finish_non_exhaustive()
    }
}

enum Builder {
    Table(Box<TableBuilder>),
    Dead(Box<DeadLetterBuilder>),
}

/// Who sent a request, through which collector, and when it arrived.
type At<'a> = (&'a AccountId, Option<&'a str>, TimestampMicros);

/// What a request produced so far besides rows.
struct Outcome {
    wal: RecordEncoder,
    response: IngestResponse,
    claimed: Vec<crate::dedupe::Key>,
}

/// An event that passed validation: its envelope, route, and the root of
/// its values in the batch's tape.
struct Valid<'r, 'g> {
    raw: &'r [u8],
    env: envelope::Envelope<'r>,
    si: usize,
    subject: &'g SubjectEntry,
    version: &'g Version,
    event_time: TimestampMicros,
    root: Slot,
    noted: Noted,
}

impl Valid<'_, '_> {
    /// The partition it goes to among a request's: its schema and hour.
    fn partition(&self) -> (usize, i64) {
        (self.si, self.event_time.div_euclid(HOUR_MICROS))
    }
}

/// How far ahead of its receipt an event's time may be, by default: a day
/// (`limits.max_future_secs`).
pub const DEFAULT_MAX_FUTURE_SECS: u64 = 86_400;

/// The late-event threshold for the `events_late` metric.
const LATE_MICROS: i64 = 3_600_000_000;

struct Batch<'k> {
    tape: Tape,
    protector: BatchProtector<'k>,
    /// Builders by (table index, or `usize::MAX` for dead letters; UTC
    /// hour since the epoch). The account is the request's, so this is the
    /// partition, found without building its path per event.
    builders: Builders,
}

/// The partitions of one request: few, so found by a linear scan rather
/// than hashed per event.
#[derive(Default)]
struct Builders(Vec<((usize, i64), PartitionKey, Builder)>);

impl Builders {
    fn get_or_insert(
        &mut self,
        key: (usize, i64),
        new: impl FnOnce() -> (PartitionKey, Builder),
    ) -> &mut Builder {
        let i = match self.0.iter().position(|(k, _, _)| *k == key) {
            Some(i) => i,
            None => {
                let (p, b) = new();
                self.0.push((key, p, b));
                self.0.len() - 1
            }
        };
        &mut self.0[i].2
    }
}

const HOUR_MICROS: i64 = 3_600_000_000;

/// The most rows a partition's builders make room for up front.
const MAX_ROOM: usize = 4096;

/// How many events go to each (schema, hour) partition, from their keys
/// ([`Valid::partition`]).
fn partition_counts(keys: impl Iterator<Item = (usize, i64)>) -> Vec<((usize, i64), usize)> {
    let mut counts: Vec<((usize, i64), usize)> = Vec::new();
    for key in keys {
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
    }
    counts
}

/// The count of `key` in [`partition_counts`]' answer (1 when absent).
fn count_of(counts: &[((usize, i64), usize)], key: (usize, i64)) -> usize {
    counts.iter().find(|(k, _)| *k == key).map_or(1, |(_, n)| *n)
}

/// Events per chunk of a request's passes: about 100 KB of JSON and as
/// much decoded, which stays in a core's L2 cache between the passes,
/// while one key fetch still covers enough subjects for their cache
/// misses to overlap.
const CHUNK_EVENTS: usize = 128;
const DEAD: usize = usize::MAX;

impl Ingestor {
    /// A pipeline over `registry` and `keyring`.
    #[must_use]
    pub fn new(
        registry: Arc<Registry>,
        keyring: Arc<dyn Keyring>,
        dedupe: Arc<Dedupe>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let layouts = registry.subjects().iter().map(TableLayout::new).collect();
        Self {
            registry,
            layouts,
            keyring,
            dedupe,
            limits,
            raw: DeadLetterRaw::default(),
            max_future: i64::try_from(DEFAULT_MAX_FUTURE_SECS * 1_000_000).expect("a day in µs"),
            max_past: None,
            metrics,
            tapes: std::sync::Mutex::default(),
            buffers: BufferPool::default(),
        }
    }

    /// Store dead letters' raw events as `raw` says (encrypted by default).
    #[must_use]
    pub fn with_dead_letter_raw(mut self, raw: DeadLetterRaw) -> Self {
        self.raw = raw;
        self
    }

    /// Reject events whose time is more than `ahead` after their receipt
    /// (`future_time`; a day by default). Replay does not check: what was
    /// accepted stays accepted.
    #[must_use]
    pub fn with_max_future(mut self, ahead: std::time::Duration) -> Self {
        self.max_future = i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX);
        self
    }

    /// Reject events whose time is more than `back` before their receipt
    /// (`past_time`; `None`, the default: no bound). Replay does not
    /// check: what was accepted stays accepted.
    #[must_use]
    pub fn with_max_past(mut self, back: Option<std::time::Duration>) -> Self {
        self.max_past = back.map(|b| i64::try_from(b.as_micros()).unwrap_or(i64::MAX));
        self
    }

    /// Process a request's events for `account`.
    ///
    /// Three passes over each chunk of 128 events: every
    /// event is decoded and validated into one tape; the data-subject keys
    /// of the valid ones are fetched in one call to the keyring; then each
    /// is protected, checked against the dedupe window, logged and added
    /// to its partition's rows, in request order.
    ///
    /// # Errors
    /// When a refused event's raw bytes cannot be encrypted for its dead
    /// letter (the keyring failed). Nothing of the request is kept then:
    /// its dedupe claims are released, and the client should retry.
    pub fn process(
        &self,
        account: &AccountId,
        collector: Option<&str>,
        received_at: TimestampMicros,
        events: &[&[u8]],
    ) -> Result<Processed, watershed_protect::Error> {
        let mut batch = Batch {
            tape: self.tape(),
            protector: BatchProtector::new(&*self.keyring),
            builders: Builders::default(),
        };
        // Each event's bytes plus its framing and id (a uuid is 36 bytes).
        let size: usize = events.iter().map(|e| e.len() + 48).sum();
        let mut out = Outcome {
            wal: RecordEncoder::in_buffer(self.buffers.take(size + 256), account, received_at, collector),
            response: IngestResponse::default(),
            claimed: Vec::new(),
        };
        let passes = self.passes((account, collector, received_at), events, &mut batch, &mut out);
        self.give_back(batch.tape);
        let Outcome { wal, response, claimed } = out;
        if let Err(e) = passes {
            self.dedupe.release(&claimed);
            self.buffers.give(wal.into_buffer());
            return Err(e);
        }
        let label = AccountLabel { account: account.to_string() };
        self.metrics.accepted.get_or_create(&label).inc_by(response.accepted as u64);
        if response.duplicates > 0 {
            self.metrics.duplicates.get_or_create(&label).inc_by(response.duplicates as u64);
        }
        for r in &response.rejected {
            let label = RejectLabel { account: label.account.clone(), reason: r.reason.into() };
            self.metrics.rejected.get_or_create(&label).inc();
        }
        let wal = if wal.is_empty() {
            self.buffers.give(wal.into_buffer());
            None
        } else {
            Some(WalPayload { events: wal.len(), record: wal.finish_pooled(&self.buffers) })
        };
        Ok(Processed { response, wal, parts: finish(batch.builders), claimed })
    }

    /// The passes of [`Ingestor::process`] over each chunk of a request.
    fn passes(
        &self,
        at: At<'_>,
        events: &[&[u8]],
        batch: &mut Batch<'_>,
        out: &mut Outcome,
    ) -> Result<(), watershed_protect::Error> {
        let account = at.0;
        let mut valid = Vec::with_capacity(events.len().min(CHUNK_EVENTS));
        let mut protected = Vec::with_capacity(valid.capacity());
        let (mut keys, mut fresh) = (Vec::new(), Vec::new());
        // The passes run over chunks of the request, so that an event's
        // bytes and decoded values are still in cache when the later
        // passes read them; the tape holds one chunk at a time.
        for (c, chunk) in events.chunks(CHUNK_EVENTS).enumerate() {
            let first = c * CHUNK_EVENTS;
            batch.tape.clear();
            // Decoded values take about the space of their JSON.
            batch.tape.reserve(chunk.iter().map(|e| e.len() + 48).sum());
            for (i, raw) in chunk.iter().enumerate() {
                match self.validate(at, raw, batch, None) {
                    Ok(Some(v)) => valid.push((first + i, v)),
                    // Only replay skips events.
                    Ok(None) => {}
                    Err((v, partial)) => self.refuse(at, first + i, raw, v, &partial, batch, out)?,
                }
            }
            // On failure the events that needed a key are refused below.
            if let Err(e) = batch.protector.fetch(account) {
                tracing::error!(account = %account, error = %e, "cannot fetch data subject keys");
            }
            // Protection, then the rest, each over the whole chunk: one
            // stage's code at a time stays in the instruction cache (the
            // per-event path through every stage did not fit).
            for (index, v) in valid.drain(..) {
                match self.protect(account, &v, batch) {
                    Ok(()) => protected.push((index, v)),
                    Err((violation, partial)) => {
                        self.refuse(at, index, v.raw, violation, &partial, batch, out)?
                    }
                }
            }
            // Room for the events each partition gets, estimated from this
            // chunk (as many again in each chunk to come), for builders
            // this chunk creates.
            let later = events.len().div_ceil(CHUNK_EVENTS) - c;
            let counts = partition_counts(protected.iter().map(|(_, v)| v.partition()));
            let expect = |key| count_of(&counts, key) * later;
            // The chunk's ids claimed in the dedupe window at once.
            keys.clear();
            keys.extend(protected.iter().map(|(_, v)| self.dedupe.key(account.as_str(), &v.env.id)));
            self.dedupe.claim_all(&keys, &mut fresh);
            for ((_, v), (&key, &fresh)) in protected.drain(..).zip(keys.iter().zip(&fresh)) {
                if fresh {
                    out.claimed.push(key);
                    self.store(at, v, batch, Some(&mut out.wal), &expect);
                    out.response.accepted += 1;
                } else {
                    out.response.duplicates += 1;
                }
            }
        }
        // Refusals at protection come after the others; report in order.
        out.response.rejected.sort_by_key(|r| r.index);
        Ok(())
    }

    /// Keep a written WAL payload's buffer for a later request.
    pub fn reuse(&self, buffer: Vec<u8>) {
        self.buffers.give(buffer);
    }

    /// An empty tape, with the buffers of an earlier request when one is
    /// free: a tape holds a chunk of events, and growing one from nothing
    /// per request copies it several times over.
    fn tape(&self) -> Tape {
        self.tapes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop().unwrap_or_default()
    }

    /// Keep `tape` for a later request, unless it is unusually large (a
    /// maximal request) or enough are kept already: at most 32 MiB of
    /// tapes wait between requests.
    fn give_back(&self, mut tape: Tape) {
        const KEEP_BYTES: usize = 8 << 20;
        const KEEP: usize = 4;
        if tape.capacity_bytes() > KEEP_BYTES {
            return;
        }
        tape.clear();
        let mut pool = self.tapes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < KEEP {
            pool.push(tape);
        }
    }

    /// Record a refused event: a dead letter and a WAL entry (once per
    /// event id, or per exact bytes for an event without one, within the
    /// dedupe window) and a line of the response.
    ///
    /// # Errors
    /// When the dead letter's raw event cannot be encrypted.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        (account, collector, received_at): At<'_>,
        index: usize,
        raw: &[u8],
        v: Violation,
        partial: &envelope::Partial,
        batch: &mut Batch<'_>,
        out: &mut Outcome,
    ) -> Result<(), watershed_protect::Error> {
        let id = partial.id.clone();
        // A retried reject is reported again but stored once.
        let k = self.dedupe.dead_key(account.as_str(), id.as_deref(), raw);
        if self.dedupe.claim(k) {
            out.claimed.push(k);
            self.dead_letter(account, collector, received_at, raw, &v, partial, batch, None)?;
            out.wal.rejected(id.as_deref().unwrap_or(""), v.reason.as_str(), &v.path, &v.detail, raw);
        }
        out.response.rejected.push(Rejection {
            index,
            id,
            reason: v.reason.as_str(),
            path: v.path,
            detail: v.detail,
        });
        Ok(())
    }

    /// Make the keys created while protecting durable. Call before the
    /// events are acknowledged or their rows reach the lake.
    ///
    /// # Errors
    /// When the keyring cannot be written.
    pub fn sync_keys(&self) -> watershed_protect::Result<()> {
        self.keyring.sync()
    }

    /// The first pass over an event: decode the envelope, bind the
    /// account, route, and validate the payload into the batch's tape.
    /// `Ok(None)` means `skip` (replay) found its partition committed. A
    /// refused event leaves the tape as it was.
    // The error is per-event data on the reject path, not a hot return.
    #[allow(clippy::result_large_err)]
    fn validate<'r>(
        &self,
        at: At<'_>,
        raw: &'r [u8],
        batch: &mut Batch<'_>,
        skip: Option<&dyn Fn(&PartitionKey) -> bool>,
    ) -> Result<Option<Valid<'r, '_>>, (Violation, envelope::Partial)> {
        let mark = batch.tape.mark();
        let r = self.validate_inner(at, raw, batch, skip);
        if !matches!(r, Ok(Some(_))) {
            batch.tape.truncate(mark);
        }
        r
    }

    #[allow(clippy::result_large_err)]
    fn validate_inner<'r>(
        &self,
        (account, _, received_at): At<'_>,
        raw: &'r [u8],
        batch: &mut Batch<'_>,
        skip: Option<&dyn Fn(&PartitionKey) -> bool>,
    ) -> Result<Option<Valid<'r, '_>>, (Violation, envelope::Partial)> {
        let partial = || envelope::partial(raw);
        if raw.len() > self.limits.max_event_bytes {
            let v = Violation::new(
                Reason::TooLarge,
                format!("event is {} bytes; the limit is {}", raw.len(), self.limits.max_event_bytes),
            );
            return Err((v, partial()));
        }
        // Validate `detail` in the envelope pass when the route comes first.
        let mark = batch.tape.mark();
        let mut inline_root = None;
        let (registry, limits, tape) = (&self.registry, self.limits, &mut batch.tape);
        let mut inline = |source: &str, dt: &str, json: &[u8], start: usize| {
            let si = registry.route(source, dt)?;
            let (subject, version) = registry.resolve_index(si, None).ok()?;
            let (root, end) =
                validate_append(&version.node, json, start, subject.config.unknown_fields, limits, tape)
                    .ok()?;
            inline_root = Some(root);
            Some((end, (si, version.version)))
        };
        let env = envelope::decode_with(raw, &mut inline).map_err(|v| (v, partial()))?;
        let fail = |v: Violation| (v, env.partial());
        if let Some(claimed_account) = env.account.as_deref() {
            if claimed_account != account.as_str() {
                return Err(fail(Violation {
                    reason: Reason::AccountMismatch,
                    path: "$.account".into(),
                    detail: format!(
                        "the event claims account {claimed_account:?} but the credential is for {account}"
                    ),
                }));
            }
        }
        // A payload validated in the envelope pass was routed there already.
        let route = match env.prevalidated {
            Some((si, _)) => Some(si),
            None => self.registry.route(&env.source, &env.detail_type),
        };
        let Some(si) = route else {
            return Err(fail(Violation::new(
                Reason::UnknownSubject,
                format!("no subject for source {:?} and detail-type {:?}", env.source, env.detail_type),
            )));
        };
        let (subject, version) = self.registry.resolve_index(si, env.schema_version).map_err(&fail)?;
        let event_time = match env.time.as_deref() {
            None => received_at,
            Some(t) => parse_rfc3339_micros(t).ok_or_else(|| {
                fail(Violation {
                    reason: Reason::BadTimestamp,
                    path: "$.time".into(),
                    detail: "expected an RFC 3339 timestamp like 2024-05-01T12:00:00Z".into(),
                })
            })?,
        };
        let ahead = event_time.saturating_sub(received_at);
        if skip.is_none() && ahead > self.max_future {
            return Err(fail(Violation {
                reason: Reason::FutureTime,
                path: "$.time".into(),
                detail: format!(
                    "the event's time is {} s after the hub received it; at most {} s ahead is accepted \
                     (limits.max_future_secs)",
                    ahead / 1_000_000,
                    self.max_future / 1_000_000
                ),
            }));
        }
        if let Some(max_past) = self.max_past.filter(|_| skip.is_none()) {
            let behind = received_at.saturating_sub(event_time);
            if behind > max_past {
                return Err(fail(Violation {
                    reason: Reason::PastTime,
                    path: "$.time".into(),
                    detail: format!(
                        "the event's time is {} s before the hub received it; at most {} s back is \
                         accepted (limits.max_past_secs)",
                        behind / 1_000_000,
                        max_past / 1_000_000
                    ),
                }));
            }
        }
        // On replay, rows already in a committed file are skipped before
        // any validation work.
        if let Some(committed) = skip {
            if committed(&PartitionKey::at(&subject.table, account, event_time)) {
                return Ok(None);
            }
        }
        let root = match inline_root {
            Some(root) if env.prevalidated == Some((si, version.version)) => root,
            _ => {
                // Validated as another version in the envelope pass, or not
                // at all: start this event's values over.
                batch.tape.truncate(mark);
                validate_json_append(
                    &version.node,
                    env.payload,
                    subject.config.unknown_fields,
                    self.limits,
                    &mut batch.tape,
                )
                .map_err(|v| fail(v.under(env.payload_path)))?
            }
        };
        let noted = batch.protector.note(&version.protect, &batch.tape, root);
        Ok(Some(Valid { raw, env, si, subject, version, event_time, root, noted }))
    }

    /// Pass 3 over a valid event: protect its fields in the tape with its
    /// fetched key. Err refused.
    #[allow(clippy::result_large_err)]
    fn protect(
        &self,
        account: &AccountId,
        v: &Valid<'_, '_>,
        batch: &mut Batch<'_>,
    ) -> Result<(), (Violation, envelope::Partial)> {
        batch.protector.protect_noted(account, &v.version.protect, &mut batch.tape, v.root, v.noted).map_err(|e| {
            tracing::error!(account = %account, subject = %v.subject.name, error = %e, "cannot protect event");
            (
                Violation::new(
                    Reason::ProtectFailed,
                    "the event's protected fields could not be protected; retry later",
                ),
                v.env.partial(),
            )
        })
    }

    /// The last pass over a protected event, its id claimed in the
    /// dedupe window: add it to its partition's rows and the WAL record
    /// (`wal`; `None` on replay, which has nothing to log again).
    fn store(
        &self,
        (account, collector, received_at): At<'_>,
        v: Valid<'_, '_>,
        batch: &mut Batch<'_>,
        wal: Option<&mut RecordEncoder>,
        expect: &dyn Fn((usize, i64)) -> usize,
    ) {
        let key = v.partition();
        let Valid { raw, env, si, subject, version, event_time, root, noted: _ } = v;
        if received_at - event_time > LATE_MICROS {
            self.metrics.late.inc();
        }
        let meta = EventMeta {
            event_id: &env.id,
            source: &env.source,
            detail_type: &env.detail_type,
            event_time,
            received_at,
            region: env.region.as_deref(),
            schema_version: version.version,
            collector,
        };
        let layout = &self.layouts[si];
        let b = batch.builders.get_or_insert(key, || {
            let rows = expect(key).min(MAX_ROOM);
            (
                PartitionKey::at(&subject.table, account, event_time),
                Builder::Table(Box::new(TableBuilder::with_capacity(layout.clone(), rows))),
            )
        });
        if let Builder::Table(t) = b {
            t.append(&meta, env.resources.iter().map(|r| r.as_ref()), &batch.tape, root);
        }
        if let Some(wal) = wal {
            wal.accepted(&env.id, raw);
        }
    }

    /// Add a refused event to its account's dead letters, its raw bytes
    /// protected as [`DeadLetterRaw`] says.
    ///
    /// # Errors
    /// When the raw event cannot be encrypted; nothing is added then.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        account: &AccountId,
        collector: Option<&str>,
        received_at: TimestampMicros,
        raw: &[u8],
        v: &Violation,
        p: &envelope::Partial,
        batch: &mut Batch<'_>,
        skip: Option<&dyn Fn(&PartitionKey) -> bool>,
    ) -> Result<(), watershed_protect::Error> {
        if let Some(committed) = skip {
            if committed(&PartitionKey::at(DEAD_LETTERS, account, received_at)) {
                return Ok(());
            }
        }
        let stored = match self.raw {
            // A string column holds text: invalid UTF-8 becomes U+FFFD.
            DeadLetterRaw::Plain => String::from_utf8_lossy(raw),
            // The ciphertext holds the bytes exactly as received.
            DeadLetterRaw::Encrypt => {
                let subject = self.raw_subject(p, raw);
                let mut out = Vec::with_capacity(raw.len() * 4 / 3 + 64);
                batch.protector.encrypt_whole(account, subject.as_deref(), raw, &mut out)?;
                std::borrow::Cow::Owned(String::from_utf8(out).expect("ciphertexts are ASCII"))
            }
        };
        let b = batch.builders.get_or_insert((DEAD, received_at.div_euclid(HOUR_MICROS)), || {
            (PartitionKey::at(DEAD_LETTERS, account, received_at), Builder::Dead(Box::default()))
        });
        if let Builder::Dead(d) = b {
            d.append(&DeadLetter {
                event_id: p.id.as_deref(),
                source: p.source.as_deref(),
                detail_type: p.detail_type.as_deref(),
                reason: v.reason.as_str(),
                path: Some(&v.path),
                detail: &v.detail,
                received_at,
                collector,
                raw: &stored,
            });
        }
        Ok(())
    }

    /// The data subject of a refused event, when its route is known and
    /// the field that names the subject in any version of its schema can
    /// be read.
    fn raw_subject(&self, p: &envelope::Partial, raw: &[u8]) -> Option<String> {
        let si = self.registry.route(p.source.as_deref()?, p.detail_type.as_deref()?)?;
        let paths: Vec<&str> = self.registry.subjects()[si]
            .versions
            .iter()
            .rev()
            .filter_map(|v| v.protect.data_subject.as_ref().map(|(_, name)| name.as_str()))
            .collect();
        envelope::raw_subject(raw, &paths)
    }
}

fn finish(builders: Builders) -> Vec<(PartitionKey, RecordBatch)> {
    builders
        .0
        .into_iter()
        .filter_map(|(_, k, b)| {
            let batch = match b {
                Builder::Table(mut t) => t.finish(),
                Builder::Dead(mut d) => d.finish(),
            };
            match batch {
                Ok(b) => Some((k, b)),
                Err(e) => {
                    // Column builders only fail on a bug; the WAL still
                    // holds these events for the next start.
                    tracing::error!(partition = %k, error = %e, "cannot build a batch");
                    None
                }
            }
        })
        .collect()
}
