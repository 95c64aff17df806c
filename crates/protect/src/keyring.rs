//! Key management: the [`Keyring`] trait the protector and the decryptor
//! use, and the [`MasterKey`] trait that wraps data keys (a local master
//! key file, or AWS KMS).

use std::fmt::Debug;
use std::sync::Arc;

use watershed_event::{AccountId, TimestampMicros};

use crate::audit::Access;
use crate::cipher::{DataCipher, KeyId};
use crate::error::Result;
use crate::secret::SecretKey;

/// A data key wrapped by a master key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Wrapped {
    /// Which master key wrapped it.
    pub master: String,
    /// The wrapped bytes, base64.
    pub blob: String,
}

/// Wraps and unwraps data keys (envelope encryption).
pub trait MasterKey: Send + Sync + Debug {
    /// Wrap `key`, binding it to `context` (the data key's id and use).
    ///
    /// # Errors
    /// When the master key is unavailable (for KMS, a failed request).
    fn wrap(&self, key: &SecretKey, context: &[u8]) -> Result<Wrapped>;

    /// Unwrap a key wrapped with the same `context`.
    ///
    /// # Errors
    /// When the master key is unknown or the blob does not unwrap.
    fn unwrap(&self, wrapped: &Wrapped, context: &[u8]) -> Result<SecretKey>;

    /// A fresh data key and its wrapped form. The default draws the key
    /// locally and wraps it; KMS asks the service (GenerateDataKey).
    ///
    /// # Errors
    /// As [`MasterKey::wrap`].
    fn generate(&self, context: &[u8]) -> Result<(SecretKey, Wrapped)> {
        let k = SecretKey::random();
        let w = self.wrap(&k, context)?;
        Ok((k, w))
    }

    /// Start wrapping new keys under a new master key; old master keys stay
    /// available for unwrapping. Returns the new master key's id.
    ///
    /// # Errors
    /// When the new key cannot be stored.
    fn rotate(&self) -> Result<String>;

    /// Take in the master keys another process added since this one read
    /// them (`keys rotate` beside a running hub), so that keys wrapped
    /// under them unwrap and new keys are wrapped under the new active
    /// one. The default has nothing to take in.
    ///
    /// # Errors
    /// When the added keys cannot be read.
    fn refresh(&self) -> Result<()> {
        Ok(())
    }
}

/// What `forget` erased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The data keys deleted (every generation of the subject's key).
    pub key_ids: Vec<KeyId>,
    /// The keyed reference of the subject, as written to the audit log.
    pub subject_ref: String,
}

/// Data and tokenization keys per account and data subject.
pub trait Keyring: Send + Sync + Debug {
    /// The account's tokenization key (created on first use, never rotated,
    /// so tokens stay joinable).
    ///
    /// # Errors
    /// When the key cannot be created or unwrapped.
    fn token_key(&self, account: &AccountId) -> Result<SecretKey>;

    /// The current data key for (account, data subject); `None` means the
    /// account's key for events without a subject. Created on first use.
    ///
    /// # Errors
    /// When the key cannot be created or unwrapped.
    fn data_cipher(&self, account: &AccountId, subject: Option<&str>) -> Result<Arc<DataCipher>>;

    /// The current data keys of many subjects of one account, in order (a
    /// subject may repeat), created on first use: what a batch of events
    /// needs, in one call. Keyrings with an index to search override this
    /// to search it once per batch rather than once per event.
    ///
    /// # Errors
    /// When a key cannot be created or unwrapped.
    fn data_ciphers(&self, account: &AccountId, subjects: &[&str]) -> Result<Vec<Arc<DataCipher>>> {
        subjects.iter().map(|s| self.data_cipher(account, Some(s))).collect()
    }

    /// The keys to encrypt events of many subjects of one account with
    /// when they were received at `received_at` but are protected only
    /// now (replayed from the write-ahead log after a restart), in order.
    ///
    /// Like [`Keyring::data_ciphers`], except for a subject whose keys
    /// were erased at or after `received_at`: had the event been stored
    /// before the restart, its values would be under an erased key, so
    /// they must not be readable now either. Such a subject gets a
    /// *shredded* cipher: a throwaway key, never stored, under the id of
    /// one of its erased keys, so its values decrypt as
    /// [`crate::Error::KeyErased`]. No new key is created for it.
    ///
    /// # Errors
    /// When a key cannot be created or unwrapped.
    fn data_ciphers_received(
        &self,
        account: &AccountId,
        subjects: &[&str],
        received_at: TimestampMicros,
    ) -> Result<Vec<Arc<DataCipher>>>;

