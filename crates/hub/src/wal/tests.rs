use std::fs::OpenOptions;

use watershed_event::AccountId;

use super::record::{ids_of, read_ids};
use super::*;

/// A failure to provoke once in a directory's segments.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The next write stops after so many bytes with an error.
    Tear(usize),
    /// The next fsync fails.
    Sync,
    /// The fsync of an id file after this many more fails.
    SyncIds(usize),
    /// The next write panics.
    Panic,
    /// The next probe's write fails.
    Probe,
}

/// Faults waiting for their directory's next write or fsync.
static FAULTS: Mutex<Vec<(PathBuf, Fault)>> = Mutex::new(Vec::new());

fn inject(dir: &Path, fault: Fault) {
    FAULTS.lock().unwrap().push((dir.to_owned(), fault));
}

/// Take the first fault of segment `path`'s directory that `kind` picks.
fn take(path: &Path, kind: impl Fn(Fault) -> bool) -> Option<Fault> {
    let mut faults = FAULTS.lock().unwrap();
    let i = faults.iter().position(|(dir, f)| path.parent() == Some(dir.as_path()) && kind(*f))?;
    Some(faults.swap_remove(i).1)
}

/// Make the next write into a segment of `dir` stop after `keep`
/// bytes with an error.
fn tear_next_write(dir: &Path, keep: usize) {
    inject(dir, Fault::Tear(keep));
}

/// Make the next write into a segment of `dir` fail, as on a full disk
/// (nothing of it kept).
pub(crate) fn fail_next_write(dir: &Path) {
    inject(dir, Fault::Tear(0));
}

/// Make the next probe of the log in `dir` fail.
pub(crate) fn fail_next_probe(dir: &Path) {
    inject(dir, Fault::Probe);
}

/// Whether the probe writing `path` is to fail (once).
pub(super) fn probe_fails(path: &Path) -> bool {
    take(path, |f| matches!(f, Fault::Probe)).is_some()
}

/// Make the next fsync of a segment in `dir` fail.
pub(crate) fn fail_next_sync(dir: &Path) {
    inject(dir, Fault::Sync);
}

/// Make the id file fsync after `skip` more in `dir` fail.
fn fail_ids_sync_after(dir: &Path, skip: usize) {
    inject(dir, Fault::SyncIds(skip));
}

/// Whether the fsync of id file `path` is to fail (once).
pub(super) fn ids_sync_fails(path: &Path) -> bool {
    let mut faults = FAULTS.lock().unwrap();
    let Some(i) = faults
        .iter()
        .position(|(dir, f)| path.parent() == Some(dir.as_path()) && matches!(f, Fault::SyncIds(_)))
    else {
        return false;
    };
    match faults[i].1 {
        Fault::SyncIds(0) => {
            faults.swap_remove(i);
            true
        }
        Fault::SyncIds(n) => {
            faults[i].1 = Fault::SyncIds(n - 1);
            false
        }
        _ => unreachable!("picked above"),
    }
}

/// Directories whose id file writes are held up (a slow disk).
static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Hold up id file writes in `dir` until [`release_ids_writes`].
fn hold_ids_writes(dir: &Path) {
    HELD.lock().unwrap().push(dir.to_owned());
}

fn release_ids_writes(dir: &Path) {
    HELD.lock().unwrap().retain(|d| d != dir);
}

