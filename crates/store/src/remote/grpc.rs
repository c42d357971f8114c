//! The REAPI gRPC provider: CAS (batch + ByteStream, optional zstd) and ActionCache over tonic.
//!
//! Every call goes through `GrpcProvider::call`: wait for a concurrency slot, *then* start the
//! per-request timeout (time queued for a slot does not count), attach the static headers and
//! the REAPI `RequestMetadata`, and classify a failure once, from its gRPC code. Operations retry
//! with `retry::Retry`; a download resets its destination before each retry.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use hashing::Digest;
use prost::Message;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    capabilities_client::CapabilitiesClient, compressor,
    content_addressable_storage_client::ContentAddressableStorageClient, digest_function,
};
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OnceCell, Semaphore};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, BinaryMetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::retry::{Retry, RetryPolicy};
use super::{ActionCacheProvider, ByteStoreProvider};
use crate::destination::LoadDestination;
use crate::error::{ErrorKind, StoreError};

/// The gRPC message cap nearly every server enforces (and tonic's default).
pub const GRPC_MESSAGE_CAP: u64 = 4 * 1024 * 1024;
/// Room left in a batch message for per-blob framing and the request's other fields.
const BATCH_OVERHEAD_PER_BLOB: u64 = 256;
const BATCH_OVERHEAD_FIXED: u64 = 16 * 1024;
/// Digests per FindMissingBlobs request: ≈ 80 bytes each, so ≈ 800 KB, well under the cap.
const FIND_MISSING_BATCH: usize = 10_000;
/// A write attempt's fixed allowance (a round trip and the server's own work): with
/// [`WRITE_RATE`] it sets each write's deadline, so a hung server costs a small write seconds
/// instead of the whole request timeout per attempt (3 × 30 s before).
const WRITE_BASE: Duration = Duration::from_secs(5);

/// The slowest healthy upload rate a write's deadline allows for its bytes (10 MiB/s).
const WRITE_RATE: u64 = 10 * 1024 * 1024;

/// Header REAPI servers read the RequestMetadata from.
const REQUEST_METADATA_HEADER: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";
/// HTTP/2 receive windows. The default 64 KiB caps a loopback stream near 1.5 GB/s; a few MiB
/// remove that cap (and cover a LAN's bandwidth-delay product) while bounding what piles up in
/// memory when the disk is slower than the network. Measured on a 256 MiB download (peak RSS
/// growth / throughput): 16+32 MiB ≈ 40 MiB; 8+16 ≈ 30–33 MiB / ≈ 450 MiB/s; 6+12 ≈ 26–27 MiB /
/// ≈ 425 MiB/s; 4+8 ≈ 22–24 MiB / ≈ 360 MiB/s.
const STREAM_WINDOW: u32 = 6 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 12 * 1024 * 1024;

/// Options for [`GrpcProvider::connect`]. `GrpcOptions::default()` suits most servers.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// REAPI instance name ("" for none).
    pub instance_name: String,
    /// Headers sent with every call, e.g. `("authorization", "Bearer …")`.
    pub headers: Vec<(String, String)>,
    /// PEM CA bundle for `grpcs://` (default: the system's roots).
    pub tls_ca_cert: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub tls_client_cert: Option<(PathBuf, PathBuf)>,
    /// Deadline of one RPC (for streams: of each message), not counting time queued for a slot.
    /// Default 30 s.
    pub request_timeout: Duration,
    /// Calls in flight at once. Default 128.
    pub concurrency_limit: usize,
    /// Retry policy for retryable failures.
    pub retry: RetryPolicy,
    /// ByteStream upload chunk size. Default 1 MiB.
    pub chunk_size: usize,
    /// Blobs at least this large always go through ByteStream, streamed straight to disk, even
    /// when they would fit a batch. Default 512 KiB, the local store's pool threshold.
    pub bytestream_min_size: u64,
    /// Blobs at least this large use zstd when the server supports it; `None` disables
    /// compression. Default 1 MiB (zstd level 1 runs ≈ 0.35 GB/s here, slower than a fast LAN,
    /// so it only pays off for large, compressible blobs on slower links).
    pub zstd_min_size: Option<u64>,
    /// `RequestMetadata.tool_invocation_id` (e.g. one per build).
    pub invocation_id: String,
    /// A file in which to remember the server's capabilities for [`CAPABILITIES_TTL`], so that
    /// short-lived processes (one `recache run` per command) do not each spend a
    /// GetCapabilities call. `None` (the default): ask once per provider.
    pub capabilities_cache: Option<PathBuf>,
}

