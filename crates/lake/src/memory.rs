//! The memory budget shared by the lake writer's buffers, compaction's
//! merges and the hub's requests in flight, and what a batch costs in it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;

/// Bytes held by the pipeline, against a budget. Ingest refuses new work
/// (503) while usage is at or over the budget.
#[derive(Debug)]
pub struct Memory {
    used: AtomicUsize,
    budget: usize,
}

impl Memory {
    /// A budget of `budget` bytes.
    #[must_use]
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), budget })
    }
    /// Bytes in use.
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    /// The budget.
    #[must_use]
    pub fn budget(&self) -> usize {
        self.budget
    }
    /// Whether new work must wait.
    #[must_use]
    pub fn full(&self) -> bool {
        self.used() >= self.budget
    }
    /// The usage at which the lake writer starts encoding and flushing
    /// partitions early (80% of the budget); compaction starts a merge
    /// only when it fits under it.
    #[must_use]
    pub fn high_mark(&self) -> usize {
        self.budget / 10 * 8
    }
    /// Account for `n` more bytes.
    pub fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }
    /// Release `n` bytes.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// What an array costs beyond the buffers `get_array_memory_size`
/// counts: its own structures, its buffers' headers and the allocator's
/// rounding of small buffers. Measured on the reference tables: a
/// one-event payment batch (30 arrays) adds 18.3 KB to the process's
/// resident memory where its buffers count 3.7 KB.
const ARRAY_BYTES: usize = 480;

/// The bytes `batch` holds, as the memory budget counts them: its
/// buffers plus `ARRAY_BYTES` (480) per array, so that many small batches
/// (an event or two per partition and request) count what they take.
#[must_use]
pub fn batch_bytes(batch: &RecordBatch) -> usize {
    fn arrays(t: &DataType) -> usize {
        1 + match t {
            DataType::Struct(fields) => fields.iter().map(|f| arrays(f.data_type())).sum(),
            DataType::List(f) | DataType::LargeList(f) | DataType::Map(f, _) => arrays(f.data_type()),
            _ => 0,
        }
    }
    let n: usize = batch.schema_ref().fields().iter().map(|f| arrays(f.data_type())).sum();
    batch.get_array_memory_size() + n * ARRAY_BYTES
}