/// Wait while id file writes in `path`'s directory are held up.
pub(super) fn hold_ids_write(path: &Path) {
    while HELD.lock().unwrap().iter().any(|d| path.parent() == Some(d.as_path())) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Whether the write to segment `path` is to be torn, and after how
/// many bytes (once).
pub(super) fn torn_write(path: &Path) -> Option<usize> {
    match take(path, |f| matches!(f, Fault::Tear(_)))? {
        Fault::Tear(keep) => Some(keep),
        Fault::Sync | Fault::SyncIds(_) | Fault::Panic | Fault::Probe => None,
    }
}

/// Make the next write into a segment of `dir` panic.
fn panic_next_write(dir: &Path) {
    inject(dir, Fault::Panic);
}

/// Whether the write to segment `path` is to panic (once).
pub(super) fn write_panics(path: &Path) -> bool {
    take(path, |f| f == Fault::Panic).is_some()
}

/// Whether the fsync of segment `path` is to fail (once).
pub(super) fn sync_fails(path: &Path) -> bool {
    take(path, |f| f == Fault::Sync).is_some()
}

/// Options without a bound on the segments on disk.
fn unbounded(segment_bytes: u64, retain_events: u64) -> WalOptions {
    WalOptions { segment_bytes, retain_events, salvage: false, max_raw_bytes: u64::MAX }
}

/// A record of one accepted event `id` of 100 bytes.
fn record(id: &str) -> Finished {
    let mut e = RecordEncoder::new(&AccountId::new("111111111111").unwrap(), 0, None, 0);
    e.accepted(id, &[b'x'; 100]);
    e.finish()
}

/// Open the WAL in `dir` with no hook, ignoring what it replays.
fn open_empty(dir: &Path, opts: WalOptions, pending: Arc<Pending>) -> Wal {
    Wal::open(dir, opts, pending, None, |_, _| Ok(()), |_, _| {}).unwrap()
}

/// Open the WAL in `dir` again (a restart): the log and the (seq, first
/// event id) of every record it replayed.
fn reopen(dir: &Path, opts: WalOptions) -> (Wal, Vec<(u64, String)>) {
    reopen_remembering(dir, opts, |_, _| {})
}

/// [`reopen`], passing the identities from the id files to `remember`.
fn reopen_remembering(
    dir: &Path,
    opts: WalOptions,
    remember: impl FnMut(&str, Retired<'_>),
) -> (Wal, Vec<(u64, String)>) {
    let mut seen = Vec::new();
    let wal = Wal::open(
        dir,
        opts,
        Arc::new(Pending::default()),
        None,
        |seq, r| {
            seen.push((seq, r.events[0].id.clone()));
            Ok(())
        },
        remember,
    )
    .unwrap();
    (wal, seen)
}

/// Open the WAL in `dir` again, with every replayed record pending
/// (one lake part each), as the hub re-buffers them.
fn reopen_pending(dir: &Path, opts: WalOptions) -> (Wal, Arc<Pending>) {
    let pending = Arc::new(Pending::default());
    let registered = pending.clone();
    let replay = move |seq, _| {
        registered.register(seq, 1);
        Ok(())
    };
    (Wal::open(dir, opts, pending.clone(), None, replay, |_, _| {}).unwrap(), pending)
}

/// Open the WAL in `dir` again: the log, the accepted event ids its id
/// files remember (in order) and the records it replayed.
fn reopen_accepted_ids(dir: &Path, opts: WalOptions) -> (Wal, Vec<String>, Vec<(u64, String)>) {
    let mut remembered = Vec::new();
    let (wal, replayed) = reopen_remembering(dir, opts, |_, r| {
        if let Retired::Accepted(id) = r {
            remembered.push(id.to_owned());
        }
    });
    (wal, remembered, replayed)
}

/// After a failed fsync nobody knows what reached the disk, so the log
/// refuses every later append (nothing more is acknowledged) until a
/// restart recovers from what is on disk; then it takes records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_log_until_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 0);
    let wal = open_empty(dir.path(), opts, Arc::default());
    assert_eq!(wal.append(record("a"), 1, 1).await.unwrap().seq, 1);
    assert_eq!(wal.failure(), None);
    fail_next_sync(dir.path());
    let e = wal.append(record("b"), 1, 1).await.unwrap_err().to_string();
    assert!(e.contains("input/output error"), "{e}");
    let why = wal.failure().expect("the log says it needs a restart");
    assert!(why.contains("input/output error"), "{why}");
    let e = wal.append(record("c"), 1, 1).await.unwrap_err().to_string();
    assert!(e.contains("stopped after an earlier failure") && e.contains("restart"), "{e}");
    wal.close().await;
    // The restart replays what is on disk: the acknowledged "a", and
    // "b", whose frame is whole (its client got an error and retries;
    // the dedupe window keeps the retry from storing it twice).
    let (wal, seen) = reopen(dir.path(), opts);
    assert_eq!(seen, [(1, "a".to_owned()), (2, "b".to_owned())]);
    assert_eq!(wal.failure(), None, "the restart recovered");
    assert_eq!(wal.append(record("d"), 1, 1).await.unwrap().seq, 3, "appends again after the restart");
}

/// A WAL thread that ends unasked (a panic) fails every append, and the
/// log says it needs a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_whose_thread_ended_says_it_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open_empty(dir.path(), unbounded(1 << 20, 0), Arc::default());
    assert_eq!(wal.append(record("a"), 1, 1).await.unwrap().seq, 1);
    panic_next_write(dir.path());
    assert!(matches!(wal.append(record("b"), 1, 1).await, Err(Error::Stopped(_))));
    wait_until("the thread's end noticed", || wal.failure().is_some());
    assert!(wal.failure().unwrap().contains("stopped unexpectedly"), "{:?}", wal.failure());
    assert!(matches!(wal.append(record("c"), 1, 1).await, Err(Error::Stopped(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_cut_back_and_later_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 0);
    let wal = open_empty(dir.path(), opts, Arc::default());
    assert_eq!(wal.append(record("a"), 1, 1).await.unwrap().seq, 1);
    tear_next_write(dir.path(), 10);
    assert_eq!(wal.write_failures.load(Ordering::Relaxed), 0);
    assert!(wal.probe().await && wal.failing().is_none(), "a healthy log is not probed");
    assert!(wal.append(record("b"), 1, 1).await.is_err(), "the torn write fails its group");
    assert_eq!(wal.write_failures.load(Ordering::Relaxed), 1, "counted for the metric");
    assert!(wal.failing().is_some_and(|why| why.contains("no space left")), "{:?}", wal.failing());
    // A probe's write succeeds: the log is taken for healthy again.
    assert!(wal.probe().await);
    assert_eq!(wal.failing(), None);
    assert!(!dir.path().join("probe.tmp").exists(), "the probe's file is removed");
    tear_next_write(dir.path(), 10);
    assert!(wal.append(record("b2"), 1, 1).await.is_err());
    assert!(wal.failing().is_some());
    // The log goes on, with the failed records' seqs unused; a write
    // that succeeds clears the failure too.
    assert_eq!(wal.append(record("c"), 1, 1).await.unwrap().seq, 2);
    assert_eq!(wal.failing(), None);
    assert_eq!(wal.failure(), None, "a write cut back needs no restart");
    assert_eq!(wal.write_failures.load(Ordering::Relaxed), 2);
    wal.close().await;
    let (_, seen) = reopen(dir.path(), opts);
    assert_eq!(
        seen,
        [(1, "a".to_owned()), (2, "c".to_owned())],
        "no torn frame hides an acknowledged record"
    );
}

/// Only files named as the WAL names them are its segments and id
/// files: a stray `5.wal` or a copy beside them is neither read, nor
/// cut, nor written to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_files_named_as_the_wal_names_them_are_read() {
    assert_eq!(super::file_number("00000000000000000005.wal", ".wal"), Some(5));
    assert_eq!(super::file_number("18446744073709551615.ids", ".ids"), Some(u64::MAX));
    for name in
        ["5.wal", "+0000000000000000005.wal", "0000000000000000005 .wal", "00000000000000000005.wal.damaged"]
    {
        assert_eq!(super::file_number(name, ".wal"), None, "{name}");
    }
    assert_eq!(super::file_number("99999999999999999999.wal", ".wal"), None, "past u64");
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 0);
    let wal = open_empty(dir.path(), opts, Arc::default());
    wal.append(record("a"), 1, 1).await.unwrap();
    wal.close().await;
    let strays = ["5.wal", "+0000000000000000009.wal", "7.ids"];
    for name in strays {
        std::fs::write(dir.path().join(name), b"not the WAL's").unwrap();
    }
    let (wal, seen) = reopen(dir.path(), opts);
    assert_eq!(seen, [(1, "a".to_owned())]);
    assert_eq!(wal.append(record("b"), 1, 1).await.unwrap().seq, 2);
    wal.close().await;
    for name in strays {
        assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), b"not the WAL's", "{name}");
    }
    assert_eq!(reopen(dir.path(), opts).1, [(1, "a".to_owned()), (2, "b".to_owned())]);
}

