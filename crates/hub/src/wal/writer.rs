//! The WAL thread: group commit of appended records into segments.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use super::files::{push_frame, sync_segment, write_frames};
use super::record::BufferPool;
use super::retire::{RetireJob, RetireMsg, WrittenIds};
use super::{note_failure, Append, Appended, BeforeWrite, Failed, Msg, Pending, Segment, WalOptions};
use crate::error::{io, Error, Result};

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) opts: WalOptions,
    pub(super) segments: Vec<Segment>,
    pub(super) file: Option<File>,
    pub(super) next: u64,
    pub(super) pending: Arc<Pending>,
    pub(super) size: Arc<AtomicU64>,
    pub(super) before_write: Option<BeforeWrite>,
    /// The frames of a group, reused.
    pub(super) frames: Vec<u8>,
    /// Why the log stopped taking records: an fsync failed (what reached
    /// the disk is unknown), or a failed write could not be cut back. It
    /// answers every later append with an error until a restart recovers
    /// from what is on disk.
    pub(super) broken: Option<String>,
    /// Told of `broken` as it is set, for [`super::Wal::failure`].
    pub(super) failed: Arc<OnceLock<String>>,
    /// Written records' ids and sealed, committed segments go to the
    /// retire thread.
    pub(super) retire: std::sync::mpsc::Sender<RetireMsg>,
    /// The ids of the group's records written so far, sent once fsynced.
    pub(super) written_ids: Vec<WrittenIds>,
    /// Groups in a row whose write failed and was cut back (a full disk),
    /// or whose new keys could not be stored: the first is logged, and
    /// the next success.
    pub(super) failing: u64,
    /// Every such group, for metrics ([`super::Wal::write_failures`]).
    pub(super) write_failures: Arc<AtomicU64>,
    /// Why the last write failed, until one succeeds or a probe does
    /// ([`super::Wal::failing`]).
    pub(super) last_failure: Arc<std::sync::Mutex<Option<String>>>,
}

/// Frames gathered for the open segment and not yet written.
#[derive(Default)]
pub(super) struct Chunk {
    records: u64,
    events: u64,
    /// The records' identities.
    ids: Vec<u8>,
}

impl Writer {
    pub(super) fn open_segment(&mut self) -> Result<()> {
        if let Some(s) = self.segments.last() {
            if s.bytes < self.opts.segment_bytes {
                let f = OpenOptions::new().append(true).open(&s.path).map_err(io(&s.path))?;
                self.file = Some(f);
                return Ok(());
            }
        }
        self.roll()
    }

    fn roll(&mut self) -> Result<()> {
        if let Some(f) = &self.file {
            f.sync_data().map_err(io(&self.dir))?;
        }
        self.file = None;
        let path = self.dir.join(format!("{:020}.wal", self.next));
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let f = opts.open(&path).map_err(io(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.segments.push(Segment { first: self.next, last: None, events: 0, bytes: 0, path });
        self.file = Some(f);
        Ok(())
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch = Vec::with_capacity(256);
        let mut seals = Vec::new();
        let mut probes = Vec::new();
        // A `Retire` only wakes the loop: it retires after every message.
        let take = |m,
                    batch: &mut Vec<Append>,
                    seals: &mut Vec<oneshot::Sender<()>>,
                    probes: &mut Vec<oneshot::Sender<bool>>| match m {
            Msg::Append(a) => batch.push(a),
            Msg::Retire => {}
            Msg::Seal(reply) => seals.push(reply),
            Msg::Probe(reply) => probes.push(reply),
        };
        while let Some(first) = rx.blocking_recv() {
            take(first, &mut batch, &mut seals, &mut probes);
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut batch, &mut seals, &mut probes),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let result = match self.before_write.as_mut().map_or(Ok(()), |f| f()) {
                    Ok(()) => self.write_batch(&batch).map_err(|e| Failed::Io(e.to_string())),
                    Err(e) => Err(Failed::BeforeWrite(e)),
                };
                // Known before any request hears of the failure.
                if let Some(why) = &self.broken {
                    note_failure(&self.failed, why);
                } else {
                    self.note_write(&result);
                }
                for (i, a) in batch.drain(..).enumerate() {
                    let reply = result
                        .as_ref()
                        .map(|first| Appended { seq: first + i as u64, buffer: a.payload })
                        .map_err(Clone::clone);
                    let _ = a.reply.send(reply);
                }
            }
            // Sealed after the group: every record acknowledged before the
            // request is in a sealed segment.
            if !seals.is_empty() {
                let open = self.segments.last().is_some_and(|s| s.last.is_some());
                if open && self.broken.is_none() {
                    if let Err(e) = self.roll() {
                        tracing::error!(error = %e, "cannot seal the open WAL segment");
                        note_failure(&self.failed, &e.to_string());
                        self.broken = Some(e.to_string());
                    }
                }
                for reply in seals.drain(..) {
                    let _ = reply.send(());
                }
            }
            if !probes.is_empty() {
                let healthy = self.probe();
                for reply in probes.drain(..) {
                    let _ = reply.send(healthy);
                }
            }
            if let Err(e) = self.retire() {
                tracing::error!(error = %e, "cannot retire committed WAL segments");
            }
            self.note_pressure();
        }
        if let Err(e) = self.retire() {
            tracing::error!(error = %e, "cannot retire committed WAL segments");
        }
        if let Some(f) = self.file.take() {
            let _ = f.sync_data();
        }
    }

