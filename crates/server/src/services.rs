//! The four REAPI services. Each handler validates what it is given before touching the store:
//! instance name, digests, resource names, sizes.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::asset::v1::{
    fetch_server::FetchServer, push_server::PushServer,
};
use bazel_remote_apis::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_server::ActionCache, action_cache_server::ActionCacheServer,
    capabilities_server::Capabilities, capabilities_server::CapabilitiesServer, compressor,
    content_addressable_storage_server::ContentAddressableStorage,
    content_addressable_storage_server::ContentAddressableStorageServer, digest_function,
};
use bazel_remote_apis::build::bazel::semver::SemVer;
use bazel_remote_apis::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream, byte_stream_server::ByteStreamServer,
};
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use futures::{Stream, StreamExt};
use hashing::{Digest, EMPTY_DIGEST};
use prost::Message;
use store::{ErrorKind, StoreError};
use tokio::io::AsyncReadExt;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::uploads::Piece;
use crate::{Inner, MAX_BATCH_TOTAL_BYTES, MAX_MESSAGE_BYTES, READ_CHUNK_BYTES, ServerError};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Directories per GetTree page when the client does not say.
const DEFAULT_TREE_PAGE: usize = 1000;

/// Encoded bytes of Directory messages per GetTree page: under the 4 MiB a gRPC client takes
/// by default, with room for the framing (a Directory of 60 files is ≈ 6 KiB, so a count-only
/// page of 1 000 of them did not fit).
const TREE_PAGE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

/// A GetTree walk in progress: breadth-first, each distinct Directory once.
struct TreeWalk {
    svc: Svc,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
    /// Directories walked so far (returned, or skipped for the page token).
    index: usize,
    skip: usize,
    page: usize,
    /// A directory walked but left for the next page (it did not fit in this one).
    pending: Option<remexec::Directory>,
    sent: bool,
    done: bool,
}

impl TreeWalk {
    /// The next Directory in walk order, not yet counted; `None` at the end.
    async fn next_dir(&mut self) -> Result<Option<remexec::Directory>, Status> {
        if let Some(dir) = self.pending.take() {
            return Ok(Some(dir));
        }
        while let Some(d) = self.queue.pop_front() {
            if !self.seen.insert(d) {
                continue;
            }
            self.svc.ensure_local(d).await?;
            let dir = self
                .svc
                .store()
                .load_directory(d)
                .map_err(|e| store_status(&format!("directory {d}"), &e))?;
            return Ok(Some(dir));
        }
        Ok(None)
    }

    /// Counts `dir` as walked and queues its subdirectories.
    fn walked(&mut self, dir: &remexec::Directory) -> Result<(), Status> {
        for sub in &dir.directories {
            self.queue
                .push_back(digest("directories[].digest", sub.digest.as_ref())?);
        }
        self.index += 1;
        Ok(())
    }

    /// The next page; `None` once the last was sent. An error ends the walk.
    async fn next_page(&mut self) -> Option<Result<remexec::GetTreeResponse, Status>> {
        if self.done {
            return None;
        }
        let page = self.fill().await;
        if page.is_err() || self.pending.is_none() {
            self.done = true;
        }
        match page {
            Ok(directories) if directories.is_empty() && self.sent => None,
            Ok(directories) => {
                self.sent = true;
                let next_page_token = if self.pending.is_some() {
                    self.index.to_string()
                } else {
                    String::new()
                };
                Some(Ok(remexec::GetTreeResponse {
                    directories,
                    next_page_token,
                }))
            }
            Err(e) => Some(Err(e)),
        }
    }

    async fn fill(&mut self) -> Result<Vec<remexec::Directory>, Status> {
        let mut directories = Vec::new();
        let mut bytes = 0usize;
        while let Some(dir) = self.next_dir().await? {
            if self.index < self.skip {
                self.walked(&dir)?;
                continue;
            }
            // The message's own framing per entry: a tag and a length of at most 5 bytes.
            let len = dir.encoded_len() + 6;
            if !directories.is_empty()
                && (directories.len() >= self.page || bytes + len > TREE_PAGE_BYTES)
            {
                self.pending = Some(dir);
                break;
            }
            self.walked(&dir)?;
            bytes += len;
            directories.push(dir);
        }
        Ok(directories)
    }
}

#[derive(Debug, Clone)]
struct Svc(Arc<Inner>);