/// How long capabilities remembered in [`GrpcOptions::capabilities_cache`] are trusted. A server
/// reconfigured meanwhile (a smaller batch limit) makes calls fail, which the cache layer treats
/// as a cache error (the command runs locally); the file is then older than this soon enough.
pub const CAPABILITIES_TTL: Duration = Duration::from_secs(600);

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            instance_name: String::new(),
            headers: Vec::new(),
            tls_ca_cert: None,
            tls_client_cert: None,
            request_timeout: Duration::from_secs(30),
            concurrency_limit: 128,
            retry: RetryPolicy::default(),
            chunk_size: 1024 * 1024,
            bytestream_min_size: 512 * 1024,
            zstd_min_size: Some(1024 * 1024),
            invocation_id: uuid::Uuid::new_v4().to_string(),
            capabilities_cache: None,
        }
    }
}

/// What the server said about itself, fetched once per provider.
#[derive(Debug, Clone)]
pub struct ServerCapabilities {
    /// `max_batch_total_size_bytes` (0 = not stated).
    pub max_batch_total_size_bytes: u64,
    /// Whether ZSTD is among the supported compressors.
    pub zstd: bool,
    /// Whether updating the ActionCache is allowed.
    pub action_cache_update_enabled: bool,
}

impl ServerCapabilities {
    /// The line a capabilities cache file holds.
    fn encode(&self) -> String {
        format!(
            "recache-capabilities-v1 {} {} {}\n",
            self.max_batch_total_size_bytes,
            u8::from(self.zstd),
            u8::from(self.action_cache_update_enabled)
        )
    }

