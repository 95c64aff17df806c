//! `watershed lake ls`: tables, partitions, files, rows and bytes, read
//! from the store's listing and the Parquet footers (only each file's
//! last bytes are read, concurrently).

use std::collections::BTreeMap;

use futures::StreamExt as _;

use crate::compact::footer;
use crate::error::Result;
use crate::store::Lake;

/// Totals for one partition directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionSummary {
    /// Files (unreadable ones included).
    pub files: usize,
    /// Rows, from the footers of the files that could be read.
    pub rows: u64,
    /// Bytes on the store.
    pub bytes: u64,
    /// Files whose footer could not be read: their rows are not counted.
    pub unreadable: usize,
}

/// Per table, per partition directory.
pub type LakeSummary = BTreeMap<String, BTreeMap<String, PartitionSummary>>;

/// What [`summarize`] found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Per table, per partition directory.
    pub tables: LakeSummary,
    /// `.parquet` files that are not readable Parquet (a file copied in
    /// half, another tool's damaged output), with why: listed, counted
    /// in `files` and `bytes`, not in `rows`.
    pub unreadable: Vec<(String, String)>,
}

impl Listing {
    /// Rows of every readable file.
    #[must_use]
    pub fn rows(&self) -> u64 {
        self.tables.values().flat_map(BTreeMap::values).map(|p| p.rows).sum()
    }
}

/// Footers read at once (the lake's own request bound applies too).
const CONCURRENT_FOOTERS: usize = 32;

/// Summarise every Parquet file in the lake. A file that cannot be read
/// as Parquet is counted and reported, not fatal.
///
/// # Errors
/// [`crate::Error::Store`] when the lake cannot be listed, or a file read.
pub async fn summarize(lake: &Lake) -> Result<Listing> {
    let files: Vec<_> =
        lake.list(None).await?.into_iter().filter(|m| m.location.as_ref().ends_with(".parquet")).collect();
    let mut footers = futures::stream::iter(files)
        .map(|meta| async move {
            let path = meta.location.to_string();
            let rows = match footer(lake, &path, meta.size).await {
                Ok(f) => Ok(u64::try_from(f.metadata().file_metadata().num_rows()).unwrap_or(0)),
                Err(crate::Error::Parquet { source, .. }) => Err(source.to_string()),
                Err(e) => return Err(e),
            };
            Ok((path, meta.size, rows))
        })
        .buffer_unordered(CONCURRENT_FOOTERS);
    let mut out = Listing::default();
    while let Some(read) = footers.next().await {
        let (path, bytes, rows) = read?;
        let (dir, _) = path.rsplit_once('/').unwrap_or(("", &path));
        let table = dir.split('/').next().unwrap_or("").to_owned();
        let p = out.tables.entry(table).or_default().entry(dir.to_owned()).or_default();
        p.files += 1;
        p.bytes += bytes;
        match rows {
            Ok(rows) => p.rows += rows,
            Err(why) => {
                p.unreadable += 1;
                out.unreadable.push((path, why));
            }
        }
    }
    out.unreadable.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use bytes::Bytes;

    use super::*;
    use crate::encode::{encode, EncodeOptions};
    use crate::partition::LakePath;

    /// Rows come from the footers, a file that is not Parquet is counted
    /// and named rather than failing the listing, and other files are
    /// not listed.
    #[tokio::test]
    async fn footers_are_counted_and_unreadable_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(dir.path(), 4).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let rows = 20_000;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values((0..rows).map(|i| format!("id-{i}")))),
                Arc::new(Int64Array::from_iter_values(0..rows)),
            ],
        )
        .unwrap();
        let file = encode("t/p/a.parquet", &schema, &[batch], Vec::new(), EncodeOptions::default()).unwrap();
        assert!(file.len() > 64 << 10, "a file larger than one footer read: {}", file.len());
        let put = |path: &str, bytes: Vec<u8>| {
            let lake = &lake;
            let path = LakePath(path.to_owned());
            async move { lake.put_create(&path, Bytes::from(bytes)).await.unwrap() }
        };
        put("t/account=1/date=2024-05-01/hour=00/a.parquet", file.clone()).await;
        put("t/account=1/date=2024-05-01/hour=01/b.parquet", file).await;
        put("t/account=1/date=2024-05-01/hour=01/half.parquet", b"PAR1 and then nothing".to_vec()).await;
        put("t/account=1/date=2024-05-01/hour=01/notes.txt", b"not a lake file".to_vec()).await;
        let listing = summarize(&lake).await.unwrap();
        assert_eq!(listing.rows(), 2 * 20_000);
        let parts = &listing.tables["t"];
        let h1 = &parts["t/account=1/date=2024-05-01/hour=01"];
        assert_eq!((h1.files, h1.rows, h1.unreadable), (2, 20_000, 1));
        assert_eq!(parts["t/account=1/date=2024-05-01/hour=00"].unreadable, 0);
        let [(path, why)] = &listing.unreadable[..] else { panic!("{:?}", listing.unreadable) };
        assert_eq!(path, "t/account=1/date=2024-05-01/hour=01/half.parquet");
        assert!(why.contains("file"), "{why}");
    }
}