/// Builds the router with every service (and the auth check when a token is set).
pub(crate) fn router(inner: Arc<Inner>) -> Result<tonic::transport::server::Router, ServerError> {
    let svc = Svc(inner.clone());
    let token = inner.options.auth_token.clone();
    let auth = move |req: Request<()>| -> Result<Request<()>, Status> {
        let Some(token) = &token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated(
                "this cache needs `authorization: Bearer <token>`",
            )),
        }
    };
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(6 * 1024 * 1024))
        .initial_connection_window_size(Some(12 * 1024 * 1024));
    if let Some((cert, key)) = &inner.options.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    Ok(builder
        .add_service(tonic::service::interceptor::InterceptedService::new(
            CapabilitiesServer::new(svc.clone()),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ContentAddressableStorageServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ActionCacheServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(64 * 1024 * 1024),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            ByteStreamServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            FetchServer::new(crate::asset::AssetSvc(inner.clone())),
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            PushServer::new(crate::asset::AssetSvc(inner)),
            auth,
        )))
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A store failure as a gRPC status: the server's own trouble is INTERNAL (or
/// RESOURCE_EXHAUSTED when the disk is full), never a panic.
fn store_status(what: &str, e: &StoreError) -> Status {
    match e.kind() {
        ErrorKind::StorageFull => Status::resource_exhausted(format!("{what}: {e}")),
        ErrorKind::InvalidData => Status::invalid_argument(format!("{what}: {e}")),
        ErrorKind::MissingDigest(d) => Status::not_found(format!("{what}: blob {d} not found")),
        _ => Status::internal(format!("{what}: {e}")),
    }
}

fn rpc_status(code: Code, message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message,
        details: vec![],
    })
}

/// A read of `d` that failed. A stored blob that is not what its digest says (the wrong size,
/// a seek table or frame that does not decode to it, bytes that do not hash to it) is DATA_LOSS,
/// never OK, and is evicted on the spot so the next upload of it replaces it; any other failure
/// as [`store_status`].
fn read_failed(store: &store::LocalStore, d: Digest, e: &StoreError) -> Status {
    if matches!(e.kind(), ErrorKind::InvalidData) {
        tracing::error!(digest = %d, error = %e, "a stored blob is damaged; evicting it");
        if let Err(e) = store.remove(&[d]) {
            tracing::warn!(digest = %d, error = %e, "could not evict a damaged blob");
        }
        return Status::data_loss(format!(
            "the stored copy of blob {d} is damaged and was evicted (upload it again): {e}"
        ));
    }
    store_status("reading", e)
}

impl Svc {
    fn store(&self) -> &store::LocalStore {
        &self.0.store
    }

    /// With an S3 tier: makes sure the store holds `d`, fetching it from the bucket if need
    /// be (a blob neither has stays missing; the caller's own lookup says so).
    async fn ensure_local(&self, d: Digest) -> Result<(), Status> {
        if let Some(t) = &self.0.tier {
            t.fetch(&self.0, d).await?;
        }
        Ok(())
    }

    /// With an S3 tier: a place in the upload queue for `d`, taken before it is stored (none
    /// for a blob the store already holds: it was queued when it arrived).
    async fn admit(&self, d: Digest) -> Result<Option<crate::tier::Admission>, Status> {
        match &self.0.tier {
            Some(t) if d != EMPTY_DIGEST && !self.store().contains(d) => {
                Ok(Some(t.admit(d).await?))
            }
            _ => Ok(None),
        }
    }

    /// Which of `digests` this cache does not have (store, then the S3 tier).
    async fn missing(&self, digests: &[Digest]) -> Vec<Digest> {
        match &self.0.tier {
            Some(t) => t.missing(digests).await,
            None => self.store().missing(digests.iter().copied()),
        }
    }

    /// Refuses instance names outside the allow-list.
    fn check_instance(&self, name: &str) -> Result<(), Status> {
        self.0.check_instance(name)
    }

    /// Only SHA-256 is spoken; unset (0) means the default, SHA-256.
    fn check_digest_function(&self, f: i32) -> Result<(), Status> {
        if f == 0 || f == digest_function::Value::Sha256 as i32 {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "digest_function {f} is not supported: this cache speaks SHA-256 only"
            )))
        }
    }

    fn check_size(&self, d: Digest) -> Result<(), Status> {
        let max = self.0.options.max_blob_size;
        if d.size_bytes > max {
            Err(Status::resource_exhausted(format!(
                "blob {d} is larger than this cache accepts ({max} bytes)"
            )))
        } else {
            Ok(())
        }
    }

    /// Verifies `data` against `d` and stores it. A blob already stored is not reserved for
    /// again (which could evict an unrelated blob to make room for nothing): re-sending it is a
    /// use of it, as a `Write` of it is.
    fn store_verified(&self, d: Digest, data: &[u8]) -> Result<(), Status> {
        self.check_size(d)?;
        if data.len() as u64 != d.size_bytes || Digest::of_bytes(data) != d {
            return Err(Status::invalid_argument(format!(
                "content does not match digest {d}"
            )));
        }
        if self.store().contains(d) {
            self.store().touch_all([d]);
            return Ok(());
        }
        let _room = self.0.reserve(d)?;
        self.store()
            .store_verified(d, &mut &data[..])
            .map_err(|e| store_status("storing", &e))
    }
}

