//! [`EnvelopeKeyring`]: data and tokenization keys stored wrapped under a
//! [`MasterKey`] (a local key file, or AWS KMS) in an append-only key log,
//! `keys.log` (mode 0600).
//!
//! - **Creating keys is cheap.** A new key is one appended line; the
//!   hub calls [`Keyring::sync`] once per WAL group commit, before the WAL
//!   write, so a batch of a thousand new data subjects costs one fsync.
//!   The fsync runs without the state lock: lookups and new keys go on
//!   meanwhile, and one sync at a time means a sync that returns has seen
//!   every line queued before it began reach the disk.
//! - **Erasing keys is thorough, and costs what the subject holds.**
//!   `forget` appends an erasure, then overwrites each erased key's line
//!   in place with a `shredded` line of the same length, so the wrapped
//!   key bytes are gone from the file, not just marked, without rewriting
//!   the log. Once shredded lines would be half the log it is compacted
//!   instead (rewritten, atomically replacing the old one). Opening the
//!   keyring finishes a shredding a crash interrupted.
//! - **Readers read what is new.** A log that grew in place is read from
//!   where the last read stopped; a replaced one, from the start.
//! - **Processes cooperate.** Every write holds an exclusive lock on
//!   `keys.lock`; a writer or reader that sees a replaced or grown log
//!   re-reads it, so `keys forget` from the command line takes effect in a
//!   running hub at its next key lookup, and no update is lost.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use watershed_event::prehashed::BuildPrehashed;
use watershed_event::{AccountId, TimestampMicros};

use crate::audit::AuditLog;
use crate::cipher::{hex, hex_into};
use crate::cipher::{DataCipher, KeyId};
use crate::error::{Error, Result};
use crate::fsutil::{ensure_dir, stamp, write_atomic, Stamp};
use crate::keyring::{Erasure, Keyring, MasterKey, Wrapped};
use crate::local::LocalMasterKey;
use crate::secret::SecretKey;

/// One line of the key log.
#[derive(Serialize, Deserialize, Clone)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    /// The key of the HMAC that turns subject ids into references.
    IndexKey { wrapped: Wrapped },
    /// An account's tokenization key.
    TokenKey { account: String, wrapped: Wrapped },
    /// A data key. `subject_ref` is `None` for the account-wide key.
    DataKey {
        id: String,
        account: String,
        subject_ref: Option<String>,
        current: bool,
        wrapped: Wrapped,
        created: String,
    },
    /// Data keys erased by `forget`.
    Erased { ids: Vec<String>, account: String, subject_ref: Option<String>, erased_at: String },
    /// The line of an erased data key, overwritten in place: `{"op":"shredded"`,
    /// spaces, `}`, as long as the line it replaced.
    Shredded {},
}

/// Where a line sits in the key log: its offset and its length without
/// the newline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LineAt {
    offset: u64,
    /// Never 0 (a line that parses is not empty), so that an
    /// `Option<LineAt>` takes no more room than a `LineAt`.
    len: NonZeroU32,
}

/// A data key as held in memory: a million of them must fit in a few
/// hundred megabytes, so repeated strings (the account, the master key
/// id) are interned and the creation time is kept as an instant.
struct DataKeyRecord {
    subject_ref: Option<[u8; 16]>,
    current: bool,
    /// In [`State::accounts`].
    account: u32,
    /// In [`State::masters`]: which master key wrapped it.
    master: u32,
    /// Nanoseconds since the epoch, UTC ([`ODD_CREATED`] when the log's
    /// text was not RFC 3339: the text is then in [`State::odd_created`]).
    created: i64,
    /// Its line in the log, once read from there (keys this process
    /// created are written without being read back).
    at: Option<LineAt>,
    /// The wrapped key bytes, base64, as in the log.
    blob: Box<str>,
}

/// [`DataKeyRecord::created`] for a creation time that is not RFC 3339.
const ODD_CREATED: i64 = i64::MIN;

/// A creation time: the text written in the log, and its instant.
#[derive(Clone)]
struct Created {
    text: Arc<str>,
    nanos: i64,
}

impl Created {
    fn now() -> Self {
        let now = chrono::Utc::now();
        Self { text: now.to_rfc3339().into(), nanos: now.timestamp_nanos_opt().unwrap_or(ODD_CREATED) }
    }
}

/// RFC 3339 text as nanoseconds since the epoch.
fn parse_nanos(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text).ok()?.timestamp_nanos_opt()
}

/// Strings that many records repeat, each held once and named by its
/// number.
#[derive(Default)]
struct Interned {
    names: Vec<Box<str>>,
    index: Map<Box<str>, u32>,
}

impl Interned {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 distinct names");
        self.names.push(name.into());
        self.index.insert(name.into(), i);
        i
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }
}

/// A data key's line as read from the log, borrowing from it: the lines
/// of a large log are nearly all data keys, so they skip the buffering of
/// [`Line`]'s tagged enum and the copies of its owned strings. Accepts
/// exactly what [`Line::DataKey`] accepts; anything else is parsed as a
/// [`Line`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataKeyRef<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    account: Cow<'a, str>,
    #[serde(borrow)]
    subject_ref: Option<Cow<'a, str>>,
    current: bool,
    #[serde(borrow)]
    wrapped: WrappedRef<'a>,
    #[serde(borrow)]
    created: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedRef<'a> {
    #[serde(borrow)]
    master: Cow<'a, str>,
    #[serde(borrow)]
    blob: Cow<'a, str>,
}

/// A data key line's parts, however they were read.
struct DataKeyParts<'a> {
    id: &'a str,
    account: &'a str,
    subject_ref: Option<&'a str>,
    current: bool,
    master: &'a str,
    blob: Box<str>,
    created: &'a str,
}

/// A new data key's line, written from borrowed parts (the same JSON as
/// [`Line::DataKey`]).
#[derive(Serialize)]
#[serde(tag = "op", rename = "data_key")]
struct DataKeyLine<'a> {
    id: &'a str,
    account: &'a str,
    subject_ref: Option<&'a str>,
    current: bool,
    wrapped: &'a Wrapped,
    created: &'a str,
}

#[derive(Default)]
struct State {
    index_key: Option<Wrapped>,
    token_keys: HashMap<String, Wrapped>,
    data_keys: Map<KeyId, DataKeyRecord>,
    accounts: Interned,
    masters: Interned,
    /// Creation times that were not RFC 3339, kept as written.
    odd_created: Map<KeyId, Box<str>>,
    /// Current account-wide key per account (in `accounts`).
    current_account: HashMap<u32, KeyId>,
    /// Current key per subject reference (which covers the account).
    current_subject: Map<[u8; 16], KeyId>,
    /// Erased keys: the account, the subject reference and when, as
    /// written in the erasure (shared by the keys it erased).
    erased: Map<KeyId, ErasedKey>,
    /// The latest erasure per subject reference: when, and one of the
    /// keys it erased.
    erasures: Map<[u8; 16], (TimestampMicros, KeyId)>,
    /// Earlier lines of a key written more than once (a write repeated
    /// after a failed fsync): shredded with the key.
    repeated: Map<KeyId, Vec<LineAt>>,
    /// Lines in the log that still hold the material of erased keys.
    unshredded: Vec<LineAt>,
    /// Bytes of shredded lines in the log (newlines included).
    shredded_bytes: u64,
}

/// An erasure as its line names it (account, subject reference, when),
/// shared by the keys it erased.
type ErasedKey = Arc<(String, Option<String>, String)>;

/// The maps of key ids and subject references: ahash (seeded per
/// process) hashes a 16-byte key several times faster than SipHash, which
/// counts when a log of a million keys is read.
type Map<K, V> = HashMap<K, V, ahash::RandomState>;

impl State {
    /// Apply `line`, read from `at` in the log (`None`: not read from
    /// the log).
    fn apply(&mut self, line: Line, at: Option<LineAt>) {
        match line {
            Line::IndexKey { wrapped } => self.index_key = Some(wrapped),
            Line::TokenKey { account, wrapped } => {
                self.token_keys.insert(account, wrapped);
            }
            Line::DataKey { id, account, subject_ref, current, wrapped, created } => {
                let parts = DataKeyParts {
                    id: &id,
                    account: &account,
                    subject_ref: subject_ref.as_deref(),
                    current,
                    master: &wrapped.master,
                    blob: wrapped.blob.into_boxed_str(),
                    created: &created,
                };
                self.apply_data_key(parts, at);
            }
            Line::Shredded {} => {
                self.shredded_bytes += at.map_or(0, |a| u64::from(a.len.get()) + 1);
            }
            Line::Erased { ids, account, subject_ref, erased_at } => {
                let at = chrono::DateTime::parse_from_rfc3339(&erased_at).map(|t| t.timestamp_micros());
                let sref = subject_ref.as_deref().and_then(ref_from_hex);
                let erasure: ErasedKey = Arc::new((account, subject_ref, erased_at));
                for hex in ids {
                    let Some(id) = KeyId::from_hex(&hex) else { continue };
                    if let Some(rec) = self.data_keys.remove(&id) {
                        self.unshredded.extend(rec.at);
                        self.odd_created.remove(&id);
                        // No longer current (looked up by its own entry:
                        // a pass over every key per erasure made reading
                        // a log of many erasures quadratic).
                        match rec.subject_ref {
                            Some(r) if self.current_subject.get(&r) == Some(&id) => {
                                self.current_subject.remove(&r);
                            }
                            None if self.current_account.get(&rec.account) == Some(&id) => {
                                self.current_account.remove(&rec.account);
                            }
                            _ => {}
                        }
                    }
                    self.unshredded.extend(self.repeated.remove(&id).unwrap_or_default());
                    self.erased.insert(id, erasure.clone());
                    if let (Some(r), Ok(at)) = (sref, at) {
                        let e = self.erasures.entry(r).or_insert((at, id));
                        if at > e.0 {
                            *e = (at, id);
                        }
                    }
                }
            }
        }
    }

