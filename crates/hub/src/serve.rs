//! Running the hub as a server, with graceful shutdown: stop accepting,
//! let open requests finish, flush and commit every partition, exit.
//!
//! Connections are served by hyper's HTTP/1 server directly (axum's
//! `serve` sets no timer, so a client could hold a connection with a
//! request's headers half sent, or idle, for good): headers must arrive
//! within `limits.header_timeout_secs` (idle connections close after it),
//! and at most `limits.max_connections` are open; further clients wait in
//! the listen backlog. With `[tls]` set every connection is TLS, its
//! handshake bounded by the same timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::config::{HubConfig, LimitsConfig};
use crate::error::{Error, Result};
use crate::pipeline::Hub;
use crate::tls::Tls;

/// Open files the hub keeps for itself beside its connections (WAL
/// segments and id files, the key and commit logs, lake files being
/// written, the schema directory).
const OWN_FILES: u64 = 512;

/// Bind `config.listen`, start the hub, and serve it until `shutdown`
/// resolves, as [`serve`] does.
///
/// Starting replays what the write-ahead log holds beyond the lake,
/// which after a crash under load can take minutes. Meanwhile the address
/// answers already: `/healthz` 200 `starting` (the process is alive; a
/// liveness probe must not kill it mid-replay), everything else 503
/// `starting` with `Retry-After`. Connections made then are closed once
/// the hub is started, after their answer, so clients reconnect to it.
/// `on_bound` learns the address at once, `on_started` once ingest is
/// open. A `shutdown` during the start is honoured when it is done: every
/// partition is committed, as in any stop.
///
/// # Errors
/// [`Error::Listen`], [`Error::Starting`] when the hub cannot start, or
/// as [`serve`].
pub async fn start_and_serve(
    config: HubConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
    on_started: impl FnOnce(SocketAddr),
) -> Result<()> {
    let (listen, limits) = (config.listen.clone(), config.limits.clone());
    let tls = crate::tls::acceptor(&config.tls)?;
    serve_while_starting(&listen, &limits, tls, Hub::start(config), shutdown, on_bound, on_started).await
}

/// [`start_and_serve`] with the start given.
pub(crate) async fn serve_while_starting(
    listen: &str,
    limits: &LimitsConfig,
    tls: Option<Tls>,
    start: impl std::future::Future<Output = Result<Hub>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
    on_started: impl FnOnce(SocketAddr),
) -> Result<()> {
    let (listener, local) = bind(listen).await?;
    let slots = Arc::new(Semaphore::new(make_room_for(limits.max_connections)));
    on_bound(local);
    let http = http1(limits);
    let handshake = Duration::from_secs(limits.header_timeout_secs);
    let app = crate::http::starting_router();
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(shutdown);
    let mut stop_requested = false;
    let mut start = std::pin::pin!(start);
    let hub = loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            started = &mut start => break started.map_err(|e| Error::Starting(Box::new(e)))?,
            () = &mut shutdown, if !stop_requested => {
                tracing::info!("stopping once the hub has started (its write-ahead log replayed)");
                stop_requested = true;
            }
            slot = slots.clone().acquire_owned() => {
                let slot = slot.expect("the semaphore is never closed");
                tokio::select! {
                    started = &mut start => {
                        drop(slot);
                        break started.map_err(|e| Error::Starting(Box::new(e)))?;
                    }
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => {
                            let conn = connection(
                                accepted,
                                tls.as_ref().map(|t| t.acceptor().clone()),
                                handshake,
                                http.clone(),
                                app.clone(),
                                graceful.watcher(),
                            );
                            connections.spawn(async move {
                                let _ = conn.await;
                                drop(slot);
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        }
    };
    // Answered (a request in flight finishes), then closed; a client
    // still holding one after a second is cut off.
    if tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await.is_err() {
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
    on_started(local);
    if stop_requested {
        shutdown = Box::pin(std::future::ready(()));
    }
    serve_on(hub, listener, tls, slots, shutdown).await
}

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
    let tls = crate::tls::acceptor(&hub.config.tls)?;
    let (listener, local) = bind(&hub.config.listen).await?;
    let slots = Arc::new(Semaphore::new(make_room_for(hub.config.limits.max_connections)));
    on_bound(local);
    serve_on(hub, listener, tls, slots, shutdown).await
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let listener =
        TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr: addr.to_owned(), source })?;
    let local = listener.local_addr().map_err(|source| Error::Listen { addr: addr.to_owned(), source })?;
    Ok((listener, local))
}

/// The HTTP/1 server settings: headers within `limits.header_timeout_secs`.
fn http1(limits: &LimitsConfig) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(limits.header_timeout_secs));
    http
}

