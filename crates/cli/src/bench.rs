//! `watershed bench`: the end-to-end benchmark of BRIEF.md's reference
//! workload, with its comparators run on the same data in the same run.
//!
//! The parent process generates the data, then runs each measurement in a
//! child pinned with `taskset` (one core, or two), so "one core" means one
//! core for every thread the hub starts. It prints a table of events/s,
//! MB/s, ratios, peak RSS and ack latency, medians over `--runs`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::{json, Value};
use watershed_event::AccountId;
use watershed_hub::body::Framing;
use watershed_hub::sample::Samples;
use watershed_hub::{Hub, HubConfig, Overrides};

const ACCOUNT: &str = "123456789012";
const COMPARATORS: &str = include_str!("bench_comparators.py");

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Events in the workload.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Schema directory.
    #[arg(long, default_value = "schemas")]
    schemas: PathBuf,
    /// Python with duckdb and pyarrow for the comparators (default: the
    /// test virtualenv, ~/.cache/watershed/venv).
    #[arg(long, env = "WATERSHED_TEST_PYTHON")]
    python: Option<PathBuf>,
    /// Skip the HTTP measurement.
    #[arg(long)]
    no_http: bool,
    /// Arrow bytes after which the hub's runs roll a partition's file
    /// (`lake.roll_bytes`). The default keeps every file open for the
    /// whole run; the hub's own default (64 MiB) commits files, seals and
    /// retires WAL segments while the load goes on.
    #[arg(long, default_value_t = 512 << 20)]
    roll_bytes: usize,
    /// Keep the workload and outputs in this directory (default: a
    /// temporary directory, removed afterwards).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Internal: run one measurement in this process.
    #[arg(long, hide = true)]
    worker: Option<String>,
    /// Internal: the data directory of a worker.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
    /// Internal: cores of a hub worker.
    #[arg(long, hide = true, default_value_t = 1)]
    cores: usize,
}

