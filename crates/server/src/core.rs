//! The protocol-neutral core of `recache serve`: every rule a request meets, whichever
//! protocol it came by. The front ends ([`crate::grpc`], [`crate::http`]) only translate: a
//! request into a call here, the answer (a blob, a stream of its bytes, a missing digest, a
//! [`Refusal`]) into their protocol's terms. A rule is written once, here:
//!
//! - the instance allow-list and the digest function;
//! - size limits (`--max-blob-size`) and reservations (`--max-size`), checked before a byte is
//!   taken;
//! - verification before visibility: an upload is hashed as it streams to the pool and
//!   committed only when it matches its digest;
//! - ActionResult validation (every digest parses, every path is one the REAPI spec allows,
//!   every blob it names is stored) and the dangling-entry rule (an entry whose outputs are
//!   gone is a miss, and is dropped);
//! - reads from the compressed pool, ranges decoding only the frames they touch, and a damaged
//!   stored blob answered as data loss and evicted;
//! - the S3 tier behind the store (fetch on miss, stream-through, admission of uploads).

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hashing::{Digest, EMPTY_DIGEST, Fingerprint};
use prost::Message;
use reapi::build::bazel::remote::execution::v2::{self as remexec, digest_function};
use store::{ErrorKind, StoreError};
use tokio::io::AsyncReadExt;

use crate::uploads::Piece;
use crate::{Inner, READ_CHUNK_BYTES};

/// How a lookup's NOT_FOUND says an entry was dropped because an output it names was evicted
/// (the status page tells this miss apart from an action never recorded).
pub(crate) const OUTPUTS_GONE: &str = "names outputs this cache no longer has";

/// Why the core refused or failed a request, in the server's own terms. Each front end maps
/// the kind to its protocol's code ([`Refusal::grpc_code`], [`Refusal::http_status`]) and
/// passes the message on: it names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub why: Why,
    pub message: String,
}

/// What kind of refusal (see [`Refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// The request is malformed: a bad digest or name, an unsafe path, content that is not
    /// what its digest says, an instance not served here.
    Invalid,
    /// The request is well formed but names something that is not here (an ActionResult whose
    /// outputs were not uploaded).
    Precondition,
    /// What was asked for is not here (a miss).
    NotFound,
    /// Larger than `--max-blob-size`.
    TooLarge,
    /// No room: the store cannot take it now.
    Full,
    /// No or wrong credentials.
    Unauthenticated,
    /// The credentials do not allow it.
    Forbidden,
    /// A stored blob is damaged (it was evicted).
    DataLoss,
    /// A range outside the blob.
    OutOfRange,
    /// A dependency (the S3 bucket) is not answering; retry.
    Unavailable,
    /// Not offered by this server.
    Unimplemented,
    /// The server's own failure.
    Internal,
}

