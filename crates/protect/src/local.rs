//! The local master key: AES-256-GCM key-wrapping keys kept in
//! `master.json` (mode 0600) in the keyring directory. Rotation adds a key
//! and makes it active; old keys stay to unwrap what they wrapped.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aes_gcm::aead::Aead;
use aes_gcm::aead::Payload;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{ensure_dir, write_atomic};
use crate::keyring::{MasterKey, Wrapped};
use crate::secret::SecretKey;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterFile {
    format: u32,
    active: String,
    keys: Vec<MasterRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MasterRecord {
    id: String,
    key: String,
    created: String,
}

/// Master keys in a local file.
pub struct LocalMasterKey {
    path: PathBuf,
    state: Mutex<Vec<(String, Aes256Gcm)>>,
    active: Mutex<String>,
    /// Nonces and new keys: ChaCha20 seeded from the OS, so creating a
    /// key costs no system call.
    rng: Mutex<ChaCha20Rng>,
}

impl std::fmt::Debug for LocalMasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalMasterKey({}, **REDACTED**)", self.path.display())
    }
}

impl LocalMasterKey {
    /// Open `dir/master.json`, creating it (0600) with one fresh key on
    /// first use.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] when the file cannot be used.
    pub fn open(dir: &Path) -> Result<Self> {
        ensure_dir(dir)?;
        let path = dir.join("master.json");
        if !path.exists() {
            let file = MasterFile { format: 1, active: String::new(), keys: Vec::new() };
            let mk = Self {
                path,
                state: Mutex::new(Vec::new()),
                active: Mutex::new(String::new()),
                rng: Mutex::new(ChaCha20Rng::from_entropy()),
            };
            mk.add_key(file)?;
            return Ok(mk);
        }
        let file = read(&path)?;
        let mut keys = Vec::new();
        for r in &file.keys {
            keys.push((r.id.clone(), cipher(&path, r)?));
        }
        if !keys.iter().any(|(id, _)| *id == file.active) {
            return Err(Error::Corrupt {
                path,
                detail: format!("active master key {} is missing", file.active),
            });
        }
        Ok(Self {
            path,
            state: Mutex::new(keys),
            active: Mutex::new(file.active),
            rng: Mutex::new(ChaCha20Rng::from_entropy()),
        })
    }

    fn add_key(&self, mut file: MasterFile) -> Result<String> {
        let id = format!("mk-{}", file.keys.len() + 1);
        let key = SecretKey::random();
        let record = MasterRecord {
            id: id.clone(),
            key: STANDARD.encode(key.expose()),
            created: chrono::Utc::now().to_rfc3339(),
        };
        let c = cipher(&self.path, &record)?;
        file.keys.push(record);
        file.active = id.clone();
        let bytes = serde_json::to_vec_pretty(&file).expect("serialisable");
        write_atomic(&self.path, &bytes)?;
        lock(&self.state).push((id.clone(), c));
        *lock(&self.active) = id.clone();
        Ok(id)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read(path: &Path) -> Result<MasterFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Corrupt { path: path.to_owned(), detail: e.to_string() })
}

fn cipher(path: &Path, r: &MasterRecord) -> Result<Aes256Gcm> {
    let raw = STANDARD.decode(&r.key).ok().and_then(|b| SecretKey::from_slice(&b)).ok_or_else(|| {
        Error::Corrupt {
            path: path.to_owned(),
            detail: format!("master key {} is not 32 bytes of base64", r.id),
        }
    })?;
    Ok(Aes256Gcm::new(raw.expose().into()))
}

impl MasterKey for LocalMasterKey {
    fn wrap(&self, key: &SecretKey, context: &[u8]) -> Result<Wrapped> {
        let active = lock(&self.active).clone();
        let state = lock(&self.state);
        let c = &state.iter().find(|(id, _)| *id == active).expect("active key loaded").1;
        let mut nonce = [0u8; 12];
        lock(&self.rng).fill_bytes(&mut nonce);
        let ct = c
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: key.expose(), aad: context })
            .expect("AES-GCM wraps 32 bytes");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(Wrapped { master: active, blob: STANDARD.encode(blob) })
    }

    fn unwrap(&self, wrapped: &Wrapped, context: &[u8]) -> Result<SecretKey> {
        let state = lock(&self.state);
        let c = &state
            .iter()
            .find(|(id, _)| *id == wrapped.master)
            .ok_or_else(|| Error::UnknownMaster { master_id: wrapped.master.clone() })?
            .1;
        let fail = || Error::Unwrap {
            key_id: String::from_utf8_lossy(context).into_owned(),
            master_id: wrapped.master.clone(),
        };
        let blob = STANDARD.decode(&wrapped.blob).map_err(|_| fail())?;
        if blob.len() < 12 {
            return Err(fail());
        }
        let plain = c
            .decrypt(Nonce::from_slice(&blob[..12]), Payload { msg: &blob[12..], aad: context })
            .map_err(|_| fail())?;
        SecretKey::from_slice(&plain).ok_or_else(fail)
    }

    fn generate(&self, context: &[u8]) -> Result<(SecretKey, Wrapped)> {
        let mut raw = [0u8; 32];
        lock(&self.rng).fill_bytes(&mut raw);
        let k = SecretKey::new(raw);
        let w = self.wrap(&k, context)?;
        Ok((k, w))
    }

    fn rotate(&self) -> Result<String> {
        let file = read(&self.path)?;
        self.add_key(file)
    }
}
