//! End to end against `watershed serve`: mixed batches from three
//! accounts, protection as analysts see it, bad input, and backpressure.
//! The lake is read back with the parquet crate and, independently, with
//! DuckDB.

use serde_json::{json, Value};
use watershed_tests::{
    add_account, detail_strings, duckdb, ids_by_table, login, ndjson, parquet_files, payment, post, python,
    read_table, run, run_with_stdin, strings, Server,
};

const A: [&str; 3] = ["111111111111", "222222222222", "333333333333"];

/// A payment of `customer`'s, card holder Ada Lovelace.
fn ada(id: &str, customer: &str) -> Value {
    payment(id, None, customer, "4111111111111111", "Ada Lovelace")
}

/// `watershed keys forget` of `subject` in `account`, beside a running hub.
fn forget(data: &std::path::Path, account: &str, subject: &str) {
    let data = data.to_str().unwrap();
    let out = run(&[
        "keys",
        "forget",
        "--principal",
        "dpo",
        "--purpose",
        "erasure-1",
        "--account",
        account,
        "--subject",
        subject,
        "--data-dir",
        data,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The event ids in the lake's `payments` table under `data`, sorted (a
/// duplicate shows twice).
fn payment_ids(data: &std::path::Path) -> Vec<String> {
    payment_ids_in(&data.join("lake"))
}

/// The same, of the lake at `lake`.
fn payment_ids_in(lake: &std::path::Path) -> Vec<String> {
    payment_ids_where(lake, |_| true)
}

/// The `payments` ids of `account` in the lake under `data`, sorted.
fn payment_ids_in_account(data: &std::path::Path, account: &str) -> Vec<String> {
    payment_ids_where(&data.join("lake"), |a| a == account)
}

/// The `payments` ids of the accounts `keep` keeps, sorted.
fn payment_ids_where(lake: &std::path::Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut ids: Vec<String> =
        ids_by_table(lake)["payments"].iter().filter(|(a, _)| keep(a)).map(|(_, id)| id.clone()).collect();
    ids.sort();
    ids
}

#[test]
fn mixed_batches_from_three_accounts_land_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tokens: Vec<String> = A.iter().map(|a| add_account(&data, a)).collect();
    let server = Server::start(&data, &[]);
    let mut want_valid = Vec::new();
    let mut want_dead = Vec::new();
    for (i, (acct, token)) in A.iter().zip(&tokens).enumerate() {
        let mut events = Vec::new();
        // The first account's payments fill a file past the small-file
        // size (written with zstd); the others' stay below it.
        let valid = if i == 0 { 150 } else { 20 };
        for n in 0..valid {
            let id = format!("{acct}-ok-{n}");
            events.push(payment(
                &id,
                if n % 2 == 0 { Some(acct) } else { None },
                &format!("cus-{n}"),
                "4111111111111111",
                "Ada Lovelace",
            ));
            want_valid.push((acct.to_string(), id));
        }
        events.push(login(&format!("{acct}-login"), "u-1"));
        want_valid.push((acct.to_string(), format!("{acct}-login")));
        // Invalid ones, each with a specific reason.
        let mut bad_enum = payment(&format!("{acct}-bad-enum"), None, "c", "4111", "X");
        bad_enum["detail"]["currency"] = json!("DOGE");
        let mut missing = payment(&format!("{acct}-missing"), None, "c", "4111", "X");
        missing["detail"].as_object_mut().unwrap().remove("amount");
        let spoofed = payment(&format!("{acct}-spoof"), Some(A[(i + 1) % 3]), "c", "4111", "X");
        let mut unknown = payment(&format!("{acct}-unknown"), None, "c", "4111", "X");
        unknown["detail-type"] = json!("PaymentRefunded");
        events.extend([bad_enum, missing, spoofed, unknown]);
        want_dead.extend([
            (acct.to_string(), format!("{acct}-bad-enum"), "bad_enum"),
            (acct.to_string(), format!("{acct}-missing"), "missing_field"),
            (acct.to_string(), format!("{acct}-spoof"), "account_mismatch"),
            (acct.to_string(), format!("{acct}-unknown"), "unknown_subject"),
        ]);
        let mut body = ndjson(&events);
        body.extend_from_slice(b"{\"id\": \"torn\n");
        want_dead.push((acct.to_string(), String::new(), "malformed_json"));
        let (status, resp, _) =
            post(&server.url, Some(token), body, &[("content-type", "application/x-ndjson")]);
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["accepted"], valid + 1, "{resp}");
        let reasons: Vec<&str> =
            resp["rejected"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
        assert_eq!(
            reasons,
            ["bad_enum", "missing_field", "account_mismatch", "unknown_subject", "malformed_json"]
        );
        assert_eq!(resp["rejected"][0]["path"], "$.detail.currency");
        assert_eq!(resp["rejected"][1]["path"], "$.detail.amount");
        assert_eq!(resp["rejected"][0]["index"], valid + 1);
    }
    assert!(server.stop().success(), "clean exit on SIGTERM");
    // A clean stop commits every event and retires the WAL segments that
    // held them: no raw event stays on disk.
    assert!(wal_files(&data, "wal").iter().all(|&n| n == 0), "{:?}", wal_files(&data, "wal"));
    assert!(wal_files(&data, "ids").iter().any(|&n| n > 0), "their ids are kept for dedupe");

    let lake = data.join("lake");
    let ids = ids_by_table(&lake);
    let mut got: Vec<(String, String)> = ids["payments"].iter().chain(&ids["logins"]).cloned().collect();
    got.sort();
    want_valid.sort();
    assert_eq!(got, want_valid, "exactly the valid events, under the authenticated account");

    let mut dead: Vec<(String, String, String)> = Vec::new();
    for (path, b) in read_table(&lake, "_dead_letters") {
        let account = path
            .to_string_lossy()
            .split('/')
            .find_map(|s| s.strip_prefix("account=").map(str::to_owned))
            .unwrap();
        for (id, reason) in strings(&b, "event_id").into_iter().zip(strings(&b, "reason")) {
            dead.push((account.clone(), id.unwrap_or_default(), reason.unwrap()));
        }
        // The raw events are kept, encrypted: the card number is not in the lake.
        for raw in strings(&b, "raw") {
            let raw = raw.expect("raw event kept");
            assert!(raw.starts_with("wse1.") && !raw.contains("4111"), "{raw}");
        }
    }
    dead.sort();
    let mut want: Vec<(String, String, String)> =
        want_dead.into_iter().map(|(a, i, r)| (a, i, r.to_owned())).collect();
    want.sort();
    assert_eq!(dead, want);

    // An independent reader sees the same rows.
    if let Some(py) = python() {
        let rows = duckdb(&py, &lake, "SELECT account, count(*), count(DISTINCT event_id) FROM read_parquet('{lake}/payments/**/*.parquet', hive_partitioning=true, hive_types={'account': VARCHAR}) GROUP BY account ORDER BY account");
        assert_eq!(
            rows,
            vec![
                json!(["111111111111", 150, 150]),
                json!(["222222222222", 20, 20]),
                json!(["333333333333", 20, 20])
            ]
        );
        // Files of fewer than 128 rows are uncompressed, the others zstd
        // (per column chunk, as DuckDB reports them).
        let rows = duckdb(&py, &lake, "SELECT regexp_extract(file_name, 'account=([0-9]+)', 1) AS account, string_agg(DISTINCT compression, ',') FROM parquet_metadata('{lake}/payments/**/*.parquet') GROUP BY account ORDER BY account");
        assert_eq!(
            rows,
            vec![
                json!(["111111111111", "ZSTD"]),
                json!(["222222222222", "UNCOMPRESSED"]),
                json!(["333333333333", "UNCOMPRESSED"])
            ]
        );
        let rows = duckdb(&py, &lake, "SELECT reason, count(*) FROM read_parquet('{lake}/_dead_letters/**/*.parquet', hive_partitioning=true, hive_types={'account': VARCHAR}) GROUP BY reason ORDER BY reason");
        assert_eq!(
            rows,
            vec![
                json!(["account_mismatch", 3]),
                json!(["bad_enum", 3]),
                json!(["malformed_json", 3]),
                json!(["missing_field", 3]),
                json!(["unknown_subject", 3])
            ]
        );
        let rows = duckdb(&py, &lake, "SELECT date, hour, detail.merchant.mcc, detail.amount::VARCHAR, typeof(event_time), epoch_ms(event_time), epoch_ms(detail.authorized_at) FROM read_parquet('{lake}/payments/**/*.parquet', hive_partitioning=true, hive_types={'account': VARCHAR}) LIMIT 1");
        // Event times are delta-encoded: DuckDB reads them back exactly.
        let t = 1_714_566_896_000_i64; // 2024-05-01T12:34:56Z
        assert_eq!(rows[0], json!(["2024-05-01", 12, 5411, "19.99", "TIMESTAMP WITH TIME ZONE", t, t]));
    }
}

#[test]
fn protection_as_analysts_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let t1 = add_account(&data, A[0]);
    let t2 = add_account(&data, A[1]);
    let server = Server::start(&data, &[]);
    for (token, prefix) in [(&t1, "a"), (&t2, "b")] {
        let body = ndjson(&[
            ada(&format!("{prefix}1"), "alice"),
            ada(&format!("{prefix}2"), "alice"),
            ada(&format!("{prefix}3"), "bob"),
        ]);
        let (status, resp, _) = post(&server.url, Some(token), body, &[]);
        assert_eq!((status, resp["accepted"].as_u64()), (200, Some(3)), "{resp}");
    }
    let (status, resp, _) = post(&server.url, Some(&t1), ndjson(&[login("l1", "u-1")]), &[]);
    assert_eq!((status, resp["accepted"].as_u64()), (200, Some(1)));
    // A refused payment of alice's: its dead letter is hers to erase too.
    let mut refused = ada("a-refused", "alice");
    refused["detail"]["currency"] = json!("DOGE");
    let (status, resp, _) = post(&server.url, Some(&t1), ndjson(&[refused.clone()]), &[]);
    assert_eq!((status, resp["rejected"][0]["reason"].as_str()), (200, Some("bad_enum")), "{resp}");
    // An event that is not UTF-8 (Latin-1) is kept byte for byte.
    let latin1 = b"{\"id\": \"l-1\", \"detail\": {\"holder\": \"Ad\xe8le\"}}".to_vec();
    let (status, resp, _) = post(&server.url, Some(&t1), latin1.clone(), &[]);
    assert_eq!((status, resp["rejected"][0]["reason"].as_str()), (200, Some("malformed_json")), "{resp}");
    assert!(server.stop().success());

    let lake = data.join("lake");
    // (account, event id, customer token, masked pan, holder ciphertext)
    type Row = (String, String, Option<String>, String, Option<String>);
    let mut rows: Vec<Row> = Vec::new();
    for (path, b) in read_table(&lake, "payments") {
        let acct = if path.to_string_lossy().contains(A[0]) { A[0] } else { A[1] };
        let ids = strings(&b, "event_id");
        let tok = detail_strings(&b, &["customer_id"]);
        let pan = detail_strings(&b, &["card", "pan"]);
        let holder = detail_strings(&b, &["card", "holder_name"]);
        let expiry = detail_strings(&b, &["card", "expiry"]);
        for i in 0..b.num_rows() {
            rows.push((
                acct.to_owned(),
                ids[i].clone().unwrap(),
                tok[i].clone(),
                pan[i].clone().unwrap(),
                holder[i].clone().or(expiry[i].clone()),
            ));
            assert_eq!(expiry[i], None, "redacted value is gone");
            assert_eq!(pan[i].as_deref(), Some("************1111"), "mask keeps the last 4");
            let h = holder[i].as_deref().unwrap();
            assert!(h.starts_with("wse1.") && !h.contains("Ada"), "encrypted, not plaintext");
        }
    }
    rows.sort_by(|a, b| a.1.cmp(&b.1));
    let token = |id: &str| rows.iter().find(|r| r.1 == id).unwrap().2.clone().unwrap();
    assert_eq!(token("a1"), token("a2"), "deterministic within an account");
    assert_ne!(token("a1"), token("a3"), "different subjects, different tokens");
    assert_ne!(token("a1"), token("b1"), "same value, different account, different token");
    assert!(!token("a1").contains("alice"));

    // Decrypt (audited), then crypto-shred alice in account A and retry.
    let data_s = data.to_str().unwrap();
    let holder = |id: &str| rows.iter().find(|r| r.1 == id).unwrap().4.clone().unwrap();
    let dec = |v: &str| {
        run(&["keys", "decrypt", "--principal", "auditor", "--purpose", "case-7", "--data-dir", data_s, v])
    };
    let out = dec(&holder("a1"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ada Lovelace");
    let mut dead: Vec<(String, String)> = read_table(&lake, "_dead_letters")
        .iter()
        .flat_map(|(_, b)| strings(b, "reason").into_iter().zip(strings(b, "raw")))
        .map(|(reason, raw)| (reason.unwrap(), raw.unwrap()))
        .collect();
    dead.sort();
    let [(_, dead_raw), (_, latin1_raw)] = <[_; 2]>::try_from(dead).unwrap();
    assert!(dead_raw.starts_with("wse1.") && !dead_raw.contains("Ada"), "{dead_raw}");
    let out = dec(&dead_raw);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sent: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sent, refused, "the dead letter decrypts to the event as sent");
    let out = dec(&latin1_raw);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, [&latin1[..], b"\n"].concat(), "the bytes as sent, not U+FFFD");
    forget(&data, A[0], "alice");
    for value in [holder("a1"), holder("a2"), dead_raw.clone()] {
        let out = dec(&value);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("key_erased"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for id in ["a3", "b1"] {
        assert!(dec(&holder(id)).status.success(), "{id} must stay readable");
    }
    // Many values at once, from stdin (a query's output), one JSON line each.
    let out = run_with_stdin(
        &["keys", "decrypt", "--principal", "auditor", "--purpose", "case-7", "--data-dir", data_s, "-"],
        &format!("{}\n\n{}\n{}\n", holder("a3"), dead_raw, latin1_raw),
    );
    assert!(!out.status.success(), "one value is erased");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "one line per value: {lines:?}");
    assert_eq!(lines[0], json!({"plaintext": "Ada Lovelace"}));
    assert!(lines[1]["error"].as_str().unwrap().starts_with("key_erased"), "{lines:?}");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&latin1);
    assert_eq!(lines[2], json!({ "plaintext_base64": b64 }), "not UTF-8: base64 of the bytes");

    // The login's redacted session id and encrypted ip, read by DuckDB.
    if let Some(py) = python() {
        let rows = duckdb(&py, &lake, "SELECT detail.session_id, starts_with(detail.ip_address, 'wse1.'), length(detail.username) FROM read_parquet('{lake}/logins/**/*.parquet')");
        assert_eq!(rows, vec![json!([null, true, 22])]);
    }
}

/// An erasure job: many subjects in one `keys forget`, from a file and
/// from stdin. Their values read as `key_erased`, the others' still
/// decrypt, and a subject with no key fails the command by its line
/// (never by its id), with a hint when it is padded with whitespace. A
/// byte order mark before the first id (a Windows tool's UTF-8) is not
/// part of it.
#[test]
fn an_erasure_job_forgets_many_subjects_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[]);
    let who = ["alice", "bob", "carol", "dave", "erin"];
    let events: Vec<Value> = who.iter().map(|c| ada(&format!("{c}-1"), c)).collect();
    let (status, resp, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
    assert_eq!((status, resp["accepted"].as_u64()), (200, Some(5)), "{resp}");
    assert!(server.stop().success());
    let mut holder = std::collections::HashMap::new();
    for (_, b) in read_table(&data.join("lake"), "payments") {
        for (id, h) in strings(&b, "event_id").into_iter().zip(detail_strings(&b, &["card", "holder_name"])) {
            holder.insert(id.unwrap(), h.unwrap());
        }
    }
    let data_s = data.to_str().unwrap();
    let keys = |args: &[&str], stdin: &str| {
        let forget = [
            "keys",
            "forget",
            "--principal",
            "dpo",
            "--purpose",
            "GDPR-17/42",
            "--account",
            A[0],
            "--data-dir",
            data_s,
        ];
        run_with_stdin(&[&forget[..], args].concat(), stdin)
    };
    let list = dir.path().join("subjects.txt");
    std::fs::write(&list, "\u{feff}alice\nnobody \n\ncarol\r\n").unwrap();
    // A dry run says what the job would erase and erases nothing.
    let keyring = |name: &str| std::fs::read(data.join("keyring").join(name)).unwrap_or_default();
    let (log_before, audit_before) = (keyring("keys.log"), keyring("audit.log"));
    let out = keys(&["--subjects-from", list.to_str().unwrap(), "--dry-run"], "");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a subject had no key");
    assert!(stdout.contains("dry run: would erase 2 data key(s) of 2 subject(s)"), "{stdout}");
    assert!(stderr.contains(": line 2 (lines of "), "{stderr}");
    assert_eq!(keyring("keys.log"), log_before, "nothing erased");
    let audit = String::from_utf8(keyring("audit.log")).unwrap();
    let added = audit.strip_prefix(&*String::from_utf8_lossy(&audit_before)).unwrap();
    let record: Value = serde_json::from_str(added.trim_end()).unwrap();
    assert_eq!(
        (&record["action"], &record["principal"], &record["with_keys"]),
        (&json!("forget_dry_run"), &json!("dpo"), &json!(2)),
        "one audit record for the dry run: {added}"
    );
    let out = keys(&["--subjects-from", list.to_str().unwrap()], "");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a subject had no key");
    assert!(stdout.contains("erased 2 data key(s) of 2 subject(s)"), "{stdout}");
    assert!(stderr.contains("1 subject(s)") && stderr.contains(": line 2 (lines of "), "{stderr}");
    assert!(stderr.contains("hint: 1 of them begin or end with whitespace"), "{stderr}");
    assert!(!stderr.contains("nobody"), "subject ids are not printed: {stderr}");
    let out = keys(&["--subject", "erin", "--subjects-from", "-"], "dave\nerin\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("erased 2 data key(s) of 2 subject(s)"));
    for c in who {
        let out =
            run(&["keys", "decrypt", "--principal", "auditor", "--purpose", "job-1", "--data-dir", data_s]
                .into_iter()
                .chain([holder[&format!("{c}-1")].as_str()])
                .collect::<Vec<_>>());
        if c == "bob" {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ada Lovelace", "bob stays readable");
        } else {
            assert!(String::from_utf8_lossy(&out.stderr).contains("key_erased"), "{c} must be erased");
        }
    }
    let audit = std::fs::read_to_string(data.join("keyring/audit.log")).unwrap();
    let erasures: Vec<&str> = audit.lines().filter(|l| l.contains(r#""action":"forget""#)).collect();
    assert_eq!(erasures.len(), 4);
    for line in erasures {
        let r: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (r["principal"].as_str(), r["purpose"].as_str()),
            (Some("dpo"), Some("GDPR-17/42")),
            "{r}"
        );
    }
}

#[test]
fn bad_input_gets_specific_errors_and_nothing_valid_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(
        &data,
        &[("WATERSHED_LIMITS__MAX_BODY_BYTES", "200000"), ("WATERSHED_LIMITS__MAX_EVENT_BYTES", "20000")],
    );
    let good = |id: &str| payment(id, Some(A[0]), "c-1", "4111111111111111", "Ada");

    let (s, r, _) = post(&server.url, None, ndjson(&[good("g0")]), &[]);
    assert_eq!((s, r["error"].as_str()), (401, Some("unauthenticated")));
    // The refusal is logged with the client's address (the token is not).
    let line =
        server.wait_for_log(&["refused a request for its credentials", "127.0.0.1:", "unauthenticated"]);
    assert!(line.contains("not_logged=0"), "{line}");
    let (s, r, _) = post(&server.url, Some("wsh_forged"), ndjson(&[good("g0")]), &[]);
    assert_eq!((s, r["error"].as_str()), (401, Some("bad_credentials")));
    assert!(server.log.lock().unwrap().iter().all(|l| !l.contains("wsh_forged")), "no token in the log");
    let (s, r, _) = post(&server.url, Some(&token), vec![b' '; 300_000], &[]);
    assert_eq!((s, r["error"].as_str()), (413, Some("too_large")), "oversized body: {r}");
    let (s, r, _) =
        post(&server.url, Some(&token), b"[{\"id\": 1}, ".to_vec(), &[("content-type", "application/json")]);
    assert_eq!((s, r["error"].as_str()), (400, Some("bad_request")), "{r}");
    // Bodies declared as something other than JSON, and CloudEvents in
    // binary mode (the body only the data), are refused before they are
    // read; their events are not stored.
    for (headers, says) in [
        (vec![("content-type", "application/x-www-form-urlencoded")], "application/x-www-form-urlencoded"),
        (vec![("content-type", "application/json; charset=iso-8859-1")], "charset"),
        (vec![("content-type", "application/json"), ("ce-specversion", "1.0")], "binary content mode"),
    ] {
        let (s, r, _) = post(&server.url, Some(&token), ndjson(&[good("g0")]), &headers);
        assert_eq!((s, r["error"].as_str()), (415, Some("unsupported_media_type")), "{headers:?}: {r}");
        assert!(r["message"].as_str().unwrap().contains(says), "{r}");
    }
    // CloudEvents in structured mode, as a batch under its own media type.
    let g = good("c1");
    let cloud = json!([{
        "specversion": "1.0", "id": "c1", "type": g["detail-type"], "source": g["source"],
        "time": g["time"], "account": A[0], "data": g["detail"],
    }]);
    let (s, r, _) = post(
        &server.url,
        Some(&token),
        cloud.to_string().into_bytes(),
        &[("content-type", "application/cloudevents-batch+json")],
    );
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");

    // A gzip bomb is refused by its decompressed size.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &vec![b'\n'; 5_000_000]).unwrap();
    let (s, r, _) = post(&server.url, Some(&token), gz.finish().unwrap(), &[("content-encoding", "gzip")]);
    assert_eq!((s, r["error"].as_str()), (413, Some("too_large")), "{r}");

    let mut huge = good("huge");
    huge["detail"]["merchant"]["name"] = json!("x".repeat(30_000));
    let mut unknown_type = good("u1");
    unknown_type["detail-type"] = json!("Nope");
    let mut spoof = good("s1");
    spoof["account"] = json!(A[1]);
    let array = Value::Array(vec![
        good("g1"),
        huge,
        good("g2"),
        unknown_type,
        spoof,
        json!("just a string"),
        good("g3"),
    ]);
    // Also gzip-encoded, as collectors send: here as two gzip members
    // (concatenated gzip files), split mid-event; both are read.
    let text = array.to_string().into_bytes();
    let gzip = |part: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, part).unwrap();
        gz.finish().unwrap()
    };
    let (head, tail) = text.split_at(text.len() / 2);
    let (s, r, _) = post(
        &server.url,
        Some(&token),
        [gzip(head), gzip(tail)].concat(),
        &[("content-type", "application/json"), ("content-encoding", "gzip")],
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["accepted"], 3);
    let got: Vec<(u64, &str)> = r["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["index"].as_u64().unwrap(), x["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(got, [(1, "too_large"), (3, "unknown_subject"), (4, "account_mismatch"), (5, "bad_envelope")]);

    // A retry of the same batch stores nothing twice.
    let (s, r, _) = post(&server.url, Some(&token), array.to_string().into_bytes(), &[]);
    assert_eq!((s, r["accepted"].as_u64(), r["duplicates"].as_u64()), (200, Some(0), Some(3)), "{r}");

    // One event pretty-printed across lines is one event, not one per line.
    let pretty = serde_json::to_vec_pretty(&good("g4")).unwrap();
    let (s, r, _) = post(&server.url, Some(&token), pretty, &[("content-type", "application/json")]);
    assert_eq!(
        (s, r["accepted"].as_u64(), r["rejected"].as_array().map(Vec::len)),
        (200, Some(1), Some(0)),
        "{r}"
    );
    // Pretty-printed events one after another (`jq .`'s output) are one
    // event each, as are objects with nothing between them (Firehose's).
    let mut jq = Vec::new();
    for id in ["g5", "g6"] {
        jq.extend(serde_json::to_vec_pretty(&good(id)).unwrap());
        jq.push(b'\n');
    }
    jq.extend(serde_json::to_vec(&good("g7")).unwrap());
    jq.extend(serde_json::to_vec(&good("g8")).unwrap());
    let (s, r, _) = post(&server.url, Some(&token), jq, &[]);
    assert_eq!(
        (s, r["accepted"].as_u64(), r["rejected"].as_array().map(Vec::len)),
        (200, Some(4), Some(0)),
        "{r}"
    );

    let metrics = reqwest::blocking::get(format!("{}/metrics", server.url)).unwrap().text().unwrap();
    assert!(
        metrics.contains("watershed_events_rejected_total{account=\"111111111111\",reason=\"too_large\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("watershed_events_duplicate_total{account=\"111111111111\"} 3"), "{metrics}");
    // Requests refused as a whole, by the error code they were answered with.
    for (reason, n) in [
        ("unauthenticated", 1),
        ("bad_credentials", 1),
        ("too_large", 2),
        ("bad_request", 1),
        ("unsupported_media_type", 3),
    ] {
        let line = format!("watershed_requests_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    assert!(metrics.contains("watershed_ack_latency_seconds_bucket"));
    assert_eq!(reqwest::blocking::get(format!("{}/readyz", server.url)).unwrap().status(), 200);
    assert!(server.stop().success());
    let ids = ids_by_table(&data.join("lake"));
    let mut p: Vec<String> = ids["payments"].iter().map(|x| x.1.clone()).collect();
    p.sort();
    assert_eq!(p, ["c1", "g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8"]);
    // Rejects are stored once however often they are retried: by id, or
    // for the id-less one ("just a string") by its bytes.
    let mut dead: Vec<String> = ids["_dead_letters"].iter().map(|x| x.1.clone()).collect();
    dead.sort();
    assert_eq!(dead, ["", "huge", "s1", "u1"]);
}

#[test]
fn backpressure_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(
        &data,
        &[
            ("WATERSHED_MEMORY__BUDGET_BYTES", "262144"),
            ("WATERSHED_LAKE__PUT_DELAY_MS", "1500"),
            ("WATERSHED_LAKE__FLUSH_CONCURRENCY", "1"),
            ("WATERSHED_LAKE__ROLL_BYTES", "65536"),
        ],
    );
    let mut statuses = Vec::new();
    let mut accepted = Vec::new();
    for b in 0..40 {
        let events: Vec<Value> = (0..50)
            .map(|n| payment(&format!("e{b}-{n}"), None, &format!("c{n}"), "4111111111111111", "Ada"))
            .collect();
        let (s, r, h) = post(&server.url, Some(&token), ndjson(&events), &[]);
        if s == 503 {
            assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
            assert_eq!(r["error"], "busy");
        } else {
            assert_eq!(s, 200, "{r}");
            accepted.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        }
        statuses.push(s);
        if statuses.iter().filter(|&&s| s == 503).count() >= 3 {
            break;
        }
    }
    assert!(statuses.contains(&503), "a slow store and a tiny budget must push back: {statuses:?}");
    let metrics = reqwest::blocking::get(format!("{}/metrics", server.url)).unwrap().text().unwrap();
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    let line = format!("watershed_requests_refused_total{{reason=\"busy\"}} {busy}");
    assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    let used: f64 =
        metrics.lines().find_map(|l| l.strip_prefix("watershed_memory_bytes ")).unwrap().parse().unwrap();
    assert!(used < 262_144.0 * 4.0, "memory stays near the budget, not unbounded: {used}");
    assert!(server.stop().success());
    accepted.sort();
    assert_eq!(payment_ids(&data), accepted, "everything acknowledged before the 503s is in the lake");
}

/// `/metrics` as text.
fn metrics(server: &Server) -> String {
    reqwest::blocking::get(format!("{}/metrics", server.url)).unwrap().text().unwrap()
}

/// The value of the unlabelled metric `name` in `text`.
fn metric(text: &str, name: &str) -> f64 {
    let prefix = format!("{name} ");
    let line = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    line.unwrap_or_else(|| panic!("{name} in {text}")).parse().unwrap()
}

/// A backfill scattered over hours: 2,000 hourly partitions, each brought
/// one event by each of three rounds of requests. They stay open, each
/// charged what it holds, and each makes one file: no file per visit (an
/// open-partition bound of 1,024 made one per event), and what the
/// budget counts stays under it.
#[test]
fn a_backfill_over_thousands_of_hours_makes_one_file_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let budget = 256u64 << 20;
    let server = Server::start(&data, &[("WATERSHED_MEMORY__BUDGET_BYTES", &budget.to_string())]);
    let (hours, rounds) = (2000i64, 3);
    let start = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:30:00Z").unwrap();
    let mut peak = 0f64;
    for round in 0..rounds {
        for first in (0..hours).step_by(1000) {
            let events: Vec<Value> = (first..first + 1000)
                .map(|h| {
                    let mut e = ada(&format!("b{round}-{h}"), &format!("c{h}"));
                    let time = start - chrono::Duration::hours(h);
                    e["time"] = json!(time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                    e
                })
                .collect();
            let (s, r, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
            assert_eq!((s, r["accepted"].as_u64()), (200, Some(1000)), "{r}");
            peak = peak.max(metric(&metrics(&server), "watershed_memory_bytes"));
        }
    }
    let text = metrics(&server);
    assert_eq!(metric(&text, "watershed_open_partitions"), 2000.0, "{text}");
    assert_eq!(metric(&text, "watershed_files_written_total"), 0.0, "nothing flushed early: {text}");
    assert!(peak < budget as f64 / 2.0, "the budget counted {peak} bytes at most");
    assert!(server.stop().success());
    assert_eq!(parquet_files(&data.join("lake").join("payments")).len(), 2000);
    let ids = payment_ids(&data);
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!((ids.len(), distinct.len()), (6000, 6000));
}

/// The WAL bound of the two tests below: sixteen 64 KiB segments.
const WAL_BOUND: [(&str, &str); 2] =
    [("WATERSHED_WAL__SEGMENT_BYTES", "65536"), ("WATERSHED_WAL__MAX_RAW_BYTES", "1048576")];

/// 1,000 payments of ten customers (about 40 KiB in the WAL), ids
/// `<batch>-<n>`; the event time (in 2024) makes their partition a late one.
fn payments(batch: usize) -> Vec<Value> {
    (0..1000).map(|n| ada(&format!("{batch}-{n}"), &format!("c{}", n % 10))).collect()
}

/// A partition still open (a late one waits `late_roll_age_secs` to gather
/// its trickle; an hour here) would keep every newer WAL segment on disk:
/// from half of `wal.max_raw_bytes` the partitions holding the oldest
/// records are committed before their roll age, so the segments stay
/// under the bound while far more than it passes through, and every
/// event lands exactly once.
#[test]
fn a_late_partition_cannot_keep_the_wal_beyond_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let hold = [("WATERSHED_LAKE__ROLL_AGE_SECS", "3600"), ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "3600")];
    let server = Server::start(&data, &[hold.as_slice(), WAL_BOUND.as_slice()].concat());
    let max = 1_048_576u64;
    let mut accepted = Vec::new();
    let mut written = 0u64;
    // Until three times the bound went through the WAL (about 80
    // requests), however long the early commits take on a slow machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    for b in 0.. {
        if written > 3 * max {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{written} bytes through the WAL in 120 s");
        let events = payments(b);
        let before: u64 = wal_files(&data, "wal").iter().sum();
        let (s, r, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
        if s == 503 {
            // The bound reached before the early commits landed: the
            // client backs off, as `send` does.
            assert_eq!(r["error"], "busy", "{r}");
            std::thread::sleep(std::time::Duration::from_millis(300));
            continue;
        }
        assert_eq!((s, r["accepted"].as_u64()), (200, Some(1000)), "{r}");
        accepted.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        let after: u64 = wal_files(&data, "wal").iter().sum();
        written += after.saturating_sub(before);
        assert!(after < max + (128 << 10), "segments on disk {after} against a bound of {max}");
    }
    let text = metrics(&server);
    assert!(metric(&text, "watershed_wal_early_commits_total") >= 2.0, "{text}");
    assert!(metric(&text, "watershed_wal_raw_bytes") < max as f64 + 131_072.0, "{text}");
    assert!(!read_table(&data.join("lake"), "payments").is_empty(), "committed while the hub runs");
    assert!(server.stop().success());
    accepted.sort();
    assert_eq!(payment_ids(&data), accepted, "every acknowledged event exactly once");
}

/// When the lake cannot commit (every put hangs), early commits cannot
/// free the WAL: ingest answers 503 once its segments hold
/// `wal.max_raw_bytes`, before they fill the disk, and `/readyz` says
/// busy. Nothing acknowledged is lost: after a `kill -9` and a restart
/// with a working store, every acknowledged event is in the lake once.
#[test]
fn a_store_that_cannot_commit_stops_ingest_at_the_wal_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let hung = [("WATERSHED_LAKE__PUT_DELAY_MS", "600000")];
    let server = Server::start(&data, &[hung.as_slice(), WAL_BOUND.as_slice()].concat());
    let max = 1_048_576f64;
    let mut accepted = Vec::new();
    let mut refused = None;
    for b in 0..200 {
        let events = payments(b);
        let (s, r, h) = post(&server.url, Some(&token), ndjson(&events), &[]);
        if s == 503 {
            refused = Some((r, h));
            break;
        }
        assert_eq!((s, r["accepted"].as_u64()), (200, Some(1000)), "{r}");
        accepted.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
    }
    let (r, h) = refused.expect("ingest stops at the WAL bound");
    assert_eq!(r["error"], "busy", "{r}");
    assert!(r["message"].as_str().unwrap().contains("write-ahead log"), "{r}");
    assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let ready = reqwest::blocking::get(format!("{}/readyz", server.url)).unwrap().status().as_u16();
    assert_eq!(ready, 503);
    let raw = metric(&metrics(&server), "watershed_wal_raw_bytes");
    assert!((max..max + 131_072.0).contains(&raw), "segments at the bound, not past it: {raw}");
    server.kill9();

    let server = Server::start(&data, &[]);
    assert!(server.stop().success());
    accepted.sort();
    assert_eq!(payment_ids(&data), accepted, "every acknowledged event, once, after the restart");
}

/// `keys forget` while a subject's events are acknowledged but not yet
/// committed, then `kill -9`: the restart replays them from the WAL, and
/// their encrypted values (and dead letters) must be as unreadable as if
/// they had been committed before the erasure. Another subject's stay
/// readable, and the subject's events received after the erasure get a
/// new key.
#[test]
fn a_subject_forgotten_before_a_crash_stays_erased_after_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    let token = add_account(&data, A[0]);
    // Nothing rolls on its own, and the erasure does not commit the open
    // partitions: the events stay in the WAL until the crash.
    let hold = [
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "3600"),
        ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "3600"),
        ("WATERSHED_KEYS__ERASURE_CHECK_MS", "0"),
    ];
    let server = Server::start(&data, &hold);
    let mut refused = ada("a-refused", "alice");
    refused["detail"]["currency"] = json!("DOGE");
    let body = ndjson(&[ada("a1", "alice"), ada("b1", "bob"), refused]);
    let (status, resp, _) = post(&server.url, Some(&token), body, &[]);
    assert_eq!((status, resp["accepted"].as_u64()), (200, Some(2)), "{resp}");
    forget(&data, A[0], "alice");
    server.kill9();
    assert!(read_table(&data.join("lake"), "payments").is_empty(), "nothing was committed before the crash");

    let server = Server::start(&data, &[]);
    let (status, resp, _) = post(&server.url, Some(&token), ndjson(&[ada("a2", "alice")]), &[]);
    assert_eq!((status, resp["accepted"].as_u64()), (200, Some(1)), "{resp}");
    assert!(server.stop().success());

    let lake = data.join("lake");
    let mut holder = std::collections::HashMap::new();
    for (_, b) in read_table(&lake, "payments") {
        let (ids, h) = (strings(&b, "event_id"), detail_strings(&b, &["card", "holder_name"]));
        for i in 0..b.num_rows() {
            holder.insert(ids[i].clone().unwrap(), h[i].clone().unwrap());
        }
    }
    let dead = read_table(&lake, "_dead_letters");
    let dead_raw = strings(&dead[0].1, "raw")[0].clone().unwrap();
    let dec = |v: &str| {
        run(&["keys", "decrypt", "--principal", "auditor", "--purpose", "case-9", "--data-dir", data_s, v])
    };
    for (what, value) in [("a1", &holder["a1"]), ("a-refused", &dead_raw)] {
        let out = dec(value);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("key_erased"), "{what} must stay erased: {err}");
    }
    for id in ["b1", "a2"] {
        let out = dec(&holder[id]);
        assert!(out.status.success(), "{id}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ada Lovelace");
    }
}