impl Refusal {
    pub fn new(why: Why, message: impl Into<String>) -> Refusal {
        Refusal {
            why,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(Why::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> Refusal {
        Refusal::new(Why::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Refusal {
        Refusal::new(Why::Internal, message)
    }

    /// The gRPC code for it.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self.why {
            Why::Invalid => Code::InvalidArgument,
            Why::Precondition => Code::FailedPrecondition,
            Why::NotFound => Code::NotFound,
            Why::TooLarge | Why::Full => Code::ResourceExhausted,
            Why::Unauthenticated => Code::Unauthenticated,
            Why::Forbidden => Code::PermissionDenied,
            Why::DataLoss => Code::DataLoss,
            Why::OutOfRange => Code::OutOfRange,
            Why::Unavailable => Code::Unavailable,
            Why::Unimplemented => Code::Unimplemented,
            Why::Internal => Code::Internal,
        }
    }

    /// The HTTP status for it.
    pub fn http_status(&self) -> u16 {
        match self.why {
            Why::Invalid | Why::Precondition => 400,
            Why::Unauthenticated => 401,
            Why::Forbidden => 403,
            Why::NotFound => 404,
            Why::TooLarge => 413,
            Why::OutOfRange => 416,
            Why::Unimplemented => 501,
            Why::Unavailable => 503,
            Why::Full => 507,
            Why::DataLoss | Why::Internal => 500,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        tonic::Status::new(r.grpc_code(), r.message)
    }
}

/// The S3 tier and Remote Asset still speak in gRPC statuses; they meet the core here.
impl From<tonic::Status> for Refusal {
    fn from(s: tonic::Status) -> Refusal {
        use tonic::Code;
        let why = match s.code() {
            Code::InvalidArgument => Why::Invalid,
            Code::FailedPrecondition => Why::Precondition,
            Code::NotFound => Why::NotFound,
            Code::ResourceExhausted => Why::Full,
            Code::Unauthenticated => Why::Unauthenticated,
            Code::PermissionDenied => Why::Forbidden,
            Code::DataLoss => Why::DataLoss,
            Code::OutOfRange => Why::OutOfRange,
            Code::Unavailable => Why::Unavailable,
            Code::Unimplemented => Why::Unimplemented,
            _ => Why::Internal,
        };
        Refusal::new(why, s.message())
    }
}

/// A store failure: the server's own trouble is internal (or no room when the disk is full),
/// never a panic.
pub(crate) fn store_refusal(what: &str, e: &StoreError) -> Refusal {
    match e.kind() {
        ErrorKind::StorageFull => Refusal::new(Why::Full, format!("{what}: {e}")),
        ErrorKind::InvalidData => Refusal::invalid(format!("{what}: {e}")),
        ErrorKind::MissingDigest(d) => Refusal::not_found(format!("{what}: blob {d} not found")),
        _ => Refusal::internal(format!("{what}: {e}")),
    }
}

/// A read of `d` that failed. A stored blob that is not what its digest says (the wrong size,
/// a seek table or frame that does not decode to it, bytes that do not hash to it) is data
/// loss, never a success, and is evicted on the spot so the next upload of it replaces it; any
/// other failure as [`store_refusal`].
pub(crate) fn read_failed(store: &store::LocalStore, d: Digest, e: &StoreError) -> Refusal {
    if matches!(e.kind(), ErrorKind::InvalidData) {
        tracing::error!(digest = %d, error = %e, "a stored blob is damaged; evicting it");
        if let Err(e) = store.remove(&[d]) {
            tracing::warn!(digest = %d, error = %e, "could not evict a damaged blob");
        }
        return Refusal::new(
            Why::DataLoss,
            format!(
                "the stored copy of blob {d} is damaged and was evicted (upload it again): {e}"
            ),
        );
    }
    store_refusal("reading", e)
}

/// What a caller may do. Ordered: each role can do what the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// CAS, ActionCache and ByteStream reads, FindMissingBlobs, GetTree, and Remote Asset
    /// fetches of assets already recorded.
    Read,
    /// Read, plus CAS and ActionCache writes, Remote Asset pushes and origin downloads.
    Write,
    /// Write, plus deleting.
    Admin,
}

impl Role {
    /// The role's name, as a tokens file and messages spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (read, write or admin)")),
        }
    }
}

/// Who a request comes from, once authenticated: a name (the token's, or `anonymous`) and
/// its role. Front ends put it in the request's extensions, for handlers that decide more
/// (a Remote Asset fetch that must download needs `write`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name the tokens file gives (or `anonymous`).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// The auth rule. Without any token or certificate role configured, every caller may do
/// everything (an open cache; with `--tls-client-ca`, every caller the CA admits). Otherwise a
/// caller presents a token (how depends on the protocol: a bearer token, or the password of
/// HTTP Basic credentials) and gets its role; a caller presenting none gets the role of its
/// client certificate's first name a [`crate::CertificateRole`] lists (`certificate_names`:
/// the leaf's common names and subjectAltNames, see `mtls`), else the anonymous role
/// (`--anonymous`, none by default); a wrong token gets nothing.
pub(crate) fn authenticate(
    options: &crate::ServerOptions,
    presented: Option<&[u8]>,
    certificate_names: &[String],
) -> Result<Identity, Refusal> {
    let tokens = &options.tokens;
    if tokens.is_empty() && options.certificate_roles.is_empty() {
        return Ok(Identity {
            name: "anonymous".into(),
            role: Role::Admin,
        });
    }
    if let Some(p) = presented {
        // Every token is compared (in constant time), so the answer's timing says nothing
        // about which one came close.
        let mut found = None;
        for t in tokens {
            if constant_time_eq(p, t.token.as_bytes()) {
                found = Some(t);
            }
        }
        return found
            .map(|t| Identity {
                name: t.name.clone(),
                role: t.role,
            })
            .ok_or_else(|| Refusal::new(Why::Unauthenticated, "wrong credentials"));
    }
    let by_certificate = certificate_names
        .iter()
        .find_map(|n| options.certificate_roles.iter().find(|c| c.subject == *n));
    if let Some(c) = by_certificate {
        return Ok(Identity {
            name: c.name.clone(),
            role: c.role,
        });
    }
    match options.anonymous {
        Some(role) => Ok(Identity {
            name: "anonymous".into(),
            role,
        }),
        None if !certificate_names.is_empty() => Err(Refusal::new(
            Why::Unauthenticated,
            format!(
                "no role for this client certificate (names {certificate_names:?}): give one a \
                 `cert:NAME ROLE` line in the tokens file"
            ),
        )),
        None => Err(Refusal::new(
            Why::Unauthenticated,
            "this cache needs credentials: `authorization: Bearer <token>` (over HTTP also \
             the token as the password: http://user:TOKEN@host/)",
        )),
    }
}

/// Refuses `who` what needs `needed` (naming the role it needs).
pub(crate) fn authorize(who: &Identity, needed: Role, what: &str) -> Result<(), Refusal> {
    if who.role >= needed {
        Ok(())
    } else {
        Err(Refusal::new(
            Why::Forbidden,
            format!(
                "{what} needs the {} role; {} has {}",
                needed.name(),
                who.name,
                who.role.name()
            ),
        ))
    }
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A digest field of a request: it must be there and parse.
pub(crate) fn digest(field: &str, d: Option<&remexec::Digest>) -> Result<Digest, Refusal> {
    hashing::reapi::require_digest(field, d).map_err(|e| Refusal::invalid(e.to_string()))
}

/// The key an ActionCache entry is kept under: the action's hash alone. gRPC names an action
/// by hash and size, HTTP (`/ac/<sha256>`) by hash only; both reach the same entry.
pub(crate) fn ac_key(action: Fingerprint) -> Digest {
    Digest::new(action, 0)
}

/// An upload of a blob of unknown size in progress ([`Core::start_unsized_upload`]): the
/// front end sends its bytes (then [`Piece::End`]) on `tx`.
pub(crate) struct UnsizedUpload {
    pub tx: tokio::sync::mpsc::Sender<Piece>,
    writer: tokio::task::JoinHandle<Result<Digest, StoreError>>,
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

/// A stream of a blob's bytes (or of its stored zstd frames), a chunk at a time.
pub(crate) type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, Refusal>> + Send>>;

/// The core: the server's state and every rule (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Core(pub Arc<Inner>);

impl Core {
    pub fn store(&self) -> &store::LocalStore {
        &self.0.store
    }

    /// Refuses instance names outside the `--instance-name` allow-list (empty: any).
    pub fn check_instance(&self, name: &str) -> Result<(), Refusal> {
        self.0.check_instance(name)
    }

    /// Only SHA-256 is spoken; unset (0) means the default, SHA-256.
    pub fn check_digest_function(&self, f: i32) -> Result<(), Refusal> {
        if f == 0 || f == digest_function::Value::Sha256 as i32 {
            Ok(())
        } else {
            Err(Refusal::invalid(format!(
                "digest_function {f} is not supported: this cache speaks SHA-256 only"
            )))
        }
    }

    /// `--max-blob-size`, checked before a byte of the blob is taken.
    pub fn check_size(&self, d: Digest) -> Result<(), Refusal> {
        let max = self.0.options.max_blob_size;
        if d.size_bytes > max {
            Err(Refusal::new(
                Why::TooLarge,
                format!("blob {d} is larger than this cache accepts ({max} bytes)"),
            ))
        } else {
            Ok(())
        }
    }

    /// With an S3 tier: makes sure the store holds `d`, fetching it from the bucket if need
    /// be (a blob neither has stays missing; the caller's own lookup says so).
    pub async fn ensure_local(&self, d: Digest) -> Result<(), Refusal> {
        if let Some(t) = &self.0.tier {
            t.fetch(&self.0, d).await?;
        }
        Ok(())
    }

    /// [`ensure_local`](Self::ensure_local) for every one of `digests` the store lacks, 16 at
    /// a time; the first failure is returned.
    pub async fn ensure_all_local(&self, digests: &[Digest]) -> Result<(), Refusal> {
        if self.0.tier.is_none() {
            return Ok(());
        }
        let absent = self.store().missing(digests.iter().copied());
        let fetched: Vec<Result<(), Refusal>> = futures::stream::iter(absent)
            .map(|d| self.ensure_local(d))
            .buffer_unordered(16)
            .collect()
            .await;
        fetched.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }

    /// With an S3 tier: a place in the upload queue for `d`, taken before it is stored (none
    /// for a blob the store already holds: it was queued when it arrived).
    pub async fn admit(&self, d: Digest) -> Result<Option<crate::tier::Admission>, Refusal> {
        match &self.0.tier {
            Some(t) if d != EMPTY_DIGEST && !self.store().contains(d) => {
                Ok(Some(t.admit(d).await?))
            }
            _ => Ok(None),
        }
    }

    /// Which of `digests` this cache does not have (store, then the S3 tier).
    pub async fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        match &self.0.tier {
            Some(t) => t.missing(digests).await,
            None => self.store().missing(digests.iter().copied()),
        }
    }

    /// Which of `digests` this cache does not have; those it has count as used (a blob
    /// reported present is one the client counts on: it will reference it instead of
    /// uploading it), for LRU and for the bucket's retention.
    pub async fn find_missing(&self, digests: Vec<Digest>) -> Vec<Digest> {
        let missing = self.missing(&digests).await;
        let m = &self.0.metrics;
        m.find_missing_asked
            .fetch_add(digests.len() as u64, Ordering::Relaxed);
        m.find_missing_missing
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        let gone: HashSet<Digest> = missing.iter().copied().collect();
        let present: Vec<Digest> = digests.into_iter().filter(|d| !gone.contains(d)).collect();
        if let Some(t) = &self.0.tier {
            t.used(crate::tier::Kind::Blob, present.iter().copied());
        }
        self.store().touch_all(present);
        missing
    }

    /// The stored blob of `hash`, whatever its size (HTTP names blobs by hash alone); `None`
    /// when the store has none (a blob only the S3 tier holds needs its size: not found).
    pub fn find_by_hash(&self, hash: Fingerprint) -> Option<Digest> {
        if hash == EMPTY_DIGEST.hash {
            return Some(EMPTY_DIGEST);
        }
        self.store().find_by_hash(hash)
    }

    /// Whether `d` is stored already; if so, a write of it ends at once and counts as a use
    /// (paused uploads of it are abandoned).
    pub fn already_stored(&self, d: Digest) -> bool {
        if self.store().contains(d) {
            self.0.paused.abandon_digest(d);
            self.store().touch_all([d]);
            true
        } else {
            false
        }
    }

    /// Verifies `data` against `d` and stores it (a batch upload's blob, already decoded). A
    /// blob already stored is not reserved for again (which could evict an unrelated blob to
    /// make room for nothing): re-sending it is a use of it, as a streamed write of it is.
    pub async fn put_blob(&self, d: Digest, data: &[u8]) -> Result<(), Refusal> {
        self.check_size(d)?;
        let _admission = self.admit(d).await?;
        if data.len() as u64 != d.size_bytes || Digest::of_bytes(data) != d {
            return Err(Refusal::invalid(format!(
                "content does not match digest {d}"
            )));
        }
        if self.store().contains(d) {
            self.store().touch_all([d]);
            return Ok(());
        }
        let _room = self.0.reserve(d)?;
        let mut stored = self.store().store_verified(d, &mut &data[..]);
        if matches!(&stored, Err(e) if *e.kind() == ErrorKind::StorageFull) {
            // The disk filled faster than the reserve foresaw (other files on it): evict once
            // and try again.
            self.0.evict_for_disk(d.size_bytes.saturating_mul(2));
            stored = self.store().store_verified(d, &mut &data[..]);
        }
        stored.map_err(|e| store_refusal("storing", &e))
    }

    /// A small blob's bytes for a batch read (`None`: not here). The size is checked on the way
    /// out; the bytes are not hashed again (SHA-256 of a full 4 MiB batch is ≈ 3 ms here, as
    /// much as the rest of the call).
    pub fn read_small(&self, d: Digest) -> Result<Option<Bytes>, Refusal> {
        let loaded = self.store().load_bytes(d).and_then(|b| match b {
            Some(b) if b.len() as u64 != d.size_bytes => Err(StoreError::invalid(format!(
                "{} bytes are stored for it",
                b.len()
            ))),
            other => Ok(other),
        });
        loaded.map_err(|e| read_failed(self.store(), d, &e))
    }

    /// A Directory message of a tree being walked (fetched from the S3 tier if need be).
    pub async fn directory(&self, d: Digest) -> Result<remexec::Directory, Refusal> {
        self.ensure_local(d).await?;
        self.store()
            .load_directory(d)
            .map_err(|e| store_refusal(&format!("directory {d}"), &e))
    }
}

/// Health: whether this server can serve (see [`Readiness`]).
impl Core {
    /// Whether the server can serve now: the storage takes a write (a probe file written,
    /// fsynced and removed; the answer is kept for [`READINESS_TTL`] so probes cannot turn
    /// into an fsync storm). The S3 bucket's state is reported, not required: while the bucket
    /// fails, the server serves from its fast tier and journals uploads for later.
    pub fn readiness(&self) -> Readiness {
        let mut cached = self.0.readiness.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, r)) = cached.as_ref()
            && at.elapsed() < READINESS_TTL
        {
            return r.clone();
        }
        let storage = probe_write(&self.0.options.storage);
        let disk_free = crate::disk_space(&self.0.options.storage).map(|(free, _)| free);
        let s3 = self.0.tier.as_ref().map(|t| t.bucket_state());
        let r = Readiness {
            storage,
            disk_free,
            s3,
        };
        *cached = Some((std::time::Instant::now(), r.clone()));
        r
    }
}

