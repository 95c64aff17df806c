//! Column builders driven by decoded events ([`Tape`]s).
//!
//! [`Col`] mirrors a table's Arrow type; [`Proj`] says how one schema
//! version's values land in the latest version's columns (Avro schema
//! resolution: fields matched by name or alias, defaults for fields the
//! writer lacked, int→long→float→double promotions, enums as their symbol
//! text). Mixed versions therefore share one file schema and never force a
//! file rotation.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int32Builder, Int64Builder, ListArray, MapArray, NullArray, StringArray, StringBuilder,
    StructArray, Time32MillisecondBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
    TimestampMillisecondBuilder,
};
use arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, FieldRef, Fields};
use arrow_buffer::NullBufferBuilder;
use watershed_schema::{decode_value, Kind, Node, Slot, Tape};

use crate::schema::{arrow_type, UTC};

/// How a writer version's values map onto the latest (reader) columns.
#[derive(Debug, Clone)]
pub enum Proj {
    /// A scalar, converted by promotion when the types differ.
    Scalar,
    /// An enum, written as text: the text of each of the writer's symbols
    /// (itself, or the reader's default symbol when the reader lacks it).
    Enum(Arc<Vec<String>>),
    /// A record: one source per reader field.
    Record(Vec<Src>),
    /// Array items.
    List(Box<Proj>),
    /// Map values.
    Map(Box<Proj>),
}

/// Where a reader field's value comes from.
#[derive(Debug, Clone)]
pub enum Src {
    /// The writer's field at this index.
    Field(usize, Proj),
    /// The reader's default (the writer lacked the field).
    Default(Arc<(Tape, Slot)>, Proj),
    /// Null (the writer lacked the field and the reader has no default).
    Null,
}

/// Build the projection from `writer` to `reader`. The registry has
/// already checked that the reader can read the writer.
#[must_use]
pub fn project(reader: &Node, writer: &Node) -> Proj {
    match (&reader.kind, &writer.kind) {
        (Kind::Record(r), Kind::Record(w)) => Proj::Record(
            r.fields
                .iter()
                .enumerate()
                .map(|(ri, rf)| {
                    match r.writer_field(ri, w) {
                        Some(wi) => Src::Field(wi, project(&rf.node, &w.fields[wi].node)),
                        // The registry checked that the default decodes.
                        None => match &rf.default_json {
                            Some(d) => {
                                let mut tape = Tape::new();
                                match decode_value(&rf.node, d.as_bytes(), &mut tape) {
                                    Ok(slot) => {
                                        Src::Default(Arc::new((tape, slot)), project(&rf.node, &rf.node))
                                    }
                                    Err(_) => Src::Null,
                                }
                            }
                            None => Src::Null,
                        },
                    }
                })
                .collect(),
        ),
        (Kind::Array(r), Kind::Array(w)) => Proj::List(Box::new(project(r, w))),
        (Kind::Map(r), Kind::Map(w)) => Proj::Map(Box::new(project(r, w))),
        // A writer symbol the reader lacks reads as the reader's default
        // symbol (the registry refuses the version without one).
        (Kind::Enum { symbols: rs, default: Some(d) }, Kind::Enum { symbols: ws, .. }) => Proj::Enum(
            Arc::new(ws.iter().map(|w| if rs.contains(w) { w.clone() } else { d.clone() }).collect()),
        ),
        (_, Kind::Enum { symbols, .. }) => Proj::Enum(Arc::new(symbols.clone())),
        _ => Proj::Scalar,
    }
}

