//! The hub across clean restarts, as a property: whatever the requests
//! (new events, retries of earlier ones, repeats within a request, the
//! same events in requests at once), the
//! commits of the lake (which retire WAL segments and leave only their
//! events' ids, in id files) and the restarts in between, each event is
//! answered accepted the first time and a duplicate every time after,
//! and the lake holds every event once.

use std::collections::HashSet;
use std::path::Path;

use proptest::prelude::*;
use watershed_event::AccountId;
use watershed_hub::body::Framing;
use watershed_hub::requests::RequestMemory;
use watershed_hub::{Hub, HubConfig, Overrides};

/// This crate's directory (see `tests/ingest.rs`).
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

/// Small WAL segments, so commits retire them and their ids move to id
/// files that a restart reads back.
fn config(data_dir: &Path) -> HubConfig {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        schemas: Some(manifest_dir().join("../../schemas")),
        data_dir: Some(data_dir.to_owned()),
    };
    let env = vec![("WATERSHED_WAL__SEGMENT_BYTES".to_owned(), "4096".to_owned())];
    HubConfig::load(None, env, &overrides).expect("the settings load")
}

fn login(id: &str) -> String {
    format!(
        r#"{{"version":"0","id":"{id}","detail-type":"UserLogin","source":"com.example.identity","time":"2024-05-01T12:00:01Z","region":"eu-west-1","resources":[],"detail":{{"user_id":"usr_{id}","username":"ada@example.com","ip_address":"203.0.113.9","user_agent":"curl/8","outcome":"SUCCESS","mfa":"WEBAUTHN","session_id":"sess_0ba92b48381dde4a","logged_in_at":"2024-05-01T12:00:01Z","attempt":1,"geo":{{"country":"GB","city":"London"}}}}}}"#
    )
}

/// Every `event_id` in the `logins` table.
fn lake_ids(data_dir: &Path) -> Vec<String> {
    use arrow::array::{Array, AsArray};
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&data_dir.join("lake/logins"), &mut files);
    let mut ids = Vec::new();
    for f in files {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&f).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        for b in reader {
            let b = b.unwrap();
            let col = b.column_by_name("event_id").unwrap().as_string::<i32>();
            ids.extend((0..col.len()).map(|i| col.value(i).to_owned()));
        }
    }
    ids
}

#[derive(Debug, Clone)]
enum Step {
    /// One request of these events (ids from a small pool: retries and
    /// repeats).
    Post(Vec<usize>),
    /// Requests of these events at once (the same event in two of them:
    /// one stores it, the other answers it a duplicate once it is
    /// durable).
    Together(Vec<Vec<usize>>),
    /// Commit every open partition (retiring WAL segments).
    Flush,
    /// Stop cleanly and start again.
    Restart,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..Default::default() })]

    #[test]
    fn each_event_is_accepted_once_and_stored_once_across_restarts(
        steps in proptest::collection::vec(
            prop_oneof![
                5 => proptest::collection::vec(0usize..40, 1..30).prop_map(Step::Post),
                2 => proptest::collection::vec(proptest::collection::vec(0usize..40, 1..20), 2..4)
                    .prop_map(Step::Together),
                2 => Just(Step::Flush),
                2 => Just(Step::Restart),
            ],
            1..16,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let account = AccountId::new("123456789012").unwrap();
        let outcome: Result<(), TestCaseError> = rt.block_on(async {
            let mut hub = Hub::start(config(dir.path())).await.unwrap();
            let mut stored: HashSet<usize> = HashSet::new();
            for step in &steps {
                match step {
                    Step::Post(ids) => {
                        let body: String = ids.iter().map(|&i| login(&format!("e-{i}")) + "\n").collect();
                        let held = RequestMemory::new(1 << 30, 1 << 30).hold(&account, body.len()).unwrap();
                        let r = hub
                            .ingest(&account, None, None, Framing::Lines, bytes::Bytes::from(body), held)
                            .await;
                        prop_assert!(r.is_ok(), "{:?}", r.err());
                        let r = r.unwrap();
                        prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                        let mut new = 0;
                        for &i in ids {
                            if stored.insert(i) {
                                new += 1;
                            }
                        }
                        prop_assert_eq!((r.accepted, r.duplicates), (new, ids.len() - new));
                    }
                    Step::Together(requests) => {
                        let posts = requests.iter().map(|ids| {
                            let body: String = ids.iter().map(|&i| login(&format!("e-{i}")) + "\n").collect();
                            let held = RequestMemory::new(1 << 30, 1 << 30).hold(&account, body.len()).unwrap();
                            hub.ingest(&account, None, None, Framing::Lines, bytes::Bytes::from(body), held)
                        });
                        let answers = futures::future::join_all(posts).await;
                        let (mut accepted, mut duplicates) = (0, 0);
                        for r in answers {
                            prop_assert!(r.is_ok(), "{:?}", r.err());
                            let r = r.unwrap();
                            prop_assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                            accepted += r.accepted;
                            duplicates += r.duplicates;
                        }
                        let all: Vec<usize> = requests.iter().flatten().copied().collect();
                        let new = all.iter().filter(|&&i| stored.insert(i)).count();
                        prop_assert_eq!((accepted, duplicates), (new, all.len() - new));
                    }
                    Step::Flush => hub.flush().await.unwrap(),
                    Step::Restart => {
                        hub.shutdown().await.unwrap();
                        hub = Hub::start(config(dir.path())).await.unwrap();
                    }
                }
            }
            hub.shutdown().await.unwrap();
            let mut ids = lake_ids(dir.path());
            ids.sort();
            let mut want: Vec<String> = stored.iter().map(|i| format!("e-{i}")).collect();
            want.sort();
            prop_assert_eq!(ids, want, "every event once in the lake");
            Ok(())
        });
        outcome?;
    }
}
