//! The dedupe window: the (account, event id) pairs of the most recent
//! accepted events, bounded to `window` entries (oldest evicted first).
//! It is rebuilt on start from the write-ahead log, which keeps at least
//! `window` events, so a client retry after a restart is still caught.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

/// Keys are already keyed hashes: the set uses them as they are.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Keys = HashSet<u64, BuildHasherDefault<Identity>>;

/// A bounded set of recent event keys.
#[derive(Debug)]
pub struct Dedupe {
    window: usize,
    /// Keyed with a random seed per process, so ids cannot be chosen to
    /// collide.
    hasher: ahash::RandomState,
    inner: Mutex<(Keys, VecDeque<u64>)>,
}

impl Dedupe {
    /// A window of `window` events.
    #[must_use]
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            hasher: ahash::RandomState::new(),
            inner: Mutex::new((Keys::default(), VecDeque::new())),
        }
    }

    /// The key of an event.
    #[must_use]
    pub fn key(&self, account: &str, id: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        account.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    }

    /// The key of a rejected event: its own key space, so a corrected
    /// resend with the same id is still accepted.
    #[must_use]
    pub fn dead_key(&self, account: &str, id: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        account.hash(&mut h);
        id.hash(&mut h);
        0xdead_u16.hash(&mut h);
        h.finish()
    }

    /// Claim `key`; false if it is already in the window.
    pub fn claim(&self, key: u64) -> bool {
        let mut g = self.inner.lock().expect("dedupe lock");
        if !g.0.insert(key) {
            return false;
        }
        g.1.push_back(key);
        while g.1.len() > self.window {
            if let Some(old) = g.1.pop_front() {
                g.0.remove(&old);
            }
        }
        true
    }

    /// Give back keys claimed for events that were not stored after all.
    pub fn release(&self, keys: &[u64]) {
        let mut g = self.inner.lock().expect("dedupe lock");
        for k in keys {
            g.0.remove(k);
        }
        let (set, order) = &mut *g;
        order.retain(|k| set.contains(k));
    }

    /// Entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.lock().expect("dedupe lock").0.len()
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
        let d = Dedupe::new(2);
        let (a, b, c) = (d.key("1", "x"), d.key("2", "x"), d.key("1", "y"));
        assert!(d.claim(a) && d.claim(b) && !d.claim(a));
        assert!(d.claim(c), "third key evicts the oldest");
        assert!(d.claim(a), "evicted key is claimable again");
        d.release(&[a]);
        assert!(d.claim(a));
    }
}
