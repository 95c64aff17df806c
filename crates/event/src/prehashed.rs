//! A hasher for map keys that are already uniform keyed hashes (the
//! dedupe window's keys, the keyring's subject index): the table uses the
//! key's low word as it is instead of hashing it again.

use std::hash::{BuildHasherDefault, Hasher};

/// Passes a `u64` or `u128` key through (its low word); other input is
/// folded byte by byte, which only tests should ever need.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn write_u128(&mut self, v: u128) {
        // Truncation intended: the low word of a uniform 128-bit hash.
        #[allow(clippy::cast_possible_truncation)]
        {
            self.0 = v as u64;
        }
    }
}

/// The `BuildHasher` for [`Prehashed`] keys.
pub type BuildPrehashed = BuildHasherDefault<Prehashed>;

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::BuildPrehashed;

    #[test]
    fn words_pass_through() {
        let b = BuildPrehashed::default();
        assert_eq!(b.hash_one(0xdead_beef_u64), 0xdead_beef);
        assert_eq!(b.hash_one((7u128 << 64) | 42), 42);
    }
}
