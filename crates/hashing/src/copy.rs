use std::io::{self, Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Digest, Fingerprint, Hasher};

/// Buffer size for verified copies: large enough to amortise syscalls, small enough to stay in L2.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Why a verified copy failed. The destination may hold a prefix of the data: callers write into
/// a temporary location and commit only on `Ok`.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading the source or writing the destination failed.
    #[error("I/O error while copying blob {expected}: {source}")]
    Io {
        /// The digest the content was expected to have.
        expected: Digest,
        /// The underlying error.
        source: io::Error,
    },
    /// The source ended before `expected.size_bytes` bytes.
    #[error("blob {expected} is truncated: got only {actual_size} bytes")]
    TooShort {
        /// The digest the content was expected to have.
        expected: Digest,
        /// How many bytes the source held.
        actual_size: u64,
    },
    /// The source held more than `expected.size_bytes` bytes. Copying stops at the first extra
    /// byte, so an oversized source never fills the destination.
    #[error("blob {expected} is too long: the source has more than {} bytes", expected.size_bytes)]
    TooLong {
        /// The digest the content was expected to have.
        expected: Digest,
    },
    /// The size matched but the SHA-256 did not.
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    HashMismatch {
        /// The digest the content was expected to have.
        expected: Digest,
        /// What the content actually hashes to.
        actual: Fingerprint,
    },
}

impl VerifyError {
    /// True for content problems (truncated, too long, corrupt) as opposed to I/O failures.
    pub fn is_mismatch(&self) -> bool {
        !matches!(self, VerifyError::Io { .. })
    }
}

/// Tracks size and hash of a copy in progress and decides the outcome.
struct Verifier {
    expected: Digest,
    hasher: Hasher,
}

impl Verifier {
    fn new(expected: Digest) -> Verifier {
        Verifier {
            expected,
            hasher: Hasher::new(),
        }
    }

    /// Accepts a chunk, refusing it if it would take the copy past the expected size.
    fn accept(&mut self, chunk: &[u8]) -> Result<(), VerifyError> {
        if self.hasher.size_bytes() + chunk.len() as u64 > self.expected.size_bytes {
            return Err(VerifyError::TooLong {
                expected: self.expected,
            });
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn io(&self, source: io::Error) -> VerifyError {
        VerifyError::Io {
            expected: self.expected,
            source,
        }
    }

    fn finish(self) -> Result<Digest, VerifyError> {
        let expected = self.expected;
        let actual = self.hasher.finish();
        if actual.size_bytes < expected.size_bytes {
            Err(VerifyError::TooShort {
                expected,
                actual_size: actual.size_bytes,
            })
        } else if actual.hash != expected.hash {
            Err(VerifyError::HashMismatch {
                expected,
                actual: actual.hash,
            })
        } else {
            Ok(actual)
        }
    }
}

/// Copies `reader` into `writer`, checking that the content matches `expected` (size and hash).
///
/// Hashing happens on the same pass as the copy. Returns the verified digest.
///
/// ```
/// use hashing::{copy_verified, Digest, VerifyError};
///
/// let data = b"some output";
/// let mut out = Vec::new();
/// copy_verified(&mut &data[..], &mut out, Digest::of_bytes(data)).unwrap();
/// assert_eq!(out, data);
///
/// let wrong = Digest::of_bytes(b"something else");
/// let err = copy_verified(&mut &data[..], &mut Vec::new(), wrong).unwrap_err();
/// assert!(err.is_mismatch());
/// ```
pub fn copy_verified<R, W>(
    reader: &mut R,
    writer: &mut W,
    expected: Digest,
) -> Result<Digest, VerifyError>
where
    R: Read + ?Sized,
    W: Write + ?Sized,
{
    let mut verifier = Verifier::new(expected);
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(verifier.io(e)),
        };
        verifier.accept(&buf[..n])?;
        writer.write_all(&buf[..n]).map_err(|e| verifier.io(e))?;
    }
    writer.flush().map_err(|e| verifier.io(e))?;
    verifier.finish()
}

/// The async twin of [`copy_verified`].
pub async fn copy_verified_async<R, W>(
    reader: &mut R,
    writer: &mut W,
    expected: Digest,
) -> Result<Digest, VerifyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut verifier = Verifier::new(expected);
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(verifier.io(e)),
        };
        verifier.accept(&buf[..n])?;
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|e| verifier.io(e))?;
    }
    writer.flush().await.map_err(|e| verifier.io(e))?;
    verifier.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<u8> {
        (0..1_000_003u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn copies_and_verifies() {
        let data = data();
        let mut out = Vec::new();
        let d = copy_verified(&mut &data[..], &mut out, Digest::of_bytes(&data)).unwrap();
        assert_eq!(d, Digest::of_bytes(&data));
        assert_eq!(out, data);
    }

    #[test]
    fn catches_truncation() {
        let data = data();
        let expected = Digest::of_bytes(&data);
        let err =
            copy_verified(&mut &data[..data.len() - 1], &mut Vec::new(), expected).unwrap_err();
        match err {
            VerifyError::TooShort { actual_size, .. } => {
                assert_eq!(actual_size, data.len() as u64 - 1)
            }
            other => panic!("expected TooShort, got {other:?}"),
        }
    }

    #[test]
    fn catches_oversize_without_writing_past_the_expected_size() {
        let data = data();
        let expected = Digest::of_bytes(&data[..1000]);
        let mut out = Vec::new();
        let err = copy_verified(&mut &data[..], &mut out, expected).unwrap_err();
        assert!(matches!(err, VerifyError::TooLong { .. }), "{err:?}");
        assert!(out.len() <= 1000, "wrote {} bytes", out.len());
        assert!(err.to_string().contains("more than 1000 bytes"), "{err}");
    }

    #[test]
    fn catches_hash_mismatch_of_same_size() {
        let data = data();
        let mut corrupt = data.clone();
        corrupt[500_000] ^= 1;
        let expected = Digest::of_bytes(&data);
        let err = copy_verified(&mut &corrupt[..], &mut Vec::new(), expected).unwrap_err();
        match &err {
            VerifyError::HashMismatch { actual, .. } => {
                assert_eq!(*actual, Digest::of_bytes(&corrupt).hash)
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
        assert!(err.is_mismatch());
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[tokio::test]
    async fn async_copy_catches_the_same_errors() {
        let data = data();
        let expected = Digest::of_bytes(&data);
        let mut out = Vec::new();
        copy_verified_async(&mut &data[..], &mut out, expected)
            .await
            .unwrap();
        assert_eq!(out, data);

        let short = copy_verified_async(&mut &data[..10], &mut Vec::new(), expected).await;
        assert!(matches!(short, Err(VerifyError::TooShort { .. })));

        let mut corrupt = data.clone();
        corrupt[0] ^= 0xff;
        let bad = copy_verified_async(&mut &corrupt[..], &mut Vec::new(), expected).await;
        assert!(matches!(bad, Err(VerifyError::HashMismatch { .. })));
    }

    #[test]
    fn io_errors_are_not_mismatches() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let err = copy_verified(&mut Broken, &mut Vec::new(), Digest::of_bytes(b"x")).unwrap_err();
        assert!(!err.is_mismatch());
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }
}
