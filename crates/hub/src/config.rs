//! Hub configuration: a TOML file, then `WATERSHED_*` environment
//! variables (nested keys with `__`, such as `WATERSHED_LIMITS__MAX_BODY_BYTES`),
//! then command-line flags, merged by the `config` crate. Validation is
//! pure and names the bad key; building does the I/O.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use watershed_lake::{CompactConfig, EncodeOptions, WriterConfig};

use crate::error::{Error, Result};
use crate::ingest::DeadLetterRaw;

/// The whole hub configuration. Every field has a default, so no file is
/// needed for the embedded hub.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where HTTP ingest listens. Loopback by default.
    pub listen: String,
    /// The schema directory.
    pub schemas: PathBuf,
    /// The data directory: WAL, keyring, accounts and (by default) the lake.
    pub data_dir: PathBuf,
    /// Lake settings.
    pub lake: LakeConfig,
    /// Request and event limits.
    pub limits: LimitsConfig,
    /// Memory budget.
    pub memory: MemoryConfig,
    /// Write-ahead log settings.
    pub wal: WalConfig,
    /// Dead-letter settings.
    pub dead_letters: DeadLettersConfig,
    /// How long each table's partitions are kept.
    pub retention: RetentionConfig,
    /// Keyring settings.
    pub keys: KeysConfig,
    /// HTTPS: serve TLS on `listen` with this certificate.
    pub tls: TlsConfig,
    /// Seconds to drain on SIGTERM/SIGINT before giving up.
    pub shutdown_timeout_secs: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8787".into(),
            schemas: "schemas".into(),
            data_dir: "watershed-data".into(),
            lake: LakeConfig::default(),
            limits: LimitsConfig::default(),
            memory: MemoryConfig::default(),
            wal: WalConfig::default(),
            dead_letters: DeadLettersConfig::default(),
            retention: RetentionConfig::default(),
            keys: KeysConfig::default(),
            tls: TlsConfig::default(),
            shutdown_timeout_secs: 30,
        }
    }
}

/// `[lake]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// The lake directory; `<data_dir>/lake` when empty.
    pub path: Option<PathBuf>,
    /// The lake in S3 instead (`s3://bucket[/prefix]`); credentials from
    /// the AWS environment (keys, a web identity, a task or instance role).
    pub url: Option<String>,
    /// An S3 endpoint other than AWS's (an S3-compatible server).
    pub s3_endpoint: Option<String>,
    /// The bucket's region; `AWS_REGION` (or `us-east-1`) when unset.
    pub s3_region: Option<String>,
    /// Roll a partition's file once this many Arrow bytes went into it.
    pub roll_bytes: usize,
    /// Roll a partition's file this many seconds after its first row.
    pub roll_age_secs: u64,
    /// The same for late partitions (hour ended more than `late_after_secs` ago).
    pub late_roll_age_secs: u64,
    /// When a partition counts as late.
    pub late_after_secs: u64,
    /// Open partition buffers beyond this are flushed, least recently written first.
    pub max_open_partitions: usize,
    /// Concurrent file flushes.
    pub flush_concurrency: usize,
    /// zstd level of Parquet pages.
    pub zstd_level: i32,
    /// Maximum rows per Parquet row group.
    pub row_group_rows: usize,
    /// Compaction merges a closed partition's small files into files of up
    /// to this many bytes (files of at least half of it are left alone).
    pub compact_target_bytes: u64,
    /// A partition is closed, and compacted, once its hour ended this
    /// many seconds ago.
    pub compact_after_secs: u64,
    /// Seconds between compaction passes; 0 turns compaction off.
    pub compact_every_secs: u64,
    /// Latency added to every object-store request, in milliseconds
    /// (object_store's throttling wrapper), for capacity planning and
    /// backpressure drills. 0 in production.
    pub put_delay_ms: u64,
}