    /// Make every key created so far durable. Call before acknowledging
    /// events protected with new keys.
    ///
    /// # Errors
    /// When the keyring cannot be written.
    fn sync(&self) -> Result<()>;

    /// A data key by id, for decryption.
    ///
    /// # Errors
    /// [`crate::Error::KeyErased`] after `forget`, [`crate::Error::UnknownKey`]
    /// for ids this keyring never had.
    fn cipher_by_id(&self, id: &KeyId) -> Result<Arc<DataCipher>>;

    /// How many data keys are known to be erased, after re-reading the
    /// key log if another process changed it. It grows with every
    /// [`Keyring::forget`]; the hub watches it to commit, soon after an
    /// erasure, the raw events its write-ahead log still holds.
    ///
    /// # Errors
    /// When the key log cannot be read.
    fn erased_keys(&self) -> Result<usize>;

    /// Crypto-shred: delete every data key of (account, subject) and record
    /// the erasure, and who asked for it and why, in the audit log.
    ///
    /// # Errors
    /// [`crate::Error::Unattributed`] when `by` leaves the principal or
    /// the purpose blank (nothing is erased),
    /// [`crate::Error::NothingToForget`] when there is no such key.
    fn forget(&self, account: &AccountId, subject: &str, by: &Access) -> Result<Erasure>;

    /// [`Keyring::forget`] for many subjects of one account at once (an
    /// erasure job; the key log's keyring does it in one pass and one
    /// fsync). A subject with no key gets `None`; a subject named again
    /// gets the answer of its first mention.
    ///
    /// # Errors
    /// [`crate::Error::Unattributed`] as [`Keyring::forget`]; when the
    /// keyring cannot be read or written, then nothing may have been
    /// erased, or some of the subjects.
    fn forget_subjects(
        &self,
        account: &AccountId,
        subjects: &[&str],
        by: &Access,
    ) -> Result<Vec<Option<Erasure>>> {
        by.check()?;
        per_distinct(subjects, |distinct| {
            distinct
                .iter()
                .map(|s| match self.forget(account, s, by) {
                    Ok(e) => Ok(Some(e)),
                    Err(crate::Error::NothingToForget { .. }) => Ok(None),
                    Err(e) => Err(e),
                })
                .collect()
        })
    }

    /// What [`Keyring::forget_subjects`] would erase, erasing nothing: the
    /// data keys of each of `subjects` (`None`: it has none). Audited
    /// (`forget_dry_run`, with the subjects' references and how many have
    /// keys): the answer says whether the hub holds a person's data.
    ///
    /// # Errors
    /// [`crate::Error::Unattributed`] as [`Keyring::forget`]; when the
    /// keyring cannot be read or the audit record written.
    fn subject_keys(
        &self,
        account: &AccountId,
        subjects: &[&str],
        by: &Access,
    ) -> Result<Vec<Option<Erasure>>>;

    /// Rotate: new master key, every data key rewrapped under it, and new
    /// data keys for new events. Old data keys stay for decryption. The
    /// audit log records it with who asked and why.
    ///
    /// # Errors
    /// [`crate::Error::Unattributed`] when `by` leaves the principal or
    /// the purpose blank (nothing is rotated); when the keyring cannot be
    /// written.
    fn rotate(&self, by: &Access) -> Result<String>;
}

/// Answer `subjects`, which may name one twice, by answering each distinct
/// subject once with `answer` (in order of first mention); a repeat gets
/// the answer of its first mention.
pub(crate) fn per_distinct<T: Clone>(
    subjects: &[&str],
    answer: impl FnOnce(&[&str]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut distinct = Vec::new();
    let slots: Vec<usize> = subjects
        .iter()
        .map(|s| {
            *first.entry(s).or_insert_with(|| {
                distinct.push(*s);
                distinct.len() - 1
            })
        })
        .collect();
    let answers = answer(&distinct)?;
    Ok(slots.into_iter().map(|i| answers[i].clone()).collect())
}

/// Access to a keyring's audit log (for decryptors).
pub trait Audited {
    /// The audit log.
    fn audit_log(&self) -> &crate::audit::AuditLog;
}
