//! Decryption for authorised readers. Every call is audited before any
//! plaintext is returned: who asked, why, how many values, which keys, and
//! how many were erased.

use std::collections::BTreeSet;

use crate::audit::Access;
use crate::cipher::parse;
use crate::error::{Error, Result};
use crate::keyring::{Audited, Keyring};
use crate::secret::Plaintext;

/// Decrypts protected values and audits every call.
#[derive(Debug)]
pub struct Decryptor<'k, K: Keyring + Audited> {
    keyring: &'k K,
}

impl<'k, K: Keyring + Audited> Decryptor<'k, K> {
    /// A decryptor over `keyring`, auditing to the keyring's audit log.
    #[must_use]
    pub fn new(keyring: &'k K) -> Self {
        Self { keyring }
    }

    /// Decrypt `values`; each gets its own result (`key_erased`,
    /// `bad_ciphertext`, ...). One audit record covers the call.
    ///
    /// # Errors
    /// [`Error::Unattributed`] when the principal or the purpose is blank,
    /// and when the audit record cannot be written; then nothing is
    /// decrypted.
    pub fn decrypt(&self, access: &Access, values: &[&str]) -> Result<Vec<Result<Plaintext>>> {
        access.check()?;
        let parsed: Vec<_> = values.iter().map(|v| parse(v)).collect();
        let key_ids: BTreeSet<String> =
            parsed.iter().filter_map(|p| p.as_ref().ok()).map(|p| p.key_id.to_hex()).collect();
        let results: Vec<Result<Plaintext>> = parsed
            .into_iter()
            .map(|p| {
                let p = p?;
                Ok(Plaintext::new(self.keyring.cipher_by_id(&p.key_id)?.decrypt(&p)?))
            })
            .collect();
        let decrypted = results.iter().filter(|r| r.is_ok()).count();
        let erased = results.iter().filter(|r| matches!(r, Err(Error::KeyErased { .. }))).count();
        let detail = serde_json::json!({
            "values": values.len(),
            "decrypted": decrypted,
            "erased": erased,
            "failed": values.len() - decrypted - erased,
            "key_ids": key_ids.into_iter().collect::<Vec<String>>(),
        });
        self.keyring.audit_log().record("decrypt", access, &detail)?;
        Ok(results)
    }
}
