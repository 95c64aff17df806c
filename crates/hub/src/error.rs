//! Errors of the hub. Per-event failures are not errors: they are
//! rejections with reason codes (see `watershed_event::Reason`).

use std::path::PathBuf;

/// A result with the hub's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop the hub or a hub command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message names the key.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The write-ahead log is damaged beyond its torn tail.
    #[error("write-ahead log {path}: {detail}")]
    WalCorrupt {
        /// The segment.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// What must be durable before a WAL record (new protection keys)
    /// could not be made so; the record was not written.
    #[error("{0}")]
    BeforeWal(String),
    /// The schema directory failed to load.
    #[error(transparent)]
    Schema(#[from] watershed_schema::Error),
    /// The configured schema directory cannot be read (missing, say).
    #[error(
        "schema directory {path}: {error}; point the hub at one with `schemas` in the config, \
         WATERSHED_SCHEMAS or serve --schemas DIR"
    )]
    SchemaDir {
        /// The directory.
        path: PathBuf,
        /// Why it cannot be read (in the message, not a `source`: the
        /// hint comes last).
        error: std::io::Error,
    },
    /// The keyring failed.
    #[error(transparent)]
    Protect(#[from] watershed_protect::Error),
    /// The lake failed.
    #[error(transparent)]
    Lake(#[from] watershed_lake::Error),
    /// The lake cannot be listed at start (a missing bucket, refused
    /// credentials, an unreachable endpoint): nothing is served.
    #[error(
        "the lake at {location} cannot be reached: {error}; check lake.url, lake.s3_endpoint, the bucket and \
         the AWS credentials"
    )]
    LakeUnreachable {
        /// Its URL or directory.
        location: String,
        /// Why.
        error: watershed_lake::Error,
    },
    /// The accounts file is damaged.
    #[error("{path}: corrupt accounts file: {detail}")]
    Accounts {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Another hub holds the data directory.
    #[error(
        "{dir} is in use by another hub (pid {pid}): two hubs would write the same write-ahead log; \
         stop that one first, or give this one a data directory of its own"
    )]
    DataDirInUse {
        /// The data directory.
        dir: PathBuf,
        /// The process id the other hub wrote into `hub.lock`.
        pid: String,
    },
    /// `accounts revoke` named no stored token, or not a token id.
    #[error("cannot revoke: {0}")]
    Revoke(String),
    /// The HTTP listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The pipeline stopped (its writer or WAL task ended).
    #[error("the ingest pipeline has stopped: {0}")]
    Stopped(&'static str),
    /// The hub could not start (as `serve` starts it).
    #[error("starting the hub: {0}")]
    Starting(#[source] Box<Error>),
}

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}
