//! `watershed lake ls`: tables, partitions, files, rows and bytes, read
//! from the store's listing and the Parquet footers.

use std::collections::BTreeMap;

use parquet::file::metadata::ParquetMetaDataReader;

use crate::error::{Error, Result};
use crate::store::Lake;

/// Totals for one partition directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionSummary {
    /// Files.
    pub files: usize,
    /// Rows, from the footers.
    pub rows: u64,
    /// Bytes on the store.
    pub bytes: u64,
}

/// Per table, per partition directory.
pub type LakeSummary = BTreeMap<String, BTreeMap<String, PartitionSummary>>;

/// Summarise every committed Parquet file in the lake.
///
/// # Errors
/// [`Error::Store`] or [`Error::Parquet`] when a file cannot be read.
pub async fn summarize(lake: &Lake) -> Result<LakeSummary> {
    let mut out = LakeSummary::new();
    for meta in lake.list(None).await? {
        let path = meta.location.to_string();
        if !path.ends_with(".parquet") {
            continue;
        }
        let (dir, _) = path.rsplit_once('/').unwrap_or(("", &path));
        let table = dir.split('/').next().unwrap_or("").to_owned();
        let bytes = lake.get(&path).await?;
        let md = ParquetMetaDataReader::new()
            .parse_and_finish(&bytes)
            .map_err(|e| Error::Parquet { path: path.clone(), source: Box::new(e) })?;
        let p = out.entry(table).or_default().entry(dir.to_owned()).or_default();
        p.files += 1;
        p.rows += u64::try_from(md.file_metadata().num_rows()).unwrap_or(0);
        p.bytes += meta.size;
    }
    Ok(out)
}