/// A SIGTERM the moment the hub reports its address stops it cleanly:
/// the handlers are installed before it listens.
#[test]
fn sigterm_right_after_start_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for _ in 0..5 {
        let status = Server::start(&data, &[]).stop();
        assert!(status.success(), "{status:?}");
    }
}

/// The head of an NDJSON `POST /v1/events` to `addr` with `token`,
/// declaring `length` body bytes.
fn post_head(addr: &str, token: &str, length: usize) -> String {
    format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Send raw HTTP/1.1 `head` (and `body`) on a new connection, wait at
/// most `secs` for the answer, and return its status line and the time
/// it took.
fn raw_request(url: &str, head: &str, body: &[u8], secs: u64) -> (String, std::time::Duration) {
    use std::io::{Read as _, Write as _};
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(secs))).unwrap();
    let started = std::time::Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Up to the end of the status line, or the connection's close.
    while !answer.contains(&b'\n') {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    (text.lines().next().unwrap_or("").to_owned(), started.elapsed())
}

/// A client whose body stalls gets 408 once `limits.body_timeout_secs`
/// has passed, instead of holding its connection and buffer for good; a
/// request without a valid token is refused (401) on its headers, before
/// any of its (declared 5 MB) body is read. Other clients are served
/// meanwhile.
#[test]
fn a_stalled_body_times_out_and_bad_tokens_are_refused_before_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[("WATERSHED_LIMITS__BODY_TIMEOUT_SECS", "1")]);
    let addr = server.url.strip_prefix("http://").unwrap().to_owned();
    let head = |auth: &str, length: usize| post_head(&addr, auth, length);
    let event = ndjson(&[ada("stalled", "c-1")]);
    let (status, took) = raw_request(&server.url, &head(&token, event.len() + 100), &event, 10);
    assert!(status.contains(" 408 "), "{status}");
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(5),
        "{took:?}"
    );
    let (status, took) = raw_request(&server.url, &head("wsh_not-a-token", 5_000_000), b"", 10);
    assert!(status.contains(" 401 "), "{status}");
    assert!(took < std::time::Duration::from_millis(900), "refused on the headers: {took:?}");
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&[ada("fine", "c-1")]), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");
    let text = metrics(&server);
    assert!(text.lines().any(|l| l == "watershed_requests_refused_total{reason=\"timeout\"} 1"), "{text}");
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data), ["fine"], "the stalled event was not stored");
}

