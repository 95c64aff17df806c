//! The retire thread: the dedupe identities of written records into id
//! files, and the deletion of committed segments.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::files::{push_frame, sync_ids};
use super::{note_failure, IdsFile, Pending, WalOptions, FRAME_HEADER, IDS_FILE_MIN_BYTES, RETIRE_RETRY};
use crate::error::{io, Result};

/// The identities of the `events` events of the records up to `through`,
/// as they were written to a segment.
pub(super) struct WrittenIds {
    pub(super) through: u64,
    pub(super) events: u64,
    pub(super) ids: Vec<u8>,
}

/// What the WAL thread hands the retire thread, done in order.
pub(super) enum RetireMsg {
    Ids(WrittenIds),
    /// A sealed segment whose records are all committed.
    Retire(RetireJob),
}

/// A sealed segment whose records are all committed: once the ids of its
/// events are durable in an id file, it is deleted.
pub(super) struct RetireJob {
    /// Its last record (none: it held no record).
    pub(super) last: Option<u64>,
    pub(super) path: PathBuf,
    pub(super) bytes: u64,
    /// The first record of the next segment: the oldest one on disk once
    /// this segment is deleted.
    pub(super) then_oldest: u64,
}

/// The retire thread. It appends the identities of every record written
/// to the WAL to the newest id file as they come (so none is held in
/// memory while its segment waits for the lake), fsyncs that file before
/// a segment is deleted (and before a new one starts), deletes committed
/// segments, and deletes the id files the dedupe window no longer needs.
/// Messages are done in order; one that fails is retried, and later ones
/// wait for it, so a segment is never deleted before its ids are durable.
pub(super) struct Retirer {
    pub(super) dir: PathBuf,
    pub(super) opts: WalOptions,
    /// Oldest first; the last one takes new frames until it is large.
    pub(super) ids_files: Vec<IdsFile>,
    pub(super) pending: Arc<Pending>,
    pub(super) size: Arc<AtomicU64>,
    pub(super) queue: VecDeque<RetireMsg>,
    /// The newest id file, open for appends.
    pub(super) file: Option<File>,
    /// The last record whose ids are appended, and durable.
    pub(super) appended_through: u64,
    pub(super) durable_through: u64,
    /// Why no segment is deleted until a restart: an id file fsync
    /// failed (what reached the disk is unknown). The restart rebuilds
    /// the ids of every segment still on disk.
    pub(super) broken: Option<String>,
    /// Told of `broken` as it is set, for [`super::Wal::failure`].
    pub(super) failed: Arc<OnceLock<String>>,
}

impl Retirer {
    pub(super) fn run(mut self, rx: &std::sync::mpsc::Receiver<RetireMsg>) {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            // With a failed message waiting, wake to retry it.
            let next = if self.queue.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(RETIRE_RETRY)
            };
            match next {
                Ok(m) => self.queue.push_back(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.queue.extend(rx.try_iter());
            self.work();
        }
        // The WAL thread stopped: one last try, and what was appended
        // made durable.
        self.work();
        if self.queue.is_empty() {
            // Failures are logged; the next start rebuilds what is missing.
            let _ = self.sync();
        } else {
            tracing::error!(
                waiting = self.queue.len(),
                "committed WAL segments could not be retired; the next start retires them"
            );
        }
    }

    /// Do the queued messages in order, up to the first that fails
    /// (logged; it stays queued), then drop the id files no longer needed.
    fn work(&mut self) {
        if self.broken.is_some() {
            // Nothing more is deleted: the segments stay for the restart.
            self.queue.clear();
            return;
        }
        while let Some(msg) = self.queue.pop_front() {
            let failed = match msg {
                RetireMsg::Ids(w) => match self.append(&w) {
                    Ok(()) => None,
                    Err(e) => {
                        self.queue.push_front(RetireMsg::Ids(w));
                        Some(e)
                    }
                },
                RetireMsg::Retire(job) => {
                    let started = std::time::Instant::now();
                    match self.retire(&job) {
                        Ok(()) => {
                            // Only now can nothing before it be replayed.
                            self.pending.oldest.store(job.then_oldest, Ordering::Release);
                            tracing::debug!(
                                segment = %job.path.display(),
                                ms = watershed_event::millis(started.elapsed()),
                                "retired a committed WAL segment"
                            );
                            None
                        }
                        Err(e) => {
                            self.queue.push_front(RetireMsg::Retire(job));
                            Some(e)
                        }
                    }
                }
            };
            if self.broken.is_some() {
                self.queue.clear();
                return;
            }
            if let Some(e) = failed {
                tracing::error!(
                    error = %e,
                    "cannot write the WAL's id file or delete a committed segment; \
                     the segment stays on disk and this is retried"
                );
                return;
            }
        }
        if let Err(e) = self.drop_old_ids() {
            tracing::error!(error = %e, "cannot delete a WAL id file the dedupe window no longer needs");
        }
    }

