//! An in-process REAPI server (CAS, ByteStream, ActionCache, Capabilities) on 127.0.0.1:0, with
//! fault knobs for what real servers cannot be made to do on demand: fail a method with a code,
//! fail the next N calls, be slow, serve corrupted or truncated content, pretend a blob is gone,
//! drop a stream half way. It counts every call per method so tests can assert how many RPCs a
//! layer made.
//!
//! ```no_run
//! # async fn f() {
//! use testutil::server::{Method, TestServer};
//! let server = TestServer::start().await;
//! let d = server.put_blob(b"hello");
//! server.knobs().fail_next(Method::BatchReadBlobs, 2, tonic::Code::Unavailable);
//! // ... point a client at server.address() ...
//! assert_eq!(server.calls(Method::BatchReadBlobs), 0);
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hashing::Digest;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_server::ActionCache, action_cache_server::ActionCacheServer,
    capabilities_server::Capabilities, capabilities_server::CapabilitiesServer, compressor,
    content_addressable_storage_server::ContentAddressableStorage,
    content_addressable_storage_server::ContentAddressableStorageServer, digest_function,
};
use reapi::build::bazel::semver::SemVer;
use reapi::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse, byte_stream_server::ByteStream, byte_stream_server::ByteStreamServer,
};
use reapi::google::rpc::Status as RpcStatus;
use tonic::{Code, Request, Response, Status, Streaming};

/// The RPCs the server counts and can fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Capabilities.GetCapabilities
    GetCapabilities,
    /// CAS.FindMissingBlobs
    FindMissingBlobs,
    /// CAS.BatchReadBlobs
    BatchReadBlobs,
    /// CAS.BatchUpdateBlobs
    BatchUpdateBlobs,
    /// ByteStream.Read
    Read,
    /// ByteStream.Write
    Write,
    /// ActionCache.GetActionResult
    GetActionResult,
    /// ActionCache.UpdateActionResult
    UpdateActionResult,
}

/// Fault knobs. Change them through [`TestServer::knobs`].
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Every call of the method fails with this code.
    pub error: HashMap<Method, Code>,
    /// The next N calls of the method fail with the code, then calls succeed again.
    pub fail_next: HashMap<Method, (u32, Code)>,
    /// Each call of the method waits this long first.
    pub delay: HashMap<Method, Duration>,
    /// Blobs served with one byte flipped (same length).
    pub corrupt: HashSet<Digest>,
    /// Blobs served one byte short by ByteStream.Read.
    pub truncate: HashSet<Digest>,
    /// Blobs the server pretends not to have (reads and FindMissingBlobs), though it keeps them.
    pub missing: HashSet<Digest>,
    /// ByteStream.Read sends the first chunk, then fails the stream with UNAVAILABLE.
    pub drop_mid_stream: bool,
    /// Advertised `max_batch_total_size_bytes`; larger batch requests fail RESOURCE_EXHAUSTED.
    pub batch_limit: i64,
    /// Bytes per ByteStream.Read response message.
    pub read_chunk_size: usize,
    /// Advertise (and accept) zstd.
    pub zstd: bool,
    /// Advertised `action_cache_update_enabled`; when false, UpdateActionResult is refused
    /// with PERMISSION_DENIED, as a read-only cache does.
    pub update_enabled: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            error: HashMap::new(),
            fail_next: HashMap::new(),
            delay: HashMap::new(),
            corrupt: HashSet::new(),
            truncate: HashSet::new(),
            missing: HashSet::new(),
            drop_mid_stream: false,
            batch_limit: 4 * 1024 * 1024 - 1024,
            read_chunk_size: 2 * 1024 * 1024,
            zstd: false,
            update_enabled: true,
        }
    }
}

impl Knobs {
    /// Fails the next `n` calls of `method` with `code`.
    pub fn fail_next(&mut self, method: Method, n: u32, code: Code) -> &mut Self {
        self.fail_next.insert(method, (n, code));
        self
    }
}

