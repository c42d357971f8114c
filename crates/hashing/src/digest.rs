use std::fmt;
use std::str::FromStr;

/// Length in bytes of a SHA-256 fingerprint.
pub const FINGERPRINT_SIZE: usize = 32;

/// The SHA-256 of a blob: 32 raw bytes, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; FINGERPRINT_SIZE]);

/// SHA-256 of the empty input.
pub const EMPTY_FINGERPRINT: Fingerprint = Fingerprint([
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
]);

/// Digest of the empty blob. Servers and clients may assume every CAS holds it.
pub const EMPTY_DIGEST: Digest = Digest {
    hash: EMPTY_FINGERPRINT,
    size_bytes: 0,
};

/// Why a fingerprint or digest given to us (by a user, a file or a server) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The text is not 64 lowercase hexadecimal characters.
    #[error("invalid SHA-256 fingerprint {input:?}: {reason}")]
    InvalidFingerprint {
        /// The offending text, cut to a readable length.
        input: String,
        /// What exactly is wrong with it.
        reason: String,
    },
    /// A digest's size was negative or not a number.
    #[error("invalid digest size {input:?}: expected a non-negative whole number of bytes")]
    InvalidSize {
        /// The offending size as it was given.
        input: String,
    },
    /// A `hash/size` string did not have exactly one `/`.
    #[error("invalid digest {input:?}: expected `<64 hex chars>/<size in bytes>`")]
    InvalidFormat {
        /// The offending text, cut to a readable length.
        input: String,
    },
}

fn shorten(input: &str) -> String {
    const MAX: usize = 80;
    if input.len() <= MAX {
        input.to_owned()
    } else {
        let mut end = MAX;
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &input[..end])
    }
}

impl Fingerprint {
    /// Parses exactly 64 lowercase hex characters, the form REAPI mandates.
    ///
    /// ```
    /// use hashing::{Fingerprint, EMPTY_FINGERPRINT};
    /// let fp = Fingerprint::from_hex(
    ///     "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855").unwrap();
    /// assert_eq!(fp, EMPTY_FINGERPRINT);
    /// assert!(Fingerprint::from_hex("E3B0").is_err());
    /// ```
    pub fn from_hex(input: &str) -> Result<Fingerprint, DigestError> {
        // Fast path: one pass over exactly 64 lowercase hex digits (every digest from a server
        // goes through here, several per cache hit).
        let bytes = input.as_bytes();
        if bytes.len() == FINGERPRINT_SIZE * 2 {
            let mut out = [0u8; FINGERPRINT_SIZE];
            let mut ok = true;
            for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                match (nibble(pair[0]), nibble(pair[1])) {
                    (Some(hi), Some(lo)) => *o = (hi << 4) | lo,
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                return Ok(Fingerprint(out));
            }
        }
        Err(Self::explain_bad_hex(input))
    }

    /// The slow path: says exactly what is wrong with `input`.
    fn explain_bad_hex(input: &str) -> DigestError {
        let err = |reason: String| DigestError::InvalidFingerprint {
            input: shorten(input),
            reason,
        };
        if input.len() != FINGERPRINT_SIZE * 2 {
            return err(format!(
                "expected {} hex characters, got {}",
                FINGERPRINT_SIZE * 2,
                input.chars().count()
            ));
        }
        match input
            .char_indices()
            .find(|&(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            Some((pos, c)) if c.is_ascii_hexdigit() => err(format!(
                "uppercase {c:?} at position {pos}; digests are lowercase hex"
            )),
            Some((pos, c)) => err(format!("{c:?} at position {pos} is not a hex digit")),
            None => err("not hex".to_owned()),
        }
    }

    /// The 64 lowercase hex characters of this fingerprint.
    pub fn to_hex(&self) -> String {
        let mut buf = [0u8; FINGERPRINT_SIZE * 2];
        self.write_hex(&mut buf);
        // Only ASCII hex digits were written, so this never falls back.
        std::str::from_utf8(&buf)
            .map(str::to_owned)
            .unwrap_or_default()
    }

    fn write_hex(&self, buf: &mut [u8; FINGERPRINT_SIZE * 2]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (pair, b) in buf.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[(b >> 4) as usize];
            pair[1] = DIGITS[(b & 0xf) as usize];
        }
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; FINGERPRINT_SIZE] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; FINGERPRINT_SIZE * 2];
        self.write_hex(&mut buf);
        // Only ASCII hex digits were written.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// The value of a lowercase hex digit.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint<{self}>")
    }
}

