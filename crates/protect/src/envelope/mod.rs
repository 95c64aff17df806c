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
//!
//! The parts: `line` (the log's line format), `state` (what the log says,
//! in memory), `log` (reading, appending, compacting and shredding the
//! file), `hot` (the per-event cipher lookup); the keyring API is here.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use watershed_event::{AccountId, TimestampMicros};

use crate::audit::{Access, AuditLog};
use crate::cipher::{hex, hex_into};
use crate::cipher::{DataCipher, KeyId};
use crate::error::{Error, Result};
use crate::fsutil::ensure_dir;
use crate::keyring::{Erasure, Keyring, MasterKey};
use crate::local::LocalMasterKey;
use crate::secret::SecretKey;

mod hot;
mod line;
mod log;
mod state;
#[cfg(test)]
mod tests;

use hot::{Hot, HOT_SHARDS};
use line::{push_line, Created, DataKeyLine, Line, ODD_CREATED};
use state::{give_back, queue, CipherCache, DataKeyRecord, Loaded, State};

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

/// How often the encryption path looks for changes by other processes.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

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

    /// [`Keyring::forget_subjects`] for subjects named once each.
    fn forget_distinct(
        &self,
        account: &AccountId,
        subjects: &[&str],
        by: &Access,
    ) -> Result<Vec<Option<Erasure>>> {
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
        for e in out.iter().flatten() {
            let ids: Vec<String> = e.key_ids.iter().map(KeyId::to_hex).collect();
            let detail = serde_json::json!({"account": account.as_str(), "subject_ref": e.subject_ref, "key_ids": ids});
            self.audit.record("forget", by, &detail)?;
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

    fn forget(&self, account: &AccountId, subject: &str, by: &Access) -> Result<Erasure> {
        self.forget_subjects(account, &[subject], by)?
            .pop()
            .flatten()
            .ok_or_else(|| Error::NothingToForget { account: account.to_string() })
    }

    fn forget_subjects(
        &self,
        account: &AccountId,
        subjects: &[&str],
        by: &Access,
    ) -> Result<Vec<Option<Erasure>>> {
        by.check()?;
        crate::keyring::per_distinct(subjects, |distinct| self.forget_distinct(account, distinct, by))
    }

    fn subject_keys(
        &self,
        account: &AccountId,
        subjects: &[&str],
        by: &Access,
    ) -> Result<Vec<Option<Erasure>>> {
        by.check()?;
        let mut st = lock(&self.state);
        self.reload(&mut st, true)?;
        let srefs: Vec<[u8; 16]> = subjects.iter().map(|s| Self::subject_ref(&st, account, s)).collect();
        let keys = Self::keys_of(&st, account, &srefs);
        drop(st);
        let found: Vec<Option<Erasure>> = srefs
            .iter()
            .map(|sref| {
                keys.get(sref).map(|ids| {
                    let mut key_ids = ids.clone();
                    key_ids.sort();
                    Erasure { key_ids, subject_ref: hex(sref) }
                })
            })
            .collect();
        let mut subject_refs: Vec<String> = srefs.iter().map(|r| hex(r)).collect();
        subject_refs.sort();
        subject_refs.dedup();
        let detail = serde_json::json!({"account": account.as_str(), "subject_refs": subject_refs, "with_keys": keys.len()});
        self.audit.record("forget_dry_run", by, &detail)?;
        Ok(found)
    }

    fn rotate(&self, by: &Access) -> Result<String> {
        by.check()?;
        let mut st = lock(&self.state);
        // Under the file lock: two rotations at once would both add the
        // same next master key id.
        let guard = self.lock_file()?;
        let new_master = self.master.rotate()?;
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
        let detail = serde_json::json!({"master_key": new_master, "data_keys_rewrapped": n});
        self.audit.record("rotate", by, &detail)?;
        Ok(new_master)
    }
}

impl<M: MasterKey> crate::keyring::Audited for EnvelopeKeyring<M> {
    fn audit_log(&self) -> &AuditLog {
        &self.audit
    }
}
