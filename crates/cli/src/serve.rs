//! `watershed serve`, `watershed accounts add`, `watershed lake ls|compact|retention|ddl`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use watershed_event::AccountId;
use watershed_hub::accounts::{Accounts, Revoke};
use watershed_hub::{HubConfig, Overrides};

/// Options shared by commands that load the hub configuration.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ConfigArgs {
    /// TOML configuration file (then WATERSHED_* variables, then flags).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Listen address (default 127.0.0.1:8787).
    #[arg(long)]
    pub(crate) listen: Option<String>,
    /// Schema directory (default ./schemas).
    #[arg(long)]
    pub(crate) schemas: Option<PathBuf>,
    /// Data directory: WAL, keyring, accounts, lake (default ./watershed-data).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    pub(crate) fn load(&self) -> anyhow::Result<HubConfig> {
        let overrides = Overrides {
            listen: self.listen.clone(),
            schemas: self.schemas.clone(),
            data_dir: self.data_dir.clone(),
        };
        Ok(HubConfig::load(self.config.as_deref(), std::env::vars().collect(), &overrides)?)
    }
}

pub(crate) async fn serve(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let tls = config.tls.cert_file.is_some();
    let scheme = if tls { "https" } else { "http" };
    watershed_hub::serve::start_and_serve(
        config,
        watershed_hub::serve::signal(),
        |addr| {
            eprintln!("watershed: starting on {scheme}://{addr}");
            tracing::info!(%addr, "bound; starting (replaying the write-ahead log)");
            if !tls && !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "plain HTTP on an address other hosts reach: bearer tokens and events travel \
                     unencrypted; set [tls] cert_file and key_file, or put a TLS terminator in front"
                );
            }
        },
        |addr| {
            eprintln!("watershed: listening on {scheme}://{addr}");
            tracing::info!(%addr, "listening");
        },
    )
    .await?;
    eprintln!("watershed: stopped; every accepted event is committed");
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand, Debug)]
pub(crate) enum AccountsCmd {
    /// Create a bearer token bound to ACCOUNT_ID. The token is printed once,
    /// as the last word of the output; only its hash is stored.
    Add {
        /// The member account id (for AWS, the 12-digit number).
        account_id: AccountId,
        /// The hub's data directory.
        #[arg(long, default_value_os_t = crate::default_data_dir())]
        data_dir: PathBuf,
    },
    /// List the stored tokens: account, token id, created. Tokens
    /// themselves are not stored.
    List {
        /// The hub's data directory.
        #[arg(long, default_value_os_t = crate::default_data_dir())]
        data_dir: PathBuf,
    },
    /// Revoke ACCOUNT_ID's token with `--token ID`, or all its tokens. A
    /// running hub refuses them (401) from its next request.
    Revoke {
        /// The account whose tokens go.
        account_id: AccountId,
        /// The token id (as `add` and `list` print it); without it, every
        /// token of the account.
        #[arg(long)]
        token: Option<String>,
        /// The hub's data directory.
        #[arg(long, default_value_os_t = crate::default_data_dir())]
        data_dir: PathBuf,
    },
}

