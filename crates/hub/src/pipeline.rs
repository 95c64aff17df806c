//! The hub: wiring of the stages, startup recovery, ingest, and shutdown.
//!
//! ```text
//! request ─▶ body (decompress, split) ─▶ Ingestor (envelope, auth, dedupe,
//!   validate, protect, route) ─▶ WAL (group commit, fsync) ─▶ ack
//!                                   └─▶ LakeWriter (buffers, Parquet, commit)
//! ```

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use watershed_event::{AccountId, Clock, SystemClock};
use watershed_lake::retention::RetentionStats;
use watershed_lake::{
    CommitLog, CommitSink, CompactConfig, CompactStats, Compactor, Lake, LakeWriter, Memory, Msg, Part,
    PartitionKey, WriterConfig, WriterStats,
};
use watershed_protect::Keyring;
use watershed_schema::{Limits, Registry};

use crate::body::{self, BodyError};
use crate::claims::{Claims, Ticket};
use crate::config::HubConfig;
use crate::dedupe::Dedupe;
use crate::error::{Error, Result};
use crate::ingest::{IngestResponse, Ingestor};
use crate::metrics::Metrics;
use crate::requests::{Full, Held, RequestMemory};
use crate::wal::{BeforeWrite, Pending, Wal, WalOptions};

/// Why a request was refused as a whole.
#[derive(Debug)]
pub enum Refused {
    /// 413: the body is over `limits.max_body_bytes` (this many).
    TooLarge(usize),
    /// 413: the body holds more than `limits.max_batch_events` events
    /// (this many); like a body over the byte limit, it is sent again in
    /// smaller batches.
    TooManyEvents(usize),
    /// 400
    BadRequest(String),
    /// 503: the memory budget is spent.
    Busy,
    /// 503: the request's body (or its decompressed bytes) does not fit
    /// beside the other requests in flight (in `memory.requests_bytes`,
    /// or its account's `memory.requests_bytes_per_account`).
    RequestsFull(Full),
    /// 503: the WAL holds `wal.max_raw_bytes` of events the lake has not
    /// committed (or has not deleted since).
    WalFull,
    /// 503: a dependency (the keyring) failed; nothing was stored.
    Unavailable(String),
    /// 500: the pipeline failed (the WAL could not be written).
    Failed(String),
}

struct Sink(Arc<Pending>);

impl CommitSink for Sink {
    fn committed(&self, _partition: &PartitionKey, records: &[u64]) {
        self.0.committed(records);
    }
    fn oldest_needed(&self) -> u64 {
        self.0.oldest_segment()
    }
    fn commit_before(&self) -> u64 {
        self.0.commit_before()
    }
}

/// How often a long replay of the write-ahead log reports its progress.
const REPLAY_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A running hub pipeline (without the HTTP listener).
pub struct Hub {
    /// The configuration it runs with.
    pub config: HubConfig,
    ingestor: Arc<Ingestor>,
    wal: Wal,
    writer_tx: mpsc::Sender<Msg>,
    writer_task: tokio::task::JoinHandle<()>,
    /// Commits what the WAL holds after each erasure (see
    /// [`watch_erasures`]).
    erasure_watch: Option<tokio::task::JoinHandle<()>>,
    memory: Arc<Memory>,
    /// Bytes of request bodies in flight (`memory.requests_bytes`).
    pub requests: Arc<RequestMemory>,
    /// Requests being processed at once: one per core.
    processing: Arc<tokio::sync::Semaphore>,
    /// Shared with the WAL: what it holds, and what it asks the lake to
    /// commit.
    pending: Arc<Pending>,
    /// Writer counters.
    pub writer_stats: Arc<WriterStats>,
    /// Compaction counters.
    pub compact_stats: Arc<CompactStats>,
    /// The compaction task and its stop request (none when
    /// `lake.compact_every_secs` is 0).
    compaction: Option<(tokio::task::JoinHandle<()>, Arc<CompactStop>)>,
    /// Retention counters.
    pub retention_stats: Arc<RetentionStats>,
    /// The retention task and its stop request (none when no table
    /// expires).
    retention: Option<(tokio::task::JoinHandle<()>, Arc<CompactStop>)>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// The lake.
    pub lake: Lake,
    /// Accounts and their tokens.
    pub accounts: crate::accounts::Accounts,
    /// The schemas, as loaded at start (served by [`crate::registry_api`]).
    pub registry: Arc<Registry>,
    /// The tasks of requests being ingested (see [`Hub::ingest`]).
    in_flight: tokio_util::task::TaskTracker,
    /// Requests whose claimed ids are not durable yet.
    claims: Arc<Claims>,
    /// Requests refused for their credentials, for the log.
    pub(crate) auth_failures: crate::http::AuthFailures,
    /// `<data_dir>/hub.lock`, held exclusively while the hub runs.
    _data_dir_lock: std::fs::File,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("data_dir", &self.config.data_dir).finish_non_exhaustive()
    }
}

