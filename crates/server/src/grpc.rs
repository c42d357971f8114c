//! The gRPC front end: the REAPI services (Capabilities, CAS, ByteStream, ActionCache; Remote
//! Asset lives in [`crate::asset`]). Each handler translates a request into calls on the
//! [`Core`], which holds every rule, and the answer (or [`Refusal`]) into gRPC terms. What is
//! gRPC's own stays here: resource-name parsing, ByteStream's resumable writes, GetTree's
//! pages, batch framing.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use hashing::Digest;
use prost::Message;
use reapi::build::bazel::remote::asset::v1::{fetch_server::FetchServer, push_server::PushServer};
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

use crate::core::{Core, Refusal, digest};
use crate::uploads::Piece;
use crate::{Inner, MAX_BATCH_TOTAL_BYTES, MAX_MESSAGE_BYTES, ServerError};

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
            return Ok(Some(self.svc.directory(d).await?));
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

/// The gRPC services: a translation of the core.
#[derive(Debug, Clone)]
struct Svc(Core);

impl std::ops::Deref for Svc {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

/// The gRPC router: every service, behind [`CallLayer`].
pub(crate) type Router =
    tonic::transport::server::Router<tower_layer::Stack<CallLayer, tower_layer::Identity>>;

/// Builds the router with every service (and the auth check when a token is set).
pub(crate) fn router(
    inner: Arc<Inner>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<Router, ServerError> {
    let svc = Svc(Core(inner.clone()));
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(6 * 1024 * 1024))
        .initial_connection_window_size(Some(12 * 1024 * 1024));
    if let Some((cert, key)) = &inner.options.tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &inner.options.tls_client_ca {
            // Mutual TLS: a client without a certificate this CA signed is refused in the
            // handshake.
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .layer(CallLayer(inner.clone()))
        .add_service(CapabilitiesServer::new(svc.clone()))
        .add_service(
            ContentAddressableStorageServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ActionCacheServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .add_service(
            ByteStreamServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(FetchServer::new(crate::asset::AssetSvc(inner.clone())))
        .add_service(PushServer::new(crate::asset::AssetSvc(inner)))
        // Health answers without credentials, as load balancers and orchestrators ask.
        .add_service(health))
}

/// The role each gRPC method needs (health needs none; anything else not listed: read).
fn role_for(method: &str) -> crate::core::Role {
    use crate::core::Role;
    match method {
        "BatchUpdateBlobs" | "UpdateActionResult" | "Write" | "QueryWriteStatus" | "PushBlob"
        | "PushDirectory" => Role::Write,
        _ => Role::Read,
    }
}

/// The gRPC methods this server answers, by name: the only values of the `method` label (any
/// other path counts as `other`, so a client cannot grow the label set).
const METHODS: [&str; 16] = [
    "GetCapabilities",
    "FindMissingBlobs",
    "BatchUpdateBlobs",
    "BatchReadBlobs",
    "GetTree",
    "GetActionResult",
    "UpdateActionResult",
    "Read",
    "Write",
    "QueryWriteStatus",
    "FetchBlob",
    "FetchDirectory",
    "PushBlob",
    "PushDirectory",
    "Check",
    "Watch",
];

/// What every gRPC call meets before a service (one tower layer around the router):
/// authentication and the role its method needs (`role_for`; a refusal is UNAUTHENTICATED or
/// PERMISSION_DENIED naming the role, answered here; health checks pass without credentials),
/// the caller's [`crate::core::Identity`] put in the request's extensions, and the call counted
/// by method and status code with its latency (to the response's headers: a streamed answer's
/// first byte; an error answered before any message carries its status there, a call whose
/// headers carry none started well and counts as OK), and, once the response is sent, its
/// access-log line and its invocation's counts for the status page (request and response
/// bodies counted as they pass; a GetActionResult's status is its hit or miss).
#[derive(Debug, Clone)]
pub(crate) struct CallLayer(pub Arc<Inner>);

impl<S> tower_layer::Layer<S> for CallLayer {
    type Service = Call<S>;
    fn layer(&self, inner: S) -> Call<S> {
        Call {
            inner,
            server: self.0.clone(),
        }
    }
}

/// See [`CallLayer`].
#[derive(Debug, Clone)]
pub(crate) struct Call<S> {
    inner: S,
    server: Arc<Inner>,
}

impl<S, RB> tower_service::Service<http::Request<tonic::body::Body>> for Call<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: hyper::body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path();
        let name = path.rsplit('/').next().unwrap_or("");
        let method = METHODS
            .iter()
            .find(|m| **m == name)
            .copied()
            .unwrap_or("other");
        let health = path.starts_with("/grpc.health.v1.Health/");
        let started = std::time::Instant::now();
        let server = self.server.clone();
        let caller = crate::status::caller(req.headers());
        // What the access log says of the call, when there is one.
        let entry = server.access.as_ref().map(|_| crate::access::Entry {
            peer: connect_info(&req)
                .and_then(|i| i.remote_addr())
                .map(|a| a.to_string()),
            protocol: "grpc",
            method,
            resource: path.to_owned(),
            invocation_id: caller
                .as_ref()
                .map(|c| c.invocation_id.clone())
                .filter(|id| !id.is_empty()),
            ..Default::default()
        });
        let mut done = Done {
            server: server.clone(),
            started,
            entry,
            call: crate::status::Call {
                caller,
                ..Default::default()
            },
        };
        let allowed = if health {
            Ok(None)
        } else {
            let presented = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.strip_prefix("Bearer ").unwrap_or("").as_bytes().to_vec());
            let names = client_certificate_names(&req);
            crate::core::authenticate(&server.options, presented.as_deref(), &names).and_then(
                |who| {
                    crate::core::authorize(&who, role_for(name), name)?;
                    Ok(Some(who))
                },
            )
        };
        let up = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let call = match allowed {
            Ok(who) => {
                let mut req = req.map(|body| {
                    tonic::body::Body::new(crate::status::Counted {
                        inner: body,
                        tally: up.clone(),
                        on_drop: None,
                    })
                });
                if let Some(who) = who {
                    done.call.identity = Some(who.name.clone());
                    req.extensions_mut().insert(who);
                }
                self.inner.call(req)
            }
            Err(refusal) => {
                let code = crate::metrics::grpc_code_label(refusal.grpc_code() as i32);
                server
                    .metrics
                    .request("grpc", method, code, started.elapsed());
                done.finish(code);
                let status = Status::from(refusal);
                return Box::pin(async move { Ok(status.into_http::<tonic::body::Body>()) });
            }
        };
        Box::pin(async move {
            let resp = match call.await {
                Ok(r) => r,
                Err(e) => {
                    server
                        .metrics
                        .request("grpc", method, "UNAVAILABLE", started.elapsed());
                    done.finish("UNAVAILABLE");
                    return Err(e);
                }
            };
            // An error answered before any message carries its status in the headers; a call
            // whose headers carry none started well and counts as OK.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map_or("OK", |v| {
                    // An unparsable status is UNKNOWN, as gRPC reads it.
                    let unknown = tonic::Code::Unknown as i32;
                    crate::metrics::grpc_code_label(v.trim().parse().unwrap_or(unknown))
                });
            server
                .metrics
                .request("grpc", method, code, started.elapsed());
            if method == "GetActionResult" {
                done.call.lookup = match code {
                    "OK" => Some(crate::status::Lookup::Hit),
                    // Only here is the message decoded: it tells the two misses apart.
                    "NOT_FOUND"
                        if Status::from_header_map(resp.headers())
                            .is_some_and(|s| s.message().contains(crate::core::OUTPUTS_GONE)) =>
                    {
                        Some(crate::status::Lookup::OutputsGone)
                    }
                    "NOT_FOUND" => Some(crate::status::Lookup::Miss),
                    _ => None,
                };
            }
            let down = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let tally = down.clone();
            // Counted when the response body is done with (sent, or the call abandoned).
            let on_drop = Box::new(move || {
                done.call.bytes_up = up.load(std::sync::atomic::Ordering::Relaxed);
                done.call.bytes_down = down.load(std::sync::atomic::Ordering::Relaxed);
                done.finish(code);
            });
            Ok(resp.map(|body| {
                tonic::body::Body::new(crate::status::Counted {
                    inner: body,
                    tally,
                    on_drop: Some(on_drop),
                })
            }))
        })
    }
}

