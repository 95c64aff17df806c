//! The Watershed hub: HTTP ingest, write-ahead log, dedupe, pipeline
//! wiring, dead letters, auth and metrics. See `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod body;
pub mod config;
pub mod dedupe;
pub mod envelope;
mod error;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod sample;
pub mod serve;
pub mod wal;

pub use config::{HubConfig, Overrides};
pub use error::{Error, Result};
pub use pipeline::{Hub, Refused};
