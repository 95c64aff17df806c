//! HTTPS for `serve`: the `[tls]` certificate and key, read once at start
//! into a rustls acceptor (ring, TLS 1.2 and 1.3, no client certificates:
//! accounts authenticate with their bearer tokens, inside TLS).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::error::{Error, Result};

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
    let bad =
        |key: &str, path: &Path, why: String| Error::Config(format!("{key}: {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(Iterator::collect::<std::result::Result<Vec<_>, _>>)
        .map_err(|e| bad("tls.cert_file", cert_file, pem_error(&e)))?;
    if certs.is_empty() {
        return Err(bad("tls.cert_file", cert_file, "no PEM certificate in it".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| bad("tls.key_file", key_file, pem_error(&e)))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("tls: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                Error::Config(format!(
                    "tls.key_file: {} does not go with the certificate in {}: {e}",
                    key_file.display(),
                    cert_file.display()
                ))
            })?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
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
}
