//! Field protection for Watershed.
//!
//! - [`BatchProtector`] applies a schema's [`watershed_schema::ProtectPlan`]
//!   to decoded events: `redact`, `mask`, `tokenize` (keyed HMAC-SHA256 per
//!   account) and `encrypt` (AES-256-GCM per account and data subject).
//! - [`Keyring`] holds the keys; [`LocalKeyring`] keeps them wrapped in a
//!   local directory, and with the `kms` feature `KmsMasterKey` wraps them
//!   with AWS KMS instead. [`Keyring::forget`] crypto-shreds a data subject.
//! - [`Decryptor`] decrypts for authorised readers and audits every call.
//!
//! Keys and plaintext print as `**REDACTED**`.

#![forbid(unsafe_code)]

mod audit;
pub mod cipher;
mod decrypt;
mod envelope;
mod error;
mod fsutil;
mod keyring;
#[cfg(feature = "kms")]
mod kms;
mod local;
mod protector;
mod secret;

pub use audit::{Access, AuditLog};
pub use cipher::{DataCipher, KeyId};
pub use decrypt::Decryptor;
pub use envelope::{EnvelopeKeyring, LocalKeyring, CACHED_KEYS};
pub use error::{Error, Result};
pub use keyring::{Audited, Erasure, Keyring, MasterKey, Wrapped};
#[cfg(feature = "kms")]
pub use kms::KmsMasterKey;
pub use local::LocalMasterKey;
pub use protector::{mask, tokenize, BatchProtector, Noted, TOKEN_BYTES};
pub use secret::{Plaintext, SecretKey};
