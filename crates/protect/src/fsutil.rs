//! Small file helpers for secret files: 0600 permissions, atomic replace
//! (write, fsync, rename, fsync the directory), and change stamps.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Create `dir` (0700) if it is missing.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    let io = |source| Error::Io { path: dir.to_owned(), source };
    if !dir.exists() {
        let mut b = fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir).map_err(io)?;
    }
    Ok(())
}

/// Replace `path` with `bytes` atomically; the file has mode 0600.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| Error::Io { path: p, source }
    };
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Make renames and removals in `dir` durable, as far as it can be
/// opened and synced (best effort: the files themselves are synced).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// What identifies one version of a file: replaced files get a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stamp {
    modified_ns: i128,
    pub(crate) len: u64,
    pub(crate) ino: u64,
}

pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    let m = fs::metadata(path).ok()?;
    let modified_ns = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some(Stamp { modified_ns, len: m.len(), ino })
}

/// Append `bytes` to `file` (opened for appending at `path`, `before`
/// bytes long): the key log's and the audit log's writes. A write that
/// fails (a full disk) is cut back to `before`, so that what is written
/// next never follows a torn line. In one place so that tests can make
/// one fail part-way ([`torn::tear_next_write`]).
pub(crate) fn append(file: &fs::File, path: &Path, before: u64, bytes: &[u8]) -> std::io::Result<()> {
    let written = write_tearable(file, path, bytes);
    match written {
        Ok(()) => Ok(()),
        Err(e) => Err(match file.set_len(before) {
            Ok(()) => e,
            Err(cut) => std::io::Error::other(format!(
                "{e}; cutting {} back to {before} bytes failed: {cut}",
                path.display()
            )),
        }),
    }
}

fn write_tearable(file: &fs::File, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    #[cfg(test)]
    if let Some(keep) = torn::take(path) {
        (&*file).write_all(&bytes[..keep.min(bytes.len())])?;
        return Err(std::io::Error::other("no space left on device (simulated)"));
    }
    #[cfg(not(test))]
    let _ = path;
    (&*file).write_all(bytes)
}

/// Files whose next [`append`] is torn, for tests.
#[cfg(test)]
pub(crate) mod torn {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static TORN: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    /// Make the next append to `path` write `keep` bytes, then fail.
    pub(crate) fn tear_next_write(path: &Path, keep: usize) {
        TORN.lock().unwrap().push((path.to_owned(), keep));
    }

    /// Whether the append to `path` is to be torn, and after how many
    /// bytes (once).
    pub(super) fn take(path: &Path) -> Option<usize> {
        let mut torn = TORN.lock().unwrap();
        let i = torn.iter().position(|(p, _)| p == path)?;
        Some(torn.swap_remove(i).1)
    }
}
