//! Reading and writing the key log file: refreshing from it, appending
//! new keys, compacting it and shredding erased keys' lines.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::line::{
    checked, ends_whole, parse_line, push_line, DataKeyParts, LineAt, Parsed, DATA_KEY_LINE_BYTES, SHREDDED,
};
use super::state::{give_back, Loaded, State};
use super::EnvelopeKeyring;
use crate::error::{Error, Result};
use crate::fsutil::{append, stamp, write_atomic};
use crate::keyring::MasterKey;

impl<M: MasterKey> EnvelopeKeyring<M> {
    /// Re-read the log if it changed, looking at most every
    /// [`super::REFRESH_EVERY`]: the per-event encryption path must not stat a
    /// file per event. An erasure by another process therefore reaches new
    /// encryptions within that interval (decryption checks every time).
    pub(super) fn refresh(&self, st: &mut Loaded) -> Result<()> {
        if self.hot.fresh() {
            return Ok(());
        }
        self.reload(st, false)?;
        self.hot.checked_now();
        Ok(())
    }

    /// Re-read the log if it changed (or always, with `force`). A log
    /// that grew in place is read from where the last read stopped; a
    /// replaced one (compacted, by this process or another) from the
    /// start.
    pub(super) fn reload(&self, st: &mut Loaded, force: bool) -> Result<()> {
        let now = stamp(&self.path);
        if !force && now.is_some() && now == st.stamp {
            return Ok(());
        }
        let grown = matches!((now, st.stamp), (Some(n), Some(s))
            if n.ino == s.ino && st.read_len > 0 && n.len >= st.read_len);
        if grown {
            match self.read_log(st, st.read_len) {
                Ok(true) => {
                    st.stamp = now;
                    return Ok(());
                }
                // Not whole lines from there on (the log was cut back and
                // written again by another process): read it all.
                Ok(false) | Err(Error::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match self.read_log(st, 0) {
            // A line being shredded by another process reads as neither
            // JSON nor torn: read again once that process is done.
            Err(Error::Corrupt { .. }) if !self.locked.load(Ordering::Acquire) => {
                let _guard = self.lock_file()?;
                self.read_log(st, 0)?;
            }
            r => {
                r?;
            }
        }
        st.stamp = now;
        st.file = None;
        // A replaced log may be a rotation's (another process's): its keys
        // are wrapped under a master key this one has not read yet, and
        // new keys belong under it. Unwrapping takes it in anyway when
        // this fails; the error shows there.
        if let Err(e) = self.master.refresh() {
            tracing::warn!(error = %e, "cannot read master keys added by another process");
        }
        Ok(())
    }

    /// Apply the log's lines from byte `from` on: to a new state when
    /// `from` is 0, else to the current one. Returns `false` when a line
    /// from a tail read does not parse: the caller then reads the whole
    /// log into a new state.
    pub(super) fn read_log(&self, st: &mut Loaded, from: u64) -> Result<bool> {
        let mut state = if from == 0 { State::default() } else { std::mem::take(&mut st.state) };
        let mut last = if from == 0 { Vec::new() } else { st.last_line.clone() };
        let (pos, applied) = match self.read_lines(&mut state, from, &mut last) {
            Ok(Some(read)) => read,
            // A tail read keeps what it applied (lines in order, so a state
            // behind the log, not a wrong one); a full read keeps nothing.
            Ok(None) => {
                st.state = state;
                return Ok(false);
            }
            Err(e) => {
                if from > 0 {
                    st.state = state;
                }
                return Err(e);
            }
        };
        if from == 0 || applied {
            for l in st.pending.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let json = checked(l).expect("pending lines were written here");
                state.apply(serde_json::from_slice(json).expect("pending lines were serialised here"), None);
            }
            st.cache.retain(|id| state.data_keys.contains_key(id));
            self.hot.clear();
        }
        st.state = state;
        st.read_len = pos;
        st.last_line = last;
        Ok(true)
    }

    /// Apply to `state` the log's lines from byte `from` on. Returns where
    /// the last whole line ends and whether any line was applied, or
    /// `None` when a tail read (`from` > 0) does not follow `last` (the
    /// line ending at `from` when the log was last read) or one of its
    /// lines does not parse. `last` ends as the last whole line read.
    pub(super) fn read_lines(
        &self,
        state: &mut State,
        from: u64,
        last: &mut Vec<u8>,
    ) -> Result<Option<(u64, bool)>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some((0, false))),
            Err(e) => return Err(self.io()(e)),
        };
        if from == 0 {
            // Room for the keys up front: growing the maps by doubling
            // would rehash a large log's keys several times, holding two
            // tables at once each time.
            let len = f.metadata().map_err(self.io())?.len();
            let lines = usize::try_from(len / DATA_KEY_LINE_BYTES).unwrap_or(usize::MAX);
            state.data_keys.reserve(lines);
            state.current_subject.reserve(lines);
        }
        let before = from.checked_sub(last.len() as u64).unwrap_or(from);
        f.seek(SeekFrom::Start(before)).map_err(self.io())?;
        let mut r = BufReader::with_capacity(1 << 16, f);
        let mut buf = vec![0; usize::try_from(from - before).expect("one line")];
        if r.read_exact(&mut buf).is_err() || buf != *last {
            return Ok(None);
        }
        let (mut pos, mut applied) = (from, false);
        let mut number = 0_usize;
        loop {
            number += 1;
            buf.clear();
            let n = r.read_until(b'\n', &mut buf).map_err(self.io())?;
            if n == 0 {
                return Ok(Some((pos, applied)));
            }
            let whole = buf.last() == Some(&b'\n');
            let text = if whole { &buf[..n - 1] } else { &buf[..] };
            let at = NonZeroU32::new(u32::try_from(text.len()).unwrap_or(u32::MAX))
                .map(|len| LineAt { offset: pos, len });
            match parse_line(text) {
                Ok(Parsed::DataKey(d)) => {
                    let parts = DataKeyParts {
                        id: &d.id,
                        account: &d.account,
                        subject_ref: d.subject_ref.as_deref(),
                        current: d.current,
                        master: &d.wrapped.master,
                        blob: d.wrapped.blob.as_ref().into(),
                        created: &d.created,
                    };
                    state.apply_data_key(parts, at);
                    applied = true;
                }
                Ok(Parsed::Line(l)) => {
                    state.apply(l, at);
                    applied = true;
                }
                // A torn last line: a key created but never synced, so
                // never used by an acknowledged event.
                Err(_) if !whole && !ends_whole(text) => {}
                Err(_) if from > 0 => return Ok(None),
                Err(e) => {
                    let detail = format!("line {number} (at byte {pos}): {e}");
                    return Err(Error::Corrupt { path: self.path.clone(), detail });
                }
            }
            if whole {
                pos += n as u64;
                std::mem::swap(last, &mut buf);
            }
        }
    }

    /// Cut off a torn last line (a write a crash interrupted: its keys
    /// were never synced, so never used), so that the next append starts a
    /// line of its own. The caller holds the file lock.
    pub(super) fn cut_torn_tail(&self, st: &mut Loaded) -> Result<()> {
        let Some(now) = stamp(&self.path) else { return Ok(()) };
        if now.len <= st.read_len {
            return Ok(());
        }
        tracing::warn!(
            path = %self.path.display(),
            bytes = now.len - st.read_len,
            "cutting off a torn last line of the key log"
        );
        let f = OpenOptions::new().write(true).open(&self.path).map_err(self.io())?;
        f.set_len(st.read_len).and_then(|()| f.sync_data()).map_err(self.io())?;
        // Read it all again: the torn line may have been applied.
        st.read_len = 0;
        self.reload(st, true)
    }

    /// Write the pending lines in one append and fsync; the caller holds
    /// the file lock (and the state).
    pub(super) fn flush_pending(&self, st: &mut Loaded) -> Result<()> {
        let Some((file, lines)) = self.write_pending(st)? else { return Ok(()) };
        file.sync_data().map_err(|e| {
            give_back(st, lines);
            self.io()(e)
        })
    }

    /// Append the pending lines without fsync; the caller holds the file
    /// lock. Returns the file and the lines taken from `pending`, to be
    /// given back if the fsync fails.
    pub(super) fn write_pending(&self, st: &mut Loaded) -> Result<Option<(Arc<File>, Vec<u8>)>> {
        if st.pending.is_empty() {
            return Ok(None);
        }
        if stamp(&self.path) != st.stamp {
            self.reload(st, true)?;
        }
        let file = match &st.file {
            Some(f) => f.clone(),
            None => {
                let new = !self.path.exists();
                let mut opts = OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let f = Arc::new(opts.open(&self.path).map_err(self.io())?);
                if new {
                    // The log's name, not only its lines, must survive a
                    // power loss: every ciphertext depends on it.
                    if let Some(dir) = self.path.parent() {
                        File::open(dir).and_then(|d| d.sync_all()).map_err(self.io())?;
                    }
                }
                st.file = Some(f.clone());
                f
            }
        };
        // A failed write is cut back off the log, so the lines written
        // again at the next sync never follow a torn one (which would
        // make the log unreadable).
        let before = file.metadata().map_err(self.io())?.len();
        append(&file, &self.path, before, &st.pending).map_err(self.io())?;
        st.stamp = stamp(&self.path);
        // These lines need no reading back (they are applied already).
        if st.read_len == before {
            st.read_len = before + st.pending.len() as u64;
            let body = &st.pending[..st.pending.len() - 1];
            let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            st.last_line = st.pending[start..].to_vec();
        }
        Ok(Some((file, std::mem::take(&mut st.pending))))
    }

    /// Rewrite the log from the current state; erased material and
    /// shredded lines are gone. The caller holds the file lock.
    pub(super) fn compact(&self, st: &mut Loaded) -> Result<()> {
        let mut buf = Vec::new();
        for l in st.state.snapshot() {
            push_line(&mut buf, &l);
        }
        write_atomic(&self.path, &buf)?;
        st.pending.clear();
        // Read back: the lines' places changed.
        self.reload(st, true)
    }

    /// [`Self::shred`] where lines cannot be written in place: compact.
    #[cfg(not(unix))]
    pub(super) fn shred(&self, st: &mut Loaded) -> Result<()> {
        if st.state.unshredded.is_empty() {
            return Ok(());
        }
        self.compact(st)
    }

    /// Overwrite the lines of erased keys in place (`{"op":"shredded"}`
    /// padded to the same length) and fsync: their wrapped key bytes are
    /// gone from the log, at a cost that does not grow with the log. Once
    /// shredded lines are half the log, the log is compacted instead. The
    /// caller holds the file lock, and the erasures are in the log already
    /// (a crash in between leaves lines that the next open shreds).
    #[cfg(unix)]
    pub(super) fn shred(&self, st: &mut Loaded) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if st.state.unshredded.is_empty() {
            return Ok(());
        }
        let len = stamp(&self.path).map_or(0, |s| s.len);
        let lines: u64 = st.state.unshredded.iter().map(|a| u64::from(a.len.get()) + 1).sum();
        if (st.state.shredded_bytes + lines) * 2 > len {
            return self.compact(st);
        }
        let f = OpenOptions::new().read(true).write(true).open(&self.path).map_err(self.io())?;
        let mut line = Vec::new();
        for at in std::mem::take(&mut st.state.unshredded) {
            // Only a data key's line is overwritten: anything else there
            // means the places are stale, and a compaction is the safe way.
            line.resize(at.len.get() as usize, 0);
            f.read_exact_at(&mut line, at.offset).map_err(self.io())?;
            if !line.starts_with(br#"{"op":"data_key","#) || !ends_whole(&line) {
                tracing::warn!(offset = at.offset, "a key log line to shred is not a data key: compacting");
                return self.compact(st);
            }
            line.fill(b' ');
            line[..SHREDDED.len()].copy_from_slice(SHREDDED);
            *line.last_mut().expect("longer than the marker") = b'}';
            f.write_all_at(&line, at.offset).map_err(self.io())?;
            st.state.shredded_bytes += u64::from(at.len.get()) + 1;
        }
        f.sync_data().map_err(self.io())?;
        st.stamp = stamp(&self.path);
        Ok(())
    }
}
