//! `watershed demo`: the embedded hub end to end in one command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use watershed_event::AccountId;
use watershed_hub::sample::Samples;
use watershed_hub::{Hub, HubConfig, Overrides};

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Events to generate (about 2% of them deliberately invalid).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Data directory for the demo hub (reused if it exists).
    #[arg(long, default_value = "watershed-demo")]
    data_dir: PathBuf,
    /// Schema directory.
    #[arg(long, default_value = "schemas")]
    schemas: PathBuf,
}

const ACCOUNTS: [&str; 3] = ["111111111111", "222222222222", "333333333333"];

pub(crate) async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        schemas: Some(args.schemas.clone()),
        data_dir: Some(args.data_dir.clone()),
    };
    let config = HubConfig::load(None, Vec::new(), &overrides)?;
    let mut tokens = Vec::new();
    for a in ACCOUNTS {
        tokens.push(watershed_hub::accounts::Accounts::add(&args.data_dir, &AccountId::new(a)?)?.0);
    }
    let hub = Hub::start(config).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(watershed_hub::serve::serve(
        hub,
        async {
            let _ = stop_rx.await;
        },
        move |a| {
            let _ = addr_tx.send(a);
        },
    ));
    let addr = addr_rx.await?;
    out!("demo hub listening on http://{addr}, data in {}", args.data_dir.display());

    let started = Instant::now();
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/events");
    let mut sends = Vec::new();
    for (i, (account, token)) in ACCOUNTS.iter().zip(&tokens).enumerate() {
        // The first accounts take the remainder: exactly `--events` in all.
        let per_account = args.events / ACCOUNTS.len() + usize::from(i < args.events % ACCOUNTS.len());
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        let account = (*account).to_owned();
        sends.push(tokio::spawn(async move {
            let mut samples = Samples::new(i as u64 + 1, chrono::Utc::now().timestamp() - 7200);
            let mut totals = crate::send::Totals::default();
            let mut batch = String::new();
            for n in 0..per_account {
                let mut e = samples.event(&account);
                // About one event in fifty is broken, in one of four ways.
                match n % 200 {
                    // Event n is a payment when n % 4 == 3 (the sample types rotate).
                    51 => e = e.replace("\"currency\":\"EUR\"", "\"currency\":\"DOGE\""),
                    100 => {
                        e = e.replacen(
                            &format!("\"account\":\"{account}\""),
                            "\"account\":\"999999999999\"",
                            1,
                        )
                    }
                    150 => e.truncate(e.len() / 2),
                    199 => e = e.replacen("\"detail-type\":\"", "\"detail-type\":\"Unknown", 1),
                    _ => {}
                }
                batch.push_str(&e);
                batch.push('\n');
                if (n + 1) % 500 == 0 || n + 1 == per_account {
                    let r = crate::send::post(
                        &client,
                        &url,
                        &token,
                        Some("demo"),
                        bytes::Bytes::from(std::mem::take(&mut batch)),
                        10,
                        crate::send::Compress::Zstd,
                    )
                    .await?;
                    totals.accepted += r["accepted"].as_u64().unwrap_or(0);
                    totals.rejected += r["rejected"].as_array().map_or(0, |a| a.len() as u64);
                }
            }
            Ok::<_, anyhow::Error>(totals)
        }));
    }
    let mut accepted = 0;
    let mut rejected = 0;
    for s in sends {
        let t = s.await??;
        accepted += t.accepted;
        rejected += t.rejected;
    }
    let elapsed = started.elapsed();
    out!(
        "sent {} events in {:.2}s: {accepted} accepted, {rejected} rejected (they are in _dead_letters)",
        accepted + rejected,
        elapsed.as_secs_f64()
    );
    let _ = stop_tx.send(());
    server.await??;
    out!("hub stopped; every accepted event is committed. The lake:");
    let lake_dir = args.data_dir.join("lake");
    let lake = watershed_lake::Lake::local(&lake_dir, 8)?;
    crate::serve::print_summary(&watershed_lake::ls::summarize(&lake).await?, false)?;
    out!(
        "\nQuery it with DuckDB, for example:\n  duckdb -c \"SELECT account, count(*) FROM read_parquet('{}/payments/**/*.parquet', union_by_name=true, hive_partitioning=true, hive_types={{'account': VARCHAR}}) GROUP BY account\"",
        lake_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
