//! The lake in S3: moto's S3 API, started on a free loopback port from the
//! test virtualenv (`WATERSHED_TEST_SKIP_MOTO=1` skips these tests
//! loudly). The hub writes its files there through the same `Lake` as a
//! local lake (`lake.url`); pyarrow reads the tables from the bucket, and
//! boto3 copies the bucket into a directory, where the parquet crate and
//! DuckDB read what landed.

use serde_json::json;
use watershed_tests::{
    add_account, bin, duckdb, ids_by_table, login, ndjson, parquet_files, payment, post, python, repo, Moto,
    Server,
};

const ACCOUNT: &str = "111111111111";
const BUCKET: &str = "watershed-lake";

/// The hub's settings for a lake at `s3://watershed-lake/events` on `moto`.
fn s3_env(moto: &Moto) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> =
        Moto::aws_env().iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    env.push(("WATERSHED_LAKE__URL", format!("s3://{BUCKET}/events")));
    env.push(("WATERSHED_LAKE__S3_ENDPOINT", moto.url.clone()));
    env
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// `watershed ARGS` with `env`, from the repository root.
fn run_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args).current_dir(repo());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("watershed runs")
}

/// Valid and refused events land in the bucket's tables, nothing in a
/// local lake; `lake ls`, `lake compact`, `lake retention` and `lake ddl`
/// work on the S3 lake as on a local one.
#[test]
fn the_hub_writes_its_lake_to_s3() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, ACCOUNT);
    let env = s3_env(&moto);
    let env = borrowed(&env);
    let data_s = data.to_str().unwrap();

    // Two runs of the hub: two small files in each table's partition (a
    // clean stop commits every open file), for compaction to merge.
    for round in 0..2 {
        let server = Server::start(&data, &env);
        let events = vec![
            payment(&format!("p-{round}"), None, "cus_1", "4111111111111111", "Ada Lovelace"),
            login(&format!("l-{round}"), "u1"),
            json!({"id": format!("bad-{round}"), "source": "nope", "detail-type": "Nope", "detail": {}}),
        ];
        let (s, r, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
        assert_eq!((s, r["accepted"].as_u64()), (200, Some(2)), "{r}");
        assert!(server.stop().success());
    }
    assert!(!data.join("lake").exists(), "nothing written to a local lake");

    let out = run_env(&["lake", "ls", "--data-dir", data_s], &env);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}{}", String::from_utf8_lossy(&out.stderr));
    for (table, files, rows) in [("payments", "2", "2"), ("logins", "2", "2"), ("_dead_letters", "2", "2")] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(&format!("{table} ")))
            .unwrap_or_else(|| panic!("{listing}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((cols[2], cols[3]), (files, rows), "{table}: {listing}");
    }

    // Compaction merges the two files of each partition in the bucket.
    let out = run_env(&["lake", "compact", "--data-dir", data_s, "--after-secs", "0"], &env);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    // (The dead letters' partition, of the current hour, is not closed.)
    assert!(said.contains("4 files merged into 2"), "{said}");

    let mirror = dir.path().join("mirror");
    moto.mirror(BUCKET, "events", &mirror);
    for table in ["payments", "logins"] {
        let files = parquet_files(&mirror.join(table));
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].to_string_lossy().ends_with("-merged.parquet"), "{files:?}");
    }
    assert_eq!(parquet_files(&mirror.join("_dead_letters")).len(), 2);
    let ids = ids_by_table(&mirror);
    let sorted = |table: &str| {
        let mut v: Vec<String> = ids[table].iter().map(|(a, id)| format!("{a}/{id}")).collect();
        v.sort();
        v
    };
    assert_eq!(sorted("payments"), [format!("{ACCOUNT}/p-0"), format!("{ACCOUNT}/p-1")]);
    assert_eq!(sorted("logins"), [format!("{ACCOUNT}/l-0"), format!("{ACCOUNT}/l-1")]);
    assert_eq!(sorted("_dead_letters"), [format!("{ACCOUNT}/bad-0"), format!("{ACCOUNT}/bad-1")]);
    if let Some(py) = python() {
        let rows = duckdb(
            &py,
            &mirror,
            "SELECT detail.card.pan, detail.card.holder_name LIKE 'wse1.%' FROM read_parquet('{lake}/payments/**/*.parquet') LIMIT 1",
        );
        assert_eq!(rows, vec![json!(["************1111", true])], "protected in the bucket as on disk");
    }

    // pyarrow reads the tables from the bucket itself (its own S3 client),
    // partition values from the keys.
    if let Some(py) = python() {
        let script = format!(
            "import json, pyarrow as pa, pyarrow.dataset as ds, pyarrow.fs as fs\n\
             s3 = fs.S3FileSystem(endpoint_override='{}', scheme='http', access_key='testing', \
             secret_key='testing', region='us-east-1')\n\
             out = {{}}\n\
             for t in ['payments', 'logins', '_dead_letters']:\n\
             \x20   d = ds.dataset('{BUCKET}/events/' + t, filesystem=s3, format='parquet', \
             partitioning=ds.partitioning(pa.schema([('account', pa.string())]), flavor='hive'))\n\
             \x20   tb = d.to_table(columns=['event_id', 'account'])\n\
             \x20   out[t] = sorted(a + '/' + e for a, e in zip(tb['account'].to_pylist(), tb['event_id'].to_pylist()))\n\
             print(json.dumps(out))",
            moto.url
        );
        let out = std::process::Command::new(&py).args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            read,
            json!({
                "payments": [format!("{ACCOUNT}/p-0"), format!("{ACCOUNT}/p-1")],
                "logins": [format!("{ACCOUNT}/l-0"), format!("{ACCOUNT}/l-1")],
                "_dead_letters": [format!("{ACCOUNT}/bad-0"), format!("{ACCOUNT}/bad-1")],
            })
        );
    }

    // `lake ddl` points at the bucket by default.
    let out =
        run_env(&["lake", "ddl", "--data-dir", data_s, "--dialect", "athena", "--table", "payments"], &env);
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && sql.contains("LOCATION 's3://watershed-lake/events/payments/'"), "{sql}");

    // Retention deletes the payments' partition (2024-05-01) from the bucket.
    let mut with_period = env.clone();
    with_period.push(("WATERSHED_RETENTION__TABLES__PAYMENTS", "30"));
    let out = run_env(&["lake", "retention", "--data-dir", data_s], &with_period);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("deleted 1 expired partitions: 1 files"), "{said}");
    let after = dir.path().join("after");
    moto.mirror(BUCKET, "events", &after);
    let ids = ids_by_table(&after);
    assert!(!ids.contains_key("payments"), "{ids:?}");
    assert_eq!(ids["logins"].len(), 2);
}