impl Hub {
    /// Start: load schemas, open the keyring, the lake and the commit log,
    /// start the writer, replay the WAL, and start the WAL writer.
    ///
    /// # Errors
    /// Any failure to load or open; nothing is served then.
    pub async fn start(config: HubConfig) -> Result<Self> {
        Self::start_with(config, Arc::new(SystemClock)).await
    }

    /// [`Hub::start`] with an injected clock.
    ///
    /// # Errors
    /// As [`Hub::start`].
    pub async fn start_with(config: HubConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let started = Instant::now();
        let registry = Arc::new(load_registry(&config)?);
        let retention_policy = config.retention.policy(&registry)?;
        std::fs::create_dir_all(&config.data_dir).map_err(crate::error::io(&config.data_dir))?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let keyring: Arc<dyn Keyring> = Arc::new(config.keys.open(&config.data_dir.join("keyring"))?);
        let watched = keyring.clone();
        let accounts = crate::accounts::Accounts::open(&config.data_dir)?;
        let concurrency = config.lake.flush_concurrency * 2;
        let mut lake = config.open_lake(concurrency)?;
        lake.check()
            .await
            .map_err(|error| Error::LakeUnreachable { location: config.lake_location(), error })?;
        if config.lake.put_delay_ms > 0 {
            let delay = std::time::Duration::from_millis(config.lake.put_delay_ms);
            let throttled = object_store::throttle::ThrottledStore::new(
                lake.store().clone(),
                object_store::throttle::ThrottleConfig {
                    wait_put_per_call: delay,
                    wait_get_per_call: delay,
                    ..Default::default()
                },
            );
            lake = Lake::new(Arc::new(throttled), concurrency);
        }
        let wal_dir = config.data_dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(crate::error::io(&wal_dir))?;
        let oldest = oldest_wal_record(&wal_dir);
        let source = format!("wal-{}", crate::wal::identity(&wal_dir)?);
        let (log, committed) = CommitLog::open(&wal_dir.join("commits.log"), &lake, &source, oldest).await?;
        let memory = Memory::new(config.memory.budget_bytes);
        let metrics = Arc::new(Metrics::default());
        let dedupe = Arc::new(Dedupe::new(config.wal.dedupe_window));
        let limits = Limits { max_event_bytes: config.limits.max_event_bytes, ..Limits::default() };
        let ingestor = Arc::new(
            Ingestor::new(registry.clone(), keyring, dedupe, limits, metrics.clone())
                .with_dead_letter_raw(config.dead_letters.raw)
                .with_max_future(std::time::Duration::from_secs(config.limits.max_future_secs))
                .with_max_past(
                    (config.limits.max_past_secs > 0)
                        .then(|| std::time::Duration::from_secs(config.limits.max_past_secs)),
                ),
        );
        let pending = Arc::new(Pending::default());
        let writer_stats = Arc::new(WriterStats::default());
        let (writer_tx, writer_rx) = mpsc::channel(64);
        let writer = LakeWriter::new(
            WriterConfig { source: source.clone(), ..config.writer() },
            lake.clone(),
            memory.clone(),
            log,
            Arc::new(Sink(pending.clone())),
            clock.clone(),
            writer_stats.clone(),
        );
        let commit_log = writer.commit_log();
        let writer_task = tokio::spawn(writer.run(writer_rx));

        // Replay on the blocking pool: it validates and protects again.
        let (replay_ingestor, replay_tx, replay_pending, replay_memory) =
            (ingestor.clone(), writer_tx.clone(), pending.clone(), memory.clone());
        let opts = WalOptions {
            segment_bytes: config.wal.segment_bytes,
            retain_events: config.wal.dedupe_window as u64,
            salvage: config.wal.salvage,
            max_raw_bytes: config.wal.max_raw_bytes,
        };
        let shared = pending.clone();
        let (wal, replayed) = tokio::task::spawn_blocking(move || {
            let mut replayed = 0usize;
            let mut records = 0u64;
            let mut reported = Instant::now();
            // New protection keys are made durable by the WAL thread,
            // once per group commit and before the group's write: an
            // acknowledged event's ciphertext never outlives its key.
            let keys = replay_ingestor.clone();
            let remember = replay_ingestor.dedupe.clone();
            let before_write: BeforeWrite = Box::new(move || {
                keys.sync_keys().map_err(|e| format!("cannot store new protection keys: {e}"))
            });
            let wal = Wal::open(
                &wal_dir,
                opts,
                pending.clone(),
                Some(before_write),
                |seq, record| {
                    records += 1;
                    if reported.elapsed() >= REPLAY_REPORT_EVERY {
                        reported = Instant::now();
                        tracing::info!(
                            records,
                            replayed_rows = replayed,
                            elapsed_ms = watershed_event::millis(started.elapsed()),
                            "replaying the write-ahead log"
                        );
                    }
                    let is_committed = |k: &PartitionKey| committed.contains(&k.dir(), seq);
                    let parts = replay_ingestor.replay(&record, &is_committed)?;
                    if parts.is_empty() {
                        return Ok(());
                    }
                    replay_ingestor.sync_keys()?;
                    replayed += parts.iter().map(|(_, b)| b.num_rows()).sum::<usize>();
                    replay_pending
                        .register(seq, u32::try_from(parts.len()).expect("few partitions per record"));
                    let parts = to_parts(parts, seq, &replay_memory);
                    replay_tx.blocking_send(Msg::Parts(parts)).map_err(|_| Error::Stopped("lake writer"))
                },
                |account, r| remember.remember(account, r),
            )?;
            Ok::<_, Error>((wal, replayed))
        })
        .await
        .map_err(|_| Error::Stopped("wal replay"))??;
        let erasure_watch = (config.keys.erasure_check_ms > 0).then(|| {
            let every = std::time::Duration::from_millis(config.keys.erasure_check_ms);
            tokio::spawn(watch_erasures(watched, wal.downgrade(), writer_tx.downgrade(), every))
        });
        // What puts a crash cut short left (compaction passes look again).
        watershed_lake::sweep_abandoned_uploads(&lake).await;
        let compact_stats = Arc::new(CompactStats::default());
        // Compaction and retention passes take turns: a merge never
        // reads a file a retention pass deletes.
        let maintenance = Arc::new(tokio::sync::Mutex::new(()));
        let retention_stats = Arc::new(RetentionStats::default());
        let retention = (!retention_policy.keeps_everything()).then(|| {
            let stop = Arc::new(CompactStop::default());
            let pass = RetentionPass {
                lake: lake.clone(),
                policy: retention_policy,
                log: commit_log.clone(),
                clock: clock.clone(),
                record: config.data_dir.join(RETENTION_RECORD),
                stats: retention_stats.clone(),
            };
            let every = std::time::Duration::from_secs(config.retention.every_secs);
            (tokio::spawn(retention_every(pass, maintenance.clone(), stop.clone(), every)), stop)
        });
        let compaction = (config.lake.compact_every_secs > 0).then(|| {
            let compactor = Compactor::new(
                lake.clone(),
                commit_log,
                clock.clone(),
                CompactConfig { source, ..config.compaction() },
                compact_stats.clone(),
            )
            .with_memory(memory.clone());
            let stop = Arc::new(CompactStop::default());
            let every = std::time::Duration::from_secs(config.lake.compact_every_secs);
            (tokio::spawn(compact_every(compactor, maintenance, stop.clone(), every)), stop)
        });
        tracing::info!(
            replayed_rows = replayed,
            dedupe_window = ingestor.dedupe.len(),
            elapsed_ms = watershed_event::millis(started.elapsed()),
            "hub started"
        );
        let requests =
            RequestMemory::new(config.memory.requests_bytes, config.memory.requests_bytes_per_account);
        let processing = Arc::new(tokio::sync::Semaphore::new(config.processing_concurrency()));
        Ok(Self {
            config,
            ingestor,
            wal,
            writer_tx,
            writer_task,
            erasure_watch,
            memory,
            requests,
            processing,
            pending: shared,
            writer_stats,
            compact_stats,
            compaction,
            retention_stats,
            retention,
            metrics,
            clock,
            lake,
            accounts,
            registry,
            in_flight: tokio_util::task::TaskTracker::new(),
            claims: Arc::default(),
            auth_failures: crate::http::AuthFailures::default(),
            _data_dir_lock: data_dir_lock,
        })
    }