    /// Write all, fsync once; returns the first seq. The group's frames
    /// are gathered in one buffer and written with one call per segment.
    ///
    /// A record is counted (its seq taken, its bytes added to the segment)
    /// only once its frame is written. A write that fails is cut back off
    /// the segment, so no torn frame is ever followed by later records
    /// (recovery would take it for the torn tail and drop them); when the
    /// cut, a roll or the fsync fails, the log is marked broken instead.
    fn write_batch(&mut self, batch: &[Append]) -> Result<u64> {
        if let Some(why) = &self.broken {
            let why =
                format!("the write-ahead log stopped after an earlier failure ({why}); restart the hub");
            return Err(Error::Io { path: self.dir.clone(), source: std::io::Error::other(why) });
        }
        let first = self.next;
        let mut frames = std::mem::take(&mut self.frames);
        frames.clear();
        let result = (|| {
            let mut chunk = Chunk::default();
            for a in batch {
                let open = self.segments.last().map_or(0, |s| s.bytes) + frames.len() as u64;
                if open >= self.opts.segment_bytes {
                    self.write_chunk(&mut frames, &mut chunk)?;
                    self.roll().inspect_err(|e| self.broken = Some(e.to_string()))?;
                }
                push_frame(&mut frames, self.next + chunk.records, &a.payload);
                chunk.records += 1;
                chunk.events += u64::from(a.events);
                chunk.ids.extend_from_slice(&a.ids);
            }
            self.write_chunk(&mut frames, &mut chunk)?;
            let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
            let synced = sync_segment(self.file.as_ref().expect("a segment is open"), &path);
            if let Err(e) = &synced {
                self.broken = Some(e.to_string());
            }
            synced
        })();
        // Kept for the next group, unless one huge group grew it.
        if frames.capacity() <= BufferPool::KEEP_BYTES {
            self.frames = frames;
        }
        if result.is_err() {
            // Whether these records reached the disk is unknown: a restart
            // finds out, and rebuilds the ids of those that did.
            self.written_ids.clear();
        }
        result?;
        // On to the id file, once durable (the id of a record a power
        // loss could still take must not be remembered: the client's
        // retry would be taken for a duplicate). A segment's ids are thus
        // not held in memory while it waits for the lake (up to a late
        // partition's roll age). A send fails only if the retire thread
        // panicked; the segment then stays, and a restart rebuilds its ids.
        for w in self.written_ids.drain(..) {
            let _ = self.retire.send(RetireMsg::Ids(w));
        }
        // Registered before the ack, so the lake cannot commit parts of a
        // record the WAL does not know is pending.
        for (i, a) in batch.iter().enumerate() {
            self.pending.register(first + i as u64, a.parts);
        }
        Ok(first)
    }

    /// Write the gathered `frames` to the open segment and count them, or
    /// cut the segment back to its last whole record.
    fn write_chunk(&mut self, frames: &mut Vec<u8>, chunk: &mut Chunk) -> Result<()> {
        let seg = self.segments.last_mut().expect("a segment is open");
        let file = self.file.as_mut().expect("a segment is open");
        let written = write_frames(file, &seg.path, frames);
        if let Err(e) = written {
            if let Err(cut) = file.set_len(seg.bytes) {
                self.broken = Some(format!("{e}; cutting the segment back failed: {cut}"));
            }
            return Err(e);
        }
        seg.bytes += frames.len() as u64;
        seg.events += chunk.events;
        if chunk.records > 0 {
            let through = self.next + chunk.records - 1;
            seg.last = Some(through);
            self.written_ids.push(WrittenIds {
                through,
                events: chunk.events,
                ids: std::mem::take(&mut chunk.ids),
            });
        }
        self.size.fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.pending.raw_bytes.fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.next += chunk.records;
        frames.clear();
        *chunk = Chunk::default();
        Ok(())
    }