/// A create-only put of a name the bucket already holds leaves the
/// object as it was and says so (S3's `If-None-Match: *`), which is what
/// keeps a replayed file from replacing another hub's.
#[test]
fn a_create_only_put_keeps_what_the_bucket_holds() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket(BUCKET);
    for (k, v) in Moto::aws_env() {
        // Read by object_store's builder in this process.
        std::env::set_var(k, v);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let lake = watershed_lake::Lake::s3(&format!("s3://{BUCKET}/p"), Some(&moto.url), None, 2).unwrap();
        let path = watershed_lake::LakePath("t/account=1/date=2024-05-01/hour=00/a.parquet".to_owned());
        let first = lake.put_create(&path, bytes::Bytes::from_static(b"first")).await.unwrap();
        let second = lake.put_create(&path, bytes::Bytes::from_static(b"second")).await.unwrap();
        assert_eq!((first, second), (watershed_lake::Put::Created, watershed_lake::Put::AlreadyExists));
        assert_eq!(&lake.get(&path.0).await.unwrap()[..], b"first");
        assert!(lake.exists(&path).await.unwrap());
        lake.delete(&path.0).await.unwrap();
        assert!(!lake.exists(&path).await.unwrap());
        lake.delete(&path.0).await.unwrap();
    });
}

/// A bucket that does not exist stops `serve` at start with an error
/// naming the lake, rather than acknowledging events it cannot commit.
#[test]
fn a_missing_bucket_stops_the_hub_at_start() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut env = s3_env(&moto);
    env.retain(|(k, _)| *k != "WATERSHED_LAKE__URL");
    env.push(("WATERSHED_LAKE__URL", "s3://no-such-bucket/events".to_owned()));
    let out = watershed_tests::serve_command(&data, &repo().join("schemas"), &borrowed(&env))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the lake at s3://no-such-bucket/events cannot be reached"), "{err}");
    assert!(err.contains("NoSuchBucket"), "{err}");
}
