//! AWS KMS as the master key: data keys come from `GenerateDataKey` and
//! unwrap with `Decrypt`, bound to an encryption context naming the key's
//! use. Requests run on a small runtime owned by the master key, so the
//! synchronous keyring can call it from any thread, inside or outside an
//! async context. Rotation is KMS's own (automatic key rotation keeps old
//! backing keys), so [`MasterKey::rotate`] only reports the key id.

use std::collections::HashMap;
use std::fmt::Write as _;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::error::{Error, Result};
use crate::keyring::{MasterKey, Wrapped};
use crate::secret::SecretKey;

/// A KMS key that wraps Watershed's data keys.
pub struct KmsMasterKey {
    key_id: String,
    client: aws_sdk_kms::Client,
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for KmsMasterKey {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for KmsMasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KmsMasterKey({})", self.key_id)
    }
}

impl KmsMasterKey {
    /// Use KMS key `key_id` (id, ARN or alias) in `region` (when `None`,
    /// the standard AWS region chain: `AWS_REGION`, the profile),
    /// optionally at `endpoint` (a VPC endpoint or a local KMS-compatible
    /// server). Credentials come from the standard AWS provider chain.
    ///
    /// # Errors
    /// [`Error::Kms`] when the runtime cannot start or no region is known.
    pub fn new(key_id: impl Into<String>, region: Option<String>, endpoint: Option<String>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("watershed-kms")
            .enable_all()
            .build()
            .map_err(|e| Error::Kms(format!("cannot start the KMS runtime: {e}")))?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = region {
            loader = loader.region(aws_config::Region::new(r));
        }
        if let Some(ep) = endpoint {
            loader = loader.endpoint_url(ep);
        }
        // Not `block_on`: this may be called from inside another runtime.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(loader.load().await);
        });
        let config = rx.recv();
        let failed = match &config {
            Err(_) => Some("loading the AWS configuration stopped"),
            Ok(c) if c.region().is_none() => {
                Some("no AWS region: configure the KMS key's region or set AWS_REGION")
            }
            Ok(_) => None,
        };
        if let Some(why) = failed {
            rt.shutdown_background();
            return Err(Error::Kms(why.into()));
        }
        let config = config.expect("checked above");
        Ok(Self { key_id: key_id.into(), client: aws_sdk_kms::Client::new(&config), rt: Some(rt) })
    }

    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.as_ref().expect("present until dropped").spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| Error::Kms("the KMS request task stopped".into()))
    }
}

/// A KMS request's failure: the service's error code and message, or what
/// kept the request from the service (connection, timeout, credentials).
fn failed<E, R>(op: &str, e: &SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    Error::Kms(match e.as_service_error() {
        Some(se) => {
            format!("{op}: {}: {}", se.code().unwrap_or("error"), se.message().unwrap_or("no message"))
        }
        None => {
            let mut text = format!("{op}: {e}");
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let _ = write!(text, ": {s}");
                source = s.source();
            }
            text
        }
    })
}

fn context_map(context: &[u8]) -> HashMap<String, String> {
    HashMap::from([("watershed".to_owned(), String::from_utf8_lossy(context).into_owned())])
}

impl MasterKey for KmsMasterKey {
    fn wrap(&self, key: &SecretKey, context: &[u8]) -> Result<Wrapped> {
        let req = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(key.expose().to_vec()))
            .set_encryption_context(Some(context_map(context)));
        let out = self.run(async move { req.send().await })?.map_err(|e| failed("Encrypt", &e))?;
        let blob =
            out.ciphertext_blob().ok_or_else(|| Error::Kms("Encrypt returned no ciphertext".into()))?;
        Ok(Wrapped { master: self.key_id.clone(), blob: STANDARD.encode(blob.as_ref()) })
    }

    fn generate(&self, context: &[u8]) -> Result<(SecretKey, Wrapped)> {
        let req = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context_map(context)));
        let out = self.run(async move { req.send().await })?.map_err(|e| failed("GenerateDataKey", &e))?;
        let plain = out
            .plaintext()
            .and_then(|b| SecretKey::from_slice(b.as_ref()))
            .ok_or_else(|| Error::Kms("GenerateDataKey returned no 32-byte key".into()))?;
        let blob = out
            .ciphertext_blob()
            .ok_or_else(|| Error::Kms("GenerateDataKey returned no ciphertext".into()))?;
        Ok((plain, Wrapped { master: self.key_id.clone(), blob: STANDARD.encode(blob.as_ref()) }))
    }

    fn unwrap(&self, wrapped: &Wrapped, context: &[u8]) -> Result<SecretKey> {
        let blob =
            STANDARD.decode(&wrapped.blob).map_err(|_| Error::Kms("wrapped key is not base64".into()))?;
        let req = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(blob))
            .set_encryption_context(Some(context_map(context)));
        let out = self.run(async move { req.send().await })?.map_err(|e| failed("Decrypt", &e))?;
        out.plaintext()
            .and_then(|b| SecretKey::from_slice(b.as_ref()))
            .ok_or_else(|| Error::Kms("Decrypt returned no 32-byte key".into()))
    }

    fn rotate(&self) -> Result<String> {
        Ok(self.key_id.clone())
    }
}
