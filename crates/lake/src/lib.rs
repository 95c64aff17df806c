//! The Watershed lake: Hive-partitioned Parquet on an object store.
//!
//! - [`schema`]: the analysts' contract, Avro types to Arrow types.
//! - [`TableBuilder`] / [`DeadLetterBuilder`]: decoded events to Arrow
//!   batches, mixed schema versions projected onto the latest.
//! - [`LakeWriter`]: partition buffers under a memory budget, rolled by
//!   size and age into zstd Parquet, committed create-only with a
//!   [`CommitLog`] entry naming the WAL records each file covers.
//! - [`Compactor`]: closed partitions' small files merged into files of a
//!   target size, crash-safe through the same commit log.
//! - [`Lake`]: the object store (local directory or S3).
//! - [`retention`]: partitions past their table's period deleted, and
//!   recorded.
//! - [`ddl`]: catalog DDL declaring the tables for DuckDB, Athena, Spark
//!   and Trino.

#![forbid(unsafe_code)]

pub mod columns;
mod commit;
mod compact;
pub mod ddl;
mod encode;
mod error;
pub mod ls;
mod memory;
mod partition;
pub mod retention;
pub mod schema;
mod store;
mod table;
mod writer;

pub use commit::{CommitLog, Committed, OpenMerge, Unsynced};
pub use compact::{sweep_abandoned_uploads, CompactConfig, CompactReport, CompactStats, Compactor};
pub use encode::{encode, EncodeOptions, FileEncoder, SMALL_FILE_ROWS};
pub use error::{Error, Result};
pub use memory::{batch_bytes, Memory};
pub use partition::{dir_hour_end, LakePath, PartitionKey, DEAD_LETTERS};
pub use store::{parse_s3_url, Lake, Put, Swept, Unfinished, ABANDONED_UPLOAD_AGE};
pub use table::{DeadLetter, DeadLetterBuilder, EventMeta, TableBuilder, TableLayout};
pub use writer::{CommitSink, LakeWriter, Msg, Part, WriterConfig, WriterStats};