/// How long a readiness answer is reused.
pub(crate) const READINESS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// What [`Core::readiness`] found.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    /// The storage took a write, or why not.
    pub storage: Result<(), String>,
    /// Bytes free on the storage's filesystem.
    pub disk_free: Option<u64>,
    /// The S3 bucket's state, with a tier.
    pub s3: Option<String>,
}

impl Readiness {
    /// Ready to serve: the storage takes writes.
    pub fn ready(&self) -> bool {
        self.storage.is_ok()
    }

    /// A few lines a person reads (the `/readyz` body).
    pub fn describe(&self) -> String {
        let mut out = match &self.storage {
            Ok(()) => "storage: writable\n".to_owned(),
            Err(e) => format!("storage: NOT writable: {e}\n"),
        };
        if let Some(free) = self.disk_free {
            out += &format!("disk free: {free} bytes\n");
        }
        if let Some(s3) = &self.s3 {
            out += &format!("s3: {s3}\n");
        }
        out
    }
}

/// Writes, fsyncs and removes a probe file in `dir`.
fn probe_write(dir: &std::path::Path) -> Result<(), String> {
    use std::io::Write as _;
    let path = dir.join(format!(".ready-probe-{}", std::process::id()));
    let written = std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(b"ok").and_then(|()| f.sync_all()));
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Metrics.
impl Core {
    /// `GET /metrics`: every counter, and the gauges read now.
    pub fn metrics_text(&self) -> String {
        let usage = self.store().usage();
        let (evicted_blobs, evicted_bytes) = self.store().evictions();
        let s3 = self.0.tier.as_ref().map(|t| crate::metrics::S3Gauges {
            queue: t.pending() as u64,
            journal_rows: self.store().journal_len().unwrap_or(0),
            upload_failures: t.upload_failures(),
            cooldowns: t.cooldowns(),
        });
        self.0.metrics.render(&crate::metrics::Gauges {
            stored_bytes: usage.total_bytes(),
            stored_blobs: usage.total_blobs(),
            max_bytes: self.0.options.max_size,
            evicted_blobs,
            evicted_bytes,
            paused_uploads: self.0.paused.len(),
            s3,
        })
    }

