//! Conversions between [`Digest`] and the REAPI `Digest` message.
//!
//! A digest that arrives in a message is untrusted: [`Digest::try_from`] checks that the hash is
//! 64 lowercase hex characters and that the size is not negative.
//!
//! ```
//! use reapi::build::bazel::remote::execution::v2 as remexec;
//! use hashing::Digest;
//!
//! let d = Digest::of_bytes(b"abc");
//! let msg: remexec::Digest = d.into();
//! assert_eq!(Digest::try_from(&msg).unwrap(), d);
//!
//! let bad = remexec::Digest { hash: "nope".into(), size_bytes: 3 };
//! assert!(Digest::try_from(&bad).is_err());
//! ```

use reapi::build::bazel::remote::execution::v2 as remexec;

use crate::{Digest, DigestError, Fingerprint};

/// The REAPI `Digest` message type, re-exported for convenience.
pub type DigestProto = remexec::Digest;

impl From<Digest> for remexec::Digest {
    fn from(d: Digest) -> Self {
        remexec::Digest {
            hash: d.hash.to_hex(),
            // A blob larger than i64::MAX bytes cannot exist on any real machine.
            size_bytes: i64::try_from(d.size_bytes).unwrap_or(i64::MAX),
        }
    }
}

impl From<&Digest> for remexec::Digest {
    fn from(d: &Digest) -> Self {
        (*d).into()
    }
}

impl TryFrom<&remexec::Digest> for Digest {
    type Error = DigestError;

    fn try_from(d: &remexec::Digest) -> Result<Self, Self::Error> {
        let hash = Fingerprint::from_hex(&d.hash)?;
        let size_bytes = u64::try_from(d.size_bytes).map_err(|_| DigestError::InvalidSize {
            input: d.size_bytes.to_string(),
        })?;
        Ok(Digest::new(hash, size_bytes))
    }
}

impl TryFrom<remexec::Digest> for Digest {
    type Error = DigestError;

    fn try_from(d: remexec::Digest) -> Result<Self, Self::Error> {
        Digest::try_from(&d)
    }
}

/// Converts an optional message field (REAPI digests are `optional` in proto3 terms), naming the
/// field in the error when it is absent or invalid.
pub fn require_digest(
    field: &str,
    d: Option<&remexec::Digest>,
) -> Result<Digest, RequiredDigestError> {
    let d = d.ok_or_else(|| RequiredDigestError {
        field: field.to_owned(),
        source: None,
    })?;
    Digest::try_from(d).map_err(|e| RequiredDigestError {
        field: field.to_owned(),
        source: Some(e),
    })
}

/// A required digest field was absent or invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("digest field `{field}` is {}", match source { None => "missing".to_owned(), Some(e) => format!("invalid: {e}") })]
pub struct RequiredDigestError {
    /// Name of the field, e.g. `output_files[3].digest`.
    pub field: String,
    /// Why it was invalid; `None` when it was absent.
    pub source: Option<DigestError>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EMPTY_DIGEST;

    #[test]
    fn round_trip() {
        for d in [EMPTY_DIGEST, Digest::of_bytes(b"abc")] {
            let msg = remexec::Digest::from(d);
            assert_eq!(msg.hash.len(), 64);
            assert_eq!(Digest::try_from(&msg).unwrap(), d);
        }
    }

    #[test]
    fn rejects_bad_messages() {
        let good = remexec::Digest::from(Digest::of_bytes(b"abc"));
        let negative = remexec::Digest {
            size_bytes: -1,
            ..good.clone()
        };
        assert!(matches!(
            Digest::try_from(&negative),
            Err(DigestError::InvalidSize { .. })
        ));
        let upper = remexec::Digest {
            hash: good.hash.to_uppercase(),
            ..good.clone()
        };
        assert!(matches!(
            Digest::try_from(&upper),
            Err(DigestError::InvalidFingerprint { .. })
        ));
        let empty = remexec::Digest::default();
        assert!(Digest::try_from(&empty).is_err());
    }

    #[test]
    fn required_field_errors_name_the_field() {
        let err = require_digest("output_files[2].digest", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "digest field `output_files[2].digest` is missing"
        );
        let bad = remexec::Digest {
            hash: "xyz".into(),
            size_bytes: 1,
        };
        let err = require_digest("stdout_digest", Some(&bad)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("digest field `stdout_digest` is invalid")
        );
    }
}