/// The names of the client certificate a request's TLS connection presented (see
/// [`crate::mtls`]); empty without one.
fn client_certificate_names<B>(req: &http::Request<B>) -> Vec<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|t| t.peer_certs())
        .and_then(|certs| {
            certs
                .first()
                .map(|leaf| crate::mtls::certificate_names(leaf))
        })
        .unwrap_or_default()
}

/// The TCP connection a request came on (through TLS or not).
fn connect_info<B>(req: &http::Request<B>) -> Option<&tonic::transport::server::TcpConnectInfo> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions().get::<TcpConnectInfo>().or_else(|| {
        req.extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(|t| t.get_ref())
    })
}

/// A call's bookkeeping once its response is sent (or the call abandoned): the access log's
/// line (its duration to the end of the response) and its invocation's counts.
struct Done {
    server: Arc<Inner>,
    started: std::time::Instant,
    entry: Option<crate::access::Entry>,
    call: crate::status::Call,
}

impl Done {
    fn finish(self, code: &str) {
        let Done {
            server,
            started,
            entry,
            call,
        } = self;
        if let (Some(log), Some(mut e)) = (server.access.as_ref(), entry) {
            e.identity = call.identity.clone();
            e.status = code.to_owned();
            e.duration = started.elapsed();
            log.record(&e);
        }
        server.invocations.record(call);
    }
}

