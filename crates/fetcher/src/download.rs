//! Downloads an asset from its origin (HTTP or HTTPS) into a store: `recache serve`'s
//! `FetchBlob` and `recache fetch` both use it.
//!
//! The body streams to a temp file under `<storage>/downloads` while SHA-256 (the CAS digest)
//! and the algorithm of every requested `checksum.sri` are computed in the same pass, so memory
//! stays flat whatever the size. Nothing reaches the CAS unless one of the SRI checksums
//! matches (when any is given) and the body is whole (as long as its Content-Length said).
//! Bounds: an overall deadline (the request's `timeout`, else [`DEFAULT_TIMEOUT`]), a connect
//! timeout, at most [`MAX_REDIRECTS`] redirects, at most `--max-blob-size` bytes.
//!
//! Failures carry the status code the Remote Asset API lists for the inline `status`:
//! NOT_FOUND (404/410, unreachable, other HTTP errors, and any URI that cannot or may not be
//! downloaded: not http(s), unparsable, refused by the [`OriginPolicy`]), PERMISSION_DENIED
//! (401/403), RESOURCE_EXHAUSTED (too large, 429), DEADLINE_EXCEEDED, ABORTED (checksum
//! mismatch, a truncated body, a redirect loop). Only a malformed request header is
//! INVALID_ARGUMENT, which a server answers as the RPC's own status, not inline.
//!
//! The [`OriginPolicy`] keeps a server from being aimed inside its own network (a server-side
//! request forgery): by default an origin whose *resolved* address is loopback, private,
//! link-local, unspecified, multicast or otherwise not global is refused, checked at every hop
//! (a redirect too), and the connection goes to exactly the addresses checked (a second DNS
//! answer cannot swap one in).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use hashing::{Digest, Fingerprint};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use store::LocalStore;
use tokio::io::AsyncWriteExt;
use tonic::Code;

/// Which origins a download may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Downloads from origins at all (`recache serve --asset-fetch off`: no, only pushed assets
    /// are served).
    pub fetch: bool,
    /// Only origins whose every resolved address is global (see [`is_global`]); off for
    /// [`OriginPolicy::any`].
    pub global_only: bool,
    /// Origins opened on purpose, loopback and private ones included: `host`, `host:port`, or
    /// a URL prefix (`https://mirror.internal/dist/`).
    pub allow: Vec<String>,
}

impl OriginPolicy {
    /// A server's default: global addresses only, plus what `allow` names.
    pub fn global_only(allow: Vec<String>) -> OriginPolicy {
        OriginPolicy {
            fetch: true,
            global_only: true,
            allow,
        }
    }

    /// Any origin (a user's own `recache fetch`: the user can reach it anyway).
    pub fn any() -> OriginPolicy {
        OriginPolicy {
            fetch: true,
            global_only: false,
            allow: Vec::new(),
        }
    }

    /// No origin downloads at all.
    pub fn off() -> OriginPolicy {
        OriginPolicy {
            fetch: false,
            global_only: true,
            allow: Vec::new(),
        }
    }

    /// Whether `uri` is one the operator opened on purpose.
    fn allows(&self, uri: &http::Uri) -> bool {
        let text = uri.to_string();
        let Some(host) = uri.host().map(str::to_ascii_lowercase) else {
            return false;
        };
        let port = uri.port_u16().unwrap_or(default_port(uri));
        self.allow.iter().any(|entry| {
            if entry.contains("://") {
                return text.starts_with(entry.as_str());
            }
            let entry = entry.to_ascii_lowercase();
            match entry.rsplit_once(':') {
                // `host:port` (an IPv6 literal is bracketed: `[::1]:8080`).
                Some((h, p)) if !h.ends_with(':') && p.parse::<u16>().is_ok() => {
                    h == host && p.parse::<u16>().ok() == Some(port)
                }
                _ => entry == host,
            }
        })
    }
}

fn default_port(uri: &http::Uri) -> u16 {
    if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    }
}

/// Whether `ip` is a globally routable address: not loopback, private (RFC 1918, fc00::/7),
/// link-local (169.254/16, fe80::/10: cloud metadata lives there), unspecified, multicast,
/// broadcast, shared (100.64/10), documentation, benchmarking or reserved; IPv4 addresses inside
/// IPv6 (mapped, NAT64) are judged as IPv4.
pub fn is_global(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_global(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return is_global(IpAddr::V4(std::net::Ipv4Addr::new(
                    o[12], o[13], o[14], o[15],
                )));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)
                || seg[..6] == [0, 0, 0, 0, 0, 0])
        }
    }
}