impl Svc {
    /// Reserves room for `d` and starts its writer on a blocking thread: it hashes, compresses
    /// or keeps plain, fsyncs, and commits only when the digest verifies, while the `Write`
    /// task keeps receiving (the two overlap instead of taking turns). The 2-message channel is
    /// the back-pressure; a channel closed early leaves nothing visible.
    fn start_upload(&self, d: Digest, compressed: bool) -> Result<crate::uploads::Upload, Status> {
        let room = self.0.reserve(d)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<crate::uploads::Piece>(2);
        let refused = Arc::new(std::sync::Mutex::new(None::<String>));
        let store = self.store().clone();
        let why = refused.clone();
        // With an S3 tier, a large blob's parts start up to the bucket as they arrive.
        let tee = self.0.tier.as_ref().and_then(|t| t.tee(d));
        let writer = tokio::task::spawn_blocking(move || {
            let input = ChannelReader {
                rx,
                current: Vec::new(),
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
            if compressed {
                store_from(Box::new(RefusingReader {
                    inner: zstd::stream::read::Decoder::new(input)
                        .map_err(|e| StoreError::invalid(format!("zstd: {e}")))?,
                    refused: why,
                }))
            } else {
                store_from(Box::new(input))
            }
        });
        Ok(crate::uploads::Upload {
            digest: d,
            received: 0,
            tx,
            writer,
            refused,
            _room: room,
            admission: None,
        })
    }
}

fn digest(field: &str, d: Option<&remexec::Digest>) -> Result<Digest, Status> {
    hashing::reapi::require_digest(field, d).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A parsed ByteStream resource name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resource {
    pub instance: String,
    pub digest: Digest,
    pub compressed: bool,
}

/// Parses `{instance}/blobs/{hash}/{size}` (reads) or
/// `{instance}/uploads/{uuid}/blobs/{hash}/{size}` (writes), with `compressed-blobs/zstd` in
/// place of `blobs`; the instance may have several segments, and anything after the size is
/// metadata the spec allows. Anything else is INVALID_ARGUMENT naming the problem.
pub(crate) fn parse_resource(name: &str, write: bool) -> Result<Resource, Status> {
    let bad = |why: &str| Status::invalid_argument(format!("resource_name {name:?}: {why}"));
    let parts: Vec<&str> = name.split('/').collect();
    let Some(pos) = parts
        .iter()
        .position(|p| *p == "blobs" || *p == "compressed-blobs")
    else {
        return Err(bad("no `blobs/` or `compressed-blobs/` segment"));
    };
    let mut prefix = &parts[..pos];
    if write {
        match prefix {
            [rest @ .., "uploads", uuid] if !uuid.is_empty() => prefix = rest,
            _ => return Err(bad("a write needs `uploads/<uuid>/` before the blob")),
        }
    } else if prefix.last() == Some(&"uploads") || prefix.contains(&"uploads") {
        return Err(bad("`uploads/` is for writes"));
    }
    if prefix
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(bad("empty, `.` or `..` instance name segment"));
    }
    let compressed = parts[pos] == "compressed-blobs";
    let rest = &parts[pos + 1..];
    let (hash, size) = match (compressed, rest) {
        (false, [h, s, ..]) => (*h, *s),
        (true, ["zstd", h, s, ..]) => (*h, *s),
        (true, [other, ..]) if *other != "zstd" => {
            return Err(bad(&format!(
                "compressor {other:?} is not supported (zstd is)"
            )));
        }
        _ => return Err(bad("expected `<hash>/<size>`")),
    };
    let digest = format!("{hash}/{size}")
        .parse::<Digest>()
        .map_err(|e| bad(&e.to_string()))?;
    Ok(Resource {
        instance: prefix.join("/"),
        digest,
        compressed,
    })
}

#[tonic::async_trait]
impl Capabilities for Svc {
    async fn get_capabilities(
        &self,
        req: Request<remexec::GetCapabilitiesRequest>,
    ) -> Result<Response<remexec::ServerCapabilities>, Status> {
        self.check_instance(&req.get_ref().instance_name)?;
        let zstd = vec![compressor::Value::Zstd as i32];
        Ok(Response::new(remexec::ServerCapabilities {
            cache_capabilities: Some(remexec::CacheCapabilities {
                digest_functions: vec![digest_function::Value::Sha256 as i32],
                action_cache_update_capabilities: Some(remexec::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: MAX_BATCH_TOTAL_BYTES,
                symlink_absolute_path_strategy:
                    remexec::symlink_absolute_path_strategy::Value::Disallowed as i32,
                supported_compressors: zstd.clone(),
                supported_batch_update_compressors: zstd,
                ..Default::default()
            }),
            // Bazel 4.x speaks REAPI 2.0 only and refuses a server whose range starts later.
            low_api_version: Some(SemVer {
                major: 2,
                ..Default::default()
            }),
            high_api_version: Some(SemVer {
                major: 2,
                minor: 3,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Svc {
    async fn find_missing_blobs(
        &self,
        req: Request<remexec::FindMissingBlobsRequest>,
    ) -> Result<Response<remexec::FindMissingBlobsResponse>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        self.check_digest_function(req.digest_function)?;
        let mut digests = Vec::with_capacity(req.blob_digests.len());
        for (i, d) in req.blob_digests.iter().enumerate() {
            digests.push(digest(&format!("blob_digests[{i}]"), Some(d))?);
        }
        let missing = self.missing(&digests).await;
        // A blob reported present is one the client counts on (it will reference it instead of
        // uploading it): that is a use, for LRU (and for the bucket's retention).
        let gone: HashSet<Digest> = missing.iter().copied().collect();
        let present: Vec<Digest> = digests.into_iter().filter(|d| !gone.contains(d)).collect();
        if let Some(t) = &self.0.tier {
            t.used(crate::tier::Kind::Blob, present.iter().copied());
        }
        self.store().touch_all(present);
        Ok(Response::new(remexec::FindMissingBlobsResponse {
            missing_blob_digests: missing.into_iter().map(Into::into).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        req: Request<remexec::BatchUpdateBlobsRequest>,
    ) -> Result<Response<remexec::BatchUpdateBlobsResponse>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        self.check_digest_function(req.digest_function)?;
        let mut responses = Vec::with_capacity(req.requests.len());
        for (i, r) in req.requests.into_iter().enumerate() {
            let d = digest(&format!("requests[{i}].digest"), r.digest.as_ref())?;
            let result = async {
                self.check_size(d)?;
                let _admission = self.admit(d).await?;
                let data = match r.compressor {
                    c if c == compressor::Value::Identity as i32 => r.data,
                    c if c == compressor::Value::Zstd as i32 => {
                        let cap = usize::try_from(d.size_bytes).unwrap_or(usize::MAX);
                        zstd::bulk::decompress(&r.data, cap).map_err(|e| {
                            Status::invalid_argument(format!("undecodable zstd data: {e}"))
                        })?
                    }
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "compressor {other} is not supported"
                        )));
                    }
                };
                self.store_verified(d, &data)
            }
            .await;
            responses.push(remexec::batch_update_blobs_response::Response {
                digest: Some(d.into()),
                status: match result {
                    Ok(()) => rpc_status(Code::Ok, String::new()),
                    Err(s) => rpc_status(s.code(), s.message().to_owned()),
                },
            });
        }
        Ok(Response::new(remexec::BatchUpdateBlobsResponse {
            responses,
        }))
    }

    async fn batch_read_blobs(
        &self,
        req: Request<remexec::BatchReadBlobsRequest>,
    ) -> Result<Response<remexec::BatchReadBlobsResponse>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        self.check_digest_function(req.digest_function)?;
        let zstd_ok = req
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        let mut digests = Vec::with_capacity(req.digests.len());
        let mut total = 0u64;
        for (i, d) in req.digests.iter().enumerate() {
            let d = digest(&format!("digests[{i}]"), Some(d))?;
            total = total.saturating_add(d.size_bytes);
            digests.push(d);
        }
        if total > MAX_BATCH_TOTAL_BYTES as u64 {
            return Err(Status::invalid_argument(format!(
                "the batch asks for {total} bytes; the limit is {MAX_BATCH_TOTAL_BYTES} (use ByteStream)"
            )));
        }
        if self.0.tier.is_some() {
            let absent = self.store().missing(digests.iter().copied());
            let fetched: Vec<Result<(), Status>> = futures::stream::iter(absent)
                .map(|d| self.ensure_local(d))
                .buffer_unordered(16)
                .collect()
                .await;
            if let Some(Err(e)) = fetched.into_iter().find(Result::is_err) {
                return Err(e);
            }
        }
        let mut responses = Vec::with_capacity(digests.len());
        for d in digests {
            // The size is checked on the way out; the bytes are not hashed again (SHA-256 of a
            // full 4 MiB batch is ≈ 3 ms here, as much as the rest of the call).
            let loaded = self.store().load_bytes(d).and_then(|b| match b {
                Some(b) if b.len() as u64 != d.size_bytes => Err(StoreError::invalid(format!(
                    "{} bytes are stored for it",
                    b.len()
                ))),
                other => Ok(other),
            });
            let (data, status, comp) = match loaded {
                Ok(Some(b)) => {
                    // Compress only what shrinks enough to pay for it.
                    let compressed = if zstd_ok && b.len() >= 4096 {
                        zstd::bulk::compress(&b, 1)
                            .ok()
                            .filter(|c| c.len() < b.len() / 10 * 9)
                    } else {
                        None
                    };
                    match compressed {
                        Some(c) => (
                            c,
                            rpc_status(Code::Ok, String::new()),
                            compressor::Value::Zstd,
                        ),
                        None => (
                            b.to_vec(),
                            rpc_status(Code::Ok, String::new()),
                            compressor::Value::Identity,
                        ),
                    }
                }
                Ok(None) => (
                    vec![],
                    rpc_status(Code::NotFound, format!("blob {d} not found")),
                    compressor::Value::Identity,
                ),
                Err(e) => {
                    let s = read_failed(self.store(), d, &e);
                    (
                        vec![],
                        rpc_status(s.code(), s.message().to_owned()),
                        compressor::Value::Identity,
                    )
                }
            };
            responses.push(remexec::batch_read_blobs_response::Response {
                digest: Some(d.into()),
                data,
                compressor: comp as i32,
                status,
            });
        }
        Ok(Response::new(remexec::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<remexec::GetTreeResponse>;

    /// Streams the tree breadth-first (each distinct Directory once) in pages of at most
    /// `page_size` directories (default and cap: [`DEFAULT_TREE_PAGE`], ten times that) and at
    /// most [`TREE_PAGE_BYTES`] encoded, every page after the first in the same call, as the
    /// spec asks. A page token is the number of directories already returned: the walk is
    /// repeated up to it (stateless, and correct while the tree's blobs are there). The walk is
    /// lazy: one page is in memory at a time.
    async fn get_tree(
        &self,
        req: Request<remexec::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        self.check_digest_function(req.digest_function)?;
        let root = digest("root_digest", req.root_digest.as_ref())?;
        let skip: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!("page_token {:?} is not ours", req.page_token))
            })?
        };
        let page = match usize::try_from(req.page_size) {
            Ok(0) | Err(_) => DEFAULT_TREE_PAGE,
            Ok(n) => n.min(10 * DEFAULT_TREE_PAGE),
        };
        let walk = TreeWalk {
            svc: self.clone(),
            queue: VecDeque::from([root]),
            seen: HashSet::new(),
            index: 0,
            skip,
            page,
            pending: None,
            sent: false,
            done: false,
        };
        let stream = futures::stream::unfold(walk, |mut walk| async move {
            let page = walk.next_page().await?;
            Some((page, walk))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn split_blob(
        &self,
        _req: Request<remexec::SplitBlobRequest>,
    ) -> Result<Response<remexec::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob is not offered"))
    }

    type GetChunkMappingStream = BoxStream<remexec::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _req: Request<remexec::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("GetChunkMapping is not offered"))
    }

    async fn splice_blob(
        &self,
        _req: Request<remexec::SpliceBlobRequest>,
    ) -> Result<Response<remexec::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob is not offered"))
    }

    async fn register_chunk_mapping(
        &self,
        _req: Request<Streaming<remexec::RegisterChunkMappingRequest>>,
    ) -> Result<Response<remexec::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("RegisterChunkMapping is not offered"))
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
fn referenced_blobs(ar: &remexec::ActionResult) -> Result<Referenced, Status> {
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
            return Err(Status::invalid_argument(format!(
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

impl Svc {
    /// Loads a Tree or Directory message a result names; `None` when it is gone or is not
    /// one (then the result cannot be used: a miss, not an error).
    async fn load_message<M: Message + Default>(&self, d: Digest) -> Result<Option<M>, Status> {
        self.ensure_local(d).await?;
        let Some(bytes) = self
            .store()
            .load_bytes(d)
            .map_err(|e| store_status("reading an output directory", &e))?
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

    /// Whether every blob `ar` names is here: its files, its Trees and their files, and under
    /// a `root_directory_digest` every Directory message and file: a hit must never send a
    /// client after a blob this cache lost. A hit counts as a use of all of them.
    async fn outputs_present(&self, ar: &remexec::ActionResult) -> Result<bool, Status> {
        let Referenced {
            mut blobs,
            trees,
            roots,
        } = referenced_blobs(ar)?;
        let mut messages = Vec::with_capacity(trees.len() + roots.len());
        for t in trees {
            let Some(tree) = self.load_message::<remexec::Tree>(t).await? else {
                return Ok(false);
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
                return Ok(false);
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

#[tonic::async_trait]
impl ActionCache for Svc {
    async fn get_action_result(
        &self,
        req: Request<remexec::GetActionResultRequest>,
    ) -> Result<Response<remexec::ActionResult>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        self.check_digest_function(req.digest_function)?;
        let action = digest("action_digest", req.action_digest.as_ref())?;
        let mut bytes = self
            .store()
            .get_ref(action)
            .map_err(|e| store_status("reading the action cache", &e))?;
        if bytes.is_none()
            && let Some(t) = &self.0.tier
            && let Some(shared) = t.get_ac(action).await?
        {
            // Recorded through another server sharing the bucket: keep a local copy.
            remexec::ActionResult::decode(&shared[..]).map_err(|e| {
                Status::unavailable(format!(
                    "the bucket's result for {action} is undecodable: {e}"
                ))
            })?;
            let _ = self.store().put_ref(action, &shared);
            bytes = Some(shared.into());
        }
        let Some(bytes) = bytes else {
            return Err(Status::not_found(format!("no result for action {action}")));
        };
        let ar = remexec::ActionResult::decode(&bytes[..]).map_err(|e| {
            Status::internal(format!("stored result for {action} is undecodable: {e}"))
        })?;
        if !self.outputs_present(&ar).await? {
            // A dangling entry: drop it, and answer as if it never existed.
            let _ = self.store().remove_ref(action);
            return Err(Status::not_found(format!(
                "the result for action {action} names outputs this cache no longer has"
            )));
        }
        if let Some(t) = &self.0.tier {
            t.used(crate::tier::Kind::Action, [action]);
        }
        Ok(Response::new(ar))
    }

    async fn update_action_result(
        &self,
        req: Request<remexec::UpdateActionResultRequest>,
    ) -> Result<Response<remexec::ActionResult>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        self.check_digest_function(req.digest_function)?;
        let action = digest("action_digest", req.action_digest.as_ref())?;
        let ar = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        // Every digest in it must parse; outputs may arrive later (clients upload first, but
        // the spec does not require it), so presence is checked when the entry is read.
        referenced_blobs(&ar)?;
        let encoded = ar.encode_to_vec();
        self.store()
            .put_ref(action, &encoded)
            .map_err(|e| store_status("writing the action cache", &e))?;
        if let Some(t) = &self.0.tier {
            t.put_ac(action, encoded).await?;
        }
        Ok(Response::new(ar))
    }
}

#[tonic::async_trait]
impl ByteStream for Svc {
    type ReadStream = BoxStream<ReadResponse>;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let req = req.into_inner();
        let r = parse_resource(&req.resource_name, false)?;
        self.check_instance(&r.instance)?;
        let d = r.digest;
        let size = i64::try_from(d.size_bytes).unwrap_or(i64::MAX);
        if req.read_offset < 0 || req.read_offset > size {
            return Err(Status::out_of_range(format!(
                "read_offset {} is outside blob {d} (0..={size})",
                req.read_offset
            )));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} is negative",
                req.read_limit
            )));
        }
        if r.compressed && (req.read_offset != 0 || req.read_limit != 0) {
            return Err(Status::invalid_argument(
                "read_offset/read_limit on compressed-blobs reads are not supported; read from 0",
            ));
        }
        let offset = req.read_offset as u64;
        let end = match req.read_limit {
            0 => d.size_bytes,
            n => (offset + n as u64).min(d.size_bytes),
        };
        if let Some(t) = &self.0.tier
            && !self.store().contains(d)
        {
            // A whole large blob only the bucket has: stream it to the client while it fills
            // the fast tier, instead of fetching it all before the first byte goes out.
            let whole = offset == 0 && end == d.size_bytes && !r.compressed;
            let to_client = |rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, Status>>| {
                t.used(crate::tier::Kind::Blob, [d]);
                let stream = futures::stream::poll_fn({
                    let mut rx = rx;
                    move |cx| rx.poll_recv(cx)
                })
                .map(|item| item.map(|data| ReadResponse { data }));
                Ok(Response::new(Box::pin(stream) as Self::ReadStream))
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
                Err(e) if e.code() == Code::ResourceExhausted && !r.compressed => {
                    return to_client(t.pass_through(d, offset, end).await?);
                }
                Err(e) => return Err(e),
            }
        }
        let source = self.open(d, r.compressed).await?;
        if let Some(t) = &self.0.tier {
            t.used(crate::tier::Kind::Blob, [d]);
        }
        // Background S3 uploads give way while this streams.
        let reading = self.0.tier.as_ref().map(|t| t.reading());
        let stream = read_stream(source, offset, end, r.compressed, self.store().clone(), d).map(
            move |chunk| {
                let _ = &reading;
                chunk
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        req: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("an empty write stream"))??;
        let r = parse_resource(&first.resource_name, true)?;
        self.check_instance(&r.instance)?;
        let d = r.digest;
        self.check_size(d)?;
        let size = i64::try_from(d.size_bytes).unwrap_or(i64::MAX);
        // REAPI: a blob already here ends the write at once, with the full size (or -1 for a
        // compressed upload, whose compressed length the server cannot know).
        let done = || WriteResponse {
            committed_size: if r.compressed { -1 } else { size },
        };
        if self.store().contains(d) {
            self.0.paused.abandon_digest(d);
            self.store().touch_all([d]);
            return Ok(Response::new(done()));
        }
        let name = first.resource_name.clone();
        let (upload, active) = if first.write_offset == 0 {
            // A fresh start (also of a name that was paused: the client chose to start over).
            // Paused uploads of this blob are abandoned: their writers hold its write lock.
            let active = self.0.paused.begin(d);
            let admission = self.admit(d).await?;
            let mut upload = self.start_upload(d, r.compressed)?;
            upload.admission = admission;
            (upload, active)
        } else {
            match self.0.paused.resume(&name) {
                Some((u, active)) if u.received == first.write_offset => (u, active),
                Some((u, _)) => {
                    let received = u.received;
                    self.0.paused.pause(name, u);
                    return Err(Status::invalid_argument(format!(
                        "write_offset {} but {received} bytes of this upload were received: \
                         resume at {received} (QueryWriteStatus says so) or start over at 0",
                        first.write_offset
                    )));
                }
                None => {
                    return Err(Status::invalid_argument(format!(
                        "write_offset {} but no upload of {name:?} is in progress here (it \
                         finished, was never started or waited too long): start at 0",
                        first.write_offset
                    )));
                }
            }
        };
        // Whatever ends this call before the upload is finished (the client's stream breaking,
        // the call being cancelled and this future dropped), the guard pauses the upload for a
        // resume instead of losing what arrived.
        let mut guard = ActiveUpload {
            upload: Some(upload),
            name,
            paused: self.0.paused.clone(),
            active,
        };
        let Some(upload) = guard.upload.as_mut() else {
            return Err(Status::internal("upload state lost"));
        };
        let mut msg = first;
        let streamed: Result<(), Status> = loop {
            if msg.write_offset != upload.received {
                let e = Status::invalid_argument(format!(
                    "write_offset {} but {} bytes were received",
                    msg.write_offset, upload.received
                ));
                guard.upload = None; // a confused client: abandon rather than pause
                return Err(e);
            }
            if !msg.resource_name.is_empty() && msg.resource_name != r.resource_name_of(&msg) {
                guard.upload = None;
                return Err(Status::invalid_argument(
                    "resource_name changed in the middle of a write",
                ));
            }
            // Counted only once the writer has it: a call cancelled while this send waits
            // drops the message, and a resume must send it again (committed_size never runs
            // ahead of the writer).
            let len = msg.data.len() as i64;
            let finish = msg.finish_write;
            if upload.tx.send(Piece::Bytes(msg.data)).await.is_err() {
                break Ok(()); // the writer stopped early (refused): its result says why
            }
            upload.received += len;
            if finish {
                // The writer's input ends only here; a channel closed without it is abandoned.
                let _ = upload.tx.send(Piece::End).await;
                break Ok(());
            }
            msg = match stream.next().await {
                Some(Ok(m)) => m,
                // The guard pauses the upload on the way out.
                Some(Err(e)) => return Err(e),
                None => {
                    // Paused by the guard; never committed unless a Write finishes it.
                    return Err(Status::invalid_argument(format!(
                        "the write stream ended without finish_write after {} bytes; nothing \
                         was stored, and nothing will be without finish_write: resume at \
                         write_offset {} within {} s, or start over at 0",
                        upload.received,
                        upload.received,
                        crate::uploads::PAUSE_TTL.as_secs()
                    )));
                }
            };
        };
        let Some(upload) = guard.upload.take() else {
            return Err(Status::internal("upload state lost"));
        };
        streamed?;
        // Closing the channel ends the writer's input.
        let crate::uploads::Upload {
            tx,
            writer,
            refused,
            _room,
            admission: _admission,
            ..
        } = upload;
        drop(tx);
        let stored = writer
            .await
            .map_err(|e| Status::internal(format!("upload task: {e}")))?;
        if let Some(why) = refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(Status::invalid_argument(format!(
                "upload of {d} refused, nothing stored: {why}"
            )));
        }
        // Wrong content (a digest mismatch, too short, too long) is the client's; anything
        // else (a full disk, an I/O error) the server's.
        stored.map_err(|e| match e.kind() {
            ErrorKind::InvalidData => {
                Status::invalid_argument(format!("upload refused, nothing stored: {e}"))
            }
            _ => store_status("storing the upload", &e),
        })?;
        Ok(Response::new(done()))
    }

    async fn query_write_status(
        &self,
        req: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        // Complete (committed), paused (resumable from `committed_size`), or nothing.
        let name = &req.get_ref().resource_name;
        let r = parse_resource(name, true)?;
        self.check_instance(&r.instance)?;
        if self.store().contains(r.digest) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: i64::try_from(r.digest.size_bytes).unwrap_or(i64::MAX),
                complete: true,
            }));
        }
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: self.0.paused.received(name).unwrap_or(0),
            complete: false,
        }))
    }
}