/// A column under construction.
#[derive(Debug)]
pub enum Col {
    /// All nulls.
    Null(usize),
    /// boolean
    Bool(BooleanBuilder),
    /// int
    I32(Int32Builder),
    /// long
    I64(Int64Builder),
    /// float
    F32(Float32Builder),
    /// double
    F64(Float64Builder),
    /// string, uuid, enum: UTF-8 bytes appended as they are (the tape holds
    /// only checked text), checked once per column by [`Col::finish`]
    /// rather than once per value.
    Str(BinaryBuilder),
    /// bytes, fixed
    Bin(BinaryBuilder),
    /// date
    Date(Date32Builder),
    /// time-millis
    TimeMs(Time32MillisecondBuilder),
    /// time-micros
    TimeUs(Time64MicrosecondBuilder),
    /// timestamp-millis
    TsMs(TimestampMillisecondBuilder),
    /// timestamp-micros
    TsUs(TimestampMicrosecondBuilder),
    /// decimal
    Dec(Decimal128Builder, u8, i8),
    /// array
    List {
        /// The item field.
        field: FieldRef,
        /// Offsets, starting with 0.
        offsets: Vec<i32>,
        /// Validity.
        nulls: NullBufferBuilder,
        /// Items.
        child: Box<Col>,
    },
    /// map
    Map {
        /// The entries field.
        field: FieldRef,
        /// Offsets, starting with 0.
        offsets: Vec<i32>,
        /// Validity.
        nulls: NullBufferBuilder,
        /// Keys.
        keys: StringBuilder,
        /// Values.
        values: Box<Col>,
    },
    /// record
    Struct {
        /// Child fields.
        fields: Fields,
        /// Children.
        children: Vec<Col>,
        /// Validity.
        nulls: NullBufferBuilder,
    },
}

impl Col {
    /// An empty column for `node` with room for `n` values (text and
    /// lists grow as they fill: their sizes are not known ahead).
    #[must_use]
    pub fn with_capacity(node: &Node, n: usize) -> Self {
        match &node.kind {
            Kind::Null => Col::Null(0),
            Kind::Boolean => Col::Bool(BooleanBuilder::with_capacity(n)),
            Kind::Int => Col::I32(Int32Builder::with_capacity(n)),
            Kind::Long => Col::I64(Int64Builder::with_capacity(n)),
            Kind::Float => Col::F32(Float32Builder::with_capacity(n)),
            Kind::Double => Col::F64(Float64Builder::with_capacity(n)),
            Kind::String | Kind::Uuid | Kind::Enum { .. } => {
                Col::Str(BinaryBuilder::with_capacity(n, n * 16))
            }
            Kind::Bytes | Kind::Fixed { .. } => Col::Bin(BinaryBuilder::with_capacity(n, n * 16)),
            Kind::Date => Col::Date(Date32Builder::with_capacity(n)),
            Kind::TimeMillis => Col::TimeMs(Time32MillisecondBuilder::with_capacity(n)),
            Kind::TimeMicros => Col::TimeUs(Time64MicrosecondBuilder::with_capacity(n)),
            Kind::TimestampMillis => {
                Col::TsMs(TimestampMillisecondBuilder::with_capacity(n).with_timezone(UTC))
            }
            Kind::TimestampMicros => {
                Col::TsUs(TimestampMicrosecondBuilder::with_capacity(n).with_timezone(UTC))
            }
            #[allow(clippy::cast_possible_wrap)]
            Kind::Decimal { precision, scale } => Col::Dec(
                Decimal128Builder::with_capacity(n)
                    .with_precision_and_scale(*precision, *scale as i8)
                    .expect("checked at load"),
                *precision,
                *scale as i8,
            ),
            Kind::Array(item) => {
                let DataType::List(field) = arrow_type(node) else { unreachable!("array maps to list") };
                Col::List {
                    field,
                    offsets: first_offset(n),
                    nulls: NullBufferBuilder::new(n),
                    child: Box::new(Col::with_capacity(item, n)),
                }
            }
            Kind::Map(value) => {
                let DataType::Map(field, _) = arrow_type(node) else { unreachable!("map maps to map") };
                Col::Map {
                    field,
                    offsets: first_offset(n),
                    nulls: NullBufferBuilder::new(n),
                    keys: StringBuilder::with_capacity(n, n * 16),
                    values: Box::new(Col::with_capacity(value, n)),
                }
            }
            Kind::Record(r) => {
                let DataType::Struct(fields) = arrow_type(node) else {
                    unreachable!("record maps to struct")
                };
                Col::Struct {
                    fields,
                    children: r.fields.iter().map(|f| Col::with_capacity(&f.node, n)).collect(),
                    nulls: NullBufferBuilder::new(n),
                }
            }
        }
    }

