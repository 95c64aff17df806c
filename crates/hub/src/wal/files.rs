//! Frames on disk: framing, reading segments and id files (cutting a
//! torn tail), writing and syncing them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use super::record::{decode_record, ids_of, read_ids, Retired, WalRecord};
use super::retire::WrittenIds;
use super::{IdsFile, Segment, FRAME_HEADER};
use crate::error::{io, Error, Result};

/// What a bad frame in a file means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum OnBad {
    /// The newest file, whose unacknowledged last write may be torn: it
    /// is cut off there.
    CutTail,
    /// The newest segment, whose first record is `first`: cut off there
    /// as [`OnBad::CutTail`], unless the bad frame's record is one of
    /// those through `durable_through` (the id files hold their events,
    /// and ids are appended only once their segment's write is fsynced).
    /// A crash cannot tear a durable record: that is damage, an error
    /// (or salvaged, with `salvage`), not acknowledged records silently
    /// cut off as a torn write.
    NewestSegment { first: u64, durable_through: u64, salvage: bool },
    /// Damage: an error.
    Fail,
    /// Damage the operator chose to start without: a copy of the file is
    /// kept as `<name>.damaged`, then it is cut off there.
    Salvage,
}

/// What is done about a bad frame.
enum Act {
    Cut,
    Fail,
    Salvage,
}

impl OnBad {
    /// What to do about a bad frame after the record `last_seq` (`None`:
    /// at the file's start). For the newest segment, a bad frame where a
    /// durable record was adds why to `detail`.
    fn act(self, last_seq: Option<u64>, detail: &mut String) -> Act {
        match self {
            OnBad::CutTail => Act::Cut,
            OnBad::Fail => Act::Fail,
            OnBad::Salvage => Act::Salvage,
            OnBad::NewestSegment { first, durable_through, salvage } => {
                let record = last_seq.map_or(first, |s| s + 1);
                if record > durable_through {
                    return Act::Cut;
                }
                detail.push_str(&format!(
                    "; record {record} there was durable (the id files hold the ids of records through \
                     {durable_through}), so this is damage, not a write a crash tore"
                ));
                if salvage {
                    Act::Salvage
                } else {
                    Act::Fail
                }
            }
        }
    }
}

/// Read the frames of `path`, oldest first, passing each (seq, payload,
/// offset) to `each`; returns the bytes of whole frames. A bad frame is
/// handled as `on_bad` says; under [`OnBad::Salvage`] so is a frame that
/// `each` finds undecodable ([`Error::WalCorrupt`]).
pub(super) fn read_frames(
    path: &Path,
    on_bad: OnBad,
    mut each: impl FnMut(u64, &[u8], usize) -> Result<()>,
) -> Result<u64> {
    let mut f = OpenOptions::new().read(true).write(true).open(path).map_err(io(path))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(io(path))?;
    let (mut off, mut frames, mut last_seq) = (0usize, 0usize, None);
    while off < data.len() {
        let frame = parse_frame(&data[off..]);
        let bad = match frame {
            Some((seq, payload, _)) => match each(seq, payload, off) {
                Ok(()) => {
                    last_seq = Some(seq);
                    None
                }
                Err(Error::WalCorrupt { detail, .. })
                    if matches!(on_bad, OnBad::Salvage | OnBad::NewestSegment { salvage: true, .. }) =>
                {
                    Some(detail)
                }
                Err(e) => return Err(e),
            },
            None => Some(format!(
                "bad frame at offset {off} of {} bytes, after {frames} readable frames; \
                 the rest of the file cannot be read",
                data.len()
            )),
        };
        if let Some(mut detail) = bad {
            match on_bad.act(last_seq, &mut detail) {
                Act::Cut => {
                    tracing::warn!(file = %path.display(), offset = off, "truncating a torn tail (unacknowledged writes)");
                }
                Act::Fail => return Err(Error::WalCorrupt { path: path.to_owned(), detail }),
                Act::Salvage => {
                    let aside = path.with_extension("wal.damaged");
                    // The copy is durable before the original is cut.
                    std::fs::copy(path, &aside)
                        .and_then(|_| File::open(&aside)?.sync_all())
                        .map_err(io(&aside))?;
                    tracing::error!(
                        file = %path.display(),
                        %detail,
                        frames_replayed = frames,
                        bytes_lost = data.len() - off,
                        kept_as = %aside.display(),
                        "salvaging a damaged WAL segment: its records after the damage are cut off, \
                         and those not yet committed to the lake are lost"
                    );
                }
            }
            f.set_len(off as u64).map_err(io(path))?;
            f.sync_all().map_err(io(path))?;
            break;
        }
        off += frame.map_or(0, |(_, _, len)| len);
        frames += 1;
    }
    Ok(off as u64)
}

