//! Event vocabulary shared by every Watershed stage: identifiers with
//! meaning ([`AccountId`]), times, and the closed set of
//! [`Reason`] codes a rejected event can carry.
//!
//! This crate does no I/O. Everything downstream (schema, protect, lake, hub)
//! speaks these types, so a reason code or an account id means the same
//! thing from the HTTP response to the dead-letter table.

#![forbid(unsafe_code)]

mod account;
#[doc(hidden)]
pub mod damage;
pub mod prehashed;
mod reason;
pub mod sealed;
mod time;

pub use account::{AccountId, InvalidAccountId};
pub use reason::Reason;
pub use time::{format_rfc3339_micros, millis, parse_rfc3339_micros, Clock, SystemClock, TimestampMicros};

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary: where a length limit on text (a WAL string, a
/// violation's path) cuts it without splitting a character.
#[must_use]
pub fn prefix_within(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The message a caught panic carried (`panic!` with a literal or a
/// formatted message), or an empty string: for an error that says why a
/// third-party parser gave up on its input.
#[must_use]
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_end_on_a_character() {
        use super::prefix_within;
        assert_eq!(prefix_within("abc", 10), "abc");
        assert_eq!(prefix_within("abc", 2), "ab");
        assert_eq!(prefix_within("aé", 2), "a", "é is two bytes");
        assert_eq!(prefix_within("aé", 3), "aé");
        assert_eq!(prefix_within("€", 2), "");
    }
}