#[derive(Debug, Default)]
struct State {
    blobs: Mutex<HashMap<Digest, Bytes>>,
    action_results: Mutex<HashMap<Digest, remexec::ActionResult>>,
    calls: Mutex<HashMap<Method, u64>>,
    /// Compressed (zstd) reads and writes served, to prove compression was used.
    zstd_transfers: Mutex<u64>,
    knobs: Mutex<Knobs>,
    /// The `RequestMetadata` of every ActionCache call, in order.
    request_metadata: Mutex<Vec<(Method, remexec::RequestMetadata)>>,
    /// Whether `request_metadata` is kept (off for memory measurements: it grows per call).
    forget_metadata: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    /// Counts the call, applies delay and failure knobs.
    async fn enter(&self, method: Method) -> Result<(), Status> {
        *lock(&self.calls).entry(method).or_default() += 1;
        let (delay, fail) = {
            let mut k = lock(&self.knobs);
            let delay = k.delay.get(&method).copied();
            let mut fail = k.error.get(&method).copied();
            if let Some((n, code)) = k.fail_next.get_mut(&method)
                && *n > 0
            {
                *n -= 1;
                fail = Some(*code);
            }
            (delay, fail)
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        match fail {
            // A RESOURCE_EXHAUSTED fault says what a full server says (REAPI's wording).
            Some(Code::ResourceExhausted) => Err(Status::new(
                Code::ResourceExhausted,
                format!("injected fault on {method:?}: insufficient disk quota"),
            )),
            Some(code) => Err(Status::new(code, format!("injected fault on {method:?}"))),
            None => Ok(()),
        }
    }

    fn knobs(&self) -> Knobs {
        lock(&self.knobs).clone()
    }

    /// Records the call's `RequestMetadata` header, if it decodes.
    fn note_metadata(&self, method: Method, md: &tonic::metadata::MetadataMap) {
        let decoded = md
            .get_bin("build.bazel.remote.execution.v2.requestmetadata-bin")
            .and_then(|v| v.to_bytes().ok())
            .and_then(|b| <remexec::RequestMetadata as prost::Message>::decode(&b[..]).ok());
        if let Some(m) = decoded
            && !self
                .forget_metadata
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            lock(&self.request_metadata).push((method, m));
        }
    }

    /// The blob as the server would serve it (corruption and truncation applied), or None if
    /// "missing". Without faults this is a cheap reference to the stored bytes, not a copy.
    fn serve(&self, d: &Digest, k: &Knobs) -> Option<Bytes> {
        if k.missing.contains(d) {
            return None;
        }
        let data = lock(&self.blobs).get(d)?.clone();
        if k.corrupt.contains(d) && !data.is_empty() {
            let mut v = data.to_vec();
            let i = v.len() / 2;
            v[i] ^= 0x01;
            return Some(v.into());
        }
        if k.truncate.contains(d) && !data.is_empty() {
            return Some(data.slice(..data.len() - 1));
        }
        Some(data)
    }

    fn store(&self, d: Digest, data: Vec<u8>) -> Result<(), Status> {
        if Digest::of_bytes(&data) != d {
            return Err(Status::invalid_argument(format!(
                "uploaded content does not match {d}"
            )));
        }
        lock(&self.blobs).insert(d, data.into());
        Ok(())
    }
}

/// A running in-process server. Dropping it stops the server.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    tls: bool,
}

impl TestServer {
    /// Starts a server on a free 127.0.0.1 port with default knobs.
    pub async fn start() -> TestServer {
        Self::start_with(Knobs::default()).await
    }

    /// Starts a server with `knobs`.
    pub async fn start_with(knobs: Knobs) -> TestServer {
        Self::start_inner(knobs, None).await
    }

    /// Starts a TLS server (address `grpcs://127.0.0.1:PORT`) presenting `cert_pem`/`key_pem`;
    /// with `client_ca_pem`, clients must present a certificate signed by that CA.
    pub async fn start_tls(
        cert_pem: &str,
        key_pem: &str,
        client_ca_pem: Option<&str>,
    ) -> TestServer {
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
        if let Some(ca) = client_ca_pem {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        Self::start_inner(Knobs::default(), Some(tls)).await
    }

    async fn start_inner(
        knobs: Knobs,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> TestServer {
        let is_tls = tls.is_some();
        let state = Arc::new(State {
            knobs: Mutex::new(knobs),
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = Svc(state.clone());
        let max = 64 * 1024 * 1024;
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).expect("TLS configuration");
        }
        let router = builder
            .initial_stream_window_size(Some(16 * 1024 * 1024))
            .initial_connection_window_size(Some(32 * 1024 * 1024))
            .add_service(CapabilitiesServer::new(svc.clone()))
            .add_service(
                ContentAddressableStorageServer::new(svc.clone())
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(ActionCacheServer::new(svc.clone()))
            .add_service(
                ByteStreamServer::new(svc)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            );
        // Small responses must not wait for Nagle + delayed ACK (a 40 ms stall per RPC).
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        });
        tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        TestServer {
            addr,
            state,
            shutdown: Some(tx),
            tls: is_tls,
        }
    }

    /// `grpc://127.0.0.1:PORT` (or `grpcs://` for a TLS server)
    pub fn address(&self) -> String {
        let scheme = if self.tls { "grpcs" } else { "grpc" };
        format!("{scheme}://{}", self.addr)
    }

    /// The socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The knobs, to change them.
    pub fn knobs(&self) -> MutexGuard<'_, Knobs> {
        lock(&self.state.knobs)
    }