/// The services `grpc.health.v1.Health` reports on (besides the server as a whole, "").
const HEALTH_SERVICES: [&str; 5] = [
    "",
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "google.bytestream.ByteStream",
];

/// How often the health status follows the core's readiness.
const HEALTH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `reporter`'s statuses at the core's readiness (SERVING or NOT_SERVING, every
/// [`HEALTH_EVERY`]) until `stop` completes, then reports NOT_SERVING.
pub(crate) async fn follow_readiness(
    core: Core,
    reporter: tonic_health::server::HealthReporter,
    stop: impl std::future::Future<Output = ()>,
) {
    use tonic_health::ServingStatus;
    tokio::pin!(stop);
    loop {
        let c = core.clone();
        let ready = tokio::task::spawn_blocking(move || c.readiness().ready())
            .await
            .unwrap_or(false);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in HEALTH_SERVICES {
            reporter.set_service_status(name, status).await;
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
    for name in HEALTH_SERVICES {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
}

fn rpc_status(code: Code, message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message,
        details: vec![],
    })
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
        let missing = self.find_missing(digests).await;
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
                self.count_bytes(
                    "grpc",
                    "in",
                    r.compressor == compressor::Value::Zstd as i32,
                    r.data.len() as u64,
                );
                let data = match r.compressor {
                    c if c == compressor::Value::Identity as i32 => r.data,
                    c if c == compressor::Value::Zstd as i32 => {
                        let cap = usize::try_from(d.size_bytes).unwrap_or(usize::MAX);
                        zstd::bulk::decompress(&r.data, cap)
                            .map_err(|e| Refusal::invalid(format!("undecodable zstd data: {e}")))?
                    }
                    other => {
                        return Err(Refusal::invalid(format!(
                            "compressor {other} is not supported"
                        )));
                    }
                };
                self.put_blob(d, &data).await
            }
            .await;
            responses.push(remexec::batch_update_blobs_response::Response {
                digest: Some(d.into()),
                status: match result {
                    Ok(()) => rpc_status(Code::Ok, String::new()),
                    Err(r) => rpc_status(r.grpc_code(), r.message),
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
        self.ensure_all_local(&digests).await?;
        let mut responses = Vec::with_capacity(digests.len());
        for d in digests {
            let (data, status, comp) = match self.read_small(d) {
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
                Err(r) => (
                    vec![],
                    rpc_status(r.grpc_code(), r.message),
                    compressor::Value::Identity,
                ),
            };
            self.count_bytes(
                "grpc",
                "out",
                comp == compressor::Value::Zstd,
                data.len() as u64,
            );
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
        Ok(Response::new(self.0.get_action_result(action.hash).await?))
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
        self.0.update_action_result(action.hash, &ar).await?;
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
        let core = self.0.clone();
        let compressed = r.compressed;
        let stream = self
            .0
            .read(d, offset, end, r.compressed)
            .await?
            .map(move |chunk| {
                chunk
                    // No copy when the chunk owns its buffer (a pool file's range).
                    .map(|data| {
                        core.count_bytes("grpc", "out", compressed, data.len() as u64);
                        ReadResponse {
                            data: Vec::from(data),
                        }
                    })
                    .map_err(Status::from)
            });
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
        if self.already_stored(d) {
            return Ok(Response::new(done()));
        }
        let name = first.resource_name.clone();
        let (upload, active) = if first.write_offset == 0 {
            // A fresh start (also of a name that was paused: the client chose to start over).
            // Paused uploads of this blob are abandoned: their writers hold its write lock.
            let active = self.0.0.paused.begin(d);
            (self.start_upload(d, r.compressed).await?, active)
        } else {
            match self.0.0.paused.resume(&name) {
                Some((u, active)) if u.received == first.write_offset => (u, active),
                Some((u, _)) => {
                    let received = u.received;
                    self.0.0.paused.pause(name, u);
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
            paused: self.0.0.paused.clone(),
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
            self.count_bytes("grpc", "in", r.compressed, len as u64);
            let finish = msg.finish_write;
            if upload.tx.send(Piece::Bytes(msg.data.into())).await.is_err() {
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
        // Closing the channel ends the writer's input; the core says whether it was stored.
        self.finish_upload(upload).await?;
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
            committed_size: self.0.0.paused.received(name).unwrap_or(0),
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
