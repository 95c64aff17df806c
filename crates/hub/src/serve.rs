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
