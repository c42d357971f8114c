//! The HTTP/1.1 front end (`--http-listen`): bazel-remote's REST API, as Bazel's HTTP cache
//! (`--remote_cache=http://…`), ccache (`remote_storage = http://…|layout=bazel`) and curl speak
//! it. Like the gRPC front end, it only translates: every rule is the core's, so an entry
//! written through one protocol is read through the other (same store, same key space).
//!
//! ```text
//! GET|HEAD|PUT [/INSTANCE]/cas/<sha256>         a blob (PUT verified before it is visible)
//! GET|HEAD|PUT [/INSTANCE]/ac/<sha256>          a serialized ActionResult (PUT validated)
//! GET|HEAD|PUT [/INSTANCE]/opaque/ac/<key>      an opaque value (ccache), never an ActionResult
//! GET /healthz                                  200 while the process runs
//! GET /readyz                                   200 when the storage takes writes, else 503
//! GET /metrics                                  Prometheus metrics
//! GET / , /invocations/<id>                     the status page (HTML; the read role)
//! GET /status , /status/invocations/<id>        the same as JSON
//! ```
//!
//! HTTP's own parts stay here: ETags (the digest) and `If-None-Match`, `Range` (206; a
//! compressed pool decodes only the frames a range touches), `Accept-Encoding: zstd` (stored
//! frames sent as they are), `Content-Encoding: zstd` on PUT (the size limit applies to the
//! decoded bytes), Basic credentials (the token as the password, as Bazel and ccache send it
//! from the URL) beside Bearer, and the connection limits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hashing::{Digest, Fingerprint};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use prost::Message;
use reapi::build::bazel::remote::execution::v2 as remexec;

use crate::MAX_MESSAGE_BYTES;
use crate::core::{Core, Refusal, Why};
use crate::uploads::Piece;

/// Connections served at once; more wait in the listen backlog until one closes.
pub const MAX_CONNECTIONS: usize = 1024;

/// Request headers accepted per request (more: 431).
pub const MAX_HEADERS: usize = 64;

/// How long a client has to send a request's headers, on a new or a kept-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest ActionResult body accepted: the gRPC message limit, so both protocols take the
/// same entries.
const MAX_ACTION_RESULT_BYTES: usize = MAX_MESSAGE_BYTES;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Serves HTTP on `listener` until `shutdown` completes (connections open then finish their
/// requests in the background).
pub(crate) async fn serve(
    core: Core,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small responses must not wait for Nagle + delayed ACK.
        let _ = stream.set_nodelay(true);
        let core = core.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let core = core.clone();
                async move { Ok::<_, Infallible>(handle(&core, peer, req).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.keep_alive(true)
                .max_headers(MAX_HEADERS)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = http
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn response(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// A plain-text response.
fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = response(status, full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A refusal as an HTTP response: its status, and its message (which names what is wrong).
fn refused(r: Refusal, head: bool) -> Response<Body> {
    let status = StatusCode::from_u16(r.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if head {
        empty()
    } else {
        full(format!("{}\n", r.message))
    };
    let mut resp = response(status, body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if r.why == Why::Unauthenticated {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"recache\", Bearer"),
        );
    }
    resp
}

/// What a request names.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    instance: String,
    kind: Kind,
    key: Fingerprint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cas,
    ActionResult,
    Opaque,
}

/// Parses `[/INSTANCE…]/(cas|ac|opaque/ac)/<64 hex>`.
fn parse_path(path: &str) -> Result<Target, Refusal> {
    let bad = |why: &str| Refusal::invalid(format!("path {path:?}: {why}"));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (key, kind, mut rest) = match parts.as_slice() {
        [rest @ .., kind, key] => (*key, *kind, rest),
        _ => return Err(bad("expected /cas/<sha256> or /ac/<sha256>")),
    };
    let kind = match kind {
        "cas" => Kind::Cas,
        "ac" if rest.last() == Some(&"opaque") => {
            rest = &rest[..rest.len() - 1];
            Kind::Opaque
        }
        "ac" => Kind::ActionResult,
        _ => return Err(bad("expected /cas/<sha256> or /ac/<sha256>")),
    };
    if rest.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return Err(bad("empty, `.` or `..` instance name segment"));
    }
    if key.len() != 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad("the key must be 64 lowercase hex digits (a SHA-256)"));
    }
    let key = Fingerprint::from_hex(key).map_err(|e| bad(&e.to_string()))?;
    Ok(Target {
        instance: rest.join("/"),
        kind,
        key,
    })
}

/// The credentials presented: `Authorization: Bearer <token>`, or the password of Basic
/// credentials (any user name), as Bazel and ccache send them from a URL's `user:password@`.
fn presented_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(t.as_bytes().to_vec());
    }
    let b = v.strip_prefix("Basic ")?;
    use base64::Engine as _;
    let pair = base64::engine::general_purpose::STANDARD
        .decode(b.trim())
        .ok()?;
    let colon = pair.iter().position(|c| *c == b':')?;
    Some(pair[colon + 1..].to_vec())
}

