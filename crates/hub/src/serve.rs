//! Running the hub as a server, with graceful shutdown: stop accepting,
//! let open requests finish, flush and commit every partition, exit.
//!
//! Connections are served by hyper's HTTP/1 server directly (axum's
//! `serve` sets no timer, so a client could hold a connection with a
//! request's headers half sent, or idle, for good): headers must arrive
//! within `limits.header_timeout_secs` (idle connections close after it),
//! and at most `limits.max_connections` are open; further clients wait in
//! the listen backlog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::pipeline::Hub;

/// Open files the hub keeps for itself beside its connections (WAL
/// segments and id files, the key and commit logs, lake files being
/// written, the schema directory).
const OWN_FILES: u64 = 512;

/// Bind `hub.config.listen`, serve until `shutdown` resolves, then drain
/// and commit within the configured deadline. `on_bound` learns the
/// actual address (useful with port 0).
///
/// On `shutdown` the listener closes, idle connections close, and open
/// requests get a third of `shutdown_timeout_secs` to finish; connections
/// still open then (a client stalled in its body) are closed without an
/// answer (nothing of theirs was acknowledged). Requests already being
/// ingested finish regardless (see [`Hub::ingest`]); then every partition
/// is committed in the time left.
///
/// # Errors
/// [`Error::Listen`], or [`Error::Stopped`] when the drain misses its
/// deadline (the WAL still holds everything; the next start replays it).
pub async fn serve(
    hub: Hub,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let addr = hub.config.listen.clone();
    let listener =
        TcpListener::bind(&addr).await.map_err(|source| Error::Listen { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| Error::Listen { addr, source })?;
    let limits = hub.config.limits.clone();
    let max_connections = make_room_for(limits.max_connections);
    on_bound(local);
    let deadline = Duration::from_secs(hub.config.shutdown_timeout_secs);
    let hub = Arc::new(hub);
    let app = crate::http::router(hub.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(limits.header_timeout_secs));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut at_cap = false;
    loop {
        while connections.try_join_next().is_some() {}
        let full = slots.available_permits() == 0;
        if full && !at_cap {
            tracing::warn!(max_connections, "limits.max_connections open; new clients wait for one to close");
        }
        at_cap = full;
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        let open = hub.metrics.connections.clone();
        open.inc();
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            open.dec();
            drop(slot);
        });
    }
    drop(listener);
    let stopping = Instant::now();
    tracing::info!(open = connections.len(), "stopped accepting; finishing open requests");
    if tokio::time::timeout(deadline / 3, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after a third of shutdown_timeout_secs; closing them unanswered"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
    drop(app);
    tracing::info!("committing open partitions");
    let mut hub = hub;
    let drain = async move {
        // Handlers of connections just closed may still hold clones.
        let hub = loop {
            match Arc::try_unwrap(hub) {
                Ok(h) => break h,
                Err(h) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    hub = h;
                }
            }
        };
        hub.shutdown().await
    };
    match tokio::time::timeout(deadline.saturating_sub(stopping.elapsed()), drain).await {
        Ok(r) => r,
        Err(_) => Err(Error::Stopped("shutdown deadline passed; uncommitted events stay in the WAL")),
    }
}

/// Raise the soft limit on open files so that `wanted` connections fit
/// beside the hub's own files; the connections that fit when the hard
/// limit does not allow it (with a warning).
fn make_room_for(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let need = (wanted as u64).saturating_add(OWN_FILES);
        let mut lim = getrlimit(Resource::Nofile);
        if lim.current.is_some_and(|c| c < need) {
            let raised =
                Rlimit { current: Some(lim.maximum.map_or(need, |m| m.min(need))), maximum: lim.maximum };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                lim = raised;
            }
        }
        if let Some(current) = lim.current.filter(|&c| c < need) {
            let fits = usize::try_from(current.saturating_sub(OWN_FILES)).unwrap_or(usize::MAX).max(1);
            tracing::warn!(
                wanted,
                serving = fits,
                open_file_limit = current,
                "limits.max_connections does not fit under the open-file limit; serving fewer connections"
            );
            return fits;
        }
    }
    wanted
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed here, before
/// the returned future is first polled: a SIGTERM that arrives as soon as
/// the hub reports its address must stop it cleanly, not kill it.
///
/// # Panics
/// Outside a tokio runtime, or when the handlers cannot be installed.
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