    /// Ingest one request body for an authenticated account. Returns only
    /// after the accepted events are durable in the WAL.
    ///
    /// # Cancel safety
    /// The work runs in a task of its own, which goes on when the
    /// returned future is dropped (an HTTP client that hangs up): once
    /// the request's event ids are claimed against duplicates, its events
    /// reach the WAL and the lake writer. Dropping it half way would leave
    /// ids claimed for events stored nowhere (a retry answered as
    /// duplicates), or a WAL record the writer never gets (its segment
    /// kept until the next start). [`Hub::shutdown`] waits for these
    /// tasks.
    ///
    /// # Errors
    /// [`Refused`] for requests refused as a whole.
    pub async fn ingest(
        &self,
        account: &AccountId,
        collector: Option<&str>,
        encoding: Option<&str>,
        framing: body::Framing,
        body: bytes::Bytes,
        held: Held,
    ) -> Result<IngestResponse, Refused> {
        let started = Instant::now();
        if self.memory.full() {
            return Err(Refused::Busy);
        }
        if self.wal_full() {
            return Err(Refused::WalFull);
        }
        self.metrics.batches.inc();
        self.metrics.bytes.inc_by(body.len() as u64);
        let request = Request {
            account: account.clone(),
            collector: collector.map(str::to_owned),
            encoding: encoding.map(str::to_owned),
            framing,
            body,
            held,
            received_at: self.clock.now_micros(),
            started,
        };
        let stages = Stages {
            ingestor: self.ingestor.clone(),
            limits: self.config.limits.clone(),
            wal: self.wal.clone(),
            writer_tx: self.writer_tx.clone(),
            memory: self.memory.clone(),
            metrics: self.metrics.clone(),
            processing: self.processing.clone(),
        };
        // Taken before any id is claimed (see `claims`).
        let ticket = self.claims.ticket();
        self.in_flight
            .spawn(stages.ingest(request, ticket))
            .await
            .map_err(|e| Refused::Failed(format!("ingest task failed: {e}")))?
    }

