//! Event and ingest times. Times are UTC microseconds since the Unix epoch
//! everywhere inside Watershed; the clock is injected so that partitioning,
//! retention and replay can be tested with a fixed time.

use chrono::{DateTime, SecondsFormat, Utc};

/// UTC microseconds since the Unix epoch.
pub type TimestampMicros = i64;

/// A source of "now". Inject it; never read the system clock below `main`
/// in code that tests need to control.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in UTC microseconds.
    fn now_micros(&self) -> TimestampMicros;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> TimestampMicros {
        Utc::now().timestamp_micros()
    }
}

/// Parse an RFC 3339 timestamp (`2024-05-01T12:00:00Z`, with optional
/// fraction and offset) into UTC microseconds. Sub-microsecond digits are
/// truncated.
#[must_use]
pub fn parse_rfc3339_micros(s: &str) -> Option<TimestampMicros> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros())
}

/// Format UTC microseconds as RFC 3339 with microsecond precision.
#[must_use]
pub fn format_rfc3339_micros(t: TimestampMicros) -> String {
    DateTime::<Utc>::from_timestamp_micros(t)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{t}us"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offsets_and_fractions() {
        let a = parse_rfc3339_micros("2024-05-01T12:00:00Z").unwrap();
        let b = parse_rfc3339_micros("2024-05-01T14:00:00.000000+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_rfc3339_micros("2024-05-01T12:00:00.1234567Z").unwrap() - a, 123_456);
        assert!(parse_rfc3339_micros("2024-05-01 12:00").is_none());
        assert_eq!(format_rfc3339_micros(a), "2024-05-01T12:00:00.000000Z");
    }
}
