//! Retention: a table's partitions are deleted once their hour ended more
//! than the table's retention period ago.
//!
//! A pass lists the lake, takes every partition of a table with a period
//! whose hour (event time; receive time for `_dead_letters`) ended more
//! than that period ago, and deletes its Parquet files, whichever hub
//! wrote them. Each partition deleted is recorded as one JSON line in the
//! retention record (`<data_dir>/retention.log`), the proof that data past
//! its period is gone. A partition with a merge in progress (an open
//! `merge` in the commit log) is left to the next pass, after compaction
//! settles it; the caller keeps passes and compaction apart.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use object_store::ObjectMeta;
use serde::Serialize;
use watershed_event::TimestampMicros;

use crate::error::{Error, Result};
use crate::partition::dir_hour_end;
use crate::store::Lake;

const DAY_MICROS: i64 = 86_400_000_000;

/// How long each table's partitions are kept, in days; 0 keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// The period of tables not in `tables`.
    pub default_days: u32,
    /// Periods by table name (`_dead_letters` included).
    pub tables: BTreeMap<String, u32>,
}

impl Retention {
    /// The days `table`'s partitions are kept; `None`: kept for good.
    #[must_use]
    pub fn days(&self, table: &str) -> Option<u32> {
        let days = self.tables.get(table).copied().unwrap_or(self.default_days);
        (days > 0).then_some(days)
    }

    /// Whether no table's partitions ever expire.
    #[must_use]
    pub fn keeps_everything(&self) -> bool {
        self.default_days == 0 && self.tables.values().all(|d| *d == 0)
    }

    /// Whether a partition of `table` whose hour ended at `hour_end` is
    /// past its period at `now`: its hour ended more than the period ago.
    #[must_use]
    pub fn expired(&self, table: &str, hour_end: TimestampMicros, now: TimestampMicros) -> bool {
        self.days(table).is_some_and(|days| hour_end.saturating_add(i64::from(days) * DAY_MICROS) < now)
    }
}

/// A partition past its table's period, and its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Its directory, `<table>/account=…/date=…/hour=…`.
    pub dir: String,
    /// Its table.
    pub table: String,
    /// The last microsecond of its hour.
    pub hour_end: TimestampMicros,
    /// Its table's period.
    pub days: u32,
    /// Its Parquet files and their sizes.
    pub files: Vec<(String, u64)>,
}

/// What a pass did (or, planned, would do).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    /// Partitions deleted whole.
    pub partitions: usize,
    /// Files deleted.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Expired partitions left to a later pass: a merge in progress.
    pub skipped: usize,
    /// Files that could not be deleted (logged; a later pass retries).
    pub failures: usize,
}

/// Running totals of a hub's passes, for its metrics.
#[derive(Debug, Default)]
pub struct RetentionStats {
    /// Partitions deleted whole.
    pub partitions: std::sync::atomic::AtomicU64,
    /// Files deleted.
    pub files: std::sync::atomic::AtomicU64,
    /// Their bytes.
    pub bytes: std::sync::atomic::AtomicU64,
    /// Files that could not be deleted (retried), and failed passes.
    pub failures: std::sync::atomic::AtomicU64,
}

impl RetentionStats {
    /// Add a pass's report.
    pub fn add(&self, r: &RetentionReport) {
        use std::sync::atomic::Ordering::Relaxed;
        self.partitions.fetch_add(r.partitions as u64, Relaxed);
        self.files.fetch_add(r.files as u64, Relaxed);
        self.bytes.fetch_add(r.bytes, Relaxed);
        self.failures.fetch_add(r.failures as u64, Relaxed);
    }
}

/// Every partition of `lake` past its table's period at `now`, in path
/// order. Streams the listing: only expired partitions are held.
///
/// # Errors
/// [`Error::Store`] when the lake cannot be listed.
pub async fn expired(lake: &Lake, policy: &Retention, now: TimestampMicros) -> Result<Vec<Expired>> {
    let mut found: BTreeMap<String, Expired> = BTreeMap::new();
    // Without a default period only the tables with one are listed.
    let prefixes: Vec<Option<object_store::path::Path>> = if policy.default_days > 0 {
        vec![None]
    } else {
        policy.tables.iter().filter(|(_, days)| **days > 0).map(|(t, _)| Some(t.as_str().into())).collect()
    };
    for prefix in &prefixes {
        let mut listing = lake.store().list(prefix.as_ref());
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| Error::Store {
                path: prefix.as_ref().map_or_else(|| "the lake root".to_owned(), ToString::to_string),
                source: Box::new(e),
            })?;
            note(&mut found, policy, now, &meta);
        }
    }
    Ok(found.into_values().collect())
}