/// Once its records are committed, a segment is gone: only the ids of
/// its events stay (in id files), as long as the dedupe window needs
/// them, and they come back on a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_records_leave_only_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(4096, 40);
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    let a = AccountId::new("111111111111").unwrap();
    let mut e = RecordEncoder::new(&a, 0, None, 0);
    e.accepted("ok-1", b"{\"pan\":\"SECRET-4111\"}");
    e.rejected("bad-1", "bad_enum", "$.detail.e", "the value is not one of A", b"SECRET-bad");
    e.rejected("", "malformed_json", "$", "expected a value", b"SECRET-{");
    assert_eq!(wal.append(e.finish(), 3, 1).await.unwrap().seq, 1);
    let secret_on_disk = || {
        std::fs::read_dir(dir.path()).unwrap().any(|f| {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            bytes.windows(6).any(|w| w == b"SECRET")
                || zstd::stream::decode_all(&bytes[FRAME_HEADER.min(bytes.len())..])
                    .is_ok_and(|d| d.windows(6).any(|w| w == b"SECRET"))
        })
    };
    assert!(secret_on_disk(), "the record is in its segment until committed");
    pending.committed(&[1]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while secret_on_disk() {
        assert!(std::time::Instant::now() < deadline, "the committed record stayed on disk");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // More records, each committed at once: the oldest id files go once
    // newer events alone fill the window of 40.
    for i in 2..=200u64 {
        assert_eq!(wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap().seq, i);
        pending.committed(&[i]);
    }
    wal.close().await;
    let mut remembered = Vec::new();
    let (wal, replayed) = reopen_remembering(dir.path(), opts, |_, r| {
        remembered.push(match r {
            Retired::Accepted(id) | Retired::Rejected(id) => id.to_owned(),
            Retired::RejectedBytes(d) => {
                assert_eq!(*d, crate::dedupe::raw_digest(b"SECRET-{"));
                "digest".to_owned()
            }
        });
    });
    assert_eq!(replayed.len(), 0, "everything was committed");
    assert!(remembered.len() >= 40, "the window is kept: {remembered:?}");
    assert!(remembered.len() < 120, "the oldest ids were deleted: {remembered:?}");
    assert!(!remembered.contains(&"ok-1".to_owned()), "{remembered:?}");
    let newest: Vec<String> = (161..=200).map(|i| format!("id-{i}")).collect();
    assert!(newest.iter().all(|id| remembered.contains(id)), "{remembered:?}");
    assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 201, "seqs go on after the id files");
}