/// Serve one accepted connection: after its TLS handshake when `tls` is
/// set (within the header timeout: a client that stalls in it is cut off,
/// as one stalling in its headers is).
async fn connection(
    (stream, peer): (tokio::net::TcpStream, SocketAddr),
    tls: Option<TlsAcceptor>,
    handshake: Duration,
    http: hyper::server::conn::http1::Builder,
    app: axum::Router,
    watcher: Watcher,
) -> std::result::Result<(), String> {
    use tower::ServiceExt as _;
    let _ = stream.set_nodelay(true);
    // Each request learns the client's address.
    let app = app.map_request(move |mut r: axum::http::Request<hyper::body::Incoming>| {
        r.extensions_mut().insert(crate::http::Peer(peer));
        r
    });
    let service = TowerToHyperService::new(app);
    let Some(tls) = tls else {
        return watcher
            .watch(http.serve_connection(TokioIo::new(stream), service))
            .await
            .map_err(|e| e.to_string());
    };
    let stream = match tokio::time::timeout(handshake, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err("TLS handshake timed out".into()),
    };
    watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await.map_err(|e| e.to_string())
}

/// Serve `hub` on `listener`, at most `slots` connections at once.
async fn serve_on(
    hub: Hub,
    listener: TcpListener,
    tls: Option<Tls>,
    slots: Arc<Semaphore>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let max_connections = slots.available_permits();
    let http = http1(&hub.config.limits);
    let handshake = Duration::from_secs(hub.config.limits.header_timeout_secs);
    let deadline = Duration::from_secs(hub.config.shutdown_timeout_secs);
    let hub = Arc::new(hub);
    if let Some(tls) = &tls {
        tls.report_to(&hub.metrics);
    }
    let tls = tls.map(|t| t.acceptor().clone());
    let app = crate::http::router(hub.clone());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
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
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let conn = connection(stream, tls.clone(), handshake, http.clone(), app.clone(), graceful.watcher());
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

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// One HTTP/1.1 exchange on `stream`; the response's status line and
    /// body. `close` asks the server to close after it.
    fn exchange(stream: &mut std::net::TcpStream, request: &str, close: bool) -> (String, String) {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let (head, body) = request.split_once("\r\n\r\n").unwrap_or((request, ""));
        write!(stream, "{head}\r\nHost: hub\r\n{connection}Content-Length: {}\r\n\r\n{body}", body.len())
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if n == 0 || len.is_some_and(|len| body.len() >= len) {
                    return (head.lines().next().unwrap().to_owned(), format!("{head}\n\n{body}"));
                }
            }
            assert!(n > 0, "the connection closed mid-response: {text}");
        }
    }

    fn call(addr: SocketAddr, request: &str) -> (String, String) {
        exchange(&mut std::net::TcpStream::connect(addr).unwrap(), request, true)
    }

    /// A server whose hub starts once `gate` is sent to, and stops when
    /// `shutdown` resolves; `bound` and `started` get its address.
    struct Gated {
        gate: tokio::sync::oneshot::Sender<()>,
        bound: std::sync::mpsc::Receiver<SocketAddr>,
        started: std::sync::mpsc::Receiver<SocketAddr>,
        server: tokio::task::JoinHandle<Result<()>>,
    }

    fn gated(config: HubConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Gated {
        let (gate, gated) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let (started_tx, started) = std::sync::mpsc::channel();
        let (listen, limits) = (config.listen.clone(), config.limits.clone());
        let server = tokio::spawn(async move {
            let start = async move {
                let _ = gated.await;
                Hub::start(config).await
            };
            serve_while_starting(
                &listen,
                &limits,
                None,
                start,
                shutdown,
                move |a| {
                    let _ = bound_tx.send(a);
                },
                move |a| {
                    let _ = started_tx.send(a);
                },
            )
            .await
        });
        Gated { gate, bound, started, server }
    }

    /// A schema directory that is not there stops the start, naming it and
    /// how to set it, before the data directory is made.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_schema_directory_is_named_with_how_to_set_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::testing::config(&dir.path().join("data"));
        config.schemas = dir.path().join("no-schemas");
        let e = Hub::start(config).await.unwrap_err().to_string();
        assert!(e.starts_with("schema directory ") && e.contains("no-schemas: "), "{e}");
        assert!(e.ends_with("`schemas` in the config, WATERSHED_SCHEMAS or serve --schemas DIR"), "{e}");
        assert!(!dir.path().join("data").exists());
    }

    /// While the hub starts (replaying its write-ahead log), its address
    /// answers: `/healthz` 200, `/readyz` and ingest 503 `starting` with
    /// `Retry-After`. A connection made then is closed once the hub is up,
    /// and the hub then serves; a stop asked for during the start commits
    /// and returns once the start is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_address_answers_while_the_hub_starts() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::testing::config(dir.path());
        let token = crate::testing::token(dir.path());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let Gated { gate, bound, started, server } = gated(config, async move {
            let _ = stopped.await;
        });
        let post = format!(
            "POST /v1/events HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/x-ndjson\r\n\r\n{}",
            crate::testing::login("e-1")
        );
        let (addr, post) = tokio::task::spawn_blocking(move || {
            let addr = bound.recv().unwrap();
            let (status, body) = call(addr, "GET /healthz HTTP/1.1");
            assert!(status.contains(" 200 ") && body.ends_with("starting"), "{body}");
            let (status, body) = call(addr, "GET /readyz HTTP/1.1");
            assert!(
                status.contains(" 503 ") && body.to_ascii_lowercase().contains("retry-after: 1"),
                "{body}"
            );
            let (status, body) = call(addr, &post);
            assert!(status.contains(" 503 ") && body.contains(r#""error":"starting""#), "{body}");
            assert!(body.to_ascii_lowercase().contains("retry-after: 1"), "{body}");
            (addr, post)
        })
        .await
        .unwrap();
        // A connection kept alive from the start.
        let mut kept = std::net::TcpStream::connect(addr).unwrap();
        let (status, _) = exchange(&mut kept, "GET /healthz HTTP/1.1", false);
        assert!(status.contains(" 200 "), "{status}");
        gate.send(()).unwrap();
        tokio::task::spawn_blocking(move || {
            assert_eq!(started.recv().unwrap(), addr);
            let mut rest = Vec::new();
            kept.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "closed once the hub is up: {}", String::from_utf8_lossy(&rest));
            let (status, body) = call(addr, "GET /readyz HTTP/1.1");
            assert!(status.contains(" 200 ") && body.ends_with("ready"), "{body}");
            let (status, body) = call(addr, &post);
            assert!(status.contains(" 200 ") && body.contains(r#""accepted":1"#), "{body}");
        })
        .await
        .unwrap();
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_during_the_start_is_honoured_once_it_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::testing::config(dir.path());
        let Gated { gate, started, server, .. } = gated(config, async {});
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!server.is_finished(), "waits for the start");
        gate.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(started.try_recv().is_ok());
    }
}
