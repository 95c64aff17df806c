//! Account credentials. Each bearer token is bound to one account; the hub
//! stores only the token's SHA-256 (tokens are 256 random bits, so a fast
//! hash is safe), in `<data_dir>/accounts.json` (mode 0600). The account
//! of every event comes from the token, never from the event body.
//!
//! A token is named by its *token id*, the first 12 hex digits of its
//! hash (printed when it is created; harmless to show). `accounts add`,
//! `list` and `revoke` change the file under an exclusive lock on
//! `accounts.lock`, by a fsynced rename; a running hub re-reads the file
//! when it changes, so a revoked token is refused from its next request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use watershed_event::AccountId;

use crate::error::{io, Error, Result};

const TOKEN_PREFIX: &str = "wsh_";

/// Hex digits of a token's hash that name it.
const TOKEN_ID_LEN: usize = 12;

/// A stored token, as `accounts list` shows it (the token itself is not
/// stored anywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The account it is bound to.
    pub account: AccountId,
    /// The first 12 hex digits of its SHA-256.
    pub token_id: String,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// Which tokens `revoke` removes.
#[derive(Debug, Clone)]
pub enum Revoke {
    /// Every token of the account.
    Account(AccountId),
    /// The one token of the account with this token id.
    Token(AccountId, String),
}

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

/// Token hash to account, and the file's modification time and when it
/// was read.
type TokenIndex = (HashMap<[u8; 32], AccountId>, Option<SystemTime>, SystemTime);

/// A file modified this shortly before it was read may change again
/// within the same tick of the file system's clock (a few milliseconds)
/// without its modification time moving: it is read again next time.
const RACY: Duration = Duration::from_secs(1);

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
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
        let a = Self {
            path: data_dir.join("accounts.json"),
            by_hash: RwLock::new((HashMap::new(), None, SystemTime::UNIX_EPOCH)),
        };
        a.reload()?;
        Ok(a)
    }

    /// Re-read the file if it changed (tokens added or revoked while
    /// serving). Its modification time says so, unless the file had
    /// changed within `RACY` (one second) of the last read: a change in the same tick
    /// of the file system's clock leaves the time as it was, and a revoked
    /// token must not keep working, so such a file is read again.
    ///
    /// # Errors
    /// [`Error::Accounts`] or [`Error::Io`].
    pub fn reload(&self) -> Result<()> {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        {
            let cached = self.by_hash.read().expect("lock");
            let settled = |m: SystemTime| cached.2.duration_since(m).is_ok_and(|d| d >= RACY);
            if mtime.is_some() && cached.1 == mtime && mtime.is_some_and(settled) {
                return Ok(());
            }
        }
        let read_at = SystemTime::now();
        let file = read(&self.path)?;
        let mut map = HashMap::new();
        for r in file.accounts {
            let hex = r.token_sha256.as_bytes();
            let not_a_hash = || Error::Accounts {
                path: self.path.clone(),
                detail: format!("the token hash of account {} is not 64 hex digits (a SHA-256)", r.account),
            };
            // (`from_str_radix` alone would take "+1" as a byte.)
            if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(not_a_hash());
            }
            let mut h = [0u8; 32];
            for (byte, pair) in h.iter_mut().zip(hex.chunks(2)) {
                *byte = std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
                    .ok_or_else(not_a_hash)?;
            }
            map.insert(h, r.account);
        }
        *self.by_hash.write().expect("lock") = (map, mtime, read_at);
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
    /// (the only time it exists in clear) and its token id.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Accounts`].
    pub fn add(data_dir: &Path, account: &AccountId) -> Result<(String, String)> {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
        let token_sha256 = crate::hex(&hash(&token));
        let id = token_sha256[..TOKEN_ID_LEN].to_owned();
        change(data_dir, |file| {
            file.accounts.push(AccountRecord {
                account: account.clone(),
                token_sha256,
                created: chrono::Utc::now().to_rfc3339(),
            });
            Ok(())
        })?;
        Ok((token, id))
    }

    /// The stored tokens, in creation order.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Accounts`].
    pub fn list(data_dir: &Path) -> Result<Vec<TokenInfo>> {
        let file = read(&data_dir.join("accounts.json"))?;
        Ok(file.accounts.into_iter().map(|r| info(&r)).collect())
    }

    /// Remove the tokens `which` names; returns them. A running hub
    /// refuses them from its next request.
    ///
    /// # Errors
    /// [`Error::Revoke`] when no token matches or the token id is not 12
    /// hex digits (nothing is changed); [`Error::Accounts`] or
    /// [`Error::Io`].
    pub fn revoke(data_dir: &Path, which: &Revoke) -> Result<Vec<TokenInfo>> {
        if let Revoke::Token(_, id) = which {
            if id.len() != TOKEN_ID_LEN
                || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(Error::Revoke(format!(
                    "{id:?} is not a token id (the {TOKEN_ID_LEN} hex digits `accounts add` and `accounts list` print)"
                )));
            }
        }
        let mut removed = Vec::new();
        change(data_dir, |file| {
            let (keep, gone): (Vec<AccountRecord>, Vec<AccountRecord>) =
                std::mem::take(&mut file.accounts).into_iter().partition(|r| match which {
                    Revoke::Account(a) => &r.account != a,
                    Revoke::Token(a, id) => &r.account != a || !r.token_sha256.starts_with(id.as_str()),
                });
            file.accounts = keep;
            if gone.is_empty() {
                let detail = match which {
                    Revoke::Account(a) => format!("account {a} has no token"),
                    Revoke::Token(a, id) => format!("account {a} has no token with id {id}"),
                };
                return Err(Error::Revoke(detail));
            }
            removed = gone.iter().map(info).collect();
            Ok(())
        })?;
        Ok(removed)
    }
}