    /// How many times `method` was called.
    pub fn calls(&self, method: Method) -> u64 {
        lock(&self.state.calls).get(&method).copied().unwrap_or(0)
    }

    /// Calls of all methods.
    pub fn total_calls(&self) -> u64 {
        lock(&self.state.calls).values().sum()
    }

    /// Resets the call counters.
    pub fn reset_calls(&self) {
        lock(&self.state.calls).clear();
    }

    /// How many reads and writes used zstd.
    pub fn zstd_transfers(&self) -> u64 {
        *lock(&self.state.zstd_transfers)
    }

    /// Puts a blob directly (no RPC).
    pub fn put_blob(&self, data: &[u8]) -> Digest {
        let d = Digest::of_bytes(data);
        lock(&self.state.blobs).insert(d, Bytes::copy_from_slice(data));
        d
    }

    /// Whether the server really holds `d` (knobs ignored).
    pub fn has_blob(&self, d: Digest) -> bool {
        lock(&self.state.blobs).contains_key(&d)
    }

    /// Really deletes a blob.
    pub fn remove_blob(&self, d: Digest) {
        lock(&self.state.blobs).remove(&d);
    }

    /// Number of blobs held.
    pub fn blob_count(&self) -> usize {
        lock(&self.state.blobs).len()
    }

    /// Puts an action result directly.
    pub fn put_action_result(&self, action: Digest, result: remexec::ActionResult) {
        lock(&self.state.action_results).insert(action, result);
    }

    /// The stored action result, if any.
    pub fn action_result(&self, action: Digest) -> Option<remexec::ActionResult> {
        lock(&self.state.action_results).get(&action).cloned()
    }

    /// Number of action results held.
    /// Stops keeping each call's `RequestMetadata` (which grows the server's memory with every
    /// call), for benchmarks that measure the client's memory in the same process.
    pub fn forget_request_metadata(&self) {
        self.state
            .forget_metadata
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The `RequestMetadata` each ActionCache call carried, in order.
    pub fn request_metadata(&self) -> Vec<(Method, remexec::RequestMetadata)> {
        lock(&self.state.request_metadata).clone()
    }

    /// How many action results the server holds.
    pub fn action_result_count(&self) -> usize {
        lock(&self.state.action_results).len()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug, Clone)]
struct Svc(Arc<State>);

fn status_ok() -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 0,
        message: String::new(),
        details: vec![],
    })
}

fn status(code: Code, message: &str) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message: message.to_owned(),
        details: vec![],
    })
}