    /// Flush every open partition and wait for the commits.
    ///
    /// # Errors
    /// [`Error::Stopped`] if the writer is gone.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.writer_tx.send(Msg::FlushAll(tx)).await.map_err(|_| Error::Stopped("lake writer"))?;
        rx.await.map_err(|_| Error::Stopped("lake writer"))
    }

    /// Prometheus text.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        self.metrics.render(
            self.health().is_ok(),
            crate::metrics::WalStats {
                total: self.wal.size.load(std::sync::atomic::Ordering::Relaxed),
                raw: self.pending.raw_bytes(),
                write_failures: self.wal.write_failures.load(std::sync::atomic::Ordering::Relaxed),
            },
            self.memory.used(),
            self.requests.used(),
            crate::metrics::LakeTotals {
                writer: &self.writer_stats,
                compaction: &self.compact_stats,
                retention: &self.retention_stats,
            },
        )
    }

    /// Whether the hub can go on, or why it needs a restart: the
    /// write-ahead log stopped taking records, or cannot delete committed
    /// ones ([`Wal::failure`]), or the lake writer stopped or could not
    /// encode a file (whose rows the WAL then holds until a restart). A
    /// restart recovers from what is on disk; nothing acknowledged is
    /// lost.
    ///
    /// # Errors
    /// The reason, when the hub needs a restart.
    pub fn health(&self) -> std::result::Result<(), String> {
        if let Some(why) = self.wal.failure() {
            return Err(format!("the write-ahead log needs a restart: {why}"));
        }
        if self.writer_task.is_finished() {
            return Err("the lake writer has stopped; events are in the write-ahead log".into());
        }
        if let Some(why) = self.writer_stats.failure() {
            return Err(format!(
                "the lake writer could not encode a file ({why}); its events are in the write-ahead log"
            ));
        }
        Ok(())
    }

    /// Whether ingest would refuse a request now for want of room (the
    /// writer's memory, request bodies in flight, or the WAL's bound);
    /// Why the write-ahead log takes no records now (its last write
    /// failed: a full disk), after probing it with a write of its own
    /// ([`crate::wal::Wal::probe`]); `None` when it does.
    pub async fn wal_failing(&self) -> Option<String> {
        let why = self.wal.failing()?;
        if self.wal.probe().await {
            None
        } else {
            Some(why)
        }
    }

    /// `/readyz` is ready when the hub is healthy ([`Hub::health`]), its
    /// write-ahead log takes records ([`Hub::wal_failing`]) and it is not
    /// busy.
    #[must_use]
    pub fn busy(&self) -> bool {
        self.memory.full() || self.requests.full() || self.wal_full()
    }

    /// Whether the WAL's segments hold `wal.max_raw_bytes`: the lake is
    /// not committing (a failing store) or the WAL cannot delete what it
    /// committed, and taking more would fill the disk.
    fn wal_full(&self) -> bool {
        self.pending.raw_bytes() >= self.config.wal.max_raw_bytes
    }

    /// Stop: flush and commit everything, stop the writer, then stop the
    /// WAL once it has retired every committed segment (so no raw event
    /// whose rows are committed stays on disk after a clean stop).
    ///
    /// # Errors
    /// [`Error::Stopped`] if the writer failed.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(watch) = &self.erasure_watch {
            watch.abort();
        }
        // A pass in progress finishes the merge it is in (a merge cut
        // short would be finished on the next start anyway).
        // A retention pass in progress finishes the partition it is in.
        for (task, stop) in [self.compaction.take(), self.retention.take()].into_iter().flatten() {
            stop.flag.store(true, std::sync::atomic::Ordering::Relaxed);
            stop.wake.notify_one();
            let _ = task.await;
        }
        // Requests whose callers went away still finish (see `ingest`).
        self.in_flight.close();
        self.in_flight.wait().await;
        self.flush().await?;
        drop(self.writer_tx);
        let written = self.writer_task.await.map_err(|_| Error::Stopped("lake writer"));
        self.wal.close().await;
        written
    }
}

