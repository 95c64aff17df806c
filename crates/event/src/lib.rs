//! Event vocabulary shared by every Watershed stage: identifiers with
//! meaning ([`AccountId`]), times, and the closed set of
//! [`Reason`] codes a rejected event can carry.
//!
//! This crate does no I/O. Everything downstream (schema, protect, lake, hub)
//! speaks these types, so a reason code or an account id means the same
//! thing from the HTTP response to the dead-letter table.

#![forbid(unsafe_code)]

mod account;
pub mod prehashed;
mod reason;
mod time;

pub use account::{AccountId, InvalidAccountId};
pub use reason::Reason;
pub use time::{format_rfc3339_micros, millis, parse_rfc3339_micros, Clock, SystemClock, TimestampMicros};