    /// Capabilities remembered in `path`, if it is younger than [`CAPABILITIES_TTL`] and reads
    /// back whole.
    fn recall(path: &std::path::Path) -> Option<ServerCapabilities> {
        let age = std::fs::metadata(path)
            .ok()?
            .modified()
            .ok()?
            .elapsed()
            .ok()?;
        if age > CAPABILITIES_TTL {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let mut parts = text.trim_end().split(' ');
        if parts.next()? != "recache-capabilities-v1" {
            return None;
        }
        let max = parts.next()?.parse().ok()?;
        let flag = |p: Option<&str>| match p {
            Some("1") => Some(true),
            Some("0") => Some(false),
            _ => None,
        };
        let zstd = flag(parts.next())?;
        let update = flag(parts.next())?;
        parts.next().is_none().then_some(ServerCapabilities {
            max_batch_total_size_bytes: max,
            zstd,
            action_cache_update_enabled: update,
        })
    }

    /// Writes the capabilities to `path` (whole or not at all: a temp file renamed into place);
    /// failure only costs the next process a GetCapabilities call.
    fn remember(&self, path: &std::path::Path) {
        let Some(dir) = path.parent() else { return };
        let temp = dir.join(format!(".caps-{}", uuid::Uuid::new_v4()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&temp, self.encode()))
            .and_then(|()| std::fs::rename(&temp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
    }
}

/// A REAPI server, as a [`ByteStoreProvider`] and an [`ActionCacheProvider`].
#[derive(Debug)]
pub struct GrpcProvider {
    channel: Channel,
    address: String,
    options: GrpcOptions,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    request_metadata: BinaryMetadataValue,
    capabilities: OnceCell<ServerCapabilities>,
    slots: Arc<Semaphore>,
}

impl GrpcProvider {
    /// Prepares a connection to `address` (`grpc://host:port` or `grpcs://host:port`). The
    /// connection is made lazily; an unreachable server shows up as a retryable error on the
    /// first call.
    pub async fn connect(address: &str, options: GrpcOptions) -> Result<GrpcProvider, StoreError> {
        let bad = |why: String| StoreError::invalid(format!("remote address {address:?}: {why}"));
        let (uri, tls) = if let Some(rest) = address.strip_prefix("grpc://") {
            (format!("http://{rest}"), false)
        } else if let Some(rest) = address.strip_prefix("grpcs://") {
            (format!("https://{rest}"), true)
        } else {
            return Err(bad("expected grpc://host:port or grpcs://host:port".into()));
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            // Windows large enough that one big download is not window-bound on a fast link,
            // small enough that data piling up ahead of a slower disk stays bounded.
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if tls {
            let mut cfg = ClientTlsConfig::new();
            match &options.tls_ca_cert {
                Some(path) => {
                    let pem = tokio::fs::read(path).await.map_err(|e| {
                        StoreError::io(format!("reading TLS CA bundle {}", path.display()), e)
                    })?;
                    cfg = cfg.ca_certificate(Certificate::from_pem(pem));
                }
                None => cfg = cfg.with_native_roots(),
            }
            if let Some((cert, key)) = &options.tls_client_cert {
                let read = |p: PathBuf| async move {
                    tokio::fs::read(&p)
                        .await
                        .map_err(|e| StoreError::io(format!("reading {}", p.display()), e))
                };
                let identity =
                    Identity::from_pem(read(cert.clone()).await?, read(key.clone()).await?);
                cfg = cfg.identity(identity);
            }
            endpoint = endpoint
                .tls_config(cfg)
                .map_err(|e| bad(format!("TLS configuration: {e}")))?;
        } else if options.tls_ca_cert.is_some() || options.tls_client_cert.is_some() {
            return Err(bad(
                "TLS certificates were given for a plaintext grpc:// address; use grpcs://".into(),
            ));
        }
        let channel = endpoint.connect_lazy();

        let mut headers = Vec::new();
        for (k, v) in &options.headers {
            let key =
                AsciiMetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    StoreError::invalid(format!("header name {k:?} is not a valid gRPC header"))
                })?;
            let value = AsciiMetadataValue::try_from(v.as_str()).map_err(|_| {
                StoreError::invalid(format!("value of header {k:?} is not valid ASCII"))
            })?;
            headers.push((key, value));
        }
        let metadata = remexec::RequestMetadata {
            tool_details: Some(remexec::ToolDetails {
                tool_name: "recache".into(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
            }),
            tool_invocation_id: options.invocation_id.clone(),
            ..Default::default()
        };
        let request_metadata = BinaryMetadataValue::from_bytes(&metadata.encode_to_vec());
        Ok(GrpcProvider {
            channel,
            address: address.to_owned(),
            slots: Arc::new(Semaphore::new(options.concurrency_limit.max(1))),
            options,
            headers,
            request_metadata,
            capabilities: OnceCell::new(),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let md = req.metadata_mut();
        for (k, v) in &self.headers {
            md.insert(k.clone(), v.clone());
        }
        match super::current_request_context() {
            // Per action: who asks, for the server's logs (a few hundred bytes, encoded here).
            Some(ctx) => {
                let metadata = remexec::RequestMetadata {
                    tool_details: Some(remexec::ToolDetails {
                        tool_name: "recache".into(),
                        tool_version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    tool_invocation_id: if ctx.invocation_id.is_empty() {
                        self.options.invocation_id.clone()
                    } else {
                        ctx.invocation_id
                    },
                    action_id: ctx.action_id,
                    action_mnemonic: ctx.action_mnemonic,
                    target_id: ctx.target_id,
                    ..Default::default()
                };
                md.insert_bin(
                    REQUEST_METADATA_HEADER,
                    BinaryMetadataValue::from_bytes(&metadata.encode_to_vec()),
                );
            }
            None => {
                md.insert_bin(REQUEST_METADATA_HEADER, self.request_metadata.clone());
            }
        }
        req
    }

    /// Runs one RPC: slot first, then the timeout, then the error classified by code.
    async fn call<T, F>(&self, what: &str, idempotent: bool, rpc: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(what, idempotent, self.options.request_timeout, rpc)
            .await
    }

    /// [`call`](Self::call) with its own deadline.
    async fn call_within<T, F>(
        &self,
        what: &str,
        idempotent: bool,
        timeout: Duration,
        rpc: F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::new(ErrorKind::Other, "provider is shut down"))?;
        match tokio::time::timeout(timeout, rpc).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(StoreError::from_status(what, &status, idempotent)),
            Err(_) => Err(timeout_error(what, timeout, idempotent)),
        }
    }

    /// The deadline of one write attempt carrying `bytes`: [`WRITE_BASE`] (at most the
    /// request timeout) plus the bytes at [`WRITE_RATE`].
    fn write_timeout(&self, bytes: u64) -> Duration {
        self.options.request_timeout.min(WRITE_BASE)
            + Duration::from_secs_f64(bytes as f64 / WRITE_RATE as f64)
    }

    fn instance(&self) -> &str {
        &self.options.instance_name
    }

    fn resource(&self, rest: &str) -> String {
        if self.instance().is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.instance())
        }
    }

    /// The server's capabilities, fetched on first use and cached (a failure is not cached).
    pub async fn capabilities(&self) -> Result<&ServerCapabilities, StoreError> {
        self.capabilities
            .get_or_try_init(|| async {
                if let Some(remembered) = self
                    .options
                    .capabilities_cache
                    .as_deref()
                    .and_then(ServerCapabilities::recall)
                {
                    return Ok(remembered);
                }
                let mut retry = Retry::new(self.options.retry, || format!("GetCapabilities from {}", self.address));
                let caps = loop {
                    let mut client = CapabilitiesClient::new(self.channel.clone());
                    let req = self.request(remexec::GetCapabilitiesRequest {
                        instance_name: self.instance().to_owned(),
                    });
                    match self.call("GetCapabilities", true, client.get_capabilities(req)).await {
                        Ok(c) => break c,
                        Err(e) => retry.backoff_or_fail(e).await?,
                    }
                };
                let cache = caps.cache_capabilities.unwrap_or_default();
                let sha256 = digest_function::Value::Sha256 as i32;
                // An empty list predates the field: REAPI says SHA-256 is then assumed.
                if !cache.digest_functions.is_empty() && !cache.digest_functions.contains(&sha256) {
                    return Err(StoreError::new(
                        ErrorKind::Other,
                        format!(
                            "the server at {} does not support SHA-256 digests (it offers {:?}); recache only speaks SHA-256",
                            self.address, cache.digest_functions
                        ),
                    ));
                }
                let caps = ServerCapabilities {
                    max_batch_total_size_bytes: u64::try_from(cache.max_batch_total_size_bytes).unwrap_or(0),
                    zstd: cache.supported_compressors.contains(&(compressor::Value::Zstd as i32)),
                    action_cache_update_enabled: cache
                        .action_cache_update_capabilities
                        .is_none_or(|c| c.update_enabled),
                };
                if let Some(path) = &self.options.capabilities_cache {
                    caps.remember(path);
                }
                Ok(caps)
            })
            .await
    }

    /// Bytes of blob data one batch message may carry.
    async fn batch_limit(&self) -> Result<u64, StoreError> {
        Ok(batch_budget(Some(self.capabilities().await?)))
    }

    /// Whether a blob of `size` goes through the batch calls rather than ByteStream.
    async fn fits_batch(&self, size: u64) -> Result<bool, StoreError> {
        self.capabilities().await?; // max_batch_blob_size reads the cached limits
        Ok(size <= self.max_batch_blob_size())
    }

    async fn use_zstd(&self, size: u64) -> Result<bool, StoreError> {
        Ok(match self.options.zstd_min_size {
            Some(min) if size >= min => self.capabilities().await?.zstd,
            _ => false,
        })
    }

    /// Groups blobs into batches whose data (with per-blob framing) stays under `limit`.
    fn split_batches(digests: Vec<Digest>, limit: u64) -> Vec<Vec<Digest>> {
        crate::group_by_size(digests, limit, BATCH_OVERHEAD_PER_BLOB)
    }

    async fn batch_read_once(
        &self,
        digests: &[Digest],
    ) -> Result<HashMap<Digest, Bytes>, StoreError> {
        // Offer zstd only when a blob in the batch is big enough to be worth compressing.
        let largest = digests.iter().map(|d| d.size_bytes).max().unwrap_or(0);
        let zstd = self.use_zstd(largest).await?;
        let mut client = ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 * 1024 * 1024);
        let req = self.request(remexec::BatchReadBlobsRequest {
            instance_name: self.instance().to_owned(),
            digests: digests.iter().map(|d| (*d).into()).collect(),
            acceptable_compressors: if zstd {
                vec![compressor::Value::Zstd as i32]
            } else {
                vec![]
            },
            digest_function: digest_function::Value::Sha256 as i32,
        });
        let resp = self
            .call("BatchReadBlobs", true, client.batch_read_blobs(req))
            .await?;
        let wanted: HashSet<Digest> = digests.iter().copied().collect();
        let mut out = HashMap::new();
        for r in resp.responses {
            let d = hashing::reapi::require_digest("responses[].digest", r.digest.as_ref())
                .map_err(|e| StoreError::invalid(format!("BatchReadBlobs: {e}")))?;
            if !wanted.contains(&d) {
                return Err(StoreError::invalid(format!(
                    "BatchReadBlobs returned {d}, which was not asked for"
                )));
            }
            let code = r.status.as_ref().map_or(0, |s| s.code);
            if code == tonic::Code::NotFound as i32 {
                continue;
            }
            if code != 0 {
                let status = tonic::Status::new(
                    tonic::Code::from(code),
                    r.status.map(|s| s.message).unwrap_or_default(),
                );
                return Err(StoreError::from_status(
                    &format!("BatchReadBlobs of {d}"),
                    &status,
                    true,
                ));
            }
            let data = if r.compressor == compressor::Value::Zstd as i32 {
                decompress_bounded(&r.data, d.size_bytes)?
            } else if r.compressor == compressor::Value::Identity as i32 {
                r.data
            } else {
                return Err(StoreError::invalid(format!(
                    "BatchReadBlobs: unrequested compressor {} for {d}",
                    r.compressor
                )));
            };
            let actual = Digest::of_bytes(&data);
            if actual != d {
                return Err(StoreError::invalid(format!(
                    "BatchReadBlobs: blob {d} is corrupt (content hashes to {actual})"
                )));
            }
            out.insert(d, Bytes::from(data));
        }
        Ok(out)
    }

    async fn batch_update_once(&self, blobs: &[(Digest, Bytes)]) -> Result<(), StoreError> {
        let mut requests = Vec::with_capacity(blobs.len());
        for (d, b) in blobs {
            let (data, comp) = if self.use_zstd(d.size_bytes).await? {
                (compress(b)?, compressor::Value::Zstd as i32)
            } else {
                (b.to_vec(), compressor::Value::Identity as i32)
            };
            requests.push(remexec::batch_update_blobs_request::Request {
                digest: Some((*d).into()),
                data,
                compressor: comp,
            });
        }
        let bytes: u64 = requests.iter().map(|r| r.data.len() as u64).sum();
        let mut client = ContentAddressableStorageClient::new(self.channel.clone());
        let req = self.request(remexec::BatchUpdateBlobsRequest {
            instance_name: self.instance().to_owned(),
            requests,
            digest_function: digest_function::Value::Sha256 as i32,
        });
        // Uploading the same content twice is harmless: treat as idempotent.
        let resp = self
            .call_within(
                "BatchUpdateBlobs",
                true,
                self.write_timeout(bytes),
                client.batch_update_blobs(req),
            )
            .await
            .map_err(StoreError::final_when_full)?;
        for r in resp.responses {
            let code = r.status.as_ref().map_or(0, |s| s.code);
            if code != 0 {
                let status = tonic::Status::new(
                    tonic::Code::from(code),
                    r.status.map(|s| s.message).unwrap_or_default(),
                );
                let d = r
                    .digest
                    .map(|d| format!("{}/{}", d.hash, d.size_bytes))
                    .unwrap_or_default();
                return Err(StoreError::from_status(
                    &format!("BatchUpdateBlobs of {d}"),
                    &status,
                    true,
                )
                .final_when_full());
            }
        }
        Ok(())
    }

    async fn bytestream_read_once(
        &self,
        digest: Digest,
        dest: &mut dyn LoadDestination,
    ) -> Result<bool, StoreError> {
        let zstd = self.use_zstd(digest.size_bytes).await?;
        let resource = if zstd {
            self.resource(&format!(
                "compressed-blobs/zstd/{}/{}",
                digest.hash, digest.size_bytes
            ))
        } else {
            self.resource(&format!("blobs/{}/{}", digest.hash, digest.size_bytes))
        };
        let what = format!("ByteStream.Read of {digest}");
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::new(ErrorKind::Other, "provider is shut down"))?;
        let timeout = self.options.request_timeout;
        let mut client =
            ByteStreamClient::new(self.channel.clone()).max_decoding_message_size(64 * 1024 * 1024);
        let req = self.request(ReadRequest {
            resource_name: resource,
            read_offset: 0,
            read_limit: 0,
        });
        let mut stream = match tokio::time::timeout(timeout, client.read(req)).await {
            Err(_) => return Err(timeout_error(&what, timeout, true)),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => return Ok(false),
            Ok(Err(s)) => return Err(StoreError::from_status(&what, &s, true)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let write_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                StoreError::invalid(format!("{what}: {e}"))
            } else {
                StoreError::io(format!("{what}: writing to the local store"), e)
            }
        };
        let mut decoder = if zstd {
            Some(crate::zstd_stream::ZstdStream::new()?)
        } else {
            None
        };
        loop {
            let msg = match tokio::time::timeout(timeout, stream.next()).await {
                Err(_) => return Err(timeout_error(&what, timeout, true)),
                Ok(None) => break,
                Ok(Some(Err(s))) if s.code() == tonic::Code::NotFound => return Ok(false),
                Ok(Some(Err(s))) => return Err(StoreError::from_status(&what, &s, true)),
                Ok(Some(Ok(m))) => m,
            };
            match &mut decoder {
                Some(dec) => dec.feed(&msg.data, dest).await.map_err(write_err)?,
                None => dest.write_all(&msg.data).await.map_err(write_err)?,
            }
        }
        if let Some(dec) = &mut decoder {
            dec.finish(dest).await.map_err(write_err)?;
        }
        dest.flush().await.map_err(write_err)?;
        Ok(true)
    }

    /// Uploads through ByteStream from a blocking reader (a file or a buffer), chunked, on a
    /// bounded channel: the reader runs at most a few chunks ahead of the network.
    async fn bytestream_write_once<R>(&self, digest: Digest, open: R) -> Result<(), StoreError>
    where
        R: FnOnce() -> std::io::Result<Box<dyn Read + Send>> + Send + 'static,
    {
        let zstd = self.use_zstd(digest.size_bytes).await?;
        let upload = uuid::Uuid::new_v4();
        let resource = if zstd {
            self.resource(&format!(
                "uploads/{upload}/compressed-blobs/zstd/{}/{}",
                digest.hash, digest.size_bytes
            ))
        } else {
            self.resource(&format!(
                "uploads/{upload}/blobs/{}/{}",
                digest.hash, digest.size_bytes
            ))
        };
        let chunk_size = self.options.chunk_size.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let producer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut reader = open()?;
            if zstd {
                reader = Box::new(zstd::stream::read::Encoder::new(reader, 1)?);
            }
            let mut offset: i64 = 0;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; chunk_size];
                let mut filled = 0;
                while filled < chunk_size {
                    match reader.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(filled);
                let last = filled < chunk_size;
                let req = WriteRequest {
                    resource_name: if first {
                        resource.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset,
                    finish_write: last,
                    data: buf,
                };
                first = false;
                offset += filled as i64;
                if tx.blocking_send(req).is_err() {
                    // The server ended the stream early (e.g. it already has the blob).
                    return Ok(());
                }
                if last {
                    return Ok(());
                }
            }
        });
        let what = format!("ByteStream.Write of {digest}");
        let mut client = ByteStreamClient::new(self.channel.clone());
        let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        // A whole upload may take longer than one request timeout: scale it by the chunk count.
        let chunks = digest.size_bytes / chunk_size as u64 + 1;
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::new(ErrorKind::Other, "provider is shut down"))?;
        let timeout = self
            .options
            .request_timeout
            .saturating_mul(chunks.min(1 << 16) as u32);
        let result = match tokio::time::timeout(timeout, client.write(req)).await {
            Err(_) => Err(timeout_error(&what, timeout, true)),
            Ok(Err(s)) => Err(StoreError::from_status(&what, &s, true).final_when_full()),
            Ok(Ok(r)) => Ok(r.into_inner()),
        };
        let produced = producer.await.map_err(|e| {
            StoreError::new(ErrorKind::Other, format!("{what}: reader task failed: {e}"))
        })?;
        if let Err(e) = produced {
            return Err(StoreError::io(format!("{what}: reading the local blob"), e));
        }
        let resp = result?;
        let size = i64::try_from(digest.size_bytes).unwrap_or(i64::MAX);
        // A server that already has the blob may end early with the full size (or -1 for a
        // compressed upload, per the spec).
        if resp.committed_size != size && !(zstd && resp.committed_size == -1) {
            return Err(StoreError::new(
                ErrorKind::Retryable(tonic::Code::DataLoss),
                format!(
                    "{what}: server committed {} of {size} bytes",
                    resp.committed_size
                ),
            ));
        }
        Ok(())
    }

    async fn upload<R>(
        &self,
        digest: Digest,
        bytes: Option<Bytes>,
        open: R,
    ) -> Result<(), StoreError>
    where
        R: Fn() -> std::io::Result<Box<dyn Read + Send>> + Send + Sync + Clone + 'static,
    {
        let small = self.fits_batch(digest.size_bytes).await?;
        let mut retry = Retry::new(self.options.retry, || {
            format!("uploading {digest} to {}", self.address)
        });
        loop {
            let result = match (&bytes, small) {
                (Some(b), true) => self.batch_update_once(&[(digest, b.clone())]).await,
                _ => self.bytestream_write_once(digest, open.clone()).await,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) => retry.backoff_or_fail(e).await?,
            }
        }
    }
}

