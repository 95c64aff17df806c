//! Parquet encoding: zstd, statistics, dictionary encoding, bounded row
//! groups, and key-value metadata naming the WAL records a file covers.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
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

/// The most bytes of dictionary a column chunk builds before it falls
/// back to plain encoding (parquet's default is 1 MiB).
const DICTIONARY_LIMIT: usize = 256 << 10;

/// Rows handed to the Parquet writer per call.
const WRITE_ROWS: usize = 8192;

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
        let err = |e| Error::Parquet { path: path.to_owned(), source: Box::new(e) };
        let mut builder = WriterProperties::builder();
        // Ciphertexts and event ids never repeat: a dictionary would only
        // cost time.
        for path in encrypted_columns(schema) {
            builder = builder.set_column_dictionary_enabled(ColumnPath::new(path), false);
        }
        if schema.field_with_name(UNIQUE_COLUMN).is_ok() {
            builder =
                builder.set_column_dictionary_enabled(ColumnPath::new(vec![UNIQUE_COLUMN.into()]), false);
        }
        let props = builder
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level).map_err(err)?))
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

    /// Bytes held: finished row groups plus the one in progress.
    #[must_use]
    pub fn held(&self) -> usize {
        self.writer.bytes_written() + self.writer.memory_size()
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

/// Leaf paths (through structs only) of fields marked encrypted.
fn encrypted_columns(schema: &SchemaRef) -> Vec<Vec<String>> {
    fn walk(field: &arrow::datatypes::Field, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        prefix.push(field.name().clone());
        match field.data_type() {
            arrow::datatypes::DataType::Struct(children) => {
                for c in children {
                    walk(c, prefix, out);
                }
            }
            _ if field.metadata().get(PROTECT_KEY).is_some_and(|p| p == "encrypt") => {
                out.push(prefix.clone())
            }
            _ => {}
        }
        prefix.pop();
    }
    let mut out = Vec::new();
    for f in schema.fields() {
        walk(f, &mut Vec::new(), &mut out);
    }
    out
}
