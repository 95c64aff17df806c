//! The per-event lookup of a subject's current cipher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use watershed_event::prehashed::BuildPrehashed;
use watershed_event::AccountId;

use super::{lock, CACHED_KEYS, REFRESH_EVERY};
use crate::cipher::DataCipher;

/// One shard of [`Hot`].
pub(super) type HotShard = Mutex<HashMap<u128, Arc<DataCipher>, BuildPrehashed>>;

/// The current cipher per (account, subject): the per-event lookup,
/// outside the state lock, sharded so concurrent requests do not contend,
/// with no MAC on a hit. Entries are keyed by a 128-bit keyed hash of the
/// pair (seeded per process), so a lookup compares two words instead of
/// chasing a string. Cleared whenever the state is reloaded, erased or
/// rotated; a shard starts over at `per_shard` entries (the cached keys
/// spread over the shards: its entries keep their ciphers alive, so it is
/// bounded like the cache).
/// It answers only while the log was checked for changes within
/// [`REFRESH_EVERY`]; otherwise the caller takes the locked path, which
/// checks.
pub(super) struct Hot {
    pub(super) shards: Vec<HotShard>,
    pub(super) seeds: (ahash::RandomState, ahash::RandomState),
    pub(super) base: Instant,
    /// Milliseconds after `base` of the last check of the log.
    pub(super) checked_ms: AtomicU64,
    pub(super) per_shard: usize,
}

pub(super) const HOT_SHARDS: usize = 16;

impl Hot {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..HOT_SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            seeds: (ahash::RandomState::new(), ahash::RandomState::new()),
            base: Instant::now(),
            checked_ms: AtomicU64::new(0),
            per_shard: (CACHED_KEYS / HOT_SHARDS).max(1),
        }
    }

    pub(super) fn now_ms(&self) -> u64 {
        watershed_event::millis(self.base.elapsed())
    }

    pub(super) fn checked_now(&self) {
        self.checked_ms.store(self.now_ms(), Ordering::Release);
    }

    pub(super) fn fresh(&self) -> bool {
        let every = watershed_event::millis(REFRESH_EVERY);
        self.now_ms().saturating_sub(self.checked_ms.load(Ordering::Acquire)) < every
    }

    pub(super) fn key(&self, account: &AccountId, subject: &str) -> u128 {
        let pair = (account.as_str(), subject);
        u128::from(self.seeds.0.hash_one(pair)) << 64 | u128::from(self.seeds.1.hash_one(pair))
    }

    pub(super) fn shard_of(key: u128) -> usize {
        // The table uses the low word; the shard comes from the high one.
        usize::try_from(key >> 124).unwrap_or(0) % HOT_SHARDS
    }

    pub(super) fn shard(&self, key: u128) -> &HotShard {
        &self.shards[Self::shard_of(key)]
    }

    pub(super) fn get(&self, k: u128) -> Option<Arc<DataCipher>> {
        lock(self.shard(k)).get(&k).cloned()
    }

    /// Fill the empty entries of `out` with the ciphers of `keys` found in
    /// the index: one lock per shard, and the entries of a shard read
    /// before any is cloned, so the memory they live in is fetched in
    /// parallel rather than one cache miss after another.
    pub(super) fn get_many(&self, keys: &[u128], out: &mut [Option<Arc<DataCipher>>]) {
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); HOT_SHARDS];
        for (i, &k) in keys.iter().enumerate() {
            if out[i].is_none() {
                by_shard[Self::shard_of(k)].push(i);
            }
        }
        for (shard, idx) in self.shards.iter().zip(&by_shard) {
            if idx.is_empty() {
                continue;
            }
            let m = lock(shard);
            let found: Vec<Option<&Arc<DataCipher>>> = idx.iter().map(|&i| m.get(&keys[i])).collect();
            // Plain loads of each entry's reference count: independent,
            // so they overlap; the clones below then find it cached.
            let touched: usize = found.iter().flatten().map(|c| Arc::strong_count(c)).sum();
            std::hint::black_box(touched);
            for (&i, c) in idx.iter().zip(&found) {
                out[i] = c.cloned();
            }
        }
    }

    pub(super) fn insert(&self, k: u128, c: Arc<DataCipher>) {
        let mut m = lock(self.shard(k));
        if m.len() >= self.per_shard {
            m.clear();
        }
        m.insert(k, c);
    }

    pub(super) fn clear(&self) {
        for s in &self.shards {
            lock(s).clear();
        }
    }
}
