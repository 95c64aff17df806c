//! Errors of the protect crate. Messages name keys by id and subjects by
//! their keyed reference, never by value, and never include key material or
//! plaintext.

use std::path::PathBuf;

/// A result with the protect crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong protecting, decrypting or managing keys.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data key was erased (crypto-shredded); the ciphertext is
    /// unreadable for good.
    #[error(
        "key_erased: data key {key_id} was erased on {erased_at}; this value can no longer be decrypted"
    )]
    KeyErased {
        /// The erased key's id.
        key_id: String,
        /// When it was erased (RFC 3339).
        erased_at: String,
    },
    /// The ciphertext names a key this keyring never had.
    #[error("unknown_key: data key {key_id} is not in this keyring (wrong keyring, or the keyring file was replaced)")]
    UnknownKey {
        /// The key id from the ciphertext.
        key_id: String,
    },
    /// The value is not a Watershed ciphertext, or it was tampered with.
    #[error("bad_ciphertext: {detail}")]
    BadCiphertext {
        /// What is wrong.
        detail: &'static str,
    },
    /// An event's subject key was not fetched with its batch (the fetch
    /// failed, or the event was not noted before it).
    #[error("key_not_fetched: the data subject's key was not fetched for this batch")]
    KeyNotFetched,
    /// There is no data key for this (account, subject) to forget.
    #[error("no data key for account {account} and that subject (nothing was erased)")]
    NothingToForget {
        /// The account.
        account: String,
    },
    /// A keyring or audit file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A keyring file is not in the expected format.
    #[error("{path}: corrupt keyring file: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A wrapped key did not unwrap under its master key.
    #[error("data key {key_id} does not unwrap under master key {master_id} (wrong master key or tampered keyring)")]
    Unwrap {
        /// The data key.
        key_id: String,
        /// The master key.
        master_id: String,
    },
    /// The master key named by a wrapped key is not available.
    #[error("master key {master_id} is not available to this keyring")]
    UnknownMaster {
        /// The master key id.
        master_id: String,
    },
    /// The master keys are sealed, and the keyring was opened without the
    /// key that seals them.
    #[error("{path}: the master keys are sealed by KMS key {by}; open the keyring with that KMS key")]
    Sealed {
        /// The master key file.
        path: PathBuf,
        /// The sealing key's id.
        by: String,
    },
    /// The keyring was opened with a KMS key to unseal its master keys, but
    /// they are in plaintext.
    #[error(
        "{path}: the master keys are in plaintext, not sealed by the configured KMS key; seal them \
         first (`watershed keys seal`)"
    )]
    NotSealed {
        /// The master key file.
        path: PathBuf,
    },
    /// An audited call without a principal or a purpose: the audit log
    /// would not say who asked, or why.
    #[error("unattributed: {field} is empty; an audited call names who asks and why")]
    Unattributed {
        /// `principal` or `purpose`.
        field: &'static str,
    },
    /// AWS KMS refused or failed a request.
    #[error("kms: {0}")]
    Kms(String),
}
