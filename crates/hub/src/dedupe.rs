//! The dedupe window: the (account, event id) pairs of the most recent
//! accepted events, bounded to `window` entries. Keys are spread over
//! [`SHARDS`] independently locked shards of `window / SHARDS` entries
//! each (oldest evicted first within a shard), so concurrent requests do
//! not contend; the window therefore holds about the last `window` events.
//! It is rebuilt on start from the write-ahead log's segments and id
//! files, which keep the identities of at least `window` events, so a
//! client retry after a restart is still caught.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use watershed_event::prehashed::BuildPrehashed;

/// A key: a keyed 128-bit hash of what identifies an event. At 64 bits a
/// new event would, by chance, match one of a million-event window's
/// keys once in some 18 trillion events, and be answered as a duplicate
/// of an event it is not; at 128 bits that never happens.
pub type Key = u128;

/// Keys are already keyed hashes: the set uses them as they are.
type Keys = HashSet<Key, BuildPrehashed>;

/// A bounded set of recent event keys.
#[derive(Debug)]
pub struct Dedupe {
    /// Keys each shard holds.
    per_shard: usize,
    /// Two independently seeded hashers (a key's low and high words),
    /// random per process, so ids cannot be chosen to collide.
    hashers: [ahash::RandomState; 2],
    shards: Vec<Mutex<(Keys, VecDeque<Key>)>>,
}

/// What an event without an id is deduplicated by: the SHA-256 of its
/// bytes.
#[must_use]
pub fn raw_digest(raw: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(raw).into()
}

/// Independently locked parts of the window.
pub const SHARDS: usize = 16;

/// The shard of `key`. The set uses the low word's low bits (bucket) and
/// top seven (tag): the shard comes from bits in between.
fn shard_of(key: Key) -> usize {
    ((key >> 32) & (SHARDS as Key - 1)) as usize
}

impl Dedupe {
    /// A window of `window` events.
    #[must_use]
    pub fn new(window: usize) -> Self {
        Self {
            per_shard: window.div_ceil(SHARDS).max(1),
            hashers: [ahash::RandomState::new(), ahash::RandomState::new()],
            shards: (0..SHARDS).map(|_| Mutex::new((Keys::default(), VecDeque::new()))).collect(),
        }
    }

    /// The key of an event.
    #[must_use]
    pub fn key(&self, account: &str, id: &str) -> Key {
        self.hash(&(account, id))
    }

    /// The two hashers' words of `v`.
    fn hash(&self, v: &impl Hash) -> Key {
        let [lo, hi] = &self.hashers;
        (Key::from(hi.hash_one(v)) << 64) | Key::from(lo.hash_one(v))
    }

    /// The key of a rejected event: its own key space, so a corrected
    /// resend with the same id is still accepted. An event without an id
    /// (or with an empty one) is known by its exact bytes (their SHA-256,
    /// which the WAL keeps after the event itself is gone), so a retried
    /// request does not store its id-less rejects twice either.
    #[must_use]
    pub fn dead_key(&self, account: &str, id: Option<&str>, raw: &[u8]) -> Key {
        match id.filter(|id| !id.is_empty()) {
            Some(id) => self.dead_id_key(account, id),
            None => self.dead_bytes_key(account, &raw_digest(raw)),
        }
    }

    /// [`Dedupe::dead_key`] of a rejected event with an id.
    #[must_use]
    pub fn dead_id_key(&self, account: &str, id: &str) -> Key {
        self.hash(&(account, id, 0xdead_u16))
    }

    /// [`Dedupe::dead_key`] of a rejected event without an id, by the
    /// [`raw_digest`] of its bytes.
    #[must_use]
    pub fn dead_bytes_key(&self, account: &str, digest: &[u8; 32]) -> Key {
        self.hash(&(account, digest, 0xdeaf_u16))
    }

    /// Claim the key of an event the WAL retired (on start).
    pub fn remember(&self, account: &str, r: crate::wal::Retired<'_>) {
        use crate::wal::Retired;
        self.claim(match r {
            Retired::Accepted(id) => self.key(account, id),
            Retired::Rejected(id) => self.dead_id_key(account, id),
            Retired::RejectedBytes(d) => self.dead_bytes_key(account, d),
        });
    }

    /// Claim `key`; false if it is already in the window.
    pub fn claim(&self, key: Key) -> bool {
        let mut g = self.shards[shard_of(key)].lock().expect("dedupe lock");
        self.insert(&mut g, key)
    }

