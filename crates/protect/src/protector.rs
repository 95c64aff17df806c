//! Applying a [`ProtectPlan`] to a decoded event ([`Tape`]).
//!
//! A [`BatchProtector`] lives for one batch of events. It fetches each key
//! from the keyring once per batch, keys its HMAC and AES instances once,
//! and reuses its buffers, so the per-value cost is one MAC or one AEAD
//! operation plus base64. The data subject is read before any field is
//! changed, so a data-subject field may itself be protected.
//!
//! A batch's subject keys can be fetched together: [`BatchProtector::note`]
//! each event's data subject, [`BatchProtector::fetch`] their keys in one
//! call to the keyring (one pass over its index, new keys created under
//! one lock), then [`BatchProtector::protect_noted`] each event. With many
//! data subjects this is what keeps key lookups off the per-event path.

use std::collections::HashMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use watershed_event::{AccountId, TimestampMicros};
use watershed_schema::{FieldPath, Protect, ProtectPlan, Slot, Tape};

use crate::cipher::DataCipher;
use crate::error::Result;
use crate::keyring::Keyring;

/// Length of a token's MAC prefix, in bytes (22 base64url characters).
pub const TOKEN_BYTES: usize = 16;

/// Protects events for one batch; see the module docs.
pub struct BatchProtector<'k> {
    keyring: &'k dyn Keyring,
    tokens: HashMap<String, Hmac<Sha256>, ahash::RandomState>,
    account_keys: HashMap<String, Arc<DataCipher>, ahash::RandomState>,
    rng: ChaCha20Rng,
    targets: Vec<u32>,
    buf: Vec<u8>,
    subject: String,
    /// Noted subjects, one after another; `ends[i]` closes the i-th.
    noted: String,
    ends: Vec<usize>,
    /// Keys of the noted subjects, in order, after [`BatchProtector::fetch`].
    noted_keys: Vec<Arc<DataCipher>>,
    /// When the batch's events were received, if they are protected only
    /// now (see [`BatchProtector::replaying`]).
    received_at: Option<TimestampMicros>,
}

/// An event's place in its batch's subject-key fetch (see
/// [`BatchProtector::note`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noted(Option<u32>);

impl Noted {
    /// Whether the event needs a subject key.
    #[must_use]
    pub fn needs_key(self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for BatchProtector<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BatchProtector(**REDACTED**)")
    }
}

impl<'k> BatchProtector<'k> {
    /// A protector for one batch, drawing keys from `keyring`.
    #[must_use]
    pub fn new(keyring: &'k dyn Keyring) -> Self {
        Self {
            keyring,
            tokens: HashMap::default(),
            account_keys: HashMap::default(),
            rng: ChaCha20Rng::from_entropy(),
            targets: Vec::new(),
            buf: Vec::new(),
            subject: String::new(),
            noted: String::new(),
            ends: Vec::new(),
            noted_keys: Vec::new(),
            received_at: None,
        }
    }

    /// A protector for events received at `received_at` and protected
    /// only now (replayed from the write-ahead log): subject keys come
    /// from [`Keyring::data_ciphers_received`], so the events of a subject
    /// forgotten since they arrived stay unreadable.
    #[must_use]
    pub fn replaying(keyring: &'k dyn Keyring, received_at: TimestampMicros) -> Self {
        Self { received_at: Some(received_at), ..Self::new(keyring) }
    }

    /// The keys of `subjects` of `account`, for this batch.
    fn subject_ciphers(&self, account: &AccountId, subjects: &[&str]) -> Result<Vec<Arc<DataCipher>>> {
        match self.received_at {
            None => self.keyring.data_ciphers(account, subjects),
            Some(at) => self.keyring.data_ciphers_received(account, subjects, at),
        }
    }

