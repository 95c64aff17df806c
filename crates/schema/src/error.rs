//! Errors of the schema crate. Per-event validation failures are not errors
//! here: they are [`crate::Violation`] values, data for the dead-letter table.

use std::path::PathBuf;

/// A result with the schema crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading or checking a schema directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The schema directory itself cannot be read (missing, say).
    #[error("schema directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The directory holds schema problems; every one is listed.
    #[error("{} schema problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Invalid {
        /// One line per problem, each naming its file.
        problems: Vec<String>,
    },
}
