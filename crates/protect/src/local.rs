//! The local master key: AES-256-GCM key-wrapping keys kept in
//! `master.json` (mode 0600) in the keyring directory. Rotation adds a key
//! and makes it active; old keys stay to unwrap what they wrapped.
//!
//! The file holds the keys in plaintext, or *sealed*: wrapped by another
//! master key (AWS KMS), bound to their ids, and unsealed once when the
//! keyring opens. Data keys are then wrapped and unwrapped locally, so a
//! new data subject costs no KMS request, while the keyring on disk is
//! unreadable without the KMS key.

use std::fs::OpenOptions;
use std::io::Write as _;
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
use crate::fsutil::{ensure_dir, stamp, sync_dir, write_atomic};
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
    /// The key in plaintext (base64), in an unsealed file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// The key wrapped by the sealing master key, in a sealed file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<Wrapped>,
    created: String,
}

/// Master keys in a local file, optionally sealed by another master key.
pub struct LocalMasterKey {
    path: PathBuf,
    state: Mutex<Vec<(String, Aes256Gcm)>>,
    active: Mutex<String>,
    /// Nonces and new keys: ChaCha20 seeded from the OS, so creating a
    /// key costs no system call.
    rng: Mutex<ChaCha20Rng>,
    /// What seals the file's keys, if anything.
    sealer: Option<Box<dyn MasterKey>>,
}

impl std::fmt::Debug for LocalMasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sealer {
            None => write!(f, "LocalMasterKey({}, **REDACTED**)", self.path.display()),
            Some(s) => write!(f, "LocalMasterKey({}, sealed by {s:?}, **REDACTED**)", self.path.display()),
        }
    }
}

/// What a master key's seal is bound to: its id.
fn seal_context(id: &str) -> Vec<u8> {
    format!("master:{id}").into_bytes()
}

impl LocalMasterKey {
    /// Open `dir/master.json`, creating it (0600) with one fresh key on
    /// first use. The file must hold its keys in plaintext.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] when the file cannot be used;
    /// [`Error::Sealed`] when its keys are sealed.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, None)
    }

    /// Open `dir/master.json` with its keys sealed by `sealer`, creating it
    /// (0600) with one fresh sealed key on first use. Each key is unsealed
    /// here, once.
    ///
    /// # Errors
    /// As [`LocalMasterKey::open`]; [`Error::NotSealed`] when the file
    /// holds plaintext keys (see [`LocalMasterKey::seal`]), and the
    /// sealer's errors (for KMS, [`Error::Kms`]) when a key cannot be
    /// sealed or unsealed.
    pub fn open_sealed(dir: &Path, sealer: Box<dyn MasterKey>) -> Result<Self> {
        Self::open_with(dir, Some(sealer))
    }

    fn open_with(dir: &Path, sealer: Option<Box<dyn MasterKey>>) -> Result<Self> {
        ensure_dir(dir)?;
        wipe_replaced(dir)?;
        let path = dir.join("master.json");
        let mk = Self {
            path,
            state: Mutex::new(Vec::new()),
            active: Mutex::new(String::new()),
            rng: Mutex::new(ChaCha20Rng::from_entropy()),
            sealer,
        };
        if !mk.path.exists() {
            mk.add_key(MasterFile { format: 1, active: String::new(), keys: Vec::new() })?;
            return Ok(mk);
        }
        let file = read(&mk.path)?;
        let mut keys = Vec::new();
        for r in &file.keys {
            keys.push((r.id.clone(), mk.unseal(r)?));
        }
        if !keys.iter().any(|(id, _)| *id == file.active) {
            return Err(Error::Corrupt {
                path: mk.path,
                detail: format!("active master key {} is missing", file.active),
            });
        }
        *lock(&mk.state) = keys;
        *lock(&mk.active) = file.active;
        Ok(mk)
    }

    /// Seal the plaintext keys of `dir/master.json` with `sealer`, in place
    /// (written to a new file, then renamed over the old). Returns how many
    /// keys were sealed: 0 when the file was sealed already.
    ///
    /// The plaintext file is then overwritten where it lies and removed: it
    /// is kept as `master.json.plain` (a second name for the same file)
    /// across the rename, and a seal cut short by a crash leaves that name
    /// for the next seal or open to finish. Copies the overwrite cannot
    /// reach (backups, snapshots, copy-on-write filesystems, an SSD's
    /// remapped blocks) remain; rotating the master key afterwards wraps
    /// new data keys under a key that was never on disk in plaintext.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Corrupt`] for the file; the sealer's
    /// errors when a key cannot be sealed.
    pub fn seal(dir: &Path, sealer: &dyn MasterKey) -> Result<usize> {
        let path = dir.join("master.json");
        let mut file = read(&path)?;
        let mut sealed = 0;
        for r in &mut file.keys {
            if let Some(plain) = r.key.take() {
                let key = decode_key(&path, &r.id, &plain)?;
                r.sealed = Some(sealer.wrap(&key, &seal_context(&r.id))?);
                sealed += 1;
            }
        }
        if sealed > 0 {
            wipe_replaced(dir)?;
            let kept = dir.join(REPLACED_PLAINTEXT);
            std::fs::hard_link(&path, &kept).map_err(|source| Error::Io { path: kept, source })?;
            write_atomic(&path, &serde_json::to_vec_pretty(&file).expect("serialisable"))?;
            wipe_replaced(dir)?;
        }
        Ok(sealed)
    }

    /// The cipher of record `r`, unsealing it when the file is sealed.
    fn unseal(&self, r: &MasterRecord) -> Result<Aes256Gcm> {
        let key = match (&r.key, &r.sealed, &self.sealer) {
            (Some(plain), None, None) => decode_key(&self.path, &r.id, plain)?,
            (None, Some(w), Some(sealer)) => sealer.unwrap(w, &seal_context(&r.id))?,
            (None, Some(w), None) => {
                return Err(Error::Sealed { path: self.path.clone(), by: w.master.clone() });
            }
            (Some(_), None, Some(_)) => return Err(Error::NotSealed { path: self.path.clone() }),
            _ => {
                return Err(Error::Corrupt {
                    path: self.path.clone(),
                    detail: format!("master key {} needs exactly one of `key` and `sealed`", r.id),
                })
            }
        };
        Ok(Aes256Gcm::new(key.expose().into()))
    }

    fn add_key(&self, mut file: MasterFile) -> Result<String> {
        let id = format!("mk-{}", file.keys.len() + 1);
        let created = chrono::Utc::now().to_rfc3339();
        let (key, record) = match &self.sealer {
            None => {
                let key = SecretKey::random();
                let plain = STANDARD.encode(key.expose());
                (key, MasterRecord { id: id.clone(), key: Some(plain), sealed: None, created })
            }
            Some(sealer) => {
                let (key, w) = sealer.generate(&seal_context(&id))?;
                (key, MasterRecord { id: id.clone(), key: None, sealed: Some(w), created })
            }
        };
        let c = Aes256Gcm::new(key.expose().into());
        file.keys.push(record);
        file.active = id.clone();
        let bytes = serde_json::to_vec_pretty(&file).expect("serialisable");
        write_atomic(&self.path, &bytes)?;
        lock(&self.state).push((id.clone(), c));
        *lock(&self.active) = id.clone();
        Ok(id)
    }
}