    /// Counts `n` blob bytes on the wire.
    pub fn count_bytes(&self, protocol: &'static str, direction: &'static str, zstd: bool, n: u64) {
        self.0.metrics.bytes(protocol, direction, zstd, n);
    }

    /// Counts one request of a front end.
    pub fn count_request(
        &self,
        protocol: &'static str,
        method: &'static str,
        code: &str,
        took: std::time::Duration,
    ) {
        self.0.metrics.request(protocol, method, code, took);
    }
}

/// Writes.
impl Core {
    /// Admits `d`, reserves room for it and starts its writer on a blocking thread: it hashes,
    /// compresses or keeps plain, fsyncs, and commits only when the digest verifies, while the
    /// front end keeps receiving (the two overlap instead of taking turns). The 2-message
    /// channel is the back-pressure; a channel closed without [`Piece::End`] leaves nothing
    /// visible. `compressed`: the bytes arrive as a zstd stream, decoded on the way (the size
    /// limit applies to the decoded bytes: the writer takes no more than `d.size_bytes`).
    pub async fn start_upload(
        &self,
        d: Digest,
        compressed: bool,
    ) -> Result<crate::uploads::Upload, Refusal> {
        self.check_size(d)?;
        let admission = self.admit(d).await?;
        let room = self.0.reserve(d)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(2);
        let refused = Arc::new(std::sync::Mutex::new(None::<String>));
        let store = self.store().clone();
        let why = refused.clone();
        // With an S3 tier, a large blob's parts start up to the bucket as they arrive.
        let tee = self.0.tier.as_ref().and_then(|t| t.tee(d));
        let writer = tokio::task::spawn_blocking(move || {
            let input = ChannelReader {
                rx,
                current: Bytes::new(),
                pos: 0,
                ended: false,
            };
            let store_from = |mut blob: Box<dyn std::io::Read>| match tee {
                Some(tee) => {
                    let mut reader = crate::tier::TeeReader { inner: blob, tee };
                    let stored = store.store_verified(d, &mut reader);
                    // The parts copied out on the way may complete an object only if this
                    // attempt's blob verified.
                    reader.tee.settle(stored.is_ok());
                    stored
                }
                None => store.store_verified(d, &mut blob),
            };
            store_from(input.decoded(compressed, why)?)
        });
        Ok(crate::uploads::Upload {
            digest: d,
            received: 0,
            tx,
            writer,
            refused,
            _room: room,
            admission,
            _in_flight: self.0.metrics.upload(),
        })
    }

    /// Starts the writer of a blob whose size is not known in advance (an HTTP PUT with a
    /// chunked or zstd body): it takes at most `--max-blob-size` decoded bytes and commits
    /// them only if they hash to `expect`; with `expect` `None` (an opaque value, named by a
    /// key of the client's), whatever arrives is stored under its own digest. No room is
    /// reserved (the size is unknown): the store's bound is enforced as it grows.
    pub fn start_unsized_upload(
        &self,
        expect: Option<Fingerprint>,
        compressed: bool,
    ) -> Result<UnsizedUpload, Refusal> {
        // Its size is unknown: at least the disk's reserve must be free when it starts.
        self.0.make_disk_room(0)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(2);
        let refused = Arc::new(std::sync::Mutex::new(None::<String>));
        let store = self.store().clone();
        let why = refused.clone();
        let limit = self.0.options.max_blob_size;
        let writer = tokio::task::spawn_blocking(move || {
            let input = ChannelReader {
                rx,
                current: Bytes::new(),
                pos: 0,
                ended: false,
            };
            let mut blob = input.decoded(compressed, why)?;
            match expect {
                Some(hash) => store.store_stream_hashed(&mut blob, limit, hash),
                None => store.store_stream(&mut blob, limit),
            }
        });
        Ok(UnsizedUpload {
            tx,
            writer,
            refused,
        })
    }

