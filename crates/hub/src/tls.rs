//! HTTPS for `serve`: the `[tls]` certificate and key in a rustls
//! acceptor (ring, TLS 1.2 and 1.3, no client certificates: accounts
//! authenticate with their bearer tokens, inside TLS).
//!
//! The pair is read at start, where a bad one stops the hub, and again
//! when the files change: a handshake looks at their modification times
//! at most every [`CHECK_EVERY`], so a renewed certificate is served
//! within seconds without a restart. A renewed pair that does not load
//! (a key written before its certificate, say) is logged and the one in
//! use kept; the next change to either file is tried again.
//!
//! The served certificate's expiry is logged (a warning within
//! [`EXPIRY_WARNING`] of it) and published in `/metrics`, so an alert
//! can catch a renewal that did not happen.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::error::{Error, Result};
use crate::metrics::{CertLabel, Metrics};

/// How often, at most, a handshake checks whether the certificate or key
/// file changed.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// How long before its expiry a served certificate is logged as a
/// warning, at start and at each renewal.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// HTTPS as `[tls]` configures it: the acceptor, and the certificate pair
/// it serves.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    certs: Arc<Reloading>,
}

impl Tls {
    /// The acceptor that runs each connection's handshake.
    #[must_use]
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Publish the served certificate's expiry in `metrics`
    /// (`watershed_tls_certificate_expiry_timestamp_seconds`), now and
    /// after each renewal.
    pub fn report_to(&self, metrics: &Metrics) {
        let label = CertLabel { cert_file: self.certs.cert_file.display().to_string() };
        let gauge = metrics.tls_expiry.get_or_create(&label).clone();
        let mut expiry = self.certs.expiry.lock().unwrap_or_else(PoisonError::into_inner);
        gauge.set(self.certs.current.read().unwrap_or_else(PoisonError::into_inner).not_after);
        *expiry = Some(gauge);
    }
}

/// The acceptor `config` asks for: `None` for plain HTTP.
///
/// # Errors
/// [`Error::Config`] naming `tls.cert_file` or `tls.key_file` when a file
/// cannot be read, holds no certificate or key, or the key is not the
/// certificate's.
pub fn acceptor(config: &TlsConfig) -> Result<Option<Tls>> {
    let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = Arc::new(Reloading::new(cert_file, key_file, provider.clone(), CHECK_EVERY)?);
    log_expiry(cert_file, certs.current.read().unwrap_or_else(PoisonError::into_inner).not_after, false);
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    Ok(Some(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), certs }))
}

/// Say when the certificate of `cert_file` expires: a warning once that
/// is within [`EXPIRY_WARNING`] (or past).
fn log_expiry(cert_file: &Path, not_after: i64, renewed: bool) {
    let until = chrono::DateTime::from_timestamp(not_after, 0).unwrap_or_default();
    let left = until.signed_duration_since(chrono::Utc::now());
    let what = if renewed { "serving the renewed TLS certificate" } else { "serving HTTPS" };
    let (cert_file, expires_at) = (cert_file.display(), until.to_rfc3339());
    if left.num_seconds() <= 0 {
        tracing::warn!(%cert_file, %expires_at, "{what}, but its certificate has expired: clients refuse it");
    } else if left.to_std().is_ok_and(|left| left < EXPIRY_WARNING) {
        tracing::warn!(%cert_file, %expires_at, days_left = left.num_days(), "{what}; its certificate expires soon");
    } else {
        tracing::info!(%cert_file, %expires_at, "{what}");
    }
}

/// The certificate and key of two files, read again when they change.
#[derive(Debug)]
pub(crate) struct Reloading {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    every: Duration,
    current: RwLock<Served>,
    /// When the files were last looked at, and what they looked like then.
    seen: Mutex<(Instant, Stamp)>,
    /// Where the served certificate's expiry is published, once it is.
    expiry: Mutex<Option<prometheus_client::metrics::gauge::Gauge>>,
}

/// A loaded pair, and when its certificate expires (Unix seconds).
#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    not_after: i64,
}

/// What two files look like from outside: enough to tell a rewrite in
/// place (time, length) or a new file renamed over the old (inode).
type Stamp = [Option<(SystemTime, u64, u64)>; 2];