/// A request to stop compacting: the flag ends a pass between merges, the
/// notification ends the wait between passes.
#[derive(Debug, Default)]
struct CompactStop {
    flag: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

/// Run a compaction pass every `every` until asked to stop.
async fn compact_every(
    compactor: Compactor,
    maintenance: Arc<tokio::sync::Mutex<()>>,
    stop: Arc<CompactStop>,
    every: std::time::Duration,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.wake.notified() => return,
        }
        if stop.flag.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let _turn = maintenance.lock().await;
        match compactor.run_once(&stop.flag).await {
            Ok(r) if r.merges > 0 || r.failures > 0 => tracing::info!(
                partitions = r.partitions,
                merged_files = r.merges,
                replaced_files = r.inputs,
                rows = r.rows,
                bytes_in = r.bytes_in,
                bytes_out = r.bytes_out,
                failures = r.failures,
                "compaction pass"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "compaction pass failed; retried on the next"),
        }
    }
}

/// The retention record's file name in the data directory.
pub const RETENTION_RECORD: &str = "retention.log";

/// What a retention pass of the running hub needs.
struct RetentionPass {
    lake: Lake,
    policy: watershed_lake::retention::Retention,
    log: Arc<std::sync::Mutex<CommitLog>>,
    clock: Arc<dyn Clock>,
    record: std::path::PathBuf,
    stats: Arc<RetentionStats>,
}

impl RetentionPass {
    async fn run(&self, stop: &std::sync::atomic::AtomicBool) {
        // Partitions with a merge in progress wait for compaction to
        // settle it.
        let busy = self.log.lock().expect("commit log lock").merging_partitions();
        let mut record = watershed_lake::retention::RetentionRecord::new(&self.record);
        let now = self.clock.now_micros();
        let pass = watershed_lake::retention::Pass {
            lake: &self.lake,
            policy: &self.policy,
            now,
            busy: &busy,
            dry_run: false,
        };
        match watershed_lake::retention::apply(&pass, &mut record, stop, &mut |_, _, _| {}).await {
            Ok(r) => {
                self.stats.add(&r);
                if r.files > 0 || r.failures > 0 || r.skipped > 0 {
                    tracing::info!(
                        partitions = r.partitions,
                        files = r.files,
                        bytes = r.bytes,
                        skipped = r.skipped,
                        failures = r.failures,
                        "retention pass: expired partitions deleted"
                    );
                }
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "retention pass failed; retried on the next");
            }
        }
    }
}

/// Run a retention pass at once, then every `every`, until asked to stop.
async fn retention_every(
    pass: RetentionPass,
    maintenance: Arc<tokio::sync::Mutex<()>>,
    stop: Arc<CompactStop>,
    every: std::time::Duration,
) {
    loop {
        if stop.flag.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        {
            let _turn = maintenance.lock().await;
            pass.run(&stop.flag).await;
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.wake.notified() => return,
        }
    }
}