    /// The key of one subject of `account`, for this batch.
    fn subject_cipher(&self, account: &AccountId, subject: &str) -> Result<Arc<DataCipher>> {
        match self.received_at {
            None => self.keyring.data_cipher(account, Some(subject)),
            Some(_) => self.subject_ciphers(account, &[subject])?.pop().ok_or(crate::Error::KeyNotFetched),
        }
    }

    /// Note the data subject of the event rooted at `root` whose fields
    /// `plan` encrypts, for [`BatchProtector::fetch`]. Events that encrypt
    /// nothing, or have no subject (the field absent, null or empty: they
    /// use the account's key), need no subject key.
    pub fn note(&mut self, plan: &ProtectPlan, tape: &Tape, root: Slot) -> Noted {
        let encrypts = plan.actions.iter().any(|a| a.action == Protect::Encrypt);
        let Some((path, _)) = plan.data_subject.as_ref().filter(|_| encrypts) else {
            return Noted(None);
        };
        if !read_subject(tape, root, path, &mut self.subject) {
            return Noted(None);
        }
        self.noted.push_str(&self.subject);
        self.ends.push(self.noted.len());
        Noted(Some(u32::try_from(self.ends.len() - 1).unwrap_or(u32::MAX)))
    }

    /// Fetch the keys of every subject noted since the last fetch, in one
    /// call to the keyring.
    ///
    /// # Errors
    /// When a key cannot be fetched or created; the noted events must then
    /// be refused, not stored unprotected.
    pub fn fetch(&mut self, account: &AccountId) -> Result<()> {
        self.noted_keys.clear();
        let mut start = 0;
        let subjects: Vec<&str> = self
            .ends
            .iter()
            .map(|&end| {
                let s = &self.noted[start..end];
                start = end;
                s
            })
            .collect();
        let keys = self.subject_ciphers(account, &subjects);
        self.noted.clear();
        self.ends.clear();
        self.noted_keys = keys?;
        // Read each key's id now, in one pass: independent loads whose
        // cache misses overlap, instead of one miss per event later.
        let ids = self.noted_keys.iter().fold(0u8, |a, c| a ^ c.id().0[0]);
        std::hint::black_box(ids);
        Ok(())
    }

    /// Protect one event of `account` in place, with the subject key
    /// [`BatchProtector::fetch`] got for `noted`.
    ///
    /// # Errors
    /// When a key cannot be fetched or created (including a noted key the
    /// last fetch did not get); the event must then be dead-lettered, not
    /// stored unprotected.
    pub fn protect_noted(
        &mut self,
        account: &AccountId,
        plan: &ProtectPlan,
        tape: &mut Tape,
        root: Slot,
        noted: Noted,
    ) -> Result<()> {
        let keys = std::mem::take(&mut self.noted_keys);
        let r = match noted.0 {
            None => self.apply(account, plan, tape, root, None),
            Some(i) => match keys.get(i as usize) {
                Some(c) => self.apply(account, plan, tape, root, Some(c)),
                None => Err(crate::Error::KeyNotFetched),
            },
        };
        self.noted_keys = keys;
        r
    }

    /// Protect one event of `account` in place (a tape holding one event).
    ///
    /// # Errors
    /// Only when a key cannot be fetched or created; the event must then be
    /// dead-lettered, not stored unprotected.
    pub fn protect(&mut self, account: &AccountId, plan: &ProtectPlan, tape: &mut Tape) -> Result<()> {
        self.protect_at(account, plan, tape, tape.root())
    }

    /// Protect the event rooted at `root` in place, fetching its subject
    /// key on its own.
    ///
    /// # Errors
    /// As [`BatchProtector::protect`].
    pub fn protect_at(
        &mut self,
        account: &AccountId,
        plan: &ProtectPlan,
        tape: &mut Tape,
        root: Slot,
    ) -> Result<()> {
        if plan.actions.is_empty() {
            return Ok(());
        }
        let has_subject = match &plan.data_subject {
            Some((path, _)) => read_subject(tape, root, path, &mut self.subject),
            None => false,
        };
        let subject_key = if has_subject && plan.actions.iter().any(|a| a.action == Protect::Encrypt) {
            Some(self.subject_cipher(account, &self.subject)?)
        } else {
            None
        };
        self.apply(account, plan, tape, root, subject_key.as_deref())
    }