impl Reloading {
    /// The pair as the files hold it now, checked again at most `every`.
    pub(crate) fn new(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
        every: Duration,
    ) -> Result<Self> {
        let stamp = stamp(cert_file, key_file);
        let served = load(cert_file, key_file, &provider).map_err(Error::Config)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            every,
            current: RwLock::new(served),
            seen: Mutex::new((Instant::now(), stamp)),
            expiry: Mutex::new(None),
        })
    }

    /// The pair in use, after loading the files again if they changed
    /// since they were last looked at (at most every `self.every`).
    pub(crate) fn certified(&self) -> Arc<CertifiedKey> {
        self.check();
        self.current.read().unwrap_or_else(PoisonError::into_inner).key.clone()
    }

    fn check(&self) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if now.duration_since(seen.0) < self.every {
            return;
        }
        seen.0 = now;
        let stamp = stamp(&self.cert_file, &self.key_file);
        if stamp == seen.1 {
            return;
        }
        seen.1 = stamp;
        match load(&self.cert_file, &self.key_file, &self.provider) {
            Ok(served) => {
                let not_after = served.not_after;
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = served;
                if let Some(gauge) = &*self.expiry.lock().unwrap_or_else(PoisonError::into_inner) {
                    gauge.set(not_after);
                }
                log_expiry(&self.cert_file, not_after, true);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the TLS certificate or key changed but does not load; serving the previous pair until \
                 the files change again"
            ),
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

/// Each file's modification time, length and inode (`None`: cannot be
/// read). Paths are followed, so a renewal that repoints a symbolic link
/// (as certbot's `live/` links and Kubernetes' mounted secrets do) counts.
fn stamp(cert_file: &Path, key_file: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    [cert_file, key_file]
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino()))))
}

