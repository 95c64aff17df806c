//! The closed set of reason codes for rejected events. A code is stable
//! API: it appears in HTTP responses, metrics labels and the dead-letter
//! table, so codes are only ever added, never renamed.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an event was rejected. [`Reason::as_str`] gives the stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The event is not valid JSON.
    MalformedJson,
    /// The event is JSON but not an event envelope (not an object, or a
    /// required envelope field such as `source` is missing or mistyped).
    BadEnvelope,
    /// No subject is registered for the event's source and type.
    UnknownSubject,
    /// The event names a schema version the subject does not have.
    UnknownVersion,
    /// A required field is absent.
    MissingField,
    /// A value has the wrong JSON type for its schema type.
    TypeMismatch,
    /// A field is not in the schema and the subject rejects unknown fields.
    UnknownField,
    /// A field appears twice in one object, or a key twice in one map.
    DuplicateField,
    /// A string is not one of the enum's symbols.
    BadEnum,
    /// A timestamp is not RFC 3339 (or an integer epoch in the type's unit).
    BadTimestamp,
    /// A date is not `YYYY-MM-DD` (or integer days since the epoch).
    BadDate,
    /// A uuid is not in the 8-4-4-4-12 hex form.
    BadUuid,
    /// A bytes or fixed value is not valid base64, or has the wrong size.
    BadBytes,
    /// A decimal is not a decimal number, or does not fit precision/scale.
    BadDecimal,
    /// A number does not fit its type (int, float, ...).
    OutOfRange,
    /// The event is larger than the per-event limit.
    TooLarge,
    /// The event nests deeper than the nesting limit.
    TooDeep,
    /// The event claims an account other than the authenticated one.
    AccountMismatch,
    /// The event's protected fields could not be protected (for example a
    /// key could not be created). The event is kept as a dead letter.
    ProtectFailed,
    /// The event's time is further ahead of its receipt than the hub
    /// accepts (a clock or time-zone error): it would open a partition for
    /// an hour that has not come yet.
    FutureTime,
    /// The event's time is further before its receipt than the hub is
    /// configured to accept (`limits.max_past_secs`; no bound by default):
    /// a zero-value or epoch-zero timestamp from a producer's bug.
    PastTime,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 21] = [
        Reason::MalformedJson,
        Reason::BadEnvelope,
        Reason::UnknownSubject,
        Reason::UnknownVersion,
        Reason::MissingField,
        Reason::TypeMismatch,
        Reason::UnknownField,
        Reason::DuplicateField,
        Reason::BadEnum,
        Reason::BadTimestamp,
        Reason::BadDate,
        Reason::BadUuid,
        Reason::BadBytes,
        Reason::BadDecimal,
        Reason::OutOfRange,
        Reason::TooLarge,
        Reason::TooDeep,
        Reason::AccountMismatch,
        Reason::ProtectFailed,
        Reason::FutureTime,
        Reason::PastTime,
    ];

    /// The stable snake_case code, such as `missing_field`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::BadEnvelope => "bad_envelope",
            Reason::UnknownSubject => "unknown_subject",
            Reason::UnknownVersion => "unknown_version",
            Reason::MissingField => "missing_field",
            Reason::TypeMismatch => "type_mismatch",
            Reason::UnknownField => "unknown_field",
            Reason::DuplicateField => "duplicate_field",
            Reason::BadEnum => "bad_enum",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::BadDate => "bad_date",
            Reason::BadUuid => "bad_uuid",
            Reason::BadBytes => "bad_bytes",
            Reason::BadDecimal => "bad_decimal",
            Reason::OutOfRange => "out_of_range",
            Reason::TooLarge => "too_large",
            Reason::TooDeep => "too_deep",
            Reason::AccountMismatch => "account_mismatch",
            Reason::ProtectFailed => "protect_failed",
            Reason::FutureTime => "future_time",
            Reason::PastTime => "past_time",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_serde_names() {
        for r in Reason::ALL {
            let json = serde_json_like(r);
            assert_eq!(json, r.as_str());
        }
    }

    fn serde_json_like(r: Reason) -> String {
        // Debug is CamelCase; the code must be its snake_case form.
        let mut out = String::new();
        for (i, c) in format!("{r:?}").chars().enumerate() {
            if c.is_ascii_uppercase() {
                if i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }
}
