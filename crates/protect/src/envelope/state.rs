//! What the key log says, held in memory.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;

use hmac::Hmac;
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use watershed_event::TimestampMicros;

use super::line::{parse_nanos, push_line, ref_from_hex, DataKeyParts, Line, LineAt, ODD_CREATED};
use crate::cipher::{hex, DataCipher, KeyId};
use crate::fsutil::Stamp;
use crate::keyring::Wrapped;

/// A data key as held in memory: a million of them must fit in a few
/// hundred megabytes, so repeated strings (the account, the master key
/// id) are interned and the creation time is kept as an instant.
pub(super) struct DataKeyRecord {
    pub(super) subject_ref: Option<[u8; 16]>,
    pub(super) current: bool,
    /// In [`State::accounts`].
    pub(super) account: u32,
    /// In [`State::masters`]: which master key wrapped it.
    pub(super) master: u32,
    /// Nanoseconds since the epoch, UTC ([`ODD_CREATED`] when the log's
    /// text was not RFC 3339: the text is then in [`State::odd_created`]).
    pub(super) created: i64,
    /// Its line in the log, once read from there (keys this process
    /// created are written without being read back).
    pub(super) at: Option<LineAt>,
    /// The wrapped key bytes, base64, as in the log.
    pub(super) blob: Box<str>,
}

/// Strings that many records repeat, each held once and named by its
/// number.
#[derive(Default)]
pub(super) struct Interned {
    pub(super) names: Vec<Box<str>>,
    pub(super) index: Map<Box<str>, u32>,
}

impl Interned {
    pub(super) fn id(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 distinct names");
        self.names.push(name.into());
        self.index.insert(name.into(), i);
        i
    }