/// The second name a seal gives the plaintext `master.json` while it
/// replaces it, so that the replaced file can be overwritten after the
/// rename.
const REPLACED_PLAINTEXT: &str = "master.json.plain";

/// Finish a seal: overwrite the replaced plaintext file with zeros, fsync
/// it, and remove it. When the name is still the current `master.json`'s
/// (a seal cut short before its rename), only the name is removed. Unless
/// the current `master.json` is a sealed file of its own, nothing is
/// touched: the kept file may then be the only copy of the keys.
fn wipe_replaced(dir: &Path) -> Result<()> {
    let kept = dir.join(REPLACED_PLAINTEXT);
    let io = |source| Error::Io { path: kept.clone(), source };
    let Some(old) = stamp(&kept) else { return Ok(()) };
    let path = dir.join("master.json");
    let Some(current) = stamp(&path) else { return Ok(()) };
    if old.ino == 0 {
        // No inode numbers here: the two names cannot be told apart.
        return Ok(());
    }
    if current.ino != old.ino {
        let sealed = read(&path)?.keys.iter().all(|r| r.key.is_none() && r.sealed.is_some());
        if !sealed {
            return Ok(());
        }
        let mut f = OpenOptions::new().write(true).open(&kept).map_err(io)?;
        let len = usize::try_from(f.metadata().map_err(io)?.len()).unwrap_or(usize::MAX);
        f.write_all(&vec![0u8; len]).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::remove_file(&kept).map_err(io)?;
    sync_dir(dir);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read(path: &Path) -> Result<MasterFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Corrupt { path: path.to_owned(), detail: e.to_string() })
}

