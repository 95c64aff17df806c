//! Crash safety: `kill -9` the hub under sustained load, restart it, and
//! check that every acknowledged event is in the lake exactly once, and
//! that a client retry after the restart stores nothing twice, with
//! compaction merging files all along.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use watershed_tests::{add_account, ids_by_table, parquet_files, post, Server};

const ACCOUNT: &str = "123456789012";

fn event(id: &str, n: usize) -> serde_json::Value {
    json!({
        "id": id, "source": "com.example.identity", "detail-type": "UserLogin",
        "time": format!("2024-05-01T{:02}:00:00Z", n % 24),
        "detail": {"user_id": format!("u-{}", n % 97), "username": "ada", "ip_address": "203.0.113.1",
                   "user_agent": "curl", "outcome": "SUCCESS", "logged_in_at": "2024-05-01T00:00:00Z", "attempt": n}
    })
}

#[test]
fn kill_9_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, ACCOUNT);
    let env = [
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "1"),
        ("WATERSHED_LAKE__ROLL_BYTES", "100000"),
        ("WATERSHED_WAL__SEGMENT_BYTES", "65536"),
        ("WATERSHED_WAL__DEDUPE_WINDOW", "5000"),
        // Compaction merges the (closed) partitions' files while the load
        // goes on and after the restart: a crash mid-merge must not
        // duplicate or lose rows either.
        ("WATERSHED_LAKE__COMPACT_EVERY_SECS", "1"),
    ];
    let (server, acked) = crash_under_load_and_restart(&data, &token, &env, 1000);
    // Compaction has run (during the load, or now) before the check.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !parquet_files(&data.join("lake")).iter().any(|p| is_merged(p)) {
        assert!(std::time::Instant::now() < deadline, "no merged file after 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server.stop().success());

    let counts = exactly_once(&data, &acked);
    let merged = parquet_files(&data.join("lake")).iter().filter(|p| is_merged(p)).count();
    eprintln!(
        "{} acknowledged events, {} rows, all present exactly once; {merged} merged files",
        acked.len(),
        counts.len()
    );
}

/// The same with the lake in S3 (moto; `WATERSHED_TEST_SKIP_MOTO=1`
/// skips it loudly), compaction merging in the bucket all along: the
/// replay's files are put create-only there, and no row is lost or
/// doubled.
#[test]
fn kill_9_under_load_with_the_lake_in_s3_loses_and_duplicates_nothing() {
    let Some(moto) = watershed_tests::Moto::start() else { return };
    moto.create_bucket("crash-lake");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, ACCOUNT);
    let mut env: Vec<(&str, &str)> = watershed_tests::Moto::aws_env().to_vec();
    env.extend([
        ("WATERSHED_LAKE__URL", "s3://crash-lake/lake"),
        ("WATERSHED_LAKE__S3_ENDPOINT", moto.url.as_str()),
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "1"),
        ("WATERSHED_LAKE__ROLL_BYTES", "100000"),
        ("WATERSHED_WAL__SEGMENT_BYTES", "65536"),
        ("WATERSHED_WAL__DEDUPE_WINDOW", "5000"),
        // Merges in the bucket during the load, cut short by the crash
        // perhaps, and settled after the restart.
        ("WATERSHED_LAKE__COMPACT_EVERY_SECS", "1"),
    ]);
    let (server, acked) = crash_under_load_and_restart(&data, &token, &env, 500);
    assert!(server.stop().success());
    assert!(!data.join("lake").exists(), "the lake is the bucket");
    let mirror = dir.path().join("mirror");
    moto.mirror("crash-lake", "lake", &mirror);
    let counts = exactly_once_in(&mirror, &acked);
    let merged = parquet_files(&mirror).iter().filter(|p| is_merged(p)).count();
    eprintln!("{} acknowledged events, all in the bucket exactly once; {merged} merged files", counts.len());
}

