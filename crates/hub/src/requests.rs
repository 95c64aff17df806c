//! Memory of requests in flight: the bytes of request bodies the hub
//! holds at once, as received and decompressed, bounded by
//! `memory.requests_bytes` in all and by
//! `memory.requests_bytes_per_account` for each account.
//!
//! The lake writer's buffers have their own budget
//! (`memory.budget_bytes`); without this bound, every open connection
//! could have a body of `limits.max_body_bytes` being read or processed
//! at once (1,024 connections of 10 MiB by default). A request holds its
//! declared length before a byte of its body is read, grows its hold as
//! chunks arrive beyond it, and again by its decompressed size; a hold
//! that does not fit is refused (503 `busy`) and the request stores
//! nothing. The hold is given back when the request's events are
//! processed (its rows then count against the writer's budget). The
//! per-account bound keeps one account's collectors (a backlog sent all
//! at once, a retry storm) from taking the whole bound from the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use watershed_event::AccountId;

/// The bytes held by requests in flight, and their bounds.
#[derive(Debug)]
pub struct RequestMemory {
    /// Bytes held in all (also counted in `held`, under its lock; read
    /// without it for metrics and readiness).
    used: AtomicUsize,
    limit: usize,
    per_account: usize,
    /// Bytes held by each account with a request in flight.
    held: Mutex<HashMap<AccountId, usize>>,
}

/// Which bound a hold did not fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `memory.requests_bytes`: requests of all accounts.
    All,
    /// `memory.requests_bytes_per_account`: this account's requests.
    Account,
}

impl RequestMemory {
    /// At most `limit` bytes held at once, `per_account` of them by one
    /// account.
    #[must_use]
    pub fn new(limit: usize, per_account: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit, per_account, held: Mutex::default() })
    }

    /// The bound of all requests.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bound of one account's requests.
    #[must_use]
    pub fn per_account(&self) -> usize {
        self.per_account
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

    /// Hold `bytes` for a request of `account`.
    ///
    /// # Errors
    /// The bound they do not fit in; nothing is held then.
    pub fn hold(self: &Arc<Self>, account: &AccountId, bytes: usize) -> Result<Held, Full> {
        let mut held = Held { memory: self.clone(), account: account.clone(), bytes: 0 };
        held.grow(bytes)?;
        Ok(held)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, usize>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, account: &AccountId, bytes: usize) -> Result<(), Full> {
        let mut held = self.lock();
        let used = self.used.load(Ordering::Relaxed);
        if used.checked_add(bytes).is_none_or(|total| total > self.limit) {
            return Err(Full::All);
        }
        let mine = held.get(account).copied().unwrap_or(0);
        if mine.checked_add(bytes).is_none_or(|total| total > self.per_account) {
            return Err(Full::Account);
        }
        *held.entry(account.clone()).or_insert(0) += bytes;
        self.used.store(used + bytes, Ordering::Relaxed);
        Ok(())
    }

    fn give(&self, account: &AccountId, bytes: usize) {
        let mut held = self.lock();
        if let Some(mine) = held.get_mut(account) {
            *mine -= bytes;
            if *mine == 0 {
                held.remove(account);
            }
        }
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Bytes held by one request; given back when dropped.
#[derive(Debug)]
pub struct Held {
    memory: Arc<RequestMemory>,
    account: AccountId,
    bytes: usize,
}

impl Held {
    /// Hold `more` bytes besides.
    ///
    /// # Errors
    /// The bound they do not fit in; nothing more is held then.
    pub fn grow(&mut self, more: usize) -> Result<(), Full> {
        if more == 0 {
            return Ok(());
        }
        self.memory.take(&self.account, more)?;
        self.bytes += more;
        Ok(())
    }

    /// Hold at least `total` bytes in all.
    ///
    /// # Errors
    /// As [`Held::grow`].
    pub fn grow_to(&mut self, total: usize) -> Result<(), Full> {
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
        if self.bytes > 0 {
            self.memory.give(&self.account, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(n: u8) -> AccountId {
        AccountId::new(format!("{n:012}")).unwrap()
    }

    #[test]
    fn holds_are_bounded_and_given_back_on_drop() {
        let m = RequestMemory::new(100, 100);
        let a = account(1);
        let mut x = m.hold(&a, 60).expect("fits");
        assert_eq!(m.hold(&a, 41).unwrap_err(), Full::All, "past the bound");
        let y = m.hold(&a, 40).expect("fits exactly");
        assert!(m.full());
        assert_eq!(x.grow(1), Err(Full::All), "a refused growth holds nothing more");
        assert_eq!((x.bytes(), m.used()), (60, 100));
        drop(y);
        assert!(x.grow_to(90).is_ok() && x.grow_to(50).is_ok(), "grow_to never shrinks");
        assert_eq!((x.bytes(), m.used()), (90, 90));
        drop(x);
        assert_eq!(m.used(), 0);
        assert!(m.hold(&a, 0).is_ok() && m.hold(&a, 101).is_err());
        assert!(m.lock().is_empty(), "an account holding nothing is forgotten");
    }

    #[test]
    fn one_account_cannot_take_the_whole_bound() {
        let m = RequestMemory::new(100, 60);
        let (a, b) = (account(1), account(2));
        let _x = m.hold(&a, 50).unwrap();
        assert_eq!(m.hold(&a, 20).unwrap_err(), Full::Account, "a's share is spent");
        let y = m.hold(&b, 50).expect("b has its share");
        assert_eq!(m.hold(&b, 10).unwrap_err(), Full::All, "the whole bound is spent first");
        drop(y);
        assert!(m.hold(&b, 10).is_ok());
    }

    #[test]
    fn concurrent_holds_never_pass_the_bounds() {
        let m = RequestMemory::new(1000, 600);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let (m, peak) = (&m, &peak);
                s.spawn(move || {
                    let a = account(t % 2);
                    for i in 0..10_000 {
                        if let Ok(mut h) = m.hold(&a, 1 + i % 300) {
                            let _ = h.grow(i % 7);
                            peak.fetch_max(m.used(), Ordering::Relaxed);
                            let mine = m.lock().get(&a).copied().unwrap_or(0);
                            assert!(mine <= 600, "{mine}");
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 1000);
        assert_eq!(m.used(), 0);
        assert!(m.lock().is_empty());
    }
}
