//! `recache serve`: a REAPI cache server (Capabilities, ContentAddressableStorage, ByteStream,
//! ActionCache, and Remote Asset Fetch/Push) on the recache local store, optionally with an
//! S3-compatible bucket behind it ([`tier`], over [`s3`]).
//!
//! The server shares the client's store instead of growing a second one: small blobs in the
//! LMDB database, large ones one file each in the verified pool (`<hash>-<size>` names, so a
//! blob's size is known without opening it), usage counters persisted in the database, so a
//! restart costs the same whatever the store holds. ActionCache entries are records in the
//! store's `refs` table, keyed by action digest.
//!
//! Every request is untrusted: instance names are checked against the allow-list, digests and
//! resource names parsed strictly (a bad one is INVALID_ARGUMENT naming the field), sizes
//! checked against `max_blob_size` before a byte is accepted, and every upload verified against
//! its digest before it becomes visible (a failed or interrupted upload leaves nothing).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let server = server::CacheServer::open(server::ServerOptions::new("/var/cache/recache-server"))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8980").await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod access;
mod asset;
mod core;
mod grpc;
pub mod http;
mod metrics;
mod mtls;
pub mod s3;
mod status;
mod status_page;
pub mod tier;
mod uploads;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use store::{LocalStore, LocalStoreOptions};
use tokio_stream::StreamExt;

/// Largest request message accepted (a batch of blobs plus framing).
pub(crate) const MAX_MESSAGE_BYTES: usize = 5 * 1024 * 1024;

/// `max_batch_total_size_bytes` advertised: what one batch request may carry.
pub const MAX_BATCH_TOTAL_BYTES: i64 = 4 * 1024 * 1024;

/// How long a stopping server with an S3 tier waits for queued uploads to reach the bucket.
pub const SHUTDOWN_UPLOAD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Buffers at least this large come from (and go back to) the system directly; see
/// [`return_large_buffers_to_the_system`].
const MMAP_THRESHOLD_BYTES: i32 = 4 << 20;

/// Makes freed large buffers (≥ 4 MiB: the S3 tier's 8 MiB upload parts) go straight back to
/// the system. glibc otherwise raises its mmap threshold the first time such a buffer is freed
/// and serves later ones from its heaps, which then keep them: measured with `s3-report
/// --quick`, the peak RSS growth of one 256 MiB upload to S3 was 83 MiB, 48 MiB with this.
/// Smaller buffers (1 MiB read chunks, gRPC messages) stay on the heap, where reuse is cheap.
/// `recache serve` calls this at start; a program embedding the server may. A no-op on other
/// C libraries.
pub fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: sets one allocator parameter; no memory is handed over.
        #[allow(unsafe_code)]
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
    }
}

/// Bytes per ByteStream.Read response message.
pub(crate) const READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Options for [`CacheServer::open`]; `ServerOptions::new(dir)` documents the defaults.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where blobs and action results live (created if missing).
    pub storage: PathBuf,
    /// Bound on stored blob bytes; least-recently-used blobs are evicted past it. Default
    /// 10 GiB.
    pub max_size: u64,
    /// Largest blob accepted (logical size). Default 4 GiB.
    pub max_blob_size: u64,
    /// Instance names served; empty: any.
    pub instance_names: Vec<String>,
    /// Callers' tokens and what each may do (see [`Role`]). Empty (the default): no
    /// credentials asked, every caller may do everything.
    pub tokens: Vec<Token>,
    /// With tokens: what a caller presenting none may do (`None`, the default: nothing).
    pub anonymous: Option<Role>,
    /// PEM certificate chain and key: serve TLS (`grpcs://`).
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// With `tls`: PEM certificates of the CA that signs client certificates. Every gRPC
    /// client must then present one it signed (mutual TLS); `certificate_roles` gives them
    /// roles by name. Default none.
    pub tls_client_ca: Option<Vec<u8>>,
    /// Roles of client certificates, by the names they carry (with `tokens`, the same rule:
    /// a caller matching neither gets the `anonymous` role). A certificate the CA signed but
    /// no entry names is anonymous; with neither tokens nor certificate roles configured every
    /// caller the CA admits may do everything.
    pub certificate_roles: Vec<CertificateRole>,
    /// Keep large blobs zstd-compressed at rest (1 MiB frames with a seek table). Default true.
    pub compress_at_rest: bool,
    /// An S3-compatible bucket behind the store, which then becomes the fast tier (see
    /// [`tier`]). Default none: the store is all there is.
    pub s3: Option<tier::TierOptions>,
    /// What one archive may unpack to for Remote Asset `FetchDirectory`. Default
    /// [`fetcher::archive::Limits::default`] (4 GiB, 500 000 entries).
    pub archive_limits: fetcher::archive::Limits,
    /// Free space kept on the storage's filesystem: an upload that would leave less first
    /// evicts least-recently-used blobs, and is refused (RESOURCE_EXHAUSTED) if that cannot make
    /// room, so a disk that fills before `max_size` never fails a write midway. Default `None`:
    /// 1 % of the filesystem, at least 256 MiB, but never more than 5 % of it
    /// ([`default_disk_reserve`]).
    pub disk_reserve: Option<u64>,
    /// Which origins Remote Asset `Fetch` may download from. Default: any origin whose every
    /// address is global (no loopback, private or link-local one: see
    /// [`fetcher::download::OriginPolicy`]).
    pub asset_policy: fetcher::download::OriginPolicy,
    /// Where to write the access log (one JSON line per request: time, peer, identity,
    /// protocol, method, resource, status, bytes, duration, invocation id): a file,
    /// appended to, or `-` for standard output. Default none.
    pub access_log: Option<PathBuf>,
}