/// A second hub on a data directory in use would write the same WAL: it
/// refuses to start, naming the directory and the running hub's pid, and
/// the running hub is untouched. Once it stops (even by `kill -9`), the
/// directory is free again.
#[test]
fn a_second_hub_on_the_same_data_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[]);
    let data_s = data.to_str().unwrap();
    let out = run(&["serve", "--listen", "127.0.0.1:0", "--data-dir", data_s]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let pid = server.child.id();
    assert!(stderr.contains(&format!("is in use by another hub (pid {pid})")), "{stderr}");
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&[ada("after", "c-1")]), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");
    server.kill9();
    let server = Server::start(&data, &[]);
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data), ["after"], "replayed after the kill");
}

/// The file of a put that a crash cut short (`<name>#<n>`, which
/// listings skip, so nothing else removes it, and which Spark would read
/// as a partial Parquet file) is removed when the hub starts, once it has
/// gone unwritten for an hour; a younger one may be another hub's upload
/// in progress and is left.
#[test]
fn unfinished_uploads_a_crash_left_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let part = data.join("lake/payments/account=111111111111/date=2024-05-01/hour=12");
    std::fs::create_dir_all(&part).unwrap();
    let (old, young) = (part.join("wal-0-1-5.parquet#3"), part.join("wal-0-6-9.parquet#4"));
    for p in [&old, &young] {
        std::fs::write(p, b"PAR1 and then nothing").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();
    let out = run(&["lake", "ls", "--data-dir", data.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout
            .contains("unfinished uploads: 2 file(s), 42 bytes, not counted above (1 idle for over an hour"),
        "{stdout}"
    );
    let server = Server::start(&data, &[]);
    assert!(server.stop().success());
    assert!(!old.exists(), "an abandoned upload is still there");
    assert!(young.exists(), "a recent upload was removed");
}

/// Two hubs, each with its own data directory, writing one lake (a
/// shared `lake.path`): both start their WAL at record 1, so their files
/// for the same partition must still not share a name (a create-only put
/// would take the other hub's file for its own and drop its rows). `lake
/// ls --config` lists the lake `lake.path` names.
#[test]
fn two_hubs_sharing_a_lake_keep_each_others_files() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let env = [("WATERSHED_LAKE__PATH", lake.to_str().unwrap())];
    let mut want = Vec::new();
    for hub in ["a", "b"] {
        let data = dir.path().join(hub);
        let token = add_account(&data, A[0]);
        let server = Server::start(&data, &env);
        let events: Vec<Value> = (0..3).map(|n| ada(&format!("{hub}-{n}"), "c-1")).collect();
        let (s, r, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
        assert_eq!((s, r["accepted"].as_u64()), (200, Some(3)), "{r}");
        assert!(server.stop().success());
        want.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(payment_ids_in(&lake), want, "both hubs' events, each once");
    // `lake ls` finds the lake where the hubs' configuration puts it.
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, format!("[lake]\npath = {:?}\n", lake.to_str().unwrap())).unwrap();
    let out = run(&["lake", "ls", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let payments = stdout.lines().find(|l| l.starts_with("payments ")).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(payments.split_whitespace().collect::<Vec<_>>()[..4], ["payments", "1", "2", "6"], "{stdout}");
}

/// The files named `*.<ext>` in the WAL directory of `data`, oldest first.
fn wal_paths(data: &std::path::Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<std::path::PathBuf> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    paths.sort();
    paths
}

/// Sizes of the files named `*.<ext>` in the WAL directory of `data`
/// (a file retired between the listing and its `stat` is gone, not an
/// error).
fn wal_files(data: &std::path::Path, ext: &str) -> Vec<u64> {
    wal_paths(data, ext)
        .iter()
        .filter_map(|p| match std::fs::metadata(p) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("{}: {e}", p.display()),
        })
        .collect()
}

/// Wait (at most `secs`) until no WAL segment of `data` holds an event.
fn wait_for_an_empty_wal(data: &std::path::Path, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while wal_files(data, "wal").iter().any(|&n| n > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "raw events still in the WAL after {secs} s: {:?}",
            wal_files(data, "wal")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Damage to a WAL segment other than the newest (a bit flipped on disk)
/// stops the start with an error naming the file and the way out; started
/// with `WATERSHED_WAL__SALVAGE=true`, the hub replays the segment's
/// records up to the damage and every later segment, keeps a copy of the
/// damaged file, and commits what it replayed exactly once.
#[test]
fn a_damaged_wal_segment_stops_the_start_until_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let env = [
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "3600"),
        ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "3600"),
        ("WATERSHED_WAL__SEGMENT_BYTES", "4096"),
    ];
    let server = Server::start(&data, &env);
    for r in 0..12 {
        let events: Vec<Value> = (0..5).map(|e| ada(&format!("r{r}-e{e}"), &format!("c{e}"))).collect();
        let (status, resp, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
        assert_eq!((status, resp["accepted"].as_u64()), (200, Some(5)), "{resp}");
    }
    server.kill9();
    let segments = wal_paths(&data, "wal");
    assert!(segments.len() >= 2, "{segments:?}");
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&segments[0], &bytes).unwrap();

    let schemas = watershed_tests::repo().join("schemas");
    let mut hub = watershed_tests::serve_command(&data, &schemas, &env).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while hub.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            hub.kill().unwrap();
            panic!("the hub started on a damaged WAL segment");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = hub.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let name = segments[0].file_name().unwrap().to_str().unwrap();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(name) && err.contains("WATERSHED_WAL__SALVAGE=true"), "{err}");

    let mut salvage = env.to_vec();
    salvage.push(("WATERSHED_WAL__SALVAGE", "true"));
    let server = Server::start(&data, &salvage);
    assert!(server.stop().success());
    assert_eq!(std::fs::read(segments[0].with_extension("wal.damaged")).unwrap(), bytes);
    let mut ids = payment_ids(&data);
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "an event stored twice");
    assert!(ids.contains(&"r0-e0".to_owned()), "the records before the damage are replayed: {ids:?}");
    assert!(ids.contains(&"r11-e4".to_owned()), "the later segments are replayed: {ids:?}");
    assert!(n < 60, "the records after the damage are gone: {ids:?}");
}

