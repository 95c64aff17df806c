//! Helpers for end-to-end tests: run the real `watershed` binary on a
//! loopback port, post to it, and read the lake back with the parquet
//! crate and (independently) with DuckDB from the test virtualenv.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};

/// The `watershed` binary built beside this test (`cargo build -p watershed`).
#[must_use]
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("watershed");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p watershed` first (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// The repository root.
#[must_use]
pub fn repo() -> PathBuf {
    // Cargo sets the variable when it runs a test; the compile-time value
    // can name another checkout when a shared target directory holds a
    // build made there.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().expect("repo root").to_owned()
}

/// Run `watershed ARGS` to completion.
#[must_use]
pub fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).current_dir(repo()).output().expect("watershed runs")
}

/// Run `watershed ARGS` to completion with `input` on its stdin.
#[must_use]
pub fn run_with_stdin(args: &[&str], input: &str) -> std::process::Output {
    use std::process::Stdio;
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watershed runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("piped"), input.as_bytes())
        .expect("stdin written");
    child.wait_with_output().expect("watershed runs")
}

/// `watershed serve` on a free loopback port with `data`, `schemas` and
/// extra `WATERSHED_*` environment settings, from the repository's root;
/// stdout discarded, stderr piped. Not started.
#[must_use]
pub fn serve_command(data: &Path, schemas: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--schemas"])
        .arg(schemas)
        .arg("--data-dir")
        .arg(data)
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A running hub process.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    /// The lines it has written to stderr (its log), as they come.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Start `watershed serve` on a free loopback port with `data` and
    /// extra `WATERSHED_*` environment settings.
    #[must_use]
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with_schemas(data, &repo().join("schemas"), env)
    }

    /// [`Server::start`] with the schema directory `schemas`.
    #[must_use]
    pub fn start_with_schemas(data: &Path, schemas: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = serve_command(data, schemas, env);
        cmd.env("WATERSHED_LOG", "warn");
        let mut child = cmd.spawn().expect("watershed serve starts");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("watershed: listening on ") {
                    let _ = tx.send(addr.to_owned());
                } else {
                    eprintln!("[hub] {line}");
                    lines.lock().expect("log lock").push(line);
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).expect("the hub reports its address");
        Self { child, url, data: data.to_owned(), log }
    }

    /// Wait up to 10 s for a line of the hub's log that holds every one
    /// of `parts`, and return it.
    #[must_use]
    pub fn wait_for_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .log
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            let log = self.log.lock().expect("log lock").join("\n");
            assert!(Instant::now() < deadline, "no line of the hub's log holds {parts:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                if !s.success() {
                    eprintln!("[hub] exited with {s:?}");
                }
                return s;
            }
            assert!(Instant::now() < deadline, "the hub did not stop within 40 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, now.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

/// A test that fails while its hub runs leaves no hub behind.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An EventBridge payment event (`payments.payment_authorized`): the
/// customer id is tokenized, the card's pan masked, its holder encrypted
/// and its expiry redacted.
#[must_use]
pub fn payment(
    id: &str,
    account: Option<&str>,
    customer: &str,
    pan: &str,
    holder: &str,
) -> serde_json::Value {
    let mut e = serde_json::json!({
        "version": "0", "id": id, "detail-type": "PaymentAuthorized", "source": "com.example.payments",
        "time": "2024-05-01T12:34:56Z", "region": "eu-west-1", "resources": ["arn:aws:payments:eu-west-1:1:p/1"],
        "detail": {
            "payment_id": format!("pay-{id}"), "customer_id": customer, "amount": "19.99", "currency": "EUR",
            "card": {"pan": pan, "holder_name": holder, "brand": "VISA", "expiry": "12/29"},
            "merchant": {"id": "m-1", "name": "Shop", "mcc": 5411, "country": "DE"},
            "authorized_at": "2024-05-01T12:34:56Z", "risk_score": 0.12, "three_ds": true
        }
    });
    if let Some(a) = account {
        e["account"] = serde_json::json!(a);
    }
    e
}

/// A CloudEvents login event (`identity.user_login`).
#[must_use]
pub fn login(id: &str, user: &str) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": id, "type": "UserLogin", "source": "com.example.identity",
        "time": "2024-05-01T13:00:00Z",
        "data": {"user_id": user, "username": format!("{user}@example.com"), "ip_address": "203.0.113.9",
                 "user_agent": "curl", "outcome": "SUCCESS", "logged_in_at": "2024-05-01T13:00:00Z", "attempt": 1,
                 "session_id": "sess-secret"}
    })
}

/// Events as an NDJSON body.
#[must_use]
pub fn ndjson(events: &[serde_json::Value]) -> Vec<u8> {
    events.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes()
}

/// Create an account and return its token (the last word printed).
#[must_use]
pub fn add_account(data: &Path, account: &str) -> String {
    let out = run(&["accounts", "add", account, "--data-dir", data.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").split_whitespace().last().expect("a token").to_owned()
}

/// POST a body; returns (status, json-or-null, headers).
#[must_use]
pub fn post(
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let client =
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    let mut req = client.post(format!("{url}/v1/events")).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let json = r.json().unwrap_or(serde_json::Value::Null);
    (status, json, headers)
}

/// Every Parquet file under `dir`, at any depth, sorted.
#[must_use]
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every batch of every Parquet file under `lake/<table>`.
#[must_use]
pub fn read_table(lake: &Path, table: &str) -> Vec<(PathBuf, RecordBatch)> {
    let mut out = Vec::new();
    for p in parquet_files(&lake.join(table)) {
        let f = std::fs::File::open(&p).expect("open parquet");
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .expect("parquet footer")
            .build()
            .expect("reader");
        for b in r {
            out.push((p.clone(), b.expect("batch")));
        }
    }
    out
}

/// A string column's values (nulls as None).
#[must_use]
pub fn strings(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let a = b.column_by_name(col).unwrap_or_else(|| panic!("column {col}"));
    let a = a.as_string::<i32>();
    (0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_owned())).collect()
}

/// A nested string: `detail.<path...>` through structs.
#[must_use]
pub fn detail_strings(b: &RecordBatch, path: &[&str]) -> Vec<Option<String>> {
    let mut a = b.column_by_name("detail").expect("detail").clone();
    for p in path {
        a = a.as_struct().column_by_name(p).unwrap_or_else(|| panic!("detail field {p}")).clone();
    }
    let s = a.as_string::<i32>();
    (0..s.len()).map(|i| s.is_valid(i).then(|| s.value(i).to_owned())).collect()
}

/// Event ids per table (`account` from the path).
#[must_use]
pub fn ids_by_table(lake: &Path) -> HashMap<String, Vec<(String, String)>> {
    let mut out = HashMap::new();
    for t in std::fs::read_dir(lake).into_iter().flatten().flatten() {
        let table = t.file_name().to_string_lossy().into_owned();
        let mut ids = Vec::new();
        for (path, b) in read_table(lake, &table) {
            let account = path
                .to_string_lossy()
                .split('/')
                .find_map(|s| s.strip_prefix("account=").map(str::to_owned))
                .expect("account= in path");
            for id in strings(&b, "event_id") {
                ids.push((account.clone(), id.unwrap_or_default()));
            }
        }
        out.insert(table, ids);
    }
    out
}

/// The Python of the test virtualenv, or `None` after printing loudly why
/// the DuckDB/pyarrow checks are skipped. Skipping needs
/// `WATERSHED_TEST_SKIP_PYTHON=1`; otherwise a missing venv fails the test.
#[must_use]
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("WATERSHED_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    if std::env::var("WATERSHED_TEST_SKIP_PYTHON").as_deref() == Ok("1") {
        eprintln!("SKIPPED: DuckDB/pyarrow checks (WATERSHED_TEST_SKIP_PYTHON=1)");
        return None;
    }
    panic!("WATERSHED_TEST_PYTHON is not set: run the tests through tests/run.sh, which makes the DuckDB/pyarrow virtualenv, or set WATERSHED_TEST_SKIP_PYTHON=1 to skip those checks loudly");
}

/// Run a DuckDB SQL query over the lake; returns rows as JSON arrays.
#[must_use]
pub fn duckdb(python: &Path, lake: &Path, sql: &str) -> Vec<serde_json::Value> {
    let script = repo().join("tests/lake_query.py");
    let out = Command::new(python).arg(script).arg(lake).arg(sql).output().expect("python runs");
    assert!(out.status.success(), "duckdb query failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("json rows")
}

/// A moto server (AWS APIs: KMS here) on a free loopback port, started
/// from the test virtualenv and stopped on drop.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    python: PathBuf,
}

impl Moto {
    /// Start moto, or `None` (said loudly) when `WATERSHED_TEST_SKIP_MOTO=1`.
    /// Without the virtualenv and without that variable, the test fails.
    #[must_use]
    pub fn start() -> Option<Self> {
        let python = match std::env::var_os("WATERSHED_TEST_PYTHON") {
            Some(p) => PathBuf::from(p),
            None if std::env::var("WATERSHED_TEST_SKIP_MOTO").as_deref() == Ok("1") => {
                eprintln!("SKIPPED: tests against moto (WATERSHED_TEST_SKIP_MOTO=1)");
                return None;
            }
            None => panic!(
                "WATERSHED_TEST_PYTHON is not set: run the tests through tests/run.sh, which makes the \
                 virtualenv with moto, or set WATERSHED_TEST_SKIP_MOTO=1 to skip the tests against moto loudly"
            ),
        };
        // Port 0: the server binds a port of the system's choosing and
        // prints it, so two servers started at once never share one.
        let mut child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto with {}: {e}", python.display()));
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The address line, then the request log, read to the end so
            // the server never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                const AT: &str = "Running on http://127.0.0.1:";
                if let Some(at) = line.find(AT) {
                    let port: String =
                        line[at + AT.len()..].chars().take_while(char::is_ascii_digit).collect();
                    let _ = tx.send(format!("http://127.0.0.1:{port}"));
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("moto did not report its address within 60 s")
        });
        let moto = Self { child, url, python };
        Some(moto)
    }

    /// A new symmetric KMS key's id (created with boto3, moto's client).
    #[must_use]
    pub fn create_key(&self) -> String {
        let script = format!(
            "import boto3; k = boto3.client('kms', endpoint_url='{}', region_name='{REGION}', \
             aws_access_key_id='testing', aws_secret_access_key='testing'); \
             print(k.create_key(Description='watershed test')['KeyMetadata']['KeyId'])",
            self.url
        );
        let out = Command::new(&self.python).args(["-c", &script]).output().expect("python runs");
        assert!(out.status.success(), "CreateKey: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    }

    /// Create the S3 bucket `name` (with boto3, moto's client).
    pub fn create_bucket(&self, name: &str) {
        self.boto3(&format!("s3.create_bucket(Bucket='{name}')"), "CreateBucket");
    }

    /// Copy every object of `bucket` under `prefix` into `dir`, keys as
    /// paths below it (with boto3): the lake in S3 as a local directory,
    /// for the checks that read one.
    pub fn mirror(&self, bucket: &str, prefix: &str, dir: &Path) {
        let script = format!(
            "import os\n\
             for page in s3.get_paginator('list_objects_v2').paginate(Bucket='{bucket}', Prefix='{prefix}/'):\n\
             \x20   for o in page.get('Contents', []):\n\
             \x20       path = os.path.join({dir:?}, o['Key'][len('{prefix}/'):])\n\
             \x20       os.makedirs(os.path.dirname(path), exist_ok=True)\n\
             \x20       s3.download_file('{bucket}', o['Key'], path)"
        );
        self.boto3(&script, "mirroring the bucket");
    }

    fn boto3(&self, code: &str, what: &str) {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', region_name='{REGION}', \
             aws_access_key_id='testing', aws_secret_access_key='testing')\n{code}",
            self.url
        );
        let out = Command::new(&self.python).args(["-c", &script]).output().expect("python runs");
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The AWS settings that point the SDK at this server with test
    /// credentials (and no instance metadata lookups).
    #[must_use]
    pub fn aws_env() -> [(&'static str, &'static str); 4] {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_REGION", REGION),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The region the moto tests use.
pub const REGION: &str = "us-east-1";

/// A loopback port that was free a moment ago.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// PEM files made for a test: a certificate authority, and a server
/// certificate it signed for `127.0.0.1` and `localhost` with its key.
pub struct TestCerts {
    /// The certificate authority's certificate.
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestCerts {
    /// Make them in `dir`.
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "watershed test CA");
        let ca = ca.self_signed(&ca_key).expect("CA certificate");
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params")
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");
        let certs = Self { ca: dir.join("ca.pem"), cert: dir.join("hub.crt"), key: dir.join("hub.key") };
        std::fs::write(&certs.ca, ca.pem()).expect("write");
        std::fs::write(&certs.cert, cert.pem()).expect("write");
        std::fs::write(&certs.key, key.serialize_pem()).expect("write");
        certs
    }
}