impl ServerOptions {
    /// Defaults, storing under `storage`.
    pub fn new(storage: impl Into<PathBuf>) -> ServerOptions {
        ServerOptions {
            storage: storage.into(),
            max_size: 10 << 30,
            max_blob_size: 4 << 30,
            instance_names: Vec::new(),
            tokens: Vec::new(),
            anonymous: None,
            tls: None,
            tls_client_ca: None,
            certificate_roles: Vec::new(),
            compress_at_rest: true,
            s3: None,
            archive_limits: fetcher::archive::Limits::default(),
            disk_reserve: None,
            access_log: None,
            asset_policy: fetcher::download::OriginPolicy::global_only(Vec::new()),
        }
    }
}

/// The free space [`ServerOptions::disk_reserve`] keeps by default on a filesystem of
/// `total` bytes: 1 %, at least 256 MiB, at most 5 % (a small disk keeps a small reserve).
pub fn default_disk_reserve(total: u64) -> u64 {
    (total / 100).max(256 << 20).min(total / 20)
}

/// The filesystem holding `path`: (bytes free for an unprivileged writer, total bytes).
pub(crate) fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let unit = s.fragment_size().max(1);
    Some((
        (s.blocks_available() as u64).saturating_mul(unit),
        (s.blocks() as u64).saturating_mul(unit),
    ))
}

pub use core::{Identity, Role};

/// One caller's credentials ([`ServerOptions::tokens`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The secret, as the caller presents it (a bearer token, or an HTTP Basic password).
    pub token: String,
    /// What it may do.
    pub role: Role,
    /// Who it is, for the access log and refusals.
    pub name: String,
}

/// A role given to client certificates by name ([`ServerOptions::certificate_roles`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRole {
    /// A subject common name, or a subjectAltName DNS name or e-mail address, of a client
    /// certificate the CA (`tls_client_ca`) signed.
    pub subject: String,
    /// What it may do.
    pub role: Role,
    /// Who it is, for the access log, the status page and refusals.
    pub name: String,
}

/// What a tokens file (`--auth-tokens`) gives roles to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Secret tokens.
    pub tokens: Vec<Token>,
    /// Client certificates, by name.
    pub certificates: Vec<CertificateRole>,
}