/// Bytes of blob data one batch message may carry: the server's limit (0 = unstated), never
/// more than the 4 MiB message cap, minus room for the request's other fields.
fn batch_budget(caps: Option<&ServerCapabilities>) -> u64 {
    let server = match caps.map_or(0, |c| c.max_batch_total_size_bytes) {
        0 => GRPC_MESSAGE_CAP,
        n => n.min(GRPC_MESSAGE_CAP),
    };
    server.saturating_sub(BATCH_OVERHEAD_FIXED)
}

fn timeout_error(what: &str, timeout: Duration, idempotent: bool) -> StoreError {
    let kind = if idempotent {
        ErrorKind::Retryable(tonic::Code::DeadlineExceeded)
    } else {
        ErrorKind::Other
    };
    StoreError::new(kind, format!("{what} timed out after {timeout:?}"))
}

fn compress(data: &[u8]) -> Result<Vec<u8>, StoreError> {
    zstd::bulk::compress(data, 1)
        .map_err(|e| StoreError::new(ErrorKind::Other, format!("zstd compression failed: {e}")))
}

/// Decompresses a whole zstd frame, refusing to produce more than `expected_size` bytes.
fn decompress_bounded(data: &[u8], expected_size: u64) -> Result<Vec<u8>, StoreError> {
    let cap = usize::try_from(expected_size).unwrap_or(usize::MAX);
    zstd::bulk::decompress(data, cap)
        .map_err(|e| StoreError::invalid(format!("undecodable zstd data: {e}")))
}