    /// Append a null.
    pub fn append_null(&mut self) {
        match self {
            Col::Null(n) => *n += 1,
            Col::Bool(b) => b.append_null(),
            Col::I32(b) => b.append_null(),
            Col::I64(b) => b.append_null(),
            Col::F32(b) => b.append_null(),
            Col::F64(b) => b.append_null(),
            Col::Str(b) => b.append_null(),
            Col::Bin(b) => b.append_null(),
            Col::Date(b) => b.append_null(),
            Col::TimeMs(b) => b.append_null(),
            Col::TimeUs(b) => b.append_null(),
            Col::TsMs(b) => b.append_null(),
            Col::TsUs(b) => b.append_null(),
            Col::Dec(b, ..) => b.append_null(),
            Col::List { offsets, nulls, .. } | Col::Map { offsets, nulls, .. } => {
                let last = *offsets.last().expect("starts with 0");
                offsets.push(last);
                nulls.append_null();
            }
            Col::Struct { children, nulls, .. } => {
                children.iter_mut().for_each(Col::append_null);
                nulls.append_null();
            }
        }
    }

    /// Append the value in `slot` of `tape`, mapped by `proj`.
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    pub fn append(&mut self, tape: &Tape, slot: Slot, proj: &Proj) {
        match (self, slot) {
            (c, Slot::Null | Slot::Unset) => c.append_null(),
            (Col::Bool(b), Slot::Bool(v)) => b.append_value(v),
            (Col::I32(b), Slot::Int(v)) => b.append_value(v),
            (Col::Date(b), Slot::Int(v)) => b.append_value(v),
            (Col::I64(b), Slot::Int(v)) => b.append_value(i64::from(v)),
            (Col::I64(b), Slot::Long(v)) => b.append_value(v),
            (Col::F32(b), Slot::Int(v)) => b.append_value(v as f32),
            (Col::F32(b), Slot::Long(v)) => b.append_value(v as f32),
            (Col::F32(b), Slot::Float(v)) => b.append_value(v),
            (Col::F64(b), Slot::Int(v)) => b.append_value(f64::from(v)),
            (Col::F64(b), Slot::Long(v)) => b.append_value(v as f64),
            (Col::F64(b), Slot::Float(v)) => b.append_value(f64::from(v)),
            (Col::F64(b), Slot::Double(v)) => b.append_value(v),
            (Col::Str(b), Slot::Str { .. }) => b.append_value(tape.bytes(slot)),
            (Col::Str(b), Slot::Bytes { .. }) => {
                b.append_value(String::from_utf8_lossy(tape.bytes(slot)).as_bytes());
            }
            (Col::Str(b), Slot::Enum(i)) => match proj {
                Proj::Enum(symbols) => b.append_value(symbols[i as usize].as_bytes()),
                _ => b.append_null(),
            },
            (Col::Bin(b), Slot::Bytes { .. } | Slot::Str { .. }) => b.append_value(tape.bytes(slot)),
            (Col::TimeMs(b), Slot::Int(v)) => b.append_value(v),
            (Col::TimeUs(b), Slot::Long(v)) => b.append_value(v),
            (Col::TsMs(b), Slot::Long(v)) => b.append_value(v),
            (Col::TsUs(b), Slot::Long(v)) => b.append_value(v),
            (Col::Dec(b, ..), Slot::Decimal(_)) => b.append_option(tape.decimal(slot)),
            (Col::List { offsets, nulls, child, .. }, Slot::List { start, len }) => {
                let item = match proj {
                    Proj::List(p) => p.as_ref(),
                    _ => &Proj::Scalar,
                };
                for i in start..start + len {
                    child.append(tape, tape.slot(i), item);
                }
                let last = *offsets.last().expect("starts with 0");
                offsets.push(last + i32::try_from(len).expect("event size caps lists"));
                nulls.append_non_null();
            }
            (Col::Map { offsets, nulls, keys, values, .. }, Slot::Map { start, len }) => {
                let vp = match proj {
                    Proj::Map(p) => p.as_ref(),
                    _ => &Proj::Scalar,
                };
                for i in 0..len {
                    keys.append_value(tape.str(tape.slot(start + 2 * i)));
                    values.append(tape, tape.slot(start + 2 * i + 1), vp);
                }
                let last = *offsets.last().expect("starts with 0");
                offsets.push(last + i32::try_from(len).expect("event size caps maps"));
                nulls.append_non_null();
            }
            (Col::Struct { children, nulls, .. }, Slot::Record(start)) => {
                if let Proj::Record(srcs) = proj {
                    for (child, src) in children.iter_mut().zip(srcs) {
                        match src {
                            Src::Field(wi, p) => child.append(tape, tape.slot(start + *wi as u32), p),
                            Src::Default(d, p) => child.append(&d.0, d.1, p),
                            Src::Null => child.append_null(),
                        }
                    }
                } else {
                    children.iter_mut().for_each(Col::append_null);
                }
                nulls.append_non_null();
            }
            (c, other) => {
                debug_assert!(false, "validated slot {other:?} does not fit column");
                c.append_null();
            }
        }
    }

