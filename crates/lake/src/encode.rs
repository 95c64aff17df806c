//! Parquet encoding: zstd, statistics, dictionary encoding, bounded row
//! groups, and key-value metadata naming the WAL records a file covers.

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::schema::PROTECT_KEY;

use crate::error::{Error, Result};

/// Parquet settings.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// zstd level (1 is fast; 3 is the zstd default).
    pub zstd_level: i32,
    /// Maximum rows per row group.
    pub row_group_rows: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self { zstd_level: 1, row_group_rows: 122_880 }
    }
}

/// A column whose values are unique by construction.
const UNIQUE_COLUMN: &str = "event_id";

/// The receive time: one value per request.
const RECEIVED_COLUMN: &str = "received_at";

/// The most bytes of dictionary a column chunk builds before it falls
/// back to plain encoding (parquet's default is 1 MiB).
const DICTIONARY_LIMIT: usize = 256 << 10;

/// Rows handed to the Parquet writer per call.
const WRITE_ROWS: usize = 8192;

/// A file of fewer rows than this is written uncompressed
/// ([`FileEncoder::for_rows`]). Its pages are a few hundred bytes per
/// column, where zstd saves little, while the Parquet writer sets up a
/// zstd compression and decompression context per column chunk, and each
/// setup runs `cpuid`: a trap to the hypervisor on virtual machines, which
/// made it half the CPU of flushing one-event files. Compaction merges
/// such files, into zstd once they add up to this many rows.
pub const SMALL_FILE_ROWS: usize = 128;

/// Encode `batches` (all of `schema`) as one Parquet file.
///
/// # Errors
/// [`Error::Parquet`] when encoding fails.
pub fn encode(
    path: &str,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    metadata: Vec<(String, String)>,
    opts: EncodeOptions,
) -> Result<Vec<u8>> {
    let mut file = FileEncoder::new(path, schema, opts)?;
    // Requests hand over small batches; the column writers work per call,
    // so consecutive batches are joined into chunks of about
    // `WRITE_ROWS` rows first (one chunk of extra memory at a time).
    let mut start = 0;
    let mut rows = 0;
    for (i, b) in batches.iter().enumerate() {
        rows += b.num_rows();
        if rows >= WRITE_ROWS || i + 1 == batches.len() {
            file.write_joined(&batches[start..=i])?;
            start = i + 1;
            rows = 0;
        }
    }
    file.finish(metadata)
}

/// One Parquet file encoded incrementally in memory: the lake writer feeds
/// each partition's rows in chunks as they arrive, so an open partition
/// holds compressed pages rather than Arrow buffers.
pub struct FileEncoder {
    path: String,
    schema: SchemaRef,
    writer: ArrowWriter<Vec<u8>>,
    /// Bytes of this encoder currently counted against the memory budget
    /// (kept by the lake writer).
    pub(crate) charged: usize,
}

impl std::fmt::Debug for FileEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileEncoder").field("path", &self.path).field("held", &self.held()).finish()
    }
}

impl FileEncoder {
    /// An empty file of `schema`; `path` names it in errors.
    ///
    /// # Errors
    /// [`Error::Parquet`] for settings the writer refuses.
    pub fn new(path: &str, schema: &SchemaRef, opts: EncodeOptions) -> Result<Self> {
        Self::with_compression(path, schema, opts, true)
    }

    /// A file that will hold `rows` rows and no more: as
    /// [`FileEncoder::new`], uncompressed below [`SMALL_FILE_ROWS`].
    ///
    /// # Errors
    /// As [`FileEncoder::new`].
    pub fn for_rows(path: &str, schema: &SchemaRef, opts: EncodeOptions, rows: usize) -> Result<Self> {
        Self::with_compression(path, schema, opts, rows >= SMALL_FILE_ROWS)
    }

