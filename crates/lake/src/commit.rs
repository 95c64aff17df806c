//! The commit log: the explicit commit point of every lake file.
//!
//! Before a file is put, an `intent` line names its path, partition and the
//! WAL records it covers, and is fsynced; after the create-only put, a
//! `commit` line follows. On recovery an intent without a commit is
//! committed if its file exists (the put is atomic) and dropped otherwise.
//! Recovery then skips, per partition, exactly the WAL records that a
//! committed file already holds, so a crash never duplicates or loses rows.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::partition::LakePath;
use crate::store::Lake;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Line {
    Intent { path: String, partition: String, records: Vec<u64> },
    Commit { path: String },
}

/// The append-only commit log (one per hub data directory).
#[derive(Debug)]
pub struct CommitLog {
    path: PathBuf,
    file: File,
}

/// What recovery learned: which (partition, WAL record) pairs are in the
/// lake already.
#[derive(Debug, Default)]
pub struct Committed {
    set: HashSet<(String, u64)>,
    /// Files committed, for reporting.
    pub files: usize,
}

impl Committed {
    /// Whether the rows of WAL record `record` for `partition` are in the
    /// lake.
    #[must_use]
    pub fn contains(&self, partition: &str, record: u64) -> bool {
        self.set.contains(&(partition.to_owned(), record))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

impl CommitLog {
    /// Open (creating) the log at `path`, resolve pending intents against
    /// `lake`, and compact it to the entries that still cover records at
    /// or after `oldest_record` (older WAL is gone).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Store`].
    pub async fn open(path: &Path, lake: &Lake, oldest_record: u64) -> Result<(Self, Committed)> {
        let mut intents: HashMap<String, (String, Vec<u64>)> = HashMap::new();
        let mut committed: HashSet<String> = HashSet::new();
        if path.exists() {
            let f = File::open(path).map_err(io(path))?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io(path))?;
                // A torn last line (crash mid-append) is an unfinished
                // intent or commit; skipping it is what recovery needs.
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Intent { path, partition, records }) => {
                        intents.insert(path, (partition, records));
                    }
                    Ok(Line::Commit { path }) => {
                        committed.insert(path);
                    }
                    Err(_) => {
                        tracing::warn!(log = %path.display(), "skipping a torn commit-log line")
                    }
                }
            }
        }
        let mut out = Committed::default();
        let mut keep = Vec::new();
        for (file, (partition, records)) in intents {
            let done = committed.contains(&file) || lake.exists(&LakePath(file.clone())).await?;
            if !done {
                tracing::info!(path = %file, "dropping an unfinished lake write; its records will be rewritten");
                continue;
            }
            if records.iter().any(|&r| r >= oldest_record) {
                for &r in &records {
                    out.set.insert((partition.clone(), r));
                }
                keep.push(Line::Intent { path: file.clone(), partition, records });
                keep.push(Line::Commit { path: file });
            }
            out.files += 1;
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            for l in &keep {
                writeln!(f, "{}", serde_json::to_string(l).expect("serialisable")).map_err(io(&tmp))?;
            }
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let file = OpenOptions::new().append(true).open(path).map_err(io(path))?;
        Ok((Self { path: path.to_owned(), file }, out))
    }

    fn append(&mut self, line: &Line) -> Result<()> {
        let mut s = serde_json::to_string(line).expect("serialisable");
        s.push('\n');
        self.file.write_all(s.as_bytes()).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Record the intent to put `path` holding `records` of `partition`.
    ///
    /// # Errors
    /// [`Error::Io`]; the put must not happen then.
    pub fn intent(&mut self, path: &LakePath, partition: &str, records: &[u64]) -> Result<()> {
        self.append(&Line::Intent {
            path: path.0.clone(),
            partition: partition.to_owned(),
            records: records.to_vec(),
        })
    }

    /// Record that `path` is in the lake.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn commit(&mut self, path: &LakePath) -> Result<()> {
        self.append(&Line::Commit { path: path.0.clone() })
    }
}
