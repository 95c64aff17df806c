//! Watershed's schema registry and validator.
//!
//! - [`Registry`] loads `schemas/<subject>/` directories, compiles each Avro
//!   version, checks compatibility ([`compat`]) and assigns stable ids.
//! - [`validate_json`] checks a JSON payload against a compiled schema while
//!   decoding it into a reusable [`Tape`], the hand-off to protection and to
//!   the lake's column builders.
//! - [`ProtectPlan`] lists the protected fields and the data subject, read
//!   from the `watershed.*` field attributes.

#![forbid(unsafe_code)]

pub mod compat;
mod error;
mod literal;
mod node;
mod policy;
mod registry;
pub mod scan;
mod subject;
mod tape;
mod validate;

pub use error::{Error, Result};
pub use node::{Field, Kind, Node, Protect, Record};
pub use policy::{FieldAction, FieldPath, ProtectPlan};
pub use registry::{Registry, SchemaId, SubjectEntry, Version};
pub use subject::{
    default_table_name, is_valid_table_name, Compatibility, SchemaVersion, Subject, SubjectConfig,
    UnknownFields,
};
pub use tape::{Mark, Slot, Tape};
pub use validate::{
    decode_value, push_member, validate_append, validate_json, validate_json_append, Limits, Violation,
    MAX_PATH_BYTES,
};
