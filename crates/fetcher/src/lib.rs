//! Fetching assets (sources, toolchains) by URL, once for everyone.
//!
//! - [`download`]: an HTTP(S) download streamed into a [`store::LocalStore`], hashed and checked
//!   against Subresource Integrity checksums in one pass (what `recache serve`'s `FetchBlob`
//!   does when it has to go to the origin).
//! - [`Fetcher`]: the client chain an engine or `recache fetch` uses: the local store (by
//!   checksum), then a Remote Asset service (when a cache is configured), then the origin. An
//!   origin download is pushed back (blob to the CAS, then `PushBlob`) so the next machine hits.
//!   The cache never fails a fetch: a broken or missing Remote Asset service is a warning and a
//!   fall back to the origin; only the origin's own failure or a checksum mismatch fails.
//!
//! ```no_run
//! # async fn f(local: store::LocalStore) -> Result<(), fetcher::FetchError> {
//! let fetcher = fetcher::Fetcher::new(local, None);
//! let request = fetcher::FetchRequest::new(vec!["https://example.com/src.tar.gz".into()]);
//! let fetched = fetcher.fetch(&request).await?;
//! println!("{} from {:?}", fetched.digest, fetched.source);
//! # Ok(()) }
//! ```

pub mod archive;
pub mod download;

use std::sync::Arc;
use std::time::Duration;

use hashing::Digest;
use reapi::build::bazel::remote::asset::v1::{
    FetchBlobRequest, PushBlobRequest, Qualifier, fetch_client::FetchClient,
    push_client::PushClient,
};
use store::remote::ByteStoreProvider;
use store::{LocalStore, Store};

pub use download::{DownloadError, Sri};

/// A Remote Asset service and the CAS behind it.
#[derive(Debug, Clone)]
pub struct AssetService {
    /// A channel to the server that serves Fetch and Push.
    pub channel: tonic::transport::Channel,
    /// REAPI instance name.
    pub instance: String,
    /// Headers for every call (e.g. `authorization`).
    pub headers: Vec<(String, String)>,
    /// The server's CAS, for reading what Fetch names and writing what the origin gave.
    pub cas: Arc<dyn ByteStoreProvider>,
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// Mirrors of one asset, tried in order.
    pub uris: Vec<String>,
    /// Checksums, any one of which must match (none: trust the origin).
    pub sri: Vec<Sri>,
    /// HTTP headers for the origin (sent to the service as `http_header:*` qualifiers, which
    /// are not part of the asset's key).
    pub headers: Vec<(String, String)>,
    /// Deadline of the whole fetch.
    pub timeout: Duration,
    /// Largest asset accepted.
    pub max_bytes: u64,
    /// Where origin downloads are staged (a directory on the store's filesystem).
    pub temp_dir: std::path::PathBuf,
    /// Counts bytes received from the origin, for a progress display.
    pub progress: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl FetchRequest {
    /// A request for `uris` with defaults: no checksum, 10 minutes, 16 GiB, staged in the
    /// system's temp directory.
    pub fn new(uris: Vec<String>) -> FetchRequest {
        FetchRequest {
            uris,
            sri: Vec::new(),
            headers: Vec::new(),
            timeout: download::DEFAULT_TIMEOUT,
            max_bytes: 16 << 30,
            temp_dir: std::env::temp_dir(),
            progress: None,
        }
    }

    fn qualifiers(&self) -> Vec<Qualifier> {
        let mut q = Vec::new();
        if !self.sri.is_empty() {
            let list: Vec<String> = self.sri.iter().map(ToString::to_string).collect();
            q.push(Qualifier {
                name: "checksum.sri".into(),
                value: list.join(" "),
            });
        }
        for (k, v) in &self.headers {
            q.push(Qualifier {
                name: format!("http_header:{k}"),
                value: v.clone(),
            });
        }
        q
    }
}

/// Where the bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Already in the local store (found by its SHA-256 checksum).
    LocalStore,
    /// The Remote Asset service named it; read from its CAS.
    RemoteAsset,
    /// Downloaded from the origin.
    Origin,
}

impl Source {
    /// `local-store`, `remote-asset` or `origin`.
    pub fn label(self) -> &'static str {
        match self {
            Source::LocalStore => "local-store",
            Source::RemoteAsset => "remote-asset",
            Source::Origin => "origin",
        }
    }
}