async fn handle(core: &Core, peer: std::net::SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let put = req.method() == Method::PUT;
    let name = route_name(req.method(), req.uri().path());
    let started = std::time::Instant::now();
    let caller = crate::status::caller(req.headers());
    let body_length = content_length(req.headers());
    let mut entry = core.0.access.as_ref().map(|_| crate::access::Entry {
        peer: Some(peer.to_string()),
        protocol: "http",
        method: name,
        resource: req.uri().path().to_owned(),
        invocation_id: caller
            .as_ref()
            .map(|c| c.invocation_id.clone())
            .filter(|id| !id.is_empty()),
        bytes: put.then_some(body_length).flatten(),
        ..Default::default()
    });
    let bytes_up = body_length.unwrap_or(0);
    let mut who = None;
    let routed = route(core, req, &mut who).await;
    let lookup = match (&routed, name) {
        (Ok(_), "ac_get") => Some(crate::status::Lookup::Hit),
        (Err(r), "ac_get") if r.why == Why::NotFound => {
            Some(if r.message.contains(crate::core::OUTPUTS_GONE) {
                crate::status::Lookup::OutputsGone
            } else {
                crate::status::Lookup::Miss
            })
        }
        _ => None,
    };
    let resp = routed.unwrap_or_else(|r| refused(r, head));
    core.count_request("http", name, resp.status().as_str(), started.elapsed());
    let sent = content_length(resp.headers());
    let bytes_down = sent.unwrap_or(0);
    if let (Some(log), Some(e)) = (core.0.access.as_ref(), entry.as_mut()) {
        e.identity = who.clone();
        e.status = resp.status().as_str().to_owned();
        e.duration = started.elapsed();
        if !put {
            e.bytes = sent;
        }
        log.record(e);
    }
    if !matches!(name, "healthz" | "readyz" | "metrics" | "status") {
        core.0.invocations.record(crate::status::Call {
            caller,
            identity: who,
            lookup,
            bytes_up,
            bytes_down,
        });
    }
    resp
}

/// The status page's routes (`/`, `/invocations/<id>`, `/status`, `/status/invocations/<id>`;
/// see [`crate::status_page`]), for callers with the read role; `None` for any other path.
fn status_page(
    core: &Core,
    who: &crate::core::Identity,
    path: &str,
) -> Result<Option<Response<Body>>, Refusal> {
    use crate::status_page as page;
    let (html, found) = if path == "/" {
        (true, Some(page::overview(core)))
    } else if path == "/status" {
        (false, Some(page::status_json(core)))
    } else if let Some(id) = path.strip_prefix("/invocations/") {
        let id = page::decode_segment(id).unwrap_or_default();
        (true, page::invocation_page(core, &id))
    } else if let Some(id) = path.strip_prefix("/status/invocations/") {
        let id = page::decode_segment(id).unwrap_or_default();
        (false, page::invocation_status_json(core, &id))
    } else {
        return Ok(None);
    };
    crate::core::authorize(who, crate::core::Role::Read, &format!("GET {path}"))?;
    let Some(body) = found else {
        return Err(Refusal::not_found(format!(
            "{path}: no such invocation is kept here (the last {} seen are)",
            crate::status::INVOCATIONS
        )));
    };
    let mut r = response(StatusCode::OK, full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if html {
            "text/html; charset=utf-8"
        } else {
            "application/json"
        }),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(Some(r))
}

