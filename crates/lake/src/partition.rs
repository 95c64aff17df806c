//! Partition keys and lake paths, owned in one place:
//! `<table>/account=<id>/date=YYYY-MM-DD/hour=HH/<name>.parquet`.

use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};
use watershed_event::{AccountId, TimestampMicros};

/// The name of the dead-letter table.
pub const DEAD_LETTERS: &str = "_dead_letters";

/// Where a row lands: table, account, and the UTC hour of its time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// The table.
    pub table: String,
    /// The account (from the authenticated identity).
    pub account: AccountId,
    /// UTC date and hour, as `YYYY-MM-DD` and `HH`.
    pub date: String,
    /// The hour, 0-23.
    pub hour: u8,
}

impl PartitionKey {
    /// The partition of `table` for `account` at time `t`.
    #[must_use]
    pub fn at(table: &str, account: &AccountId, t: TimestampMicros) -> Self {
        let dt = DateTime::<Utc>::from_timestamp_micros(t).unwrap_or_default();
        #[allow(clippy::cast_possible_truncation)]
        Self {
            table: table.to_owned(),
            account: account.clone(),
            date: format!("{:04}-{:02}-{:02}", dt.year(), dt.month(), dt.day()),
            hour: dt.hour() as u8,
        }
    }

    /// The last microsecond of the partition's hour.
    #[must_use]
    pub fn hour_end(&self) -> TimestampMicros {
        hour_end(&self.date, &format!("{:02}", self.hour)).unwrap_or(0)
    }

    /// The partition directory, relative to the lake root.
    #[must_use]
    pub fn dir(&self) -> String {
        format!("{}/account={}/date={}/hour={:02}", self.table, self.account, self.date, self.hour)
    }

    /// The path of a file covering records `first..=last` of `source` (a
    /// hub's WAL). The name is a function of the source and the records
    /// only, so a rewrite after a crash produces the same name and a
    /// create-only put refuses the duplicate.
    #[must_use]
    pub fn file(&self, source: &str, first: u64, last: u64) -> LakePath {
        LakePath(format!("{}/{source}-{first:016x}-{last:016x}.parquet", self.dir()))
    }
}

/// The end of the hour a partition directory
/// (`<table>/account=<id>/date=YYYY-MM-DD/hour=HH`) covers, in
/// microseconds; `None` for a directory not of that shape.
#[must_use]
pub fn dir_hour_end(dir: &str) -> Option<TimestampMicros> {
    let mut parts = dir.rsplit('/');
    let hour = parts.next()?.strip_prefix("hour=")?;
    let date = parts.next()?.strip_prefix("date=")?;
    parts.next()?.strip_prefix("account=")?;
    if hour.len() != 2 || !hour.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    hour_end(date, hour)
}

/// The last microsecond of hour `hour` (`HH`) of `date` (`YYYY-MM-DD`).
fn hour_end(date: &str, hour: &str) -> Option<TimestampMicros> {
    watershed_event::parse_rfc3339_micros(format!("{date}T{hour}:59:59.999999Z"))
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir())
    }
}

/// A file's path relative to the lake root.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LakePath(pub String);

impl fmt::Display for LakePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_layout() {
        let a = AccountId::new("123456789012").unwrap();
        let t = watershed_event::parse_rfc3339_micros("2024-05-01T07:59:59Z").unwrap();
        let k = PartitionKey::at("orders", &a, t);
        assert_eq!(k.dir(), "orders/account=123456789012/date=2024-05-01/hour=07");
        assert_eq!(k.hour_end(), t + 999_999);
        assert_eq!(dir_hour_end(&k.dir()), Some(k.hour_end()));
        assert_eq!(dir_hour_end("orders/date=2024-05-01/hour=07"), None);
        assert_eq!(dir_hour_end("orders/account=1/date=2024-05-01/hour=7x"), None);
        assert_eq!(
            k.file("wal", 1, 255).0,
            "orders/account=123456789012/date=2024-05-01/hour=07/wal-0000000000000001-00000000000000ff.parquet"
        );
    }
}
