//! Finishing a partition's file and committing it: the footer, the commit
//! log's intent, the create-only put, the commit, and retries until it
//! lands.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Buffer, CommitSink, WriterStats};
use crate::commit::CommitLog;
use crate::encode::{EncodeOptions, FileEncoder};
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::partition::{LakePath, PartitionKey};
use crate::store::{Lake, Put};

pub(super) struct FlushCtx {
    pub(super) lake: Lake,
    pub(super) log: Arc<Mutex<CommitLog>>,
    pub(super) sink: Arc<dyn CommitSink>,
    pub(super) memory: Arc<Memory>,
    pub(super) stats: Arc<WriterStats>,
    pub(super) encode: EncodeOptions,
    pub(super) source: String,
}

impl FlushCtx {
    /// Finish one buffer's file and commit it, retrying the store with
    /// backoff until it is committed: acknowledged rows are never dropped.
    /// `path` is the buffer's file, already reserved in the commit log.
    pub(super) async fn flush(&self, key: PartitionKey, mut buf: Buffer, path: LakePath) {
        let started = std::time::Instant::now();
        let bytes = match self.finish_file(&key, &path, &mut buf).await {
            Ok(b) => bytes::Bytes::from(b),
            Err(e) => {
                self.log.lock().expect("commit log lock").release(&path);
                // Only a bug gets here (one schema per buffer, in-memory
                // output). The rows are not reported committed, so their
                // WAL records stay and replay on the next start.
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(partition = %key, error = %e, "cannot encode the partition's file; its rows stay in the WAL until the next start");
                let mut first =
                    self.stats.unencodable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                first.get_or_insert_with(|| format!("partition {key}: {e}"));
                return;
            }
        };
        let (records, rows) = (std::mem::take(&mut buf.records), buf.rows);
        drop(buf);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.commit(&key, &path, &records, rows, bytes.clone()).await {
                Ok(()) => {
                    let secs = started.elapsed().as_secs_f64();
                    self.stats.files.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
                    if let Ok(mut r) = self.stats.recent.lock() {
                        r.push((bytes.len() as u64, secs));
                    }
                    self.memory.release(bytes.len());
                    return;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(partition = %key, error = %e, retry_in_ms = watershed_event::millis(backoff), "lake flush failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Encode the remaining rows and the footer. The buffer's memory charge
    /// becomes the file's size (released when it is committed), or is
    /// released on failure.
    async fn finish_file(
        &self,
        key: &PartitionKey,
        path: &LakePath,
        buf: &mut Buffer,
    ) -> std::result::Result<Vec<u8>, String> {
        let settled = buf.settle(key, &self.memory).await;
        let loose = std::mem::take(&mut buf.loose);
        let loose_bytes = std::mem::take(&mut buf.loose_bytes);
        let file = match settled {
            Ok(f) => f,
            Err(e) => {
                self.memory.release(loose_bytes);
                return Err(e);
            }
        };
        let meta = vec![
            ("watershed.source".to_owned(), self.source.clone()),
            (
                "watershed.records".to_owned(),
                buf.records.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            ),
        ];
        let (schema, memory, name, opts, rows) =
            (buf.schema.clone(), self.memory.clone(), path.0.clone(), self.encode, buf.rows);
        tokio::task::spawn_blocking(move || {
            let charged = loose_bytes + file.as_ref().map_or(0, |f| f.charged);
            let out = (|| {
                let mut file = match file {
                    Some(f) => f,
                    // Every row of the file is here: a small one is
                    // written uncompressed.
                    None => Box::new(FileEncoder::for_rows(&name, &schema, opts, rows)?),
                };
                file.write_joined(&loose)?;
                file.finish(meta)
            })();
            if let Ok(out) = &out {
                memory.add(out.len());
            }
            memory.release(charged);
            out.map_err(|e| e.to_string())
        })
        .await
        // Cancelled when the runtime shuts down (a missed shutdown
        // deadline); the rows stay in the WAL.
        .unwrap_or_else(|e| Err(format!("encoding did not finish: {e}")))
    }

    async fn commit(
        &self,
        key: &PartitionKey,
        path: &LakePath,
        records: &[u64],
        rows: usize,
        bytes: bytes::Bytes,
    ) -> Result<()> {
        let size = bytes.len();
        let partition = key.dir();
        let intent = self.log.lock().expect("commit log lock").intent(path, &partition, records)?;
        // The fsync runs off the runtime's threads and without the log's
        // lock: the intents of concurrent flushes share it.
        tokio::task::spawn_blocking(move || intent.wait()).await.map_err(|e| Error::Io {
            path: self.log.lock().expect("commit log lock").path().to_owned(),
            source: std::io::Error::other(format!("syncing the intent did not finish: {e}")),
        })??;
        let put = self.lake.put_create(path, bytes.clone()).await?;
        if put == Put::AlreadyExists {
            // The name carries this hub's WAL identity and records: a put
            // that reported a failure but landed (and is now retried)
            // left these very bytes. Anything else is another writer's.
            if self.lake.get(&path.0).await? != bytes {
                self.log.lock().expect("commit log lock").abandon(path)?;
                return Err(Error::NameTaken { path: path.0.clone() });
            }
            tracing::info!(path = %path, "file already in the lake from an earlier attempt; keeping it");
        }
        let compact = {
            let mut log = self.log.lock().expect("commit log lock");
            log.commit(path)?;
            log.wants_compaction()
        };
        self.sink.committed(key, records);
        if compact {
            let (log, oldest) = (self.log.clone(), self.sink.oldest_needed());
            // Reading and rewriting the log is blocking work; a failure
            // leaves it whole, to be tried again after a later commit.
            let _ = tokio::task::spawn_blocking(move || {
                let mut log = log.lock().expect("commit log lock");
                if log.wants_compaction() {
                    if let Err(e) = log.compact(oldest) {
                        tracing::warn!(error = %e, "cannot compact the commit log");
                    }
                }
            })
            .await;
        }
        tracing::info!(path = %path, rows, bytes = size, "committed parquet file");
        Ok(())
    }
}