/// Read a segment, passing each record to `replay`, and the ids of each
/// record after `ids_through` to `ids`.
pub(super) fn read_segment(
    path: &Path,
    first: u64,
    on_bad: OnBad,
    next: &mut u64,
    replay: &mut impl FnMut(u64, WalRecord) -> Result<()>,
    (ids_through, ids): (u64, &mut Vec<WrittenIds>),
) -> Result<Segment> {
    let mut seg = Segment { first, last: None, events: 0, bytes: 0, path: path.to_owned() };
    seg.bytes = read_frames(path, on_bad, |seq, payload, _| {
        let record = decode_record(payload).ok_or_else(|| Error::WalCorrupt {
            path: path.to_owned(),
            detail: format!("undecodable record {seq}"),
        })?;
        seg.events += record.events.len() as u64;
        seg.last = Some(seq);
        *next = seq + 1;
        if seq > ids_through {
            let mut one = Vec::new();
            ids_of(&record, &mut one);
            ids.push(WrittenIds { through: seq, events: record.events.len() as u64, ids: one });
        }
        replay(seq, record)
    })
    .map_err(|e| match e {
        Error::WalCorrupt { path, detail } => Error::WalCorrupt {
            detail: format!(
                "{detail}. The hub does not start without the records of a damaged segment: \
                 restore the file from a copy, or start once with wal.salvage = true \
                 (WATERSHED_WAL__SALVAGE=true) to replay its records up to the damage, keep \
                 the file as {}.damaged and cut the rest off (its records not yet committed \
                 to the lake are then lost)",
                path.display()
            ),
            path,
        },
        e => e,
    })?;
    Ok(seg)
}

/// Read an id file: its frames (as a segment's; the seq is the last
/// record's), passing each identity to `remember`. A torn tail of the
/// newest file is cut off: the segments it came from were deleted only
/// after it was fsynced, so it held nothing they needed.
pub(super) fn read_ids_file(
    path: &Path,
    name: u64,
    newest: bool,
    remember: &mut impl FnMut(&str, Retired<'_>),
) -> Result<IdsFile> {
    let mut file = IdsFile { name, last: 0, events: 0, bytes: 0, path: path.to_owned() };
    let on_bad = if newest { OnBad::CutTail } else { OnBad::Fail };
    file.bytes = read_frames(path, on_bad, |last, ids, off| {
        let ok = read_ids(ids, &mut |account, r| {
            file.events += 1;
            remember(account, r);
        });
        if !ok {
            let detail = format!("undecodable ids at offset {off}");
            return Err(Error::WalCorrupt { path: path.to_owned(), detail });
        }
        file.last = last;
        Ok(())
    })?;
    Ok(file)
}

/// Append a frame of `payload` under `seq` to `out`: the inverse of
/// [`parse_frame`].
pub(super) fn push_frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    out.extend_from_slice(
        &u32::try_from(payload.len()).expect("frames are capped far below 4 GiB").to_le_bytes(),
    );
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

pub(super) fn parse_frame(b: &[u8]) -> Option<(u64, &[u8], usize)> {
    if b.len() < FRAME_HEADER {
        return None;
    }
    let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let payload = b.get(FRAME_HEADER..FRAME_HEADER + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&b[8..16]);
    h.update(payload);
    (h.finalize() == crc).then_some((seq, payload, FRAME_HEADER + len))
}

/// Write `frames` to a segment.
#[cfg(not(test))]
pub(super) fn write_frames(file: &mut File, path: &Path, frames: &[u8]) -> Result<()> {
    file.write_all(frames).map_err(io(path))
}

/// [`write_frames`], failing on demand: after [`super::tests::tear_next_write`],
/// the next write into that directory stops after a few bytes with an
/// error, as a full disk would; after [`super::tests::panic_next_write`],
/// it panics.
#[cfg(test)]
pub(super) fn write_frames(file: &mut File, path: &Path, frames: &[u8]) -> Result<()> {
    assert!(!super::tests::write_panics(path), "a WAL write panicked (simulated)");
    if let Some(keep) = super::tests::torn_write(path) {
        file.write_all(&frames[..keep.min(frames.len())]).map_err(io(path))?;
        return Err(io(path)(std::io::Error::other("no space left on device (simulated)")));
    }
    file.write_all(frames).map_err(io(path))
}

/// Make a segment's written data durable.
#[cfg(not(test))]
pub(super) fn sync_segment(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(io(path))
}

/// [`sync_segment`], failing on demand: after [`super::tests::fail_next_sync`],
/// the next fsync in that directory fails, as it does after a device
/// error.
#[cfg(test)]
pub(super) fn sync_segment(file: &File, path: &Path) -> Result<()> {
    if super::tests::sync_fails(path) {
        return Err(io(path)(std::io::Error::other("input/output error (simulated)")));
    }
    file.sync_data().map_err(io(path))
}

/// Make the frames appended to an id file durable.
#[cfg(not(test))]
pub(super) fn sync_ids(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(io(path))
}

/// [`sync_ids`], held up or failing on demand (`tests::hold_ids_writes`,
/// `tests::fail_ids_sync_after`), as a slow or failing disk would.
#[cfg(test)]
pub(super) fn sync_ids(file: &File, path: &Path) -> Result<()> {
    super::tests::hold_ids_write(path);
    if super::tests::ids_sync_fails(path) {
        return Err(io(path)(std::io::Error::other("input/output error (simulated)")));
    }
    file.sync_data().map_err(io(path))
}