    /// Retire what is committed: seal the open segment once its first
    /// record is committed, and hand the sealed segments whose records
    /// are all committed to the retire thread (which writes their ids,
    /// then deletes them).
    fn retire(&mut self) -> Result<()> {
        let watermark = self.pending.low_watermark().unwrap_or(self.next);
        // Waiting for every record of the open segment to be committed
        // would, under steady load, never happen: sealing once its first
        // one is bounds how long a raw event stays on disk to about two
        // roll ages.
        let open_started = self.segments.last().is_some_and(|s| s.last.is_some() && s.first < watermark);
        if open_started && self.broken.is_none() {
            self.roll().inspect_err(|e| self.broken = Some(e.to_string()))?;
        }
        let done = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.last.is_none_or(|l| l < watermark))
            .count();
        if done == 0 {
            return Ok(());
        }
        let then_oldest: Vec<u64> = self.segments[1..=done].iter().map(|s| s.first).collect();
        for (s, then_oldest) in self.segments.drain(..done).zip(then_oldest) {
            let job = RetireJob { last: s.last, path: s.path, bytes: s.bytes, then_oldest };
            // The retire thread outlives this one; a send fails only if
            // it panicked, and the segment then stays for the next start.
            if self.retire.send(RetireMsg::Retire(job)).is_err() {
                return Err(Error::Stopped("wal retire thread"));
            }
        }
        Ok(())
    }

    /// Log the first of a run of failed writes the log recovered from
    /// (its own, or the new protection keys' it writes first; each
    /// answered 503, nothing stored, so clients retry), and the
    /// first write that succeeds after them: otherwise only the clients
    /// would hear of a full disk.
    fn note_write(&mut self, result: &std::result::Result<u64, Failed>) {
        match result {
            Err(Failed::Io(e) | Failed::BeforeWrite(e)) => {
                *self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(e.clone());
                if self.failing == 0 {
                    tracing::error!(
                        error = %e,
                        "a write-ahead log write failed; requests are answered 503 (nothing stored) \
                         until writes succeed"
                    );
                }
                self.failing += 1;
                self.write_failures.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) if self.failing > 0 => {
                tracing::info!(failed_groups = self.failing, "write-ahead log writes succeed again");
                self.failing = 0;
                *self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            }
            _ => {}
        }
    }

    /// Whether the log takes records: healthy unless the last write
    /// failed, then whether a write of [`super::PROBE_BYTES`] and its
    /// fsync succeed in the log's directory now (the file is removed
    /// after). A success clears the failure for readiness; the run of
    /// failed writes is logged as over only when a group is written.
    fn probe(&mut self) -> bool {
        let last = || self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last().is_none() {
            return self.broken.is_none();
        }
        let path = self.dir.join("probe.tmp");
        let written = (|| {
            use std::io::Write as _;
            #[cfg(test)]
            if super::tests::probe_fails(&path) {
                return Err(std::io::Error::other("no space left on device (simulated)"));
            }
            let mut f = File::create(&path)?;
            f.write_all(&vec![0u8; super::PROBE_BYTES])?;
            f.sync_data()
        })();
        let _ = std::fs::remove_file(&path);
        if written.is_ok() {
            *last() = None;
        }
        written.is_ok() && self.broken.is_none()
    }

    /// Publish the first record of the oldest segment.
    pub(super) fn note_oldest(&self) {
        let oldest = self.segments.first().map_or(self.next, |s| s.first);
        self.pending.oldest.store(oldest, Ordering::Release);
    }

    /// Ask for early commits when the segments not yet retired hold half
    /// of [`WalOptions::max_raw_bytes`] or more: every record before
    /// the newest segments that fit in a quarter of it is to be committed
    /// (all records, if the open segment alone is over it; it is then
    /// sealed once its first record is committed). Without this a late
    /// partition, which waits `late_roll_age` to collect its trickle, would
    /// keep every newer segment on disk meanwhile.
    pub(super) fn note_pressure(&self) {
        let max = self.opts.max_raw_bytes;
        let held: u64 = self.segments.iter().map(|s| s.bytes).sum();
        let before = if held < max / 2 {
            0
        } else {
            let (mut kept, mut before) = (0u64, self.next);
            for s in self.segments.iter().rev() {
                kept += s.bytes;
                if kept > max / 4 {
                    break;
                }
                before = s.first;
            }
            before
        };
        let was = self.pending.commit_before.swap(before, Ordering::Relaxed);
        if was == 0 && before > 0 {
            tracing::warn!(
                segment_bytes = held,
                max_raw_bytes = max,
                before,
                "the write-ahead log holds over half of wal.max_raw_bytes: committing the partitions \
                 that hold its oldest records before their roll age"
            );
        } else if was > 0 && before == 0 {
            tracing::info!(
                segment_bytes = held,
                "the write-ahead log is back under half of wal.max_raw_bytes"
            );
        }
    }
}
