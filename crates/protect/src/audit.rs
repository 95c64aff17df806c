//! The append-only audit log of key events: erasures, rotations, sealing
//! and every decryption. One JSON object per line, appended and fsynced
//! before the audited action returns, each naming who asked and why.
//! Subjects appear only as keyed references.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};

/// Who asks for an audited action, and why. Both go to the audit log.
#[derive(Debug, Clone)]
pub struct Access {
    /// The authenticated principal (a user or role name).
    pub principal: String,
    /// The stated purpose, such as a ticket or case number.
    pub purpose: String,
}

impl Access {
    /// Refuse a blank principal or purpose: the record would not say who
    /// asked, or why.
    ///
    /// # Errors
    /// [`Error::Unattributed`] naming the blank field.
    pub fn check(&self) -> Result<()> {
        for (field, value) in [("principal", &self.principal), ("purpose", &self.purpose)] {
            if value.trim().is_empty() {
                return Err(Error::Unattributed { field });
            }
        }
        Ok(())
    }
}

/// An append-only, fsynced NDJSON audit log.
///
/// Every record is a line of its own, whatever came before it: a write
/// that fails (a full disk) is cut back off the log, and a record that
/// follows a last line left torn by a crash starts with a newline. A
/// partial line glued to the next record would make both unreadable to
/// the line-by-line tools that read audit logs.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Open (creating with 0600) the log at `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be opened.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = OpenOptions::new();
        opts.create(true).read(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }

    /// Append the record of `action`, asked for by `by`: who, why, and
    /// the fields of `detail` (an object), with a `time` field added.
    ///
    /// # Errors
    /// As [`AuditLog::append`].
    pub fn record(&self, action: &str, by: &Access, detail: &serde_json::Value) -> Result<()> {
        let mut record =
            serde_json::json!({"action": action, "principal": by.principal, "purpose": by.purpose});
        if let (Some(all), Some(fields)) = (record.as_object_mut(), detail.as_object()) {
            all.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.append(&record)
    }

    /// Append one record (with a `time` field added) and fsync.
    ///
    /// # Errors
    /// [`Error::Io`] when the write or fsync fails; the audited action must
    /// then not proceed.
    pub fn append(&self, record: &impl Serialize) -> Result<()> {
        let mut value = serde_json::to_value(record).unwrap_or_default();
        if let Some(obj) = value.as_object_mut() {
            obj.insert("time".into(), chrono::Utc::now().to_rfc3339().into());
        }
        let io = |source| Error::Io { path: self.path.clone(), source };
        let f = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Other processes append to the log too (the hub, `keys`
        // commands): the lock keeps their records out of the span from
        // reading the log's end to cutting back a failed write.
        f.lock().map_err(io)?;
        let written = self.write_locked(&f, &value.to_string());
        let unlocked = f.unlock();
        written?;
        unlocked.map_err(io)
    }

    /// [`AuditLog::append`]'s write and fsync of `record`, the file
    /// locked.
    fn write_locked(&self, f: &File, record: &str) -> Result<()> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        let before = f.metadata().map_err(io)?.len();
        let mut line = String::new();
        if !ends_a_line(f, before).map_err(io)? {
            line.push('\n');
        }
        line.push_str(record);
        line.push('\n');
        crate::fsutil::append(f, &self.path, before, line.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)
    }

    /// The log's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether the log, `len` bytes long, is empty or ends with a newline
/// (another process appends to it too, so this is read at each record).
fn ends_a_line(f: &File, len: u64) -> std::io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let mut last = [0u8];
    #[cfg(unix)]
    std::os::unix::fs::FileExt::read_exact_at(f, &mut last, len - 1)?;
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = f;
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
    }
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{Access, AuditLog};
    use crate::fsutil::torn::tear_next_write;

    fn by() -> Access {
        Access { principal: "dpo@corp".into(), purpose: "GDPR-1187".into() }
    }

    /// The records of the log at `path`, each line parsed (a line that is
    /// not JSON fails the test).
    fn records(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
    }

    /// A record whose write failed (a full disk) is refused and cut back
    /// off the log: the next record is a whole line of its own, and
    /// every line reads.
    #[test]
    fn a_failed_write_is_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record("decrypt", &by(), &serde_json::json!({"values": 1})).unwrap();
        tear_next_write(&path, 17);
        let e = log.record("forget", &by(), &serde_json::json!({"subject_ref": "ab"})).unwrap_err();
        assert!(e.to_string().contains("no space left on device"), "{e}");
        log.record("forget", &by(), &serde_json::json!({"subject_ref": "cd"})).unwrap();
        let all = records(&path);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[1]["subject_ref"], "cd");
        assert!(all.iter().all(|r| r["principal"] == "dpo@corp" && r["time"].is_string()));
    }

    /// A last line torn by a crash (of this process or another writing
    /// the same log) is left as it is, and the next record starts a line
    /// of its own after it.
    #[test]
    fn a_record_after_a_torn_line_is_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let first = AuditLog::open(&path).unwrap();
        first.record("rotate", &by(), &serde_json::json!({})).unwrap();
        let torn = r#"{"action":"decrypt","princ"#;
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(torn.as_bytes()).unwrap();
        // A log opened before the tear, and one opened after it.
        first.record("decrypt", &by(), &serde_json::json!({"values": 2})).unwrap();
        AuditLog::open(&path).unwrap().record("decrypt", &by(), &serde_json::json!({"values": 3})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], torn, "the torn line is kept as it was");
        for (line, values) in [(lines[2], 2), (lines[3], 3)] {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(r["values"], values);
        }
    }

    use std::io::Write as _;
}