impl Credentials {
    /// Reads a tokens file: one `TOKEN ROLE [NAME]` per line, or `cert:SUBJECT ROLE [NAME]`
    /// for client certificates whose common name (or a subjectAltName DNS name or e-mail
    /// address) is SUBJECT. Roles `read`, `write`, `admin`; the name defaults to
    /// `token-<line>` or the subject; blank lines and `#` comments are skipped. An error names
    /// the line.
    ///
    /// ```
    /// let c = server::Credentials::parse("s3cret write ci\ncert:laptop-7 read\n").unwrap();
    /// assert_eq!(c.tokens[0].name, "ci");
    /// assert_eq!(c.certificates[0].name, "laptop-7");
    /// ```
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let mut out = Credentials::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let usage = || {
                format!(
                    "line {}: expected `TOKEN ROLE [NAME]` or `cert:SUBJECT ROLE [NAME]`",
                    i + 1
                )
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            let (credential, role, name) = match words.as_slice() {
                [c, r] => (*c, *r, None),
                [c, r, n] => (*c, *r, Some(*n)),
                _ => return Err(usage()),
            };
            let role = role.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
            if let Some(subject) = credential.strip_prefix("cert:") {
                if subject.is_empty() {
                    return Err(usage());
                }
                out.certificates.push(CertificateRole {
                    subject: subject.to_owned(),
                    role,
                    name: name.unwrap_or(subject).to_owned(),
                });
            } else {
                out.tokens.push(Token {
                    token: credential.to_owned(),
                    role,
                    name: name.map_or_else(|| format!("token-{}", i + 1), str::to_owned),
                });
            }
        }
        Ok(out)
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The storage directory could not be opened.
    #[error("opening the storage {0}")]
    Storage(#[from] store::StoreError),
    /// The S3 tier could not be set up.
    #[error("S3 storage: {0}")]
    S3(#[from] s3::S3Error),
    /// The transport (listening, TLS) failed.
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The access log could not be opened.
    #[error("opening the access log: {0}")]
    AccessLog(std::io::Error),
}

/// The state every service shares.
#[derive(Debug)]
pub(crate) struct Inner {
    pub store: LocalStore,
    pub options: ServerOptions,
    /// One reservation decision (and its GC) at a time.
    pub reserving: std::sync::Mutex<()>,
    /// Uploads whose stream broke, kept for the client to resume.
    pub paused: Arc<uploads::PausedUploads>,
    /// Remote Asset downloads in progress, by request key: concurrent fetches of one asset
    /// share one download.
    pub downloads: std::sync::Mutex<std::collections::HashMap<hashing::Digest, SharedDownload>>,
    /// The S3 tier behind the store, when there is one.
    pub tier: Option<Arc<tier::Tier>>,
    /// What the server counts (`GET /metrics`).
    pub metrics: Arc<metrics::Metrics>,
    /// The access log, when `--access-log` is set.
    pub access: Option<access::AccessLog>,
    /// What each build got (the status page).
    pub invocations: status::Invocations,
    /// The last readiness answer and when it was found (see `Core::readiness`).
    pub readiness: std::sync::Mutex<Option<(std::time::Instant, core::Readiness)>>,
    /// Archives being unpacked at once (each holds a blocking thread and the disk): at most
    /// [`MAX_CONCURRENT_UNPACKS`]; later ones wait their turn.
    pub unpacking: tokio::sync::Semaphore,
}

/// Archives unpacked at once for `FetchDirectory`.
pub(crate) const MAX_CONCURRENT_UNPACKS: usize = 2;

/// A download several `FetchBlob` calls may await.
pub(crate) type SharedDownload = futures::future::Shared<
    futures::future::BoxFuture<
        'static,
        Result<(String, hashing::Digest), fetcher::download::DownloadError>,
    >,
>;

/// Room held in the store for one upload in progress (see [`Inner::reserve`]).
pub(crate) type Reservation = store::Reservation;

/// How many times a reservation evicts and asks again before it is refused. Each try evicts
/// down to what the last answer said is needed; another try is needed only when uploads that
/// were not yet counted (stored by a path without a reservation) grew the store meanwhile.
const RESERVE_TRIES: usize = 3;

impl Inner {
    /// The free space to keep on the storage's filesystem (of `total` bytes).
    fn disk_reserve(&self, total: u64) -> u64 {
        self.options
            .disk_reserve
            .unwrap_or_else(|| default_disk_reserve(total))
    }

    /// Makes sure `bytes` more fit on the storage's filesystem with the reserve left free:
    /// evicts least-recently-used blobs once when they do not, and refuses (no room) what still
    /// does not fit. A filesystem that cannot be asked is taken at its word (writes then fail
    /// with no room, never as an internal error).
    pub fn make_disk_room(&self, bytes: u64) -> Result<(), core::Refusal> {
        let Some((free, total)) = disk_space(&self.options.storage) else {
            return Ok(());
        };
        let reserve = self.disk_reserve(total);
        let needed = bytes.saturating_add(reserve);
        if free >= needed {
            return Ok(());
        }
        self.evict_for_disk(needed - free);
        match disk_space(&self.options.storage) {
            Some((free, _)) if free < needed => Err(core::Refusal::new(
                core::Why::Full,
                format!(
                    "the disk holding the cache is full: {bytes} more bytes would leave less than \
                     the {reserve} bytes kept free ({free} free after evicting what could be); \
                     retry later"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Evicts least-recently-used blobs worth `bytes` (to free disk space).
    pub fn evict_for_disk(&self, bytes: u64) {
        let stored = self.store.usage().total_bytes();
        if let Err(e) = self.store.gc(stored.saturating_sub(bytes)) {
            tracing::warn!(error = %e, "GC to free disk space failed");
        }
    }

    /// Refuses instance names outside the `--instance-name` allow-list (empty: any).
    pub fn check_instance(&self, name: &str) -> Result<(), core::Refusal> {
        let allowed = &self.options.instance_names;
        if allowed.is_empty() || allowed.iter().any(|a| a == name) {
            Ok(())
        } else {
            Err(core::Refusal::invalid(format!(
                "instance_name {name:?} is not served here (served: {allowed:?})"
            )))
        }
    }

    /// Reserves room for blob `d` before its upload starts: stored bytes plus every upload in
    /// progress must stay within `max_size`. When they would not, paused uploads give their
    /// room back first, then least-recently-used blobs are evicted (never one being uploaded:
    /// it is not stored yet, and the newest blobs go last) and the reservation is asked again.
    /// The store keeps the books ([`store::LocalStore::try_reserve`]): an upload's bytes move
    /// from reserved to stored in the same step that stores it, so an upload that finishes
    /// during this decision is never counted twice. What still cannot fit once eviction has
    /// done what it can is refused with RESOURCE_EXHAUSTED rather than filling the disk.
    pub fn reserve(self: &Arc<Self>, d: hashing::Digest) -> Result<Reservation, core::Refusal> {
        let max = self.options.max_size;
        let bytes = d.size_bytes;
        // One decision (and its eviction) at a time: two uploads must not both evict for room
        // only one of them then gets.
        let _one = self.reserving.lock().unwrap_or_else(|p| p.into_inner());
        self.make_disk_room(bytes).inspect_err(|_| {
            self.metrics
                .reservations_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        let mut room = match self.store.try_reserve(d, max) {
            Ok(r) => return Ok(r),
            Err(room) => room,
        };
        if bytes <= max && self.paused.abandon_all() > 0 {
            match self.store.try_reserve(d, max) {
                Ok(r) => return Ok(r),
                Err(r) => room = r,
            }
        }
        for _ in 0..RESERVE_TRIES {
            if bytes.saturating_add(room.reserved) > max {
                break; // eviction cannot help: uploads in progress hold the rest
            }
            let target = max - room.reserved - bytes;
            if let Err(e) = self.store.gc(target) {
                tracing::warn!(error = %e, "GC to make room for an upload failed");
            }
            match self.store.try_reserve(d, max) {
                Ok(r) => return Ok(r),
                Err(r) if r.stored >= room.stored && r.reserved >= room.reserved => {
                    room = r;
                    break; // eviction freed nothing (every blob left is in use)
                }
                Err(r) => room = r,
            }
        }
        self.metrics
            .reservations_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(core::Refusal::new(
            core::Why::Full,
            format!(
                "the cache is full: {bytes} more bytes would exceed --max-size {max} ({} bytes \
                 stored that cannot be evicted now, {} bytes of uploads in progress); retry later",
                room.stored, room.reserved
            ),
        ))
    }
}

/// A REAPI cache server over a store directory. See the crate docs.
#[derive(Debug, Clone)]
pub struct CacheServer {
    inner: Arc<Inner>,
}

impl CacheServer {
    /// Opens (creating if needed) the storage. Cheap whatever it holds: no walk of the blobs.
    pub fn open(options: ServerOptions) -> Result<CacheServer, ServerError> {
        let mut store_options = LocalStoreOptions::new(options.storage.join("store"));
        store_options.max_size = Some(options.max_size);
        // A client's upload is acknowledged only once committed.
        store_options.write_behind = false;
        if options.compress_at_rest {
            store_options.pool_compression = store::PoolCompression::Zstd;
        }
        let store = LocalStore::open(store_options)?;
        if let Some((free, total)) = disk_space(&options.storage) {
            let reserve = options
                .disk_reserve
                .unwrap_or_else(|| default_disk_reserve(total));
            let room = total.saturating_sub(reserve);
            if options.max_size > room {
                tracing::warn!(
                    max_size = options.max_size,
                    filesystem = total,
                    free,
                    reserve,
                    "--max-size is more than the filesystem holding the storage can take: the \
                     disk will fill first (uploads then evict, or are refused, to keep the \
                     reserve free)"
                );
            }
        }
        // Downloads cut off by a crash leave temp files behind: nothing else lives there.
        let _ = std::fs::remove_dir_all(options.storage.join("downloads"));
        let access = match &options.access_log {
            Some(target) => Some(access::AccessLog::open(target).map_err(ServerError::AccessLog)?),
            None => None,
        };
        let tier = match &options.s3 {
            Some(t) => Some(tier::Tier::new(store.clone(), t.clone())?),
            None => None,
        };
        Ok(CacheServer {
            inner: Arc::new(Inner {
                store,
                options,
                reserving: Default::default(),
                paused: Default::default(),
                downloads: Default::default(),
                tier,
                readiness: Default::default(),
                metrics: Default::default(),
                invocations: Default::default(),
                access,
                unpacking: tokio::sync::Semaphore::new(MAX_CONCURRENT_UNPACKS),
            }),
        })
    }

    /// The store behind the server (for tests and tools).
    pub fn store(&self) -> &LocalStore {
        &self.inner.store
    }

    /// Uploads to the S3 tier not yet in the bucket (journal rows); `None` without a tier.
    pub fn s3_pending(&self) -> Option<usize> {
        self.inner.tier.as_ref().map(|t| t.pending())
    }

    /// What the S3 tier's retention did since the start; `None` without a tier.
    pub fn s3_retention_stats(&self) -> Option<tier::RetentionStats> {
        self.inner.tier.as_ref().map(|t| t.retention_stats())
    }

    /// Serves on `listener` until `shutdown` completes. In-flight calls then finish; an upload
    /// cut off is discarded (never half-visible), and access times are flushed to disk. With
    /// an S3 tier, journaled uploads resume first (in the background) and the uploaders run
    /// while serving; at shutdown they get [`SHUTDOWN_UPLOAD_GRACE`] to finish, and what they
    /// have not finished stays journaled for next time.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        self.serve_with_http(listener, None, shutdown).await
    }

    /// [`serve`](Self::serve) gRPC on `grpc` and, when given, the HTTP/1.1 REST API
    /// ([`http`]: Bazel's HTTP cache, ccache, curl) on `http`, both over the same store and
    /// rules, until `shutdown` completes.
    pub async fn serve_with_http(
        self,
        listener: tokio::net::TcpListener,
        http: Option<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        use futures::FutureExt as _;
        let shutdown = shutdown.boxed().shared();
        let http_task = http.map(|l| {
            tokio::spawn(http::serve(
                core::Core(self.inner.clone()),
                l,
                shutdown.clone(),
            ))
        });
        let (reporter, health) = tonic_health::server::health_reporter();
        let health_task = tokio::spawn(grpc::follow_readiness(
            core::Core(self.inner.clone()),
            reporter,
            shutdown.clone(),
        ));
        let router = grpc::router(self.inner.clone(), health)?;
        let tier_tasks = match &self.inner.tier {
            Some(t) => {
                // An unreachable bucket does not stop the server: it serves from the fast tier,
                // journals uploads, and catches up when the bucket answers.
                if let Err(e) = t.s3().ensure_bucket().await {
                    tracing::warn!(error = %e, "the S3 bucket is not reachable yet");
                }
                t.start()
            }
            None => Vec::new(),
        };
        // Small responses must not wait for Nagle + delayed ACK (a 40 ms stall per RPC).
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        });
        let result = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Some(t) = http_task {
            let _ = t.await;
        }
        let _ = health_task.await;
        if let Some(t) = &self.inner.tier {
            // Give queued uploads a moment to land; the rest stay journaled for next start.
            let deadline = std::time::Instant::now() + SHUTDOWN_UPLOAD_GRACE;
            while t.pending() > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if t.pending() > 0 {
                tracing::info!(
                    pending = t.pending(),
                    "S3 uploads stay journaled for the next start"
                );
            }
        }
        for t in &tier_tasks {
            t.abort();
        }
        for t in tier_tasks {
            let _ = t.await;
        }
        if let Err(e) = self.inner.store.flush_access_times() {
            tracing::warn!(error = %e, "could not flush access times at shutdown");
        }
        Ok(result?)
    }
}

/// Resolves when the process gets SIGTERM or SIGINT (ctrl-c): the signal to stop serving.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => ctrl_c.await,
    }
}