fn parse_digest(d: Option<&remexec::Digest>) -> Result<Digest, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument("missing digest"))?;
    Digest::try_from(d).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Parses `[instance/]blobs/H/S` or `[instance/]compressed-blobs/zstd/H/S` (after any
/// `uploads/UUID/` part), returning the digest and whether it is compressed.
fn parse_resource(name: &str) -> Result<(Digest, bool), Status> {
    let parts: Vec<&str> = name.split('/').collect();
    let bad = || Status::invalid_argument(format!("bad resource name {name:?}"));
    let pos = parts
        .iter()
        .position(|p| *p == "blobs" || *p == "compressed-blobs")
        .ok_or_else(bad)?;
    let compressed = parts[pos] == "compressed-blobs";
    let rest = &parts[pos + 1..];
    let (hash, size) = match (compressed, rest) {
        (false, [h, s, ..]) => (*h, *s),
        (true, ["zstd", h, s, ..]) => (*h, *s),
        _ => return Err(bad()),
    };
    let d = format!("{hash}/{size}")
        .parse::<Digest>()
        .map_err(|_| bad())?;
    Ok((d, compressed))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Capabilities for Svc {
    async fn get_capabilities(
        &self,
        _req: Request<remexec::GetCapabilitiesRequest>,
    ) -> Result<Response<remexec::ServerCapabilities>, Status> {
        self.0.enter(Method::GetCapabilities).await?;
        let k = self.0.knobs();
        let mut compressors = vec![];
        if k.zstd {
            compressors.push(compressor::Value::Zstd as i32);
        }
        Ok(Response::new(remexec::ServerCapabilities {
            cache_capabilities: Some(remexec::CacheCapabilities {
                digest_functions: vec![digest_function::Value::Sha256 as i32],
                max_batch_total_size_bytes: k.batch_limit,
                supported_compressors: compressors.clone(),
                supported_batch_update_compressors: compressors,
                action_cache_update_capabilities: Some(remexec::ActionCacheUpdateCapabilities {
                    update_enabled: k.update_enabled,
                }),
                ..Default::default()
            }),
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
        self.0.enter(Method::FindMissingBlobs).await?;
        let k = self.0.knobs();
        let blobs = lock(&self.0.blobs);
        let missing = req
            .into_inner()
            .blob_digests
            .into_iter()
            .filter(|d| match Digest::try_from(d) {
                Ok(d) => k.missing.contains(&d) || !blobs.contains_key(&d),
                Err(_) => true,
            })
            .collect();
        Ok(Response::new(remexec::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        req: Request<remexec::BatchUpdateBlobsRequest>,
    ) -> Result<Response<remexec::BatchUpdateBlobsResponse>, Status> {
        self.0.enter(Method::BatchUpdateBlobs).await?;
        let k = self.0.knobs();
        let req = req.into_inner();
        let total: usize = req.requests.iter().map(|r| r.data.len()).sum();
        if total as i64 > k.batch_limit {
            return Err(Status::resource_exhausted(format!(
                "batch of {total} bytes exceeds the limit of {}",
                k.batch_limit
            )));
        }
        let mut responses = vec![];
        for r in req.requests {
            let d = parse_digest(r.digest.as_ref())?;
            let data = if r.compressor == compressor::Value::Zstd as i32 {
                *lock(&self.0.zstd_transfers) += 1;
                zstd::bulk::decompress(&r.data, d.size_bytes as usize)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
            } else {
                r.data
            };
            let st = match self.0.store(d, data) {
                Ok(()) => status_ok(),
                Err(e) => status(e.code(), e.message()),
            };
            responses.push(remexec::batch_update_blobs_response::Response {
                digest: Some(d.into()),
                status: st,
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
        self.0.enter(Method::BatchReadBlobs).await?;
        let k = self.0.knobs();
        let req = req.into_inner();
        let total: i64 = req.digests.iter().map(|d| d.size_bytes).sum();
        if total > k.batch_limit {
            return Err(Status::resource_exhausted(format!(
                "batch of {total} bytes exceeds the limit of {}",
                k.batch_limit
            )));
        }
        let zstd_ok = k.zstd
            && req
                .acceptable_compressors
                .contains(&(compressor::Value::Zstd as i32));
        let mut responses = vec![];
        // Answer in reverse order: clients must match by digest, not position.
        for d in req.digests.iter().rev() {
            let d = parse_digest(Some(d))?;
            let resp = match self.0.serve(&d, &k) {
                Some(data) if zstd_ok && data.len() > 1024 => {
                    *lock(&self.0.zstd_transfers) += 1;
                    remexec::batch_read_blobs_response::Response {
                        digest: Some(d.into()),
                        data: zstd::bulk::compress(&data, 1)
                            .map_err(|e| Status::internal(e.to_string()))?,
                        compressor: compressor::Value::Zstd as i32,
                        status: status_ok(),
                    }
                }
                Some(data) => remexec::batch_read_blobs_response::Response {
                    digest: Some(d.into()),
                    data: data.to_vec(),
                    compressor: 0,
                    status: status_ok(),
                },
                None => remexec::batch_read_blobs_response::Response {
                    digest: Some(d.into()),
                    data: vec![],
                    compressor: 0,
                    status: status(Code::NotFound, "not found"),
                },
            };
            responses.push(resp);
        }
        Ok(Response::new(remexec::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<remexec::GetTreeResponse>;

    async fn get_tree(
        &self,
        _req: Request<remexec::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("GetTree"))
    }
}

#[tonic::async_trait]
impl ActionCache for Svc {
    async fn get_action_result(
        &self,
        req: Request<remexec::GetActionResultRequest>,
    ) -> Result<Response<remexec::ActionResult>, Status> {
        self.0
            .note_metadata(Method::GetActionResult, req.metadata());
        self.0.enter(Method::GetActionResult).await?;
        let d = parse_digest(req.into_inner().action_digest.as_ref())?;
        lock(&self.0.action_results)
            .get(&d)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no action result for {d}")))
    }

    async fn update_action_result(
        &self,
        req: Request<remexec::UpdateActionResultRequest>,
    ) -> Result<Response<remexec::ActionResult>, Status> {
        self.0
            .note_metadata(Method::UpdateActionResult, req.metadata());
        self.0.enter(Method::UpdateActionResult).await?;
        if !self.0.knobs().update_enabled {
            return Err(Status::permission_denied("this cache is read-only"));
        }
        let req = req.into_inner();
        let d = parse_digest(req.action_digest.as_ref())?;
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("missing action_result"))?;
        lock(&self.0.action_results).insert(d, result.clone());
        Ok(Response::new(result))
    }
}

#[tonic::async_trait]
impl ByteStream for Svc {
    type ReadStream = BoxStream<ReadResponse>;

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        self.0.enter(Method::Read).await?;
        let k = self.0.knobs();
        let req = req.into_inner();
        let (d, compressed) = parse_resource(&req.resource_name)?;
        let mut data = self
            .0
            .serve(&d, &k)
            .ok_or_else(|| Status::not_found(format!("{d} not found")))?;
        if compressed {
            if !k.zstd {
                return Err(Status::invalid_argument("compression not supported"));
            }
            *lock(&self.0.zstd_transfers) += 1;
            data = zstd::bulk::compress(&data, 1)
                .map_err(|e| Status::internal(e.to_string()))?
                .into();
        }
        // Chunks are cut lazily as the client reads, so a large read holds only the chunks in
        // flight, not a second copy of the blob.
        let chunk = k.read_chunk_size.max(1);
        let drop_after_first = k.drop_mid_stream;
        let stream = futures::stream::unfold((data, 0usize), move |(data, sent)| async move {
            if sent >= data.len() || (drop_after_first && sent > 0) {
                if drop_after_first && sent > 0 && sent < usize::MAX {
                    let err = Status::unavailable("injected: connection dropped mid-stream");
                    return Some((Err(err), (data, usize::MAX)));
                }
                return None;
            }
            let end = (sent + chunk).min(data.len());
            let msg = ReadResponse {
                data: data[sent..end].to_vec(),
            };
            Some((Ok(msg), (data, end)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        req: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.0.enter(Method::Write).await?;
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty write"))??;
        let (d, compressed) = parse_resource(&first.resource_name)?;
        if compressed {
            *lock(&self.0.zstd_transfers) += 1;
        }
        let size = i64::try_from(d.size_bytes).unwrap_or(i64::MAX);
        // Like BuildGrid: a blob we already have ends the stream at once with its full size.
        if self.0.serve(&d, &self.0.knobs()).is_some() {
            return Ok(Response::new(WriteResponse {
                committed_size: size,
            }));
        }
        let mut data = first.data;
        let mut finished = first.finish_write;
        while !finished {
            let msg = stream
                .next()
                .await
                .ok_or_else(|| Status::invalid_argument("stream ended without finish_write"))??;
            if msg.write_offset != data.len() as i64 {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} but {} bytes received",
                    msg.write_offset,
                    data.len()
                )));
            }
            data.extend_from_slice(&msg.data);
            finished = msg.finish_write;
        }
        let content = if compressed {
            zstd::stream::decode_all(&data[..])
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        } else {
            data
        };
        self.0.store(d, content)?;
        Ok(Response::new(WriteResponse {
            committed_size: size,
        }))
    }

    async fn query_write_status(
        &self,
        _req: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("QueryWriteStatus"))
    }
}