/// Every `every`, ask the keyring how many keys are erased; when the count
/// grew (a `keys forget`, usually by another process), seal the WAL's open
/// segment and commit every open partition. The sealed segments then hold
/// only committed records and are retired, so the forgotten subject's
/// raw events leave the disk within about `every` instead of the lake's
/// roll ages (up to `late_roll_age_secs` for late partitions). Its rows
/// were encrypted under the erased key on the way in; the flush only
/// commits them sooner. Ends when the WAL or the lake writer is gone.
async fn watch_erasures(
    keyring: Arc<dyn Keyring>,
    wal: crate::wal::WeakWal,
    writer: mpsc::WeakSender<Msg>,
    every: std::time::Duration,
) {
    let erased = || {
        let keyring = keyring.clone();
        async move {
            match tokio::task::spawn_blocking(move || keyring.erased_keys()).await {
                Ok(Ok(n)) => Some(n),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the key log to look for erasures");
                    None
                }
                Err(_) => None,
            }
        }
    };
    let mut seen = erased().await.unwrap_or(0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(now) = erased().await else { continue };
        if now == seen {
            continue;
        }
        // A restored key log may also shrink the count: only growth is
        // an erasure, but either way the new count is the baseline.
        let grew = now > seen;
        seen = now;
        if !grew {
            continue;
        }
        let started = Instant::now();
        if wal.seal().await.is_err() {
            return;
        }
        let Some(tx) = writer.upgrade() else { return };
        let (done, committed) = oneshot::channel();
        if tx.send(Msg::FlushAll(done)).await.is_err() {
            return;
        }
        drop(tx);
        if committed.await.is_err() {
            return;
        }
        tracing::info!(
            elapsed_ms = watershed_event::millis(started.elapsed()),
            "a data subject was forgotten: open partitions committed, so the write-ahead log drops its raw events"
        );
    }
}

/// One request, as [`Hub::ingest`] hands it to its task.
struct Request {
    account: AccountId,
    collector: Option<String>,
    encoding: Option<String>,
    framing: body::Framing,
    body: bytes::Bytes,
    /// `body`'s bytes in [`Hub::requests`], grown by its decompressed
    /// bytes; given back once the events are processed.
    held: Held,
    received_at: watershed_event::TimestampMicros,
    started: Instant,
}

/// What a request's task needs of the hub.
struct Stages {
    ingestor: Arc<Ingestor>,
    limits: crate::config::LimitsConfig,
    wal: Wal,
    writer_tx: mpsc::Sender<Msg>,
    memory: Arc<Memory>,
    metrics: Arc<Metrics>,
    processing: Arc<tokio::sync::Semaphore>,
}

impl Stages {
    /// [`Self::store`], timing every acknowledged request (including one
    /// with nothing new to store: duplicates only, or no events).
    async fn ingest(self, r: Request, ticket: Ticket) -> Result<IngestResponse, Refused> {
        let (metrics, started) = (self.metrics.clone(), r.started);
        let answer = self.store(r, ticket).await;
        if answer.is_ok() {
            metrics.ack_latency.observe(started.elapsed().as_secs_f64());
        }
        answer
    }

