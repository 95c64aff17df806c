//! Memory of requests in flight: the bytes of request bodies the hub
//! holds at once, as received and decompressed, bounded by
//! `memory.requests_bytes`.
//!
//! The lake writer's buffers have their own budget
//! (`memory.budget_bytes`); without this bound, every open connection
//! could have a body of `limits.max_body_bytes` being read or processed
//! at once (1,024 connections of 10 MiB by default). A request holds its
//! declared length before a byte of its body is read, grows its hold as
//! chunks arrive beyond it, and again by its decompressed size; a hold
//! that does not fit is refused (503 `busy`) and the request stores
//! nothing. The hold is given back when the request's events are
//! processed (its rows then count against the writer's budget).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The bytes held by requests in flight, and their bound.
#[derive(Debug)]
pub struct RequestMemory {
    used: AtomicUsize,
    limit: usize,
}

impl RequestMemory {
    /// At most `limit` bytes held at once.
    #[must_use]
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit })
    }

    /// The bound.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    #[must_use]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether nothing more could be held now (a request would be refused
    /// before its body is read).
    #[must_use]
    pub fn full(&self) -> bool {
        self.used() >= self.limit
    }

    /// Hold `bytes`, or `None` when they do not fit beside what is held.
    #[must_use]
    pub fn hold(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        let mut held = Held { memory: self.clone(), bytes: 0 };
        held.grow(bytes).then_some(held)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }
}

/// Bytes held by one request; given back when dropped.
#[derive(Debug)]
pub struct Held {
    memory: Arc<RequestMemory>,
    bytes: usize,
}

impl Held {
    /// Hold `more` bytes besides; false (and nothing more held) when they
    /// do not fit.
    #[must_use]
    pub fn grow(&mut self, more: usize) -> bool {
        if more == 0 {
            return true;
        }
        if !self.memory.take(more) {
            return false;
        }
        self.bytes += more;
        true
    }

    /// Hold at least `total` bytes in all; false when they do not fit.
    #[must_use]
    pub fn grow_to(&mut self, total: usize) -> bool {
        self.grow(total.saturating_sub(self.bytes))
    }

    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.memory.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_bounded_and_given_back_on_drop() {
        let m = RequestMemory::new(100);
        let mut a = m.hold(60).expect("fits");
        assert!(m.hold(41).is_none(), "past the bound");
        let b = m.hold(40).expect("fits exactly");
        assert!(m.full());
        assert!(!a.grow(1), "a refused growth holds nothing more");
        assert_eq!((a.bytes(), m.used()), (60, 100));
        drop(b);
        assert!(a.grow_to(90) && a.grow_to(50), "grow_to never shrinks");
        assert_eq!((a.bytes(), m.used()), (90, 90));
        drop(a);
        assert_eq!(m.used(), 0);
        assert!(m.hold(0).is_some() && m.hold(101).is_none());
    }

    #[test]
    fn concurrent_holds_never_pass_the_bound() {
        let m = RequestMemory::new(1000);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..10_000 {
                        if let Some(mut h) = m.hold(1 + i % 300) {
                            let _ = h.grow(i % 7);
                            peak.fetch_max(m.used(), Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 1000);
        assert_eq!(m.used(), 0);
    }
}
