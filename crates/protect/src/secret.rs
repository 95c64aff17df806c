//! Secret values that hide themselves: key material and decrypted
//! plaintext print as `**REDACTED**` in `Debug` and `Display`, and key
//! material is zeroed when dropped.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// 32 bytes of key material.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// Wrap raw key bytes.
    #[must_use]
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key from the operating system's CSPRNG.
    #[must_use]
    pub fn random() -> Self {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        Self(b)
    }

    /// Copy from a slice of exactly 32 bytes.
    #[must_use]
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(b).ok().map(Self)
    }

    /// The key bytes. Use them only to key a cipher or MAC.
    #[must_use]
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(**REDACTED**)")
    }
}

/// Decrypted plaintext: a protected field's value, or a whole event as
/// received (a dead letter's `raw`), which need not be UTF-8.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Plaintext(Vec<u8>);

impl Plaintext {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The plaintext's bytes. Callers own what happens to them next.
    #[must_use]
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The plaintext as text, when it is UTF-8 (every field value is;
    /// a refused event's raw bytes may not be).
    #[must_use]
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext(**REDACTED**)")
    }
}

impl fmt::Display for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let k = SecretKey::new([7; 32]);
        let p = Plaintext::new(b"4111111111111111".to_vec());
        for s in [format!("{k:?}"), format!("{p:?}"), format!("{p}")] {
            assert!(s.contains("REDACTED"), "{s}");
            assert!(!s.contains("4111") && !s.contains('7'), "{s}");
        }
    }
}
