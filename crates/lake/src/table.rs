//! Row builders for one table: [`TableBuilder`] for a subject's events and
//! [`DeadLetterBuilder`] for rejects. Each turns appended rows into one
//! Arrow [`RecordBatch`] per partition and request.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::SchemaRef;
use watershed_event::TimestampMicros;
use watershed_schema::{SchemaVersion, Slot, SubjectEntry, Tape};

use crate::columns::{project, Col, Proj};
use crate::error::{Error, Result};
use crate::schema::{dead_letter_schema, table_schema, UTC};

/// The envelope of one event, as the hub decoded it.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta<'a> {
    /// The event id.
    pub event_id: &'a str,
    /// EventBridge `source` / CloudEvents `source`.
    pub source: &'a str,
    /// EventBridge `detail-type` / CloudEvents `type`.
    pub detail_type: &'a str,
    /// Event time, UTC microseconds.
    pub event_time: TimestampMicros,
    /// When the hub (or collector) received it.
    pub received_at: TimestampMicros,
    /// The AWS region, when given.
    pub region: Option<&'a str>,
    /// The schema version the payload was validated against.
    pub schema_version: SchemaVersion,
    /// The collector that forwarded it, when there was one.
    pub collector: Option<&'a str>,
}

/// The shared, immutable part of a table: schema and projections.
#[derive(Debug)]
pub struct TableLayout {
    /// The table name.
    pub table: String,
    /// The Arrow schema of its files.
    pub schema: SchemaRef,
    detail: watershed_schema::Node,
    projections: HashMap<SchemaVersion, Proj, ahash::RandomState>,
}

impl TableLayout {
    /// The layout of a subject's table: the latest version's columns, and
    /// a projection from every version onto them.
    #[must_use]
    pub fn new(subject: &SubjectEntry) -> Arc<Self> {
        let latest = &subject.latest().node;
        let projections = subject.versions.iter().map(|v| (v.version, project(latest, &v.node))).collect();
        Arc::new(Self {
            table: subject.table.clone(),
            schema: table_schema(latest),
            detail: latest.clone(),
            projections,
        })
    }
}

/// Builds one batch of a subject's table.
#[derive(Debug)]
pub struct TableBuilder {
    layout: Arc<TableLayout>,
    event_id: StringBuilder,
    source: StringBuilder,
    detail_type: StringBuilder,
    event_time: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    region: StringBuilder,
    resources: ListBuilder<StringBuilder>,
    schema_version: Int32Builder,
    collector: StringBuilder,
    detail: Col,
    rows: usize,
}

fn ts(rows: usize) -> TimestampMicrosecondBuilder {
    TimestampMicrosecondBuilder::with_capacity(rows).with_timezone(UTC)
}

impl TableBuilder {
    /// An empty builder with room for about `n` events: a request
    /// scattered over many partitions then allocates for the events each
    /// one gets, not for a thousand each.
    #[must_use]
    pub fn with_capacity(layout: Arc<TableLayout>, n: usize) -> Self {
        let text = || StringBuilder::with_capacity(n, n * 32);
        let detail = Col::with_capacity(&layout.detail, n);
        Self {
            layout,
            event_id: text(),
            source: text(),
            detail_type: text(),
            event_time: ts(n),
            received_at: ts(n),
            region: text(),
            resources: ListBuilder::with_capacity(StringBuilder::with_capacity(0, 0), n),
            schema_version: Int32Builder::with_capacity(n),
            collector: text(),
            detail,
            rows: 0,
        }
    }

