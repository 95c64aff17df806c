//! [`EnvelopeKeyring`]: data and tokenization keys stored wrapped in
//! `keys.json` (mode 0600), under a [`MasterKey`] (a local key file or AWS
//! KMS). Every change is a read-modify-write under an exclusive file lock
//! followed by an atomic replace, so a `keys forget` from the command line
//! and a running hub never lose each other's updates; readers notice a
//! replaced file and drop erased keys from their caches.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use watershed_event::AccountId;

use crate::audit::AuditLog;
use crate::cipher::KeyId;
use crate::error::{Error, Result};
use crate::fsutil::{ensure_dir, stamp, write_atomic, Stamp};
use crate::keyring::{Erasure, Keyring, MasterKey, Wrapped};
use crate::local::LocalMasterKey;
use crate::secret::SecretKey;

#[derive(Serialize, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    format: u32,
    /// Bumped by every change.
    generation: u64,
    /// Keys the HMAC that turns subject ids into references.
    index_key: Option<Wrapped>,
    token_keys: BTreeMap<String, Wrapped>,
    data_keys: BTreeMap<String, DataKeyRecord>,
    erased: BTreeMap<String, ErasedRecord>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct DataKeyRecord {
    account: String,
    /// Keyed reference of the subject; `None` for the account-wide key.
    subject_ref: Option<String>,
    /// Whether new events use this key (false after a rotation).
    current: bool,
    wrapped: Wrapped,
    created: String,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ErasedRecord {
    account: String,
    subject_ref: Option<String>,
    erased_at: String,
}

struct Loaded {
    file: KeysFile,
    stamp: Option<Stamp>,
    index: Option<Hmac<Sha256>>,
    cache: HashMap<KeyId, SecretKey>,
}

/// Envelope-encrypted keys in a local file. See the module docs.
pub struct EnvelopeKeyring<M: MasterKey> {
    path: PathBuf,
    lock_path: PathBuf,
    master: M,
    audit: AuditLog,
    state: Mutex<Loaded>,
}

/// The embedded default: a keyring directory with its own master key file.
pub type LocalKeyring = EnvelopeKeyring<LocalMasterKey>;

impl<M: MasterKey> std::fmt::Debug for EnvelopeKeyring<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EnvelopeKeyring({}, {:?})",
            self.path.display(),
            self.master
        )
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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn dek_context(id: &KeyId) -> Vec<u8> {
    format!("dek:{}", id.to_hex()).into_bytes()
}

fn token_context(account: &str) -> Vec<u8> {
    format!("tok:{account}").into_bytes()
}

const INDEX_CONTEXT: &[u8] = b"idx";

impl<M: MasterKey> EnvelopeKeyring<M> {
    /// Open `dir/keys.json` under `master`, creating it on first use.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] when the files cannot be used.
    pub fn open(dir: &Path, master: M) -> Result<Self> {
        ensure_dir(dir)?;
        let kr = Self {
            path: dir.join("keys.json"),
            lock_path: dir.join("keys.lock"),
            audit: AuditLog::open(&dir.join("audit.log"))?,
            master,
            state: Mutex::new(Loaded {
                file: KeysFile::default(),
                stamp: None,
                index: None,
                cache: HashMap::new(),
            }),
        };
        {
            let mut st = lock(&kr.state);
            kr.reload(&mut st)?;
            if st.file.index_key.is_none() {
                kr.mutate(&mut st, |_, _| Ok(()))?;
            }
        }
        Ok(kr)
    }