pub(crate) fn accounts(cmd: AccountsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AccountsCmd::Add { account_id, data_dir } => {
            let (token, id) = Accounts::add(&data_dir, &account_id)?;
            out!(
                "created token {id} for account {account_id} (stored hashed in {}): {token}",
                data_dir.join("accounts.json").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        AccountsCmd::List { data_dir } => {
            let tokens = Accounts::list(&data_dir)?;
            // Account ids run to 64 characters: the column fits the longest.
            let w = tokens.iter().map(|t| t.account.as_str().len()).max().unwrap_or(0).max(14);
            out!("{:<w$} {:<14} created", "account", "token id");
            for t in tokens {
                out!("{:<w$} {:<14} {}", t.account.as_str(), t.token_id, t.created);
            }
            Ok(ExitCode::SUCCESS)
        }
        AccountsCmd::Revoke { account_id, token, data_dir } => {
            let which = match token {
                Some(id) => Revoke::Token(account_id, id.to_ascii_lowercase()),
                None => Revoke::Account(account_id),
            };
            for t in Accounts::revoke(&data_dir, &which)? {
                out!("revoked token {} of account {} (created {})", t.token_id, t.account, t.created);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum LakeCmd {
    /// List tables, partitions, files, rows and bytes.
    Ls {
        #[command(flatten)]
        config: ConfigArgs,
        /// The lake directory (default: `lake.path`, else the data
        /// directory's lake).
        #[arg(long)]
        lake: Option<PathBuf>,
        /// Per-partition lines, not only per table.
        #[arg(long)]
        partitions: bool,
    },
    /// Merge the small files of closed partitions into files of up to
    /// `lake.compact_target_bytes`, now. `serve` does this by itself every
    /// `lake.compact_every_secs`; this is for a hub that is stopped (it
    /// refuses to run while the hub holds the data directory, except with
    /// `--dry-run`).
    Compact {
        #[command(flatten)]
        config: ConfigArgs,
        /// Treat a partition as closed this many seconds after its hour
        /// ended (default: `lake.compact_after_secs`).
        #[arg(long)]
        after_secs: Option<u64>,
        /// Report the merges a pass would make (files, rows, bytes) and
        /// write or delete nothing; runs beside a running hub too.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete the partitions past their table's `[retention]` period now,
    /// recording each in `<data-dir>/retention.log`. `serve` does this by
    /// itself every `retention.every_secs`; this is for a hub that is
    /// stopped (it refuses to run while the hub holds the data directory,
    /// except with `--dry-run`).
    Retention {
        #[command(flatten)]
        config: ConfigArgs,
        /// Report the partitions, files and bytes a pass would delete, and
        /// delete nothing; runs beside a running hub too.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the catalog DDL that declares the lake's tables (every
    /// subject's table and `_dead_letters`) with their latest schema's
    /// columns and the partition columns `account`, `date`, `hour`.
    Ddl {
        #[command(flatten)]
        config: ConfigArgs,
        /// The engine: `duckdb` (typed views over read_parquet), `athena`
        /// (Hive DDL, also for Glue and a Hive metastore), `spark` (Spark
        /// SQL tables) or `trino` (Trino's Hive connector).
        #[arg(long, default_value = "duckdb", value_parser = parse_dialect)]
        dialect: watershed_lake::ddl::Dialect,
        /// The lake's root as the engine reads it (default: `lake.url`,
        /// else the lake directory, as a `file://` URL for Spark and
        /// Trino; Athena needs an `s3://bucket/prefix`).
        #[arg(long)]
        location: Option<String>,
        /// The database (schema) to create the tables in.
        #[arg(long, default_value = "watershed")]
        database: String,
        /// Only this table (repeatable; default: every table).
        #[arg(long = "table")]
        tables: Vec<String>,
    },
}

fn parse_dialect(name: &str) -> Result<watershed_lake::ddl::Dialect, String> {
    use watershed_lake::ddl::Dialect;
    Dialect::parse(name).ok_or_else(|| {
        let names: Vec<&str> = Dialect::ALL.iter().map(|d| d.name()).collect();
        format!("unknown dialect {name:?}: one of {}", names.join(", "))
    })
}

pub(crate) async fn lake(cmd: LakeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LakeCmd::Ls { config, lake, partitions } => {
            let l = match lake {
                Some(dir) => local_lake(&dir)?,
                None => {
                    let config = config.load()?;
                    if config.lake.url.is_some() {
                        config.open_lake(8)?
                    } else {
                        local_lake(&config.lake_dir())?
                    }
                }
            };
            lake_ls(l, partitions).await
        }
        LakeCmd::Compact { config, after_secs, dry_run } => lake_compact(&config, after_secs, dry_run).await,
        LakeCmd::Retention { config, dry_run } => lake_retention(&config, dry_run).await,
        LakeCmd::Ddl { config, dialect, location, database, tables } => {
            lake_ddl(&config, dialect, location, &database, &tables)
        }
    }
}

async fn lake_retention(config: &ConfigArgs, dry_run: bool) -> anyhow::Result<ExitCode> {
    let config = config.load()?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} partitions {msg}",
        )
        .expect("a valid template"),
    );
    let mut progress = |done: usize, total: usize, r: &watershed_lake::retention::RetentionReport| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{} files, {} bytes", r.files, r.bytes));
    };
    let (policy, r) = watershed_hub::pipeline::apply_retention(&config, dry_run, &mut progress)
        .await
        .context("applying retention")?;
    bar.finish_and_clear();
    if policy.keeps_everything() {
        out!("no table has a retention period ([retention] default_days, tables): nothing expires");
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if dry_run { "dry run: would delete" } else { "deleted" };
    out!("{verb} {} expired partitions: {} files, {} bytes", r.partitions, r.files, r.bytes);
    if !dry_run && r.files > 0 {
        out!("recorded in {}", config.data_dir.join(watershed_hub::pipeline::RETENTION_RECORD).display());
    }
    if r.skipped > 0 {
        out!(
            "{} expired partition(s) have a merge cut short and are left until compaction settles it \
             (`watershed lake compact`, or the hub's next start)",
            r.skipped
        );
    }
    if r.failures > 0 {
        eprintln!("watershed: {} file(s) could not be deleted (see the log); run it again", r.failures);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn lake_ddl(
    config: &ConfigArgs,
    dialect: watershed_lake::ddl::Dialect,
    location: Option<String>,
    database: &str,
    only: &[String],
) -> anyhow::Result<ExitCode> {
    use watershed_lake::ddl::{self, Dialect};
    let config = config.load()?;
    let registry = watershed_schema::Registry::load(&config.schemas)
        .with_context(|| format!("loading the schemas in {}", config.schemas.display()))?;
    let location = match (location, &config.lake.url) {
        (Some(l), _) => l,
        (None, Some(url)) => url.clone(),
        (None, None) if dialect == Dialect::Athena => anyhow::bail!(
            "Athena reads tables from S3: pass --location s3://bucket/prefix, where the lake's files are \
             (the default, the local lake directory {}, is not)",
            config.lake_dir().display()
        ),
        (None, None) => {
            let dir = std::path::absolute(config.lake_dir()).context("the lake directory's absolute path")?;
            let dir =
                dir.to_str().with_context(|| format!("the lake directory {} is not UTF-8", dir.display()))?;
            match dialect {
                Dialect::Duckdb => dir.to_owned(),
                Dialect::Athena | Dialect::Spark | Dialect::Trino => format!("file://{dir}"),
            }
        }
    };
    let mut subjects: Vec<_> = registry.subjects().iter().collect();
    subjects.sort_by(|a, b| a.table.cmp(&b.table));
    let schemas: Vec<_> =
        subjects.iter().map(|s| watershed_lake::schema::table_schema(&s.latest().node)).collect();
    let abouts: Vec<String> = subjects
        .iter()
        .map(|s| {
            let v = s.latest();
            format!(
                "subject {}, schema version {} (id {}), compatibility {}",
                s.name, v.version, v.id, s.config.compatibility
            )
        })
        .collect();
    let dead = watershed_lake::schema::dead_letter_schema();
    let mut tables: Vec<ddl::Table<'_>> = subjects
        .iter()
        .zip(&schemas)
        .zip(&abouts)
        .map(|((s, schema), about)| ddl::Table { name: &s.table, schema, about })
        .collect();
    tables.push(ddl::Table {
        name: watershed_lake::DEAD_LETTERS,
        schema: &dead,
        about: "events the hub refused, with their reason codes; partitioned by receive time",
    });
    if !only.is_empty() {
        if let Some(unknown) = only.iter().find(|t| !tables.iter().any(|x| x.name == t.as_str())) {
            let known: Vec<&str> = tables.iter().map(|t| t.name).collect();
            anyhow::bail!(
                "no table {unknown:?} in {}: the tables are {}",
                config.schemas.display(),
                known.join(", ")
            );
        }
        tables.retain(|t| only.iter().any(|o| o == t.name));
    }
    let sql = ddl::generate(&tables, &ddl::Options { dialect, location: &location, database })?;
    use std::io::Write as _;
    std::io::stdout().lock().write_all(sql.as_bytes()).map_err(crate::on_stdout)?;
    Ok(ExitCode::SUCCESS)
}

/// The local lake in `dir`, which must exist.
fn local_lake(dir: &std::path::Path) -> anyhow::Result<watershed_lake::Lake> {
    if !dir.exists() {
        anyhow::bail!("no lake at {} (start the hub with --data-dir, or pass --lake)", dir.display());
    }
    Ok(watershed_lake::Lake::local(dir, 8)?)
}

async fn lake_ls(l: watershed_lake::Lake, partitions: bool) -> anyhow::Result<ExitCode> {
    let listing = watershed_lake::ls::summarize(&l).await?;
    print_summary(&listing, partitions)?;
    let unfinished = tokio::task::spawn_blocking(move || l.unfinished_uploads()).await??;
    if !unfinished.is_empty() {
        let bytes: u64 = unfinished.iter().map(|u| u.bytes).sum();
        let abandoned = unfinished
            .iter()
            .filter(|u| u.idle.is_some_and(|idle| idle >= watershed_lake::ABANDONED_UPLOAD_AGE))
            .count();
        out!(
            "unfinished uploads: {} file(s), {bytes} bytes, not counted above ({abandoned} idle for over an \
             hour: left by a crash during a put, removed by the hub's next start or compaction pass; the \
             others may be puts in progress)",
            unfinished.len()
        );
    }
    Ok(if listing.unreadable.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn lake_compact(
    config: &ConfigArgs,
    after_secs: Option<u64>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let config = config.load()?;
    let after = after_secs.map(std::time::Duration::from_secs);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} partitions {msg}",
        )
        .expect("a valid template"),
    );
    let mut progress = |done: usize, total: usize, r: &watershed_lake::CompactReport| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{} files merged into {}", r.inputs, r.merges));
    };
    let r = watershed_hub::pipeline::compact_lake(&config, after, dry_run, &mut progress)
        .await
        .context("compacting the lake")?;
    bar.finish_and_clear();
    if dry_run {
        out!(
            "dry run: {} closed partitions; would merge {} files into {}, {} rows, {} bytes; \
             nothing was written or deleted",
            r.partitions,
            r.inputs,
            r.merges,
            r.rows,
            r.bytes_in
        );
        if r.unsettled > 0 {
            out!(
                "{} merge(s) cut short earlier (or in progress in the running hub) are settled first by a \
                 real pass; their partitions are not in this count",
                r.unsettled
            );
        }
        if r.changed > 0 {
            out!(
                "{} partition(s) changed while they were read (the running hub merged them); not in this count",
                r.changed
            );
        }
        if r.unreadable > 0 {
            out!(
                "{} file(s) cannot be read (named in the log above) and would be left as they are; \
                 the files beside them would be merged apart",
                r.unreadable
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "compacted {} closed partitions: {} files merged into {}, {} rows, {} bytes -> {} bytes",
        r.partitions,
        r.inputs,
        r.merges,
        r.rows,
        r.bytes_in,
        r.bytes_out
    );
    if r.abandoned_uploads > 0 {
        out!(
            "removed {} unfinished upload file(s) (`<name>.parquet#<n>`) that a crash during a put left, \
             untouched for over an hour",
            r.abandoned_uploads
        );
    }
    if r.deferred > 0 {
        eprintln!(
            "watershed: {} merges did not fit in memory.budget_bytes beside the open files' memory; \
             a later pass retries them",
            r.deferred
        );
    }
    if r.unreadable > 0 {
        eprintln!(
            "watershed: {} file(s) cannot be read (named in the log above) and are left as they are; \
             the files beside them were merged apart",
            r.unreadable
        );
    }
    if r.failures > 0 {
        eprintln!(
            "watershed: {} merges failed or are unfinished (see the log); the next pass or start retries them",
            r.failures
        );
        return Ok(ExitCode::FAILURE);
    }
    if r.unreadable > 0 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The listing's table (and with `partitions`, each partition's line);
/// each unreadable file is named on stderr.
pub(crate) fn print_summary(listing: &watershed_lake::ls::Listing, partitions: bool) -> std::io::Result<()> {
    out!("{:<24} {:>10} {:>7} {:>12} {:>12}", "table", "partitions", "files", "rows", "bytes");
    for (table, parts) in &listing.tables {
        let files: usize = parts.values().map(|p| p.files).sum();
        let rows: u64 = parts.values().map(|p| p.rows).sum();
        let bytes: u64 = parts.values().map(|p| p.bytes).sum();
        out!("{table:<24} {:>10} {files:>7} {rows:>12} {bytes:>12}", parts.len());
        if partitions {
            for (dir, p) in parts {
                let unreadable =
                    if p.unreadable > 0 { format!(" unreadable={}", p.unreadable) } else { String::new() };
                out!("  {dir:<60} files={} rows={} bytes={}{unreadable}", p.files, p.rows, p.bytes);
            }
        }
    }
    for (path, why) in &listing.unreadable {
        eprintln!("watershed: {path} is not a readable Parquet file ({why}); its rows are not counted");
    }
    if !listing.unreadable.is_empty() {
        eprintln!("watershed: {} unreadable file(s)", listing.unreadable.len());
    }
    Ok(())
}