    /// Rows appended since the last [`TableBuilder::finish`].
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Append one validated, protected event: the one rooted at `root`
    /// in `tape`.
    pub fn append<'r>(
        &mut self,
        meta: &EventMeta<'_>,
        resources: impl IntoIterator<Item = &'r str>,
        tape: &Tape,
        root: Slot,
    ) {
        self.event_id.append_value(meta.event_id);
        self.source.append_value(meta.source);
        self.detail_type.append_value(meta.detail_type);
        self.event_time.append_value(meta.event_time);
        self.received_at.append_value(meta.received_at);
        self.region.append_option(meta.region);
        for r in resources {
            self.resources.values().append_value(r);
        }
        self.resources.append(true);
        self.schema_version.append_value(i32::try_from(meta.schema_version).unwrap_or(i32::MAX));
        self.collector.append_option(meta.collector);
        let proj = self.layout.projections.get(&meta.schema_version).unwrap_or(&Proj::Scalar);
        self.detail.append(tape, root, proj);
        self.rows += 1;
    }

    /// Take the rows as a batch.
    ///
    /// # Errors
    /// [`Error::Arrow`] if the columns disagree (a bug).
    pub fn finish(&mut self) -> Result<RecordBatch> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.detail_type.finish()),
            Arc::new(self.event_time.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.region.finish()),
            Arc::new(self.resources.finish()),
            Arc::new(self.schema_version.finish()),
            Arc::new(self.collector.finish()),
            self.detail.finish(),
        ];
        RecordBatch::try_new(self.layout.schema.clone(), fitted(columns))
            .map_err(|e| Error::Arrow { table: self.layout.table.clone(), source: Box::new(e) })
    }
}

/// One rejected event.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The event id, when it could be read.
    pub event_id: Option<&'a str>,
    /// The source, when it could be read.
    pub source: Option<&'a str>,
    /// The detail type, when it could be read.
    pub detail_type: Option<&'a str>,
    /// The reason code.
    pub reason: &'a str,
    /// The JSON path of the problem.
    pub path: Option<&'a str>,
    /// What was wrong.
    pub detail: &'a str,
    /// When it was received.
    pub received_at: TimestampMicros,
    /// The collector, when there was one.
    pub collector: Option<&'a str>,
    /// The event as it arrived.
    pub raw: &'a str,
}

/// Builds one batch of the `_dead_letters` table.
#[derive(Debug)]
pub struct DeadLetterBuilder {
    schema: SchemaRef,
    cols: [StringBuilder; 6],
    received_at: TimestampMicrosecondBuilder,
    collector: StringBuilder,
    raw: StringBuilder,
    rows: usize,
}

impl Default for DeadLetterBuilder {
    fn default() -> Self {
        Self {
            schema: dead_letter_schema(),
            cols: Default::default(),
            received_at: ts(1024),
            collector: StringBuilder::new(),
            raw: StringBuilder::new(),
            rows: 0,
        }
    }
}

impl DeadLetterBuilder {
    /// Append one dead letter.
    pub fn append(&mut self, d: &DeadLetter<'_>) {
        let [id, source, dt, reason, path, detail] = &mut self.cols;
        id.append_option(d.event_id);
        source.append_option(d.source);
        dt.append_option(d.detail_type);
        reason.append_value(d.reason);
        path.append_option(d.path);
        detail.append_value(d.detail);
        self.received_at.append_value(d.received_at);
        self.collector.append_option(d.collector);
        self.raw.append_value(d.raw);
        self.rows += 1;
    }

    /// Rows appended since the last finish.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Take the rows as a batch.
    ///
    /// # Errors
    /// [`Error::Arrow`] if the columns disagree (a bug).
    pub fn finish(&mut self) -> Result<RecordBatch> {
        self.rows = 0;
        let mut columns: Vec<ArrayRef> =
            self.cols.iter_mut().map(|c| Arc::new(c.finish()) as ArrayRef).collect();
        columns.push(Arc::new(self.received_at.finish()));
        columns.push(Arc::new(self.collector.finish()));
        columns.push(Arc::new(self.raw.finish()));
        RecordBatch::try_new(self.schema.clone(), fitted(columns))
            .map_err(|e| Error::Arrow { table: crate::DEAD_LETTERS.into(), source: Box::new(e) })
    }
}

/// Columns shrunk to their rows. A batch keeps whatever room its builders
/// had left (their estimate of the rows, or 1,024 for dead letters):
/// with the room for 1,024, one event in a partition of its own held
/// about 150 KB (a payment's 30 arrays) where its values take under 4 KB,
/// and the memory budget counts the room.
fn fitted(mut columns: Vec<ArrayRef>) -> Vec<ArrayRef> {
    for c in &mut columns {
        if let Some(c) = Arc::get_mut(c) {
            c.shrink_to_fit();
        }
    }
    columns
}