    /// Apply a data key's line, read from `at` in the log (`None`: not
    /// read from the log).
    fn apply_data_key(&mut self, p: DataKeyParts<'_>, at: Option<LineAt>) {
        let Some(id) = KeyId::from_hex(p.id) else { return };
        let created = parse_nanos(p.created).unwrap_or(ODD_CREATED);
        if created == ODD_CREATED {
            self.odd_created.insert(id, p.created.into());
        }
        let rec = DataKeyRecord {
            subject_ref: p.subject_ref.and_then(ref_from_hex),
            current: p.current,
            account: self.accounts.id(p.account),
            master: self.masters.id(p.master),
            created,
            at,
            blob: p.blob,
        };
        self.add_data_key(id, rec);
    }

    /// Index a data key (unless erased: then its line is one to shred)
    /// and make it current or not.
    fn add_data_key(&mut self, id: KeyId, mut rec: DataKeyRecord) {
        if self.erased.contains_key(&id) {
            self.unshredded.extend(rec.at);
            self.odd_created.remove(&id);
            return;
        }
        if let Some(old) = self.data_keys.get(&id) {
            match (old.at, rec.at) {
                (Some(o), Some(n)) if o != n => self.repeated.entry(id).or_default().push(o),
                (Some(o), None) => rec.at = Some(o),
                _ => {}
            }
        }
        let account = rec.account;
        match (rec.current, rec.subject_ref) {
            (true, Some(r)) => {
                self.current_subject.insert(r, id);
            }
            (true, None) => {
                self.current_account.insert(account, id);
            }
            (false, Some(r)) if self.current_subject.get(&r) == Some(&id) => {
                self.current_subject.remove(&r);
            }
            (false, None) if self.current_account.get(&account) == Some(&id) => {
                self.current_account.remove(&account);
            }
            (false, _) => {}
        }
        self.data_keys.insert(id, rec);
    }

    /// A data key's wrapped bytes, as the master key takes them.
    fn wrapped(&self, rec: &DataKeyRecord) -> Wrapped {
        Wrapped { master: self.masters.name(rec.master).to_owned(), blob: rec.blob.to_string() }
    }

    /// Replace a data key's wrapped bytes.
    fn rewrap(&mut self, id: &KeyId, wrapped: Wrapped) {
        let master = self.masters.id(&wrapped.master);
        if let Some(rec) = self.data_keys.get_mut(id) {
            rec.master = master;
            rec.blob = wrapped.blob.into_boxed_str();
        }
    }

    /// A data key's creation time as written in its line.
    fn created_text(&self, id: &KeyId, rec: &DataKeyRecord) -> String {
        match self.odd_created.get(id) {
            Some(text) => text.to_string(),
            None => chrono::DateTime::from_timestamp_nanos(rec.created).to_rfc3339(),
        }
    }

    /// The whole state as log lines (for compaction).
    fn snapshot(&self) -> Vec<Line> {
        let mut out = Vec::new();
        if let Some(w) = &self.index_key {
            out.push(Line::IndexKey { wrapped: w.clone() });
        }
        let mut tokens: Vec<_> = self.token_keys.iter().collect();
        tokens.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(
            tokens.into_iter().map(|(a, w)| Line::TokenKey { account: a.clone(), wrapped: w.clone() }),
        );
        let mut erased: HashMap<&(String, Option<String>, String), Vec<String>> = HashMap::new();
        for (id, e) in &self.erased {
            erased.entry(&**e).or_default().push(id.to_hex());
        }
        for ((account, subject_ref, erased_at), mut ids) in erased {
            ids.sort();
            out.push(Line::Erased {
                ids,
                account: account.clone(),
                subject_ref: subject_ref.clone(),
                erased_at: erased_at.clone(),
            });
        }
        let mut keys: Vec<_> = self.data_keys.iter().collect();
        keys.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.0.cmp(b.0)));
        out.extend(keys.into_iter().map(|(id, r)| Line::DataKey {
            id: id.to_hex(),
            account: self.accounts.name(r.account).to_owned(),
            subject_ref: r.subject_ref.as_ref().map(|r| hex(r)),
            current: r.current,
            wrapped: self.wrapped(r),
            created: self.created_text(id, r),
        }));
        out
    }
}

struct Loaded {
    state: State,
    stamp: Option<Stamp>,
    /// The log's bytes applied to `state`, up to the end of a whole line:
    /// when the log grows in place, only what follows is read.
    read_len: u64,
    /// The line that ends at `read_len`, newline included (empty at 0): a
    /// tail read first checks that it is still there, so a log cut back
    /// and written again with a line boundary at the same place is read
    /// whole rather than from a place that now means something else.
    last_line: Vec<u8>,
    file: Option<Arc<File>>,
    /// Lines of keys created here and not yet written, as JSON lines:
    /// written and fsynced by [`Keyring::sync`], and re-applied after a
    /// reload.
    pending: Vec<u8>,
    /// Key ids and key material for new keys (seeded from the OS).
    rng: ChaCha20Rng,
    index: Option<Hmac<Sha256>>,
    cache: CipherCache,
}

/// Unwrapped data keys, keyed for AES (about 1 KiB each), bounded: two
/// generations, the younger taking new and recently used keys; when it is
/// full the older one is dropped and the younger takes its place. A key
/// not held is unwrapped and keyed again when used (a few µs).
struct CipherCache {
    young: HashMap<KeyId, Arc<DataCipher>>,
    old: HashMap<KeyId, Arc<DataCipher>>,
    /// Keys per generation.
    half: usize,
}

impl CipherCache {
    fn new(limit: usize) -> Self {
        Self { young: HashMap::new(), old: HashMap::new(), half: (limit / 2).max(1) }
    }

    fn get(&mut self, id: &KeyId) -> Option<Arc<DataCipher>> {
        if let Some(c) = self.young.get(id) {
            return Some(c.clone());
        }
        let c = self.old.remove(id)?;
        self.insert(*id, c.clone());
        Some(c)
    }

    fn insert(&mut self, id: KeyId, c: Arc<DataCipher>) {
        if self.young.len() >= self.half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, c);
    }

    fn retain(&mut self, keep: impl Fn(&KeyId) -> bool) {
        self.young.retain(|id, _| keep(id));
        self.old.retain(|id, _| keep(id));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// Data keys kept unwrapped by default (see [`EnvelopeKeyring::with_cached_keys`]).
pub const CACHED_KEYS: usize = 100_000;

/// Envelope-encrypted keys in a local key log. See the module docs.
pub struct EnvelopeKeyring<M: MasterKey> {
    path: PathBuf,
    lock_path: PathBuf,
    lock_fd: File,
    /// Whether this process holds `keys.lock` (always with the state
    /// locked, so one flag serves).
    locked: std::sync::atomic::AtomicBool,
    master: M,
    audit: AuditLog,
    state: Mutex<Loaded>,
    /// Held through a whole [`Keyring::sync`], fsync included.
    syncing: Mutex<()>,
    hot: Hot,
}

/// The embedded default: a keyring directory with its own master key file.
pub type LocalKeyring = EnvelopeKeyring<LocalMasterKey>;

impl<M: MasterKey> std::fmt::Debug for EnvelopeKeyring<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvelopeKeyring({}, {:?})", self.path.display(), self.master)
    }
}

impl LocalKeyring {
    /// Open the keyring in `dir`, creating it (0700 directory, 0600 files)
    /// on first use.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] when the files cannot be used.
    pub fn open_local(dir: &Path) -> Result<Self> {
        let master = LocalMasterKey::open(dir)?;
        Self::open(dir, master)
    }

    /// Open the keyring in `dir` with its master keys sealed by `sealer`
    /// (see [`LocalMasterKey::open_sealed`]), creating it on first use.
    ///
    /// # Errors
    /// As [`LocalKeyring::open_local`], and the sealer's errors.
    pub fn open_sealed(dir: &Path, sealer: Box<dyn MasterKey>) -> Result<Self> {
        let master = LocalMasterKey::open_sealed(dir, sealer)?;
        Self::open(dir, master)
    }
}

/// One shard of [`Hot`].
type HotShard = Mutex<HashMap<u128, Arc<DataCipher>, BuildPrehashed>>;