/// Resolves `uri`'s host and checks every address against the policy: the addresses to
/// connect to, or NOT_FOUND naming the policy.
async fn checked_addresses(uri: &http::Uri) -> Result<Vec<std::net::SocketAddr>, DownloadError> {
    let host = uri
        .host()
        .ok_or_else(|| DownloadError::new(Code::NotFound, "the URI names no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(default_port(uri));
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| DownloadError::new(Code::NotFound, format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(DownloadError::new(
            Code::NotFound,
            format!("{host} resolves to no address"),
        ));
    }
    if let Some(inside) = addrs.iter().find(|a| !is_global(a.ip())) {
        return Err(DownloadError::new(
            Code::NotFound,
            format!(
                "refused by this server's origin policy: {host} resolves to {}, which is not a \
                 global address (loopback, private, link-local, …); an operator can open it \
                 with --asset-allow-origin",
                inside.ip()
            ),
        ));
    }
    Ok(addrs)
}

/// A resolver that answers with the addresses already checked, whatever the name.
#[derive(Debug, Clone)]
struct Checked(std::sync::Arc<Vec<std::net::SocketAddr>>);

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for Checked {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        std::future::ready(Ok(self.0.as_ref().clone().into_iter()))
    }
}

/// A client that connects only to `addrs` (checked by [`checked_addresses`]).
fn pinned_client(
    addrs: Vec<std::net::SocketAddr>,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector<Checked>>, Empty<Bytes>>, DownloadError>
{
    client_over(HttpConnector::new_with_resolver(Checked(
        std::sync::Arc::new(addrs),
    )))
}

/// Checks `headers` (from `http_header:*` qualifiers) are valid HTTP headers: a malformed one
/// is the request's fault (INVALID_ARGUMENT), found before anything is fetched.
pub fn check_headers(headers: &[(String, String)]) -> Result<(), String> {
    for (k, v) in headers {
        http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| format!("http_header:{k}: not a header name ({e})"))?;
        http::HeaderValue::from_str(v)
            .map_err(|e| format!("http_header:{k}: not a header value ({e})"))?;
    }
    Ok(())
}

/// Deadline of a whole download when the request sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Deadline of connecting to the origin.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed before giving up (a loop ends here).
pub const MAX_REDIRECTS: usize = 10;

/// A hash algorithm a `checksum.sri` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// SHA-256 (also the CAS digest).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Algo {
    fn name(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::Sha384 => "sha384",
            Algo::Sha512 => "sha512",
        }
    }

    fn ring(self) -> &'static ring::digest::Algorithm {
        match self {
            Algo::Sha256 => &ring::digest::SHA256,
            Algo::Sha384 => &ring::digest::SHA384,
            Algo::Sha512 => &ring::digest::SHA512,
        }
    }
}

/// One Subresource Integrity checksum: `sha256-<base64>` (also sha384, sha512).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sri {
    algo: Algo,
    hash: Vec<u8>,
}

impl std::fmt::Display for Sri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.hash);
        write!(f, "{}-{b64}", self.algo.name())
    }
}

impl Sri {
    /// Parses a whitespace-separated list (any one must match); options after `?` are ignored,
    /// as the SRI spec says.
    pub fn parse_list(s: &str) -> Result<Vec<Sri>, String> {
        let mut out = Vec::new();
        for item in s.split_whitespace() {
            let item = item.split('?').next().unwrap_or(item);
            let (algo, b64) = item
                .split_once('-')
                .ok_or_else(|| format!("{item:?} is not `<algorithm>-<base64>`"))?;
            let algo = match algo {
                "sha256" => Algo::Sha256,
                "sha384" => Algo::Sha384,
                "sha512" => Algo::Sha512,
                other => {
                    return Err(format!(
                        "algorithm {other:?} is not supported (sha256, sha384, sha512 are)"
                    ));
                }
            };
            let hash = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("{item:?}: bad base64: {e}"))?;
            if hash.len() != algo.ring().output_len() {
                return Err(format!(
                    "{item:?}: a {} hash is {} bytes, this one {}",
                    algo.name(),
                    algo.ring().output_len(),
                    hash.len()
                ));
            }
            out.push(Sri { algo, hash });
        }
        if out.is_empty() {
            return Err("empty checksum list".into());
        }
        Ok(out)
    }

    /// The SHA-256 it names, if it is one.
    pub fn sha256(&self) -> Option<Fingerprint> {
        (self.algo == Algo::Sha256)
            .then(|| {
                <[u8; 32]>::try_from(self.hash.as_slice())
                    .ok()
                    .map(Fingerprint)
            })
            .flatten()
    }
}