/// The upload a `Write` call is feeding; paused for a resume if the call ends without
/// finishing it (or abandoned, when another upload of the same blob is active).
struct ActiveUpload {
    upload: Option<crate::uploads::Upload>,
    name: String,
    paused: Arc<crate::uploads::PausedUploads>,
    active: crate::uploads::Active,
}

impl Drop for ActiveUpload {
    fn drop(&mut self) {
        if let Some(u) = self.upload.take() {
            // Only an upload whose writer still waits for bytes can be resumed.
            if u.received > 0 && !u.tx.is_closed() && !u.writer.is_finished() {
                self.paused
                    .pause_or_abandon(std::mem::take(&mut self.name), u, &self.active);
            }
        }
    }
}

impl Resource {
    /// A later message may repeat the resource name; it must be the same blob.
    fn resource_name_of(&self, msg: &WriteRequest) -> String {
        match parse_resource(&msg.resource_name, true) {
            Ok(other) if other == *self => msg.resource_name.clone(),
            _ => String::from("\u{0}different"),
        }
    }
}

/// A blocking `Read` over the chunks an upload's async task sends. It ends at
/// [`Piece::End`]; a channel closed before that (an abandoned upload) is an error, so the
/// writer commits nothing.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
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
/// INVALID_ARGUMENT (its data is wrong), not INTERNAL.
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

