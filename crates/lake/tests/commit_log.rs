//! The commit log as a property: whatever the order of intents, puts,
//! commit lines, withdrawn intents, compactions of the log, torn last
//! lines, damage to any byte of the log and restarts, a restart counts a
//! record committed exactly when the file holding it is in the lake (and
//! the record is one a restart could still replay); an intent whose file
//! never landed is dropped.

use std::io::Write as _;
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use proptest::prelude::*;
use watershed_event::AccountId;
use watershed_lake::{encode, CommitLog, EncodeOptions, Lake, LakePath, PartitionKey};

const SOURCE: &str = "wal-00000000000000aa";
const HOUR: i64 = 3_600_000_000;

#[derive(Debug, Clone)]
enum Step {
    /// Log the intent to put file `f` (the writer's, before its put).
    Intent(usize),
    /// Put file `f` (after its intent is durable).
    Put(usize),
    /// Its commit line (after the put).
    Commit(usize),
    /// Withdraw the intent of a file not put.
    Abandon(usize),
    /// Compact the running log, keeping what covers records from the
    /// oldest on (which moves on by this much).
    Compact(u64),
    /// A crash tears the log's last line, then the hub starts again.
    TornRestart(usize),
    /// The log's byte at this position (modulo its size) is changed by
    /// adding this to it, then the hub starts again.
    DamageRestart(usize, u8),
    /// A restart, the oldest record moved on by this much.
    Restart(u64),
}

/// What happened to a file.
#[derive(Debug, Default, Clone, Copy)]
struct File {
    intended: bool,
    put: bool,
    /// Its writer is gone (a restart came between intent and put).
    dead: bool,
}

/// File `f`: partition `f % 3`, records `3f+1 ..= 3f+3`.
fn file(f: usize) -> (PartitionKey, LakePath, Vec<u64>) {
    let key =
        PartitionKey::at("t", &AccountId::new("111111111111").unwrap(), i64::try_from(f % 3).unwrap() * HOUR);
    let first = 3 * f as u64 + 1;
    let records = vec![first, first + 1, first + 2];
    let path = key.file(SOURCE, first, first + 2);
    (key, path, records)
}

/// File `f` as the lake writer writes it: its footer names its records.
fn parquet(f: usize) -> Bytes {
    let (_, path, records) = file(f);
    let schema = Arc::new(Schema::new(vec![Field::new("record", DataType::UInt64, false)]));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(UInt64Array::from(records.clone()))]).unwrap();
    let meta = vec![
        ("watershed.source".to_owned(), SOURCE.to_owned()),
        ("watershed.records".to_owned(), records.iter().map(u64::to_string).collect::<Vec<_>>().join(",")),
    ];
    Bytes::from(encode(&path.0, &schema, &[batch], meta, EncodeOptions::default()).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..Default::default() })]

    #[test]
    fn a_restart_counts_committed_exactly_the_records_in_the_lake(
        steps in proptest::collection::vec(
            prop_oneof![
                4 => (0usize..8).prop_map(Step::Intent),
                4 => (0usize..8).prop_map(Step::Put),
                3 => (0usize..8).prop_map(Step::Commit),
                1 => (0usize..8).prop_map(Step::Abandon),
                1 => (0u64..6).prop_map(Step::Compact),
                1 => (1usize..40).prop_map(Step::TornRestart),
                1 => (any::<usize>(), 1u8..=255).prop_map(|(at, by)| Step::DamageRestart(at, by)),
                1 => (0u64..6).prop_map(Step::Restart),
            ],
            1..40,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let lake = Lake::local(&dir.path().join("lake"), 2).unwrap();
            let log_path = dir.path().join("commits.log");
            let mut oldest = 0u64;
            let (mut log, _) = CommitLog::open(&log_path, &lake, SOURCE, oldest).await.unwrap();
            let mut files = [File::default(); 8];
            for step in &steps {
                let restart = match *step {
                    Step::Intent(f) if !files[f].intended => {
                        let (key, path, records) = file(f);
                        log.intent(&path, &key.dir(), &records).unwrap().wait().unwrap();
                        files[f].intended = true;
                        None
                    }
                    Step::Put(f) if files[f].intended && !files[f].put && !files[f].dead => {
                        let (_, path, _) = file(f);
                        lake.put_create(&path, parquet(f)).await.unwrap();
                        files[f].put = true;
                        None
                    }
                    Step::Commit(f) if files[f].put && !files[f].dead => {
                        log.commit(&file(f).1).unwrap();
                        None
                    }
                    Step::Abandon(f) if files[f].intended && !files[f].put && !files[f].dead => {
                        log.abandon(&file(f).1).unwrap();
                        files[f].dead = true;
                        None
                    }
                    Step::Compact(by) => {
                        oldest += by;
                        log.compact(oldest).unwrap();
                        None
                    }
                    Step::TornRestart(keep) => {
                        let torn = br#"{"op":"intent","path":"t/account=111111111111/date=1970-01-01/hour=00/x.parquet","partition":"t","records":[1]}"#;
                        std::fs::OpenOptions::new()
                            .append(true)
                            .open(&log_path)
                            .unwrap()
                            .write_all(&torn[..keep.min(torn.len() - 1)])
                            .unwrap();
                        Some(0)
                    }
                    Step::DamageRestart(at, by) => {
                        let mut bytes = std::fs::read(&log_path).unwrap();
                        if !bytes.is_empty() {
                            let at = at % bytes.len();
                            bytes[at] = bytes[at].wrapping_add(by);
                            std::fs::write(&log_path, bytes).unwrap();
                        }
                        Some(0)
                    }
                    Step::Restart(by) => Some(by),
                    _ => None,
                };
                let Some(by) = restart else { continue };
                drop(log);
                oldest += by;
                let (reopened, committed) = CommitLog::open(&log_path, &lake, SOURCE, oldest).await.unwrap();
                log = reopened;
                for (f, state) in files.iter_mut().enumerate() {
                    let (key, path, records) = file(f);
                    let in_lake = state.put;
                    if records.iter().any(|&r| r >= oldest) {
                        for &r in &records {
                            prop_assert_eq!(
                                committed.contains(&key.dir(), r),
                                in_lake,
                                "record {} of {} ({:?}), oldest {}", r, path.0, state, oldest
                            );
                        }
                    }
                    // A writer does not outlive a restart.
                    if state.intended && !state.put {
                        state.dead = true;
                    }
                    prop_assert!(!log.is_pending(&path.0), "{} pending after a restart", path.0);
                }
            }
            Ok(())
        })?;
    }
}