/// The current cipher per (account, subject): the per-event lookup,
/// outside the state lock, sharded so concurrent requests do not contend,
/// with no MAC on a hit. Entries are keyed by a 128-bit keyed hash of the
/// pair (seeded per process), so a lookup compares two words instead of
/// chasing a string. Cleared whenever the state is reloaded, erased or
/// rotated; a shard starts over at `per_shard` entries (the cached keys
/// spread over the shards: its entries keep their ciphers alive, so it is
/// bounded like the cache).
/// It answers only while the log was checked for changes within
/// [`REFRESH_EVERY`]; otherwise the caller takes the locked path, which
/// checks.
struct Hot {
    shards: Vec<HotShard>,
    seeds: (ahash::RandomState, ahash::RandomState),
    base: Instant,
    /// Milliseconds after `base` of the last check of the log.
    checked_ms: AtomicU64,
    per_shard: usize,
}

const HOT_SHARDS: usize = 16;

impl Hot {
    fn new() -> Self {
        Self {
            shards: (0..HOT_SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            seeds: (ahash::RandomState::new(), ahash::RandomState::new()),
            base: Instant::now(),
            checked_ms: AtomicU64::new(0),
            per_shard: (CACHED_KEYS / HOT_SHARDS).max(1),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn checked_now(&self) {
        self.checked_ms.store(self.now_ms(), Ordering::Release);
    }

    fn fresh(&self) -> bool {
        let every = u64::try_from(REFRESH_EVERY.as_millis()).unwrap_or(u64::MAX);
        self.now_ms().saturating_sub(self.checked_ms.load(Ordering::Acquire)) < every
    }

    fn key(&self, account: &AccountId, subject: &str) -> u128 {
        let pair = (account.as_str(), subject);
        u128::from(self.seeds.0.hash_one(pair)) << 64 | u128::from(self.seeds.1.hash_one(pair))
    }

    fn shard_of(key: u128) -> usize {
        // The table uses the low word; the shard comes from the high one.
        usize::try_from(key >> 124).unwrap_or(0) % HOT_SHARDS
    }

    fn shard(&self, key: u128) -> &HotShard {
        &self.shards[Self::shard_of(key)]
    }

    fn get(&self, k: u128) -> Option<Arc<DataCipher>> {
        lock(self.shard(k)).get(&k).cloned()
    }

    /// Fill the empty entries of `out` with the ciphers of `keys` found in
    /// the index: one lock per shard, and the entries of a shard read
    /// before any is cloned, so the memory they live in is fetched in
    /// parallel rather than one cache miss after another.
    fn get_many(&self, keys: &[u128], out: &mut [Option<Arc<DataCipher>>]) {
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); HOT_SHARDS];
        for (i, &k) in keys.iter().enumerate() {
            if out[i].is_none() {
                by_shard[Self::shard_of(k)].push(i);
            }
        }
        for (shard, idx) in self.shards.iter().zip(&by_shard) {
            if idx.is_empty() {
                continue;
            }
            let m = lock(shard);
            let found: Vec<Option<&Arc<DataCipher>>> = idx.iter().map(|&i| m.get(&keys[i])).collect();
            // Plain loads of each entry's reference count: independent,
            // so they overlap; the clones below then find it cached.
            let touched: usize = found.iter().flatten().map(|c| Arc::strong_count(c)).sum();
            std::hint::black_box(touched);
            for (&i, c) in idx.iter().zip(&found) {
                out[i] = c.cloned();
            }
        }
    }

    fn insert(&self, k: u128, c: Arc<DataCipher>) {
        let mut m = lock(self.shard(k));
        if m.len() >= self.per_shard {
            m.clear();
        }
        m.insert(k, c);
    }

    fn clear(&self) {
        for s in &self.shards {
            lock(s).clear();
        }
    }
}

/// A key log line, parsed.
enum Parsed<'a> {
    DataKey(DataKeyRef<'a>),
    Line(Line),
}

/// Parse a key log line: a data key's by the borrowing fast path, any
/// other (or one the fast path refuses) as a [`Line`], whose error is
/// the one reported.
fn parse_line(text: &[u8]) -> serde_json::Result<Parsed<'_>> {
    if text.starts_with(br#"{"op":"data_key","#) {
        if let Ok(d) = serde_json::from_slice::<DataKeyRef<'_>>(text) {
            if d.op == "data_key" {
                return Ok(Parsed::DataKey(d));
            }
        }
    }
    serde_json::from_slice::<Line>(text).map(Parsed::Line)
}

/// Apply a new line now and write it at the next sync.
fn queue(st: &mut Loaded, line: Line) {
    push_line(&mut st.pending, &line);
    st.state.apply(line, None);
}

/// Put lines whose fsync failed back in front of the pending ones: a
/// failed fsync may have dropped them from the page cache, so they are
/// written again at the next sync (applying a line twice is harmless).
fn give_back(st: &mut Loaded, mut lines: Vec<u8>) {
    lines.extend_from_slice(&st.pending);
    st.pending = lines;
}

/// Append `lines` to the key log.
#[cfg(not(test))]
fn write_lines(file: &File, _path: &Path, lines: &[u8]) -> std::io::Result<()> {
    (&*file).write_all(lines)
}

/// [`write_lines`], failing on demand: after [`tests::tear_next_write`],
/// the next write to that log stops after a few bytes with an error, as a
/// full disk would.
#[cfg(test)]
fn write_lines(file: &File, path: &Path, lines: &[u8]) -> std::io::Result<()> {
    if let Some(keep) = tests::torn_write(path) {
        (&*file).write_all(&lines[..keep.min(lines.len())])?;
        return Err(std::io::Error::other("no space left on device (simulated)"));
    }
    (&*file).write_all(lines)
}

/// Append `line` and a newline to `buf`.
fn push_line(buf: &mut Vec<u8>, line: &impl Serialize) {
    serde_json::to_writer(&mut *buf, line).expect("key log lines serialise");
    buf.push(b'\n');
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `dek:` and the key id in hex: what a data key's wrap is bound to.
fn dek_context(id: &KeyId) -> [u8; 36] {
    let mut out = [0u8; 36];
    out[..4].copy_from_slice(b"dek:");
    hex_into(&id.0, &mut out[4..]);
    out
}

fn token_context(account: &str) -> Vec<u8> {
    format!("tok:{account}").into_bytes()
}

const INDEX_CONTEXT: &[u8] = b"idx";

/// About the length of a data key's line wrapped by a local master key
/// (under KMS they are longer).
const DATA_KEY_LINE_BYTES: u64 = 300;

/// How a shredded line starts (then spaces, then `}`).
const SHREDDED: &[u8] = br#"{"op":"shredded""#;

/// How often the encryption path looks for changes by other processes.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

fn ref_from_hex(s: &str) -> Option<[u8; 16]> {
    KeyId::from_hex(s).map(|k| k.0)
}

/// Holds `keys.lock` exclusively while alive.
struct FileLock<'a>(&'a File, &'a std::sync::atomic::AtomicBool);

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        self.1.store(false, Ordering::Release);
        let _ = self.0.unlock();
    }
}

