//! Account credentials. Each bearer token is bound to one account; the hub
//! stores only the token's SHA-256 (tokens are 256 random bits, so a fast
//! hash is safe), in `<data_dir>/accounts.json` (mode 0600). The account
//! of every event comes from the token, never from the event body.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use watershed_event::AccountId;

use crate::error::{io, Error, Result};

const TOKEN_PREFIX: &str = "wsh_";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    accounts: Vec<AccountRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountRecord {
    account: AccountId,
    /// Hex SHA-256 of the token.
    token_sha256: String,
    created: String,
}

/// Token hashes to accounts, reloaded when the file changes.
#[derive(Debug)]
pub struct Accounts {
    path: PathBuf,
    by_hash: RwLock<TokenIndex>,
}

/// Token hash to account, and the file time it was read at.
type TokenIndex = (HashMap<[u8; 32], AccountId>, Option<std::time::SystemTime>);

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read(path: &Path) -> Result<AccountsFile> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::Accounts { path: path.to_owned(), detail: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AccountsFile::default()),
        Err(e) => Err(io(path)(e)),
    }
}

impl Accounts {
    /// Load `<data_dir>/accounts.json` (absent means no accounts yet).
    ///
    /// # Errors
    /// [`Error::Accounts`] or [`Error::Io`].
    pub fn open(data_dir: &Path) -> Result<Self> {
        let a = Self { path: data_dir.join("accounts.json"), by_hash: RwLock::new((HashMap::new(), None)) };
        a.reload()?;
        Ok(a)
    }

    /// Re-read the file if it changed (accounts added while serving).
    ///
    /// # Errors
    /// [`Error::Accounts`] or [`Error::Io`].
    pub fn reload(&self) -> Result<()> {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if mtime.is_some() && self.by_hash.read().expect("lock").1 == mtime {
            return Ok(());
        }
        let file = read(&self.path)?;
        let mut map = HashMap::new();
        for r in file.accounts {
            let mut h = [0u8; 32];
            for (i, chunk) in r.token_sha256.as_bytes().chunks(2).enumerate().take(32) {
                h[i] = u8::from_str_radix(std::str::from_utf8(chunk).unwrap_or("zz"), 16).map_err(|_| {
                    Error::Accounts {
                        path: self.path.clone(),
                        detail: format!("token hash of account {} is not hex", r.account),
                    }
                })?;
            }
            map.insert(h, r.account);
        }
        *self.by_hash.write().expect("lock") = (map, mtime);
        Ok(())
    }

    /// The account a bearer token belongs to.
    #[must_use]
    pub fn authenticate(&self, token: &str) -> Option<AccountId> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        self.by_hash.read().expect("lock").0.get(&hash(token)).cloned()
    }

    /// Create a token for `account`, store its hash, and return the token
    /// (the only time it exists in clear).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Accounts`].
    pub fn add(data_dir: &Path, account: &AccountId) -> Result<String> {
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let path = data_dir.join("accounts.json");
        let mut file = read(&path)?;
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
        file.accounts.push(AccountRecord {
            account: account.clone(),
            token_sha256: hex(&hash(&token)),
            created: chrono::Utc::now().to_rfc3339(),
        });
        let tmp = path.with_extension("tmp");
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        {
            use std::io::Write;
            let mut f = opts.open(&tmp).map_err(io(&tmp))?;
            f.write_all(&serde_json::to_vec_pretty(&file).expect("serialisable")).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        // The token is printed once: the account must outlive a power loss.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_accounts_and_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let t = Accounts::add(dir.path(), &a).unwrap();
        let stored = std::fs::read_to_string(dir.path().join("accounts.json")).unwrap();
        assert!(!stored.contains(&t[4..]), "token stored in clear");
        let accts = Accounts::open(dir.path()).unwrap();
        assert_eq!(accts.authenticate(&t), Some(a));
        assert_eq!(accts.authenticate("wsh_nope"), None);
        assert_eq!(accts.authenticate(""), None);
    }
}