/// A running hub notices `keys forget` (run beside it) within about a
/// second and commits its open partitions, so the WAL drops the raw
/// events at once instead of after the roll age (an hour here).
#[test]
fn forgetting_a_subject_commits_what_the_wal_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let hold = [("WATERSHED_LAKE__ROLL_AGE_SECS", "3600"), ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "3600")];
    let server = Server::start(&data, &hold);
    let (status, resp, _) =
        post(&server.url, Some(&token), ndjson(&[ada("a1", "alice"), ada("b1", "bob")]), &[]);
    assert_eq!((status, resp["accepted"].as_u64()), (200, Some(2)), "{resp}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(wal_files(&data, "wal").iter().any(|&n| n > 0), "the events wait in the WAL for the roll age");
    assert!(read_table(&data.join("lake"), "payments").is_empty());

    forget(&data, A[0], "alice");
    wait_for_an_empty_wal(&data, 15);
    let ids = ids_by_table(&data.join("lake"));
    assert_eq!(ids["payments"].len(), 2, "both events were committed: {ids:?}");
    assert!(server.stop().success());
}

/// Raw events stay in the WAL only until their rows are committed; what
/// the dedupe window needs of them (their ids) outlives them, so a retry
/// after a restart is still recognised.
#[test]
fn committed_events_leave_the_wal_and_retries_after_a_restart_are_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let env = [("WATERSHED_LAKE__ROLL_AGE_SECS", "1"), ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "1")];
    let server = Server::start(&data, &env);
    let mut refused = ada("p-refused", "alice");
    refused["detail"]["currency"] = json!("DOGE");
    let body = || {
        let mut b = ndjson(&[ada("p-1", "alice"), ada("p-2", "bob"), refused.clone()]);
        b.extend_from_slice(b"{\"no id\": \"4111111111111111\"}\n");
        b
    };
    let (s, r, _) = post(&server.url, Some(&token), body(), &[]);
    assert_eq!(
        (s, r["accepted"].as_u64(), r["rejected"].as_array().map(Vec::len)),
        (200, Some(2), Some(2)),
        "{r}"
    );
    // Rolled after a second and committed; then the WAL holds no event.
    wait_for_an_empty_wal(&data, 30);
    assert!(wal_files(&data, "ids").iter().any(|&n| n > 0), "the ids of the committed events are kept");
    assert!(server.stop().success());

    // After a restart the same request is recognised: nothing is stored twice.
    let server = Server::start(&data, &env);
    let (s, r, _) = post(&server.url, Some(&token), body(), &[]);
    assert_eq!((s, r["accepted"].as_u64(), r["duplicates"].as_u64()), (200, Some(0), Some(2)), "{r}");
    assert!(server.stop().success());
    let ids = ids_by_table(&data.join("lake"));
    let count = |table: &str| ids[table].len();
    assert_eq!((count("payments"), count("_dead_letters")), (2, 2), "{ids:?}");
}

#[test]
fn mixed_versions_share_a_file_and_send_reports_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[]);
    // v1 events (explicitly named) and v2 events, same partition.
    let mut events = Vec::new();
    for n in 0..6 {
        let mut e = payment(&format!("v-{n}"), None, "c-1", "4111111111111111", "Ada");
        if n % 2 == 0 {
            e["schema-version"] = json!(1);
        } else {
            e["detail"]["acquirer_ref"] = json!(format!("ACQ-{n}"));
            e["detail"]["channel"] = json!("APP");
        }
        events.push(e);
    }
    let mut bad = payment("bad-1", None, "c-1", "4111", "X");
    bad["detail"]["three_ds"] = json!("yes");
    events.push(bad);
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, ndjson(&events)).unwrap();
    // The token from a file, as `echo "$TOKEN" > token` writes it.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (file_s, token_s) = (file.to_str().unwrap(), token_file.to_str().unwrap());
    let out = run(&["send", file_s, "--url", &server.url, "--token-file", token_s, "--batch", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "send exits 1 when anything was rejected\n{stdout}\n{stderr}");
    assert!(stdout.contains("accepted 6 rejected 1 duplicates 0"), "{stdout}");
    assert!(stderr.contains("rejected event 6 (id bad-1): type_mismatch at $.detail.three_ds"), "{stderr}");
    assert!(server.stop().success());

    let files = read_table(&data.join("lake"), "payments");
    let paths: std::collections::HashSet<_> = files.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(paths.len(), 1, "one file for both versions: {paths:?}");
    let (_, b) = &files[0];
    let versions = b.column_by_name("schema_version").unwrap();
    let versions = versions.as_any().downcast_ref::<arrow::array::Int32Array>().unwrap();
    let mut by_version = std::collections::BTreeMap::new();
    for (i, ch) in detail_strings(b, &["channel"]).into_iter().enumerate() {
        by_version.entry(versions.value(i)).or_insert_with(Vec::new).push(ch.unwrap());
    }
    assert_eq!(by_version[&1], ["WEB", "WEB", "WEB"], "v1 rows take v2's default");
    assert_eq!(by_version[&2], ["APP", "APP", "APP"]);
    let acq = detail_strings(b, &["acquirer_ref"]);
    assert_eq!(acq.iter().filter(|a| a.is_none()).count(), 3, "v1 rows have no acquirer_ref");

    let out = run(&["lake", "ls", "--data-dir", data.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text.lines().find(|l| l.starts_with("payments ")).unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cols[..4], ["payments", "1", "1", "6"], "{line}");
}

/// A leaked token is revoked beside the running hub: its next request is
/// refused (401 `bad_credentials`) while the account's other token still
/// works; revoking the account refuses every token it had, and revoking
/// what is not there is an error.
#[test]
fn a_revoked_token_is_refused_from_its_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    // (token id, token) from `accounts add`'s "created token ID for ...: TOKEN".
    let add = || {
        let out = run(&["accounts", "add", A[0], "--data-dir", data_s]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        (words[2].to_owned(), words.last().unwrap().to_string())
    };
    let ((id1, t1), (id2, t2)) = (add(), add());
    let out = run(&["accounts", "list", "--data-dir", data_s]);
    let listed = String::from_utf8_lossy(&out.stdout);
    for id in [&id1, &id2] {
        assert!(listed.lines().any(|l| l.starts_with(A[0]) && l.contains(id.as_str())), "{listed}");
    }
    assert!(!listed.contains(&t1[4..]) && !listed.contains(&t2[4..]), "tokens are never shown again");
    let server = Server::start(&data, &[]);
    let ok = |token: &str, id: &str| {
        let (s, r, _) = post(&server.url, Some(token), ndjson(&[ada(id, "c-1")]), &[]);
        (s, r["error"].as_str().map(str::to_owned))
    };
    assert_eq!(ok(&t1, "r-1"), (200, None));

    let out = run(&["accounts", "revoke", A[0], "--token", &id1, "--data-dir", data_s]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("revoked token {id1} of account {}", A[0]))
    );
    assert_eq!(ok(&t1, "r-2"), (401, Some("bad_credentials".into())), "refused from the next request");
    assert_eq!(ok(&t2, "r-3"), (200, None), "the other token still works");

    let out = run(&["accounts", "revoke", A[0], "--data-dir", data_s]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ok(&t2, "r-4"), (401, Some("bad_credentials".into())));
    let out = run(&["accounts", "revoke", A[0], "--data-dir", data_s]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("cannot revoke: account {} has no token", A[0])),
        "{stderr}"
    );
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data), ["r-1", "r-3"]);
}