    /// Waits for an unsized upload's writer (its input complete): the digest stored, or why
    /// nothing was. With an S3 tier the blob is queued for the bucket.
    pub async fn finish_unsized_upload(&self, upload: UnsizedUpload) -> Result<Digest, Refusal> {
        let UnsizedUpload {
            tx,
            writer,
            refused,
        } = upload;
        drop(tx);
        let d = writer_outcome(writer, &refused).await?;
        if let Some(t) = &self.0.tier {
            t.adopt(d);
        }
        Ok(d)
    }

    /// Waits for an upload's writer once its input is complete (the sender dropped after
    /// [`Piece::End`]): stored, or why not. Wrong content (a digest mismatch, too short, too
    /// long, undecodable zstd) is the client's; anything else (a full disk, an I/O error) the
    /// server's.
    pub async fn finish_upload(&self, upload: crate::uploads::Upload) -> Result<(), Refusal> {
        let crate::uploads::Upload {
            tx,
            writer,
            refused,
            _room,
            admission: _admission,
            ..
        } = upload;
        drop(tx);
        writer_outcome(writer, &refused).await
    }
}

/// What an upload's writer thread came to. Wrong content (a digest mismatch, too short, too
/// long, undecodable zstd) is the client's; anything else (a full disk, an I/O error) the
/// server's.
async fn writer_outcome<T>(
    writer: tokio::task::JoinHandle<Result<T, StoreError>>,
    refused: &std::sync::Mutex<Option<String>>,
) -> Result<T, Refusal> {
    let stored = writer
        .await
        .map_err(|e| Refusal::internal(format!("upload task: {e}")))?;
    if let Some(why) = refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(Refusal::invalid(format!(
            "upload refused, nothing stored: {why}"
        )));
    }
    stored.map_err(|e| match e.kind() {
        ErrorKind::InvalidData => Refusal::invalid(format!("upload refused, nothing stored: {e}")),
        _ => store_refusal("storing the upload", &e),
    })
}