/// The certificate chain of `cert_file` with the key of `key_file`; or
/// what is wrong, naming the configuration key.
fn load(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<Served, String> {
    let bad = |key: &str, path: &Path, why: String| format!("{key}: {}: {why}", path.display());
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
        .map_err(|e| bad("tls.cert_file", cert_file, pem_error(&e)))?;
    let Some(first) = certs.first() else {
        return Err(bad("tls.cert_file", cert_file, "no PEM certificate in it".into()));
    };
    let not_after = x509_parser::parse_x509_certificate(first)
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .map_err(|e| bad("tls.cert_file", cert_file, format!("its first certificate is not X.509: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| bad("tls.key_file", key_file, pem_error(&e)))?;
    let key = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        format!(
            "tls.key_file: {} does not go with the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(Served { key: Arc::new(key), not_after })
}

/// A PEM reading error, said plainly.
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::Io(io) => format!("cannot read it: {io}"),
        Pem::NoItemsFound => "no PEM private key in it".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_is_plain_http_and_bad_files_name_their_key() {
        assert!(acceptor(&TlsConfig::default()).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let config = || TlsConfig { cert_file: Some(cert.clone()), key_file: Some(key.clone()) };
        let err = |c: &TlsConfig| acceptor(c).err().expect("refused").to_string();
        assert!(err(&config()).contains("tls.cert_file") && err(&config()).contains("cannot read it"));
        std::fs::write(&cert, "not pem\n").unwrap();
        assert!(err(&config()).contains("tls.cert_file") && err(&config()).contains("no PEM certificate"));

        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        assert!(err(&config()).contains("tls.key_file") && err(&config()).contains("cannot read it"));
        std::fs::write(&key, made.cert.pem()).unwrap();
        assert!(err(&config()).contains("tls.key_file") && err(&config()).contains("no PEM private key"));
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let e = err(&config());
        assert!(e.contains("tls.key_file") && e.contains("does not go with the certificate"), "{e}");
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        assert!(acceptor(&config()).unwrap().is_some());
    }

    /// The served certificate's expiry is in the metrics, and follows a
    /// renewal.
    #[test]
    fn the_served_certificates_expiry_is_published_and_follows_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let write_expiring = |year: i32| {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params.not_after = rcgen::date_time_ymd(year, 1, 1);
            let key_pair = rcgen::KeyPair::generate().unwrap();
            std::fs::write(&cert, params.self_signed(&key_pair).unwrap().pem()).unwrap();
            std::fs::write(&key, key_pair.serialize_pem()).unwrap();
            chrono::NaiveDate::from_ymd_opt(year, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp()
        };
        let first = write_expiring(2031);
        let config = TlsConfig { cert_file: Some(cert.clone()), key_file: Some(key.clone()) };
        let tls = acceptor(&config).unwrap().unwrap();
        let metrics = Metrics::default();
        tls.report_to(&metrics);
        let gauge = || {
            let label = CertLabel { cert_file: cert.display().to_string() };
            metrics.tls_expiry.get_or_create(&label).get()
        };
        assert_eq!(gauge(), first);
        // Renewed (looked at without waiting CHECK_EVERY).
        let renewed = write_expiring(2032);
        let file = std::fs::File::options().write(true).open(&cert).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(60)).unwrap();
        tls.certs.seen.lock().unwrap().0 -= CHECK_EVERY;
        let _ = tls.certs.certified();
        assert_eq!(gauge(), renewed);
    }

    /// A certificate for `localhost` signed by itself.
    fn pair() -> (String, String, CertificateDer<'static>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (made.cert.pem(), made.key_pair.serialize_pem(), made.cert.der().clone())
    }

    /// The certificate a client is shown in a real handshake with
    /// `acceptor` (over an in-memory pipe), trusting any of `roots`.
    async fn served(acceptor: &TlsAcceptor, roots: &[CertificateDer<'static>]) -> CertificateDer<'static> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let client =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(store)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn({
            let acceptor = acceptor.clone();
            async move { acceptor.accept(b).await.map(drop) }
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, a).await.expect("handshake");
        server.await.unwrap().unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    /// A renewed certificate is served without a restart, whether the
    /// files are rewritten in place or replaced by a rename; a pair that
    /// does not load (a certificate whose key is not written yet) leaves
    /// the previous one in use, and the next change is tried again.
    #[tokio::test]
    async fn a_renewed_certificate_is_served_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let (a_cert, a_key, a) = pair();
        std::fs::write(&cert, &a_cert).unwrap();
        std::fs::write(&key, &a_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Arc::new(Reloading::new(&cert, &key, provider.clone(), Duration::ZERO).unwrap());
        let acceptor = TlsAcceptor::from(Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(certs.clone()),
        ));
        let (b_cert, b_key, b) = pair();
        let (c_cert, c_key, c) = pair();
        let roots = [a.clone(), b.clone(), c.clone()];
        assert_eq!(served(&acceptor, &roots).await, a);

        // Rewritten in place (a minute later: file times are coarser than
        // the test's pace, and both certificates are of one length).
        let later = |path: &Path| {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(SystemTime::now() + Duration::from_secs(60)).unwrap();
        };
        std::fs::write(&cert, &b_cert).unwrap();
        std::fs::write(&key, &b_key).unwrap();
        later(&cert);
        assert_eq!(served(&acceptor, &roots).await, b);

        // The certificate first, its key not yet: the previous pair stays.
        let staged = dir.path().join("staged.pem");
        std::fs::write(&staged, &c_cert).unwrap();
        std::fs::rename(&staged, &cert).unwrap();
        assert_eq!(served(&acceptor, &roots).await, b, "a mismatched pair is not served");
        std::fs::write(&staged, &c_key).unwrap();
        std::fs::rename(&staged, &key).unwrap();
        assert_eq!(served(&acceptor, &roots).await, c, "the completed pair is");

        // Files gone: the pair in memory goes on serving.
        std::fs::remove_file(&cert).unwrap();
        assert_eq!(served(&acceptor, &roots).await, c);

        // Looked at no more often than CHECK_EVERY.
        let (d_cert, d_key, d) = pair();
        std::fs::write(&cert, &d_cert).unwrap();
        std::fs::write(&key, &d_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let slow = Reloading::new(&cert, &key, provider, CHECK_EVERY).unwrap();
        std::fs::write(&cert, &c_cert).unwrap();
        std::fs::write(&key, &c_key).unwrap();
        later(&cert);
        assert_eq!(slow.certified().cert[0], d, "not looked at again within CHECK_EVERY");
    }
}