    fn with_compression(path: &str, schema: &SchemaRef, opts: EncodeOptions, zstd: bool) -> Result<Self> {
        let err = |e| Error::Parquet { path: path.to_owned(), source: Box::new(e) };
        let compression = if zstd {
            Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level).map_err(err)?)
        } else {
            Compression::UNCOMPRESSED
        };
        let mut builder = WriterProperties::builder();
        // Ciphertexts and event ids never repeat: a dictionary would only
        // cost time. The min and max of random ciphertexts prune nothing
        // either, so ciphertext columns carry no statistics.
        for path in leaf_paths(schema, |f| f.metadata().get(PROTECT_KEY).is_some_and(|p| p == "encrypt")) {
            builder = builder
                .set_column_dictionary_enabled(ColumnPath::new(path.clone()), false)
                .set_column_statistics_enabled(ColumnPath::new(path), EnabledStatistics::None);
        }
        // Event times are near-unique and near-sorted: delta encoding
        // stores them in a fraction of a dictionary's bytes, at less cost.
        // `received_at` repeats per request and keeps its dictionary.
        for path in leaf_paths(schema, |f| {
            matches!(f.data_type(), DataType::Timestamp(..)) && f.name() != RECEIVED_COLUMN
        }) {
            builder = builder
                .set_column_dictionary_enabled(ColumnPath::new(path.clone()), false)
                .set_column_encoding(ColumnPath::new(path), Encoding::DELTA_BINARY_PACKED);
        }
        if schema.field_with_name(UNIQUE_COLUMN).is_ok() {
            builder =
                builder.set_column_dictionary_enabled(ColumnPath::new(vec![UNIQUE_COLUMN.into()]), false);
        }
        let props = builder
            .set_compression(compression)
            .set_statistics_enabled(EnabledStatistics::Chunk)
            .set_dictionary_enabled(true)
            // A column whose dictionary outgrows this falls back to plain
            // encoding: low-cardinality columns keep their dictionaries, and
            // near-unique ones stop paying for hashing early.
            .set_dictionary_page_size_limit(DICTIONARY_LIMIT)
            .set_max_row_group_row_count(Some(opts.row_group_rows))
            .set_created_by(format!("watershed {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props)).map_err(err)?;
        Ok(Self { path: path.to_owned(), schema: schema.clone(), writer, charged: 0 })
    }

    fn err(&self, e: parquet::errors::ParquetError) -> Error {
        Error::Parquet { path: self.path.clone(), source: Box::new(e) }
    }

    /// Encode `batches` as the next rows, joined into one call.
    ///
    /// # Errors
    /// [`Error::Parquet`] when encoding fails.
    pub fn write_joined(&mut self, batches: &[RecordBatch]) -> Result<()> {
        match batches {
            [] => Ok(()),
            [one] => self.writer.write(one).map_err(|e| self.err(e)),
            many => {
                let joined = arrow::compute::concat_batches(&self.schema, many)
                    .map_err(|e| self.err(parquet::errors::ParquetError::ArrowError(e.to_string())))?;
                self.writer.write(&joined).map_err(|e| self.err(e))
            }
        }
    }

    /// Make room for `bytes` of output at once, for a file whose size is
    /// known ahead (a merge of files): grown by doubling instead, the
    /// buffer would be copied at each step and, in the last, held twice.
    pub fn reserve_output(&mut self, bytes: usize) {
        self.writer.inner_mut().reserve(bytes);
    }

    /// Bytes held: the buffer of finished row groups (its capacity: it
    /// grows by doubling, so up to twice what is written) plus the row
    /// group in progress.
    #[must_use]
    pub fn held(&self) -> usize {
        self.writer.inner().capacity().max(self.writer.bytes_written()) + self.writer.memory_size()
    }

    /// Add `metadata` and write the footer.
    ///
    /// # Errors
    /// [`Error::Parquet`] when encoding fails.
    pub fn finish(mut self, metadata: Vec<(String, String)>) -> Result<Vec<u8>> {
        for (k, v) in metadata {
            self.writer.append_key_value_metadata(KeyValue::new(k, v));
        }
        // Flushes the last row group and writes the footer.
        let path = self.path;
        self.writer.into_inner().map_err(|e| Error::Parquet { path, source: Box::new(e) })
    }
}

