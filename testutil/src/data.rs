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

/// A `len`-byte blob (`len` ≥ 64 KiB) that does not compress yet *ends* like a compressed pool
/// file of `len` bytes: random bytes, then one zstd frame that decodes to `len` zero bytes, a
/// two-entry offset table pointing at it, and a seek-table tail (chunk size `len`, one chunk,
/// logical size `len`, the magic `RCZ1`). A store that guessed a file's layout from its last
/// bytes would serve `len` zeros for this blob's digest; it is how issue 28's first bug was
/// reproduced.
pub fn forged_framed_blob(len: usize) -> Vec<u8> {
    let zeros = vec![0u8; len];
    let frame = zstd::bulk::compress(&zeros, 1).unwrap_or_default();
    let tail_len = 16 + 4 + 4 + 8 + 4;
    let start = len - tail_len - frame.len();
    let mut out = pseudo_random(start, 28);
    out.extend_from_slice(&frame);
    out.extend_from_slice(&(start as u64).to_le_bytes());
    out.extend_from_slice(&((start + frame.len()) as u64).to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(b"RCZ1");
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