pub(crate) fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.worker.as_deref() {
        Some("hub") => return worker_hub(&args),
        Some("floor") => return worker_floor(&args),
        Some(other) => bail!("unknown worker {other}"),
        None => {}
    }
    let tmp = tempfile::Builder::new().prefix("watershed-bench").tempdir()?;
    let dir = match &args.keep {
        Some(k) => {
            std::fs::create_dir_all(k)?;
            k.as_path()
        }
        None => tmp.path(),
    };
    let bytes = generate(dir, args.events)?;
    println!(
        "workload: {} EventBridge events, {:.1} MB ({} bytes/event), 4 types, 2-4 protected fields each; batches of {}",
        args.events,
        bytes as f64 / 1e6,
        bytes / args.events as u64,
        args.batch
    );
    let me = std::env::current_exe()?;
    let run_worker = |what: &str, cpus: &str, cores: usize, i: usize| -> anyhow::Result<Value> {
        let wdir = dir.join(format!("{what}-{cores}-{i}"));
        let out = Command::new("taskset")
            .args(["-c", cpus])
            .arg(&me)
            .args([
                "bench",
                "--worker",
                what,
                "--cores",
                &cores.to_string(),
                "--batch",
                &args.batch.to_string(),
            ])
            .arg("--schemas")
            .arg(&args.schemas)
            .arg("--dir")
            .arg(&wdir)
            .arg("--events")
            .arg(args.events.to_string())
            .arg("--roll-bytes")
            .arg(args.roll_bytes.to_string())
            .env("WATERSHED_BENCH_INPUT", dir)
            .stderr(Stdio::inherit())
            .output()
            .context("running taskset (util-linux)")?;
        if !out.status.success() {
            bail!("{what} worker failed");
        }
        let _ = std::fs::remove_dir_all(&wdir);
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Rounds interleave the hub and the floor, so a slow phase of the
    // shared host hits both, and each round gives a paired ratio.
    let configs = [
        ("watershed hub, 1 core", "hub", "0", 1),
        ("watershed hub, 2 cores", "hub", "0,1", 2),
        (FLOOR, "floor", "0", 1),
    ];
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); configs.len()];
    for i in 0..args.runs {
        for (r, &(_, what, cpus, cores)) in results.iter_mut().zip(&configs) {
            r.push(run_worker(what, cpus, cores, i)?);
        }
    }
    let seconds = |r: &Value| r["seconds"].as_f64().unwrap_or(f64::NAN);
    let mut rows: Vec<(String, f64, Value)> = Vec::new();
    for (&(name, what, ..), results) in configs.iter().zip(&results) {
        let secs = median(results.iter().map(seconds).collect());
        let cpu = median(results.iter().map(|r| r["cpu_seconds"].as_f64().unwrap_or(f64::NAN)).collect());
        let mut mid = match what {
            "hub" => {
                results.iter().find(|r| r["seconds"].as_f64() == Some(secs)).cloned().unwrap_or_default()
            }
            _ => json!({}),
        };
        // CPU per event is reported as its own median, not the median run's.
        mid["cpu_seconds"] = json!(cpu);
        rows.push((name.into(), secs, mid));
    }
    // Floor time over hub time, round by round.
    let paired: Vec<f64> = results[0].iter().zip(&results[2]).map(|(h, f)| seconds(f) / seconds(h)).collect();

    match python(&args) {
        Some(py) => {
            let script = dir.join("comparators.py");
            std::fs::write(&script, COMPARATORS)?;
            let mut pa = Vec::new();
            let mut dd = Vec::new();
            for _ in 0..args.runs {
                let out_dir = dir.join("py-out");
                std::fs::create_dir_all(&out_dir)?;
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", "0"]).arg(&py).arg(&script).arg(&out_dir);
                for t in 0..4 {
                    cmd.arg(dir.join(format!("type-{t}.ndjson")));
                }
                let out = cmd.stderr(Stdio::inherit()).output()?;
                if !out.status.success() {
                    bail!("the comparator script failed");
                }
                let v: Value = serde_json::from_slice(&out.stdout)?;
                pa.push(v["pyarrow"].as_f64().unwrap_or(f64::NAN));
                dd.push(v["duckdb"].as_f64().unwrap_or(f64::NAN));
                std::fs::remove_dir_all(&out_dir)?;
            }
            rows.push(("pyarrow, 1 core".into(), median(pa), json!({})));
            rows.push(("DuckDB, 1 thread".into(), median(dd), json!({})));
        }
        None => eprintln!(
            "SKIPPED: pyarrow and DuckDB comparators (no Python with duckdb and pyarrow; run tests/run.sh once or pass --python)"
        ),
    }
    if !args.no_http {
        let secs: Vec<f64> =
            (0..args.runs).map(|_| http_run(&me, dir, &args)).collect::<anyhow::Result<_>>()?;
        rows.push(("watershed serve + HTTP client, 2 cores".into(), median(secs), json!({})));
    }
    report(&rows, args.events, bytes);
    let (lo, hi) = paired.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    println!(
        "Paired (hub 1 core / floor, within each of {} rounds): median {:.2}x, range {lo:.2}x-{hi:.2}x.",
        paired.len(),
        median(paired.clone())
    );
    Ok(ExitCode::SUCCESS)
}

const FLOOR: &str = "arrow-json + ArrowWriter floor, 1 core";

fn python(args: &BenchArgs) -> Option<PathBuf> {
    let candidates =
        args.python.clone().into_iter().chain(
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/watershed/venv/bin/python")),
        );
    candidates
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import duckdb, pyarrow"]).status().is_ok_and(|s| s.success()))
}

fn report(rows: &[(String, f64, Value)], events: usize, bytes: u64) {
    let eps = |s: f64| events as f64 / s;
    let floor = rows.iter().find(|r| r.0 == FLOOR).map(|r| eps(r.1));
    let best_peer = rows
        .iter()
        .filter(|r| r.0.starts_with("pyarrow") || r.0.starts_with("DuckDB"))
        .map(|r| eps(r.1))
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    println!();
    println!(
        "{:<42} {:>12} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "run (median)",
        "events/s",
        "MB/s",
        "vs floor",
        "vs best",
        "p50 ms",
        "p99 ms",
        "max ms",
        "RSS MB",
        "CPU us/ev"
    );
    for (name, secs, extra) in rows {
        let e = eps(*secs);
        let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.2}x", e / x));
        let ms = |k: &str| extra[k].as_f64().map_or("-".into(), |v| format!("{:.1}", v * 1000.0));
        let rss = extra["peak_rss_bytes"].as_f64().map_or("-".into(), |v| format!("{:.0}", v / 1e6));
        let cpu =
            extra["cpu_seconds"].as_f64().map_or("-".into(), |v| format!("{:.2}", v * 1e6 / events as f64));
        println!(
            "{name:<42} {:>12.0} {:>8.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            e,
            bytes as f64 / secs / 1e6,
            ratio(floor),
            ratio(best_peer),
            ms("p50_ack_seconds"),
            ms("p99_ack_seconds"),
            ms("max_ack_seconds"),
            rss,
            cpu
        );
    }
    println!("\nvs floor: throughput / the arrow-json floor's; vs best: throughput / the faster of pyarrow and DuckDB.");
    println!("CPU us/ev: CPU time (all threads, user + system) per event; steadier than throughput on a shared machine.");
    println!("Target (BRIEF.md): >= 200,000 events/s on one core end to end, within 1.45x of the floor.");
}

