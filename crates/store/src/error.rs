//! The store's error: a kind a caller can branch on, plus a trail of context added at each layer.

use std::fmt;

use hashing::Digest;

/// What went wrong, as far as a caller needs to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A blob (or a directory it depends on) is not in the store that was asked. Callers recover
    /// by fetching or re-creating it (e.g. re-running the process that produced it).
    MissingDigest(Digest),
    /// Content or metadata that came from outside is wrong: a digest mismatch, a truncated blob,
    /// an undecodable or unsafe Directory message. Never retried; the data is never committed.
    InvalidData,
    /// A local I/O or database failure.
    Io,
    /// The local disk (or the database's map) is full, or the store is on a read-only or
    /// over-quota filesystem: the cache cannot take more, and callers degrade (run without
    /// caching) rather than fail.
    StorageFull,
    /// A file the cache cannot represent: a name or a symlink target that is not UTF-8 (REAPI
    /// paths are UTF-8). Not the user's mistake, not the store's failure: what it names cannot
    /// be cached, and callers run or keep it without the cache.
    Unrepresentable,
    /// The server refused this client the operation (PERMISSION_DENIED: a read-only token,
    /// say). Never retried.
    Forbidden,
    /// A transient failure a retry may cure, with the gRPC code that said so.
    Retryable(tonic::Code),
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// A short, stable name for the kind (no digests or messages): what warnings are grouped by,
    /// so a recurring failure is recognised as one however many actions it hits.
    pub fn label(&self) -> String {
        match self {
            ErrorKind::MissingDigest(_) => "missing-digest".into(),
            ErrorKind::InvalidData => "invalid-data".into(),
            ErrorKind::Io => "io".into(),
            ErrorKind::StorageFull => "storage-full".into(),
            ErrorKind::Unrepresentable => "unrepresentable".into(),
            ErrorKind::Forbidden => "forbidden".into(),
            ErrorKind::Retryable(code) => format!("retryable-{code:?}"),
            ErrorKind::Other => "other".into(),
        }
    }
}

/// An error from the store, with context.
///
/// ```
/// use store::{ErrorKind, StoreError};
/// let d = hashing::Digest::of_bytes(b"x");
/// let e = StoreError::missing(d).context("materializing out/bin");
/// assert_eq!(e.kind(), &ErrorKind::MissingDigest(d));
/// assert!(e.to_string().starts_with("materializing out/bin: "));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    kind: ErrorKind,
    /// Outermost context first, the original message last.
    trail: Vec<String>,
}