impl Svc {
    async fn open(&self, d: Digest, compressed: bool) -> Result<Source, Status> {
        if compressed && let Some(path) = self.store().compressed_file(d) {
            match tokio::fs::File::open(&path).await {
                Ok(f) => return Ok(Source::Frames(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Status::not_found(format!("blob {d} not found")));
                }
                Err(e) => return Err(Status::internal(format!("opening blob {d}: {e}"))),
            }
        }
        match self
            .store()
            .open_blob(d)
            .map_err(|e| read_failed(self.store(), d, &e))?
        {
            Some(reader) => Ok(Source::Blob(BlobSlot::Idle(reader))),
            None => Err(Status::not_found(format!("blob {d} not found"))),
        }
    }
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
) -> impl Stream<Item = Result<ReadResponse, Status>> + Send {
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
                        (Ok(ReadResponse { data: buf }), pos + n as u64, n == 0)
                    }
                    Err(e) => (
                        Err(Status::internal(format!("reading a stored blob: {e}"))),
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
                    Err(e) => Err(Status::internal(format!(
                        "reading a stored blob: its read task failed: {e}"
                    ))),
                };
                let item = chunk.and_then(|data| {
                    let data = if compressed {
                        zstd::bulk::compress(&data, 1)
                            .map_err(|e| Status::internal(format!("zstd: {e}")))?
                    } else {
                        // No copy when the chunk owns its buffer (a pool file's range).
                        Vec::from(data)
                    };
                    Ok(ReadResponse { data })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn resource_names_are_parsed_strictly() {
        let ok = parse_resource(&format!("main/blobs/{H}/4"), false).unwrap();
        assert_eq!((ok.instance.as_str(), ok.compressed), ("main", false));
        let ok = parse_resource(
            &format!("a/b/uploads/u-1/compressed-blobs/zstd/{H}/4/meta"),
            true,
        )
        .unwrap();
        assert_eq!((ok.instance.as_str(), ok.compressed), ("a/b", true));
        assert_eq!(
            parse_resource(&format!("blobs/{H}/4"), false)
                .unwrap()
                .instance,
            ""
        );
        for (bad, write, why) in [
            (format!("main/blobs/{H}"), false, "expected"),
            (format!("main/blobs/{}/4", &H[..63]), false, "resource_name"),
            (format!("main/blobs/{H}/-1"), false, "resource_name"),
            (format!("main/blobs/{H}/4"), true, "uploads/<uuid>"),
            (format!("main/uploads/x/blobs/{H}/4"), false, "for writes"),
            (format!("../blobs/{H}/4"), false, "`..`"),
            (format!("main/compressed-blobs/gzip/{H}/4"), false, "gzip"),
            ("nothing".to_owned(), false, "no `blobs/`"),
        ] {
            let e = parse_resource(&bad, write).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            assert!(e.message().contains(why), "{bad}: {}", e.message());
        }
    }
}