    /// Process the request, append its accepted events to the WAL, hand
    /// its rows to the lake writer.
    async fn store(self, r: Request, ticket: Ticket) -> Result<IngestResponse, Refused> {
        let Self { ingestor, limits, wal, writer_tx, memory, processing, .. } = self;
        let process = ingestor.clone();
        // Processing is CPU work: more requests at it than cores only adds
        // their working memory and the switching between them. Those
        // waiting hold their bodies (bounded by `memory.requests_bytes`).
        let permit = processing.acquire_owned().await.expect("the semaphore is never closed");
        let processed = tokio::task::spawn_blocking(move || -> Result<crate::ingest::Processed, Refused> {
            let refuse = |e| match e {
                BodyError::TooLarge(n) => Refused::TooLarge(n),
                BodyError::Bad(m) => Refused::BadRequest(m),
                BodyError::TooManyEvents(n) => Refused::TooManyEvents(n),
                BodyError::NoRoom => Refused::RequestsFull(Full::All),
            };
            let mut held = r.held;
            let received = held.bytes().max(r.body.len());
            let mut full = None;
            let decoded = body::decode(&r.body, r.encoding.as_deref(), limits.max_body_bytes, &mut |n| {
                full = held.grow_to(received + n).err();
                full.is_none()
            })
            .map_err(|e| match (e, full) {
                (BodyError::NoRoom, Some(which)) => Refused::RequestsFull(which),
                (e, _) => refuse(e),
            })?;
            let events = body::split(&decoded, limits.max_batch_events, r.framing).map_err(refuse)?;
            process.process(&r.account, r.collector.as_deref(), r.received_at, &events).map_err(|e| {
                tracing::error!(account = %r.account, error = %e, "cannot protect a dead letter");
                Refused::Unavailable(format!(
                    "a refused event could not be encrypted for the dead-letter table ({e}); nothing was stored"
                ))
            })
        })
        .await
        .map_err(|e| Refused::Failed(format!("ingest task failed: {e}")))?;
        drop(permit);
        let processed = match processed {
            Ok(p) => p,
            Err(refused) => {
                if matches!(
                    refused,
                    Refused::TooLarge(_)
                        | Refused::TooManyEvents(_)
                        | Refused::BadRequest(_)
                        | Refused::RequestsFull(_)
                ) {
                    // Refused before any id was claimed.
                    ticket.durable();
                }
                return Err(refused);
            }
        };
        // Duplicates are answered as stored only once the requests that
        // claimed them are durable.
        let duplicates = processed.response.duplicates > 0;
        let settle = |ticket: Ticket| async move {
            if !duplicates {
                ticket.durable();
                return Ok(());
            }
            ticket.durable_then_wait_for_earlier_claims().await.map_err(|_| {
                Refused::Unavailable(
                    "some of these events were claimed by an earlier request that failed before \
                     they were stored; retry"
                        .into(),
                )
            })
        };
        let Some(payload) = processed.wal else {
            // Nothing new to store (no events, or duplicates only): acked
            // once the requests that stored them are durable.
            settle(ticket).await?;
            return Ok(processed.response);
        };
        let nparts = u32::try_from(processed.parts.len()).expect("few partitions per request");
        let seq = match wal.append(payload.record, payload.events, nparts).await {
            Ok(appended) => {
                ingestor.reuse(appended.buffer);
                appended.seq
            }
            Err(e) => {
                // Nothing of the request is stored: a retry is safe.
                ingestor.dedupe.release(&processed.claimed);
                return Err(Refused::Unavailable(format!(
                    "the write-ahead log did not take the events ({e}); nothing was stored"
                )));
            }
        };
        let settled = settle(ticket).await;
        let parts = to_parts(processed.parts, seq, &memory);
        if writer_tx.send(Msg::Parts(parts)).await.is_err() {
            // The events are durable in the WAL and replay on restart.
            return Err(Refused::Failed("the lake writer has stopped; events are in the WAL".into()));
        }
        settled?;
        Ok(processed.response)
    }
}

fn to_parts(
    parts: Vec<(PartitionKey, arrow::array::RecordBatch)>,
    record: u64,
    memory: &Memory,
) -> Vec<Part> {
    parts
        .into_iter()
        .map(|(key, batch)| {
            memory.add(watershed_lake::batch_bytes(&batch));
            Part { key, batch, record }
        })
        .collect()
}

/// One compaction pass over the lake of a hub that is not running (it
/// takes the data directory's lock, as `serve` does): the commit log is
/// opened as at start (finishing any merge cut short), then every closed
/// partition's small files of this hub are merged. `after` overrides
/// `lake.compact_after_secs`; `progress` is called after each partition
/// (see [`Compactor::run_once_with`]). With `dry_run`, nothing is written
/// or deleted: the report counts the merges the pass would make (see
/// [`Compactor::plan_only`]); a dry run takes no lock, so it also runs
/// beside the hub, reading the commit log as the hub writes it.
///
/// # Errors
/// [`Error::DataDirInUse`] while the hub runs (it compacts by itself),
/// unless `dry_run`; failures to open the lake, the WAL's identity or the
/// commit log.
pub async fn compact_lake(
    config: &HubConfig,
    after: Option<std::time::Duration>,
    dry_run: bool,
    progress: &mut (dyn FnMut(usize, usize, &watershed_lake::CompactReport) + Send),
) -> Result<watershed_lake::CompactReport> {
    let _lock = if dry_run { None } else { Some(lock_data_dir(&config.data_dir)?) };
    let lake = config.open_lake(config.lake.flush_concurrency * 2)?;
    let wal_dir = config.data_dir.join("wal");
    if dry_run && !wal_dir.join("log.id").exists() {
        // No hub has run here: the lake holds no file of this one.
        return Ok(watershed_lake::CompactReport::default());
    }
    std::fs::create_dir_all(&wal_dir).map_err(crate::error::io(&wal_dir))?;
    let source = format!("wal-{}", crate::wal::identity(&wal_dir)?);
    let log_path = wal_dir.join("commits.log");
    let log = if dry_run {
        CommitLog::open_read_only(&log_path, &lake).await?
    } else {
        CommitLog::open(&log_path, &lake, &source, oldest_wal_record(&wal_dir)).await?.0
    };
    let mut settings = CompactConfig { source, ..config.compaction() };
    if let Some(after) = after {
        settings.after = after;
    }
    let mut compactor = Compactor::new(
        lake,
        Arc::new(std::sync::Mutex::new(log)),
        Arc::new(SystemClock),
        settings,
        Arc::default(),
    )
    // The hub's budget, as when it compacts: merges of the same size.
    .with_memory(Memory::new(config.memory.budget_bytes));
    if dry_run {
        compactor = compactor.plan_only();
    }
    Ok(compactor.run_once_with(&std::sync::atomic::AtomicBool::new(false), progress).await?)
}