/// Write the workload: `all.ndjson` (the mixed stream the hub ingests) and
/// one file per event type for the comparators. Returns the mixed bytes.
fn generate(dir: &Path, events: usize) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut samples = Samples::new(42, 1_714_564_800);
    let mut all = std::io::BufWriter::new(std::fs::File::create(dir.join("all.ndjson"))?);
    let mut per: Vec<_> = (0..4)
        .map(|t| std::fs::File::create(dir.join(format!("type-{t}.ndjson"))).map(std::io::BufWriter::new))
        .collect::<Result<_, _>>()?;
    let mut bytes = 0u64;
    for n in 0..events {
        let e = samples.event(ACCOUNT);
        bytes += e.len() as u64 + 1;
        writeln!(all, "{e}")?;
        writeln!(per[(n + 1) % 4], "{e}")?;
    }
    all.flush()?;
    for mut p in per {
        p.flush()?;
    }
    Ok(bytes)
}

fn batches(input: &Path, batch: usize) -> anyhow::Result<Vec<bytes::Bytes>> {
    let text = std::fs::read_to_string(input.join("all.ndjson"))?;
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines.chunks(batch).map(|c| bytes::Bytes::from(c.join("\n"))).collect())
}

/// Reset the kernel's peak RSS mark (`VmHWM`) to the current RSS
/// (Linux 4.0+); a no-op where unsupported.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU time (user + system, all threads) this process has used so far.
/// On a shared machine this moves less than wall time does, so the report
/// shows CPU per event next to throughput.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name: state is field 3, utime 14, stime 15,
    // both in USER_HZ ticks (100 per second on Linux).
    let mut f = s.get(s.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn hub_config(args: &BenchArgs, dir: &Path, cores: usize) -> anyhow::Result<HubConfig> {
    let mut config = HubConfig::load(
        None,
        Vec::new(),
        &Overrides {
            listen: Some("127.0.0.1:0".into()),
            schemas: Some(args.schemas.clone()),
            data_dir: Some(dir.to_owned()),
        },
    )?;
    config.memory.budget_bytes = 2 << 30;
    config.lake.roll_bytes = args.roll_bytes;
    config.lake.flush_concurrency = cores;
    Ok(config)
}

/// Request bytes → validate, protect, WAL → committed Parquet, in process.
fn worker_hub(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = args.dir.clone().context("--dir")?;
    let input = PathBuf::from(std::env::var_os("WATERSHED_BENCH_INPUT").context("WATERSHED_BENCH_INPUT")?);
    let bodies = batches(&input, args.batch)?;
    // Peak RSS from here on: the workload file read to build the request
    // bodies is gone; the bodies themselves (the requests) stay counted.
    reset_peak_rss();
    let config = hub_config(args, &dir, args.cores)?;
    let lake_dir = config.lake_dir();
    watershed_hub::accounts::Accounts::add(&dir, &AccountId::new(ACCOUNT)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.cores)
        .max_blocking_threads(args.cores)
        .enable_all()
        .build()?;
    let result = rt.block_on(async move {
        let hub = Arc::new(Hub::start(config).await?);
        let account = AccountId::new(ACCOUNT)?;
        let queue = Arc::new(std::sync::Mutex::new(bodies.into_iter()));
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let mut tasks = Vec::new();
        for _ in 0..args.cores * 2 {
            let (hub, queue, account) = (hub.clone(), queue.clone(), account.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let next = queue.lock().expect("queue").next();
                    let Some(body) = next else { break };
                    let t = Instant::now();
                    let held = hub.requests.hold(&account, body.len()).map_err(|full| {
                        anyhow::anyhow!("the request memory is too small for the workload ({full:?})")
                    })?;
                    let r = hub
                        .ingest(&account, None, None, Framing::Lines, body, held)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    if !r.rejected.is_empty() {
                        bail!("the workload was rejected: {:?}", &r.rejected[0]);
                    }
                    lat.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut lat: Vec<Duration> = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let hub = Arc::try_unwrap(hub).map_err(|_| anyhow::anyhow!("hub still shared"))?;
        hub.shutdown().await?;
        let secs = started.elapsed().as_secs_f64();
        // Outside the timed run: every event must be in a committed file.
        let lake = watershed_lake::Lake::local(&lake_dir, 8)?;
        let listing = watershed_lake::ls::summarize(&lake).await?;
        if let Some((path, why)) = listing.unreadable.first() {
            bail!("the lake holds an unreadable file after the run: {path}: {why}");
        }
        let rows = listing.rows();
        if rows != args.events as u64 {
            bail!("the lake holds {rows} rows after the run; expected {}", args.events);
        }
        lat.sort();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64();
        Ok::<_, anyhow::Error>(json!({
            "seconds": secs, "p50_ack_seconds": pct(0.5), "p99_ack_seconds": pct(0.99),
            "max_ack_seconds": lat.last().map(Duration::as_secs_f64),
            "peak_rss_bytes": peak_rss(),
            "cpu_seconds": cpu.zip(cpu_seconds()).map(|(a, b)| b - a),
        }))
    })?;
    println!("{result}");
    Ok(ExitCode::SUCCESS)
}

/// The library floor: arrow-json's decoder with the schema known, and
/// ArrowWriter with zstd, one file per event type.
fn worker_floor(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;
    let dir = args.dir.clone().context("--dir")?;
    std::fs::create_dir_all(&dir)?;
    let input = PathBuf::from(std::env::var_os("WATERSHED_BENCH_INPUT").context("WATERSHED_BENCH_INPUT")?);
    let mut inputs = Vec::new();
    for t in 0..4 {
        let data = std::fs::read(input.join(format!("type-{t}.ndjson")))?;
        let (schema, _) =
            arrow_json::reader::infer_json_schema_from_seekable(std::io::Cursor::new(&data), None)?;
        inputs.push((data, Arc::new(schema)));
    }
    let (started, cpu) = (Instant::now(), cpu_seconds());
    for (t, (data, schema)) in inputs.iter().enumerate() {
        let mut decoder =
            arrow_json::ReaderBuilder::new(schema.clone()).with_batch_size(8192).build_decoder()?;
        let props =
            WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?)).build();
        let file = std::fs::File::create(dir.join(format!("floor-{t}.parquet")))?;
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
        let mut buf = &data[..];
        loop {
            let n = decoder.decode(buf)?;
            buf = &buf[n..];
            if let Some(b) = decoder.flush()? {
                w.write(&b)?;
            }
            if buf.is_empty() && n == 0 {
                break;
            }
        }
        w.close()?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{}", json!({ "seconds": secs, "cpu_seconds": cpu.zip(cpu_seconds()).map(|(a, b)| b - a) }));
    Ok(ExitCode::SUCCESS)
}

/// `watershed serve` pinned to two cores, fed over HTTP by this process.
fn http_run(me: &Path, dir: &Path, args: &BenchArgs) -> anyhow::Result<f64> {
    let data = dir.join("http");
    let _ = std::fs::remove_dir_all(&data);
    let (token, _) = watershed_hub::accounts::Accounts::add(&data, &AccountId::new(ACCOUNT)?)?;
    let mut child = Command::new("taskset")
        .args(["-c", "0,1"])
        .arg(me)
        .args(["serve", "--listen", "127.0.0.1:0", "--schemas"])
        .arg(&args.schemas)
        .arg("--data-dir")
        .arg(&data)
        .env("WATERSHED_MEMORY__BUDGET_BYTES", (2u64 << 30).to_string())
        .env("WATERSHED_LAKE__ROLL_BYTES", (512u64 << 20).to_string())
        .env("WATERSHED_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let addr = {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        loop {
            let l = lines.next().context("the hub exited before listening")??;
            if let Some(a) = l.strip_prefix("watershed: listening on ") {
                std::thread::spawn(move || lines.for_each(drop));
                break a.to_owned();
            }
        }
    };
    let bodies = batches(dir, args.batch)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("{addr}/v1/events");
        let queue = Arc::new(std::sync::Mutex::new(bodies.into_iter()));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (client, url, token, queue) = (client.clone(), url.clone(), token.clone(), queue.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let next = queue.lock().expect("queue").next();
                    let Some(body) = next else { break };
                    crate::send::post(&client, &url, &token, None, body, 20, crate::send::Compress::None)
                        .await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait()?;
    if !status.success() {
        bail!("the hub did not stop cleanly");
    }
    Ok(started.elapsed().as_secs_f64())
}