/// A body of more events than `limits.max_batch_events` is answered 413
/// `too_large` saying so, and nothing of it is stored; `send` with a
/// larger `--batch` splits its batches in halves until they fit, as it
/// does for the byte limit, and every event lands once.
#[test]
fn a_batch_of_too_many_events_is_413_and_send_splits_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[("WATERSHED_LIMITS__MAX_BATCH_EVENTS", "10")]);
    let events: Vec<Value> = (0..25).map(|n| ada(&format!("m-{n}"), "c-1")).collect();
    let ct = [("content-type", "application/x-ndjson")];
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&events[..11]), &ct);
    assert_eq!((s, r["error"].as_str()), (413, Some("too_large")), "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(message.contains("more than 10 events") && message.contains("limits.max_batch_events"), "{r}");
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&events[..10]), &ct);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(10)), "{r}");
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, ndjson(&events)).unwrap();
    let out =
        run(&["send", file.to_str().unwrap(), "--url", &server.url, "--token", &token, "--batch", "25"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("accepted 15 rejected 0 duplicates 10"), "{stdout}\n{stderr}");
    assert!(server.stop().success());
    let mut expected: Vec<String> = (0..25).map(|n| format!("m-{n}")).collect();
    expected.sort();
    assert_eq!(payment_ids(&data), expected, "each event once");
}

/// `send` with batches over the hub's body limit: each batch answered 413
/// is split in halves until it fits, every event lands once, and a
/// reject is reported by its line in the file. A single event over the
/// limit is reported as rejected, `too_large`, and the events around it
/// are sent.
#[test]
fn send_splits_batches_over_the_body_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let limits =
        [("WATERSHED_LIMITS__MAX_BODY_BYTES", "20000"), ("WATERSHED_LIMITS__MAX_EVENT_BYTES", "10000")];
    let server = Server::start(&data, &limits);
    let mut events: Vec<Value> = (0..60).map(|n| ada(&format!("s-{n}"), "c-1")).collect();
    events[37]["detail"]["three_ds"] = json!("yes");
    let body = ndjson(&events);
    assert!(body.len() / 60 * 50 > 20_000, "a batch of 50 is over the limit");
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, &body).unwrap();
    let send = |file: &std::path::Path| {
        run(&["send", file.to_str().unwrap(), "--url", &server.url, "--token", &token, "--batch", "50"])
    };
    let out = send(&file);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "one reject\n{stdout}\n{stderr}");
    assert!(stdout.contains("accepted 59 rejected 1 duplicates 0"), "{stdout}\n{stderr}");
    assert!(stderr.contains("rejected event 37 (id s-37): type_mismatch"), "{stderr}");

    // A line that is not UTF-8 is the hub's to reject, by its index.
    let mut body = ndjson(&[ada("u-0", "c-1")]);
    body.extend_from_slice(b"{\"id\": \"\xff\xfe\"}\n");
    body.extend_from_slice(&ndjson(&[ada("u-2", "c-1")]));
    let file = dir.path().join("latin1.ndjson");
    std::fs::write(&file, &body).unwrap();
    let out = send(&file);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("accepted 2 rejected 1 duplicates 0"), "{stdout}\n{stderr}");
    assert!(stderr.contains("rejected event 1 (id ?): malformed"), "{stderr}");

    // A JSON array (pretty-printed, in batches of 50) and objects as
    // `jq .` prints them are read event by event, not line by line.
    let array: Vec<Value> = (0..70).map(|n| ada(&format!("x-{n}"), "c-1")).collect();
    let pretty_objects: String = [ada("p-0", "c-1"), ada("p-1", "c-1")]
        .iter()
        .map(|e| serde_json::to_string_pretty(e).unwrap() + "\n")
        .collect();
    for (name, text, shape, events) in [
        ("array.json", serde_json::to_string_pretty(&array).unwrap(), "a JSON array", 70),
        ("pretty.json", pretty_objects, "JSON objects one after another", 2),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = send(&file);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("accepted {events} rejected 0 duplicates 0")), "{stdout}\n{stderr}");
        assert!(stderr.contains(&format!("reading {} as {shape}", file.display())), "{stderr}");
    }
    // One whose JSON breaks stops there, naming the event and its line;
    // the batches before it were sent.
    let mut broken = serde_json::to_string_pretty(&array[..60]).unwrap();
    broken.truncate(broken.rfind('}').unwrap());
    let file = dir.path().join("broken.json");
    std::fs::write(&file, &broken).unwrap();
    let out = send(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped after sending 50 events (accepted 0, rejected 0, duplicates 50)"),
        "{stderr}"
    );
    assert!(stderr.contains("event 59 (from line") && stderr.contains("is not JSON"), "{stderr}");

    let mut big = ada("big", "c-1");
    big["detail"]["card"]["holder_name"] = json!("x".repeat(30_000));
    let file = dir.path().join("big.ndjson");
    std::fs::write(&file, ndjson(&[ada("before-big", "c-1"), big, ada("after-big", "c-1")])).unwrap();
    let out = send(&file);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("accepted 2 rejected 1 duplicates 0"), "{stdout}\n{stderr}");
    assert!(stderr.contains("rejected event 1 (id big): too_large at $"), "{stderr}");
    assert!(stderr.contains("over the hub's body limit") && stderr.contains("not sent"), "{stderr}");

    // A token the hub refuses stops the send at once, saying so first.
    let out = run(&["send", file.to_str().unwrap(), "--url", &server.url, "--token", "wsh_wrong"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: the hub refused the token (401 bad_credentials: "), "{stderr}");
    assert!(stderr.contains("--token-file") && !stderr.contains("retrying"), "{stderr}");
    assert!(server.stop().success());
    let got = payment_ids(&data);
    let mut want: Vec<String> = (0..60)
        .filter(|&n| n != 37)
        .map(|n| format!("s-{n}"))
        .chain(["u-0", "u-2", "before-big", "after-big", "p-0", "p-1"].map(String::from))
        .chain((0..70).map(|n| format!("x-{n}")))
        .collect();
    want.sort();
    assert_eq!(got, want, "every event sent is in the lake once");
}

/// A hub (here a stand-in on a loopback port) whose 200 answer accounts
/// for fewer events than the batch held makes `send` stop and say so,
/// non-zero: events it cannot account for are never reported as sent.
#[test]
fn send_refuses_an_answer_that_does_not_account_for_every_event() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
                if line == "\r\n" {
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let answer = r#"{"accepted":1,"duplicates":0,"rejected":[]}"#;
                    let mut w = &stream;
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    )
                    .unwrap();
                    length = 0;
                }
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, ndjson(&[ada("x-0", "alice"), ada("x-1", "alice"), ada("x-2", "alice")])).unwrap();
    let out = run(&["send", file.to_str().unwrap(), "--url", &url, "--token", "wsh_any", "--retries", "0"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr
            .contains("the hub answered for 1 of events 0..3 (3 sent: accepted 1, duplicates 0, rejected 0)"),
        "{stderr}"
    );
    assert!(!stdout.contains("accepted 1 rejected 0"), "no summary as if all went well: {stdout}");
}

/// The README's first command: `watershed demo` starts a hub, sends every
/// event it was asked for, and each accepted one is in the lake and each
/// rejected one in `_dead_letters`.
#[test]
fn the_demo_lands_every_event_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = run(&["demo", "--events", "1001", "--data-dir", data.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("sent ")).unwrap_or_else(|| panic!("{stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |after: &str| -> usize {
        let i = words.iter().position(|w| w.trim_end_matches(',') == after).unwrap();
        words[i - 1].trim_end_matches(':').parse().unwrap()
    };
    assert_eq!(words[1], "1001", "{line}");
    let (accepted, rejected) = (number("accepted"), number("rejected"));
    assert_eq!(accepted + rejected, 1001, "{line}");
    assert!(rejected > 0, "the demo sends some invalid events: {line}");
    let ids = ids_by_table(&data.join("lake"));
    let stored: usize = ids.iter().filter(|(t, _)| *t != "_dead_letters").map(|(_, v)| v.len()).sum();
    assert_eq!(stored, accepted);
    assert_eq!(ids["_dead_letters"].len(), rejected);
}

/// A client that hangs up while its request is in flight (its own
/// timeout, a crash) must not leave the request half done: events the
/// hub wrote to its WAL still reach the lake without a restart, so their
/// segments retire. Otherwise the WAL would keep them until the next
/// start (and, at its bound, refuse all ingest), while a retry of the same
/// events was answered as duplicates that were nowhere in the lake.
#[test]
fn a_client_that_hangs_up_mid_request_leaves_nothing_half_done() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let env = [("WATERSHED_LAKE__ROLL_AGE_SECS", "1"), ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "1")];
    let server = Server::start(&data, &env);
    let addr = server.url.strip_prefix("http://").unwrap().to_owned();
    let mut sent = Vec::new();
    for b in 0..20 {
        let events = payments(b);
        let body = ndjson(&events);
        let head = post_head(&addr, &token, body.len());
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        // Hang up at once, without reading the answer; a few at once.
        std::thread::sleep(std::time::Duration::from_millis([0, 2, 4, 6][b % 4]));
        drop(s);
        sent.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
    }
    // A retry of all of them: whatever the hub kept is a duplicate, the
    // rest is accepted now.
    for b in 0..20 {
        let (s, r, _) = post(&server.url, Some(&token), ndjson(&payments(b)), &[]);
        assert_eq!(s, 200, "{r}");
        let stored = r["accepted"].as_u64().unwrap() + r["duplicates"].as_u64().unwrap();
        assert_eq!(stored, 1000, "{r}");
    }
    wait_for_an_empty_wal(&data, 30);
    sent.sort();
    let got = payment_ids(&data);
    let missing: Vec<_> = sent.iter().filter(|i| !got.contains(i)).take(5).collect();
    assert_eq!(
        got,
        sent,
        "every event in the lake once, before any restart: {} of {}, missing {missing:?}",
        got.len(),
        sent.len()
    );
    assert!(server.stop().success());
}

/// Read from `s` until the server closes the connection; what it sent.
fn read_to_close(s: &mut std::net::TcpStream, secs: u64) -> String {
    use std::io::Read as _;
    s.set_read_timeout(Some(std::time::Duration::from_secs(secs))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return String::from_utf8_lossy(&answer).into_owned(),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return String::from_utf8_lossy(&answer).into_owned()
            }
            Err(e) => panic!("the connection was not closed within {secs} s: {e}"),
        }
    }
}

/// A client that sends its headers slowly (or never), or keeps an idle
/// connection, is disconnected after `limits.header_timeout_secs`; at most
/// `limits.max_connections` connections are open, and a client over the
/// cap is served once one closes instead of being refused or exhausting
/// the hub's file descriptors.
#[test]
fn slow_headers_and_idle_connections_are_closed_and_connections_are_capped() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let env = [("WATERSHED_LIMITS__HEADER_TIMEOUT_SECS", "1"), ("WATERSHED_LIMITS__MAX_CONNECTIONS", "2")];
    let server = Server::start(&data, &env);
    let addr = server.url.strip_prefix("http://").unwrap().to_owned();

    // Headers that never end: closed after the header timeout.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    let started = std::time::Instant::now();
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ").unwrap();
    read_to_close(&mut slow, 10);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(5),
        "{took:?}"
    );

    // Two idle connections fill the cap: a third client waits until the
    // hub closes them, then is served.
    let idle: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let started = std::time::Instant::now();
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&[ada("capped", "c-1")]), &[]);
    let took = started.elapsed();
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");
    assert!(
        took >= std::time::Duration::from_millis(500) && took < std::time::Duration::from_secs(8),
        "served after the idle connections closed: {took:?}"
    );
    for mut c in idle {
        read_to_close(&mut c, 10);
    }
    let text = metrics(&server);
    assert!(metric(&text, "watershed_http_connections") >= 1.0, "{text}");
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data), ["capped"]);
}

/// SIGTERM while a client is stalled in the middle of its body (well
/// within `limits.body_timeout_secs`): the hub still exits 0 within
/// `shutdown_timeout_secs`, closing that connection unanswered after a
/// third of it, and commits what it acknowledged.
#[test]
fn a_stalled_client_does_not_hold_up_shutdown() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let env = [("WATERSHED_SHUTDOWN_TIMEOUT_SECS", "3"), ("WATERSHED_LIMITS__BODY_TIMEOUT_SECS", "120")];
    let server = Server::start(&data, &env);
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&[ada("before", "c-1")]), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");
    let addr = server.url.strip_prefix("http://").unwrap().to_owned();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    let body = ndjson(&[ada("stalled", "c-1")]);
    let head = post_head(&addr, &token, body.len());
    stalled.write_all(head.as_bytes()).unwrap();
    stalled.write_all(&body[..body.len() / 2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    assert!(server.stop().success());
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(4), "stopped in {took:?}");
    assert_eq!(read_to_close(&mut stalled, 5), "", "closed unanswered");
    assert_eq!(payment_ids(&data), ["before"]);
}