    /// Encrypt a whole value (a dead letter's raw event) into `out`: under
    /// the key of `subject` when the value's data subject is known, so
    /// that forgetting the subject erases it too, else under the account's
    /// key.
    ///
    /// # Errors
    /// When the key cannot be fetched or created; the value must then not
    /// be stored at all.
    pub fn encrypt_whole(
        &mut self,
        account: &AccountId,
        subject: Option<&str>,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let cipher = match subject {
            Some(s) => self.subject_cipher(account, s)?,
            None => match self.account_keys.get(account.as_str()) {
                Some(c) => c.clone(),
                None => {
                    let c = self.keyring.data_cipher(account, None)?;
                    self.account_keys.insert(account.to_string(), c.clone());
                    c
                }
            },
        };
        cipher.encrypt_into(plain, &mut self.rng, &mut self.buf, out);
        Ok(())
    }

    /// Apply `plan`, encrypting under `subject_key` when the event has a
    /// data subject, else under the account's key.
    fn apply(
        &mut self,
        account: &AccountId,
        plan: &ProtectPlan,
        tape: &mut Tape,
        root: Slot,
        subject_key: Option<&DataCipher>,
    ) -> Result<()> {
        let Slot::Record(rec) = root else {
            return Ok(());
        };
        for fa in &plan.actions {
            self.targets.clear();
            // Redaction nulls the field itself (a redacted array is null, not
            // a list of nulls); the other actions rewrite each string in it.
            let whole = fa.action == Protect::Redact;
            collect(tape, rec, &fa.path, whole, &mut self.targets);
            if self.targets.is_empty() {
                continue;
            }
            match fa.action {
                Protect::Redact => {
                    for &i in &self.targets {
                        *tape.slot_mut(i) = Slot::Null;
                    }
                }
                Protect::Mask { keep } => {
                    for &i in &self.targets {
                        tape.rewrite_str(i, |old, out| {
                            mask(std::str::from_utf8(old).unwrap_or_default(), keep as usize, out)
                        });
                    }
                }
                Protect::Tokenize => {
                    if !self.tokens.contains_key(account.as_str()) {
                        let k = self.keyring.token_key(account)?;
                        let mac = <Hmac<Sha256> as Mac>::new_from_slice(k.expose()).expect("any key length");
                        self.tokens.insert(account.to_string(), mac);
                    }
                    let mac = &self.tokens[account.as_str()];
                    for &i in &self.targets {
                        tape.rewrite_str(i, |old, out| tokenize(mac, old, out));
                    }
                }
                Protect::Encrypt => {
                    let cipher = match subject_key {
                        Some(c) => c,
                        None => {
                            if !self.account_keys.contains_key(account.as_str()) {
                                self.account_keys
                                    .insert(account.to_string(), self.keyring.data_cipher(account, None)?);
                            }
                            &self.account_keys[account.as_str()]
                        }
                    };
                    let (rng, buf) = (&mut self.rng, &mut self.buf);
                    for &i in &self.targets {
                        tape.rewrite_str(i, |old, out| cipher.encrypt_into(old, rng, buf, out));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keep the last `keep` characters, `*` for the rest. A value no longer
/// than `keep` is masked entirely, so short values never pass in clear.
pub fn mask(old: &str, keep: usize, out: &mut Vec<u8>) {
    let n = old.chars().count();
    if n <= keep {
        out.extend(std::iter::repeat_n(b'*', n));
        return;
    }
    let cut = old.char_indices().nth(n - keep).map_or(old.len(), |(i, _)| i);
    out.extend(std::iter::repeat_n(b'*', n - keep));
    out.extend_from_slice(&old.as_bytes()[cut..]);
}

/// The token of `value` under a keyed MAC: base64url of the first
/// [`TOKEN_BYTES`] bytes of HMAC-SHA256.
pub fn tokenize(mac: &Hmac<Sha256>, value: &[u8], out: &mut Vec<u8>) {
    let mut m = mac.clone();
    m.update(value);
    let d = m.finalize().into_bytes();
    base64_simd::URL_SAFE_NO_PAD.encode_append(&d[..TOKEN_BYTES], out);
}

/// Copy the data subject's value of the event rooted at `root` into
/// `out`; false when absent or null.
fn read_subject(tape: &Tape, root: Slot, path: &FieldPath, out: &mut String) -> bool {
    out.clear();
    let Slot::Record(mut rec) = root else {
        return false;
    };
    for (depth, &i) in path.iter().enumerate() {
        let slot = tape.slot(rec + u32::try_from(i).unwrap_or(u32::MAX));
        if depth + 1 == path.len() {
            use std::fmt::Write as _;
            match slot {
                // An empty id names no one: such events use the account's
                // key, as events without the field do, rather than one key
                // shared by every event that left it blank.
                Slot::Str { .. } if tape.str(slot).is_empty() => return false,
                Slot::Str { .. } => out.push_str(tape.str(slot)),
                Slot::Int(v) => {
                    let _ = write!(out, "{v}");
                }
                Slot::Long(v) => {
                    let _ = write!(out, "{v}");
                }
                _ => return false,
            }
            return true;
        }
        match slot {
            Slot::Record(s) => rec = s,
            _ => return false,
        }
    }
    false
}

/// Collect the slot indices a field path reaches under the record whose
/// slots start at `rec`, crossing arrays and maps on the way: the field's
/// own slots with `whole`, else the scalars inside them.
fn collect(tape: &Tape, rec: u32, path: &[usize], whole: bool, out: &mut Vec<u32>) {
    let Some((&first, rest)) = path.split_first() else {
        return;
    };
    let idx = rec + u32::try_from(first).unwrap_or(u32::MAX);
    if !rest.is_empty() {
        descend(tape, idx, rest, whole, out);
    } else if whole {
        if !matches!(tape.slot(idx), Slot::Null | Slot::Unset) {
            out.push(idx);
        }
    } else {
        leaves(tape, idx, out);
    }
}

fn descend(tape: &Tape, idx: u32, rest: &[usize], whole: bool, out: &mut Vec<u32>) {
    match tape.slot(idx) {
        Slot::Record(s) => collect(tape, s, rest, whole, out),
        Slot::List { start, len } => (start..start + len).for_each(|i| descend(tape, i, rest, whole, out)),
        Slot::Map { start, len } => {
            (0..len).for_each(|i| descend(tape, start + 2 * i + 1, rest, whole, out));
        }
        _ => {}
    }
}

fn leaves(tape: &Tape, idx: u32, out: &mut Vec<u32>) {
    match tape.slot(idx) {
        Slot::List { start, len } => (start..start + len).for_each(|i| leaves(tape, i, out)),
        Slot::Map { start, len } => (0..len).for_each(|i| leaves(tape, start + 2 * i + 1, out)),
        Slot::Null | Slot::Unset => {}
        _ => out.push(idx),
    }
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use hmac::Mac as _;

    use super::*;

    #[test]
    fn tokens_are_base64url_of_the_mac_prefix() {
        let mac = Hmac::<Sha256>::new_from_slice(&[9; 32]).unwrap();
        let mut out = b"x".to_vec();
        tokenize(&mac, b"cus_000001", &mut out);
        let mut m = mac.clone();
        m.update(b"cus_000001");
        let want = URL_SAFE_NO_PAD.encode(&m.finalize().into_bytes()[..TOKEN_BYTES]);
        assert_eq!(want.len(), 22);
        assert_eq!(std::str::from_utf8(&out[1..]).unwrap(), want);
    }
}
