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
pub fn parse_rfc3339_micros(s: impl AsRef<[u8]>) -> Option<TimestampMicros> {
    // The common shape is read directly (from text or from bytes not yet
    // known to be UTF-8); anything else (lowercase `t`, leap seconds, ...)
    // goes to chrono, which decides.
    let b = s.as_ref();
    canonical(b).or_else(|| {
        let s = std::str::from_utf8(b).ok()?;
        DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros())
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)` with fields in range, else
/// `None`.
fn canonical(b: &[u8]) -> Option<TimestampMicros> {
    fn num(b: &[u8]) -> Option<i64> {
        let mut v = 0i64;
        for &c in b {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    }
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (hour, minute, second) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let frac = &b[i + 1..i + 1 + digits];
        for k in 0..6 {
            micros = micros * 10 + frac.get(k).map_or(0, |&c| i64::from(c - b'0'));
        }
        i += 1 + digits;
    }
    let offset = match &b[i..] {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (oh, om) = (num(&[*h1, *h2])?, num(&[*m1, *m2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs * 1_000_000 + micros)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Format UTC microseconds as RFC 3339 with microsecond precision.
#[must_use]
pub fn format_rfc3339_micros(t: TimestampMicros) -> String {
    DateTime::<Utc>::from_timestamp_micros(t)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{t}us"))
}

/// Whole milliseconds of `d`, for logs and metrics (saturating: a
/// duration beyond `u64::MAX` ms, 584 million years, reads as the most).
#[must_use]
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_saturates() {
        assert_eq!(millis(std::time::Duration::from_micros(2_999)), 2);
        assert_eq!(millis(std::time::Duration::MAX), u64::MAX);
    }

    #[test]
    fn parses_offsets_and_fractions() {
        let a = parse_rfc3339_micros("2024-05-01T12:00:00Z").unwrap();
        let b = parse_rfc3339_micros("2024-05-01T14:00:00.000000+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_rfc3339_micros("2024-05-01T12:00:00.1234567Z").unwrap() - a, 123_456);
        assert!(parse_rfc3339_micros("2024-05-01 12:00").is_none());
        assert_eq!(format_rfc3339_micros(a), "2024-05-01T12:00:00.000000Z");
        for bad in
            ["2024-02-30T00:00:00Z", "2024-13-01T00:00:00Z", "2024-05-01T24:00:00Z", "2024-05-01T00:00:00"]
        {
            assert!(parse_rfc3339_micros(bad).is_none(), "{bad}");
        }
    }

    /// The direct reader agrees with chrono wherever it answers.
    #[test]
    fn canonical_agrees_with_chrono() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200_000 {
            let frac = match next(4) {
                0 => String::new(),
                1 => format!(".{:03}", next(1000)),
                2 => format!(".{:06}", next(1_000_000)),
                _ => format!(".{:09}", next(1_000_000_000)),
            };
            let zone = match next(3) {
                0 => "Z".to_owned(),
                1 => format!("+{:02}:{:02}", next(25), next(61)),
                _ => format!("-{:02}:{:02}", next(25), next(61)),
            };
            let s = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}{zone}",
                next(10_000),
                next(14),
                next(33),
                next(25),
                next(61),
                next(61)
            );
            let chrono = DateTime::parse_from_rfc3339(&s).ok().map(|t| t.timestamp_micros());
            if let Some(v) = canonical(s.as_bytes()) {
                assert_eq!(Some(v), chrono, "{s}");
            }
            assert_eq!(parse_rfc3339_micros(&s), chrono, "{s}");
        }
    }
}
