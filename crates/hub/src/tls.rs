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

/// How often, at most, a handshake checks whether the certificate or key
/// file changed.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// The acceptor `config` asks for: `None` for plain HTTP.
///
/// # Errors
/// [`Error::Config`] naming `tls.cert_file` or `tls.key_file` when a file
/// cannot be read, holds no certificate or key, or the key is not the
/// certificate's.
pub fn acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>> {
    let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = Reloading::new(cert_file, key_file, provider.clone(), CHECK_EVERY)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("tls: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// The certificate and key of two files, read again when they change.
#[derive(Debug)]
pub(crate) struct Reloading {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    every: Duration,
    current: RwLock<Arc<CertifiedKey>>,
    /// When the files were last looked at, and what they looked like then.
    seen: Mutex<(Instant, Stamp)>,
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
        let key = load(cert_file, key_file, &provider).map_err(Error::Config)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            every,
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new((Instant::now(), stamp)),
        })
    }

    /// The pair in use, after loading the files again if they changed
    /// since they were last looked at (at most every `self.every`).
    pub(crate) fn certified(&self) -> Arc<CertifiedKey> {
        self.check();
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
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
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                tracing::info!(cert_file = %self.cert_file.display(), "serving the renewed TLS certificate");
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
fn load(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let bad = |key: &str, path: &Path, why: String| format!("{key}: {}: {why}", path.display());
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
        .map_err(|e| bad("tls.cert_file", cert_file, pem_error(&e)))?;
    if certs.is_empty() {
        return Err(bad("tls.cert_file", cert_file, "no PEM certificate in it".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| bad("tls.key_file", key_file, pem_error(&e)))?;
    CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        format!(
            "tls.key_file: {} does not go with the certificate in {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })
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