impl<M: MasterKey> EnvelopeKeyring<M> {
    /// Open `dir/keys.log` under `master`, creating it on first use.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] when the files cannot be used.
    pub fn open(dir: &Path, master: M) -> Result<Self> {
        ensure_dir(dir)?;
        let kr = Self {
            path: dir.join("keys.log"),
            lock_path: dir.join("keys.lock"),
            lock_fd: OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join("keys.lock"))
                .map_err(|source| Error::Io { path: dir.join("keys.lock"), source })?,
            locked: std::sync::atomic::AtomicBool::new(false),
            audit: AuditLog::open(&dir.join("audit.log"))?,
            master,
            state: Mutex::new(Loaded {
                state: State::default(),
                stamp: None,
                read_len: 0,
                last_line: Vec::new(),
                file: None,
                pending: Vec::new(),
                rng: ChaCha20Rng::from_entropy(),
                index: None,
                cache: CipherCache::new(CACHED_KEYS),
            }),
            syncing: Mutex::new(()),
            hot: Hot::new(),
        };
        {
            let mut st = lock(&kr.state);
            let _guard = kr.lock_file()?;
            kr.reload(&mut st, true)?;
            kr.cut_torn_tail(&mut st)?;
            // Erasures whose shredding a crash interrupted.
            kr.shred(&mut st)?;
            if st.state.index_key.is_none() {
                let k = SecretKey::random();
                let w = kr.master.wrap(&k, INDEX_CONTEXT)?;
                queue(&mut st, Line::IndexKey { wrapped: w });
                kr.flush_pending(&mut st)?;
            }
            let w = st.state.index_key.clone().expect("set above");
            let k = kr.master.unwrap(&w, INDEX_CONTEXT)?;
            st.index = Some(<Hmac<Sha256> as Mac>::new_from_slice(k.expose()).expect("any key length"));
        }
        Ok(kr)
    }

    /// Keep at most about `keys` data keys unwrapped in memory (default
    /// [`CACHED_KEYS`]; about 1 KiB each, and the per-subject index may
    /// hold as many again). Keys beyond are unwrapped again when used.
    #[must_use]
    pub fn with_cached_keys(mut self, keys: usize) -> Self {
        let st = self.state.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.cache = CipherCache::new(keys);
        self.hot.per_shard = (keys / HOT_SHARDS).max(1);
        self.hot.clear();
        self
    }

    fn lock_file(&self) -> Result<FileLock<'_>> {
        self.lock_fd.lock().map_err(|source| Error::Io { path: self.lock_path.clone(), source })?;
        self.locked.store(true, Ordering::Release);
        Ok(FileLock(&self.lock_fd, &self.locked))
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: self.path.clone(), source }
    }

    /// Re-read the log if it changed, looking at most every
    /// [`REFRESH_EVERY`]: the per-event encryption path must not stat a
    /// file per event. An erasure by another process therefore reaches new
    /// encryptions within that interval (decryption checks every time).
    fn refresh(&self, st: &mut Loaded) -> Result<()> {
        if self.hot.fresh() {
            return Ok(());
        }
        self.reload(st, false)?;
        self.hot.checked_now();
        Ok(())
    }

    /// Re-read the log if it changed (or always, with `force`). A log
    /// that grew in place is read from where the last read stopped; a
    /// replaced one (compacted, by this process or another) from the
    /// start.
    fn reload(&self, st: &mut Loaded, force: bool) -> Result<()> {
        let now = stamp(&self.path);
        if !force && now.is_some() && now == st.stamp {
            return Ok(());
        }
        let grown = matches!((now, st.stamp), (Some(n), Some(s))
            if n.ino == s.ino && st.read_len > 0 && n.len >= st.read_len);
        if grown {
            match self.read_log(st, st.read_len) {
                Ok(true) => {
                    st.stamp = now;
                    return Ok(());
                }
                // Not whole lines from there on (the log was cut back and
                // written again by another process): read it all.
                Ok(false) | Err(Error::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match self.read_log(st, 0) {
            // A line being shredded by another process reads as neither
            // JSON nor torn: read again once that process is done.
            Err(Error::Corrupt { .. }) if !self.locked.load(Ordering::Acquire) => {
                let _guard = self.lock_file()?;
                self.read_log(st, 0)?;
            }
            r => {
                r?;
            }
        }
        st.stamp = now;
        st.file = None;
        Ok(())
    }

    /// Apply the log's lines from byte `from` on: to a new state when
    /// `from` is 0, else to the current one. Returns `false` when a line
    /// from a tail read does not parse: the caller then reads the whole
    /// log into a new state.
    fn read_log(&self, st: &mut Loaded, from: u64) -> Result<bool> {
        let mut state = if from == 0 { State::default() } else { std::mem::take(&mut st.state) };
        let mut last = if from == 0 { Vec::new() } else { st.last_line.clone() };
        let (pos, applied) = match self.read_lines(&mut state, from, &mut last) {
            Ok(Some(read)) => read,
            // A tail read keeps what it applied (lines in order, so a state
            // behind the log, not a wrong one); a full read keeps nothing.
            Ok(None) => {
                st.state = state;
                return Ok(false);
            }
            Err(e) => {
                if from > 0 {
                    st.state = state;
                }
                return Err(e);
            }
        };
        if from == 0 || applied {
            for l in serde_json::Deserializer::from_slice(&st.pending).into_iter::<Line>() {
                state.apply(l.expect("pending lines were serialised here"), None);
            }
            st.cache.retain(|id| state.data_keys.contains_key(id));
            self.hot.clear();
        }
        st.state = state;
        st.read_len = pos;
        st.last_line = last;
        Ok(true)
    }

    /// Apply to `state` the log's lines from byte `from` on. Returns where
    /// the last whole line ends and whether any line was applied, or
    /// `None` when a tail read (`from` > 0) does not follow `last` (the
    /// line ending at `from` when the log was last read) or one of its
    /// lines does not parse. `last` ends as the last whole line read.
    fn read_lines(&self, state: &mut State, from: u64, last: &mut Vec<u8>) -> Result<Option<(u64, bool)>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some((0, false))),
            Err(e) => return Err(self.io()(e)),
        };
        if from == 0 {
            // Room for the keys up front: growing the maps by doubling
            // would rehash a large log's keys several times, holding two
            // tables at once each time.
            let len = f.metadata().map_err(self.io())?.len();
            let lines = usize::try_from(len / DATA_KEY_LINE_BYTES).unwrap_or(usize::MAX);
            state.data_keys.reserve(lines);
            state.current_subject.reserve(lines);
        }
        let before = from.checked_sub(last.len() as u64).unwrap_or(from);
        f.seek(SeekFrom::Start(before)).map_err(self.io())?;
        let mut r = BufReader::with_capacity(1 << 16, f);
        let mut buf = vec![0; usize::try_from(from - before).expect("one line")];
        if r.read_exact(&mut buf).is_err() || buf != *last {
            return Ok(None);
        }
        let (mut pos, mut applied) = (from, false);
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).map_err(self.io())?;
            if n == 0 {
                return Ok(Some((pos, applied)));
            }
            let whole = buf.last() == Some(&b'\n');
            let text = if whole { &buf[..n - 1] } else { &buf[..] };
            let at = NonZeroU32::new(u32::try_from(text.len()).unwrap_or(u32::MAX))
                .map(|len| LineAt { offset: pos, len });
            match parse_line(text) {
                Ok(Parsed::DataKey(d)) => {
                    let parts = DataKeyParts {
                        id: &d.id,
                        account: &d.account,
                        subject_ref: d.subject_ref.as_deref(),
                        current: d.current,
                        master: &d.wrapped.master,
                        blob: d.wrapped.blob.as_ref().into(),
                        created: &d.created,
                    };
                    state.apply_data_key(parts, at);
                    applied = true;
                }
                Ok(Parsed::Line(l)) => {
                    state.apply(l, at);
                    applied = true;
                }
                // A torn last line: a key created but never synced, so
                // never used by an acknowledged event.
                Err(_) if !whole && !text.ends_with(b"}") => {}
                Err(_) if from > 0 => return Ok(None),
                Err(e) => return Err(Error::Corrupt { path: self.path.clone(), detail: e.to_string() }),
            }
            if whole {
                pos += n as u64;
                std::mem::swap(last, &mut buf);
            }
        }
    }

    /// Cut off a torn last line (a write a crash interrupted: its keys
    /// were never synced, so never used), so that the next append starts a
    /// line of its own. The caller holds the file lock.
    fn cut_torn_tail(&self, st: &mut Loaded) -> Result<()> {
        let Some(now) = stamp(&self.path) else { return Ok(()) };
        if now.len <= st.read_len {
            return Ok(());
        }
        tracing::warn!(
            path = %self.path.display(),
            bytes = now.len - st.read_len,
            "cutting off a torn last line of the key log"
        );
        let f = OpenOptions::new().write(true).open(&self.path).map_err(self.io())?;
        f.set_len(st.read_len).and_then(|()| f.sync_data()).map_err(self.io())?;
        // Read it all again: the torn line may have been applied.
        st.read_len = 0;
        self.reload(st, true)
    }

    /// Write the pending lines in one append and fsync; the caller holds
    /// the file lock (and the state).
    fn flush_pending(&self, st: &mut Loaded) -> Result<()> {
        let Some((file, lines)) = self.write_pending(st)? else { return Ok(()) };
        file.sync_data().map_err(|e| {
            give_back(st, lines);
            self.io()(e)
        })
    }

    /// Append the pending lines without fsync; the caller holds the file
    /// lock. Returns the file and the lines taken from `pending`, to be
    /// given back if the fsync fails.
    fn write_pending(&self, st: &mut Loaded) -> Result<Option<(Arc<File>, Vec<u8>)>> {
        if st.pending.is_empty() {
            return Ok(None);
        }
        if stamp(&self.path) != st.stamp {
            self.reload(st, true)?;
        }
        let file = match &st.file {
            Some(f) => f.clone(),
            None => {
                let new = !self.path.exists();
                let mut opts = OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let f = Arc::new(opts.open(&self.path).map_err(self.io())?);
                if new {
                    // The log's name, not only its lines, must survive a
                    // power loss: every ciphertext depends on it.
                    if let Some(dir) = self.path.parent() {
                        File::open(dir).and_then(|d| d.sync_all()).map_err(self.io())?;
                    }
                }
                st.file = Some(f.clone());
                f
            }
        };
        // A failed write is cut back off the log, so the lines written
        // again at the next sync never follow a torn one (which would
        // make the log unreadable).
        let before = file.metadata().map_err(self.io())?.len();
        if let Err(e) = write_lines(&file, &self.path, &st.pending) {
            return Err(match file.set_len(before) {
                Ok(()) => self.io()(e),
                Err(cut) => self.io()(std::io::Error::other(format!(
                    "{e}; cutting the key log back to {before} bytes failed: {cut}"
                ))),
            });
        }
        st.stamp = stamp(&self.path);
        // These lines need no reading back (they are applied already).
        if st.read_len == before {
            st.read_len = before + st.pending.len() as u64;
            let body = &st.pending[..st.pending.len() - 1];
            let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            st.last_line = st.pending[start..].to_vec();
        }
        Ok(Some((file, std::mem::take(&mut st.pending))))
    }

    /// Rewrite the log from the current state; erased material and
    /// shredded lines are gone. The caller holds the file lock.
    fn compact(&self, st: &mut Loaded) -> Result<()> {
        let mut buf = Vec::new();
        for l in st.state.snapshot() {
            push_line(&mut buf, &l);
        }
        write_atomic(&self.path, &buf)?;
        st.pending.clear();
        // Read back: the lines' places changed.
        self.reload(st, true)
    }

    /// [`Self::shred`] where lines cannot be written in place: compact.
    #[cfg(not(unix))]
    fn shred(&self, st: &mut Loaded) -> Result<()> {
        if st.state.unshredded.is_empty() {
            return Ok(());
        }
        self.compact(st)
    }

    /// Overwrite the lines of erased keys in place (`{"op":"shredded"}`
    /// padded to the same length) and fsync: their wrapped key bytes are
    /// gone from the log, at a cost that does not grow with the log. Once
    /// shredded lines are half the log, the log is compacted instead. The
    /// caller holds the file lock, and the erasures are in the log already
    /// (a crash in between leaves lines that the next open shreds).
    #[cfg(unix)]
    fn shred(&self, st: &mut Loaded) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if st.state.unshredded.is_empty() {
            return Ok(());
        }
        let len = stamp(&self.path).map_or(0, |s| s.len);
        let lines: u64 = st.state.unshredded.iter().map(|a| u64::from(a.len.get()) + 1).sum();
        if (st.state.shredded_bytes + lines) * 2 > len {
            return self.compact(st);
        }
        let f = OpenOptions::new().read(true).write(true).open(&self.path).map_err(self.io())?;
        let mut line = Vec::new();
        for at in std::mem::take(&mut st.state.unshredded) {
            // Only a data key's line is overwritten: anything else there
            // means the places are stale, and a compaction is the safe way.
            line.resize(at.len.get() as usize, 0);
            f.read_exact_at(&mut line, at.offset).map_err(self.io())?;
            if !line.starts_with(br#"{"op":"data_key","#) || !line.ends_with(b"}") {
                tracing::warn!(offset = at.offset, "a key log line to shred is not a data key: compacting");
                return self.compact(st);
            }
            line.fill(b' ');
            line[..SHREDDED.len()].copy_from_slice(SHREDDED);
            *line.last_mut().expect("longer than the marker") = b'}';
            f.write_all_at(&line, at.offset).map_err(self.io())?;
            st.state.shredded_bytes += u64::from(at.len.get()) + 1;
        }
        f.sync_data().map_err(self.io())?;
        st.stamp = stamp(&self.path);
        Ok(())
    }

    /// [`Keyring::forget_subjects`] for subjects named once each.
    fn forget_distinct(&self, account: &AccountId, subjects: &[&str]) -> Result<Vec<Option<Erasure>>> {
        let mut st = lock(&self.state);
        let _guard = self.lock_file()?;
        // Keys this process created must be in the log before it records
        // their erasure.
        self.flush_pending(&mut st)?;
        self.reload(&mut st, true)?;
        let srefs: Vec<[u8; 16]> = subjects.iter().map(|s| Self::subject_ref(&st, account, s)).collect();
        let mut keys = Self::keys_of(&st, account, &srefs);
        // Keys created here were written but not read back, so their
        // lines' places are unknown: read the whole log for them.
        if keys.values().flatten().any(|id| st.state.data_keys[id].at.is_none()) {
            st.read_len = 0;
            self.reload(&mut st, true)?;
            keys = Self::keys_of(&st, account, &srefs);
        }
        let erased_at = chrono::Utc::now().to_rfc3339();
        let mut out: Vec<Option<Erasure>> = Vec::with_capacity(subjects.len());
        let mut all: Vec<KeyId> = Vec::new();
        for sref in &srefs {
            let Some(mut ids) = keys.remove(sref) else {
                out.push(None);
                continue;
            };
            ids.sort();
            let subject_ref = hex(sref);
            queue(
                &mut st,
                Line::Erased {
                    ids: ids.iter().map(KeyId::to_hex).collect(),
                    account: account.to_string(),
                    subject_ref: Some(subject_ref.clone()),
                    erased_at: erased_at.clone(),
                },
            );
            all.extend(&ids);
            out.push(Some(Erasure { key_ids: ids, subject_ref }));
        }
        if all.is_empty() {
            return Ok(out);
        }
        // The erasures are durable before any material is overwritten.
        self.flush_pending(&mut st)?;
        let all: std::collections::HashSet<KeyId> = all.into_iter().collect();
        st.cache.retain(|id| !all.contains(id));
        self.hot.clear();
        self.shred(&mut st)?;
        drop(_guard);
        drop(st);
        #[derive(Serialize)]
        struct Rec<'a> {
            action: &'static str,
            account: &'a str,
            subject_ref: &'a str,
            key_ids: &'a [String],
        }
        for e in out.iter().flatten() {
            let ids: Vec<String> = e.key_ids.iter().map(KeyId::to_hex).collect();
            self.audit.append(&Rec {
                action: "forget",
                account: account.as_str(),
                subject_ref: &e.subject_ref,
                key_ids: &ids,
            })?;
            tracing::info!(account = %account, subject_ref = %e.subject_ref, keys = ids.len(), "erased data subject keys");
        }
        Ok(out)
    }

    /// The data keys of `srefs` (subjects of `account`), by subject: one
    /// pass over the keys, however many subjects.
    fn keys_of(st: &Loaded, account: &AccountId, srefs: &[[u8; 16]]) -> HashMap<[u8; 16], Vec<KeyId>> {
        let wanted: std::collections::HashSet<&[u8; 16]> = srefs.iter().collect();
        let mut out: HashMap<[u8; 16], Vec<KeyId>> = HashMap::new();
        let Some(account) = st.state.accounts.get(account.as_str()) else { return out };
        for (id, r) in &st.state.data_keys {
            if let Some(sref) = r.subject_ref.as_ref().filter(|s| wanted.contains(s)) {
                if r.account == account {
                    out.entry(*sref).or_default().push(*id);
                }
            }
        }
        out
    }

    fn subject_ref(st: &Loaded, account: &AccountId, subject: &str) -> [u8; 16] {
        let mut mac = st.index.clone().expect("index key set at open");
        mac.update(account.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(subject.as_bytes());
        let d = mac.finalize().into_bytes();
        let mut r = [0u8; 16];
        r.copy_from_slice(&d[..16]);
        r
    }

    fn current(st: &Loaded, account: &AccountId, sref: Option<&[u8; 16]>) -> Option<KeyId> {
        match sref {
            Some(r) => st.state.current_subject.get(r).copied(),
            None => {
                let a = st.state.accounts.get(account.as_str())?;
                st.state.current_account.get(&a).copied()
            }
        }
    }

    fn cipher_cached(&self, st: &mut Loaded, id: KeyId) -> Result<Arc<DataCipher>> {
        if let Some(c) = st.cache.get(&id) {
            return Ok(c.clone());
        }
        let k = self.unwrap_key(st, id)?;
        let c = Arc::new(DataCipher::new(id, &k));
        st.cache.insert(id, c.clone());
        Ok(c)
    }

    fn unwrap_key(&self, st: &Loaded, id: KeyId) -> Result<SecretKey> {
        let Some(rec) = st.state.data_keys.get(&id) else {
            return Err(match st.state.erased.get(&id) {
                Some(e) => Error::KeyErased { key_id: id.to_hex(), erased_at: e.2.clone() },
                None => Error::UnknownKey { key_id: id.to_hex() },
            });
        };
        self.master.unwrap(&st.state.wrapped(rec), &dek_context(&id))
    }

    /// The current key of (account, subject), created if there is none,
    /// with the state locked and the log checked: the slow path of a
    /// lookup. `subject` carries its index key; `created` is the creation
    /// time to record (now, when `None`).
    fn locked_cipher(
        &self,
        st: &mut Loaded,
        account: &AccountId,
        subject: Option<(&str, u128)>,
        created: Option<&Created>,
    ) -> Result<Arc<DataCipher>> {
        let hot_key = subject.map(|(_, k)| k);
        // Another request, or an earlier event of this batch, may have
        // filled the entry meanwhile.
        if let Some(c) = hot_key.and_then(|k| self.hot.get(k)) {
            return Ok(c);
        }
        let sref = subject.map(|(s, _)| Self::subject_ref(st, account, s));
        if let Some(id) = Self::current(st, account, sref.as_ref()) {
            let c = self.cipher_cached(st, id)?;
            if let Some(k) = hot_key {
                self.hot.insert(k, c.clone());
            }
            return Ok(c);
        }
        let mut raw = [0u8; 16];
        st.rng.fill_bytes(&mut raw);
        let id = KeyId(raw);
        let context = dek_context(&id);
        let (k, wrapped) = self.master.generate(&context)?;
        let created = created.cloned().unwrap_or_else(Created::now);
        // The line is written straight from these parts, and the record
        // indexed without parsing it back.
        let id_hex = std::str::from_utf8(&context[4..]).expect("hex digits");
        let sref_hex = sref.map(|r| hex(&r));
        push_line(
            &mut st.pending,
            &DataKeyLine {
                id: id_hex,
                account: account.as_str(),
                subject_ref: sref_hex.as_deref(),
                current: true,
                wrapped: &wrapped,
                created: &created.text,
            },
        );
        let rec = DataKeyRecord {
            subject_ref: sref,
            current: true,
            account: st.state.accounts.id(account.as_str()),
            master: st.state.masters.id(&wrapped.master),
            created: created.nanos,
            at: None,
            blob: wrapped.blob.into_boxed_str(),
        };
        if created.nanos == ODD_CREATED {
            st.state.odd_created.insert(id, created.text.as_ref().into());
        }
        st.state.add_data_key(id, rec);
        let c = Arc::new(DataCipher::new(id, &k));
        st.cache.insert(id, c.clone());
        if let Some(k) = hot_key {
            self.hot.insert(k, c.clone());
        }
        Ok(c)
    }
}

