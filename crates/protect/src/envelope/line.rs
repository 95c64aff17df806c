//! The key log's lines: their format, parsing them, and writing them.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cipher::KeyId;
use crate::keyring::Wrapped;

/// One line of the key log.
#[derive(Serialize, Deserialize, Clone)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum Line {
    /// The key of the HMAC that turns subject ids into references.
    IndexKey { wrapped: Wrapped },
    /// An account's tokenization key.
    TokenKey { account: String, wrapped: Wrapped },
    /// A data key. `subject_ref` is `None` for the account-wide key.
    DataKey {
        id: String,
        account: String,
        subject_ref: Option<String>,
        current: bool,
        wrapped: Wrapped,
        created: String,
    },
    /// Data keys erased by `forget`.
    Erased { ids: Vec<String>, account: String, subject_ref: Option<String>, erased_at: String },
    /// The line of an erased data key, overwritten in place: `{"op":"shredded"`,
    /// spaces, `}`, as long as the line it replaced.
    Shredded {},
}

/// Where a line sits in the key log: its offset and its length without
/// the newline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LineAt {
    pub(super) offset: u64,
    /// Never 0 (a line that parses is not empty), so that an
    /// `Option<LineAt>` takes no more room than a `LineAt`.
    pub(super) len: NonZeroU32,
}

/// [`super::state::DataKeyRecord::created`] for a creation time that is not RFC 3339.
pub(super) const ODD_CREATED: i64 = i64::MIN;

/// A creation time: the text written in the log, and its instant.
#[derive(Clone)]
pub(super) struct Created {
    pub(super) text: Arc<str>,
    pub(super) nanos: i64,
}

impl Created {
    pub(super) fn now() -> Self {
        let now = chrono::Utc::now();
        Self { text: now.to_rfc3339().into(), nanos: now.timestamp_nanos_opt().unwrap_or(ODD_CREATED) }
    }
}

/// RFC 3339 text as nanoseconds since the epoch.
pub(super) fn parse_nanos(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text).ok()?.timestamp_nanos_opt()
}

/// A data key's line as read from the log, borrowing from it: the lines
/// of a large log are nearly all data keys, so they skip the buffering of
/// [`Line`]'s tagged enum and the copies of its owned strings. Accepts
/// exactly what [`Line::DataKey`] accepts; anything else is parsed as a
/// [`Line`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataKeyRef<'a> {
    #[serde(borrow)]
    pub(super) op: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) id: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) account: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) subject_ref: Option<Cow<'a, str>>,
    pub(super) current: bool,
    #[serde(borrow)]
    pub(super) wrapped: WrappedRef<'a>,
    #[serde(borrow)]
    pub(super) created: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WrappedRef<'a> {
    #[serde(borrow)]
    pub(super) master: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) blob: Cow<'a, str>,
}

/// A data key line's parts, however they were read.
pub(super) struct DataKeyParts<'a> {
    pub(super) id: &'a str,
    pub(super) account: &'a str,
    pub(super) subject_ref: Option<&'a str>,
    pub(super) current: bool,
    pub(super) master: &'a str,
    pub(super) blob: Box<str>,
    pub(super) created: &'a str,
}

/// A new data key's line, written from borrowed parts (the same JSON as
/// [`Line::DataKey`]).
#[derive(Serialize)]
#[serde(tag = "op", rename = "data_key")]
pub(super) struct DataKeyLine<'a> {
    pub(super) id: &'a str,
    pub(super) account: &'a str,
    pub(super) subject_ref: Option<&'a str>,
    pub(super) current: bool,
    pub(super) wrapped: &'a Wrapped,
    pub(super) created: &'a str,
}

/// A key log line, parsed.
pub(super) enum Parsed<'a> {
    DataKey(DataKeyRef<'a>),
    Line(Line),
}

/// Parse a key log line (without its newline): its checksum first, then
/// a data key's by the borrowing fast path, any other (or one the fast
/// path refuses) as a [`Line`], whose error is the one reported.
pub(super) fn parse_line(text: &[u8]) -> Result<Parsed<'_>, String> {
    let json = checked(text)?;
    if json.starts_with(br#"{"op":"data_key","#) {
        if let Ok(d) = serde_json::from_slice::<DataKeyRef<'_>>(json) {
            if d.op == "data_key" {
                return Ok(Parsed::DataKey(d));
            }
        }
    }
    serde_json::from_slice::<Line>(json).map(Parsed::Line).map_err(|e| e.to_string())
}

/// The JSON of a key log line (without its newline), once its checksum
/// is checked ([`watershed_event::sealed`]). A line without one is a
/// shredded line (its checksum was overwritten with it) or one written
/// before lines carried a checksum, and is read as JSON alone.
///
/// Without the checksum, damage on disk that leaves a line valid JSON
/// would be believed: a changed digit of a `subject_ref` attaches a data
/// key to another subject (whose erasure then misses it; the key's wrap
/// binds its id, not its subject).
pub(super) fn checked(text: &[u8]) -> Result<&[u8], String> {
    use watershed_event::sealed::{unseal, Unsealed};
    unseal(text).map_err(|e| match e {
        Unsealed::Mismatch => {
            format!("{e}: the line was damaged after it was written (restore the file from a backup)")
        }
        Unsealed::NotAChecksum(_) => e.to_string(),
    })
}

/// Whether `text` (a last line without its newline) ends as a whole line
/// does: with a checksum, or, without one, as a whole JSON object (its
/// braces and brackets closed outside strings). A last line that does
/// not is torn (a write a crash interrupted). A tear just after an inner
/// object's `}` (the `wrapped` key's) is torn too, not a damaged line
/// that would stop the keyring from opening.
pub(super) fn ends_whole(text: &[u8]) -> bool {
    if watershed_event::sealed::ends_sealed(text) {
        return true;
    }
    if !text.ends_with(b"}") {
        return false;
    }
    let (mut depth, mut string, mut escaped) = (0_i64, false, false);
    for &b in text {
        match b {
            _ if escaped => escaped = false,
            b'\\' if string => escaped = true,
            b'"' => string = !string,
            b'{' | b'[' if !string => depth += 1,
            b'}' | b']' if !string => depth -= 1,
            _ => {}
        }
    }
    depth == 0 && !string
}

/// Append `line` to `buf` as the log holds it: its JSON, sealed with its
/// checksum ([`watershed_event::sealed`]).
pub(super) fn push_line(buf: &mut Vec<u8>, line: &impl Serialize) {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, line).expect("key log lines serialise");
    watershed_event::sealed::seal(buf, start);
}

/// About the length of a data key's line wrapped by a local master key,
/// checksum included (under KMS they are longer).
pub(super) const DATA_KEY_LINE_BYTES: u64 = 300;

/// How a shredded line starts (then spaces, then `}`).
pub(super) const SHREDDED: &[u8] = br#"{"op":"shredded""#;

pub(super) fn ref_from_hex(s: &str) -> Option<[u8; 16]> {
    KeyId::from_hex(s).map(|k| k.0)
}
