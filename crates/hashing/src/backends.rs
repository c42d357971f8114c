//! Alternative SHA-256 backends, compiled only with the `compare-backends` feature so that the
//! `hashing` benchmark can measure them against the shipped [`Hasher`](crate::Hasher) through the
//! same shape of API. Nothing in recache uses these.

use crate::{Digest, FINGERPRINT_SIZE, Fingerprint};
use sha2::Digest as _;

/// SHA-256 from the pure-Rust `sha2` crate, with the same `update`/`finish` shape as `Hasher`.
#[derive(Clone, Default)]
pub struct Sha2Hasher {
    inner: sha2::Sha256,
    size_bytes: u64,
}

impl Sha2Hasher {
    /// A hasher that has seen nothing yet.
    pub fn new() -> Sha2Hasher {
        Sha2Hasher::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.size_bytes += bytes.len() as u64;
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let out = self.inner.finalize();
        let mut hash = [0u8; FINGERPRINT_SIZE];
        hash.copy_from_slice(&out);
        Digest::new(Fingerprint(hash), self.size_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha2_agrees_with_the_shipped_backend() {
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 7) as u8).collect();
        let mut a = Sha2Hasher::new();
        let mut b = crate::Hasher::new();
        for c in data.chunks(4099) {
            a.update(c);
            b.update(c);
        }
        assert_eq!(a.finish(), b.finish());
    }
}