/// An event dated further ahead of its receipt than
/// `limits.max_future_secs` (a wrong clock or time zone) is rejected as
/// `future_time` into `_dead_letters` instead of opening a partition for
/// an hour to come; one within the bound is accepted. With
/// `limits.max_past_secs` set, an event dated further back (Go's zero
/// time, say) is rejected as `past_time`. What was accepted stays
/// accepted when the WAL is replayed under tighter bounds.
#[test]
fn events_dated_too_far_ahead_are_rejected_and_replay_keeps_what_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let at = |hours: i64| {
        (chrono::Utc::now() + chrono::Duration::hours(hours))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let dated = |id: &str, hours: i64| {
        let mut e = ada(id, "c-1");
        e["time"] = json!(at(hours));
        e
    };
    let a_month = (30 * 86_400).to_string();
    let server = Server::start(&data, &[("WATERSHED_LIMITS__MAX_PAST_SECS", &a_month)]);
    let mut zero = ada("zero-time", "c-1");
    zero["time"] = json!("0001-01-01T00:00:00Z");
    let events = [
        dated("soon", 2),
        dated("next-week", 24 * 7),
        dated("now", 0),
        dated("last-week", -24 * 7),
        zero,
        dated("last-year", -24 * 365),
    ];
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(3)), "{r}");
    let rejected: Vec<(u64, &str, &str)> = r["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["index"].as_u64().unwrap(), x["reason"].as_str().unwrap(), x["path"].as_str().unwrap()))
        .collect();
    let at_time = |i, reason| (i, reason, "$.time");
    assert_eq!(
        rejected,
        [at_time(1, "future_time"), at_time(4, "past_time"), at_time(5, "past_time")],
        "{r}"
    );
    assert!(r["rejected"][0]["detail"].as_str().unwrap().contains("limits.max_future_secs"), "{r}");
    let detail = r["rejected"][1]["detail"].as_str().unwrap();
    assert!(detail.contains("at most 2592000 s back") && detail.contains("limits.max_past_secs"), "{r}");
    // Not committed yet (the roll age is a minute): the WAL holds them.
    server.kill9();
    let tighter = [("WATERSHED_LIMITS__MAX_FUTURE_SECS", "60"), ("WATERSHED_LIMITS__MAX_PAST_SECS", "60")];
    let server = Server::start(&data, &tighter);
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data), ["last-week", "now", "soon"], "replay keeps what was accepted");
    let ids = ids_by_table(&data.join("lake"));
    let mut dead: Vec<&str> = ids["_dead_letters"].iter().map(|(_, id)| id.as_str()).collect();
    dead.sort_unstable();
    assert_eq!(dead, ["last-year", "next-week", "zero-time"]);
}

/// Rounds of 50 payments from one account (one closed partition), each
/// committed as a file of its own.
fn payment_rounds(server: &Server, token: &str, data: &std::path::Path, rounds: std::ops::Range<usize>) {
    for round in rounds {
        let events: Vec<Value> = (0..50).map(|i| ada(&format!("p-{round}-{i}"), "alice")).collect();
        let (s, r, _) = post(&server.url, Some(token), ndjson(&events), &[]);
        assert_eq!((s, r["accepted"].as_u64()), (200, Some(50)), "{r}");
        wait_for_an_empty_wal(data, 30);
    }
}

/// A closed partition's small files are merged into one: by `lake compact`
/// on a stopped hub (which refuses while the hub runs; its dry run does
/// not), and by the running hub every `lake.compact_every_secs`. DuckDB
/// reads every event exactly once, protected as before, and the hub still
/// answers retries as duplicates.
#[test]
fn small_files_of_closed_partitions_are_merged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let token = add_account(&data, A[0]);
    let mut env = vec![
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "1"),
        ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "1"),
        ("WATERSHED_LAKE__COMPACT_EVERY_SECS", "0"),
    ];
    let server = Server::start(&data, &env);
    payment_rounds(&server, &token, &data, 0..4);
    assert_eq!(parquet_files(&data.join("lake/payments")).len(), 4);
    let busy = run(&["lake", "compact", "--data-dir", data_arg]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    // A dry run says what the pass would do and does none of it; it
    // takes no lock, so it runs beside the hub.
    let files_before = parquet_files(&data.join("lake/payments"));
    let log_before = std::fs::read(data.join("wal/commits.log")).unwrap();
    let wal_names = || {
        let mut names: Vec<_> =
            std::fs::read_dir(data.join("wal")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let wal_before = wal_names();
    let out = run(&["lake", "compact", "--data-dir", data_arg, "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("would merge 4 files into 1, 200 rows"), "{stdout}");
    assert!(stdout.contains("nothing was written or deleted"), "{stdout}");
    assert_eq!(parquet_files(&data.join("lake/payments")), files_before);
    assert_eq!(std::fs::read(data.join("wal/commits.log")).unwrap(), log_before);
    assert_eq!(wal_names(), wal_before, "nothing made in the log's directory");
    assert!(server.stop().success());

    let out = run(&["lake", "compact", "--data-dir", data_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("4 files merged into 1, 200 rows"), "{stdout}");
    let files = parquet_files(&data.join("lake/payments"));
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_str().unwrap().ends_with("-merged.parquet"));
    let ids = payment_ids(&data);
    assert_eq!(ids.len(), 200);
    assert_eq!(ids.iter().collect::<std::collections::BTreeSet<_>>().len(), 200);

    // The running hub compacts by itself: three more files join the
    // merged one within a few passes.
    env[2].1 = "1";
    let server = Server::start(&data, &env);
    payment_rounds(&server, &token, &data, 4..7);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while parquet_files(&data.join("lake/payments")).len() > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(
        parquet_files(&data.join("lake/payments")).len(),
        1,
        "{:?}",
        parquet_files(&data.join("lake/payments"))
    );
    assert!(metric(&metrics(&server), "watershed_compacted_files_total") >= 2.0);
    // A retry of an early round is still a duplicate.
    let events: Vec<Value> = (0..50).map(|i| ada(&format!("p-0-{i}"), "alice")).collect();
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&events), &[]);
    assert_eq!((s, r["accepted"].as_u64(), r["duplicates"].as_u64()), (200, Some(0), Some(50)), "{r}");
    assert!(server.stop().success());

    assert_eq!(payment_ids(&data).len(), 350);
    if let Some(py) = python() {
        let lake = data.join("lake");
        let rows = duckdb(&py, &lake, "SELECT count(*), count(DISTINCT event_id), count(*) FILTER (WHERE detail.card.holder_name LIKE 'wse1.%'), count(*) FILTER (WHERE detail.card.expiry IS NULL) FROM read_parquet('{lake}/payments/**/*.parquet', hive_partitioning=true, hive_types={'account': VARCHAR})");
        assert_eq!(rows, vec![json!([350, 350, 350, 350])]);
    }
}

/// A file of the lake damaged on disk (its footer overwritten) is named
/// by `lake compact`, which exits non-zero, leaves it exactly as it is and
/// merges the files after it apart from the one before it; DuckDB still
/// reads every event of the other files once.
#[test]
fn lake_compact_names_a_damaged_file_and_merges_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let token = add_account(&data, A[0]);
    let env = [
        ("WATERSHED_LAKE__ROLL_AGE_SECS", "1"),
        ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "1"),
        ("WATERSHED_LAKE__COMPACT_EVERY_SECS", "0"),
    ];
    let server = Server::start(&data, &env);
    payment_rounds(&server, &token, &data, 0..4);
    assert!(server.stop().success());
    let mut files = parquet_files(&data.join("lake/payments"));
    files.sort();
    assert_eq!(files.len(), 4);
    let mut damaged = std::fs::read(&files[1]).unwrap();
    let n = damaged.len();
    damaged[n - 40..n - 8].fill(0xff);
    std::fs::write(&files[1], &damaged).unwrap();

    let out = run(&["lake", "compact", "--data-dir", data_arg]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("2 files merged into 1, 100 rows"), "{stdout}");
    let name = files[1].file_name().unwrap().to_str().unwrap();
    assert!(stderr.contains("cannot read a file of the lake") && stderr.contains(name), "{stderr}");
    assert!(stderr.contains("1 file(s) cannot be read"), "{stderr}");
    assert_eq!(std::fs::read(&files[1]).unwrap(), damaged, "left exactly as it is");
    let mut after = parquet_files(&data.join("lake/payments"));
    after.sort();
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!((&after[0], &after[1]), (&files[0], &files[1]));
    assert!(after[2].to_str().unwrap().ends_with("-merged.parquet"));
    if let Some(py) = python() {
        let readable: Vec<String> =
            [&after[0], &after[2]].iter().map(|p| format!("'{}'", p.to_str().unwrap())).collect();
        let rows = duckdb(
            &py,
            &data.join("lake"),
            &format!(
                "SELECT count(*), count(DISTINCT event_id) FROM read_parquet([{}])",
                readable.join(", ")
            ),
        );
        assert_eq!(rows, vec![json!([150, 150])]);
    }
}

/// NDJSON of payments `<prefix>-<n>` padded with blank lines to exactly
/// `size` bytes; returns the body and the ids.
fn payments_of_size(prefix: &str, size: usize) -> (Vec<u8>, Vec<String>) {
    let (mut body, mut ids) = (Vec::new(), Vec::new());
    for n in 0.. {
        let id = format!("{prefix}-{n}");
        let line = ndjson(&[ada(&id, &format!("c{}", n % 10))]);
        if body.len() + line.len() > size {
            break;
        }
        body.extend_from_slice(&line);
        ids.push(id);
    }
    body.resize(size, b'\n');
    (body, ids)
}

/// An upload whose head and first bytes are sent, the rest held back.
struct Upload {
    stream: std::net::TcpStream,
    rest: Vec<u8>,
}

impl Upload {
    fn start(url: &str, head: &str, body: &[u8], first: usize) -> Self {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(url.strip_prefix("http://").unwrap()).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body[..first]).unwrap();
        Self { stream, rest: body[first..].to_vec() }
    }

    /// Send the rest; the status line and the JSON answer.
    fn finish(mut self) -> (String, Value) {
        use std::io::{Read as _, Write as _};
        self.stream.write_all(&self.rest).unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        let complete = |a: &[u8]| {
            let text = String::from_utf8_lossy(a);
            let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok());
            length.is_some_and(|n| body.len() >= n)
        };
        while !complete(&answer) {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.lines().next().unwrap_or("").to_owned(), serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

/// Request bodies in flight are bounded by `memory.requests_bytes`, and
/// one account's by `memory.requests_bytes_per_account`. Two uploads of
/// account A declaring the largest body hold A's share while they
/// arrive: A's next request is answered 503 `busy` on its headers
/// (before any of its body is sent) while account B is still served.
/// With B's upload the whole bound is held: `/readyz` says busy, a
/// chunked request (no declared length) is refused as its first bytes
/// arrive, and a gzip body while it is being decompressed. Once the
/// uploads finish their holds are given back, the refused requests are
/// accepted when retried, and every event is in the lake exactly once.
#[test]
fn request_bodies_in_flight_are_bounded_and_refused_before_they_are_read() {
    use std::io::Write as _;
    const MAX_BODY: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (token, other) = (add_account(&data, A[0]), add_account(&data, A[1]));
    let server = Server::start(
        &data,
        &[
            ("WATERSHED_MEMORY__REQUESTS_BYTES", "3000000"),
            ("WATERSHED_MEMORY__REQUESTS_BYTES_PER_ACCOUNT", "2000000"),
            ("WATERSHED_LIMITS__MAX_BODY_BYTES", "1000000"),
            ("WATERSHED_LIMITS__MAX_EVENT_BYTES", "100000"),
        ],
    );
    let addr = server.url.strip_prefix("http://").unwrap().to_owned();
    let held_reaches = |bytes: f64| {
        (0..100)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                metric(&metrics(&server), "watershed_request_bytes")
            })
            .find(|&v| v >= bytes)
    };
    let (first, first_ids) = payments_of_size("first", MAX_BODY);
    let (second, second_ids) = payments_of_size("second", MAX_BODY);
    let a1 = Upload::start(&server.url, &post_head(&addr, &token, MAX_BODY), &first, 1000);
    let a2 = Upload::start(&server.url, &post_head(&addr, &token, MAX_BODY), &second, 1000);
    assert_eq!(held_reaches(2_000_000.0), Some(2_000_000.0), "two declared bodies held");

    // A's share is held: A is refused on its headers, B is served.
    let (third, third_ids) = payments_of_size("third", 10_000);
    let (status, took) = raw_request(&server.url, &post_head(&addr, &token, third.len()), b"", 10);
    assert!(status.contains(" 503 "), "{status}");
    assert!(took < std::time::Duration::from_secs(5), "refused on the headers: {took:?}");
    let (b_small, b_small_ids) = payments_of_size("b-small", 10_000);
    let (s, r, _) = post(&server.url, Some(&other), b_small, &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(b_small_ids.len() as u64)), "{r}");

    // B's upload takes the rest of the whole bound.
    let (b_big, b_big_ids) = payments_of_size("b-big", MAX_BODY);
    let b1 = Upload::start(&server.url, &post_head(&addr, &other, MAX_BODY), &b_big, 1000);
    assert_eq!(held_reaches(3_000_000.0), Some(3_000_000.0), "three declared bodies held");
    let ready = reqwest::blocking::get(format!("{}/readyz", server.url)).unwrap();
    assert_eq!(ready.status().as_u16(), 503, "not ready while request memory is spent");
    // Chunked: refused as its first chunk arrives.
    let chunked = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let mut body = format!("{:x}\r\n", third.len()).into_bytes();
    body.extend_from_slice(&third);
    body.extend_from_slice(b"\r\n0\r\n\r\n");
    let (status, _) = raw_request(&server.url, &chunked, &body, 10);
    assert!(status.contains(" 503 "), "{status}");

    // Finish A's first upload; the others still hold 2 MB.
    let (status, r) = a1.finish();
    assert!(status.contains(" 200 "), "{status} {r}");
    assert_eq!(r["accepted"].as_u64(), Some(first_ids.len() as u64), "{r}");

    // A gzip body of 900 KB of text in a few KB: its decompressed bytes
    // do not fit beside the uploads' holds.
    let (big, big_ids) = payments_of_size("gzip", 900_000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&big).unwrap();
    let gzipped = gz.finish().unwrap();
    let gzip = [("Content-Type", "application/x-ndjson"), ("Content-Encoding", "gzip")];
    let (s, r, h) = post(&server.url, Some(&token), gzipped.clone(), &gzip);
    assert_eq!((s, r["error"].as_str()), (503, Some("busy")), "{r}");
    assert!(r["message"].as_str().unwrap().contains("memory.requests_bytes"), "{r}");
    assert_eq!(h.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));

    for upload in [a2, b1] {
        let (status, r) = upload.finish();
        assert!(status.contains(" 200 "), "{status} {r}");
    }
    assert_eq!(metric(&metrics(&server), "watershed_request_bytes"), 0.0, "every hold given back");
    // The refused requests, retried, are accepted.
    let (s, r, _) = post(&server.url, Some(&token), gzipped, &gzip);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(big_ids.len() as u64)), "{r}");
    let (s, r, _) = post(&server.url, Some(&token), third, &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(third_ids.len() as u64)), "{r}");
    let text = metrics(&server);
    assert!(text.lines().any(|l| l == "watershed_requests_refused_total{reason=\"busy\"} 3"), "{text}");
    assert!(server.stop().success());
    let mut expected: Vec<String> = [first_ids, second_ids, third_ids, big_ids].concat();
    expected.sort();
    assert_eq!(payment_ids_in_account(&data, A[0]), expected, "A's events once each, nothing refused twice");
    let mut expected: Vec<String> = [b_small_ids, b_big_ids].concat();
    expected.sort();
    assert_eq!(payment_ids_in_account(&data, A[1]), expected, "B's events once each");
}