    /// Claim each of `keys`, in order, as [`Dedupe::claim`] would one by
    /// one: `fresh[i]` is whether `keys[i]` was not in the window (a key
    /// repeated in `keys` is fresh the first time only). Each shard is
    /// locked once per call rather than once per key: unlocking is a full
    /// memory barrier, which waits for the set's cache-missing writes.
    pub fn claim_all(&self, keys: &[Key], fresh: &mut Vec<bool>) {
        fresh.clear();
        fresh.resize(keys.len(), false);
        let mut present = 0u32;
        for &k in keys {
            present |= 1 << shard_of(k);
        }
        while present != 0 {
            let shard = present.trailing_zeros() as usize;
            present &= present - 1;
            let mut g = self.shards[shard].lock().expect("dedupe lock");
            for (&k, f) in keys.iter().zip(fresh.iter_mut()) {
                if shard_of(k) == shard {
                    *f = self.insert(&mut g, k);
                }
            }
        }
    }

    fn insert(&self, (set, order): &mut (Keys, VecDeque<Key>), key: Key) -> bool {
        if !set.insert(key) {
            return false;
        }
        order.push_back(key);
        while order.len() > self.per_shard {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
        true
    }

    /// Give back keys claimed for events that were not stored after all.
    pub fn release(&self, keys: &[Key]) {
        for shard in &self.shards {
            let mut g = shard.lock().expect("dedupe lock");
            let (set, order) = &mut *g;
            let before = set.len();
            for k in keys {
                set.remove(k);
            }
            if set.len() != before {
                order.retain(|k| set.contains(k));
            }
        }
    }

    /// Entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().expect("dedupe lock").0.len()).sum()
    }

    /// Whether the window is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_per_account() {
        let d = Dedupe::new(2 * SHARDS);
        assert_ne!(d.key("1", "x"), d.key("2", "x"), "keys are per account");
        // Three keys of one shard: the third evicts the oldest.
        let same: Vec<Key> =
            (0..).map(|i| d.key("1", &i.to_string())).filter(|k| (k >> 32) & 15 == 3).take(3).collect();
        let (a, b, c) = (same[0], same[1], same[2]);
        assert!(d.claim(a) && d.claim(b) && !d.claim(a));
        assert!(d.claim(c), "third key evicts the oldest");
        assert!(d.claim(a), "evicted key is claimable again");
        d.release(&[a]);
        assert!(d.claim(a));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn keys_differing_in_one_word_are_different_events() {
        let d = Dedupe::new(100);
        let k = d.key("1", "x");
        let (lo, hi) = (k as u64, (k >> 64) as u64);
        assert_ne!(lo, hi, "two independently seeded words");
        assert_eq!(k, d.key("1", "x"));
        // Two events whose keys share the low word (the set's bucket and
        // the shard) are still two events.
        assert!(d.claim(k) && d.claim(k ^ (1 << 64)) && d.claim(k ^ (1 << 127)));
        assert!(!d.claim(k));
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn claiming_together_is_claiming_one_by_one() {
        // Keys spread over every shard, repeats within a call and across
        // calls, and a window small enough to evict.
        let (together, alone) = (Dedupe::new(8 * SHARDS), Dedupe::new(8 * SHARDS));
        let mut fresh = Vec::new();
        for round in 0..50u64 {
            let keys: Vec<Key> = (0..40u64)
                .map(|i| together.key("1", &((round * 13 + i * 7) % 300).to_string()))
                .chain([together.key("1", "again")])
                .collect();
            together.claim_all(&keys, &mut fresh);
            let one_by_one: Vec<bool> = keys.iter().map(|&k| alone.claim(k)).collect();
            assert_eq!(fresh, one_by_one, "round {round}");
        }
        assert_eq!(together.len(), alone.len());
    }

    #[test]
    fn rejects_are_known_by_id_else_by_bytes() {
        let d = Dedupe::new(100);
        let k = |account, id, raw: &[u8]| d.dead_key(account, id, raw);
        assert_eq!(k("1", Some("x"), b"a"), k("1", Some("x"), b"b"), "an id names the event");
        assert_ne!(k("1", Some("x"), b"a"), d.key("1", "x"), "rejects have their own key space");
        assert_eq!(k("1", None, b"a"), k("1", Some(""), b"a"), "an empty id is no id");
        assert_ne!(k("1", None, b"a"), k("1", None, b"b"));
        assert_ne!(k("1", None, b"a"), k("2", None, b"a"), "keys are per account");
    }
}