impl FromStr for Fingerprint {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fingerprint::from_hex(s)
    }
}

/// A blob's identity: its SHA-256 fingerprint and its length in bytes.
///
/// Displays (and parses) as `hash/size`, the form REAPI resource names use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// SHA-256 of the content.
    pub hash: Fingerprint,
    /// Length of the content in bytes.
    pub size_bytes: u64,
}

impl Digest {
    /// A digest from its parts. Nothing is checked: use this for values you computed.
    pub const fn new(hash: Fingerprint, size_bytes: u64) -> Digest {
        Digest { hash, size_bytes }
    }

    /// Hashes `bytes` in one go.
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        let mut hasher = crate::Hasher::new();
        hasher.update(bytes);
        hasher.finish()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash, self.size_bytes)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest<{self}>")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Parses `hash/size`, e.g. `e3b0…b855/0`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hash, size) = s
            .split_once('/')
            .ok_or_else(|| DigestError::InvalidFormat { input: shorten(s) })?;
        if size.contains('/') {
            return Err(DigestError::InvalidFormat { input: shorten(s) });
        }
        let size_bytes = size.parse::<u64>().map_err(|_| DigestError::InvalidSize {
            input: shorten(size),
        })?;
        Ok(Digest::new(Fingerprint::from_hex(hash)?, size_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_constants_match_the_hash_of_nothing() {
        assert_eq!(Digest::of_bytes(b""), EMPTY_DIGEST);
        assert_eq!(
            EMPTY_FINGERPRINT.to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of_bytes(b"abc");
        assert_eq!(Fingerprint::from_hex(&d.hash.to_hex()).unwrap(), d.hash);
        assert_eq!(d.hash.to_string(), d.hash.to_hex());
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn hex_errors_name_the_problem() {
        let short = Fingerprint::from_hex("abc").unwrap_err().to_string();
        assert!(
            short.contains("expected 64 hex characters, got 3"),
            "{short}"
        );

        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        let msg = Fingerprint::from_hex(upper).unwrap_err().to_string();
        assert!(msg.contains("uppercase 'E' at position 0"), "{msg}");

        let mut bad = EMPTY_FINGERPRINT.to_hex();
        bad.replace_range(10..11, "g");
        let msg = Fingerprint::from_hex(&bad).unwrap_err().to_string();
        assert!(
            msg.contains("'g' at position 10 is not a hex digit"),
            "{msg}"
        );

        // Multi-byte characters must not panic on slicing or shortening.
        let weird = "é".repeat(32);
        assert!(Fingerprint::from_hex(&weird).is_err());
        assert!(Fingerprint::from_hex(&"é".repeat(100)).is_err());
    }

    #[test]
    fn digest_parse_errors() {
        let h = EMPTY_FINGERPRINT.to_hex();
        assert!(matches!(
            h.parse::<Digest>(),
            Err(DigestError::InvalidFormat { .. })
        ));
        assert!(matches!(
            format!("{h}/-1").parse::<Digest>(),
            Err(DigestError::InvalidSize { .. })
        ));
        assert!(matches!(
            format!("{h}/1/2").parse::<Digest>(),
            Err(DigestError::InvalidFormat { .. })
        ));
        assert_eq!(format!("{h}/0").parse::<Digest>().unwrap(), EMPTY_DIGEST);
    }
}