impl StoreError {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            trail: vec![message.into()],
        }
    }

    /// `digest` is not in the store.
    pub fn missing(digest: Digest) -> StoreError {
        StoreError::new(
            ErrorKind::MissingDigest(digest),
            format!("blob {digest} is not in the store"),
        )
    }

    /// Untrusted data was wrong.
    pub fn invalid(message: impl Into<String>) -> StoreError {
        StoreError::new(ErrorKind::InvalidData, message)
    }

    /// A local I/O failure, naming what was being done.
    pub fn io(what: impl fmt::Display, source: std::io::Error) -> StoreError {
        StoreError::new(io_kind(&source), format!("{what}: {source}"))
    }

    /// Adds a layer of context (e.g. "storing out/app.jar"), shown before earlier messages.
    pub fn context(mut self, context: impl Into<String>) -> StoreError {
        self.trail.insert(0, context.into());
        self
    }

    /// The kind, for branching.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// True when a retry may succeed. Decided once, from the kind.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Retryable(_))
    }

    /// Classifies a gRPC status from `what` (e.g. "ByteStream.Read of `<digest>`").
    ///
    /// Retryable: UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNKNOWN, and
    /// DEADLINE_EXCEEDED when the call is `idempotent` (a read; a write that timed out may have
    /// half-happened on the server, so it is not retried blindly). DATA_LOSS is invalid data,
    /// PERMISSION_DENIED forbidden; everything else is `Other`. A certificate the client
    /// refused is final, with advice.
    pub fn from_status(what: &str, status: &tonic::Status, idempotent: bool) -> StoreError {
        use tonic::Code;
        // A certificate the client refuses will be refused again: final, and said plainly.
        if let Some(advice) = tls_advice(status.message()) {
            return StoreError::new(
                ErrorKind::Other,
                format!(
                    "{what} failed: the server's TLS certificate was refused ({}): {advice}",
                    status.message()
                ),
            );
        }
        let kind = match status.code() {
            Code::Unavailable
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown => ErrorKind::Retryable(status.code()),
            Code::DeadlineExceeded if idempotent => ErrorKind::Retryable(status.code()),
            Code::DataLoss => ErrorKind::InvalidData,
            Code::PermissionDenied => ErrorKind::Forbidden,
            _ => ErrorKind::Other,
        };
        StoreError::new(
            kind,
            format!("{what} failed: {:?}: {}", status.code(), status.message()),
        )
    }

    /// For a write: RESOURCE_EXHAUSTED means one of two things. A server with no room for the
    /// blob (REAPI's "insufficient disk quota"; recache serve's "the cache is full") will not
    /// have it moments later: the write is final, not retried. A busy server (a rate limit;
    /// BuildGrid's "Concurrent RPC limit exceeded!") will: that stays retryable. Told apart by
    /// what the message speaks of (full, quota, space, disk).
    ///
    /// ```
    /// let full = tonic::Status::resource_exhausted("the cache is full: retry later");
    /// let busy = tonic::Status::resource_exhausted("Concurrent RPC limit exceeded!");
    /// let e = |s| store::StoreError::from_status("ByteStream.Write", &s, true).final_when_full();
    /// assert!(!e(full).is_retryable());
    /// assert!(e(busy).is_retryable());
    /// ```
    pub fn final_when_full(mut self) -> StoreError {
        if self.kind == ErrorKind::Retryable(tonic::Code::ResourceExhausted) {
            let message = self.to_string().to_ascii_lowercase();
            if ["full", "quota", "space", "disk"]
                .iter()
                .any(|w| message.contains(w))
            {
                self.kind = ErrorKind::Other;
            }
        }
        self
    }

    /// The missing digest, if this is a missing-digest error.
    pub fn missing_digest(&self) -> Option<Digest> {
        match self.kind {
            ErrorKind::MissingDigest(d) => Some(d),
            _ => None,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.trail.join(": "))
    }
}

impl std::error::Error for StoreError {}

impl From<hashing::VerifyError> for StoreError {
    fn from(e: hashing::VerifyError) -> Self {
        let kind = if e.is_mismatch() {
            ErrorKind::InvalidData
        } else {
            ErrorKind::Io
        };
        StoreError::new(kind, e.to_string())
    }
}

/// Adds context to a `Result`'s error.
pub trait ResultExt<T> {
    /// Like [`StoreError::context`], computed lazily.
    fn context_with(self, f: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> ResultExt<T> for Result<T, StoreError> {
    fn context_with(self, f: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|e| e.context(f()))
    }
}

/// What to do about a certificate rustls refused (the message of the transport error), or
/// `None` when the message is not about a refused certificate.
fn tls_advice(message: &str) -> Option<&'static str> {
    if !message.contains("invalid peer certificate") {
        return None;
    }
    const RECIPE: &str = "see the TLS section of the README for the openssl commands";
    Some(if message.contains("CaUsedAsEndEntity") {
        "the server presents a CA certificate (a self-signed one, as `openssl req -x509` makes) \
         as its own, which is refused: create a small CA, sign a server certificate with it, \
         give the server that certificate and key (--tls-cert/--tls-key) and clients the CA \
         (--tls-ca-cert); see the TLS section of the README for the openssl commands"
    } else if message.contains("UnknownIssuer") {
        "it is not signed by a CA this client trusts: pass the CA that signed it with \
         --tls-ca-cert; see the TLS section of the README for the openssl commands"
    } else if message.contains("NotValidForName") {
        "it does not name the host in --remote: put that name (or IP address) in the \
         certificate's subjectAltName; see the TLS section of the README for the openssl commands"
    } else if message.contains("Expired") || message.contains("NotValidYet") {
        "it is outside its validity period (check the server's certificate dates and this \
         machine's clock)"
    } else {
        RECIPE
    })
}

/// `StorageFull` for the I/O errors that mean "no room to store" (ENOSPC, EDQUOT, EROFS),
/// `Io` for the rest.
pub(crate) fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::StorageFull
        | std::io::ErrorKind::QuotaExceeded
        | std::io::ErrorKind::ReadOnlyFilesystem => ErrorKind::StorageFull,
        _ => ErrorKind::Io,
    }
}
