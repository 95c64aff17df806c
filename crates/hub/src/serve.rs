//! Running the hub as a server, with graceful shutdown: stop accepting,
//! drain in-flight requests, flush and commit every partition, exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::pipeline::Hub;

/// Bind `hub.config.listen`, serve until `shutdown` resolves, then drain
/// and commit within the configured deadline. `on_bound` learns the
/// actual address (useful with port 0).
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
    on_bound(local);
    let deadline = Duration::from_secs(hub.config.shutdown_timeout_secs);
    let hub = Arc::new(hub);
    let app = crate::http::router(hub.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::Listen { addr: local.to_string(), source })?;
    tracing::info!("stopped accepting; committing open partitions");
    let mut hub = hub;
    let drain = async move {
        // In-flight handlers hold clones; wait for them to finish.
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
    match tokio::time::timeout(deadline, drain).await {
        Ok(r) => r,
        Err(_) => Err(Error::Stopped("shutdown deadline passed; uncommitted events stay in the WAL")),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