/// A message's Content-Length, if it says one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The route a request is for: the `method` label of its metrics (a fixed set of names).
fn route_name(method: &Method, path: &str) -> &'static str {
    let kind = match path {
        "/healthz" => return "healthz",
        "/readyz" => return "readyz",
        "/metrics" => return "metrics",
        "/" | "/status" => return "status",
        p if p.starts_with("/invocations/") || p.starts_with("/status/invocations/") => {
            return "status";
        }
        _ => parse_path(path).map(|t| t.kind),
    };
    match (kind, method) {
        (Ok(Kind::Cas), &Method::PUT) => "cas_put",
        (Ok(Kind::Cas), _) => "cas_get",
        (Ok(Kind::ActionResult), &Method::PUT) => "ac_put",
        (Ok(Kind::ActionResult), _) => "ac_get",
        (Ok(Kind::Opaque), &Method::PUT) => "opaque_put",
        (Ok(Kind::Opaque), _) => "opaque_get",
        (Err(_), _) => "other",
    }
}

async fn route(
    core: &Core,
    req: Request<Incoming>,
    who_out: &mut Option<String>,
) -> Result<Response<Body>, Refusal> {
    // Health answers without credentials, as load balancers and orchestrators ask.
    match req.uri().path() {
        "/healthz" => return Ok(text(StatusCode::OK, "ok\n".into())),
        "/metrics" => {
            let mut r = text(StatusCode::OK, core.metrics_text());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return Ok(r);
        }
        "/readyz" => {
            let c = core.clone();
            let r = tokio::task::spawn_blocking(move || c.readiness())
                .await
                .map_err(|e| Refusal::internal(format!("readiness check: {e}")))?;
            let status = if r.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Ok(text(status, r.describe()));
        }
        _ => {}
    }
    let presented = presented_token(req.headers());
    let who = crate::core::authenticate(&core.0.options, presented.as_deref(), &[])?;
    *who_out = Some(who.name.clone());
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && let Some(page) = status_page(core, &who, req.uri().path())?
    {
        return Ok(page);
    }
    let target = parse_path(req.uri().path())?;
    let needed = if req.method() == Method::PUT {
        crate::core::Role::Write
    } else {
        crate::core::Role::Read
    };
    crate::core::authorize(
        &who,
        needed,
        &format!("{} {}", req.method(), req.uri().path()),
    )?;
    core.check_instance(&target.instance)?;
    let method = req.method().clone();
    match (method, target.kind) {
        (Method::GET | Method::HEAD, Kind::Cas) => get_blob(core, &req, target.key).await,
        (Method::PUT, Kind::Cas) => put_blob(core, req, target.key).await,
        (Method::GET | Method::HEAD, Kind::ActionResult) => {
            let ar = core.get_action_result(target.key).await?;
            let bytes = ar.encode_to_vec();
            let len = bytes.len();
            let body = if req.method() == Method::HEAD {
                empty()
            } else {
                full(bytes)
            };
            let mut r = response(StatusCode::OK, body);
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(r)
        }
        (Method::PUT, Kind::ActionResult) => {
            let bytes = read_small_body(req, MAX_ACTION_RESULT_BYTES).await?;
            let ar = remexec::ActionResult::decode(&bytes[..]).map_err(|e| {
                Refusal::invalid(format!(
                    "the body is not a serialized ActionResult ({e}); store other values under \
                     /opaque/ac/<key>"
                ))
            })?;
            core.update_action_result(target.key, &ar).await?;
            Ok(response(StatusCode::OK, empty()))
        }
        (Method::GET | Method::HEAD, Kind::Opaque) => {
            let d = core.get_opaque(target.key)?;
            send_blob(core, &req, d, false).await
        }
        (Method::PUT, Kind::Opaque) => {
            let compressed = content_encoding_zstd(req.headers())?;
            let d = put_unsized(core, req, None, compressed).await?;
            core.put_opaque(target.key, d)?;
            Ok(response(StatusCode::OK, empty()))
        }
        (other, _) => {
            let mut r = refused(
                Refusal::invalid(format!(
                    "method {other} is not served: use GET, HEAD or PUT"
                )),
                false,
            );
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, PUT"));
            Ok(r)
        }
    }
}