/// Adds a listed file to `found` when its partition is past its period.
fn note(found: &mut BTreeMap<String, Expired>, policy: &Retention, now: TimestampMicros, meta: &ObjectMeta) {
    let path = meta.location.as_ref();
    if !path.ends_with(".parquet") {
        return;
    }
    let Some((dir, _)) = path.rsplit_once('/') else { return };
    let Some((table, _)) = dir.split_once('/') else { return };
    let Some(hour_end) = dir_hour_end(dir) else { return };
    let Some(days) = policy.days(table).filter(|_| policy.expired(table, hour_end, now)) else { return };
    found
        .entry(dir.to_owned())
        .or_insert_with(|| Expired {
            dir: dir.to_owned(),
            table: table.to_owned(),
            hour_end,
            days,
            files: Vec::new(),
        })
        .files
        .push((path.to_owned(), meta.size));
}

/// What one pass works on.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// The lake.
    pub lake: &'a Lake,
    /// The periods.
    pub policy: &'a Retention,
    /// The pass's time.
    pub now: TimestampMicros,
    /// Partition directories with a merge in progress.
    pub busy: &'a BTreeSet<String>,
    /// Delete and record nothing; report what would be.
    pub dry_run: bool,
}

/// One retention pass: delete the files of every expired partition but
/// those in `busy` (partition directories with a merge in progress),
/// recording each partition deleted in `record`. With `dry_run`, nothing
/// is deleted or recorded, and the report says what would be. Once
/// `stop` is set the pass ends between partitions.
/// `progress(done, total, report)` is called after each partition.
///
/// A partition's line is written once its files are deleted, and the
/// record is fsynced at the end of the pass (a crash during a pass can
/// lose that pass's lines, not its deletions).
///
/// # Errors
/// [`Error::Store`] when the lake cannot be listed; [`Error::Io`] when
/// the record cannot be written (the pass stops there, after the one
/// partition whose line it could not write).
pub async fn apply(
    pass: &Pass<'_>,
    record: &mut RetentionRecord,
    stop: &std::sync::atomic::AtomicBool,
    progress: &mut (dyn FnMut(usize, usize, &RetentionReport) + Send),
) -> Result<RetentionReport> {
    let Pass { lake, policy, now, busy, dry_run } = *pass;
    let expired = expired(lake, policy, now).await?;
    let mut report = RetentionReport::default();
    let total = expired.len();
    for (done, p) in expired.into_iter().enumerate() {
        progress(done, total, &report);
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        if busy.contains(&p.dir) {
            report.skipped += 1;
            continue;
        }
        let bytes: u64 = p.files.iter().map(|(_, size)| size).sum();
        if dry_run {
            report.partitions += 1;
            report.files += p.files.len();
            report.bytes += bytes;
            continue;
        }
        let mut deleted = 0;
        let mut deleted_bytes = 0;
        for (path, size) in &p.files {
            match lake.delete(path).await {
                Ok(()) => {
                    deleted += 1;
                    deleted_bytes += size;
                }
                Err(e) => {
                    report.failures += 1;
                    tracing::warn!(path = %path, error = %e, "cannot delete an expired file yet; retried on the next pass");
                }
            }
        }
        if deleted > 0 {
            record.write(&p, now, deleted, deleted_bytes)?;
        }
        if deleted == p.files.len() {
            report.partitions += 1;
        }
        report.files += deleted;
        report.bytes += deleted_bytes;
    }
    progress(total, total, &report);
    record.sync()?;
    Ok(report)
}

/// The retention record: one JSON line per partition deleted, appended.
#[derive(Debug)]
pub struct RetentionRecord {
    path: PathBuf,
    file: Option<std::fs::File>,
}

#[derive(Serialize)]
struct RecordLine<'a> {
    at: String,
    table: &'a str,
    partition: &'a str,
    hour_end: String,
    retention_days: u32,
    files: usize,
    bytes: u64,
}