/// Whether the content `reader` yields matches any of `sri` (true when `sri` is empty): for
/// content that came from somewhere other than a verified download (a local store, a Remote
/// Asset service).
pub fn content_matches(sri: &[Sri], reader: &mut dyn std::io::Read) -> std::io::Result<bool> {
    if sri.is_empty() {
        return Ok(true);
    }
    let mut ctxs: Vec<(Algo, ring::digest::Context)> = Vec::new();
    for s in sri {
        if !ctxs.iter().any(|(a, _)| *a == s.algo) {
            ctxs.push((s.algo, ring::digest::Context::new(s.algo.ring())));
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for (_, c) in &mut ctxs {
            c.update(&buf[..n]);
        }
    }
    let got: Vec<(Algo, Vec<u8>)> = ctxs
        .into_iter()
        .map(|(a, c)| (a, c.finish().as_ref().to_vec()))
        .collect();
    Ok(sri
        .iter()
        .any(|s| got.iter().any(|(a, h)| *a == s.algo && *h == s.hash)))
}

/// How one download may go.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline of the whole download.
    pub timeout: Duration,
    /// Largest body accepted.
    pub max_bytes: u64,
    /// HTTP headers sent to the origin.
    pub headers: Vec<(String, String)>,
    /// Where temp files go.
    pub dir: PathBuf,
    /// Counts the bytes received, for a progress display.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Which origins may be reached.
    pub policy: OriginPolicy,
}

impl Options {
    /// Options for a Remote Asset request (its `timeout`, else [`DEFAULT_TIMEOUT`]).
    pub fn for_request(
        timeout: Option<&reapi::google::protobuf::Duration>,
        max_bytes: u64,
        headers: Vec<(String, String)>,
        dir: PathBuf,
        policy: OriginPolicy,
    ) -> Options {
        let timeout = timeout
            .filter(|t| t.seconds > 0 || t.nanos > 0)
            .map_or(DEFAULT_TIMEOUT, |t| {
                Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
            });
        Options {
            timeout,
            max_bytes,
            headers,
            dir,
            progress: None,
            policy,
        }
    }
}

/// Why a download failed, with the code for the inline status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadError {
    code: Code,
    message: String,
}

impl DownloadError {
    /// An error with the status `code` the Remote Asset API lists.
    pub fn new(code: Code, message: impl Into<String>) -> DownloadError {
        DownloadError {
            code,
            message: message.into(),
        }
    }

    /// The status code for Remote Asset's inline `status`.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The same error, prefixed with the URI it happened on.
    pub fn naming(self, uri: &str) -> DownloadError {
        DownloadError {
            code: self.code,
            message: format!("{uri}: {}", self.message),
        }
    }
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The TLS configuration every download client shares (the system's roots, loaded once).
fn tls_config() -> Result<rustls::ClientConfig, DownloadError> {
    use hyper_rustls::ConfigBuilderExt as _;
    static CONFIG: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Ok(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("setting up TLS: {e}"))?
                .with_native_roots()
                .map_err(|e| format!("loading the system's TLS roots: {e}"))?
                .with_no_client_auth(),
            )
        })
        .clone()
        .map_err(|e| DownloadError::new(Code::Internal, e))
}

/// An HTTP(S) client over `http` (its resolver decides where connections go).
fn client_over<R>(
    mut http: HttpConnector<R>,
) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector<R>>, Empty<Bytes>>, DownloadError>
where
    R: tower_service::Service<hyper_util::client::legacy::connect::dns::Name>
        + Clone
        + Send
        + Sync
        + 'static,
    R::Response: Iterator<Item = std::net::SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config()?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// One client for the process (its connection pool shared by every download).