#[async_trait]
impl ByteStoreProvider for GrpcProvider {
    async fn store_bytes(&self, digest: Digest, bytes: Bytes) -> Result<(), StoreError> {
        let for_stream = bytes.clone();
        self.upload(digest, Some(bytes), move || {
            Ok(Box::new(std::io::Cursor::new(for_stream.clone())) as Box<dyn Read + Send>)
        })
        .await
    }

    async fn store_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        let limit = self.batch_limit().await?;
        let by_digest: HashMap<Digest, Bytes> = blobs.into_iter().collect();
        let batches = Self::split_batches(by_digest.keys().copied().collect(), limit);
        for batch in batches {
            let items: Vec<(Digest, Bytes)> = batch
                .iter()
                .filter_map(|d| by_digest.get(d).map(|b| (*d, b.clone())))
                .collect();
            let mut retry = Retry::new(self.options.retry, || {
                format!(
                    "BatchUpdateBlobs of {} blobs to {}",
                    items.len(),
                    self.address
                )
            });
            loop {
                match self.batch_update_once(&items).await {
                    Ok(()) => break,
                    Err(e) => retry.backoff_or_fail(e).await?,
                }
            }
        }
        Ok(())
    }

    async fn store_file(&self, digest: Digest, file: tokio::fs::File) -> Result<(), StoreError> {
        let file = Arc::new(file.into_std().await);
        self.upload(digest, None, move || {
            use std::io::Seek;
            let mut f = file.try_clone()?;
            f.seek(std::io::SeekFrom::Start(0))?;
            Ok(Box::new(std::io::BufReader::with_capacity(1024 * 1024, f)) as Box<dyn Read + Send>)
        })
        .await
    }

    async fn load(
        &self,
        digest: Digest,
        dest: &mut dyn LoadDestination,
    ) -> Result<bool, StoreError> {
        if digest == hashing::EMPTY_DIGEST {
            return Ok(true);
        }
        let small = self.fits_batch(digest.size_bytes).await?;
        let mut retry = Retry::new(self.options.retry, || {
            format!("downloading {digest} from {}", self.address)
        });
        loop {
            if retry.attempt() > 1 {
                dest.reset()
                    .await
                    .map_err(|e| StoreError::io("resetting the download destination", e))?;
            }
            let result = if small {
                match self.batch_read_once(&[digest]).await {
                    Ok(mut m) => match m.remove(&digest) {
                        Some(b) => dest
                            .write_all(&b)
                            .await
                            .map(|_| true)
                            .map_err(|e| StoreError::io("writing to the local store", e)),
                        None => Ok(false),
                    },
                    Err(e) => Err(e),
                }
            } else {
                self.bytestream_read_once(digest, dest).await
            };
            match result {
                Ok(found) => return Ok(found),
                Err(e) => retry.backoff_or_fail(e).await?,
            }
        }
    }

    async fn load_batch(&self, digests: Vec<Digest>) -> Result<HashMap<Digest, Bytes>, StoreError> {
        let limit = self.batch_limit().await?;
        let batches = Self::split_batches(digests, limit);
        let results = futures::future::try_join_all(batches.into_iter().map(|batch| async move {
            let mut retry = Retry::new(self.options.retry, || {
                format!("BatchReadBlobs from {}", self.address)
            });
            loop {
                match self.batch_read_once(&batch).await {
                    Ok(m) => return Ok::<_, StoreError>(m),
                    Err(e) => retry.backoff_or_fail(e).await?,
                }
            }
        }))
        .await?;
        Ok(results.into_iter().flatten().collect())
    }

    async fn list_missing_digests(
        &self,
        digests: &mut (dyn Iterator<Item = Digest> + Send),
    ) -> Result<HashSet<Digest>, StoreError> {
        let all: Vec<Digest> = digests.filter(|d| *d != hashing::EMPTY_DIGEST).collect();
        let mut missing = HashSet::new();
        for chunk in all.chunks(FIND_MISSING_BATCH) {
            let mut retry = Retry::new(self.options.retry, || {
                format!("FindMissingBlobs on {}", self.address)
            });
            let resp = loop {
                let mut client = ContentAddressableStorageClient::new(self.channel.clone());
                let req = self.request(remexec::FindMissingBlobsRequest {
                    instance_name: self.instance().to_owned(),
                    blob_digests: chunk.iter().map(|d| (*d).into()).collect(),
                    digest_function: digest_function::Value::Sha256 as i32,
                });
                match self
                    .call("FindMissingBlobs", true, client.find_missing_blobs(req))
                    .await
                {
                    Ok(r) => break r,
                    Err(e) => retry.backoff_or_fail(e).await?,
                }
            };
            for d in &resp.missing_blob_digests {
                let d = Digest::try_from(d).map_err(|e| {
                    StoreError::invalid(format!("FindMissingBlobs returned a bad digest: {e}"))
                })?;
                missing.insert(d);
            }
        }
        Ok(missing)
    }

    fn max_batch_blob_size(&self) -> u64 {
        batch_budget(self.capabilities.get())
            .saturating_sub(BATCH_OVERHEAD_PER_BLOB)
            .min(self.options.bytestream_min_size.saturating_sub(1))
    }
}

