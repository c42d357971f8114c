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
//! NOT_FOUND (404/410, unreachable, other HTTP errors), PERMISSION_DENIED (401/403),
//! RESOURCE_EXHAUSTED (too large, 429), DEADLINE_EXCEEDED, ABORTED (checksum mismatch, a
//! truncated body, a redirect loop).

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
}

impl Options {
    /// Options for a Remote Asset request (its `timeout`, else [`DEFAULT_TIMEOUT`]).
    pub fn for_request(
        timeout: Option<&bazel_remote_apis::google::protobuf::Duration>,
        max_bytes: u64,
        headers: Vec<(String, String)>,
        dir: PathBuf,
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

/// One client for the process (connection pool, TLS roots loaded once).
fn client() -> Result<&'static HttpsClient, DownloadError> {
    static CLIENT: OnceLock<Result<HttpsClient, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(CONNECT_TIMEOUT));
            http.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .map_err(|e| format!("loading the system's TLS roots: {e}"))?
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
        })
        .as_ref()
        .map_err(|e| DownloadError::new(Code::Internal, e.clone()))
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
    let client = client()?;
    let mut current: http::Uri = uri
        .parse()
        .map_err(|e| DownloadError::new(Code::InvalidArgument, format!("not a URI: {e}")))?;
    let mut hops = 0;
    let response = loop {
        match current.scheme_str() {
            Some("http") | Some("https") => {}
            other => {
                return Err(DownloadError::new(
                    Code::InvalidArgument,
                    format!("scheme {other:?} is not supported (http and https are)"),
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
        let resp = client
            .request(req)
            .await
            .map_err(|e| DownloadError::new(Code::NotFound, format!("cannot reach it: {e}")))?;
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