impl<M: MasterKey> Keyring for EnvelopeKeyring<M> {
    fn token_key(&self, account: &AccountId) -> Result<SecretKey> {
        let mut st = lock(&self.state);
        self.reload(&mut st, false)?;
        let ctx = token_context(account.as_str());
        if let Some(w) = st.state.token_keys.get(account.as_str()) {
            return self.master.unwrap(w, &ctx);
        }
        let _guard = self.lock_file()?;
        self.reload(&mut st, false)?;
        if let Some(w) = st.state.token_keys.get(account.as_str()) {
            return self.master.unwrap(w, &ctx);
        }
        let (k, wrapped) = self.master.generate(&ctx)?;
        queue(&mut st, Line::TokenKey { account: account.to_string(), wrapped });
        // Token keys are few: make each durable at once.
        self.flush_pending(&mut st)?;
        Ok(k)
    }

    fn data_cipher(&self, account: &AccountId, subject: Option<&str>) -> Result<Arc<DataCipher>> {
        let hot_key = subject.map(|s| self.hot.key(account, s));
        if let Some(k) = hot_key {
            if self.hot.fresh() {
                if let Some(c) = self.hot.get(k) {
                    return Ok(c);
                }
            }
        }
        let mut st = lock(&self.state);
        // Check the log (which may empty the index) before looking again.
        self.refresh(&mut st)?;
        self.locked_cipher(
            &mut st,
            account,
            subject.map(|s| (s, hot_key.expect("set with the subject"))),
            None,
        )
    }