/// A fetched asset, in the local store.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its digest in the local store.
    pub digest: Digest,
    /// Where it came from.
    pub source: Source,
    /// The URI it was fetched as (empty for a local-store hit).
    pub uri: String,
    /// Whether an origin download reached the cache (blob and asset record).
    pub pushed: bool,
    /// What went wrong with the cache on the way (each a fall back, not a failure).
    pub warnings: Vec<String>,
}

/// Why a fetch failed: only the origin's failure, or content that matches no checksum.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);

/// The client chain: see the crate docs.
#[derive(Debug, Clone)]
pub struct Fetcher {
    local: LocalStore,
    service: Option<AssetService>,
}

impl Fetcher {
    /// A fetcher over `local`, with a Remote Asset `service` if one is configured.
    pub fn new(local: LocalStore, service: Option<AssetService>) -> Fetcher {
        Fetcher { local, service }
    }

    /// Fetches `req` into the local store.
    pub async fn fetch(&self, req: &FetchRequest) -> Result<Fetched, FetchError> {
        if req.uris.is_empty() {
            return Err(FetchError("no URL to fetch".into()));
        }
        let mut warnings = Vec::new();
        // 1. The local store, by checksum (re-verified: the store is keyed by SHA-256 only).
        for s in &req.sri {
            if let Some(d) = s.sha256().and_then(|h| self.local.find_by_hash(h))
                && self.local_matches(d, &req.sri)
            {
                return Ok(Fetched {
                    digest: d,
                    source: Source::LocalStore,
                    uri: String::new(),
                    pushed: false,
                    warnings,
                });
            }
        }
        // 2. The Remote Asset service.
        if let Some(svc) = &self.service {
            match self.ask_service(svc, req).await {
                // Not cached: an ordinary miss, the origin's turn (no warning).
                Ok(None) => {}
                Ok(Some((uri, d))) => {
                    return Ok(Fetched {
                        digest: d,
                        source: Source::RemoteAsset,
                        uri,
                        pushed: false,
                        warnings,
                    });
                }
                Err(why) => warnings.push(format!(
                    "the Remote Asset service could not provide it ({why}); fetching from the origin"
                )),
            }
        }
        // 3. The origin, URI by URI.
        let options = download::Options {
            timeout: req.timeout,
            max_bytes: req.max_bytes,
            headers: req.headers.clone(),
            dir: req.temp_dir.clone(),
            progress: req.progress.clone(),
            // The user's own download: whatever the user can reach.
            policy: download::OriginPolicy::any(),
        };
        let mut errors = Vec::new();
        for uri in &req.uris {
            match download::fetch(&self.local, uri, &req.sri, &options).await {
                Ok(d) => {
                    let pushed = match &self.service {
                        Some(svc) => match self.push(svc, uri, req, d).await {
                            Ok(()) => true,
                            Err(why) => {
                                warnings.push(format!("could not push it to the cache: {why}"));
                                false
                            }
                        },
                        None => false,
                    };
                    return Ok(Fetched {
                        digest: d,
                        source: Source::Origin,
                        uri: uri.clone(),
                        pushed,
                        warnings,
                    });
                }
                Err(e) => errors.push(format!("{uri}: {e}")),
            }
        }
        Err(FetchError(errors.join("; ")))
    }

    fn local_matches(&self, d: Digest, sri: &[Sri]) -> bool {
        let Ok(Some(mut reader)) = blob_reader(&self.local, d) else {
            return false;
        };
        download::content_matches(sri, &mut reader).unwrap_or(false)
    }

