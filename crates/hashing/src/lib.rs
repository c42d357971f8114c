//! Fingerprints, digests, streaming SHA-256 and verified copies: the identity of every blob recache touches.
//!
//! A [`Digest`] is what REAPI calls a digest: the SHA-256 [`Fingerprint`] of a blob plus its size
//! in bytes. Everything that enters recache from a user or a server is checked against one:
//! [`Fingerprint::from_hex`] and the REAPI conversions in [`reapi`] validate their input, and
//! [`copy_verified`] / [`copy_verified_async`] move bytes while hashing them, so that a download
//! is verified in the same single pass that writes it to disk.
//!
//! ```
//! use hashing::{Digest, Hasher};
//!
//! let whole = Digest::of_bytes(b"hello world");
//! let mut hasher = Hasher::new();
//! hasher.update(b"hello ");
//! hasher.update(b"world");
//! assert_eq!(hasher.finish(), whole);
//! assert_eq!(whole.size_bytes, 11);
//! ```

mod copy;
mod digest;
mod hasher;
pub mod reapi;

#[cfg(feature = "compare-backends")]
pub mod backends;

pub use copy::{VerifyError, copy_verified, copy_verified_async};
pub use digest::{
    Digest, DigestError, EMPTY_DIGEST, EMPTY_FINGERPRINT, FINGERPRINT_SIZE, Fingerprint,
};
pub use hasher::{Hasher, WriterHasher};
