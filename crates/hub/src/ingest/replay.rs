//! Replaying a WAL record at start: its events judged again, its rows
//! rebuilt for the partitions not yet in the lake.

use arrow::array::RecordBatch;
use watershed_event::Reason;
use watershed_lake::PartitionKey;
use watershed_protect::BatchProtector;
use watershed_schema::{Tape, Violation};

use super::{count_of, finish, partition_counts, Batch, Builders, Ingestor, Valid};
use crate::envelope;
use crate::wal::WalRecord;

impl Ingestor {
    /// Rebuild the rows of a WAL record, skipping the partitions that
    /// `committed` says are in the lake already.
    ///
    /// # Errors
    /// When a dead letter's raw event cannot be encrypted; the record then
    /// stays in the WAL for the next start.
    pub fn replay(
        &self,
        record: &WalRecord,
        committed: &dyn Fn(&PartitionKey) -> bool,
    ) -> Result<Vec<(PartitionKey, RecordBatch)>, watershed_protect::Error> {
        // Keys as of the receive time: a subject forgotten since stays
        // unreadable (see `Keyring::data_ciphers_received`).
        let mut batch = Batch {
            tape: Tape::new(),
            protector: BatchProtector::replaying(&*self.keyring, record.received_at),
            builders: Builders::default(),
        };
        let (account, collector, at) = (&record.account, record.collector.as_deref(), record.received_at);
        let mut valid = Vec::new();
        for e in &record.events {
            if let Some((reason, path, detail)) = &e.rejected {
                self.dedupe.claim(self.dedupe.dead_key(account.as_str(), Some(&e.id), &e.raw));
                let v = Violation {
                    reason: Reason::ALL
                        .into_iter()
                        .find(|r| r.as_str() == reason)
                        .unwrap_or(Reason::BadEnvelope),
                    path: path.clone(),
                    detail: detail.clone(),
                };
                let p = envelope::partial(&e.raw);
                self.dead_letter(account, collector, at, &e.raw, &v, &p, &mut batch, Some(committed))?;
                continue;
            }
            self.dedupe.claim(self.dedupe.key(account.as_str(), &e.id));
            // Accepted before the crash; if the registry changed since and
            // now refuses it, it becomes a dead letter, never lost.
            match self.validate((account, collector, at), &e.raw, &mut batch, Some(committed)) {
                Ok(Some(v)) => valid.push(v),
                Ok(None) => {}
                Err((v, p)) => {
                    self.dead_letter(account, collector, at, &e.raw, &v, &p, &mut batch, Some(committed))?;
                }
            }
        }
        if let Err(e) = batch.protector.fetch(account) {
            tracing::error!(account = %account, error = %e, "cannot fetch data subject keys");
        }
        let counts = partition_counts(valid.iter().map(Valid::partition));
        let expect = |key| count_of(&counts, key);
        for v in valid {
            match self.protect(account, &v, &mut batch) {
                Ok(()) => {
                    self.store((account, collector, at), v, &mut batch, None, &expect);
                }
                Err((violation, p)) => {
                    self.dead_letter(
                        account,
                        collector,
                        at,
                        v.raw,
                        &violation,
                        &p,
                        &mut batch,
                        Some(committed),
                    )?;
                }
            }
        }
        Ok(finish(batch.builders))
    }
}