impl Default for LakeConfig {
    fn default() -> Self {
        let w = WriterConfig::default();
        let c = CompactConfig::default();
        Self {
            path: None,
            url: None,
            s3_endpoint: None,
            s3_region: None,
            roll_bytes: w.roll_bytes,
            roll_age_secs: w.roll_age.as_secs(),
            late_roll_age_secs: w.late_roll_age.as_secs(),
            late_after_secs: w.late_after.as_secs(),
            max_open_partitions: w.max_open_partitions,
            flush_concurrency: w.flush_concurrency,
            zstd_level: w.encode.zstd_level,
            row_group_rows: w.encode.row_group_rows,
            compact_target_bytes: c.target_bytes,
            compact_after_secs: c.after.as_secs(),
            compact_every_secs: 300,
            put_delay_ms: 0,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body, after decompression (413 above it).
    pub max_body_bytes: usize,
    /// Largest single event (rejected as `too_large` above it).
    pub max_event_bytes: usize,
    /// Most events in one request (413 `too_large` above it).
    pub max_batch_events: usize,
    /// Longest a request body may take to arrive (408 above it), so a
    /// stalled or trickling client does not hold its connection and
    /// buffer for good.
    pub body_timeout_secs: u64,
    /// Longest a request's headers may take to arrive, and longest an
    /// idle connection is kept between requests: the connection is
    /// closed after it.
    pub header_timeout_secs: u64,
    /// Most client connections open at once; further clients wait in the
    /// listen backlog until one closes. The hub raises its open-file limit
    /// to fit them beside its own files.
    pub max_connections: usize,
    /// Furthest an event's time may be ahead of its receipt (rejected as
    /// `future_time` beyond it): a wrong clock or time zone must not open
    /// partitions for hours to come.
    pub max_future_secs: u64,
    /// Furthest an event's time may be before its receipt (rejected as
    /// `past_time` beyond it); 0, the default: no bound, since backfills
    /// and replays of history are legitimate.
    pub max_past_secs: u64,
    /// Requests validated and protected at once (0: one per core). Each
    /// takes a core while it runs, and its working memory; further
    /// requests wait, their bodies held, until one finishes.
    pub processing_concurrency: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 << 20,
            max_event_bytes: 1 << 20,
            max_batch_events: 10_000,
            body_timeout_secs: 60,
            header_timeout_secs: 30,
            max_connections: 1024,
            max_future_secs: crate::ingest::DEFAULT_MAX_FUTURE_SECS,
            max_past_secs: 0,
            processing_concurrency: 0,
        }
    }
}

/// `[memory]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Bytes of buffered rows (Arrow rows not yet encoded, open files'
    /// encoded pages, and files being written) before ingest answers 503.
    pub budget_bytes: usize,
    /// Bytes of request bodies held at once, as received and
    /// decompressed, until their events are processed; a request that
    /// does not fit is answered 503 (before its body is read when it
    /// declares its length). At least twice `limits.max_body_bytes`.
    pub requests_bytes: usize,
    /// Of those, the most one account's requests may hold, so that one
    /// account's collectors cannot take the whole bound from the others.
    /// At least twice `limits.max_body_bytes`, at most `requests_bytes`.
    pub requests_bytes_per_account: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { budget_bytes: 512 << 20, requests_bytes: 128 << 20, requests_bytes_per_account: 64 << 20 }
    }
}

/// `[wal]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Roll WAL segments at this size.
    pub segment_bytes: u64,
    /// The bound on WAL segment bytes (raw events) on disk. From half of
    /// it, the partitions holding the oldest records are committed before
    /// their roll age, until the segments hold a quarter of it; at all of
    /// it (the lake cannot commit, or committed segments cannot be
    /// deleted) ingest answers 503. The id files (`dedupe_window`) come on
    /// top. At least eight segments.
    pub max_raw_bytes: u64,
    /// Keep the ids of committed events (not the events) until at least
    /// this many newer events exist: the dedupe window that survives
    /// restarts. In memory it takes about 54 bytes per event.
    pub dedupe_window: usize,
    /// Start even when a WAL segment other than the newest is damaged:
    /// replay its records up to the damage, keep a copy as
    /// `<name>.damaged`, and cut the rest off, losing its records not yet
    /// committed to the lake. Off by default: such damage stops the start
    /// with an error saying so. Meant for one start, after that error.
    pub salvage: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self { segment_bytes: 64 << 20, max_raw_bytes: 4 << 30, dedupe_window: 1_000_000, salvage: false }
    }
}

/// `[dead_letters]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLettersConfig {
    /// How the `raw` column holds a refused event: `encrypt` (the default:
    /// a ciphertext under the event's data-subject key, else the
    /// account's) or `plain`.
    pub raw: DeadLetterRaw,
}

/// `[retention]`: a table's partitions are deleted once their hour (event
/// time; receive time for `_dead_letters`) ended more than its period
/// ago, and each deletion recorded in `<data_dir>/retention.log`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days a table's partitions are kept unless `tables` says otherwise;
    /// 0 (the default) keeps them for good.
    pub default_days: u32,
    /// Days by table name (`_dead_letters` too); 0 keeps a table for good.
    pub tables: std::collections::BTreeMap<String, u32>,
    /// Seconds between the running hub's retention passes.
    pub every_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { default_days: 0, tables: std::collections::BTreeMap::new(), every_secs: 3600 }
    }
}