    /// Append `written` to the newest id file (a new one when it is
    /// large; the old one is fsynced first), without fsync. A failed
    /// write is cut back, so later frames stay readable.
    fn append(&mut self, written: &WrittenIds) -> Result<()> {
        let WrittenIds { through, events, ref ids } = *written;
        let full = (self.opts.segment_bytes / 4).max(IDS_FILE_MIN_BYTES);
        let newest_full = self.ids_files.last().is_none_or(|f| f.bytes >= full);
        if self.file.is_none() && !newest_full {
            let f = self.ids_files.last().expect("not full, so there is one");
            self.file = Some(OpenOptions::new().append(true).open(&f.path).map_err(io(&f.path))?);
        }
        if newest_full {
            self.sync()?;
            // Names sort in the order the files were started.
            let name = self.ids_files.last().map_or(through, |f| f.name.max(through - 1) + 1);
            let path = self.dir.join(format!("{name:020}.ids"));
            let mut options = OpenOptions::new();
            options.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let file = options.open(&path).map_err(io(&path))?;
            // Its name is durable before any segment relies on it.
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
            self.ids_files.push(IdsFile { name, last: 0, events: 0, bytes: 0, path });
            self.file = Some(file);
        }
        let f = self.ids_files.last_mut().expect("one was just ensured");
        let file = self.file.as_mut().expect("opened above");
        let mut frame = Vec::with_capacity(FRAME_HEADER + ids.len());
        push_frame(&mut frame, through, ids);
        if let Err(e) = file.write_all(&frame) {
            let _ = file.set_len(f.bytes);
            return Err(io(&f.path)(e));
        }
        f.bytes += frame.len() as u64;
        f.last = through;
        f.events += events;
        self.size.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.appended_through = through;
        Ok(())
    }

    /// Make what was appended to the newest id file durable. Written
    /// without fsync as they come, the ids reach the disk in the
    /// background; only this fsync, before a segment is deleted, waits. If
    /// it fails, nobody knows what reached the disk: no segment is deleted
    /// until a restart, which rebuilds the ids of those still on disk.
    fn sync(&mut self) -> Result<()> {
        let (Some(file), Some(f)) = (&self.file, self.ids_files.last()) else { return Ok(()) };
        if self.appended_through <= self.durable_through {
            return Ok(());
        }
        if let Err(e) = sync_ids(file, &f.path) {
            tracing::error!(
                file = %f.path.display(),
                error = %e,
                "cannot fsync the WAL id file: committed WAL segments are kept until a restart"
            );
            let why = format!("cannot fsync the id file {}: {e}", f.path.display());
            note_failure(&self.failed, &why);
            self.broken = Some(why);
            return Err(e);
        }
        self.durable_through = self.appended_through;
        Ok(())
    }

    /// Make the ids of `job`'s records durable, then delete it.
    fn retire(&mut self, job: &RetireJob) -> Result<()> {
        if job.last.is_some_and(|l| l > self.durable_through) {
            self.sync()?;
        }
        match std::fs::remove_file(&job.path) {
            Ok(()) => {}
            // Deleted by an earlier try whose result was lost.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&job.path)(e)),
        }
        // The deletion is made durable before the first replayable record
        // moves past the segment (the commit log is then compacted past
        // its records): a segment that came back after a power loss would
        // be replayed into the lake again.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        self.size.fetch_sub(job.bytes, Ordering::Relaxed);
        self.pending.raw_bytes.fetch_sub(job.bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Delete the oldest id files (never the newest, which takes appends)
    /// while newer ones alone hold the dedupe window. They may also hold
    /// the ids of records still in segments; a restart rebuilds those.
    fn drop_old_ids(&mut self) -> Result<()> {
        while self.ids_files.len() > 1 {
            let newer = self.ids_files[1..].iter().map(|f| f.events).sum::<u64>();
            if newer < self.opts.retain_events {
                break;
            }
            let f = self.ids_files.remove(0);
            std::fs::remove_file(&f.path).map_err(io(&f.path))?;
            self.size.fetch_sub(f.bytes, Ordering::Relaxed);
        }
        Ok(())
    }
}
