//! Requests whose event ids are claimed in the dedupe window but not yet
//! durable in the WAL.
//!
//! A request claims its events' ids while it is processed and writes them
//! to the WAL afterwards. A retry that arrives meanwhile (a client that
//! timed out and sent again) finds the ids claimed and counts its events
//! as duplicates; answering it at once would acknowledge events that are
//! not durable yet, and that are stored nowhere if the first request's
//! WAL append then fails. So a request that found duplicates answers only
//! once every request that could hold their claims has finished, and
//! answers 503 (retry) if one of them failed.
//!
//! Every request takes a ticket before it claims anything. A request that
//! found duplicates waits for the tickets issued before its dedupe check
//! ended: any claim it saw was made under one of them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The open tickets.
#[derive(Debug, Default)]
pub struct Claims {
    state: Mutex<State>,
    finished: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// The next ticket.
    next: u64,
    /// Tickets taken and not finished.
    open: BTreeSet<u64>,
    /// Tickets that finished without writing what they claimed.
    failures: u64,
}

/// One request's ticket. Dropped without [`Ticket::durable`], it counts
/// as failed (the request stopped before its events were durable).
#[derive(Debug)]
pub struct Ticket {
    claims: Arc<Claims>,
    number: u64,
    /// [`State::failures`] when the ticket was taken.
    failures_before: u64,
    durable: bool,
}

/// Why a request with duplicates cannot be answered as stored.
#[derive(Debug, PartialEq, Eq)]
pub struct EarlierFailed;

impl Claims {
    /// Take a ticket, before claiming anything.
    #[must_use]
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut s = self.state.lock().expect("claims lock");
        let number = s.next;
        s.next += 1;
        s.open.insert(number);
        Ticket { claims: self.clone(), number, failures_before: s.failures, durable: false }
    }

    fn finish(&self, number: u64, durable: bool) {
        let mut s = self.state.lock().expect("claims lock");
        s.open.remove(&number);
        if !durable {
            s.failures += 1;
        }
        drop(s);
        self.finished.notify_waiters();
    }
}

impl Ticket {
    /// What this request claimed is durable (or it claimed nothing).
    pub fn durable(mut self) {
        self.durable = true;
    }

    /// Call once this request's own claims are durable, when its dedupe
    /// check found duplicates: finish this ticket, then wait until every
    /// request that could hold their claims has finished. (Finishing
    /// first means two requests holding each other's ids cannot wait on
    /// each other.)
    ///
    /// # Errors
    /// [`EarlierFailed`] when a request finished without writing what it
    /// claimed since this ticket was taken: the duplicates may not be
    /// stored, and the client should retry.
    pub async fn durable_then_wait_for_earlier_claims(self) -> Result<(), EarlierFailed> {
        let claims = self.claims.clone();
        let failures_before = self.failures_before;
        let upto = claims.state.lock().expect("claims lock").next;
        self.durable();
        loop {
            let finished = claims.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            {
                let s = claims.state.lock().expect("claims lock");
                if s.open.range(..upto).next().is_none() {
                    return if s.failures == failures_before { Ok(()) } else { Err(EarlierFailed) };
                }
            }
            finished.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.claims.finish(self.number, self.durable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn duplicates_wait_for_the_claims_before_them() {
        let claims = Arc::new(Claims::default());
        let first = claims.ticket();
        let retry = claims.ticket();
        let waiting = tokio::spawn(retry.durable_then_wait_for_earlier_claims());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "answered before the first request was durable");
        // A ticket taken later does not hold the retry back.
        let later = claims.ticket();
        first.durable();
        assert_eq!(waiting.await.unwrap(), Ok(()));
        later.durable();
    }

    #[tokio::test]
    async fn two_requests_with_each_others_ids_do_not_wait_on_each_other() {
        let claims = Arc::new(Claims::default());
        let (a, b) = (claims.ticket(), claims.ticket());
        let a = tokio::spawn(a.durable_then_wait_for_earlier_claims());
        let b = tokio::spawn(b.durable_then_wait_for_earlier_claims());
        assert_eq!((a.await.unwrap(), b.await.unwrap()), (Ok(()), Ok(())));
    }

    #[tokio::test]
    async fn a_failed_earlier_request_makes_the_duplicates_retry() {
        let claims = Arc::new(Claims::default());
        let first = claims.ticket();
        let retry = claims.ticket();
        let waiting = tokio::spawn(retry.durable_then_wait_for_earlier_claims());
        drop(first);
        assert_eq!(waiting.await.unwrap(), Err(EarlierFailed));
        // Failures before a ticket was taken do not count against it.
        let fresh = claims.ticket();
        assert_eq!(fresh.durable_then_wait_for_earlier_claims().await, Ok(()));
    }
}
