//! The Watershed hub: HTTP ingest, write-ahead log, dedupe, pipeline
//! wiring, dead letters, auth, metrics and the Schema Registry API. See
//! `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod body;
pub mod claims;
pub mod config;
pub mod dedupe;
pub mod envelope;
mod error;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod registry_api;
pub mod requests;
pub mod sample;
pub mod serve;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod wal;

pub use config::{HubConfig, Overrides};
pub use error::{Error, Result};
pub use pipeline::{Hub, Refused};

/// Lowercase hex of `b` (token hashes, the WAL's identity).
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