/// Reads.
impl Core {
    /// The bytes `offset..end` of blob `d` as a stream (with `compressed`, a zstd stream of the
    /// whole blob: the stored frames as they are when the pool has them, else each chunk its
    /// own frame). A blob only the S3 tier holds is streamed through from the bucket. The
    /// caller has checked the range (`offset <= end <= d.size_bytes`).
    pub async fn read(
        &self,
        d: Digest,
        offset: u64,
        end: u64,
        compressed: bool,
    ) -> Result<BlobStream, Refusal> {
        if let Some(t) = &self.0.tier
            && !self.store().contains(d)
        {
            // A whole large blob only the bucket has: stream it to the client while it fills
            // the fast tier, instead of fetching it all before the first byte goes out.
            let whole = offset == 0 && end == d.size_bytes && !compressed;
            let to_client = |rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, tonic::Status>>| {
                t.used(crate::tier::Kind::Blob, [d]);
                let stream = futures::stream::poll_fn({
                    let mut rx = rx;
                    move |cx| rx.poll_recv(cx)
                })
                .map(|item| item.map(Bytes::from).map_err(Refusal::from));
                Ok(Box::pin(stream) as BlobStream)
            };
            if whole
                && !self.store().is_small(d.size_bytes)
                && let Some(rx) = t.stream_through(&self.0, d).await?
            {
                return to_client(rx);
            }
            match t.fetch(&self.0, d).await {
                Ok(_) => {}
                // The fast tier cannot make room for it: straight from the bucket, not kept.
                Err(e) if e.code() == tonic::Code::ResourceExhausted && !compressed => {
                    return to_client(t.pass_through(d, offset, end).await?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.store().is_small(d.size_bytes) {
            // A small blob lives in the database: read at once (microseconds), one chunk, no
            // blocking task.
            let bytes = self
                .read_small(d)?
                .ok_or_else(|| Refusal::not_found(format!("blob {d} not found")))?;
            if let Some(t) = &self.0.tier {
                t.used(crate::tier::Kind::Blob, [d]);
            }
            let part = bytes.slice(offset as usize..end as usize);
            let chunk = if compressed {
                zstd::bulk::compress(&part, 1)
                    .map(Bytes::from)
                    .map_err(|e| Refusal::internal(format!("zstd: {e}")))
            } else {
                Ok(part)
            };
            return Ok(Box::pin(futures::stream::once(async move { chunk })));
        }
        let source = self.open(d, compressed).await?;
        if let Some(t) = &self.0.tier {
            t.used(crate::tier::Kind::Blob, [d]);
        }
        // Background S3 uploads give way while this streams.
        let reading = self.0.tier.as_ref().map(|t| t.reading());
        let stream = read_stream(source, offset, end, compressed, self.store().clone(), d).map(
            move |chunk| {
                let _ = &reading;
                chunk
            },
        );
        Ok(Box::pin(stream))
    }

    /// The length of `d`'s stored zstd frames, when a compressed read of it would send them
    /// as they are (`None`: it is stored plain, or not here).
    pub fn frames_len(&self, d: Digest) -> Option<u64> {
        let path = self.store().compressed_file(d)?;
        std::fs::metadata(path).ok().map(|m| m.len())
    }

    async fn open(&self, d: Digest, compressed: bool) -> Result<Source, Refusal> {
        if compressed && let Some(path) = self.store().compressed_file(d) {
            match tokio::fs::File::open(&path).await {
                Ok(f) => return Ok(Source::Frames(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Refusal::not_found(format!("blob {d} not found")));
                }
                Err(e) => return Err(Refusal::internal(format!("opening blob {d}: {e}"))),
            }
        }
        match self
            .store()
            .open_blob(d)
            .map_err(|e| read_failed(self.store(), d, &e))?
        {
            Some(reader) => Ok(Source::Blob(BlobSlot::Idle(reader))),
            None => Err(Refusal::not_found(format!("blob {d} not found"))),
        }
    }
}

/// ActionCache.
impl Core {
    /// The ActionResult recorded for `action`, when every blob it names is still here: an
    /// entry whose outputs are gone is dropped and answered as a miss (a hit must never send a
    /// client after a blob this cache lost). A hit counts as a use of all its outputs.
    pub async fn get_action_result(
        &self,
        action: Fingerprint,
    ) -> Result<remexec::ActionResult, Refusal> {
        let key = ac_key(action);
        let mut bytes = self
            .store()
            .get_ref(key)
            .map_err(|e| store_refusal("reading the action cache", &e))?;
        if bytes.is_none()
            && let Some(t) = &self.0.tier
            && let Some(shared) = t.get_ac(key).await?
        {
            // Recorded through another server sharing the bucket: keep a local copy.
            remexec::ActionResult::decode(&shared[..]).map_err(|e| {
                Refusal::new(
                    Why::Unavailable,
                    format!(
                        "the bucket's result for {} is undecodable: {e}",
                        action.to_hex()
                    ),
                )
            })?;
            let _ = self.store().put_ref(key, &shared);
            bytes = Some(shared.into());
        }
        let Some(bytes) = bytes else {
            self.0.metrics.ac_misses.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::not_found(format!(
                "no result for action {}",
                action.to_hex()
            )));
        };
        let ar = remexec::ActionResult::decode(&bytes[..]).map_err(|e| {
            Refusal::internal(format!(
                "stored result for {} is undecodable: {e}",
                action.to_hex()
            ))
        })?;
        if !self.outputs_present(&ar).await? {
            // A dangling entry: drop it, and answer as if it never existed.
            let _ = self.store().remove_ref(key);
            self.0
                .metrics
                .ac_misses_outputs_gone
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::not_found(format!(
                "the result for action {} {OUTPUTS_GONE}",
                action.to_hex()
            )));
        }
        if let Some(t) = &self.0.tier {
            t.used(crate::tier::Kind::Action, [key]);
        }
        self.0.metrics.ac_hits.fetch_add(1, Ordering::Relaxed);
        Ok(ar)
    }

    /// Records `ar` for `action` once it is valid (see [`validate_action_result`]) and every
    /// blob it names is stored (else a precondition refusal naming the first missing digest:
    /// clients upload outputs first).
    pub async fn update_action_result(
        &self,
        action: Fingerprint,
        ar: &remexec::ActionResult,
    ) -> Result<(), Refusal> {
        validate_action_result(ar)?;
        if let Some(missing) = self.first_missing_output(ar).await? {
            return Err(Refusal::new(
                Why::Precondition,
                format!(
                    "the action result names blob {missing}, which this cache does not have: \
                     upload the outputs first"
                ),
            ));
        }
        let key = ac_key(action);
        let encoded = ar.encode_to_vec();
        self.store()
            .put_ref(key, &encoded)
            .map_err(|e| store_refusal("writing the action cache", &e))?;
        if let Some(t) = &self.0.tier {
            t.put_ac(key, encoded).await?;
        }
        Ok(())
    }

    /// Loads a Tree or Directory message a result names; `None` when it is gone or is not
    /// one (then the result cannot be used: a miss, not an error).
    async fn load_message<M: Message + Default>(&self, d: Digest) -> Result<Option<M>, Refusal> {
        self.ensure_local(d).await?;
        let Some(bytes) = self
            .store()
            .load_bytes(d)
            .map_err(|e| store_refusal("reading an output directory", &e))?
        else {
            return Ok(None);
        };
        match M::decode(&bytes[..]) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "an action result names an undecodable directory");
                Ok(None)
            }
        }
    }

    /// Every blob `ar` names, with its Trees and Directory messages read: `Ok(None)` when one
    /// of those messages is gone (the entry cannot be used).
    async fn all_outputs(
        &self,
        ar: &remexec::ActionResult,
    ) -> Result<Option<(Vec<Digest>, Vec<Digest>)>, Refusal> {
        let Referenced {
            mut blobs,
            trees,
            roots,
        } = referenced_blobs(ar)?;
        let mut messages = Vec::with_capacity(trees.len() + roots.len());
        for t in trees {
            let Some(tree) = self.load_message::<remexec::Tree>(t).await? else {
                return Ok(None);
            };
            for dir in tree.root.iter().chain(&tree.children) {
                for f in &dir.files {
                    blobs.push(digest("Tree file digest", f.digest.as_ref())?);
                }
            }
            messages.push(t);
        }
        // A Directory graph is walked once per distinct Directory (shared subtrees are common).
        let mut queue = VecDeque::from(roots);
        let mut seen = HashSet::new();
        while let Some(d) = queue.pop_front() {
            if !seen.insert(d) {
                continue;
            }
            let Some(dir) = self.load_message::<remexec::Directory>(d).await? else {
                return Ok(None);
            };
            for f in &dir.files {
                blobs.push(digest("Directory file digest", f.digest.as_ref())?);
            }
            for sub in &dir.directories {
                queue.push_back(digest(
                    "Directory subdirectory digest",
                    sub.digest.as_ref(),
                )?);
            }
            messages.push(d);
        }
        blobs.retain(|d| *d != EMPTY_DIGEST);
        Ok(Some((blobs, messages)))
    }

    /// The first blob `ar` names that this cache does not have (a Tree or Directory message
    /// counts), or `None` when all are here.
    async fn first_missing_output(
        &self,
        ar: &remexec::ActionResult,
    ) -> Result<Option<Digest>, Refusal> {
        let Referenced {
            blobs,
            trees,
            roots,
        } = referenced_blobs(ar)?;
        let mut direct: Vec<Digest> = blobs.into_iter().chain(trees).chain(roots).collect();
        direct.retain(|d| *d != EMPTY_DIGEST);
        if let Some(d) = self.missing(&direct).await.into_iter().next() {
            return Ok(Some(d));
        }
        let Some((blobs, _)) = self.all_outputs(ar).await? else {
            // A message is here but does not decode: name the entry's first message.
            return Ok(direct.first().copied());
        };
        Ok(self.missing(&blobs).await.into_iter().next())
    }

    /// Whether every blob `ar` names is here: its files, its Trees and their files, and under
    /// a `root_directory_digest` every Directory message and file. A hit counts as a use of all
    /// of them.
    async fn outputs_present(&self, ar: &remexec::ActionResult) -> Result<bool, Refusal> {
        let Some((blobs, messages)) = self.all_outputs(ar).await? else {
            return Ok(false);
        };
        let missing = match &self.0.tier {
            Some(t) => t.missing_for_hit(&blobs).await,
            None => self.store().missing(blobs.iter().copied()),
        };
        if !missing.is_empty() {
            return Ok(false);
        }
        // A hit is a use of its outputs even when the client never downloads them (Bazel's
        // --remote_download_minimal): keep them as fresh as the entry.
        if let Some(t) = &self.0.tier {
            t.used(
                crate::tier::Kind::Blob,
                blobs.iter().chain(&messages).copied(),
            );
        }
        self.store().touch_all(blobs.into_iter().chain(messages));
        Ok(true)
    }
}