impl RetentionRecord {
    /// The record at `path`, opened when first written.
    #[must_use]
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), file: None }
    }

    fn write(&mut self, p: &Expired, now: TimestampMicros, files: usize, bytes: u64) -> Result<()> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(io)?;
            self.file = Some(f);
        }
        let line = RecordLine {
            at: watershed_event::format_rfc3339_micros(now),
            table: &p.table,
            partition: &p.dir,
            hour_end: watershed_event::format_rfc3339_micros(p.hour_end),
            retention_days: p.days,
            files,
            bytes,
        };
        let mut text = serde_json::to_string(&line).expect("a record line serializes");
        text.push('\n');
        let f = self.file.as_mut().expect("opened above");
        f.write_all(text.as_bytes()).map_err(|source| Error::Io { path: self.path.clone(), source })
    }

    fn sync(&mut self) -> Result<()> {
        match &self.file {
            Some(f) => f.sync_data().map_err(|source| Error::Io { path: self.path.clone(), source }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn at(s: &str) -> TimestampMicros {
        watershed_event::parse_rfc3339_micros(s).unwrap()
    }

    #[test]
    fn a_partition_expires_once_its_hour_ended_more_than_the_period_ago() {
        let policy = Retention { default_days: 0, tables: BTreeMap::from([("logins".to_owned(), 30)]) };
        let end = dir_hour_end("logins/account=1/date=2024-05-01/hour=13").unwrap();
        assert_eq!(end, at("2024-05-01T13:59:59.999999Z"));
        assert!(
            !policy.expired("logins", end, at("2024-05-31T13:59:59.999999Z")),
            "exactly the period: kept"
        );
        assert!(policy.expired("logins", end, at("2024-05-31T14:00:00Z")));
        assert!(!policy.expired("payments", end, at("2030-01-01T00:00:00Z")), "no period: kept for good");
        let all = Retention { default_days: 7, tables: BTreeMap::from([("logins".to_owned(), 0)]) };
        assert!(
            !all.expired("logins", end, at("2030-01-01T00:00:00Z")),
            "0 keeps a table despite the default"
        );
        assert!(all.expired("payments", end, at("2024-05-08T14:00:00Z")));
        assert!(!Retention::default().expired("logins", end, i64::MAX));
        assert!(Retention::default().keeps_everything());
        assert!(!all.keeps_everything());
    }

    #[tokio::test]
    async fn a_pass_deletes_expired_partitions_records_them_and_skips_busy_ones() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::local(&dir.path().join("lake"), 4).unwrap();
        let put = |p: &str| {
            let full = dir.path().join("lake").join(p);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, b"0123456789").unwrap();
        };
        let old = "logins/account=1/date=2024-05-01/hour=13";
        let busy = "logins/account=2/date=2024-05-01/hour=13";
        let recent = "logins/account=1/date=2024-06-20/hour=00";
        for p in [
            format!("{old}/a.parquet"),
            format!("{old}/b.parquet"),
            format!("{old}/c.parquet#1"),
            format!("{busy}/a.parquet"),
            format!("{recent}/a.parquet"),
            "payments/account=1/date=2024-05-01/hour=13/a.parquet".to_owned(),
        ] {
            put(&p);
        }
        let policy = Retention { default_days: 0, tables: BTreeMap::from([("logins".to_owned(), 30)]) };
        let now = at("2024-06-20T12:00:00Z");
        let busy_dirs = BTreeSet::from([busy.to_owned()]);
        let everything = Retention { default_days: 30, tables: BTreeMap::new() };
        let dirs: Vec<String> =
            expired(&lake, &everything, now).await.unwrap().into_iter().map(|e| e.dir).collect();
        assert_eq!(
            dirs,
            vec![old.to_owned(), busy.to_owned(), "payments/account=1/date=2024-05-01/hour=13".to_owned()],
            "a default period covers every table"
        );
        let pass = |dry_run| Pass { lake: &lake, policy: &policy, now, busy: &busy_dirs, dry_run };
        let record_path = dir.path().join("retention.log");
        let mut record = RetentionRecord::new(&record_path);
        let plan = apply(&pass(true), &mut record, &AtomicBool::new(false), &mut |_, _, _| {}).await.unwrap();
        assert_eq!(plan, RetentionReport { partitions: 1, files: 2, bytes: 20, skipped: 1, failures: 0 });
        assert!(dir.path().join("lake").join(old).join("a.parquet").exists(), "a dry run deletes nothing");
        assert!(!record_path.exists(), "and records nothing");
        let mut calls = Vec::new();
        let done = apply(&pass(false), &mut record, &AtomicBool::new(false), &mut |d, t, _| {
            calls.push((d, t));
        })
        .await
        .unwrap();
        assert_eq!(done, plan);
        assert_eq!(calls, vec![(0, 2), (1, 2), (2, 2)]);
        assert!(!dir.path().join("lake").join(old).join("a.parquet").exists());
        assert!(!dir.path().join("lake").join(old).join("b.parquet").exists());
        for kept in [format!("{busy}/a.parquet"), format!("{recent}/a.parquet")] {
            assert!(dir.path().join("lake").join(kept).exists());
        }
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&record_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            vec![serde_json::json!({
                "at": "2024-06-20T12:00:00.000000Z", "table": "logins", "partition": old,
                "hour_end": "2024-05-01T13:59:59.999999Z", "retention_days": 30, "files": 2, "bytes": 20
            })]
        );
    }
}