/// Whether the request body is zstd (`Content-Encoding: zstd`); any other coding but identity
/// is refused.
fn content_encoding_zstd(headers: &HeaderMap) -> Result<bool, Refusal> {
    match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => Ok(false),
        Some(e) if e == "identity" => Ok(false),
        Some(e) if e == "zstd" => Ok(true),
        Some(e) => Err(Refusal::invalid(format!(
            "Content-Encoding {e:?} is not accepted (zstd and identity are)"
        ))),
    }
}

/// A small body whole (an ActionResult), at most `limit` bytes after decoding.
async fn read_small_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let compressed = content_encoding_zstd(req.headers())?;
    let too_large = || {
        Refusal::new(
            Why::TooLarge,
            format!("the body is larger than the {limit} bytes accepted here"),
        )
    };
    let bytes = http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                Refusal::invalid(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    if !compressed {
        return Ok(bytes);
    }
    let decoded = zstd::bulk::decompress(&bytes, limit)
        .map_err(|e| Refusal::invalid(format!("undecodable zstd body: {e}")))?;
    Ok(Bytes::from(decoded))
}

/// Sends the request body to an upload's writer, then the end of input. More than `limit`
/// bytes on the wire is refused (the writer gets no end, so it stores nothing).
async fn pump(
    core: &Core,
    mut body: Incoming,
    tx: &tokio::sync::mpsc::Sender<Piece>,
    limit: u64,
    zstd: bool,
) -> Result<(), Refusal> {
    let mut received = 0u64;
    let counted = CountOnDrop {
        core,
        zstd,
        n: std::cell::Cell::new(0),
    };
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| Refusal::invalid(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received += data.len() as u64;
        counted.n.set(received);
        if received > limit {
            return Err(Refusal::new(
                Why::TooLarge,
                format!("the body is larger than this cache accepts ({limit} bytes)"),
            ));
        }
        if tx.send(Piece::Bytes(data)).await.is_err() {
            // The writer stopped early (refused): its result says why.
            return Ok(());
        }
    }
    let _ = tx.send(Piece::End).await;
    Ok(())
}

/// Counts the bytes a PUT received, whatever ends it.
struct CountOnDrop<'a> {
    core: &'a Core,
    zstd: bool,
    n: std::cell::Cell<u64>,
}

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.core.count_bytes("http", "in", self.zstd, self.n.get());
    }
}

/// Stores a body whose length is not known up front (chunked, or zstd-encoded), up to
/// `--max-blob-size` decoded; with `hash`, it must hash to it. The digest stored.
async fn put_unsized(
    core: &Core,
    req: Request<Incoming>,
    hash: Option<Fingerprint>,
    compressed: bool,
) -> Result<Digest, Refusal> {
    let upload = core.start_unsized_upload(hash, compressed)?;
    pump(
        core,
        req.into_body(),
        &upload.tx,
        core.0.options.max_blob_size,
        compressed,
    )
    .await?;
    core.finish_unsized_upload(upload).await
}

/// PUT /cas/<sha256>: with a Content-Length (and no content coding), the size is known before
/// a byte is read: checked against `--max-blob-size`, room reserved, the body streamed to the
/// pool and committed only if it hashes to the key. Chunked or zstd bodies stream the same
/// way, their size checked as they arrive.
async fn put_blob(
    core: &Core,
    req: Request<Incoming>,
    hash: Fingerprint,
) -> Result<Response<Body>, Refusal> {
    let compressed = content_encoding_zstd(req.headers())?;
    match content_length(req.headers()) {
        Some(len) if !compressed => {
            let d = Digest::new(hash, len);
            core.check_size(d)?;
            if core.already_stored(d) {
                return Ok(response(StatusCode::OK, empty()));
            }
            let upload = core.start_upload(d, false).await?;
            pump(core, req.into_body(), &upload.tx, len, false).await?;
            core.finish_upload(upload).await?;
        }
        _ => {
            put_unsized(core, req, Some(hash), compressed).await?;
        }
    }
    Ok(response(StatusCode::OK, empty()))
}

/// GET|HEAD /cas/<sha256>.
async fn get_blob(
    core: &Core,
    req: &Request<Incoming>,
    hash: Fingerprint,
) -> Result<Response<Body>, Refusal> {
    let d = core
        .find_by_hash(hash)
        .ok_or_else(|| Refusal::not_found(format!("blob {} not found", hash.to_hex())))?;
    let etag = format!("\"{}\"", hash.to_hex());
    if let Some(inm) = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
    {
        let mut r = response(StatusCode::NOT_MODIFIED, empty());
        r.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&etag).map_err(|e| Refusal::internal(e.to_string()))?,
        );
        return Ok(r);
    }
    send_blob(core, req, d, true).await
}