/// The `*.<ext>` files in `dir`, oldest first.
fn files_of(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

/// Flip a byte in the middle of the oldest of the (at least two)
/// `*.<ext>` files in `dir`, as bad blocks would; returns the files,
/// oldest first, and the damaged file's new bytes.
fn damage_the_oldest(dir: &Path, ext: &str) -> (Vec<PathBuf>, Vec<u8>) {
    let files = files_of(dir, ext);
    assert!(files.len() >= 2, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&files[0], &bytes).unwrap();
    (files, bytes)
}

/// Damage to a segment other than the newest (whose torn tail is cut
/// off) stops the start with an error that names the file, where the
/// damage is, and what the operator can do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_stops_the_start_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(4096, 0);
    let wal = open_empty(dir.path(), opts, Arc::default());
    for i in 1..=100u64 {
        wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap();
    }
    wal.close().await;
    let (segs, damaged) = damage_the_oldest(dir.path(), "wal");
    let Err(e) = Wal::open(dir.path(), opts, Arc::new(Pending::default()), None, |_, _| Ok(()), |_, _| {})
    else {
        panic!("a damaged segment did not stop the start");
    };
    let e = e.to_string();
    let name = segs[0].file_name().unwrap().to_str().unwrap();
    for part in [name, "bad frame at offset", "readable frames", "restore the file", "WATERSHED_WAL__SALVAGE"]
    {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
    assert_eq!(std::fs::read(&segs[0]).unwrap(), damaged, "a failed start changes nothing");

    // Salvaged: the records before the damage and every later segment
    // replay once, the damaged file is kept aside, and the log goes on.
    let (wal, seen) = reopen(dir.path(), WalOptions { salvage: true, ..opts });
    let ids: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    assert!(ids.contains(&"id-1") && ids.contains(&"id-100"), "{ids:?}");
    assert!(ids.len() < 100, "the records after the damage are cut off: {ids:?}");
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "a record replayed twice");
    assert_eq!(std::fs::read(segs[0].with_extension("wal.damaged")).unwrap(), damaged);
    assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 101);
    wal.close().await;
    // The segment now ends where the damage was: no salvage needed.
    let (_, again) = reopen(dir.path(), opts);
    assert!(again.iter().all(|(_, id)| id == "next" || ids.contains(&id.as_str())), "{again:?}");
}

/// Damage to the newest segment where its records were durable (their
/// ids reached the id files, which happens only after the segment's
/// fsync) is not a torn write: cutting the segment there would drop
/// acknowledged records as if no client had been told they were stored.
/// The start stops, as for an older segment; with salvage, the records
/// before the damage replay and the file is kept aside. Damage after the
/// last durable record is a torn tail, cut off as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_to_durable_records_of_the_newest_segment_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 1000);
    let wal = open_empty(dir.path(), opts, Arc::default());
    for i in 1..=100u64 {
        wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap();
    }
    wal.close().await;
    let segs = files_of(dir.path(), "wal");
    assert_eq!(segs.len(), 1, "{segs:?}");
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&segs[0], &bytes).unwrap();
    let Err(e) = Wal::open(dir.path(), opts, Arc::new(Pending::default()), None, |_, _| Ok(()), |_, _| {})
    else {
        panic!("damage to durable records was cut off as a torn tail");
    };
    let e = e.to_string();
    for part in ["bad frame at offset", "was durable", "not a write a crash tore", "WATERSHED_WAL__SALVAGE"] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
    assert_eq!(std::fs::read(&segs[0]).unwrap(), bytes, "a failed start changes nothing");

    let (wal, seen) = reopen(dir.path(), WalOptions { salvage: true, ..opts });
    let ids: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    assert!(ids.contains(&"id-1") && ids.len() < 100, "{ids:?}");
    assert_eq!(std::fs::read(segs[0].with_extension("wal.damaged")).unwrap(), bytes);
    wal.close().await;
}

/// A durable record of the newest segment whose frame is whole (its
/// checksum matches) but whose payload does not decode stops the start;
/// with salvage the records before it replay, the file is kept aside and
/// the log goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_durable_record_of_the_newest_segment_can_be_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 1000);
    let wal = open_empty(dir.path(), opts, Arc::default());
    for i in 1..=20u64 {
        wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap();
    }
    wal.close().await;
    let segs = files_of(dir.path(), "wal");
    let bytes = std::fs::read(&segs[0]).unwrap();
    // Frame 10's payload replaced by bytes that are no record, under a
    // checksum that matches them.
    let (mut rebuilt, mut off) = (Vec::new(), 0);
    while let Some((seq, payload, len)) = super::files::parse_frame(&bytes[off..]) {
        let payload = if seq == 10 { &b"not a record"[..] } else { payload };
        super::files::push_frame(&mut rebuilt, seq, payload);
        off += len;
    }
    std::fs::write(&segs[0], &rebuilt).unwrap();
    let Err(e) = Wal::open(dir.path(), opts, Arc::new(Pending::default()), None, |_, _| Ok(()), |_, _| {})
    else {
        panic!("an undecodable record did not stop the start");
    };
    assert!(e.to_string().contains("undecodable record 10"), "{e}");
    let (wal, seen) = reopen(dir.path(), WalOptions { salvage: true, ..opts });
    let seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
    assert_eq!(std::fs::read(segs[0].with_extension("wal.damaged")).unwrap(), rebuilt);
    // The seqs of the records cut off are not given again (lake files are
    // named by seqs, and some of those records may be in the lake).
    assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 21);
    wal.close().await;
}

/// A damaged id file (not the newest, whose torn tail is cut off) does
/// not stop the start: the ids before the damage and those of the other
/// files are remembered, the file is kept aside, and the log goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_id_file_is_set_aside_and_the_log_starts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(4096, 1000);
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    for i in 1..=200u64 {
        assert_eq!(wal.append(record(&format!("id-{i}")), 1, 1).await.unwrap().seq, i);
        pending.committed(&[i]);
    }
    wal.close().await;
    let (ids, _) = damage_the_oldest(dir.path(), "ids");
    let mut remembered = Vec::new();
    // (`reopen_remembering` fails the test if the start fails.)
    let (wal, _) = reopen_remembering(dir.path(), opts, |_, r| {
        if let Retired::Accepted(id) = r {
            remembered.push(id.to_owned());
        }
    });
    assert!(remembered.contains(&"id-1".to_owned()), "the ids before the damage are kept");
    assert!(remembered.contains(&"id-200".to_owned()), "the other files are read");
    assert!(remembered.len() < 200, "the damaged file's tail is not read");
    assert!(!ids[0].exists());
    assert!(ids[0].with_extension("ids.damaged").exists(), "the damaged file is kept aside");
    assert_eq!(wal.append(record("next"), 1, 1).await.unwrap().seq, 201);
}

