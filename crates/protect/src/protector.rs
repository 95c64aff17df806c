//! Applying a [`ProtectPlan`] to a decoded event ([`Tape`]).
//!
//! A [`BatchProtector`] lives for one batch of events. It fetches each key
//! from the keyring once per batch, keys its HMAC and AES instances once,
//! and reuses its buffers, so the per-value cost is one MAC or one AEAD
//! operation plus base64. The data subject is read before any field is
//! changed, so a data-subject field may itself be protected.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use watershed_event::AccountId;
use watershed_schema::{FieldPath, Protect, ProtectPlan, Slot, Tape};

use crate::cipher::DataCipher;
use crate::error::Result;
use crate::keyring::Keyring;

/// Length of a token's MAC prefix, in bytes (22 base64url characters).
pub const TOKEN_BYTES: usize = 16;

/// Protects events for one batch; see the module docs.
pub struct BatchProtector<'k> {
    keyring: &'k dyn Keyring,
    tokens: HashMap<String, Hmac<Sha256>>,
    account_keys: HashMap<String, Arc<DataCipher>>,
    subject_key: Option<Arc<DataCipher>>,
    rng: ChaCha20Rng,
    targets: Vec<u32>,
    buf: Vec<u8>,
    subject: String,
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
            tokens: HashMap::new(),
            account_keys: HashMap::new(),
            subject_key: None,
            rng: ChaCha20Rng::from_entropy(),
            targets: Vec::new(),
            buf: Vec::new(),
            subject: String::new(),
        }
    }

    /// Protect one event of `account` in place.
    ///
    /// # Errors
    /// Only when a key cannot be fetched or created; the event must then be
    /// dead-lettered, not stored unprotected.
    pub fn protect(&mut self, account: &AccountId, plan: &ProtectPlan, tape: &mut Tape) -> Result<()> {
        if plan.actions.is_empty() {
            return Ok(());
        }
        self.subject_key = None;
        let has_subject = match &plan.data_subject {
            Some((path, _)) => read_subject(tape, path, &mut self.subject),
            None => false,
        };
        for fa in &plan.actions {
            self.targets.clear();
            // Redaction nulls the field itself (a redacted array is null, not
            // a list of nulls); the other actions rewrite each string in it.
            let whole = fa.action == Protect::Redact;
            collect(tape, 0, &fa.path, whole, &mut self.targets);
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
                    let subject = has_subject.then_some(self.subject.as_str());
                    let cipher = cipher_for(
                        self.keyring,
                        &mut self.account_keys,
                        &mut self.subject_key,
                        account,
                        subject,
                    )?;
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

fn cipher_for<'a>(
    keyring: &dyn Keyring,
    account_keys: &'a mut HashMap<String, Arc<DataCipher>>,
    subject_key: &'a mut Option<Arc<DataCipher>>,
    account: &AccountId,
    subject: Option<&str>,
) -> Result<&'a DataCipher> {
    match subject {
        None => {
            if !account_keys.contains_key(account.as_str()) {
                account_keys.insert(account.to_string(), keyring.data_cipher(account, None)?);
            }
            Ok(&account_keys[account.as_str()])
        }
        // The keyring's own index is the cache: one HMAC and one lookup
        // per event, however many fields it encrypts.
        Some(s) => {
            if subject_key.is_none() {
                *subject_key = Some(keyring.data_cipher(account, Some(s))?);
            }
            Ok(subject_key.as_ref().expect("set above"))
        }
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
    let start = out.len();
    out.resize(start + 22, 0);
    let n = URL_SAFE_NO_PAD.encode_slice(&d[..TOKEN_BYTES], &mut out[start..]).expect("22 bytes fit");
    out.truncate(start + n);
}

/// Copy the data subject's value into `out`; false when absent or null.
fn read_subject(tape: &Tape, path: &FieldPath, out: &mut String) -> bool {
    out.clear();
    let mut rec = 0u32;
    for (depth, &i) in path.iter().enumerate() {
        let slot = tape.slot(rec + u32::try_from(i).unwrap_or(u32::MAX));
        if depth + 1 == path.len() {
            use std::fmt::Write as _;
            match slot {
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