/// The schemas of `config.schemas`; a directory that cannot be read is
/// [`Error::SchemaDir`], which says how to point the hub at one.
fn load_registry(config: &HubConfig) -> Result<Registry> {
    Registry::load(&config.schemas).map_err(|e| match e {
        watershed_schema::Error::Dir { path, source } => Error::SchemaDir { path, error: source },
        e => Error::Schema(e),
    })
}

/// One retention pass over the lake of a hub that is not running (it
/// takes the data directory's lock, as `serve` does, which runs passes by
/// itself every `retention.every_secs`): every partition past its table's
/// `[retention]` period is deleted and recorded in
/// `<data_dir>/retention.log`. With `dry_run`, nothing is deleted or
/// recorded and the report says what would be; a dry run takes no lock,
/// so it also runs beside the hub. `progress` is called after each
/// expired partition (see [`watershed_lake::retention::apply`]).
///
/// # Errors
/// [`Error::Config`] when `[retention]` names a table the schemas do not
/// have; [`Error::DataDirInUse`] while the hub runs, unless `dry_run`;
/// failures to load the schemas, list the lake, or open the commit log.
pub async fn apply_retention(
    config: &HubConfig,
    dry_run: bool,
    progress: &mut (dyn FnMut(usize, usize, &watershed_lake::retention::RetentionReport) + Send),
) -> Result<(watershed_lake::retention::Retention, watershed_lake::retention::RetentionReport)> {
    let registry = load_registry(config)?;
    let policy = config.retention.policy(&registry)?;
    if policy.keeps_everything() {
        return Ok((policy, watershed_lake::retention::RetentionReport::default()));
    }
    let _lock = if dry_run { None } else { Some(lock_data_dir(&config.data_dir)?) };
    let lake = config.open_lake(config.lake.flush_concurrency * 2)?;
    let wal_dir = config.data_dir.join("wal");
    // Partitions with a merge cut short are left until compaction (the
    // hub's start, or `lake compact`) settles it.
    let busy: std::collections::BTreeSet<String> = if wal_dir.join("commits.log").exists() {
        CommitLog::open_read_only(&wal_dir.join("commits.log"), &lake).await?.merging_partitions()
    } else {
        std::collections::BTreeSet::new()
    };
    let mut record = watershed_lake::retention::RetentionRecord::new(&config.data_dir.join(RETENTION_RECORD));
    let now = SystemClock.now_micros();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let pass = watershed_lake::retention::Pass { lake: &lake, policy: &policy, now, busy: &busy, dry_run };
    let report = watershed_lake::retention::apply(&pass, &mut record, &stop, progress).await?;
    Ok((policy, report))
}

/// Take `<data_dir>/hub.lock` exclusively (released when the hub is
/// dropped or its process ends, even by `kill -9`), and write this
/// process's id into it: a second hub on the same data directory would
/// append to the same WAL and replay the same records.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join("hub.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(crate::error::io(&path))?;
    match f.try_lock() {
        Ok(()) => {
            f.set_len(0).map_err(crate::error::io(&path))?;
            f.rewind().map_err(crate::error::io(&path))?;
            writeln!(f, "{}", std::process::id()).map_err(crate::error::io(&path))?;
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = match pid.trim() {
                "" => "unknown".to_owned(),
                p => p.to_owned(),
            };
            Err(Error::DataDirInUse { dir: dir.to_owned(), pid })
        }
        Err(std::fs::TryLockError::Error(e)) => Err(crate::error::io(&path)(e)),
    }
}

/// The first record seq still in the WAL directory (segment names are
/// their first seq), or `u64::MAX` for an empty WAL.
fn oldest_wal_record(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| crate::wal::file_number(e.ok()?.file_name().to_str()?, ".wal"))
        .min()
        .unwrap_or(u64::MAX)
}