fn client() -> Result<&'static HttpsClient, DownloadError> {
    static CLIENT: OnceLock<Result<HttpsClient, DownloadError>> = OnceLock::new();
    CLIENT
        .get_or_init(|| client_over(HttpConnector::new()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Removes a temp file when dropped (the download failed or was cancelled).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Downloads `uri` into `store`, verified against `sri` (any one; none: no check). Returns the
/// blob's digest.
pub async fn fetch(
    store: &LocalStore,
    uri: &str,
    sri: &[Sri],
    options: &Options,
) -> Result<Digest, DownloadError> {
    match tokio::time::timeout(options.timeout, fetch_inner(store, uri, sri, options)).await {
        Ok(r) => r,
        Err(_) => Err(DownloadError::new(
            Code::DeadlineExceeded,
            format!("not finished within {:?}", options.timeout),
        )),
    }
}

async fn fetch_inner(
    store: &LocalStore,
    uri: &str,
    sri: &[Sri],
    options: &Options,
) -> Result<Digest, DownloadError> {
    if !options.policy.fetch {
        return Err(DownloadError::new(
            Code::NotFound,
            "not recorded here, and this server does not download from origins (--asset-fetch \
             off): only pushed assets are served",
        ));
    }
    let mut current: http::Uri = uri.parse().map_err(|e| {
        DownloadError::new(
            Code::NotFound,
            format!("not recorded here, and not a URL this server can download ({e})"),
        )
    })?;
    let mut hops = 0;
    let response = loop {
        match current.scheme_str() {
            Some("http") | Some("https") if current.host().is_some() => {}
            other => {
                return Err(DownloadError::new(
                    Code::NotFound,
                    format!(
                        "not recorded here, and not a URL this server can download (scheme \
                         {other:?}; it downloads http and https)"
                    ),
                ));
            }
        }
        let mut req = http::Request::get(current.clone());
        for (k, v) in &options.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Empty::new()).map_err(|e| {
            DownloadError::new(Code::InvalidArgument, format!("bad request header: {e}"))
        })?;
        // Checked at every hop, a redirect's target too; a pinned client connects to exactly
        // the addresses checked.
        let sent = if options.policy.global_only && !options.policy.allows(&current) {
            let addrs = checked_addresses(&current).await?;
            pinned_client(addrs)?.request(req).await
        } else {
            client()?.request(req).await
        };
        let resp =
            sent.map_err(|e| DownloadError::new(Code::NotFound, format!("cannot reach it: {e}")))?;
        let code = resp.status();
        if code.is_redirection()
            && let Some(location) = resp.headers().get(http::header::LOCATION)
        {
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(DownloadError::new(
                    Code::Aborted,
                    format!("more than {MAX_REDIRECTS} redirects"),
                ));
            }
            current = resolve(&current, location.to_str().unwrap_or(""))?;
            continue;
        }
        match code.as_u16() {
            200..=299 => break resp,
            401 | 403 => {
                return Err(DownloadError::new(
                    Code::PermissionDenied,
                    format!("the origin answered HTTP {code}"),
                ));
            }
            429 => {
                return Err(DownloadError::new(
                    Code::ResourceExhausted,
                    format!("the origin answered HTTP {code}"),
                ));
            }
            _ => {
                return Err(DownloadError::new(
                    Code::NotFound,
                    format!("the origin answered HTTP {code}"),
                ));
            }
        }
    };
    let expected_len = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = expected_len
        && n > options.max_bytes
    {
        return Err(DownloadError::new(
            Code::ResourceExhausted,
            format!(
                "{n} bytes is more than this cache accepts ({})",
                options.max_bytes
            ),
        ));
    }
    // Stream to a temp file, hashing as the bytes go by.
    let io = |what: &str, e: std::io::Error| {
        DownloadError::new(
            Code::Internal,
            format!("{what} a download's temp file: {e}"),
        )
    };
    tokio::fs::create_dir_all(&options.dir)
        .await
        .map_err(|e| io("creating the directory for", e))?;
    let temp = TempFile(options.dir.join(format!("dl-{}", uuid::Uuid::new_v4())));
    let mut file = tokio::fs::File::create(&temp.0)
        .await
        .map_err(|e| io("creating", e))?;
    let mut sha256 = hashing::Hasher::new();
    let mut others: Vec<(Algo, ring::digest::Context)> = Vec::new();
    for s in sri {
        if s.algo != Algo::Sha256 && !others.iter().any(|(a, _)| *a == s.algo) {
            others.push((s.algo, ring::digest::Context::new(s.algo.ring())));
        }
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            DownloadError::new(Code::Aborted, format!("the download broke off: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        sha256.update(&data);
        for (_, ctx) in &mut others {
            ctx.update(&data);
        }
        if sha256.size_bytes() > options.max_bytes {
            return Err(DownloadError::new(
                Code::ResourceExhausted,
                format!("more than this cache accepts ({} bytes)", options.max_bytes),
            ));
        }
        file.write_all(&data).await.map_err(|e| io("writing", e))?;
        if let Some(p) = &options.progress {
            p.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
    file.flush().await.map_err(|e| io("writing", e))?;
    drop(file);
    let digest = sha256.finish();
    if let Some(n) = expected_len
        && n != digest.size_bytes
    {
        return Err(DownloadError::new(
            Code::Aborted,
            format!(
                "truncated: {} of the {n} bytes announced",
                digest.size_bytes
            ),
        ));
    }
    if !sri.is_empty() {
        let got: Vec<(Algo, Vec<u8>)> = std::iter::once((Algo::Sha256, digest.hash.0.to_vec()))
            .chain(
                others
                    .into_iter()
                    .map(|(a, ctx)| (a, ctx.finish().as_ref().to_vec())),
            )
            .collect();
        let matches = sri
            .iter()
            .any(|s| got.iter().any(|(a, h)| *a == s.algo && *h == s.hash));
        if !matches {
            let want: Vec<String> = sri.iter().map(ToString::to_string).collect();
            let have = Sri {
                algo: Algo::Sha256,
                hash: digest.hash.0.to_vec(),
            };
            return Err(DownloadError::new(
                Code::Aborted,
                format!(
                    "checksum mismatch: expected {}, the content is {have}; nothing was stored",
                    want.join(" or ")
                ),
            ));
        }
    }
    // Into the CAS (verified again by the store while it copies or links it in).
    let store = store.clone();
    let path = temp.0.clone();
    let stored = tokio::task::spawn_blocking(move || store.store_file(&path, true))
        .await
        .map_err(|e| DownloadError::new(Code::Internal, format!("storing the download: {e}")))?
        .map_err(|e| DownloadError::new(Code::Internal, format!("storing the download: {e}")))?;
    if stored != digest {
        return Err(DownloadError::new(
            Code::Aborted,
            format!("the file changed while it was stored ({digest} then {stored})"),
        ));
    }
    drop(temp);
    Ok(digest)
}

/// Resolves a redirect's `Location` against the URI that answered it.
fn resolve(base: &http::Uri, location: &str) -> Result<http::Uri, DownloadError> {
    let bad = || DownloadError::new(Code::Aborted, format!("bad redirect to {location:?}"));
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(|_| bad());
    }
    if !location.starts_with('/') {
        return Err(bad()); // relative paths other than absolute-path ones are rare: refuse
    }
    let scheme = base.scheme_str().ok_or_else(bad)?;
    let authority = base.authority().ok_or_else(bad)?;
    format!("{scheme}://{authority}{location}")
        .parse()
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sri_lists_parse_strictly() {
        let d = Digest::of_bytes(b"hello");
        let b64 = base64::engine::general_purpose::STANDARD.encode(d.hash.0);
        let zeros = base64::engine::general_purpose::STANDARD.encode([0u8; 64]);
        let list = Sri::parse_list(&format!("sha512-{zeros}  sha256-{b64}?opt")).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].sha256(), Some(d.hash));
        assert_eq!(list[1].to_string(), format!("sha256-{b64}"));
        for bad in ["", "md5-abc", "sha256", "sha256-!!!", "sha256-AAAA"] {
            assert!(Sri::parse_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_global_addresses_pass_and_allow_rules_match_exactly() {
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
        ] {
            assert!(
                !is_global(inside.parse().unwrap()),
                "{inside} is not global"
            );
        }
        for global in ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_global(global.parse().unwrap()), "{global} is global");
        }
        let p = OriginPolicy::global_only(vec![
            "127.0.0.1:8080".into(),
            "Mirror.Internal".into(),
            "https://files.internal/dist/".into(),
            "[::1]:9000".into(),
        ]);
        let ok = |u: &str| p.allows(&u.parse().unwrap());
        assert!(ok("http://127.0.0.1:8080/a"));
        assert!(!ok("http://127.0.0.1:8081/a"), "another port");
        assert!(ok("https://mirror.internal/x") && ok("http://mirror.internal:81/x"));
        assert!(ok("https://files.internal/dist/a.tgz"));
        assert!(
            !ok("https://files.internal/other/a.tgz"),
            "outside the prefix"
        );
        assert!(ok("http://[::1]:9000/x") && !ok("http://[::1]:9001/x"));
        assert!(!ok("http://evil.example/x"));
    }

    #[test]
    fn redirects_resolve() {
        let base: http::Uri = "http://127.0.0.1:8/a/b?x".parse().unwrap();
        assert_eq!(
            resolve(&base, "/c").unwrap().to_string(),
            "http://127.0.0.1:8/c"
        );
        assert_eq!(
            resolve(&base, "https://h/x").unwrap().to_string(),
            "https://h/x"
        );
        assert!(resolve(&base, "c").is_err());
    }
}