impl RetentionConfig {
    /// The policy, once every table it names is one of `registry`'s (or
    /// `_dead_letters`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the key of a table the schemas do not have.
    pub fn policy(
        &self,
        registry: &watershed_schema::Registry,
    ) -> Result<watershed_lake::retention::Retention> {
        for table in self.tables.keys() {
            let known = table == watershed_lake::DEAD_LETTERS
                || registry.subjects().iter().any(|s| &s.table == table);
            if !known {
                let mut tables: Vec<&str> = registry.subjects().iter().map(|s| s.table.as_str()).collect();
                tables.sort_unstable();
                tables.push(watershed_lake::DEAD_LETTERS);
                return Err(Error::Config(format!(
                    "retention.tables.{table}: no such table (the tables are {})",
                    tables.join(", ")
                )));
            }
        }
        Ok(watershed_lake::retention::Retention {
            default_days: self.default_days,
            tables: self.tables.clone(),
        })
    }
}

/// `[keys]`: where the keyring's master keys come from, and how soon an
/// erasure reaches the write-ahead log.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// `local` (the default: master keys in plaintext in
    /// `<data_dir>/keyring/master.json`, mode 0600) or `kms` (the same
    /// file, its keys sealed by the AWS KMS key `kms_key_id` and unsealed
    /// once at start).
    pub master: MasterKind,
    /// The KMS key (id, ARN or alias) that seals the master keys.
    pub kms_key_id: Option<String>,
    /// The KMS key's region; the AWS region chain (`AWS_REGION`, the
    /// profile) when unset.
    pub kms_region: Option<String>,
    /// A KMS endpoint other than the region's (a VPC endpoint, or a local
    /// KMS-compatible server).
    pub kms_endpoint: Option<String>,
    /// How often, in milliseconds, the hub looks for erasures (`keys
    /// forget`, usually run by another process). On finding one it
    /// commits every open partition and retires the write-ahead log, so
    /// the forgotten subject's raw events leave the disk within about
    /// this long; 0 leaves them to the lake's roll ages.
    pub erasure_check_ms: u64,
    /// Data keys kept unwrapped in memory (about 1 KiB each, up to twice
    /// that with the per-subject index); others are unwrapped again when
    /// used, a few µs each.
    pub cached_keys: usize,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            master: MasterKind::default(),
            kms_key_id: None,
            kms_region: None,
            kms_endpoint: None,
            erasure_check_ms: 1000,
            cached_keys: watershed_protect::CACHED_KEYS,
        }
    }
}

/// `[tls]`: with both files set, `listen` serves HTTPS (TLS 1.2 and 1.3)
/// and nothing else; unset, plain HTTP, for a loopback address or behind
/// a TLS terminator. Renewed files are served without a restart
/// (`crate::tls`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM: the server's certificate, then any intermediate ones.
    pub cert_file: Option<PathBuf>,
    /// PEM: the certificate's private key (PKCS #8, PKCS #1 or SEC 1).
    pub key_file: Option<PathBuf>,
}

/// Where the keyring's master keys come from.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MasterKind {
    /// Plaintext in the keyring directory.
    #[default]
    Local,
    /// Sealed by an AWS KMS key.
    Kms,
}

impl KeysConfig {
    /// Open the keyring in `dir` with the configured master key.
    ///
    /// # Errors
    /// [`Error::Protect`] when the keyring cannot be opened (for KMS, when
    /// a master key cannot be unsealed); [`Error::Config`] when KMS is
    /// asked of a build without it.
    pub fn open(&self, dir: &Path) -> Result<watershed_protect::LocalKeyring> {
        let keyring = match self.master {
            MasterKind::Local => watershed_protect::LocalKeyring::open_local(dir).map_err(|e| match e {
                watershed_protect::Error::Sealed { path, by } => Error::Config(format!(
                    "keys.master: the master keys in {} are sealed by KMS key {by}; set keys.master = \
                     \"kms\" and keys.kms_key_id = \"{by}\"",
                    path.display()
                )),
                e => e.into(),
            }),
            MasterKind::Kms => Ok(watershed_protect::LocalKeyring::open_sealed(dir, self.sealer()?)?),
        }?;
        Ok(keyring.with_cached_keys(self.cached_keys))
    }

    /// The KMS master key that seals the master keys.
    ///
    /// # Errors
    /// [`Error::Config`] when the master is not `kms` or this build has no
    /// KMS support; [`Error::Protect`] when the KMS client cannot start.
    #[cfg(feature = "kms")]
    pub fn sealer(&self) -> Result<Box<dyn watershed_protect::MasterKey>> {
        let Some(key_id) = self.kms_key_id.clone().filter(|_| self.master == MasterKind::Kms) else {
            return Err(Error::Config("keys.master: set to \"kms\" with keys.kms_key_id to seal".into()));
        };
        let kms =
            watershed_protect::KmsMasterKey::new(key_id, self.kms_region.clone(), self.kms_endpoint.clone())?;
        Ok(Box::new(kms))
    }