/// A crash loop: the hub is killed under load three times, and between
/// those killed again once it has begun to replay its WAL (at once, or a
/// little later: the replay of records left by a crash is itself cut
/// short). Files stay open longer here (a 30 s roll age), so each
/// start has records to replay. At the end every acknowledged event is in
/// the lake exactly once.
#[test]
fn a_crash_loop_even_during_the_replay_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, ACCOUNT);
    let env = [
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "30"),
        ("WATERSHED_LAKE__ROLL_BYTES", "300000"),
        ("WATERSHED_WAL__SEGMENT_BYTES", "65536"),
        ("WATERSHED_WAL__DEDUPE_WINDOW", "50000"),
        ("WATERSHED_LAKE__COMPACT_EVERY_SECS", "1"),
    ];
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let last_batch: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    for round in 0..3u64 {
        let server = Server::start(&data, &env);
        let load = Load::start(&server.url, &token, &format!("r{round}-"), &acked, &last_batch);
        std::thread::sleep(Duration::from_millis(1200 + 400 * round));
        server.kill9();
        load.finish();
        // Started again and killed once its replay has begun (at once,
        // then a little later each round).
        let schemas = watershed_tests::repo().join("schemas");
        let mut hub = watershed_tests::serve_command(&data, &schemas, &env).spawn().unwrap();
        let stderr = std::io::BufReader::new(hub.stderr.take().unwrap());
        let replaying = std::io::BufRead::lines(stderr)
            .map_while(Result::ok)
            .any(|l| l.contains("replaying the write-ahead log"));
        assert!(replaying, "the hub stopped before its replay");
        std::thread::sleep(Duration::from_millis(25 * round));
        hub.kill().unwrap();
        hub.wait().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 3000, "the load ran: {} acknowledged", acked.len());
    let server = Server::start(&data, &env);
    let retry = last_batch.lock().unwrap().clone().unwrap();
    let (status, resp, _) = post(&server.url, Some(&token), retry, &[]);
    assert_eq!((status, resp["duplicates"].as_u64()), (200, Some(100)), "{resp}");
    assert!(server.stop().success());
    let counts = exactly_once(&data, &acked);
    eprintln!("{} acknowledged events over three crashes, all present exactly once", counts.len());
}

/// Start the hub, `kill -9` it after 2.5 s of load, start it again, and
/// send the last acknowledged batch again: every event of it is a
/// duplicate. The restarted hub, and the acknowledged ids (at least
/// `at_least` of them).
fn crash_under_load_and_restart(
    data: &std::path::Path,
    token: &str,
    env: &[(&str, &str)],
    at_least: usize,
) -> (Server, Vec<String>) {
    let server = Server::start(data, env);
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let last_batch: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let load = Load::start(&server.url, token, "", &acked, &last_batch);
    std::thread::sleep(Duration::from_millis(2500));
    server.kill9();
    load.finish();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= at_least, "the load ran: {} acknowledged", acked.len());
    // Restart: the WAL replays what no committed file covers.
    let server = Server::start(data, env);
    let retry = last_batch.lock().unwrap().clone().unwrap();
    let (status, resp, _) = post(&server.url, Some(token), retry, &[]);
    assert_eq!(
        (status, resp["accepted"].as_u64(), resp["duplicates"].as_u64()),
        (200, Some(0), Some(100)),
        "{resp}"
    );
    (server, acked)
}

fn is_merged(p: &std::path::Path) -> bool {
    p.to_string_lossy().ends_with("-merged.parquet")
}

/// Clients posting batches of 100 login events until stopped (or until
/// the hub dies under them), recording the ids of acknowledged events and
/// the last acknowledged body.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        url: &str,
        token: &str,
        prefix: &str,
        acked: &Arc<Mutex<Vec<String>>>,
        last_batch: &Arc<Mutex<Option<Vec<u8>>>>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for c in 0..4 {
            let (url, token, acked, stop, last) =
                (url.to_owned(), token.to_owned(), acked.clone(), stop.clone(), last_batch.clone());
            let prefix = prefix.to_owned();
            clients.push(std::thread::spawn(move || {
                let mut b = 0;
                while !stop.load(Ordering::Relaxed) && b < 10_000 {
                    let ids: Vec<String> = (0..100).map(|n| format!("{prefix}c{c}-b{b}-e{n}")).collect();
                    let body: String =
                        ids.iter().enumerate().map(|(n, id)| format!("{}\n", event(id, n))).collect();
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap();
                    let r =
                        client.post(format!("{url}/v1/events")).bearer_auth(&token).body(body.clone()).send();
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let v: serde_json::Value = r.json().unwrap();
                            assert_eq!(v["accepted"], 100, "{v}");
                            acked.lock().unwrap().extend(ids);
                            *last.lock().unwrap() = Some(body.into_bytes());
                        }
                        // The hub died mid-request: not acknowledged.
                        _ => break,
                    }
                    b += 1;
                }
            }));
        }
        Self { stop, clients }
    }

    /// Stop the clients (the hub is gone, or going) and wait for them.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.join().unwrap();
        }
    }
}

/// Every `acked` id is in the lake's `logins` table exactly once, and
/// there are no dead letters; the rows' ids and how often each came.
fn exactly_once(data: &std::path::Path, acked: &[String]) -> HashMap<String, usize> {
    exactly_once_in(&data.join("lake"), acked)
}

/// [`exactly_once`] of the lake in `lake`.
fn exactly_once_in(lake: &std::path::Path, acked: &[String]) -> HashMap<String, usize> {
    let ids = ids_by_table(lake);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (account, id) in &ids["logins"] {
        assert_eq!(account, ACCOUNT);
        *counts.entry(id.clone()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated in the lake: {dups:?}");
    let missing: Vec<_> = acked.iter().filter(|id| !counts.contains_key(id.as_str())).take(5).collect();
    assert!(missing.is_empty(), "acknowledged but missing: {missing:?} (of {})", acked.len());
    assert!(ids.get("_dead_letters").is_none_or(Vec::is_empty), "no rejects expected");
    counts
}