    pub(super) fn get(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub(super) fn name(&self, i: u32) -> &str {
        &self.names[i as usize]
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) index_key: Option<Wrapped>,
    pub(super) token_keys: HashMap<String, Wrapped>,
    pub(super) data_keys: Map<KeyId, DataKeyRecord>,
    pub(super) accounts: Interned,
    pub(super) masters: Interned,
    /// Creation times that were not RFC 3339, kept as written.
    pub(super) odd_created: Map<KeyId, Box<str>>,
    /// Current account-wide key per account (in `accounts`).
    pub(super) current_account: HashMap<u32, KeyId>,
    /// Current key per subject reference (which covers the account).
    pub(super) current_subject: Map<[u8; 16], KeyId>,
    /// Erased keys: the account, the subject reference and when, as
    /// written in the erasure (shared by the keys it erased).
    pub(super) erased: Map<KeyId, ErasedKey>,
    /// The latest erasure per subject reference: when, and one of the
    /// keys it erased.
    pub(super) erasures: Map<[u8; 16], (TimestampMicros, KeyId)>,
    /// Earlier lines of a key written more than once (a write repeated
    /// after a failed fsync): shredded with the key.
    pub(super) repeated: Map<KeyId, Vec<LineAt>>,
    /// Lines in the log that still hold the material of erased keys.
    pub(super) unshredded: Vec<LineAt>,
    /// Bytes of shredded lines in the log (newlines included).
    pub(super) shredded_bytes: u64,
}

/// An erasure as its line names it (account, subject reference, when),
/// shared by the keys it erased.
pub(super) type ErasedKey = Arc<(String, Option<String>, String)>;

/// The maps of key ids and subject references: ahash (seeded per
/// process) hashes a 16-byte key several times faster than SipHash, which
/// counts when a log of a million keys is read.
pub(super) type Map<K, V> = HashMap<K, V, ahash::RandomState>;

impl State {
    /// Apply `line`, read from `at` in the log (`None`: not read from
    /// the log).
    pub(super) fn apply(&mut self, line: Line, at: Option<LineAt>) {
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
    pub(super) fn apply_data_key(&mut self, p: DataKeyParts<'_>, at: Option<LineAt>) {
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
    pub(super) fn add_data_key(&mut self, id: KeyId, mut rec: DataKeyRecord) {
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
    pub(super) fn wrapped(&self, rec: &DataKeyRecord) -> Wrapped {
        Wrapped { master: self.masters.name(rec.master).to_owned(), blob: rec.blob.to_string() }
    }

    /// Replace a data key's wrapped bytes.
    pub(super) fn rewrap(&mut self, id: &KeyId, wrapped: Wrapped) {
        let master = self.masters.id(&wrapped.master);
        if let Some(rec) = self.data_keys.get_mut(id) {
            rec.master = master;
            rec.blob = wrapped.blob.into_boxed_str();
        }
    }

    /// A data key's creation time as written in its line.
    pub(super) fn created_text(&self, id: &KeyId, rec: &DataKeyRecord) -> String {
        match self.odd_created.get(id) {
            Some(text) => text.to_string(),
            None => chrono::DateTime::from_timestamp_nanos(rec.created).to_rfc3339(),
        }
    }

    /// The whole state as log lines (for compaction).
    pub(super) fn snapshot(&self) -> Vec<Line> {
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

pub(super) struct Loaded {
    pub(super) state: State,
    pub(super) stamp: Option<Stamp>,
    /// The log's bytes applied to `state`, up to the end of a whole line:
    /// when the log grows in place, only what follows is read.
    pub(super) read_len: u64,
    /// The line that ends at `read_len`, newline included (empty at 0): a
    /// tail read first checks that it is still there, so a log cut back
    /// and written again with a line boundary at the same place is read
    /// whole rather than from a place that now means something else.
    pub(super) last_line: Vec<u8>,
    pub(super) file: Option<Arc<File>>,
    /// Lines of keys created here and not yet written, as JSON lines:
    /// written and fsynced by [`crate::Keyring::sync`], and re-applied after a
    /// reload.
    pub(super) pending: Vec<u8>,
    /// Key ids and key material for new keys (seeded from the OS).
    pub(super) rng: ChaCha20Rng,
    pub(super) index: Option<Hmac<Sha256>>,
    pub(super) cache: CipherCache,
}

/// Unwrapped data keys, keyed for AES (about 1 KiB each), bounded: two
/// generations, the younger taking new and recently used keys; when it is
/// full the older one is dropped and the younger takes its place. A key
/// not held is unwrapped and keyed again when used (a few µs).
pub(super) struct CipherCache {
    pub(super) young: HashMap<KeyId, Arc<DataCipher>>,
    pub(super) old: HashMap<KeyId, Arc<DataCipher>>,
    /// Keys per generation.
    pub(super) half: usize,
}

impl CipherCache {
    pub(super) fn new(limit: usize) -> Self {
        Self { young: HashMap::new(), old: HashMap::new(), half: (limit / 2).max(1) }
    }

    pub(super) fn get(&mut self, id: &KeyId) -> Option<Arc<DataCipher>> {
        if let Some(c) = self.young.get(id) {
            return Some(c.clone());
        }
        let c = self.old.remove(id)?;
        self.insert(*id, c.clone());
        Some(c)
    }

    pub(super) fn insert(&mut self, id: KeyId, c: Arc<DataCipher>) {
        if self.young.len() >= self.half {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, c);
    }

    pub(super) fn retain(&mut self, keep: impl Fn(&KeyId) -> bool) {
        self.young.retain(|id, _| keep(id));
        self.old.retain(|id, _| keep(id));
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// Apply a new line now and write it at the next sync.
pub(super) fn queue(st: &mut Loaded, line: Line) {
    push_line(&mut st.pending, &line);
    st.state.apply(line, None);
}

/// Put lines whose fsync failed back in front of the pending ones: a
/// failed fsync may have dropped them from the page cache, so they are
/// written again at the next sync (applying a line twice is harmless).
pub(super) fn give_back(st: &mut Loaded, mut lines: Vec<u8>) {
    lines.extend_from_slice(&st.pending);
    st.pending = lines;
}