/// Under steady load the open segment is never wholly committed: it is
/// sealed once its first record is, and retired once its last is. A
/// seal on request puts every acknowledged record in a sealed segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_seal_once_their_first_record_is_committed_and_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 0);
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    let wait_for = |want: &[&str]| {
        let what = format!("segments {want:?}");
        wait_until(&what, || segment_names(dir.path()) == want);
    };
    for i in 1..=3 {
        wal.append(record(&format!("r{i}")), 1, 1).await.unwrap();
    }
    wait_for(&[&seg(1)]);
    assert_eq!(pending.oldest_segment(), 1, "what a restart could replay starts there");
    // The first record is committed, the later ones not: sealed, kept.
    pending.committed(&[1]);
    wait_for(&[&seg(1), &seg(4)]);
    wal.append(record("r4"), 1, 1).await.unwrap();
    pending.committed(&[2, 3]);
    wait_for(&[&seg(4)]);
    // Sealed on request while r4 is pending; gone once it is committed.
    wal.downgrade().seal().await.unwrap();
    wait_for(&[&seg(4), &seg(5)]);
    pending.committed(&[4]);
    wait_for(&[&seg(5)]);
    // Moved just after the deletion is durable.
    wait_until("the oldest replayable record moved", || pending.oldest_segment() == 5);
    drop(wal);
}

/// The name of the segment whose first record is `first`.
fn seg(first: u64) -> String {
    format!("{first:020}.wal")
}

/// The `.wal` files in `dir`, by name.
fn segment_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wal"))
        .collect();
    v.sort();
    v
}

/// Wait (up to 5 s) until `done`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "still waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A WAL's identity is made once and kept; another directory gets
/// another; a damaged one stops the start rather than renaming files.
#[test]
fn the_identity_is_made_once_and_kept() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = identity(a.path()).unwrap();
    assert_eq!(id.len(), 16);
    assert_eq!(identity(a.path()).unwrap(), id, "kept");
    assert_ne!(identity(b.path()).unwrap(), id, "one per directory");
    std::fs::write(a.path().join("log.id"), "zz\n").unwrap();
    let e = identity(a.path()).unwrap_err().to_string();
    assert!(e.contains("log.id") && e.contains("not a WAL identity"), "{e}");
}

/// Segments retire in order, so a record the lake keeps open (a late
/// partition's) holds every newer segment on disk. From half of
/// `max_raw_bytes` the WAL asks for every record before its newest
/// quarter's worth of segments to be committed, on a restart too;
/// once they are, the segments go and it asks for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_half_its_bound_the_wal_asks_for_its_oldest_records() {
    let dir = tempfile::tempdir().unwrap();
    let max = 32 << 10;
    let opts = WalOptions { max_raw_bytes: max, ..unbounded(4096, 0) };
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    let sizes = || -> Vec<(u64, u64)> {
        segment_names(dir.path())
            .iter()
            .map(|n| {
                let first = n.strip_suffix(".wal").unwrap().parse().unwrap();
                (first, std::fs::metadata(dir.path().join(n)).unwrap().len())
            })
            .collect()
    };
    let on_disk = || sizes().iter().map(|s| s.1).sum::<u64>();
    // Record 1 stays pending; every later one is committed at once.
    let mut n = 0u64;
    while on_disk() < max / 2 {
        assert_eq!(pending.commit_before(), 0, "nothing is asked below half the bound");
        n = wal.append(record(&format!("e{n}")), 1, 1).await.unwrap().seq;
        if n > 1 {
            pending.committed(&[n]);
        }
    }
    wait_until("asked for the oldest records", || pending.commit_before() > 0);
    assert_eq!(pending.raw_bytes(), on_disk());
    let asked = |before: u64| {
        let s = sizes();
        let kept: u64 = s.iter().filter(|x| x.0 >= before).map(|x| x.1).sum();
        let older = s.iter().rev().find(|x| x.0 < before).map_or(0, |x| x.1);
        assert!(kept <= max / 4 && kept + older > max / 4, "before {before}: {s:?}");
        assert!(s.iter().any(|x| x.0 == before), "the first record of a segment: {s:?}");
    };
    asked(pending.commit_before());
    wal.close().await;

    // A restart with the records replayed and pending asks at once.
    let (wal, pending) = reopen_pending(dir.path(), opts);
    assert_eq!(pending.raw_bytes(), on_disk());
    let before = pending.commit_before();
    asked(before);
    let records: Vec<u64> = (1..before).collect();
    pending.committed(&records);
    wait_until("the committed segments retired", || pending.raw_bytes() <= max / 4);
    wait_until("nothing asked any more", || pending.commit_before() == 0);
    assert_eq!(pending.raw_bytes(), on_disk());
    assert!(sizes()[0].0 >= before, "{:?}", sizes());
    wal.close().await;
}