/// `send --concurrency 8` keeps eight batches in flight and still reports
/// rejects in the input's order with their indexes in the file, and
/// totals that match the lake; a hub that does not answer is an error
/// naming the first batch not sent.
#[test]
fn send_with_batches_in_flight_reports_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[]);
    let mut events: Vec<Value> = (0..400).map(|n| ada(&format!("k-{n}"), &format!("c{}", n % 7))).collect();
    let bad = [3usize, 97, 98, 250, 399];
    for &i in &bad {
        events[i]["detail"]["three_ds"] = json!("yes");
    }
    // Lines that are arrays are one refused event each, also when one
    // starts a batch (98 = 14 x 7): the body is NDJSON, as `send`
    // declares it, not a JSON array of the line's elements.
    events[98] = json!([1, 2]);
    events[250] = json!(["x", {"y": 1}]);
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, ndjson(&events)).unwrap();
    let args = ["--url", &server.url, "--token", &token, "--batch", "7", "--concurrency", "8"];
    let out = run(&[&["send", file.to_str().unwrap()][..], &args].concat());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("accepted 395 rejected 5 duplicates 0"), "{stdout}\n{stderr}");
    let reported: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("rejected event "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(reported, bad, "in input order, indexed in the file\n{stderr}");
    let out =
        run(&["send", file.to_str().unwrap(), "--url", &server.url, "--token", &token, "--concurrency", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--concurrency must be at least 1"));
    let url = server.url.clone();
    assert!(server.stop().success());
    let mut expected: Vec<String> = (0..400).filter(|i| !bad.contains(i)).map(|n| format!("k-{n}")).collect();
    expected.sort();
    assert_eq!(payment_ids(&data), expected);

    // Nothing listens any more: the error names the first batch (tried
    // once: `--retries 0`).
    let args = ["--url", &url, "--token", &token, "--batch", "100", "--concurrency", "3", "--retries", "0"];
    let out = run(&[&["send", file.to_str().unwrap()][..], &args].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("events 0..100 were not all sent"), "{stderr}");
    assert!(stderr.contains("later batches may have been sent too"), "{stderr}");
    assert!(stderr.contains("giving up after 1 attempt: "), "{stderr}");
}

/// `send` compresses its request bodies with zstd unless told not to: the
/// hub receives a fraction of the file's bytes, and with `--compress
/// none` all of them (`--compress gzip` a fraction too); every event
/// lands either way.
#[test]
fn send_compresses_its_bodies_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let server = Server::start(&data, &[]);
    let mut sizes = Vec::new();
    for (round, how) in [(0, None), (1, Some("none")), (2, Some("zstd")), (3, Some("gzip"))] {
        let events: Vec<Value> =
            (0..300).map(|n| ada(&format!("z{round}-{n}"), &format!("c{}", n % 7))).collect();
        let file = dir.path().join(format!("events-{round}.ndjson"));
        std::fs::write(&file, ndjson(&events)).unwrap();
        let before = metric(&metrics(&server), "watershed_ingest_bytes_total");
        let mut args = vec!["send", file.to_str().unwrap(), "--url", &server.url, "--token", &token];
        if let Some(how) = how {
            args.extend(["--compress", how]);
        }
        let out = run(&args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("accepted 300 rejected 0 duplicates 0"), "{stdout}\n{stderr}");
        let sent = metric(&metrics(&server), "watershed_ingest_bytes_total") - before;
        sizes.push((sent, std::fs::metadata(&file).unwrap().len() as f64));
    }
    let [(zstd, raw), (plain, raw_plain), (zstd_again, _), (gzip, _)] = sizes[..] else { unreachable!() };
    assert!(zstd < raw / 4.0, "compressed by default: {zstd} of {raw} bytes");
    assert_eq!(plain, raw_plain, "--compress none sends the file as it is");
    assert!(zstd_again < raw / 4.0, "--compress zstd: {zstd_again} of {raw} bytes");
    assert!(gzip < raw / 4.0, "--compress gzip: {gzip} of {raw} bytes");
    let out = run(&["send", "-", "--url", &server.url, "--token", &token, "--compress", "brotli"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid value 'brotli'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data).len(), 1200);
}

/// The hub serving HTTPS (`[tls]`), and `send` to it trusting a private
/// CA given with `--ca-cert`: every event lands. Without the CA, or to a
/// hub on plain HTTP, the send stops at once (no retries) saying TLS
/// failed and why; a `--ca-cert` without a certificate is refused before
/// anything is sent. A client speaking plain HTTP to the TLS port, or
/// stalling in the handshake, is cut off and the hub goes on serving.
#[test]
fn https_serve_and_send_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let certs = watershed_tests::TestCerts::new(dir.path());
    let ca = certs.ca.to_str().unwrap();
    let events: Vec<Value> = (0..120).map(|n| ada(&format!("tls-{n}"), &format!("c{}", n % 5))).collect();
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, ndjson(&events)).unwrap();
    let file = file.to_str().unwrap();
    let send = |url: &str, extra: &[&str]| {
        let out =
            run(&[&["send", file, "--url", url, "--token", &token, "--batch", "50"][..], extra].concat());
        let text =
            format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };

    // A plain HTTP hub asked for https://.
    let server = Server::start(&data, &[]);
    let (code, text) = send(&server.url.replace("http://", "https://"), &["--ca-cert", ca]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("TLS with the hub failed") && text.contains("does not speak TLS"), "{text}");
    assert!(server.stop().success());

    let tls = [
        ("WATERSHED_TLS__CERT_FILE", certs.cert.to_str().unwrap()),
        ("WATERSHED_TLS__KEY_FILE", certs.key.to_str().unwrap()),
        ("WATERSHED_LIMITS__HEADER_TIMEOUT_SECS", "2"),
    ];
    let server = Server::start(&data, &tls);
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
    let (code, text) = send(&server.url, &["--ca-cert", ca]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("accepted 120 rejected 0 duplicates 0"), "{text}");

    let (code, text) = send(&server.url, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("TLS with the hub failed") && text.contains("pass --ca-cert"), "{text}");
    assert!(!text.contains("giving up after"), "a certificate failure is not retried: {text}");
    let (code, text) = send(&server.url, &["--ca-cert", file]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no PEM certificate"), "{text}");

    // Plain HTTP to the TLS port gets no HTTP answer; a client that never
    // starts its handshake is closed after the header timeout.
    use std::io::{Read as _, Write as _};
    let addr = server.url.trim_start_matches("https://").to_owned();
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1"), "{answer:?}");
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let read = idle.read(&mut [0u8; 64]);
    assert!(matches!(read, Ok(0)), "closed after the handshake timeout: {read:?}");

    let pem = std::fs::read(&certs.ca).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let ready = client.get(format!("{}/readyz", server.url)).send().unwrap();
    assert_eq!(ready.status().as_u16(), 200, "still serving");
    // The served certificate's expiry is published, for an alert on a
    // renewal that did not happen.
    let metrics = client.get(format!("{}/metrics", server.url)).send().unwrap().text().unwrap();
    let expiry = metrics
        .lines()
        .find(|l| l.starts_with("watershed_tls_certificate_expiry_timestamp_seconds{cert_file="))
        .unwrap_or_else(|| panic!("no expiry gauge in {metrics}"));
    let at: i64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(at > chrono::Utc::now().timestamp(), "{expiry}");
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data).len(), 120, "each event once");
}

/// A schema version that adds a field and widens another, deployed by a
/// restart: files written before it keep the older columns, files after
/// it have the new ones. Read by column name across them (DuckDB's
/// `union_by_name`, as the README's queries do), the table has every
/// row once, the new field NULL in the older rows, and the widened type
/// for all.
#[test]
fn a_new_schema_version_is_read_by_name_across_older_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let subject = dir.path().join("schemas/identity.user_login");
    std::fs::create_dir_all(&subject).unwrap();
    let repo_subject = watershed_tests::repo().join("schemas/identity.user_login");
    for f in ["subject.toml", "v1.avsc"] {
        std::fs::copy(repo_subject.join(f), subject.join(f)).unwrap();
    }
    let schemas = dir.path().join("schemas");
    let server = Server::start_with_schemas(&data, &schemas, &[]);
    let old: Vec<Value> = (0..3).map(|i| login(&format!("v1-{i}"), &format!("u{i}"))).collect();
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&old), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(3)), "{r}");
    assert!(server.stop().success());

    std::fs::copy(repo_subject.join("v2.avsc"), subject.join("v2.avsc")).unwrap();
    let server = Server::start_with_schemas(&data, &schemas, &[]);
    let new: Vec<Value> = (0..2)
        .map(|i| {
            let mut e = login(&format!("v2-{i}"), &format!("w{i}"));
            e["data"]["geo"] = json!({"country": "FR", "city": "Lyon"});
            e["data"]["attempt"] = json!(5_000_000_000_i64);
            e
        })
        .collect();
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&new), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(2)), "{r}");
    assert!(server.stop().success());

    let lake = data.join("lake");
    assert_eq!(parquet_files(&lake.join("logins")).len(), 2, "one file per layout");
    if let Some(py) = python() {
        let rows = duckdb(
            &py,
            &lake,
            "SELECT count(*), count(DISTINCT event_id), count(detail.geo), max(detail.attempt), \
             min(typeof(detail.attempt)) FROM read_parquet('{lake}/logins/**/*.parquet', \
             hive_partitioning = true, hive_types = {'account': VARCHAR}, union_by_name = true)",
        );
        assert_eq!(rows, vec![json!([5, 5, 2, 5_000_000_000_i64, "BIGINT"])]);
    }
}

