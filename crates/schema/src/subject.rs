//! `schemas/<subject>/subject.toml`: how events route to a subject, its
//! compatibility mode, its lake table and its unknown-field policy.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A subject name: the directory name under `schemas/`.
pub type Subject = String;

/// A schema version number within a subject (`v3.avsc` is version 3).
pub type SchemaVersion = u32;

/// The parsed `subject.toml`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectConfig {
    /// The EventBridge `source` (or CloudEvents `source`) routed here.
    pub source: String,
    /// The EventBridge `detail-type` (or CloudEvents `type`) routed here.
    pub detail_type: String,
    /// The compatibility mode checked when a version is added.
    #[serde(default)]
    pub compatibility: Compatibility,
    /// The lake table name; derived from the subject name when absent.
    #[serde(default)]
    pub table: Option<String>,
    /// What to do with payload fields the schema does not declare.
    #[serde(default)]
    pub unknown_fields: UnknownFields,
}

/// Policy for payload fields that the schema does not declare.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFields {
    /// Reject the event with `unknown_field` (the default).
    #[default]
    Reject,
    /// Drop the field and keep the event.
    Drop,
}

/// A Confluent-style compatibility mode.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    /// No check.
    None,
    /// The new version can read data written with the previous one.
    #[default]
    Backward,
    /// The new version can read data written with every earlier one.
    BackwardTransitive,
    /// The previous version can read data written with the new one.
    Forward,
    /// Every earlier version can read data written with the new one.
    ForwardTransitive,
    /// Both BACKWARD and FORWARD against the previous version.
    Full,
    /// Both BACKWARD and FORWARD against every earlier version.
    FullTransitive,
}

impl Compatibility {
    /// All seven modes.
    pub const ALL: [Compatibility; 7] = [
        Compatibility::None,
        Compatibility::Backward,
        Compatibility::BackwardTransitive,
        Compatibility::Forward,
        Compatibility::ForwardTransitive,
        Compatibility::Full,
        Compatibility::FullTransitive,
    ];

    /// The Confluent spelling, such as `BACKWARD_TRANSITIVE`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether the new version must read old data.
    #[must_use]
    pub const fn checks_backward(self) -> bool {
        matches!(
            self,
            Compatibility::Backward
                | Compatibility::BackwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Whether old versions must read new data.
    #[must_use]
    pub const fn checks_forward(self) -> bool {
        matches!(
            self,
            Compatibility::Forward
                | Compatibility::ForwardTransitive
                | Compatibility::Full
                | Compatibility::FullTransitive
        )
    }

    /// Whether every earlier version is checked, not only the previous one.
    #[must_use]
    pub const fn is_transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compatibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compatibility::ALL.into_iter().find(|c| c.as_str().eq_ignore_ascii_case(s)).ok_or_else(|| {
            format!(
                "unknown compatibility {s:?}: use one of {}",
                Compatibility::ALL.map(Compatibility::as_str).join(", ")
            )
        })
    }
}

/// The default lake table for a subject: lowercase, with every character
/// outside `[a-z0-9_]` replaced by `_`.
#[must_use]
pub fn default_table_name(subject: &str) -> String {
    subject.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

/// Whether `name` is usable as a lake table directory.
#[must_use]
pub fn is_valid_table_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('_')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