/// Opaque values: what a client stores under an ActionCache key without it being an
/// ActionResult (ccache's `layout=bazel` results). They live beside the ActionCache, never in
/// it: a value is a CAS blob (bounded by `--max-blob-size`, evicted LRU like every blob) plus a
/// record from the client's key to it, in a key space of its own, so a gRPC reader of the
/// ActionCache never sees one.
impl Core {
    /// The record key of the opaque value named `key`.
    fn opaque_key(key: Fingerprint) -> Digest {
        Digest::of_bytes(format!("recache-opaque-v1:{}", key.to_hex()).as_bytes())
    }

    /// Records `value` (a stored blob) as the opaque value named `key`.
    pub fn put_opaque(&self, key: Fingerprint, value: Digest) -> Result<(), Refusal> {
        let mut record = Vec::with_capacity(40);
        record.extend_from_slice(value.hash.as_bytes());
        record.extend_from_slice(&value.size_bytes.to_le_bytes());
        self.store()
            .put_ref(Self::opaque_key(key), &record)
            .map_err(|e| store_refusal("recording an opaque value", &e))
    }

    /// The blob holding the opaque value named `key`: not found when there is none, or when
    /// its blob was evicted (the record is dropped then).
    pub fn get_opaque(&self, key: Fingerprint) -> Result<Digest, Refusal> {
        let record_key = Self::opaque_key(key);
        let record = self
            .store()
            .get_ref(record_key)
            .map_err(|e| store_refusal("reading an opaque value", &e))?;
        let value = record.as_deref().and_then(|r| {
            let hash: [u8; 32] = r.get(..32)?.try_into().ok()?;
            let size: [u8; 8] = r.get(32..40)?.try_into().ok()?;
            Some(Digest::new(Fingerprint(hash), u64::from_le_bytes(size)))
        });
        match value {
            Some(d) if self.store().contains(d) => Ok(d),
            found => {
                if found.is_some() {
                    let _ = self.store().remove_ref(record_key);
                }
                Err(Refusal::not_found(format!(
                    "no value for key {}",
                    key.to_hex()
                )))
            }
        }
    }
}

/// What the REAPI spec forbids in an ActionResult's output paths and symlinks: a path must be
/// relative, `/`-separated, with no empty, `.` or `..` component and no trailing slash, and no
/// path may appear twice; symlink targets must be relative (this cache advertises
/// `symlink_absolute_path_strategy` DISALLOWED). Each refusal names the path.
#[allow(deprecated)] // output_file_symlinks / output_directory_symlinks: still sent by clients
pub(crate) fn validate_action_result(ar: &remexec::ActionResult) -> Result<(), Refusal> {
    referenced_blobs(ar)?;
    let symlinks: Vec<(&str, &remexec::OutputSymlink)> = [
        ("output_symlinks", &ar.output_symlinks),
        ("output_file_symlinks", &ar.output_file_symlinks),
        ("output_directory_symlinks", &ar.output_directory_symlinks),
    ]
    .into_iter()
    .flat_map(|(field, links)| links.iter().map(move |l| (field, l)))
    .collect();
    let paths = ar
        .output_files
        .iter()
        .map(|f| ("output_files", f.path.as_str()))
        .chain(
            ar.output_directories
                .iter()
                .map(|d| ("output_directories", d.path.as_str())),
        )
        .chain(symlinks.iter().map(|(field, l)| (*field, l.path.as_str())));
    let mut seen = HashSet::new();
    for (field, path) in paths {
        check_output_path(field, path)?;
        if !seen.insert(path) {
            return Err(Refusal::invalid(format!(
                "{field}: the path {path:?} appears twice in the action result"
            )));
        }
    }
    for (field, link) in symlinks {
        if link.target.is_empty() || link.target.starts_with('/') {
            return Err(Refusal::invalid(format!(
                "{field}: the symlink {:?} points to {:?}: targets must be relative paths \
                 (this cache's symlink_absolute_path_strategy is DISALLOWED)",
                link.path, link.target
            )));
        }
    }
    Ok(())
}

/// One output path: relative, no empty, `.` or `..` component, no trailing slash.
fn check_output_path(field: &str, path: &str) -> Result<(), Refusal> {
    let why = if path.is_empty() {
        Some("it is empty")
    } else if path.starts_with('/') {
        Some("it is absolute")
    } else if path.ends_with('/') {
        Some("it ends with a slash")
    } else if path.split('/').any(|c| c.is_empty()) {
        Some("it has an empty component")
    } else if path.split('/').any(|c| c == "." || c == "..") {
        Some("it has a `.` or `..` component")
    } else {
        None
    };
    match why {
        Some(why) => Err(Refusal::invalid(format!(
            "{field}: the output path {path:?} is not allowed: {why}"
        ))),
        None => Ok(()),
    }
}

/// The digests an ActionResult names, by what they are.
#[derive(Debug, Default)]
struct Referenced {
    /// Plain blobs: stdout, stderr, output files.
    blobs: Vec<Digest>,
    /// `OutputDirectory.tree_digest`: encoded Tree messages (their files are blobs too).
    trees: Vec<Digest>,
    /// `OutputDirectory.root_directory_digest` (REAPI 2.3's DIRECTORY_ONLY form, or beside a
    /// Tree): Directory messages, each naming its files and subdirectories by digest.
    roots: Vec<Digest>,
}