    /// The audit log shared by this keyring and its decryptors.
    #[must_use]
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    fn reload(&self, st: &mut Loaded) -> Result<()> {
        let now = stamp(&self.path);
        if now.is_some() && now == st.stamp {
            return Ok(());
        }
        let file: KeysFile = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeysFile {
                format: 1,
                ..KeysFile::default()
            },
            Err(source) => {
                return Err(Error::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        st.cache
            .retain(|id, _| file.data_keys.contains_key(&id.to_hex()));
        if st.index.is_none() {
            if let Some(w) = &file.index_key {
                let k = self.master.unwrap(w, INDEX_CONTEXT)?;
                st.index = Some(
                    <Hmac<Sha256> as Mac>::new_from_slice(k.expose()).expect("any key length"),
                );
            }
        }
        st.file = file;
        st.stamp = now;
        Ok(())
    }

    /// Read-modify-write under the file lock.
    fn mutate<T>(
        &self,
        st: &mut Loaded,
        f: impl FnOnce(&mut KeysFile, &M) -> Result<T>,
    ) -> Result<T> {
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|source| Error::Io {
                path: self.lock_path.clone(),
                source,
            })?;
        lock_file.lock().map_err(|source| Error::Io {
            path: self.lock_path.clone(),
            source,
        })?;
        let result = self.mutate_locked(st, f);
        drop(lock_file);
        result
    }

    fn mutate_locked<T>(
        &self,
        st: &mut Loaded,
        f: impl FnOnce(&mut KeysFile, &M) -> Result<T>,
    ) -> Result<T> {
        st.stamp = None;
        self.reload(st)?;
        let mut file = st.file.clone();
        file.format = 1;
        if file.index_key.is_none() {
            let k = SecretKey::random();
            file.index_key = Some(self.master.wrap(&k, INDEX_CONTEXT)?);
            st.index =
                Some(<Hmac<Sha256> as Mac>::new_from_slice(k.expose()).expect("any key length"));
        }
        let out = f(&mut file, &self.master)?;
        file.generation += 1;
        let bytes = serde_json::to_vec_pretty(&file).expect("serialisable");
        write_atomic(&self.path, &bytes)?;
        st.file = file;
        st.stamp = stamp(&self.path);
        st.cache
            .retain(|id, _| st.file.data_keys.contains_key(&id.to_hex()));
        Ok(out)
    }

    fn subject_ref(st: &Loaded, account: &AccountId, subject: &str) -> String {
        let mut mac = st.index.clone().expect("index key set at open");
        mac.update(account.as_str().as_bytes());
        mac.update(&[0]);
        mac.update(subject.as_bytes());
        let d = mac.finalize().into_bytes();
        d[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn find_current(file: &KeysFile, account: &str, subject_ref: Option<&str>) -> Option<KeyId> {
        file.data_keys
            .iter()
            .find(|(_, r)| {
                r.current && r.account == account && r.subject_ref.as_deref() == subject_ref
            })
            .and_then(|(id, _)| KeyId::from_hex(id))
    }

    fn unwrap_cached(&self, st: &mut Loaded, id: KeyId) -> Result<SecretKey> {
        if let Some(k) = st.cache.get(&id) {
            return Ok(k.clone());
        }
        let hex = id.to_hex();
        let Some(rec) = st.file.data_keys.get(&hex) else {
            return Err(match st.file.erased.get(&hex) {
                Some(e) => Error::KeyErased {
                    key_id: hex,
                    erased_at: e.erased_at.clone(),
                },
                None => Error::UnknownKey { key_id: hex },
            });
        };
        let k = self.master.unwrap(&rec.wrapped, &dek_context(&id))?;
        st.cache.insert(id, k.clone());
        Ok(k)
    }
}

impl<M: MasterKey> Keyring for EnvelopeKeyring<M> {
    fn token_key(&self, account: &AccountId) -> Result<SecretKey> {
        let mut st = lock(&self.state);
        self.reload(&mut st)?;
        let ctx = token_context(account.as_str());
        if let Some(w) = st.file.token_keys.get(account.as_str()) {
            return self.master.unwrap(w, &ctx);
        }
        self.mutate(&mut st, |file, master| {
            if let Some(w) = file.token_keys.get(account.as_str()) {
                return master.unwrap(w, &ctx);
            }
            let (k, w) = master.generate(&ctx)?;
            file.token_keys.insert(account.to_string(), w);
            Ok(k)
        })
    }

    fn data_key(&self, account: &AccountId, subject: Option<&str>) -> Result<(KeyId, SecretKey)> {
        let mut st = lock(&self.state);
        self.reload(&mut st)?;
        let sref = subject.map(|s| Self::subject_ref(&st, account, s));
        if let Some(id) = Self::find_current(&st.file, account.as_str(), sref.as_deref()) {
            let k = self.unwrap_cached(&mut st, id)?;
            return Ok((id, k));
        }
        let (id, key) = self.mutate(&mut st, |file, master| {
            if let Some(id) = Self::find_current(file, account.as_str(), sref.as_deref()) {
                let rec = &file.data_keys[&id.to_hex()];
                return Ok((id, master.unwrap(&rec.wrapped, &dek_context(&id))?));
            }
            let id = KeyId::random();
            let (k, wrapped) = master.generate(&dek_context(&id))?;
            file.data_keys.insert(
                id.to_hex(),
                DataKeyRecord {
                    account: account.to_string(),
                    subject_ref: sref.clone(),
                    current: true,
                    wrapped,
                    created: chrono::Utc::now().to_rfc3339(),
                },
            );
            Ok((id, k))
        })?;
        st.cache.insert(id, key.clone());
        Ok((id, key))
    }

    fn key_by_id(&self, id: &KeyId) -> Result<SecretKey> {
        let mut st = lock(&self.state);
        self.reload(&mut st)?;
        self.unwrap_cached(&mut st, *id)
    }

    fn forget(&self, account: &AccountId, subject: &str) -> Result<Erasure> {
        let mut st = lock(&self.state);
        self.reload(&mut st)?;
        let sref = Self::subject_ref(&st, account, subject);
        let now = chrono::Utc::now().to_rfc3339();
        let ids = self.mutate(&mut st, |file, _| {
            let ids: Vec<String> = file
                .data_keys
                .iter()
                .filter(|(_, r)| {
                    r.account == account.as_str() && r.subject_ref.as_deref() == Some(sref.as_str())
                })
                .map(|(id, _)| id.clone())
                .collect();
            if ids.is_empty() {
                return Err(Error::NothingToForget {
                    account: account.to_string(),
                });
            }
            for id in &ids {
                file.data_keys.remove(id);
                file.erased.insert(
                    id.clone(),
                    ErasedRecord {
                        account: account.to_string(),
                        subject_ref: Some(sref.clone()),
                        erased_at: now.clone(),
                    },
                );
            }
            Ok(ids)
        })?;
        drop(st);
        #[derive(Serialize)]
        struct Rec<'a> {
            action: &'static str,
            account: &'a str,
            subject_ref: &'a str,
            key_ids: &'a [String],
        }
        self.audit.append(&Rec {
            action: "forget",
            account: account.as_str(),
            subject_ref: &sref,
            key_ids: &ids,
        })?;
        tracing::info!(account = %account, subject_ref = %sref, keys = ids.len(), "erased data subject keys");
        Ok(Erasure {
            key_ids: ids.iter().filter_map(|h| KeyId::from_hex(h)).collect(),
            subject_ref: sref,
        })
    }

    fn rotate(&self) -> Result<String> {
        let new_master = self.master.rotate()?;
        let mut st = lock(&self.state);
        let rewrapped = self.mutate(&mut st, |file, master| {
            let mut n = 0usize;
            for (hex, rec) in &mut file.data_keys {
                let id = KeyId::from_hex(hex).ok_or_else(|| Error::Corrupt {
                    path: PathBuf::from("keys.json"),
                    detail: format!("bad key id {hex}"),
                })?;
                let k = master.unwrap(&rec.wrapped, &dek_context(&id))?;
                rec.wrapped = master.wrap(&k, &dek_context(&id))?;
                rec.current = false;
                n += 1;
            }
            for (account, w) in &mut file.token_keys {
                let ctx = token_context(account);
                let k = master.unwrap(w, &ctx)?;
                *w = master.wrap(&k, &ctx)?;
            }
            if let Some(w) = &mut file.index_key {
                let k = master.unwrap(w, INDEX_CONTEXT)?;
                *w = master.wrap(&k, INDEX_CONTEXT)?;
            }
            Ok(n)
        })?;
        drop(st);
        #[derive(Serialize)]
        struct Rec<'a> {
            action: &'static str,
            master_key: &'a str,
            data_keys_rewrapped: usize,
        }
        self.audit.append(&Rec {
            action: "rotate",
            master_key: &new_master,
            data_keys_rewrapped: rewrapped,
        })?;
        Ok(new_master)
    }
}

impl<M: MasterKey> crate::keyring::Audited for EnvelopeKeyring<M> {
    fn audit_log(&self) -> &AuditLog {
        &self.audit
    }
}