/// Leaf paths (through structs only) of the fields `pick` chooses.
fn leaf_paths(schema: &SchemaRef, pick: impl Fn(&Field) -> bool) -> Vec<Vec<String>> {
    fn walk(
        field: &Field,
        prefix: &mut Vec<String>,
        out: &mut Vec<Vec<String>>,
        pick: &dyn Fn(&Field) -> bool,
    ) {
        prefix.push(field.name().clone());
        match field.data_type() {
            DataType::Struct(children) => {
                for c in children {
                    walk(c, prefix, out, pick);
                }
            }
            _ if pick(field) => out.push(prefix.clone()),
            _ => {}
        }
        prefix.pop();
    }
    let mut out = Vec::new();
    for f in schema.fields() {
        walk(f, &mut Vec::new(), &mut out, &pick);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, StringArray, StructArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};
    use bytes::Bytes;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// Every column carries chunk statistics except ciphertexts; only
    /// near-unique columns go without a dictionary, and event times are
    /// delta-encoded.
    #[test]
    fn statistics_dictionaries_and_encodings_per_column() {
        let secret = Field::new("card", DataType::Utf8, false)
            .with_metadata(HashMap::from([(PROTECT_KEY.to_owned(), "encrypt".to_owned())]));
        let detail = Fields::from(vec![Field::new("amount", DataType::Int64, false), secret]);
        let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let schema = Arc::new(Schema::new(vec![
            Field::new(UNIQUE_COLUMN, DataType::Utf8, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("event_time", ts(), false),
            Field::new(RECEIVED_COLUMN, ts(), false),
            Field::new("detail", DataType::Struct(detail.clone()), false),
        ]));
        let ids: ArrayRef = Arc::new(StringArray::from(vec!["b", "a", "c"]));
        let times = || -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(vec![1_000, 1_500, 2_250]).with_timezone("UTC"))
        };
        let sources: ArrayRef = Arc::new(StringArray::from(vec!["s", "s", "s"]));
        let amounts: ArrayRef = Arc::new(Int64Array::from(vec![5, -2, 9]));
        let cards: ArrayRef = Arc::new(StringArray::from(vec!["wse1.x", "wse1.y", "wse1.z"]));
        let detail = Arc::new(StructArray::new(detail, vec![amounts, cards], None));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![ids, sources, times(), times(), detail]).unwrap();
        let file = encode("t.parquet", &schema, &[batch], Vec::new(), EncodeOptions::default()).unwrap();
        let reader = SerializedFileReader::new(Bytes::from(file.clone())).unwrap();
        let rg = reader.metadata().row_group(0);
        let column = |path: &str| {
            (0..rg.num_columns()).map(|i| rg.column(i)).find(|c| c.column_path().string() == path).unwrap()
        };
        for path in [UNIQUE_COLUMN, "source", "event_time", RECEIVED_COLUMN, "detail.amount"] {
            assert!(column(path).statistics().is_some(), "{path} has statistics");
        }
        let amount = column("detail.amount").statistics().cloned().unwrap();
        assert_eq!(amount.min_bytes_opt(), Some(&(-2i64).to_le_bytes()[..]));
        assert_eq!(amount.max_bytes_opt(), Some(&9i64.to_le_bytes()[..]));
        assert!(column("detail.card").statistics().is_none(), "ciphertexts carry no statistics");
        let dictionary = |path: &str| column(path).dictionary_page_offset().is_some();
        assert!(dictionary("source"));
        assert!(!dictionary(UNIQUE_COLUMN));
        assert!(!dictionary("detail.card"));
        assert!(dictionary(RECEIVED_COLUMN));
        assert!(!dictionary("event_time"));
        assert!(column("event_time").encodings().any(|e| e == Encoding::DELTA_BINARY_PACKED));
        let back =
            parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(Bytes::from(file.clone()), 8)
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
        assert_eq!(back.column_by_name("event_time").unwrap(), &times(), "delta-encoded times read back");
    }

    /// A file known to stay small is written uncompressed; from
    /// [`SMALL_FILE_ROWS`] rows, and for a file whose size is not known
    /// when it is started, every column is zstd.
    #[test]
    fn small_files_are_uncompressed_and_others_zstd() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Utf8, false),
        ]));
        let file = |rows: usize, known: bool| {
            let n: ArrayRef = Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i as i64)));
            let s: ArrayRef =
                Arc::new(StringArray::from_iter_values((0..rows).map(|i| format!("v{}", i % 7))));
            let batch = RecordBatch::try_new(schema.clone(), vec![n, s]).unwrap();
            let opts = EncodeOptions::default();
            let mut f = if known {
                FileEncoder::for_rows("t.parquet", &schema, opts, rows).unwrap()
            } else {
                FileEncoder::new("t.parquet", &schema, opts).unwrap()
            };
            f.write_joined(&[batch]).unwrap();
            let reader = SerializedFileReader::new(Bytes::from(f.finish(Vec::new()).unwrap())).unwrap();
            let rg = reader.metadata().row_group(0);
            (0..rg.num_columns()).map(|i| rg.column(i).compression()).collect::<Vec<_>>()
        };
        let zstd = Compression::ZSTD(ZstdLevel::try_new(1).unwrap());
        assert_eq!(file(1, true), [Compression::UNCOMPRESSED; 2]);
        assert_eq!(file(SMALL_FILE_ROWS - 1, true), [Compression::UNCOMPRESSED; 2]);
        assert_eq!(file(SMALL_FILE_ROWS, true), [zstd; 2]);
        assert_eq!(file(1, false), [zstd; 2]);
    }

    /// What an open file holds counts its output buffer's capacity, not
    /// only the bytes in it: the buffer grows by doubling, so it may hold
    /// up to twice what was written. A merge's buffer reserved ahead is
    /// counted whole too.
    #[test]
    fn held_counts_the_output_buffer_as_allocated() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Utf8, false)]));
        let opts = EncodeOptions { zstd_level: 1, row_group_rows: 1000 };
        let mut f = FileEncoder::new("t.parquet", &schema, opts).unwrap();
        let mut slack = false;
        for i in 0..40 {
            // Incompressible values, so each row group adds its size.
            let values: Vec<String> = (0..1000)
                .map(|j| format!("{:x}", ((i * 1000 + j) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
                .collect();
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(values))]).unwrap();
            f.write_joined(&[batch]).unwrap();
            let (written, capacity) = (f.writer.bytes_written(), f.writer.inner().capacity());
            slack |= capacity > written + written / 4;
            assert!(f.held() >= capacity + f.writer.memory_size(), "{} < {capacity}", f.held());
        }
        assert!(slack, "the buffer grew by doubling at least once with room to spare");
        let mut reserved = FileEncoder::new("m.parquet", &schema, opts).unwrap();
        reserved.reserve_output(10 << 20);
        assert!(reserved.held() >= 10 << 20);
    }
}