/// A retiring segment's ids are tens of megabytes under load: while
/// their write is held up (a slow disk), appends are still written
/// and acknowledged, the segment stays until its ids are durable, and
/// the oldest replayable record moves only once it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_id_file_write_holds_up_no_append() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 1000);
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    assert_eq!(wal.append(record("r1"), 1, 1).await.unwrap().seq, 1);
    hold_ids_writes(dir.path());
    // Committed: sealed, and handed over to be retired.
    pending.committed(&[1]);
    wait_until("segment 1 sealed", || segment_names(dir.path()) == [seg(1), seg(2)]);
    for i in 2..=20u64 {
        let appended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            wal.append(record(&format!("r{i}")), 1, 1),
        )
        .await
        .expect("an append is acknowledged while a retirement waits for the disk");
        assert_eq!(appended.unwrap().seq, i);
    }
    assert_eq!(segment_names(dir.path()), [seg(1), seg(2)], "kept until its ids are durable");
    assert_eq!(pending.oldest_segment(), 1, "its records could still be replayed");
    release_ids_writes(dir.path());
    wait_until("segment 1 retired", || segment_names(dir.path()) == [seg(2)]);
    assert_eq!(pending.oldest_segment(), 2);
    wal.close().await;
    let (_, remembered, replayed) = reopen_accepted_ids(dir.path(), opts);
    // Every acknowledged record's id is in the id files (those still
    // in a segment as well, written ahead), each once.
    let want: Vec<String> = (1..=20).map(|i| format!("r{i}")).collect();
    assert_eq!(remembered, want);
    assert_eq!(replayed.len(), 19, "the uncommitted records are replayed: {replayed:?}");
}

/// After an id file fsync fails nobody knows what reached the disk:
/// no committed segment is deleted until a restart (appends go on),
/// which keeps every id once and then retires them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_id_file_fsync_keeps_the_segments_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 1000);
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    for i in 1..=3u64 {
        assert_eq!(wal.append(record(&format!("r{i}")), 1, 1).await.unwrap().seq, i);
    }
    fail_ids_sync_after(dir.path(), 0);
    pending.committed(&[1, 2, 3]);
    let fault_taken = || !FAULTS.lock().unwrap().iter().any(|(d, _)| d == dir.path());
    wait_until("the id file fsync tried", fault_taken);
    wait_until("the failure noted", || wal.failure().is_some_and(|w| w.contains("id file")));
    assert_eq!(wal.append(record("r4"), 1, 1).await.unwrap().seq, 4, "appends go on");
    pending.committed(&[4]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(segment_names(dir.path()).contains(&seg(1)), "kept: {:?}", segment_names(dir.path()));
    wal.close().await;
    // The restart retires them once committed; every id is kept once.
    let (wal, pending) = reopen_pending(dir.path(), opts);
    assert_eq!(wal.failure(), None, "the restart recovered");
    pending.committed(&[1, 2, 3, 4]);
    wait_until("retired after the restart", || !segment_names(dir.path()).contains(&seg(1)));
    wal.close().await;
    let (wal, remembered, replayed) = reopen_accepted_ids(dir.path(), opts);
    assert_eq!(remembered, ["r1", "r2", "r3", "r4"], "every id once");
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(wal.append(record("r5"), 1, 1).await.unwrap().seq, 5);
}

/// Ids the id files lost (a torn tail) are rebuilt at the start from
/// the segments still on disk, before those can be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_missing_from_the_id_files_are_rebuilt_from_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let opts = unbounded(1 << 20, 1000);
    let wal = open_empty(dir.path(), opts, Arc::default());
    for i in 1..=3u64 {
        wal.append(record(&format!("r{i}")), 1, 1).await.unwrap();
    }
    wal.close().await;
    for p in std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()) {
        if p.extension().is_some_and(|e| e == "ids") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let (wal, pending) = reopen_pending(dir.path(), opts);
    pending.committed(&[1, 2, 3]);
    wait_until("the replayed segment retired", || !segment_names(dir.path()).contains(&seg(1)));
    wal.close().await;
    let (_, remembered, _) = reopen_accepted_ids(dir.path(), opts);
    assert_eq!(remembered, ["r1", "r2", "r3"]);
}

#[test]
fn id_files_round_trip_every_kind_of_identity() {
    let a = AccountId::new("111111111111").unwrap();
    let mut e = RecordEncoder::new(&a, 0, None, 0);
    e.accepted("ok-1", b"{}");
    e.rejected("bad-1", "bad_enum", "$", "", b"{}");
    e.rejected("", "malformed_json", "$", "", b"{");
    let f = e.finish();
    let mut from_record = Vec::new();
    ids_of(&decode_record(&f.payload).unwrap(), &mut from_record);
    assert_eq!(from_record, f.ids, "recovery rebuilds the identities the encoder made");
    let mut got = Vec::new();
    assert!(read_ids(&f.ids, &mut |acct, r| got.push(format!("{acct} {r:?}"))));
    let digest = crate::dedupe::raw_digest(b"{");
    assert_eq!(
        got,
        [
            "111111111111 Accepted(\"ok-1\")".to_owned(),
            "111111111111 Rejected(\"bad-1\")".to_owned(),
            format!("111111111111 {:?}", Retired::RejectedBytes(&digest)),
        ]
    );
    assert!(!read_ids(&f.ids[..f.ids.len() - 1], &mut |_, _| {}), "a cut record does not parse");
}