    fn data_ciphers(&self, account: &AccountId, subjects: &[&str]) -> Result<Vec<Arc<DataCipher>>> {
        let keys: Vec<u128> = subjects.iter().map(|s| self.hot.key(account, s)).collect();
        let mut out: Vec<Option<Arc<DataCipher>>> = vec![None; subjects.len()];
        if self.hot.fresh() {
            self.hot.get_many(&keys, &mut out);
        }
        if out.iter().any(Option::is_none) {
            let mut st = lock(&self.state);
            self.refresh(&mut st)?;
            // One timestamp for the keys this batch creates.
            let created = Created::now();
            for ((slot, s), k) in out.iter_mut().zip(subjects).zip(&keys) {
                if slot.is_none() {
                    *slot = Some(self.locked_cipher(&mut st, account, Some((s, *k)), Some(&created))?);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn data_ciphers_received(
        &self,
        account: &AccountId,
        subjects: &[&str],
        received_at: TimestampMicros,
    ) -> Result<Vec<Arc<DataCipher>>> {
        let mut st = lock(&self.state);
        // Replay is not the hot path: always see the newest log.
        self.reload(&mut st, false)?;
        let created = Created::now();
        let mut shredded = 0usize;
        let out = subjects
            .iter()
            .map(|s| {
                let sref = Self::subject_ref(&st, account, s);
                match st.state.erasures.get(&sref) {
                    Some(&(erased_at, id)) if received_at <= erased_at => {
                        shredded += 1;
                        Ok(Arc::new(DataCipher::new(id, &SecretKey::random())))
                    }
                    _ => {
                        let hot = self.hot.key(account, s);
                        self.locked_cipher(&mut st, account, Some((s, hot)), Some(&created))
                    }
                }
            })
            .collect();
        if shredded > 0 {
            tracing::info!(
                account = %account,
                events = shredded,
                "events received before their data subject was forgotten are stored under the erased key"
            );
        }
        out
    }

    fn sync(&self) -> Result<()> {
        let _one = lock(&self.syncing);
        let written = {
            let mut st = lock(&self.state);
            if st.pending.is_empty() {
                return Ok(());
            }
            let _guard = self.lock_file()?;
            self.write_pending(&mut st)?
        };
        let Some((file, lines)) = written else { return Ok(()) };
        // The slow part, with the state unlocked.
        file.sync_data().map_err(|e| {
            // A failed fsync may have dropped the lines from the page
            // cache: write them again at the next sync.
            give_back(&mut lock(&self.state), lines);
            self.io()(e)
        })
    }

    fn cipher_by_id(&self, id: &KeyId) -> Result<Arc<DataCipher>> {
        let mut st = lock(&self.state);
        // Decryption always sees the newest log: an erasure made by
        // another process is honoured at once.
        self.reload(&mut st, false)?;
        self.cipher_cached(&mut st, *id)
    }

    fn erased_keys(&self) -> Result<usize> {
        let mut st = lock(&self.state);
        self.reload(&mut st, false)?;
        Ok(st.state.erased.len())
    }

    fn forget(&self, account: &AccountId, subject: &str) -> Result<Erasure> {
        self.forget_subjects(account, &[subject])?
            .pop()
            .flatten()
            .ok_or_else(|| Error::NothingToForget { account: account.to_string() })
    }

    fn forget_subjects(&self, account: &AccountId, subjects: &[&str]) -> Result<Vec<Option<Erasure>>> {
        crate::keyring::per_distinct(subjects, |distinct| self.forget_distinct(account, distinct))
    }

    fn subject_keys(&self, account: &AccountId, subjects: &[&str]) -> Result<Vec<Option<Erasure>>> {
        let mut st = lock(&self.state);
        self.reload(&mut st, true)?;
        let srefs: Vec<[u8; 16]> = subjects.iter().map(|s| Self::subject_ref(&st, account, s)).collect();
        let keys = Self::keys_of(&st, account, &srefs);
        Ok(srefs
            .iter()
            .map(|sref| {
                keys.get(sref).map(|ids| {
                    let mut key_ids = ids.clone();
                    key_ids.sort();
                    Erasure { key_ids, subject_ref: hex(sref) }
                })
            })
            .collect())
    }

    fn rotate(&self) -> Result<String> {
        let new_master = self.master.rotate()?;
        let mut st = lock(&self.state);
        let guard = self.lock_file()?;
        self.reload(&mut st, true)?;
        let mut n = 0usize;
        let ids: Vec<KeyId> = st.state.data_keys.keys().copied().collect();
        for id in ids {
            let rec = &st.state.data_keys[&id];
            let k = self.master.unwrap(&st.state.wrapped(rec), &dek_context(&id))?;
            let wrapped = self.master.wrap(&k, &dek_context(&id))?;
            st.state.rewrap(&id, wrapped);
            st.state.data_keys.get_mut(&id).expect("listed above").current = false;
            n += 1;
        }
        st.state.current_account.clear();
        st.state.current_subject.clear();
        self.hot.clear();
        let accounts: Vec<String> = st.state.token_keys.keys().cloned().collect();
        for a in accounts {
            let ctx = token_context(&a);
            let w = st.state.token_keys.get_mut(&a).expect("listed above");
            let k = self.master.unwrap(w, &ctx)?;
            *w = self.master.wrap(&k, &ctx)?;
        }
        if let Some(w) = st.state.index_key.as_mut() {
            let k = self.master.unwrap(w, INDEX_CONTEXT)?;
            *w = self.master.wrap(&k, INDEX_CONTEXT)?;
        }
        self.compact(&mut st)?;
        drop(guard);
        drop(st);
        #[derive(Serialize)]
        struct Rec<'a> {
            action: &'static str,
            master_key: &'a str,
            data_keys_rewrapped: usize,
        }
        self.audit.append(&Rec { action: "rotate", master_key: &new_master, data_keys_rewrapped: n })?;
        Ok(new_master)
    }
}

impl<M: MasterKey> crate::keyring::Audited for EnvelopeKeyring<M> {
    fn audit_log(&self) -> &AuditLog {
        &self.audit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key logs whose next write is torn after so many bytes.
    static TORN: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    fn tear_next_write(log: &Path, keep: usize) {
        TORN.lock().unwrap().push((log.to_owned(), keep));
    }

    /// Whether the write to `path` is to be torn, and after how many bytes
    /// (once).
    pub(super) fn torn_write(path: &Path) -> Option<usize> {
        let mut torn = TORN.lock().unwrap();
        let i = torn.iter().position(|(p, _)| p == path)?;
        Some(torn.swap_remove(i).1)
    }

    /// However many subjects pass through, at most the configured number
    /// of keys stay unwrapped (and in the per-subject index); keys dropped
    /// from memory are unwrapped again, the same keys, when used.
    #[test]
    fn unwrapped_keys_in_memory_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let kr = LocalKeyring::open_local(dir.path()).unwrap().with_cached_keys(64);
        let mut ids = Vec::new();
        for i in 0..1000 {
            ids.push(kr.data_cipher(&a, Some(&format!("s-{i}"))).unwrap().id());
            let held = lock(&kr.state).cache.len();
            assert!(held <= 64, "{held} keys held after {i} subjects");
            let hot: usize = kr.hot.shards.iter().map(|s| lock(s).len()).sum();
            assert!(hot <= 64, "{hot} index entries after {i} subjects");
        }
        kr.sync().unwrap();
        let batch: Vec<String> = (0..1000).map(|i| format!("s-{i}")).collect();
        let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
        let again: Vec<KeyId> = kr.data_ciphers(&a, &batch).unwrap().iter().map(|c| c.id()).collect();
        assert_eq!(again, ids, "the same keys, unwrapped again");
        assert!(lock(&kr.state).cache.len() <= 64);
        let c = kr.cipher_by_id(&ids[0]).unwrap();
        let mut rng = ChaCha20Rng::from_entropy();
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        c.encrypt_into(b"plain", &mut rng, &mut buf, &mut out);
        let d = crate::Decryptor::new(&kr);
        let access = crate::Access { principal: "p".into(), purpose: "test".into() };
        let text = String::from_utf8(out).unwrap();
        assert_eq!(d.decrypt(&access, &[&text]).unwrap()[0].as_ref().unwrap().expose(), "plain");
    }

    fn log_lines(kr: &LocalKeyring) -> Vec<String> {
        std::fs::read_to_string(&kr.path).unwrap().lines().map(str::to_owned).collect()
    }

    fn ino(path: &Path) -> u64 {
        stamp(path).unwrap().ino
    }

    /// Keys of `n` subjects `s-0`… of one account, synced; the keyring and
    /// each key's line.
    fn subjects(dir: &Path, n: usize) -> (LocalKeyring, Vec<(KeyId, String)>) {
        let a = AccountId::new("111111111111").unwrap();
        let kr = LocalKeyring::open_local(dir).unwrap();
        let ids: Vec<KeyId> =
            (0..n).map(|i| kr.data_cipher(&a, Some(&format!("s-{i}"))).unwrap().id()).collect();
        kr.sync().unwrap();
        let lines = log_lines(&kr);
        let keys = ids
            .into_iter()
            .map(|id| {
                let l = lines.iter().find(|l| l.contains(&id.to_hex())).unwrap().clone();
                (id, l)
            })
            .collect();
        (kr, keys)
    }

    /// Through `kr`, the keys numbered `erased` read as erased and those
    /// numbered `kept` unwrap.
    fn assert_keys(kr: &LocalKeyring, keys: &[(KeyId, String)], erased: &[usize], kept: &[usize]) {
        for &i in erased {
            assert!(
                matches!(kr.cipher_by_id(&keys[i].0), Err(Error::KeyErased { .. })),
                "s-{i} is not erased"
            );
        }
        for &i in kept {
            assert_eq!(kr.cipher_by_id(&keys[i].0).unwrap().id(), keys[i].0, "s-{i}");
        }
    }

    fn blob(line: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["wrapped"]["blob"].as_str().unwrap().to_owned()
    }

    /// `forget` overwrites the subject's key lines where they are, the same
    /// length, and appends the erasure: the log is not rewritten, its
    /// other lines stay where they were, and every reader (this keyring,
    /// a new one) sees the erasure and the other keys.
    #[test]
    fn forget_shreds_the_subjects_lines_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, keys) = subjects(dir.path(), 20);
        let (before, ino_before) = (log_lines(&kr), ino(&kr.path));
        let e = kr.forget(&a, "s-3").unwrap();
        assert_eq!(e.key_ids, vec![keys[3].0]);
        let after = log_lines(&kr);
        assert_eq!(ino(&kr.path), ino_before, "the log was rewritten");
        assert_eq!(after.len(), before.len() + 1, "one erasure line appended");
        let shredded: Vec<(&String, &String)> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
        assert_eq!(shredded.len(), 1, "exactly the subject's line changed");
        let (old, new) = shredded[0];
        assert_eq!(old.len(), new.len());
        assert!(
            new.starts_with(r#"{"op":"shredded""#) && new.trim_end_matches('}').trim_end().len() == 16,
            "{new}"
        );
        let text = std::fs::read_to_string(&kr.path).unwrap();
        assert!(!text.contains(&blob(&keys[3].1)), "the wrapped key is still in the log");
        assert!(text.contains(&blob(&keys[4].1)));
        for reader in [&kr, &LocalKeyring::open_local(dir.path()).unwrap()] {
            assert_keys(reader, &keys, &[3], &[4]);
            assert_eq!(reader.data_cipher(&a, Some("s-5")).unwrap().id(), keys[5].0);
        }
        assert!(matches!(kr.forget(&a, "s-3"), Err(Error::NothingToForget { .. })));
        // New events of the subject get a new key, here and in a new reader.
        let other = LocalKeyring::open_local(dir.path()).unwrap();
        let new = other.data_cipher(&a, Some("s-3")).unwrap().id();
        assert_ne!(new, keys[3].0);
        assert_ne!(kr.data_cipher(&a, Some("s-3")).unwrap().id(), keys[3].0);
    }

    /// A keyring beside the one that forgets reads only what was appended
    /// to the log (its own keys, never read back, stay unplaced), and
    /// still sees the erasure.
    #[test]
    fn a_running_keyring_reads_only_the_appended_erasure() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (hub, keys) = subjects(dir.path(), 5);
        let cli = LocalKeyring::open_local(dir.path()).unwrap();
        cli.forget(&a, "s-1").unwrap();
        assert_keys(&hub, &keys, &[1], &[]);
        let st = lock(&hub.state);
        assert_eq!(st.read_len, std::fs::metadata(&hub.path).unwrap().len());
        assert!(st.state.data_keys[&keys[0].0].at.is_none(), "the whole log was read again");
    }

    /// Many subjects in one call: one erasure line each, every line
    /// shredded, unknown subjects answered `None`, one audit record per
    /// subject erased.
    #[test]
    fn forgetting_many_subjects_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, keys) = subjects(dir.path(), 30);
        let out = kr.forget_subjects(&a, &["s-2", "nobody", "s-7", "s-9", "s-7"]).unwrap();
        let ids: Vec<Option<Vec<KeyId>>> =
            out.iter().map(|e| e.as_ref().map(|e| e.key_ids.clone())).collect();
        let seven = Some(vec![keys[7].0]);
        assert_eq!(ids, vec![Some(vec![keys[2].0]), None, seven.clone(), Some(vec![keys[9].0]), seven]);
        let text = std::fs::read_to_string(&kr.path).unwrap();
        for i in [2, 7, 9] {
            assert!(!text.contains(&blob(&keys[i].1)), "s-{i}'s key is still in the log");
        }
        assert_eq!(log_lines(&kr).iter().filter(|l| l.contains(r#""op":"erased""#)).count(), 3);
        let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert_eq!(audit.lines().filter(|l| l.contains(r#""action":"forget""#)).count(), 3);
        assert_keys(&LocalKeyring::open_local(dir.path()).unwrap(), &keys, &[7], &[8]);
    }

    /// `subject_keys` answers as `forget_subjects` would, and erases
    /// nothing: the log, the audit log and the keys are as they were.
    #[test]
    fn subject_keys_is_forget_without_the_erasure() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, keys) = subjects(dir.path(), 10);
        let before = std::fs::read(&kr.path).unwrap();
        let asked = ["s-2", "nobody", "s-7", "s-7"];
        let found = kr.subject_keys(&a, &asked).unwrap();
        assert_eq!(std::fs::read(&kr.path).unwrap(), before, "the key log is untouched");
        let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default();
        assert!(!audit.contains(r#""action":"forget""#), "nothing erased, nothing audited");
        let other = AccountId::new("222222222222").unwrap();
        assert!(kr.subject_keys(&other, &["s-2"]).unwrap()[0].is_none(), "keys are per account");
        let erased = kr.forget_subjects(&a, &asked).unwrap();
        let view = |v: &[Option<Erasure>]| -> Vec<Option<(Vec<KeyId>, String)>> {
            v.iter().map(|e| e.as_ref().map(|e| (e.key_ids.clone(), e.subject_ref.clone()))).collect()
        };
        assert_eq!(view(&found), view(&erased));
        assert_eq!(found[0].as_ref().unwrap().key_ids, vec![keys[2].0]);
    }

    /// Once shredded lines would be half the log, `forget` compacts it
    /// instead: the log never holds more shredded bytes than live ones.
    #[test]
    fn the_log_is_compacted_once_half_of_it_is_shredded() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, keys) = subjects(dir.path(), 40);
        let first = ino(&kr.path);
        let mut compacted = false;
        for i in 0..30 {
            kr.forget(&a, &format!("s-{i}")).unwrap();
            let text = std::fs::read_to_string(&kr.path).unwrap();
            let shredded: usize =
                text.lines().filter(|l| l.starts_with(r#"{"op":"shredded""#)).map(|l| l.len() + 1).sum();
            assert!(shredded * 2 <= text.len(), "{shredded} of {} bytes shredded", text.len());
            compacted |= ino(&kr.path) != first;
        }
        assert!(compacted, "never compacted");
        assert_keys(&LocalKeyring::open_local(dir.path()).unwrap(), &keys, &[29], &[35]);
        // Still shredded in place after the compaction.
        let before = ino(&kr.path);
        kr.forget(&a, "s-39").unwrap();
        assert_eq!(ino(&kr.path), before);
    }

    /// A crash after the erasure was written but before the key's line
    /// was shredded: the next open shreds it. A key written twice (a write
    /// repeated after a failed fsync) loses both lines.
    #[test]
    fn lines_left_by_a_crash_are_shredded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (kr, keys) = subjects(dir.path(), 10);
        let path = kr.path.clone();
        drop(kr);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        // The line of s-4 written again, then the erasure of s-4 and s-6.
        writeln!(f, "{}", keys[4].1).unwrap();
        for i in [4, 6] {
            let v: serde_json::Value = serde_json::from_str(&keys[i].1).unwrap();
            let line = Line::Erased {
                ids: vec![keys[i].0.to_hex()],
                account: "111111111111".into(),
                subject_ref: v["subject_ref"].as_str().map(str::to_owned),
                erased_at: chrono::Utc::now().to_rfc3339(),
            };
            writeln!(f, "{}", serde_json::to_string(&line).unwrap()).unwrap();
        }
        drop(f);
        let kr = LocalKeyring::open_local(dir.path()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for i in [4, 6] {
            assert!(!text.contains(&blob(&keys[i].1)), "s-{i}'s key is still in the log");
        }
        assert_keys(&kr, &keys, &[4, 6], &[5]);
    }

    /// A last line torn by a crash is cut off at open, so the next key is
    /// a line of its own and the log reads back whole.
    #[test]
    fn a_torn_last_line_is_cut_off_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, keys) = subjects(dir.path(), 3);
        let path = kr.path.clone();
        drop(kr);
        let whole = std::fs::read(&path).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"data_key","id":"00112233"#).unwrap();
        drop(f);
        let kr = LocalKeyring::open_local(dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole, "the torn line is still there");
        let new = kr.data_cipher(&a, Some("s-new")).unwrap().id();
        kr.sync().unwrap();
        let again = LocalKeyring::open_local(dir.path()).unwrap();
        assert_eq!(again.data_cipher(&a, Some("s-new")).unwrap().id(), new);
        assert_eq!(again.data_cipher(&a, Some("s-1")).unwrap().id(), keys[1].0);
    }

    /// A log cut back and written again with a line boundary where a
    /// reader stopped (a failed write cut back, then another process's
    /// append): the reader sees that the line it read last is not there
    /// any more and reads the whole log, instead of reading on from a
    /// place whose lines it never saw.
    #[test]
    fn a_log_rewritten_under_a_reader_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (reader, _) = subjects(dir.path(), 3);
        let other = LocalKeyring::open_local(dir.path()).unwrap();
        let gone = other.data_cipher(&a, Some("s-gone")).unwrap().id();
        other.sync().unwrap();
        drop(other);
        assert_eq!(reader.cipher_by_id(&gone).unwrap().id(), gone);
        let lines = log_lines(&reader);
        let line = lines.last().unwrap();
        assert!(line.contains(&gone.to_hex()));
        // The same length, another key, where the read stopped.
        let replaced = KeyId::random();
        let text = std::fs::read_to_string(&reader.path).unwrap();
        let cut = text.len() - line.len() - 1;
        let f = OpenOptions::new().write(true).open(&reader.path).unwrap();
        f.set_len(cut as u64).unwrap();
        let mut f = OpenOptions::new().append(true).open(&reader.path).unwrap();
        writeln!(f, "{}", line.replace(&gone.to_hex(), &replaced.to_hex())).unwrap();
        drop(f);
        let later = LocalKeyring::open_local(dir.path()).unwrap();
        let next = later.data_cipher(&a, Some("s-next")).unwrap().id();
        later.sync().unwrap();
        assert_eq!(reader.cipher_by_id(&next).unwrap().id(), next);
        assert!(
            matches!(reader.cipher_by_id(&gone), Err(Error::UnknownKey { .. })),
            "a key no longer in the log is still known"
        );
    }

    /// Key lines as written by hand (an escaped account, creation times
    /// in other forms) read like the lines the keyring writes, and
    /// compaction keeps every key: the same fields, the same instant of
    /// creation, and a creation time that is not RFC 3339 as it was.
    #[test]
    fn hand_written_key_lines_read_alike_and_survive_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (kr, keys) = subjects(dir.path(), 3);
        let path = kr.path.clone();
        drop(kr);
        let text = std::fs::read_to_string(&path).unwrap();
        let created = |l: &str| -> String {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["created"].as_str().unwrap().to_owned()
        };
        let zulu = created(&keys[0].1).replace("+00:00", "Z");
        let edited = keys[0]
            .1
            .replace(r#""account":"111111111111""#, r#""account":"11111111111\u0031""#)
            .replace(&created(&keys[0].1), &zulu);
        let odd = keys[1].1.replace(&created(&keys[1].1), "the day before launch");
        let text = text.replace(&keys[0].1, &edited).replace(&keys[1].1, &odd);
        std::fs::write(&path, text).unwrap();

        let kr = LocalKeyring::open_local(dir.path()).unwrap();
        assert_keys(&kr, &keys, &[], &[0, 1, 2]);
        assert_eq!(kr.data_cipher(&a, Some("s-0")).unwrap().id(), keys[0].0);
        let before = log_lines(&kr);
        {
            let mut st = lock(&kr.state);
            let _guard = kr.lock_file().unwrap();
            kr.compact(&mut st).unwrap();
        }
        let after = log_lines(&kr);
        let data_keys = |lines: &[String]| -> Vec<serde_json::Value> {
            let mut v: Vec<serde_json::Value> = lines
                .iter()
                .filter(|l| l.contains(r#""op":"data_key""#))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            v.sort_by_key(|k| k["id"].as_str().unwrap().to_owned());
            v
        };
        let (before, after) = (data_keys(&before), data_keys(&after));
        assert_eq!(before.len(), 3);
        for (b, c) in before.iter().zip(&after) {
            let instant = |v: &serde_json::Value| {
                let t = v["created"].as_str().unwrap();
                chrono::DateTime::parse_from_rfc3339(t).map_or_else(|_| t.to_owned(), |t| t.to_rfc3339())
            };
            assert_eq!(instant(b), instant(c));
            let strip = |v: &serde_json::Value| {
                let mut v = v.clone();
                v.as_object_mut().unwrap().remove("created");
                v
            };
            assert_eq!(strip(b), strip(c));
        }
        assert!(after.iter().any(|k| k["created"] == "the day before launch"));
        // The escaped account is the account: its subject is forgotten.
        assert_eq!(kr.forget(&a, "s-0").unwrap().key_ids, vec![keys[0].0]);
        assert_keys(&LocalKeyring::open_local(dir.path()).unwrap(), &keys, &[0], &[1, 2]);
    }

    /// A data key line with a field the keyring does not know is an
    /// error, as any other line that does not read (the fast path for
    /// data key lines accepts nothing more).
    #[test]
    fn a_key_line_with_an_unknown_field_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (kr, keys) = subjects(dir.path(), 2);
        let path = kr.path.clone();
        drop(kr);
        let text = std::fs::read_to_string(&path).unwrap();
        let extra = keys[1].1.replace(r#""current":"#, r#""colour":"blue","current":"#);
        std::fs::write(&path, text.replace(&keys[1].1, &extra)).unwrap();
        match LocalKeyring::open_local(dir.path()) {
            Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("colour"), "{detail}"),
            other => panic!("opened: {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn a_failed_key_log_write_is_cut_back_and_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let kr = LocalKeyring::open_local(dir.path()).unwrap();
        let first = kr.data_cipher(&a, Some("s-1")).unwrap().id();
        kr.sync().unwrap();
        let second = kr.data_cipher(&a, Some("s-2")).unwrap().id();
        tear_next_write(&kr.path, 20);
        assert!(kr.sync().is_err(), "the torn write fails the sync");
        kr.sync().unwrap();
        // The log reads back whole, with both keys.
        let other = LocalKeyring::open_local(dir.path()).unwrap();
        assert_eq!(other.data_cipher(&a, Some("s-1")).unwrap().id(), first);
        assert_eq!(other.data_cipher(&a, Some("s-2")).unwrap().id(), second);
    }
}
