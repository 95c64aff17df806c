//! The self-describing ciphertext format of encrypted fields:
//!
//! ```text
//! "wse1." base64url( key_id[16] ‖ nonce[12] ‖ ciphertext ‖ tag[16] )
//! ```
//!
//! AES-256-GCM, with `"wse1" ‖ key_id` as associated data so a ciphertext
//! cannot be moved under another key id. Nonces are 96 random bits from a
//! ChaCha20 CSPRNG seeded by the operating system; each data key belongs
//! to one (account, data subject), so a key encrypts few values and the
//! random-nonce bound (2^32 messages per key) is never approached.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;

use crate::error::{Error, Result};
use crate::secret::SecretKey;

/// The text prefix of every ciphertext.
pub const PREFIX: &str = "wse1.";

/// A data key's id: 16 random bytes, carried in every ciphertext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// A fresh random id.
    #[must_use]
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        Self(b)
    }

    /// Lowercase hex, as stored in the keyring file.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parse the hex form.
    #[must_use]
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            b[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self(b))
    }
}

/// Lowercase hex of `b`.
#[must_use]
pub(crate) fn hex(b: &[u8]) -> String {
    let mut out = vec![0; b.len() * 2];
    hex_into(b, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lowercase hex of `b` into `out`, which holds twice as many bytes.
pub(crate) fn hex_into(b: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (&x, pair) in b.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(x >> 4)];
        pair[1] = DIGITS[usize::from(x & 15)];
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An AES-256-GCM cipher keyed once, for many values.
pub struct DataCipher {
    id: KeyId,
    aead: Aes256Gcm,
}

impl std::fmt::Debug for DataCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataCipher({:?}, **REDACTED**)", self.id)
    }
}

impl DataCipher {
    /// Key the cipher (the AES key schedule runs here, once).
    #[must_use]
    pub fn new(id: KeyId, key: &SecretKey) -> Self {
        Self { id, aead: Aes256Gcm::new(key.expose().into()) }
    }

    /// The key id.
    #[must_use]
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Encrypt `plain` and append the text form to `out`, using `buf` as
    /// scratch space.
    pub fn encrypt_into(&self, plain: &[u8], rng: &mut impl RngCore, buf: &mut Vec<u8>, out: &mut Vec<u8>) {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        buf.clear();
        buf.extend_from_slice(&self.id.0);
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(plain);
        let aad = aad(&self.id);
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buf[28..])
            .expect("AES-GCM encrypts any message under 64 GiB");
        buf.extend_from_slice(&tag);
        out.extend_from_slice(PREFIX.as_bytes());
        base64_simd::URL_SAFE_NO_PAD.encode_append(&buf[..], out);
    }

    /// Decrypt a raw ciphertext body (as returned by [`parse`]).
    ///
    /// # Errors
    /// [`Error::BadCiphertext`] when the tag does not verify.
    pub fn decrypt(&self, body: &Parsed) -> Result<Vec<u8>> {
        let mut buf = body.ciphertext.clone();
        let aad = aad(&self.id);
        self.aead
            .decrypt_in_place_detached(
                Nonce::from_slice(&body.nonce),
                &aad,
                &mut buf,
                Tag::from_slice(&body.tag),
            )
            .map_err(|_| Error::BadCiphertext {
                detail: "authentication failed (tampered, or not under this key)",
            })?;
        Ok(buf)
    }
}

fn aad(id: &KeyId) -> [u8; 20] {
    let mut a = [0u8; 20];
    a[..4].copy_from_slice(b"wse1");
    a[4..].copy_from_slice(&id.0);
    a
}

/// A parsed ciphertext.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The data key's id.
    pub key_id: KeyId,
    /// The nonce.
    pub nonce: [u8; 12],
    /// The encrypted bytes (without tag).
    pub ciphertext: Vec<u8>,
    /// The GCM tag.
    pub tag: [u8; 16],
}

/// Parse the text form of a ciphertext.
///
/// # Errors
/// [`Error::BadCiphertext`] when the prefix, base64 or length is wrong.
pub fn parse(text: &str) -> Result<Parsed> {
    let body = text
        .strip_prefix(PREFIX)
        .ok_or(Error::BadCiphertext { detail: "not a Watershed ciphertext (expected the wse1. prefix)" })?;
    let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| Error::BadCiphertext { detail: "not base64url" })?;
    if raw.len() < 16 + 12 + 16 {
        return Err(Error::BadCiphertext { detail: "too short" });
    }
    let mut key_id = [0u8; 16];
    key_id.copy_from_slice(&raw[..16]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&raw[16..28]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&raw[raw.len() - 16..]);
    Ok(Parsed { key_id: KeyId(key_id), nonce, ciphertext: raw[28..raw.len() - 16].to_vec(), tag })
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use proptest::prelude::*;
    use rand::SeedableRng as _;

    use super::*;
    use crate::SecretKey;

    proptest! {
        /// Ciphertexts of every length are base64url without padding, as
        /// the reference encoder writes it, and decrypt to their input.
        #[test]
        fn ciphertexts_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..200), seed in any::<u64>()) {
            let cipher = DataCipher::new(KeyId([3; 16]), &SecretKey::new([7; 32]));
            let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(seed);
            let (mut buf, mut out) = (Vec::new(), b"kept".to_vec());
            cipher.encrypt_into(&plain, &mut rng, &mut buf, &mut out);
            prop_assert!(out.starts_with(b"kept"));
            let text = std::str::from_utf8(&out[4..]).unwrap();
            prop_assert_eq!(&text[PREFIX.len()..], URL_SAFE_NO_PAD.encode(&buf));
            prop_assert_eq!(cipher.decrypt(&parse(text).unwrap()).unwrap(), plain);
        }
    }
}