    /// Take the built array, leaving the column empty.
    pub fn finish(&mut self) -> ArrayRef {
        match self {
            Col::Null(n) => {
                let a = Arc::new(NullArray::new(*n));
                *n = 0;
                a
            }
            Col::Bool(b) => Arc::new(b.finish()),
            Col::I32(b) => Arc::new(b.finish()),
            Col::I64(b) => Arc::new(b.finish()),
            Col::F32(b) => Arc::new(b.finish()),
            Col::F64(b) => Arc::new(b.finish()),
            Col::Str(b) => Arc::new(
                StringArray::try_from_binary(b.finish()).expect("string columns hold only UTF-8 text"),
            ),
            Col::Bin(b) => Arc::new(b.finish()),
            Col::Date(b) => Arc::new(b.finish()),
            Col::TimeMs(b) => Arc::new(b.finish()),
            Col::TimeUs(b) => Arc::new(b.finish()),
            Col::TsMs(b) => Arc::new(b.finish()),
            Col::TsUs(b) => Arc::new(b.finish()),
            Col::Dec(b, p, s) => {
                let a = b.finish();
                *b = Decimal128Builder::new().with_precision_and_scale(*p, *s).expect("checked at load");
                Arc::new(a)
            }
            Col::List { field, offsets, nulls, child } => {
                let offs = take_offsets(offsets);
                Arc::new(ListArray::new(field.clone(), offs, child.finish(), nulls.finish()))
            }
            Col::Map { field, offsets, nulls, keys, values } => {
                let offs = take_offsets(offsets);
                let DataType::Struct(entry_fields) = field.data_type() else { unreachable!("map entries") };
                let entries = StructArray::new(
                    entry_fields.clone(),
                    vec![Arc::new(keys.finish()), values.finish()],
                    None,
                );
                Arc::new(MapArray::new(field.clone(), offs, entries, nulls.finish(), false))
            }
            Col::Struct { fields, children, nulls } => {
                let arrays: Vec<ArrayRef> = children.iter_mut().map(Col::finish).collect();
                let nb: Option<NullBuffer> = nulls.finish();
                let len = arrays.first().map_or_else(|| nb.as_ref().map_or(0, NullBuffer::len), |a| a.len());
                Arc::new(
                    StructArray::try_new_with_length(fields.clone(), arrays, nb, len)
                        .expect("children have equal length"),
                )
            }
        }
    }
}

/// Offsets with room for `rows`, starting with 0.
fn first_offset(rows: usize) -> Vec<i32> {
    let mut v = Vec::with_capacity(rows + 1);
    v.push(0);
    v
}

fn take_offsets(offsets: &mut Vec<i32>) -> OffsetBuffer<i32> {
    let v = std::mem::replace(offsets, vec![0]);
    OffsetBuffer::new(ScalarBuffer::from(v))
}