    fn request<T>(svc: &AssetService, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        for (k, v) in &svc.headers {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()),
                v.parse(),
            ) {
                req.metadata_mut().insert(k, v);
            }
        }
        req
    }

    /// FetchBlob, then the blob from the CAS into the local store, verified. `Ok(None)`: the
    /// service does not have it (NOT_FOUND, the Remote Asset API's "not cached").
    async fn ask_service(
        &self,
        svc: &AssetService,
        req: &FetchRequest,
    ) -> Result<Option<(String, Digest)>, String> {
        let msg = FetchBlobRequest {
            instance_name: svc.instance.clone(),
            timeout: Some(reapi::google::protobuf::Duration {
                seconds: req.timeout.as_secs() as i64,
                nanos: 0,
            }),
            uris: req.uris.clone(),
            qualifiers: req.qualifiers(),
            ..Default::default()
        };
        // NOT_FOUND, inline or as the RPC's status (buildbox-casd), is "not cached".
        let resp = match FetchClient::new(svc.channel.clone())
            .fetch_blob(Self::request(svc, msg))
            .await
        {
            Ok(resp) => resp.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        if let Some(s) = resp.status.as_ref().filter(|s| s.code != 0) {
            if tonic::Code::from(s.code) == tonic::Code::NotFound {
                return Ok(None);
            }
            return Err(format!("{:?}: {}", tonic::Code::from(s.code), s.message));
        }
        let d = hashing::reapi::require_digest("blob_digest", resp.blob_digest.as_ref())
            .map_err(|e| e.to_string())?;
        let store = Store::with_remote(self.local.clone(), svc.cas.clone());
        store
            .ensure_downloaded([d].into_iter().collect(), Default::default())
            .await
            .map_err(|e| format!("reading {d} from its CAS: {e}"))?;
        if !self.local_matches(d, &req.sri) {
            return Err(format!("it named {d}, which matches none of the checksums"));
        }
        Ok(Some((resp.uri, d)))
    }

    /// The blob to the CAS, then the asset record.
    async fn push(
        &self,
        svc: &AssetService,
        uri: &str,
        req: &FetchRequest,
        d: Digest,
    ) -> Result<(), String> {
        let missing = svc
            .cas
            .list_missing_digests(&mut std::iter::once(d))
            .await
            .map_err(|e| e.to_string())?;
        if missing.contains(&d) {
            match self.local.load_file(d) {
                Ok(Some(path)) => {
                    let file = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| e.to_string())?;
                    svc.cas
                        .store_file(d, file)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                _ => {
                    let bytes = self
                        .local
                        .load_bytes(d)
                        .map_err(|e| e.to_string())?
                        .ok_or("the blob left the local store")?;
                    svc.cas
                        .store_bytes(d, bytes)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        let msg = PushBlobRequest {
            instance_name: svc.instance.clone(),
            uris: vec![uri.to_owned()],
            qualifiers: req
                .qualifiers()
                .into_iter()
                .filter(|q| !q.name.starts_with("http_header:"))
                .collect(),
            blob_digest: Some(d.into()),
            ..Default::default()
        };
        PushClient::new(svc.channel.clone())
            .push_blob(Self::request(svc, msg))
            .await
            .map_err(|s| format!("PushBlob: {:?}: {}", s.code(), s.message()))?;
        Ok(())
    }
}

/// Reads and seeks the stored blob `digest` (`None` when absent); see [`BlobCursor`].
pub fn blob_reader(
    store: &LocalStore,
    digest: Digest,
) -> Result<Option<BlobCursor>, store::StoreError> {
    Ok(store.open_blob(digest)?.map(|blob| BlobCursor {
        blob,
        size: digest.size_bytes,
        pos: 0,
        chunk: bytes::Bytes::new(),
        chunk_start: 0,
    }))
}

/// Bytes a [`BlobCursor`] reads from the store at a time: one frame of a compressed pool file.
const CURSOR_CHUNK_BYTES: u64 = 1024 * 1024;

/// `std::io::Read + Seek` over a stored blob, one aligned 1 MiB chunk in memory at a time: a
/// compressed pool file decodes each frame once however small the caller's reads are, and a
/// zip's index is read from its end without the archive in memory.
#[derive(Debug)]
pub struct BlobCursor {
    blob: store::BlobReader,
    size: u64,
    pos: u64,
    chunk: bytes::Bytes,
    chunk_start: u64,
}

impl std::io::Read for BlobCursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let in_chunk =
            self.pos >= self.chunk_start && self.pos < self.chunk_start + self.chunk.len() as u64;
        if !in_chunk {
            self.chunk_start = self.pos / CURSOR_CHUNK_BYTES * CURSOR_CHUNK_BYTES;
            self.chunk = self
                .blob
                .read_range(self.chunk_start, CURSOR_CHUNK_BYTES)
                .map_err(std::io::Error::other)?;
            if self.chunk.len() as u64 <= self.pos - self.chunk_start {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stored blob is shorter than its digest says",
                ));
            }
        }
        let from = (self.pos - self.chunk_start) as usize;
        let n = buf.len().min(self.chunk.len() - from);
        buf[..n].copy_from_slice(&self.chunk[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for BlobCursor {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            std::io::SeekFrom::Start(n) => Some(n),
            std::io::SeekFrom::End(d) => self.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the blob",
            )
        })?;
        Ok(self.pos)
    }
}