/// A blob as the response body, honouring `Range` and `Accept-Encoding: zstd`.
async fn send_blob(
    core: &Core,
    req: &Request<Incoming>,
    d: Digest,
    tagged: bool,
) -> Result<Response<Body>, Refusal> {
    let size = d.size_bytes;
    let head = req.method() == Method::HEAD;
    let range = match req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        Some(r) => parse_range(r, size)?,
        None => None,
    };
    let zstd_ok = req
        .headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|c| c.split(';').next().is_some_and(|c| c.trim() == "zstd"));
    let frames = if range.is_none() && zstd_ok {
        core.frames_len(d)
    } else {
        None
    };
    let (status, offset, end, length) = match (range, frames) {
        (Some((a, b)), _) => (StatusCode::PARTIAL_CONTENT, a, b + 1, b + 1 - a),
        (None, Some(len)) => (StatusCode::OK, 0, size, len),
        (None, None) => (StatusCode::OK, 0, size, size),
    };
    let body = if head {
        empty()
    } else {
        core.count_bytes("http", "out", frames.is_some(), length);
        let stream = core.read(d, offset, end, frames.is_some()).await?;
        StreamBody::new(stream.map(|chunk| {
            chunk
                .map(Frame::data)
                .map_err(|r| std::io::Error::other(r.message))
        }))
        .boxed_unsync()
    };
    let mut r = response(status, body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if tagged && let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", d.hash.to_hex())) {
        h.insert(header::ETAG, v);
    }
    if frames.is_some() {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {offset}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(r)
}

/// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range, as an inclusive `(first, last)`; `None`
/// for a header this server does not take up (several ranges, another unit: the whole blob is
/// sent, as HTTP allows). A range that starts past the end is refused (416).
fn parse_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, Refusal> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = || {
        Refusal::new(
            Why::OutOfRange,
            format!("range {header:?} is outside the blob (bytes 0-{size})"),
        )
    };
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let (first, last) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| unsatisfiable())?;
            if n == 0 || size == 0 {
                return Err(unsatisfiable());
            }
            (size.saturating_sub(n), size - 1)
        }
        (a, "") => (
            a.parse().map_err(|_| unsatisfiable())?,
            size.saturating_sub(1),
        ),
        (a, b) => {
            let a: u64 = a.parse().map_err(|_| unsatisfiable())?;
            let b: u64 = b.parse().map_err(|_| unsatisfiable())?;
            if b < a {
                return Err(unsatisfiable());
            }
            (a, b.min(size.saturating_sub(1)))
        }
    };
    if first >= size {
        return Err(unsatisfiable());
    }
    Ok(Some((first, last)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn paths_are_parsed_strictly() {
        let t = parse_path(&format!("/cas/{H}")).unwrap();
        assert_eq!((t.instance.as_str(), t.kind), ("", Kind::Cas));
        let t = parse_path(&format!("/a/b/ac/{H}")).unwrap();
        assert_eq!((t.instance.as_str(), t.kind), ("a/b", Kind::ActionResult));
        let t = parse_path(&format!("/main/opaque/ac/{H}")).unwrap();
        assert_eq!((t.instance.as_str(), t.kind), ("main", Kind::Opaque));
        for bad in [
            format!("/cas/{}", &H[..63]),
            format!("/cas/{}", H.to_uppercase()),
            format!("/blobs/{H}"),
            format!("/../cas/{H}"),
            format!("/a//cas/{H}"),
            "/".to_owned(),
        ] {
            let e = parse_path(&bad).unwrap_err();
            assert_eq!(e.http_status(), 400, "{bad}");
        }
    }

    #[test]
    fn ranges_are_clipped_or_refused() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some((50, 99)));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        for bad in ["bytes=100-", "bytes=5-1", "bytes=x-1", "bytes=-0"] {
            assert_eq!(
                parse_range(bad, 100).unwrap_err().http_status(),
                416,
                "{bad}"
            );
        }
    }
}
