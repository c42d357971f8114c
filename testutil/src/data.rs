//! Test and benchmark data: deterministic pseudo-random bytes, and bytes unique to one run.

/// `len` incompressible bytes, the same for the same `seed` (xorshift64; no fixtures needed).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `len` bytes no earlier run produced (random seed), so tests against a long-lived server
/// still see blobs it does not have.
pub fn unique(len: usize) -> Vec<u8> {
    let seed = uuid::Uuid::new_v4().as_u128();
    let mut out = seed.to_le_bytes().to_vec();
    out.extend(pseudo_random(len.saturating_sub(16), seed as u64));
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_unique() {
        assert_eq!(pseudo_random(1000, 1), pseudo_random(1000, 1));
        assert_ne!(pseudo_random(1000, 1), pseudo_random(1000, 2));
        assert_eq!(pseudo_random(7, 3).len(), 7);
        assert_ne!(unique(64), unique(64));
        assert_eq!(unique(5).len(), 5);
    }
}
