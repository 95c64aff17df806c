//! The append-only audit log of key events: erasures, rotations, sealing
//! and every decryption. One JSON object per line, appended and fsynced
//! before the audited action returns, each naming who asked and why.
//! Subjects appear only as keyed references.

use std::fs::{File, OpenOptions};
use std::io::Write;
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
        opts.create(true).append(true);
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
        let mut line = value.to_string();
        line.push('\n');
        let io = |source| Error::Io { path: self.path.clone(), source };
        let mut f = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.write_all(line.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)
    }

    /// The log's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}
