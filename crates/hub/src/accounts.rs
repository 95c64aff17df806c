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
    /// CRC-32 of the other fields ([`AccountRecord::checksum`]), 8 hex
    /// digits: damage that leaves the file valid JSON (a changed digit of
    /// `account` would hand the token's events to another account) is
    /// refused, not believed. Absent in records written before it was
    /// (read as they are; the next change of the file adds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32: Option<String>,
}

impl AccountRecord {
    /// The checksum of the record's fields.
    fn checksum(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        for part in [self.account.as_str(), &self.token_sha256, &self.created] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        format!("{:08x}", h.finalize())
    }
}

/// Token hashes to accounts, reloaded when the file changes.
#[derive(Debug)]
pub struct Accounts {
    path: PathBuf,
    by_hash: RwLock<TokenIndex>,
    /// The modification time of the file when [`Accounts::refresh`] last
    /// logged that it cannot be read (so it is logged once per change).
    unreadable: std::sync::Mutex<Option<Option<SystemTime>>>,
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
    let file: AccountsFile = match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::Accounts { path: path.to_owned(), detail: e.to_string() })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AccountsFile::default()),
        Err(e) => return Err(io(path)(e)),
    };
    for (n, r) in file.accounts.iter().enumerate() {
        if r.crc32.as_ref().is_some_and(|c| !c.eq_ignore_ascii_case(&r.checksum())) {
            return Err(Error::Accounts {
                path: path.to_owned(),
                detail: format!(
                    "record {} (account {} as read, token id {}) does not match its checksum: the file was \
                     damaged or changed by hand. Restore it from a backup, or delete that record from the \
                     file and give the account a new token with `watershed accounts add`",
                    n + 1,
                    r.account,
                    r.token_sha256.chars().take(TOKEN_ID_LEN).collect::<String>()
                ),
            });
        }
    }
    Ok(file)
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
            unreadable: std::sync::Mutex::new(None),
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

    /// [`Accounts::reload`] for a running hub, before each request: a
    /// file that cannot be read (damaged, or a bad hand edit) leaves the
    /// tokens last read in use, and is logged as an error once per change
    /// of the file rather than ignored. Returns whether the file was read
    /// (or had not changed).
    pub fn refresh(&self) -> bool {
        // (The request path takes no lock while the file reads well.)
        let Err(e) = self.reload() else { return true };
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut logged = self.unreadable.lock().expect("lock");
        if *logged != Some(mtime) {
            *logged = Some(mtime);
            tracing::error!(
                error = %e,
                "cannot read the accounts file; the tokens read before stay in use until it is fixed"
            );
        }
        false
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
                crc32: None,
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
    for r in &mut file.accounts {
        r.crc32 = Some(r.checksum());
    }
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
        // As a record written before records had a checksum (or by hand).
        let crc = v["accounts"][0]["crc32"].as_str().unwrap().to_owned();
        let good = good.replace(&format!(",\n      \"crc32\": \"{crc}\""), "");
        assert!(!good.contains("crc32"), "{good}");
        for bad in [&hash[..62], &hash[..63], &format!("{hash}00"), &format!("{}+1", &hash[..62]), ""] {
            std::fs::write(&path, good.replace(&hash, bad)).unwrap();
            let e = Accounts::open(dir.path()).unwrap_err().to_string();
            assert!(e.contains("account 111111111111") && e.contains("not 64 hex digits"), "{bad:?}: {e}");
        }
    }

    /// A record changed on disk (a digit of its account, of its token
    /// hash, of its creation time, or of the checksum itself) is refused
    /// by every reader, the hub's and the commands', naming the record;
    /// the token is never taken for another account. Records without a
    /// checksum (an older file) are read, and get one at the next change.
    #[test]
    fn a_damaged_record_is_refused_and_older_records_are_sealed_at_the_next_change() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (AccountId::new("111111111111").unwrap(), AccountId::new("222222222222").unwrap());
        let (ta, _) = Accounts::add(dir.path(), &a).unwrap();
        let (_, id_b) = Accounts::add(dir.path(), &b).unwrap();
        let path = dir.path().join("accounts.json");
        let good = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&good).unwrap();
        let field = |i: usize, k: &str| v["accounts"][i][k].as_str().unwrap().to_owned();
        // The first hex digit of a hash or checksum becomes another one
        // (they are random: a fixed digit would sometimes be the same).
        let other_first = |s: String| format!("{}{}", if s.starts_with('0') { '1' } else { '0' }, &s[1..]);
        for (from, to) in [
            ("\"222222222222\"".to_owned(), "\"222222222223\"".to_owned()),
            (field(1, "token_sha256"), other_first(field(1, "token_sha256"))),
            (field(1, "created"), field(1, "created").replacen('2', "3", 1)),
            (field(1, "crc32"), other_first(field(1, "crc32"))),
        ] {
            assert_ne!(from, to);
            std::fs::write(&path, good.replace(&from, &to)).unwrap();
            let e = Accounts::open(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains("record 2 (account 22222222222") && e.contains("does not match its checksum"),
                "{e}"
            );
            let shown_id = if to.len() == 64 { to[..12].to_owned() } else { id_b.clone() };
            assert!(e.contains(&format!("token id {shown_id})")), "{e}");
            let e = Accounts::list(dir.path()).unwrap_err().to_string();
            assert!(e.contains("does not match its checksum"), "{e}");
            assert!(Accounts::add(dir.path(), &a).is_err(), "a change of a damaged file is refused too");
        }

        // The file as an older hub wrote it: no checksums.
        let mut old: serde_json::Value = serde_json::from_str(&good).unwrap();
        for r in old["accounts"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("crc32");
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
        assert_eq!(Accounts::open(dir.path()).unwrap().authenticate(&ta), Some(a.clone()));
        Accounts::add(dir.path(), &a).unwrap();
        let now: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let records = now["accounts"].as_array().unwrap();
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|r| r["crc32"].as_str().is_some_and(|c| c.len() == 8)), "{now}");
        assert_eq!(Accounts::open(dir.path()).unwrap().authenticate(&ta), Some(a));
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

    /// A running hub whose accounts file becomes unreadable keeps the
    /// tokens it read, and takes the file again once it is fixed.
    #[test]
    fn an_unreadable_file_keeps_the_tokens_read_before() {
        let dir = tempfile::tempdir().unwrap();
        let a = AccountId::new("111111111111").unwrap();
        let (t, _) = Accounts::add(dir.path(), &a).unwrap();
        let accts = Accounts::open(dir.path()).unwrap();
        let path = dir.path().join("accounts.json");
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, b"{\"accounts\": [").unwrap();
        assert!(!accts.refresh());
        assert!(!accts.refresh(), "still unreadable (logged once)");
        assert_eq!(accts.authenticate(&t), Some(a.clone()));
        std::fs::write(&path, &good).unwrap();
        let (t2, _) = Accounts::add(dir.path(), &a).unwrap();
        assert!(accts.refresh());
        assert_eq!(accts.authenticate(&t2), Some(a));
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