    /// The KMS master key that seals the master keys.
    ///
    /// # Errors
    /// Always [`Error::Config`]: this build has no KMS support.
    #[cfg(not(feature = "kms"))]
    pub fn sealer(&self) -> Result<Box<dyn watershed_protect::MasterKey>> {
        Err(Error::Config(NO_KMS.into()))
    }
}

#[cfg(not(feature = "kms"))]
const NO_KMS: &str = "keys.master: \"kms\" needs a build with KMS support (the `kms` feature)";

/// `WATERSHED_*` variables that are not configuration keys: the log
/// filter and format, and `send`'s token. Any other `WATERSHED_*`
/// variable is read as a key, so a misspelt one is refused, not ignored.
const NOT_CONFIG: [&str; 3] = ["WATERSHED_LOG", "WATERSHED_LOG_FORMAT", "WATERSHED_TOKEN"];

/// Prefixes of the test harness's and benchmark's own variables, which
/// are not configuration keys either.
const NOT_CONFIG_PREFIXES: [&str; 2] = ["WATERSHED_TEST_", "WATERSHED_BENCH_"];

/// Whether the environment variable `name` is a configuration key.
fn is_config_var(name: &str) -> bool {
    name.starts_with("WATERSHED_")
        && !NOT_CONFIG.contains(&name)
        && !NOT_CONFIG_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Flags that override the file and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--schemas`
    pub schemas: Option<PathBuf>,
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
}

impl HubConfig {
    /// Load: defaults, then `file` (if given; it must exist), then
    /// `WATERSHED_*` from `env`, then `overrides`; then validate.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad key.
    pub fn load(file: Option<&Path>, env: Vec<(String, String)>, overrides: &Overrides) -> Result<Self> {
        let mut b = config::Config::builder().add_source(
            config::Config::try_from(&HubConfig::default()).map_err(|e| Error::Config(e.to_string()))?,
        );
        if let Some(f) = file {
            if !f.exists() {
                return Err(Error::Config(format!("config file {} does not exist", f.display())));
            }
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        let env_map: std::collections::HashMap<String, String> =
            env.into_iter().filter(|(k, _)| is_config_var(k)).collect();
        b = b.add_source(
            config::Environment::with_prefix("WATERSHED")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        if let Some(v) = &overrides.listen {
            b = b.set_override("listen", v.as_str()).map_err(|e| Error::Config(e.to_string()))?;
        }
        if let Some(v) = &overrides.schemas {
            b = b
                .set_override("schemas", v.display().to_string())
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        if let Some(v) = &overrides.data_dir {
            b = b
                .set_override("data_dir", v.display().to_string())
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        let cfg: HubConfig =
            b.build().and_then(config::Config::try_deserialize).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check values that parse but make no sense. Pure: no I/O.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::Config(format!("{key}: {why}")));
        if self.listen.parse::<SocketAddr>().is_err() {
            return bad("listen", &format!("{:?} is not an address like 127.0.0.1:8787", self.listen));
        }
        if self.limits.max_body_bytes == 0 {
            return bad("limits.max_body_bytes", "must be positive");
        }
        if self.limits.max_event_bytes == 0 || self.limits.max_event_bytes > self.limits.max_body_bytes {
            return bad("limits.max_event_bytes", "must be positive and at most limits.max_body_bytes");
        }
        if self.limits.max_batch_events == 0 {
            return bad("limits.max_batch_events", "must be positive");
        }
        if self.limits.body_timeout_secs == 0 {
            return bad("limits.body_timeout_secs", "must be positive");
        }
        if self.limits.header_timeout_secs == 0 {
            return bad("limits.header_timeout_secs", "must be positive");
        }
        if self.limits.max_connections == 0 {
            return bad("limits.max_connections", "must be positive");
        }
        if let Some(url) = &self.lake.url {
            if self.lake.path.is_some() {
                return bad("lake.url", "set lake.url (a lake in S3) or lake.path (a directory), not both");
            }
            if let Err(e) = watershed_lake::parse_s3_url(url) {
                return bad("lake.url", &e.to_string());
            }
        } else if self.lake.s3_endpoint.is_some() || self.lake.s3_region.is_some() {
            let key = if self.lake.s3_endpoint.is_some() { "lake.s3_endpoint" } else { "lake.s3_region" };
            return bad(key, "applies only to a lake in S3 (lake.url)");
        }
        if self.retention.every_secs == 0 {
            return bad("retention.every_secs", "must be positive");
        }
        if self.memory.budget_bytes < (1 << 16) {
            return bad("memory.budget_bytes", "must be at least 65536");
        }
        if self.memory.requests_bytes / 2 < self.limits.max_body_bytes {
            return bad(
                "memory.requests_bytes",
                "must be at least twice limits.max_body_bytes (a compressed request holds its body and \
                 its decompressed bytes at once)",
            );
        }
        if self.memory.requests_bytes_per_account / 2 < self.limits.max_body_bytes
            || self.memory.requests_bytes_per_account > self.memory.requests_bytes
        {
            return bad(
                "memory.requests_bytes_per_account",
                "must be at least twice limits.max_body_bytes and at most memory.requests_bytes",
            );
        }
        if self.keys.cached_keys == 0 {
            return bad("keys.cached_keys", "must be positive");
        }
        if self.lake.roll_bytes == 0 {
            return bad("lake.roll_bytes", "must be positive");
        }
        if self.lake.roll_age_secs == 0 {
            return bad("lake.roll_age_secs", "must be positive");
        }
        if self.lake.compact_target_bytes < (1 << 20) {
            return bad("lake.compact_target_bytes", "must be at least 1048576 (1 MiB)");
        }
        if !(1..=22).contains(&self.lake.zstd_level) {
            return bad("lake.zstd_level", "must be 1..=22");
        }
        if self.lake.max_open_partitions == 0
            || self.lake.flush_concurrency == 0
            || self.lake.row_group_rows == 0
        {
            return bad("lake", "max_open_partitions, flush_concurrency and row_group_rows must be positive");
        }
        if self.wal.segment_bytes < 4096 {
            return bad("wal.segment_bytes", "must be at least 4096");
        }
        if self.wal.max_raw_bytes / 8 < self.wal.segment_bytes {
            return bad("wal.max_raw_bytes", "must be at least eight times wal.segment_bytes");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls", "set both cert_file and key_file (or neither, for plain HTTP)");
        }
        match self.keys.master {
            MasterKind::Local => {
                if self.keys.kms_key_id.is_some() {
                    return bad("keys.kms_key_id", "is set, but keys.master is \"local\"; set it to \"kms\"");
                }
            }
            MasterKind::Kms => {
                #[cfg(not(feature = "kms"))]
                return Err(Error::Config(NO_KMS.into()));
                #[cfg(feature = "kms")]
                if self.keys.kms_key_id.as_deref().is_none_or(str::is_empty) {
                    return bad("keys.kms_key_id", "is required when keys.master is \"kms\"");
                }
            }
        }
        Ok(())
    }

    /// Requests processed at once: `limits.processing_concurrency`, or
    /// one per core the process may run on.
    #[must_use]
    pub fn processing_concurrency(&self) -> usize {
        match self.limits.processing_concurrency {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

    /// The lake directory.
    #[must_use]
    pub fn lake_dir(&self) -> PathBuf {
        self.lake.path.clone().unwrap_or_else(|| self.data_dir.join("lake"))
    }

    /// The lake: in S3 with `lake.url`, else the local directory
    /// [`HubConfig::lake_dir`]; at most `concurrency` requests at once.
    ///
    /// # Errors
    /// When the directory or the S3 client cannot be set up.
    pub fn open_lake(&self, concurrency: usize) -> Result<watershed_lake::Lake> {
        Ok(match &self.lake.url {
            Some(url) => watershed_lake::Lake::s3(
                url,
                self.lake.s3_endpoint.as_deref(),
                self.lake.s3_region.as_deref(),
                concurrency,
            )?,
            None => watershed_lake::Lake::local(&self.lake_dir(), concurrency)?,
        })
    }

    /// Where the lake is, for messages: its URL or its directory.
    #[must_use]
    pub fn lake_location(&self) -> String {
        self.lake.url.clone().unwrap_or_else(|| self.lake_dir().display().to_string())
    }

    /// The compactor's settings (its `source` is set by the hub).
    #[must_use]
    pub fn compaction(&self) -> CompactConfig {
        CompactConfig {
            target_bytes: self.lake.compact_target_bytes,
            after: Duration::from_secs(self.lake.compact_after_secs),
            encode: EncodeOptions {
                zstd_level: self.lake.zstd_level,
                row_group_rows: self.lake.row_group_rows,
            },
            source: "wal".to_owned(),
            ..CompactConfig::default()
        }
    }

    /// The writer settings.
    #[must_use]
    pub fn writer(&self) -> WriterConfig {
        WriterConfig {
            roll_bytes: self.lake.roll_bytes,
            roll_age: Duration::from_secs(self.lake.roll_age_secs),
            late_roll_age: Duration::from_secs(self.lake.late_roll_age_secs),
            late_after: Duration::from_secs(self.lake.late_after_secs),
            max_open_partitions: self.lake.max_open_partitions,
            flush_concurrency: self.lake.flush_concurrency,
            encode: EncodeOptions {
                zstd_level: self.lake.zstd_level,
                row_group_rows: self.lake.row_group_rows,
            },
            source: "wal".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration from these `WATERSHED_*` variables alone, or the
    /// error's text.
    fn load(vars: &[(&str, &str)]) -> std::result::Result<HubConfig, String> {
        let env = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        HubConfig::load(None, env, &Overrides::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn layers_and_key_names() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9000\"\n[limits]\nmax_batch_events = 5\n").unwrap();
        let env = vec![("WATERSHED_LIMITS__MAX_BATCH_EVENTS".to_owned(), "7".to_owned())];
        let o = Overrides { listen: Some("127.0.0.1:9001".into()), ..Overrides::default() };
        let c = HubConfig::load(Some(&f), env, &o).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9001", "flags beat env and file");
        assert_eq!(c.limits.max_batch_events, 7, "env beats file");

        std::fs::write(&f, "[limits]\nmax_batch_event = 5\n").unwrap();
        let e = HubConfig::load(Some(&f), vec![], &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("max_batch_event"), "{e}");
        let env = vec![("WATERSHED_MEMORY__BUDGET_BYTES".to_owned(), "lots".to_owned())];
        let e = HubConfig::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("budget_bytes"), "{e}");
        let env = vec![("WATERSHED_DEAD_LETTERS__RAW".to_owned(), "plain".to_owned())];
        let c = HubConfig::load(None, env, &Overrides::default()).unwrap();
        assert_eq!(c.dead_letters.raw, DeadLetterRaw::Plain);
        assert_eq!(HubConfig::default().dead_letters.raw, DeadLetterRaw::Encrypt, "encrypted by default");
        let env = vec![("WATERSHED_DEAD_LETTERS__RAW".to_owned(), "clear".to_owned())];
        let e = HubConfig::load(None, env, &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("clear") && e.contains("raw"), "{e}");
        let o = Overrides { listen: Some("nowhere".into()), ..Overrides::default() };
        let e = HubConfig::load(None, vec![], &o).unwrap_err().to_string();
        assert!(e.starts_with("invalid configuration: listen:"), "{e}");
        // The logging and `send` variables are not keys; anything else is.
        let others =
            [("WATERSHED_LOG", "debug"), ("WATERSHED_LOG_FORMAT", "json"), ("WATERSHED_TOKEN", "wsh_x")];
        assert_eq!(load(&others).unwrap().listen, HubConfig::default().listen);
        let harness = [("WATERSHED_TEST_PYTHON", "/venv/bin/python"), ("WATERSHED_BENCH_INPUT", "/tmp/wl")];
        assert!(load(&harness).is_ok());
        for misspelt in ["WATERSHED_LOGS", "WATERSHED_TOKENS", "WATERSHED_LOG_LEVEL"] {
            let e = load(&[(misspelt, "x")]).unwrap_err();
            let key = misspelt["WATERSHED_".len()..].to_lowercase();
            assert!(e.contains(&format!("unknown field `{key}`")), "{misspelt}: {e}");
        }
    }

    /// The README's configuration block is the defaults, key for key: it
    /// loads, and gives what no file gives.
    #[test]
    fn the_readmes_configuration_is_the_defaults() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Configuration").expect("a Configuration section")..];
        let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let block = &section[start..start + section[start..].find("```").expect("the block's end")];
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("readme.toml");
        std::fs::write(&f, block).unwrap();
        let documented = HubConfig::load(Some(&f), vec![], &Overrides::default()).unwrap();
        assert_eq!(format!("{documented:?}"), format!("{:?}", HubConfig::default()));
        // And it names every key (an optional one commented out).
        let names = |key: &str| {
            block.lines().any(|l| l.trim_start_matches('#').trim_start().starts_with(&format!("{key} =")))
        };
        let defaults = serde_json::to_value(HubConfig::default()).unwrap();
        for (key, value) in defaults.as_object().unwrap() {
            match value.as_object() {
                Some(table) => {
                    assert!(block.contains(&format!("\n[{key}]\n")), "[{key}] in the README");
                    for inner in table.keys() {
                        assert!(names(inner), "{key}.{inner} in the README");
                    }
                }
                None => assert!(names(key), "{key} in the README"),
            }
        }
    }

    #[test]
    fn keys_settings_name_their_keys() {
        assert_eq!(load(&[]).unwrap().keys.master, MasterKind::Local, "local by default");
        let e = load(&[("WATERSHED_KEYS__MASTER", "vault")]).unwrap_err();
        assert!(e.contains("vault") && e.contains("master"), "{e}");
        let e = load(&[("WATERSHED_KEYS__KMS_KEY_ID", "alias/w")]).unwrap_err();
        assert!(e.starts_with("invalid configuration: keys.kms_key_id:"), "{e}");
        let e = load(&[("WATERSHED_KEYS__MASTER", "kms")]).unwrap_err();
        #[cfg(feature = "kms")]
        assert!(e.starts_with("invalid configuration: keys.kms_key_id: is required"), "{e}");
        #[cfg(not(feature = "kms"))]
        assert!(e.contains("`kms` feature"), "{e}");
        #[cfg(feature = "kms")]
        {
            let c = load(&[("WATERSHED_KEYS__MASTER", "kms"), ("WATERSHED_KEYS__KMS_KEY_ID", "alias/w")])
                .unwrap();
            assert_eq!((c.keys.master, c.keys.kms_key_id.as_deref()), (MasterKind::Kms, Some("alias/w")));
        }
        let c = load(&[("WATERSHED_KEYS__CACHED_KEYS", "5000"), ("WATERSHED_KEYS__ERASURE_CHECK_MS", "0")])
            .unwrap();
        assert_eq!((c.keys.cached_keys, c.keys.erasure_check_ms), (5000, 0));
        let e = load(&[("WATERSHED_KEYS__CACHED_KEYS", "0")]).unwrap_err();
        assert!(e.starts_with("invalid configuration: keys.cached_keys:"), "{e}");
    }

    #[test]
    fn tls_takes_both_files_or_neither() {
        assert_eq!(load(&[]).unwrap().tls, TlsConfig::default(), "plain HTTP by default");
        for one in ["WATERSHED_TLS__CERT_FILE", "WATERSHED_TLS__KEY_FILE"] {
            let e = load(&[(one, "/etc/hub/x.pem")]).unwrap_err();
            assert!(e.starts_with("invalid configuration: tls: set both cert_file and key_file"), "{e}");
        }
        let c =
            load(&[("WATERSHED_TLS__CERT_FILE", "/c.pem"), ("WATERSHED_TLS__KEY_FILE", "/k.pem")]).unwrap();
        assert_eq!(c.tls.cert_file.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(c.tls.key_file.as_deref(), Some(Path::new("/k.pem")));
    }

    #[test]
    fn connection_limits_name_their_keys() {
        let c = load(&[]).unwrap();
        assert_eq!((c.limits.header_timeout_secs, c.limits.max_connections), (30, 1024));
        assert_eq!(c.limits.max_future_secs, 86_400);
        for key in ["header_timeout_secs", "max_connections", "body_timeout_secs"] {
            let var = format!("WATERSHED_LIMITS__{}", key.to_uppercase());
            let e = load(&[(var.as_str(), "0")]).unwrap_err();
            assert!(e.starts_with(&format!("invalid configuration: limits.{key}: must be positive")), "{e}");
        }
    }

    #[test]
    fn processing_concurrency_is_one_per_core_unless_set() {
        let cores = std::thread::available_parallelism().unwrap().get();
        let c = load(&[]).unwrap();
        assert_eq!((c.limits.processing_concurrency, c.processing_concurrency()), (0, cores));
        let c = load(&[("WATERSHED_LIMITS__PROCESSING_CONCURRENCY", "3")]).unwrap();
        assert_eq!(c.processing_concurrency(), 3);
        let e = load(&[("WATERSHED_LIMITS__PROCESSING_CONCURRENCY", "-1")]).unwrap_err();
        assert!(e.contains("processing_concurrency"), "{e}");
    }

    #[test]
    fn request_memory_fits_a_compressed_body_and_its_text() {
        assert_eq!(load(&[]).unwrap().memory.requests_bytes, 128 << 20);
        let e = load(&[("WATERSHED_MEMORY__REQUESTS_BYTES", "15000000")]).unwrap_err();
        assert!(e.starts_with("invalid configuration: memory.requests_bytes: must be at least twice"), "{e}");
        let c = load(&[
            ("WATERSHED_MEMORY__REQUESTS_BYTES", "3000000"),
            ("WATERSHED_MEMORY__REQUESTS_BYTES_PER_ACCOUNT", "3000000"),
            ("WATERSHED_LIMITS__MAX_BODY_BYTES", "1500000"),
        ])
        .unwrap();
        assert_eq!(c.memory.requests_bytes, 3_000_000);
        assert_eq!(load(&[]).unwrap().memory.requests_bytes_per_account, 64 << 20);
        for per_account in ["20000000", "200000000"] {
            let e = load(&[("WATERSHED_MEMORY__REQUESTS_BYTES_PER_ACCOUNT", per_account)]).unwrap_err();
            assert!(e.starts_with("invalid configuration: memory.requests_bytes_per_account:"), "{e}");
        }
    }

    #[test]
    fn compaction_defaults_and_bounds() {
        let c = load(&[]).unwrap();
        assert_eq!(
            (c.lake.compact_every_secs, c.lake.compact_after_secs, c.lake.compact_target_bytes),
            (300, 3600, 128 << 20)
        );
        let off = load(&[("WATERSHED_LAKE__COMPACT_EVERY_SECS", "0")]).unwrap();
        assert_eq!(off.lake.compact_every_secs, 0);
        let e = load(&[("WATERSHED_LAKE__COMPACT_TARGET_BYTES", "4096")]).unwrap_err();
        assert!(e.starts_with("invalid configuration: lake.compact_target_bytes: must be at least"), "{e}");
    }

    #[test]
    fn an_s3_lake_is_checked_naming_its_keys() {
        let c = load(&[("WATERSHED_LAKE__URL", "s3://acme-events/lake/")]).unwrap();
        assert_eq!(c.lake_location(), "s3://acme-events/lake/");
        for (vars, want) in [
            (
                vec![("WATERSHED_LAKE__URL", "s3://acme-events"), ("WATERSHED_LAKE__PATH", "/srv/lake")],
                "lake.url: set lake.url (a lake in S3) or lake.path (a directory), not both",
            ),
            (
                vec![("WATERSHED_LAKE__URL", "/srv/lake")],
                "lake.url: lake URL \"/srv/lake\": not an s3:// URL",
            ),
            (
                vec![("WATERSHED_LAKE__URL", "s3://Acme_Events")],
                "lake.url: lake URL \"s3://Acme_Events\": the bucket name",
            ),
            (
                vec![("WATERSHED_LAKE__S3_ENDPOINT", "http://127.0.0.1:9000")],
                "lake.s3_endpoint: applies only to a lake in S3 (lake.url)",
            ),
            (vec![("WATERSHED_LAKE__S3_REGION", "eu-west-1")], "lake.s3_region: applies only"),
        ] {
            let e = load(&vars).unwrap_err();
            assert!(e.contains(want), "{vars:?}: {e}");
        }
    }

    #[test]
    fn retention_periods_by_table_from_the_environment() {
        let c = load(&[]).unwrap();
        assert_eq!(
            (c.retention.default_days, c.retention.tables.len(), c.retention.every_secs),
            (0, 0, 3600)
        );
        let c = load(&[
            ("WATERSHED_RETENTION__DEFAULT_DAYS", "365"),
            ("WATERSHED_RETENTION__TABLES__PAYMENTS", "30"),
            ("WATERSHED_RETENTION__TABLES___DEAD_LETTERS", "7"),
        ])
        .unwrap();
        assert_eq!(c.retention.default_days, 365);
        assert_eq!(
            c.retention.tables,
            std::collections::BTreeMap::from([("payments".to_owned(), 30), ("_dead_letters".to_owned(), 7)])
        );
        let e = load(&[("WATERSHED_RETENTION__EVERY_SECS", "0")]).unwrap_err();
        assert!(e.contains("retention.every_secs: must be positive"), "{e}");
        let schemas = crate::testing::config(std::path::Path::new("unused")).schemas;
        let registry = watershed_schema::Registry::load(&schemas).unwrap();
        let policy = c.retention.policy(&registry).unwrap();
        assert_eq!(
            (policy.days("payments"), policy.days("logins"), policy.days("_dead_letters")),
            (Some(30), Some(365), Some(7))
        );
        let bad = load(&[("WATERSHED_RETENTION__TABLES__PAYMENT", "30")]).unwrap();
        let e = bad.retention.policy(&registry).unwrap_err().to_string();
        assert!(
            e.contains("retention.tables.payment: no such table (the tables are cloudtrail, logins, orders, payments, _dead_letters)"),
            "{e}"
        );
    }

    #[test]
    fn the_wal_bound_holds_eight_segments() {
        assert_eq!(load(&[]).unwrap().wal.max_raw_bytes, 4 << 30);
        let e = load(&[("WATERSHED_WAL__MAX_RAW_BYTES", "67108864")]).unwrap_err();
        assert!(e.starts_with("invalid configuration: wal.max_raw_bytes: must be at least eight"), "{e}");
        let c =
            load(&[("WATERSHED_WAL__MAX_RAW_BYTES", "524288"), ("WATERSHED_WAL__SEGMENT_BYTES", "65536")]);
        assert_eq!(c.unwrap().wal.max_raw_bytes, 524_288);
    }
}
