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

/// Decrypted plaintext of a protected field.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Plaintext(String);

impl Plaintext {
    pub(crate) fn new(s: String) -> Self {
        Self(s)
    }

    /// The plaintext. Callers own what happens to it next.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
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
        let p = Plaintext::new("4111111111111111".into());
        for s in [format!("{k:?}"), format!("{p:?}"), format!("{p}")] {
            assert!(s.contains("REDACTED"), "{s}");
            assert!(!s.contains("4111") && !s.contains('7'), "{s}");
        }
    }
}