fn info(r: &AccountRecord) -> TokenInfo {
    TokenInfo {
        account: r.account.clone(),
        token_id: r.token_sha256.chars().take(TOKEN_ID_LEN).collect(),
        created: r.created.clone(),
    }
}

/// Read `<data_dir>/accounts.json`, apply `edit`, and write it back (a
/// fsynced temporary file renamed over it, the directory fsynced), all
/// under an exclusive lock on `accounts.lock`, so two commands at once
/// cannot lose each other's change. An `edit` error changes nothing.
fn change(data_dir: &Path, edit: impl FnOnce(&mut AccountsFile) -> Result<()>) -> Result<()> {
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let lock_path = data_dir.join("accounts.lock");
    let mut lock_opts = std::fs::OpenOptions::new();
    lock_opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut lock_opts, 0o600);
    let lock = lock_opts.open(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    let path = data_dir.join("accounts.json");
    let mut file = read(&path)?;
    edit(&mut file)?;
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
    // A new token is printed once, and a revoked one must stay revoked:
    // the change must outlive a power loss.
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io(data_dir))?;
    // Unlocked when `lock` closes.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_accounts_and_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (t, id) = Accounts::add(dir.path(), &a).unwrap();
        let stored = std::fs::read_to_string(dir.path().join("accounts.json")).unwrap();
        assert!(!stored.contains(&t[4..]), "token stored in clear");
        assert!(stored.contains(&id) && id.len() == 12, "the id is the start of the stored hash");
        let accts = Accounts::open(dir.path()).unwrap();
        assert_eq!(accts.authenticate(&t), Some(a));
        assert_eq!(accts.authenticate("wsh_nope"), None);
        assert_eq!(accts.authenticate(""), None);
    }

    /// A stored hash that is not exactly 64 hex digits (a damaged or
    /// hand-edited file) is refused, naming the account, never read as
    /// some other hash.
    #[test]
    fn a_token_hash_that_is_not_a_sha256_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        Accounts::add(dir.path(), &a).unwrap();
        let path = dir.path().join("accounts.json");
        let good = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let hash = v["accounts"][0]["token_sha256"].as_str().unwrap().to_owned();
        for bad in [&hash[..62], &hash[..63], &format!("{hash}00"), &format!("{}+1", &hash[..62]), ""] {
            std::fs::write(&path, good.replace(&hash, bad)).unwrap();
            let e = Accounts::open(dir.path()).unwrap_err().to_string();
            assert!(e.contains("account 111111111111") && e.contains("not 64 hex digits"), "{bad:?}: {e}");
        }
    }

    /// A revocation in the same tick of the file system's clock as the
    /// read before it leaves the modification time as it was; the file
    /// had changed within a second of that read, so it is read again.
    #[test]
    fn a_change_in_the_same_clock_tick_is_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (t, id) = Accounts::add(dir.path(), &a).unwrap();
        let path = dir.path().join("accounts.json");
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        let accts = Accounts::open(dir.path()).unwrap();
        Accounts::revoke(dir.path(), &Revoke::Token(a, id)).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(before).unwrap();
        accts.reload().unwrap();
        assert_eq!(accts.authenticate(&t), None, "the revocation is seen");
    }

    /// Concurrent `add`s keep every token (the file is changed under a
    /// lock); `revoke` removes one token or all of an account's, refuses
    /// what matches nothing, and a reload stops authenticating them.
    #[test]
    fn tokens_are_listed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (AccountId::new("111111111111").unwrap(), AccountId::new("222222222222").unwrap());
        let added: Vec<(AccountId, String, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (dir, acct) = (dir.path(), if i % 2 == 0 { a.clone() } else { b.clone() });
                    s.spawn(move || {
                        let (t, id) = Accounts::add(dir, &acct).unwrap();
                        (acct, t, id)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let listed = Accounts::list(dir.path()).unwrap();
        assert_eq!(listed.len(), 8, "no add lost another's token: {listed:?}");
        let accts = Accounts::open(dir.path()).unwrap();
        assert!(added.iter().all(|(acct, t, _)| accts.authenticate(t).as_ref() == Some(acct)));

        let (_, t0, id0) = added.iter().find(|x| x.0 == a).unwrap().clone();
        let e = Accounts::revoke(dir.path(), &Revoke::Token(b.clone(), id0.clone())).unwrap_err();
        assert!(e.to_string().contains(&format!("account {b} has no token with id {id0}")), "{e}");
        let gone = Accounts::revoke(dir.path(), &Revoke::Token(a.clone(), id0.clone())).unwrap();
        assert_eq!(gone.iter().map(|g| g.token_id.clone()).collect::<Vec<_>>(), [id0]);
        accts.reload().unwrap();
        assert_eq!(accts.authenticate(&t0), None, "revoked");
        assert_eq!(Accounts::list(dir.path()).unwrap().len(), 7);

        let gone = Accounts::revoke(dir.path(), &Revoke::Account(b.clone())).unwrap();
        assert_eq!(gone.len(), 4);
        accts.reload().unwrap();
        for (acct, t, _) in &added {
            let want = (acct == &a && t != &t0).then(|| a.clone());
            assert_eq!(accts.authenticate(t), want);
        }
        let e = Accounts::revoke(dir.path(), &Revoke::Account(b.clone())).unwrap_err();
        assert_eq!(e.to_string(), format!("cannot revoke: account {b} has no token"));
        let e = Accounts::revoke(dir.path(), &Revoke::Token(a.clone(), "1".into())).unwrap_err();
        assert!(e.to_string().contains("\"1\" is not a token id"), "{e}");
        assert_eq!(Accounts::list(dir.path()).unwrap().len(), 3);
    }
}