fn decode_key(path: &Path, id: &str, plain: &str) -> Result<SecretKey> {
    STANDARD.decode(plain).ok().and_then(|b| SecretKey::from_slice(&b)).ok_or_else(|| Error::Corrupt {
        path: path.to_owned(),
        detail: format!("master key {id} is not 32 bytes of base64"),
    })
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
        if !lock(&self.state).iter().any(|(id, _)| *id == wrapped.master) {
            // Added since this process read the file: a `keys rotate`
            // beside it.
            self.refresh()?;
        }
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
        // Another process's rotations first, so this one's state holds
        // every key the file will.
        self.refresh()?;
        let file = read(&self.path)?;
        self.add_key(file)
    }

    fn refresh(&self) -> Result<()> {
        let file = read(&self.path)?;
        let known: Vec<String> = lock(&self.state).iter().map(|(id, _)| id.clone()).collect();
        let mut added = Vec::new();
        for r in file.keys.iter().filter(|r| !known.contains(&r.id)) {
            added.push((r.id.clone(), self.unseal(r)?));
        }
        if !file.keys.iter().any(|r| r.id == file.active) {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                detail: format!("active master key {} is missing", file.active),
            });
        }
        lock(&self.state).extend(added);
        *lock(&self.active) = file.active;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// The plaintext key text of `dir/master.json`'s first record.
    fn plain_key(dir: &Path) -> String {
        read(&dir.join("master.json")).unwrap().keys[0].key.clone().expect("plaintext")
    }

    fn contents(f: &mut std::fs::File) -> Vec<u8> {
        use std::io::Seek as _;
        f.rewind().unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn sealing_overwrites_the_plaintext_file_it_replaces() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let dek = SecretKey::random();
        let wrapped = LocalMasterKey::open(a.path()).unwrap().wrap(&dek, b"ctx").unwrap();
        let key = plain_key(a.path());
        // A handle on the plaintext file outlives its name.
        let mut old = std::fs::File::open(a.path().join("master.json")).unwrap();
        let before = contents(&mut old);
        assert!(String::from_utf8_lossy(&before).contains(&key));

        let sealer = LocalMasterKey::open(b.path()).unwrap();
        assert_eq!(LocalMasterKey::seal(a.path(), &sealer).unwrap(), 1);

        let after = contents(&mut old);
        assert_eq!(after.len(), before.len(), "overwritten where it lies, not truncated");
        assert!(after.iter().all(|&x| x == 0), "the replaced file is zeros");
        assert!(!a.path().join(REPLACED_PLAINTEXT).exists());
        let sealed = std::fs::read_to_string(a.path().join("master.json")).unwrap();
        assert!(!sealed.contains(&key), "{sealed}");
        let mk =
            LocalMasterKey::open_sealed(a.path(), Box::new(LocalMasterKey::open(b.path()).unwrap())).unwrap();
        assert_eq!(mk.unwrap(&wrapped, b"ctx").unwrap().expose(), dek.expose(), "the same keys, sealed");
    }

    #[test]
    fn a_seal_cut_short_is_finished_by_the_next_open_and_never_loses_the_keys() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let dek = SecretKey::random();
        let wrapped = LocalMasterKey::open(a.path()).unwrap().wrap(&dek, b"ctx").unwrap();
        let master = a.path().join("master.json");
        let kept = a.path().join(REPLACED_PLAINTEXT);
        let plain = std::fs::read(&master).unwrap();

        // Cut short before the rename: the second name is the current file's,
        // which stays whole; only the name goes.
        std::fs::hard_link(&master, &kept).unwrap();
        let mk = LocalMasterKey::open(a.path()).unwrap();
        assert!(!kept.exists());
        assert_eq!(std::fs::read(&master).unwrap(), plain);
        assert_eq!(mk.unwrap(&wrapped, b"ctx").unwrap().expose(), dek.expose());

        // A plaintext copy beside a plaintext master.json is not the seal's:
        // left alone.
        std::fs::write(&kept, &plain).unwrap();
        LocalMasterKey::open(a.path()).unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), plain);
        std::fs::remove_file(&kept).unwrap();

        // Cut short after the rename: the replaced plaintext is overwritten
        // and removed by the next open.
        LocalMasterKey::seal(a.path(), &LocalMasterKey::open(b.path()).unwrap()).unwrap();
        std::fs::write(&kept, &plain).unwrap();
        let mut old = std::fs::File::open(&kept).unwrap();
        let sealer = Box::new(LocalMasterKey::open(b.path()).unwrap());
        let mk = LocalMasterKey::open_sealed(a.path(), sealer).unwrap();
        assert!(!kept.exists());
        let after = contents(&mut old);
        assert!(after.len() == plain.len() && after.iter().all(|&x| x == 0));
        assert_eq!(mk.unwrap(&wrapped, b"ctx").unwrap().expose(), dek.expose());
    }
}