#[test]
fn records_round_trip() {
    let a = AccountId::new("111111111111").unwrap();
    let mut e = RecordEncoder::new(&a, 42, Some("col-1"), 0);
    e.accepted("id-1", b"{\"x\":1}");
    e.rejected("id-2", "bad_enum", "$.detail.e", "the value is not one of A", b"{}");
    let r = decode_record(&e.finish().payload).unwrap();
    assert_eq!(r.account, a);
    assert_eq!((r.received_at, r.collector.as_deref()), (42, Some("col-1")));
    assert_eq!(r.events[0], WalEvent { rejected: None, id: "id-1".into(), raw: b"{\"x\":1}".to_vec() });
    assert_eq!(r.events[1].rejected.as_ref().unwrap().0, "bad_enum");
}

/// A long string is cut to what a 16-bit length holds at a character
/// boundary, so the id file that holds it still reads as text.
#[test]
fn long_strings_are_cut_at_a_character_boundary() {
    let a = AccountId::new("111111111111").unwrap();
    let path = format!("$.detail.{}", "é".repeat(40_000));
    let mut e = RecordEncoder::new(&a, 0, None, 0);
    e.rejected(&"€".repeat(30_000), "unknown_field", &path, "", b"{}");
    let f = e.finish();
    let r = decode_record(&f.payload).unwrap();
    let (_, got_path, _) = r.events[0].rejected.clone().unwrap();
    assert!(got_path.len() <= usize::from(u16::MAX) && path.starts_with(&got_path), "{}", got_path.len());
    assert!(!got_path.contains('\u{fffd}'), "no character was cut in two");
    assert!(read_ids(&f.ids, &mut |_, _| {}), "the id file reads");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

    /// Whatever a request held, its record decodes to it, and the
    /// identities recovery rebuilds from the record are the ones the
    /// encoder kept for the id file.
    #[test]
    fn any_record_round_trips(
        received_at: i64,
        collector in proptest::option::of("[ -~]{1,40}"),
        events in proptest::collection::vec(
            (
                proptest::option::of(("[a-z_]{1,20}", "\\PC{0,30}", "\\PC{0,60}")),
                "\\PC{0,40}",
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            ),
            0..20,
        ),
    ) {
        let a = AccountId::new("222222222222").unwrap();
        let mut e = RecordEncoder::new(&a, received_at, collector.as_deref(), 0);
        let mut want = Vec::new();
        for (rejected, id, raw) in events {
            // An accepted event always has an id.
            let id = if rejected.is_none() && id.is_empty() { "x".to_owned() } else { id };
            match &rejected {
                None => e.accepted(&id, &raw),
                Some((reason, path, detail)) => e.rejected(&id, reason, path, detail, &raw),
            }
            want.push(WalEvent { rejected, id, raw });
        }
        let f = e.finish();
        let r = decode_record(&f.payload).unwrap();
        proptest::prop_assert_eq!(&r, &WalRecord { account: a, received_at, collector, events: want });
        let mut rebuilt = Vec::new();
        ids_of(&r, &mut rebuilt);
        proptest::prop_assert_eq!(rebuilt, f.ids.clone());
        let reads = read_ids(&f.ids, &mut |_, _| {});
        proptest::prop_assert!(reads, "the id file reads");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_recovery_and_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let opts = unbounded(256, 1000);
    let pending = Arc::new(Pending::default());
    let wal = open_empty(dir.path(), opts, pending.clone());
    let mut handles = Vec::new();
    for i in 0..20 {
        let wal = wal.clone();
        let a = a.clone();
        handles.push(tokio::spawn(async move {
            let mut e = RecordEncoder::new(&a, i, None, 0);
            e.accepted(&format!("id-{i}"), &[b'x'; 100]);
            wal.append(e.finish(), 1, 1).await.unwrap().seq
        }));
    }
    let mut seqs: Vec<u64> = Vec::new();
    for h in handles {
        seqs.push(h.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(pending.len(), 20);
    pending.committed(&(1..=10).collect::<Vec<_>>());
    wal.close().await;
    // A torn write at the tail of the newest segment: part of the frame
    // of a record 21 that a crash stopped before its fsync (so before
    // its ids reached the id files).
    let segs = files_of(dir.path(), "wal");
    let last = segs.last().unwrap();
    let mut torn = Vec::new();
    let mut e = RecordEncoder::new(&a, 0, None, 0);
    e.accepted("id-torn", &[b'x'; 100]);
    super::files::push_frame(&mut torn, 21, &e.finish().payload);
    OpenOptions::new().append(true).open(last).unwrap().write_all(&torn[..torn.len() - 3]).unwrap();
    let mut remembered = Vec::new();
    let (wal, seen) = reopen_remembering(dir.path(), opts, |account, r| {
        remembered.push((account.to_owned(), format!("{r:?}")));
    });
    // Segments whose records were all committed were retired; every
    // uncommitted record but the torn one replays. Every record's id
    // went to the id files once it was fsynced.
    assert!(seen.len() < 19, "committed segments retired: {seen:?}");
    let seen_seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
    assert!((11..=20).all(|s| seen_seqs.contains(&s)), "the uncommitted records replay: {seen_seqs:?}");
    assert!(!seen_seqs.contains(&21), "the torn record is dropped");
    assert_eq!(remembered.len(), 20, "{remembered:?}");
    assert!(remembered.iter().all(|(account, r)| account == "111111111111" && r.starts_with("Accepted")));
    let next = wal.append(RecordEncoder::new(&a, 0, None, 0).finish(), 0, 0).await.unwrap().seq;
    assert_eq!(next, 21, "seqs continue after the torn record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_before_write_hook_fails_its_group_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = AccountId::new("111111111111").unwrap();
    let opts = unbounded(1 << 20, 0);
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    // The hook fails on its second call only.
    let hook: BeforeWrite = Box::new(move || match counted.fetch_add(1, Ordering::SeqCst) {
        1 => Err("cannot store new protection keys: disk full".into()),
        _ => Ok(()),
    });
    let wal = Wal::open(dir.path(), opts, Arc::new(Pending::default()), Some(hook), |_, _| Ok(()), |_, _| {})
        .unwrap();
    let record = |id: &str| {
        let mut e = RecordEncoder::new(&a, 0, None, 0);
        e.accepted(id, b"{}");
        e.finish()
    };
    assert_eq!(wal.append(record("id-1"), 1, 1).await.unwrap().seq, 1);
    let err = wal.append(record("id-2"), 1, 1).await.unwrap_err();
    assert!(
        matches!(&err, Error::BeforeWal(m) if m == "cannot store new protection keys: disk full"),
        "{err:?}"
    );
    assert_eq!(wal.append(record("id-3"), 1, 1).await.unwrap().seq, 2, "the failed record took no seq");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "once per group");
    wal.close().await;
    let (_, seen) = reopen(dir.path(), opts);
    assert_eq!(seen, vec![(1, "id-1".to_string()), (2, "id-3".to_string())]);
}

#[test]
fn buffers_are_kept_within_bounds_and_records_survive_reuse() {
    let pool = BufferPool::default();
    let a = AccountId::new("111111111111").unwrap();
    // A record finished in a reused buffer decodes like a fresh one.
    for round in 0..3 {
        let mut e = RecordEncoder::in_buffer(pool.take(1 << 10), &a, round, None);
        e.accepted(&format!("id-{round}"), b"{\"x\":1}");
        let payload = e.finish_pooled(&pool).payload;
        let r = decode_record(&payload).unwrap();
        assert_eq!((r.received_at, r.events[0].id.as_str()), (round, format!("id-{round}").as_str()));
        pool.give(payload);
    }
    let kept = pool.bufs.lock().unwrap().len();
    assert!((1..=2).contains(&kept), "the record's and the payload's buffers are reused: {kept}");
    // Large buffers are dropped; at most KEEP are kept.
    pool.give(Vec::with_capacity(BufferPool::KEEP_BYTES + 1));
    for _ in 0..2 * BufferPool::KEEP {
        pool.give(Vec::with_capacity(4096));
    }
    let bufs = pool.bufs.lock().unwrap();
    assert_eq!(bufs.len(), BufferPool::KEEP);
    assert!(bufs.iter().all(|b| b.capacity() <= BufferPool::KEEP_BYTES && b.is_empty()));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// A crash may tear the write of a group at any byte (the group was
    /// not acknowledged: its fsync never returned). The log opens,
    /// replays every acknowledged record, cuts the torn tail off, and
    /// takes new records after them (their seqs follow the last whole
    /// one), which a later restart replays.
    #[test]
    fn a_torn_last_write_is_cut_off_whatever_byte_it_stops_at(
        sizes in proptest::collection::vec(1usize..400, 1..12),
        torn_size in 1usize..400,
        cut in 0.0f64..1.0,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let opts = unbounded(1 << 20, 0);
        let record_of = |i: usize, size: usize| {
            let mut e = RecordEncoder::new(&AccountId::new("111111111111").unwrap(), 0, None, 0);
            e.accepted(&format!("e-{i}"), &vec![b'x'; size]);
            e.finish()
        };
        rt.block_on(async {
            let wal = open_empty(dir.path(), opts, Arc::default());
            for (i, &size) in sizes.iter().enumerate() {
                wal.append(record_of(i, size), 1, 1).await.unwrap();
            }
            wal.close().await;
        });
        // The torn write: a prefix of the next record's frame.
        let mut frame = Vec::new();
        super::files::push_frame(&mut frame, sizes.len() as u64 + 1, &record_of(98, torn_size).payload);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let keep = (cut * frame.len() as f64) as usize;
        let path = dir.path().join(seg(1));
        std::io::Write::write_all(&mut OpenOptions::new().append(true).open(&path).unwrap(), &frame[..keep]).unwrap();
        let whole = sizes.len();
        let want: Vec<(u64, String)> = (0..whole).map(|i| (i as u64 + 1, format!("e-{i}"))).collect();
        let (seen, after) = rt.block_on(async {
            let (wal, seen) = reopen(dir.path(), opts);
            let appended = wal.append(record_of(99, 10), 1, 1).await.unwrap().seq;
            wal.close().await;
            (seen, appended)
        });
        proptest::prop_assert_eq!(&seen, &want);
        proptest::prop_assert_eq!(after, whole as u64 + 1, "the next record's seq follows the last whole one");
        let (wal, again) = reopen(dir.path(), opts);
        drop(wal);
        let mut want = want;
        want.push((whole as u64 + 1, "e-99".to_owned()));
        proptest::prop_assert_eq!(again, want, "the record taken after the tear survives a restart");
    }
}