#[async_trait]
impl ActionCacheProvider for GrpcProvider {
    async fn get_action_result(
        &self,
        action_digest: Digest,
    ) -> Result<Option<remexec::ActionResult>, StoreError> {
        let mut retry = Retry::new(self.options.retry, || {
            format!("GetActionResult on {}", self.address)
        });
        loop {
            let mut client = ActionCacheClient::new(self.channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024);
            let req = self.request(remexec::GetActionResultRequest {
                instance_name: self.instance().to_owned(),
                action_digest: Some(action_digest.into()),
                inline_stdout: false,
                inline_stderr: false,
                inline_output_files: vec![],
                digest_function: digest_function::Value::Sha256 as i32,
            });
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| StoreError::new(ErrorKind::Other, "provider is shut down"))?;
            let result = match tokio::time::timeout(
                self.options.request_timeout,
                client.get_action_result(req),
            )
            .await
            {
                Ok(Ok(r)) => return Ok(Some(r.into_inner())),
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => return Ok(None),
                Ok(Err(s)) => StoreError::from_status("GetActionResult", &s, true),
                Err(_) => timeout_error("GetActionResult", self.options.request_timeout, true),
            };
            drop(_slot);
            retry.backoff_or_fail(result).await?;
        }
    }

    async fn update_enabled(&self) -> Result<bool, StoreError> {
        Ok(self.capabilities().await?.action_cache_update_enabled)
    }

    async fn update_action_result(
        &self,
        action_digest: Digest,
        result: remexec::ActionResult,
    ) -> Result<(), StoreError> {
        let mut retry = Retry::new(self.options.retry, || {
            format!("UpdateActionResult on {}", self.address)
        });
        loop {
            let mut client = ActionCacheClient::new(self.channel.clone());
            let req = self.request(remexec::UpdateActionResultRequest {
                instance_name: self.instance().to_owned(),
                action_digest: Some(action_digest.into()),
                action_result: Some(result.clone()),
                results_cache_policy: None,
                digest_function: digest_function::Value::Sha256 as i32,
            });
            // Writing the same result twice is harmless, so a timeout may be retried.
            match self
                .call_within(
                    "UpdateActionResult",
                    true,
                    self.write_timeout(result.encoded_len() as u64),
                    client.update_action_result(req),
                )
                .await
                .map_err(StoreError::final_when_full)
            {
                Ok(_) => return Ok(()),
                Err(e) => retry.backoff_or_fail(e).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_capabilities_read_back_only_when_whole_and_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("caps/abc");
        let caps = ServerCapabilities {
            max_batch_total_size_bytes: 4_193_280,
            zstd: true,
            action_cache_update_enabled: false,
        };
        assert!(ServerCapabilities::recall(&path).is_none());
        caps.remember(&path);
        let back = ServerCapabilities::recall(&path).unwrap();
        assert_eq!(
            (
                back.max_batch_total_size_bytes,
                back.zstd,
                back.action_cache_update_enabled
            ),
            (4_193_280, true, false)
        );
        for bad in [
            "",
            "recache-capabilities-v1 12 1",
            "recache-capabilities-v1 x 1 1\n",
            "v0 1 1 1\n",
            "recache-capabilities-v1 1 1 1 extra\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(ServerCapabilities::recall(&path).is_none(), "{bad:?}");
        }
        // Too old: asked again.
        caps.remember(&path);
        let old = std::time::SystemTime::now() - CAPABILITIES_TTL - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(ServerCapabilities::recall(&path).is_none());
    }

    #[test]
    fn batches_stay_under_the_limit() {
        let d = |size: u64| Digest::new(hashing::Digest::of_bytes(&size.to_le_bytes()).hash, size);
        let digests: Vec<Digest> = (0..100).map(|i| d(100_000 + i)).collect();
        let limit = 1_000_000;
        let batches = GrpcProvider::split_batches(digests.clone(), limit);
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 100);
        for b in &batches {
            let total: u64 = b
                .iter()
                .map(|d| d.size_bytes + BATCH_OVERHEAD_PER_BLOB)
                .sum();
            assert!(total <= limit, "{total}");
        }
        // ~100.3 kB each with framing: 9 fit in 1 MB, a 10th would not. Batches are packed full.
        assert!(batches[..batches.len() - 1].iter().all(|b| b.len() == 9));
        assert_eq!(batches.len(), 12);
    }
}
