//! Account identifiers. An account id is also a Hive partition value and a
//! key-derivation input, so its alphabet is restricted to characters that
//! are safe in object-store paths.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The id of a member account (for AWS, the 12-digit account number).
///
/// Accepted: 1 to 64 characters from `[A-Za-z0-9._-]`, not starting with a
/// dot. Anything else could escape a partition directory or collide with
/// Hive's `key=value` syntax.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

/// Why a string is not a valid [`AccountId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid account id {value:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'")]
pub struct InvalidAccountId {
    /// The rejected value (truncated to 80 characters).
    pub value: String,
}

impl AccountId {
    /// Parse and check an account id.
    ///
    /// # Errors
    /// [`InvalidAccountId`] when the value is empty, too long, starts with a
    /// dot or holds a character outside `[A-Za-z0-9._-]`.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidAccountId> {
        let value = value.into();
        if Self::is_valid(&value) {
            Ok(Self(value))
        } else {
            Err(InvalidAccountId { value: value.chars().take(80).collect() })
        }
    }

    /// Whether `s` would be accepted by [`AccountId::new`].
    #[must_use]
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// The id as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountId {
    type Error = InvalidAccountId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<AccountId> for String {
    fn from(value: AccountId) -> Self {
        value.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.0)
    }
}

impl std::str::FromStr for AccountId {
    type Err = InvalidAccountId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_aws_ids_and_rejects_path_tricks() {
        assert!(AccountId::new("123456789012").is_ok());
        assert!(AccountId::new("team-a.prod_1").is_ok());
        for bad in ["", ".", "..", "a/b", "a=b", "a b", &"x".repeat(65)] {
            assert!(AccountId::new(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn formats_with_width_and_alignment() {
        let id = AccountId::new("123").unwrap();
        assert_eq!(format!("{id:<6}|{id:>6}|{id}"), "123   |   123|123");
    }
}
