//! Errors of the lake crate.

/// A result with the lake crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong building, writing or listing lake files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Arrow refused to build a batch (a bug in column building).
    #[error("building arrow batch for {table}: {source}")]
    Arrow {
        /// The table.
        table: String,
        /// The underlying error.
        source: Box<arrow::error::ArrowError>,
    },
    /// Encoding a Parquet file, or reading one, failed.
    #[error("parquet file {path}: {source}")]
    Parquet {
        /// The file.
        path: String,
        /// The underlying error.
        source: Box<parquet::errors::ParquetError>,
    },
    /// A lake setting that cannot be used (such as its URL).
    #[error("{0}")]
    Config(String),
    /// The object store failed.
    #[error("object store at {path}: {source}")]
    Store {
        /// The object path.
        path: String,
        /// The underlying error.
        source: Box<object_store::Error>,
    },
    /// A create-only put found a different file under the name it
    /// chose: another writer uses the same WAL identity.
    #[error(
        "the lake already holds a different file at {path}: another hub writes this lake under the same \
         WAL identity (was its data directory copied from this one's?); the file's rows stay in the \
         write-ahead log, and the put is retried"
    )]
    NameTaken {
        /// The object path.
        path: String,
    },
    /// A line of the commit log is damaged (not a torn last line).
    #[error(
        "the commit log {path} is damaged at {lines}: it is not compacted while the hub runs, and the \
         hub's next start rebuilds what the damaged lines held from the lake's files"
    )]
    LogDamaged {
        /// The log.
        path: std::path::PathBuf,
        /// Which lines, and what is wrong with the first.
        lines: String,
    },
    /// A local file (the commit log) failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}