/// `watershed lake ddl`: DuckDB runs the generated views over a lake
/// whose table holds files of two schema versions, and reads every row
/// typed by the latest one (older rows' new field NULL, the widened field
/// BIGINT), the account as text (leading zero kept), the partition values
/// typed, a table with no files as no rows, and the dead letters, pruning
/// files by partition filters; the view declares what DuckDB itself reads
/// from the newest file. The other
/// dialects' statements are checked in `tests/readers.rs`.
#[test]
fn catalog_ddl_declares_the_lake_for_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let zero = "012345678901";
    let tokens = [add_account(&data, A[0]), add_account(&data, zero)];
    let schemas = dir.path().join("schemas");
    let repo = watershed_tests::repo().join("schemas");
    for subject in ["identity.user_login", "orders.order_placed"] {
        std::fs::create_dir_all(schemas.join(subject)).unwrap();
        for f in ["subject.toml", "v1.avsc"] {
            std::fs::copy(repo.join(subject).join(f), schemas.join(subject).join(f)).unwrap();
        }
    }
    let server = Server::start_with_schemas(&data, &schemas, &[]);
    for (n, token) in tokens.iter().enumerate() {
        let mut events: Vec<Value> =
            (0..2).map(|i| login(&format!("v1-{n}-{i}"), &format!("u{i}"))).collect();
        events.push(json!({"specversion": "1.0", "id": format!("bad-{n}"), "type": "Nope", "source": "x", "data": {}}));
        let (s, r, _) = post(&server.url, Some(token), ndjson(&events), &[]);
        assert_eq!((s, r["accepted"].as_u64()), (200, Some(2)), "{r}");
    }
    assert!(server.stop().success());
    std::fs::copy(repo.join("identity.user_login/v2.avsc"), schemas.join("identity.user_login/v2.avsc"))
        .unwrap();
    let server = Server::start_with_schemas(&data, &schemas, &[]);
    let mut e = login("v2-0", "w0");
    e["data"]["geo"] = json!({"country": "FR", "city": "Lyon"});
    e["data"]["attempt"] = json!(5_000_000_000_i64);
    let (s, r, _) = post(&server.url, Some(&tokens[1]), ndjson(&[e]), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");
    assert!(server.stop().success());

    let (schemas_arg, data_arg) = (schemas.to_str().unwrap(), data.to_str().unwrap());
    let ddl = |extra: &[&str]| {
        let mut args = vec!["lake", "ddl", "--schemas", schemas_arg, "--data-dir", data_arg];
        args.extend_from_slice(extra);
        run(&args)
    };
    let out = ddl(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let views = String::from_utf8(out.stdout).unwrap();
    for table in ["logins", "orders", "_dead_letters"] {
        assert!(views.contains(&format!("CREATE OR REPLACE VIEW \"watershed\".\"{table}\"")), "{views}");
    }
    assert!(views.contains("protected: detail.username (tokenize), detail.ip_address (encrypt)"), "{views}");

    // Errors name what is wrong.
    let out = ddl(&["--dialect", "athena"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Athena reads tables from S3: pass --location"), "{err}");
    let out = ddl(&["--table", "nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the tables are logins, orders, _dead_letters"), "{err}");
    for dialect in ["athena", "spark", "trino"] {
        let out = ddl(&["--dialect", dialect, "--location", "s3://bucket/lake", "--table", "logins"]);
        assert!(out.status.success(), "{dialect}: {}", String::from_utf8_lossy(&out.stderr));
        let sql = String::from_utf8(out.stdout).unwrap();
        assert!(sql.contains("s3://bucket/lake/logins"), "{dialect}: {sql}");
        assert!(!sql.contains("orders"), "--table keeps only the table named: {sql}");
    }

    let Some(py) = python() else { return };
    let lake = data.join("lake");
    let query = |sql: &str| duckdb(&py, &lake, &format!("{views}\n{sql}"));
    assert_eq!(
        query(
            "SELECT count(*), count(DISTINCT event_id), count(detail.geo), max(detail.attempt), \
             min(typeof(detail.attempt)), min(typeof(event_time)), min(typeof(date)), min(hour) \
             FROM watershed.logins"
        ),
        vec![json!([5, 5, 1, 5_000_000_000_i64, "BIGINT", "TIMESTAMP WITH TIME ZONE", "DATE", 13])]
    );
    assert_eq!(
        query("SELECT account, count(*) FROM watershed.logins GROUP BY ALL ORDER BY 1"),
        vec![json!([zero, 3]), json!([A[0], 2])]
    );
    assert_eq!(
        query("SELECT count(*) FROM watershed.logins WHERE account = '012345678901' AND date = DATE '2024-05-01'"),
        vec![json!([3])]
    );
    assert_eq!(
        query("SELECT account, reason FROM watershed._dead_letters ORDER BY 1"),
        vec![json!([zero, "unknown_subject"]), json!([A[0], "unknown_subject"])]
    );
    assert_eq!(query("SELECT count(*), count(detail) FROM watershed.orders"), vec![json!([0, 0])]);
    // A filter on a partition column reaches the files' paths through the
    // view: only that account's files are read (2 of the table's 3).
    let plan = query("EXPLAIN ANALYZE SELECT count(*) FROM watershed.logins WHERE account = '012345678901'");
    let plan = plan[0][1].as_str().unwrap();
    assert!(plan.contains("Scanning Files: 2/3"), "{plan}");
    let newest = parquet_files(&lake.join("logins"))
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().modified().unwrap())
        .unwrap();
    let declared = query("SELECT column_name, column_type FROM (DESCRIBE watershed.logins)");
    let read = duckdb(
        &py,
        &lake,
        &format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{}', \
             hive_partitioning = true, hive_types = {{'account': VARCHAR, 'date': DATE, 'hour': INTEGER}}))",
            newest.display()
        ),
    );
    assert_eq!(declared, read, "the view declares what DuckDB reads from the newest file");
}

/// `[retention]`: `lake retention --dry-run` says what would go and
/// deletes nothing; `lake retention` deletes the partitions past their
/// table's period (and nothing else), refuses to run beside the hub, and
/// records each partition in `retention.log`; a running hub deletes
/// expired partitions by itself, the ones it writes too. An unknown table
/// in `[retention]` is named.
#[test]
fn retention_deletes_expired_partitions_and_records_them() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let lake = data.join("lake");
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let recent: Vec<Value> = (0..3)
        .map(|i| {
            let mut e = login(&format!("recent-{i}"), "u1");
            e["time"] = json!(now);
            e
        })
        .collect();
    let server = Server::start(&data, &[]);
    // Payments of 2024-05-01: long past a 30-day period.
    let old: Vec<Value> = (0..4).map(|i| ada(&format!("old-{i}"), "cus_1")).collect();
    for body in [ndjson(&old), ndjson(&recent)] {
        let (s, r, _) = post(&server.url, Some(&token), body, &[]);
        assert_eq!(s, 200, "{r}");
    }
    assert!(server.stop().success());
    assert_eq!(payment_ids(&data).len(), 4);

    let data_arg = data.to_str().unwrap();
    let retention = |env: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = Command::new(watershed_tests::bin());
        cmd.args(["lake", "retention", "--data-dir", data_arg])
            .args(extra)
            .current_dir(watershed_tests::repo());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, said, _) = retention(&[], &[]);
    assert!(ok && said.contains("no table has a retention period"), "{said}");
    let (ok, _, err) = retention(&[("WATERSHED_RETENTION__TABLES__PAYMENT", "30")], &[]);
    assert!(!ok && err.contains("retention.tables.payment: no such table"), "{err}");
    let thirty = [("WATERSHED_RETENTION__TABLES__PAYMENTS", "30")];
    let (ok, said, err) = retention(&thirty, &["--dry-run"]);
    assert!(ok && said.contains("dry run: would delete 1 expired partitions: 1 files"), "{said}{err}");
    assert_eq!(payment_ids(&data).len(), 4, "a dry run deletes nothing");
    assert!(!data.join("retention.log").exists());

    let server = Server::start(&data, &[]);
    let (ok, _, err) = retention(&thirty, &[]);
    assert!(!ok && err.contains("is in use by another hub"), "refused beside the running hub: {err}");
    assert!(server.stop().success());
    let (ok, said, err) = retention(&thirty, &[]);
    assert!(ok && said.contains("deleted 1 expired partitions: 1 files"), "{said}{err}");
    assert!(parquet_files(&lake.join("payments")).is_empty());
    assert_eq!(ids_by_table(&lake)["logins"].len(), 3, "the table without a period keeps its rows");
    let record: Vec<Value> = std::fs::read_to_string(data.join("retention.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(record.len(), 1, "{record:?}");
    assert_eq!(record[0]["partition"], json!(format!("payments/account={}/date=2024-05-01/hour=12", A[0])));
    assert_eq!((record[0]["retention_days"].as_u64(), record[0]["files"].as_u64()), (Some(30), Some(1)));

    // The running hub: what it writes into an expired partition goes on
    // its next pass.
    let server = Server::start(
        &data,
        &[
            thirty[0],
            ("WATERSHED_RETENTION__EVERY_SECS", "1"),
            ("WATERSHED_LAKE__ROLL_AGE_SECS", "1"),
            ("WATERSHED_LAKE__LATE_ROLL_AGE_SECS", "1"),
        ],
    );
    let late: Vec<Value> = (0..2).map(|i| ada(&format!("late-{i}"), "cus_2")).collect();
    let (s, r, _) = post(&server.url, Some(&token), ndjson(&late), &[]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(2)), "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let lines = std::fs::read_to_string(data.join("retention.log")).unwrap().lines().count();
        if lines == 2 && parquet_files(&lake.join("payments")).is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hub's retention pass did not delete the late file"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let m = metrics(&server);
    assert!(m.contains("watershed_retention_partitions_total 1\n"), "{m}");
    assert!(m.contains("watershed_retention_files_total 1\n"), "{m}");
    assert!(server.stop().success());
    assert_eq!(ids_by_table(&lake)["logins"].len(), 3);
}

/// Dead letters sent again: events refused as `unknown_subject` before
/// their schema existed are decrypted (`keys decrypt --events`, audited)
/// into NDJSON that `send` posts once the schema is loaded; they land in
/// their table once, a second reprocessing counts them as duplicates, and
/// a dead letter that is not a JSON object is named and left out.
#[test]
fn dead_letters_are_reprocessed_once_their_schema_exists() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = add_account(&data, A[0]);
    let schemas = dir.path().join("schemas");
    let repo = watershed_tests::repo().join("schemas");
    let copy_subject = |subject: &str| {
        std::fs::create_dir_all(schemas.join(subject)).unwrap();
        for f in std::fs::read_dir(repo.join(subject)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), schemas.join(subject).join(f.file_name())).unwrap();
        }
    };
    copy_subject("payments.payment_authorized");
    let server = Server::start_with_schemas(&data, &schemas, &[]);
    // Pretty-printed in an array: each refused event's raw bytes span lines.
    let logins: Vec<Value> = (0..2).map(|i| login(&format!("l-{i}"), &format!("u{i}"))).collect();
    let body =
        serde_json::to_vec_pretty(&json!([ada("p-0", "cus_1"), logins[0], logins[1], [1, 2]])).unwrap();
    let (s, r, _) = post(&server.url, Some(&token), body, &[("content-type", "application/json")]);
    assert_eq!((s, r["accepted"].as_u64()), (200, Some(1)), "{r}");
    let reasons: Vec<&str> =
        r["rejected"].as_array().unwrap().iter().map(|x| x["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["unknown_subject", "unknown_subject", "bad_envelope"], "{r}");
    assert!(server.stop().success());

    copy_subject("identity.user_login");
    let server = Server::start_with_schemas(&data, &schemas, &[]);
    let dead: Vec<(String, String)> = read_table(&data.join("lake"), "_dead_letters")
        .iter()
        .flat_map(|(_, b)| strings(b, "reason").into_iter().zip(strings(b, "raw")))
        .map(|(reason, raw)| (reason.unwrap(), raw.unwrap()))
        .collect();
    let unknown: Vec<&str> =
        dead.iter().filter(|(reason, _)| reason == "unknown_subject").map(|(_, raw)| raw.as_str()).collect();
    let other = dead.iter().find(|(reason, _)| reason == "bad_envelope").unwrap().1.as_str();
    let data_s = data.to_str().unwrap();
    let decrypt = |input: String| {
        run_with_stdin(
            &[
                "keys",
                "decrypt",
                "--principal",
                "ops",
                "--purpose",
                "REPROCESS-1",
                "--events",
                "--data-dir",
                data_s,
                "-",
            ],
            &input,
        )
    };
    let out = decrypt(format!("{}\n{}\n\n{other}\n", unknown[0], unknown[1]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 4: left out: not a JSON object"), "{err}");
    let ndjson_out = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = ndjson_out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut ids: Vec<&str> = lines.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["l-0", "l-1"], "one line per event: {ndjson_out}");
    assert!(lines.contains(&logins[0]) && lines.contains(&logins[1]), "the events as sent");

    for (round, want) in [(1, (Some(2), Some(0))), (2, (Some(0), Some(2)))] {
        let out = run_with_stdin(&["send", "--url", &server.url, "--token", &token, "-"], &ndjson_out);
        assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        // "accepted N rejected N duplicates N"
        let counts = |word: &str| {
            let words: Vec<&str> = said.split_whitespace().collect();
            words.windows(2).find(|w| w[0] == word).and_then(|w| w[1].parse::<u64>().ok())
        };
        assert_eq!((counts("accepted"), counts("duplicates")), want, "round {round}: {said}");
    }
    assert!(server.stop().success());
    let mut landed: Vec<String> =
        ids_by_table(&data.join("lake"))["logins"].iter().map(|(_, id)| id.clone()).collect();
    landed.sort();
    assert_eq!(landed, ["l-0", "l-1"], "in their table once");
    let audit = std::fs::read_to_string(data.join("keyring/audit.log")).unwrap();
    assert!(audit.contains("REPROCESS-1"), "the decrypt is audited: {audit}");
}