/// Every digest an ActionResult names, under either output directory form; each must parse,
/// and an output directory must name its contents one way or the other.
#[allow(deprecated)] // output_file_symlinks etc. carry no digests; listed for completeness
fn referenced_blobs(ar: &remexec::ActionResult) -> Result<Referenced, Refusal> {
    let mut r = Referenced::default();
    for (field, d) in [
        ("stdout_digest", ar.stdout_digest.as_ref()),
        ("stderr_digest", ar.stderr_digest.as_ref()),
    ] {
        if let Some(d) = d {
            r.blobs.push(digest(field, Some(d))?);
        }
    }
    for (i, f) in ar.output_files.iter().enumerate() {
        r.blobs.push(digest(
            &format!("output_files[{i}].digest"),
            f.digest.as_ref(),
        )?);
    }
    for (i, d) in ar.output_directories.iter().enumerate() {
        if d.tree_digest.is_none() && d.root_directory_digest.is_none() {
            return Err(Refusal::invalid(format!(
                "output_directories[{i}] ({:?}) has neither tree_digest nor \
                 root_directory_digest",
                d.path
            )));
        }
        if let Some(t) = &d.tree_digest {
            r.trees.push(digest(
                &format!("output_directories[{i}].tree_digest"),
                Some(t),
            )?);
        }
        if let Some(root) = &d.root_directory_digest {
            r.roots.push(digest(
                &format!("output_directories[{i}].root_directory_digest"),
                Some(root),
            )?);
        }
    }
    Ok(r)
}

/// A blocking `Read` over the chunks an upload's async task sends. It ends at
/// [`Piece::End`]; a channel closed before that (an abandoned upload) is an error, so the
/// writer commits nothing.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    current: Bytes,
    pos: usize,
    ended: bool,
}

impl ChannelReader {
    /// The upload's logical bytes: this input as it is, or decoded from zstd (an undecodable
    /// stream is remembered in `refused`, so the client hears that its data is wrong).
    fn decoded(
        self,
        compressed: bool,
        refused: Arc<std::sync::Mutex<Option<String>>>,
    ) -> Result<Box<dyn std::io::Read>, StoreError> {
        if !compressed {
            return Ok(Box::new(self));
        }
        Ok(Box::new(RefusingReader {
            inner: zstd::stream::read::Decoder::new(self)
                .map_err(|e| StoreError::invalid(format!("zstd: {e}")))?,
            refused,
        }))
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Piece::Bytes(next)) => {
                    self.current = next;
                    self.pos = 0;
                }
                Some(Piece::End) => self.ended = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the upload was abandoned before finish_write",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Remembers why a compressed upload could not be decoded, so the client hears
/// that its data is wrong, not that the server failed.
struct RefusingReader<R> {
    inner: R,
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl<R: std::io::Read> std::io::Read for RefusingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("undecodable zstd stream: {e}"));
        })
    }
}

/// The reader of a [`Source::Blob`]: idle, or on a blocking thread reading the chunk that
/// goes out next (read while the previous one is being sent, so disk and network overlap; one
/// chunk ahead at most).
enum BlobSlot {
    Idle(store::BlobReader),
    Reading(ChunkRead),
    /// Only while a read's result is being taken, or after its task died.
    Gone,
}

type ChunkRead =
    tokio::task::JoinHandle<(store::BlobReader, Result<bytes::Bytes, store::StoreError>)>;

/// Reads `len` bytes at `pos` on a blocking thread; the reader comes back with them.
fn read_chunk(mut reader: store::BlobReader, pos: u64, len: u64) -> ChunkRead {
    tokio::task::spawn_blocking(move || {
        let got = reader.read_range(pos, len);
        (reader, got)
    })
}

/// Where a read's bytes come from.
enum Source {
    /// Logical bytes, read a range at a time from one open reader (a compressed pool file is
    /// opened and its seek table read once; each range decodes only the frames it touches).
    Blob(BlobSlot),
    /// Stored zstd frames, sent as they are to a client that asked for compressed bytes.
    Frames(tokio::fs::File),
}

/// The bytes `offset..end` of `source` in chunks. Compressed from a plain source: each chunk
/// its own zstd frame (concatenated frames are one valid zstd stream); from stored frames: the
/// file as it is. A chunk the store cannot read ends the stream ([`read_failed`]: a damaged
/// blob is evicted).
fn read_stream(
    source: Source,
    offset: u64,
    end: u64,
    compressed: bool,
    store: store::LocalStore,
    digest: Digest,
) -> impl Stream<Item = Result<Bytes, Refusal>> + Send {
    let state = (source, offset, false, store);
    futures::stream::unfold(state, move |(mut source, pos, done, store)| async move {
        if done {
            return None;
        }
        let (item, next, finished) = match &mut source {
            Source::Frames(f) => {
                let mut buf = vec![0u8; READ_CHUNK_BYTES];
                match f.read(&mut buf).await {
                    Ok(0) if pos > 0 => return None,
                    Ok(n) => {
                        buf.truncate(n);
                        (Ok(Bytes::from(buf)), pos + n as u64, n == 0)
                    }
                    Err(e) => (
                        Err(Refusal::internal(format!("reading a stored blob: {e}"))),
                        pos,
                        true,
                    ),
                }
            }
            Source::Blob(slot) => {
                let want = (end - pos.min(end)).min(READ_CHUNK_BYTES as u64);
                let task = match std::mem::replace(slot, BlobSlot::Gone) {
                    BlobSlot::Idle(reader) => read_chunk(reader, pos, want),
                    BlobSlot::Reading(task) => task,
                    BlobSlot::Gone => return None,
                };
                let chunk = match task.await {
                    Ok((reader, got)) => {
                        let next = pos + want;
                        *slot = if got.is_ok() && next < end {
                            // The next chunk is read while this one is sent.
                            BlobSlot::Reading(read_chunk(
                                reader,
                                next,
                                (end - next).min(READ_CHUNK_BYTES as u64),
                            ))
                        } else {
                            BlobSlot::Idle(reader)
                        };
                        got.map_err(|e| read_failed(&store, digest, &e))
                    }
                    Err(e) => Err(Refusal::internal(format!(
                        "reading a stored blob: its read task failed: {e}"
                    ))),
                };
                let item = chunk.and_then(|data| {
                    if compressed {
                        zstd::bulk::compress(&data, 1)
                            .map(Bytes::from)
                            .map_err(|e| Refusal::internal(format!("zstd: {e}")))
                    } else {
                        Ok(data)
                    }
                });
                let next = pos + want;
                // An empty blob (or a read at its end) is one empty message; errors end it.
                let finished = item.is_err() || next >= end;
                (item, next, finished)
            }
        };
        Some((item, (source, next, finished, store)))
    })
}
