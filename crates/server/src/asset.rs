//! Remote Asset (`build.bazel.remote.asset.v1`): Fetch and Push on top of the CAS.
//!
//! An *asset* is a URI plus qualifiers, recorded as pointing at a blob or a directory in the
//! CAS. Records live in the store's `refs` table (so they age out with the blobs, like
//! ActionCache entries) under a key derived from a canonical, unambiguous form of the request:
//!
//! ```text
//! SHA-256( "recache-asset-v1" ‖ len(uri) ‖ uri ‖ n ‖ (len(name) ‖ name ‖ len(value) ‖ value)… )
//! ```
//!
//! with the qualifiers sorted by name and every length a u64: no two different requests share a
//! key, and the order a client lists its qualifiers in does not matter. Qualifiers that carry
//! credentials or per-request transport details (`http_header:*`, `http_header_url:*`) are not
//! part of the key: one user's token must not split (or leak into) the cache.
//!
//! `FetchBlob` answers from a record (if not expired and not older than
//! `oldest_content_accepted`, and only while the blob is still in the CAS), or, with a
//! `checksum.sri` naming a SHA-256 the CAS already holds, from the CAS; otherwise it downloads
//! from the URIs in order , verifies the SRI, stores the blob and records
//! the asset (see `fetcher::download`). Failures go in the response's `status` (NOT_FOUND, DEADLINE_EXCEEDED,
//! PERMISSION_DENIED, RESOURCE_EXHAUSTED, ABORTED), never as an OK without a digest. Requests the
//! server cannot honour (an unknown qualifier, a malformed SRI) are INVALID_ARGUMENT naming
//! what is wrong.
//!
//! `PushBlob` / `PushDirectory` record assets for content already in the CAS (and refuse
//! content that is not), with the server's bearer token when one is set (the interceptor
//! checks every call).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use hashing::Digest;
use reapi::build::bazel::remote::asset::v1::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
    fetch_server::Fetch, push_server::Push,
};
use reapi::google::protobuf::Timestamp;
use reapi::google::rpc::Status as RpcStatus;
use tonic::{Code, Request, Response, Status};

use crate::Inner;
use fetcher::download::{self, Sri};

/// Qualifiers this server honours (others are refused by name, as the API requires).
const KNOWN: [&str; 3] = ["resource_type", "checksum.sri", "bazel.canonical_id"];

/// Qualifier name prefixes that are request parameters, not part of an asset's identity.
const TRANSPORT_PREFIXES: [&str; 2] = ["http_header:", "http_header_url:"];

fn is_transport(name: &str) -> bool {
    TRANSPORT_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether an asset points at a blob or at a Directory tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Blob,
    Directory,
}

/// What the index holds for one asset key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub kind: Kind,
    pub digest: Digest,
    /// Unix seconds after which the record is not served (0: never expires).
    pub expire_at: i64,
    /// Unix seconds when it was recorded.
    pub stored_at: i64,
    /// Blobs the asset needs beyond its own digest (`references_blobs` of a push): kept as
    /// long as the asset, required for a hit.
    pub refs_blobs: Vec<Digest>,
    /// Directory trees the asset needs (`references_directories`), every blob under them.
    pub refs_dirs: Vec<Digest>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let kind = match self.kind {
            Kind::Blob => "blob",
            Kind::Directory => "dir",
        };
        let mut text = format!(
            "recache-asset-v1 {kind} {} {} {}",
            self.digest, self.expire_at, self.stored_at
        );
        // References follow as `blobs=<d>,<d>` and `dirs=<d>,…` (a record without any reads
        // as it did before references were kept).
        for (name, refs) in [("blobs", &self.refs_blobs), ("dirs", &self.refs_dirs)] {
            if !refs.is_empty() {
                let list: Vec<String> = refs.iter().map(ToString::to_string).collect();
                text.push_str(&format!(" {name}={}", list.join(",")));
            }
        }
        text.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(' ');
        if parts.next()? != "recache-asset-v1" {
            return None;
        }
        let kind = match parts.next()? {
            "blob" => Kind::Blob,
            "dir" => Kind::Directory,
            _ => return None,
        };
        let digest = parts.next()?.parse().ok()?;
        let expire_at = parts.next()?.parse().ok()?;
        let stored_at = parts.next()?.parse().ok()?;
        let mut record = Record {
            kind,
            digest,
            expire_at,
            stored_at,
            refs_blobs: Vec::new(),
            refs_dirs: Vec::new(),
        };
        for part in parts {
            let (name, list) = part.split_once('=')?;
            let refs = list
                .split(',')
                .map(|d| d.parse().ok())
                .collect::<Option<Vec<Digest>>>()?;
            match name {
                "blobs" => record.refs_blobs = refs,
                "dirs" => record.refs_dirs = refs,
                _ => return None,
            }
        }
        Some(record)
    }

    /// A record of `kind` for `digest`, recorded now, without references.
    fn new(kind: Kind, digest: Digest, expire_at: i64) -> Record {
        Record {
            kind,
            digest,
            expire_at,
            stored_at: now_secs(),
            refs_blobs: Vec::new(),
            refs_dirs: Vec::new(),
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The index key of (`uri`, `qualifiers`): see the module docs. Transport qualifiers are left
/// out; the rest are sorted, every field length-prefixed.
pub(crate) fn asset_key(uri: &str, qualifiers: &[Qualifier]) -> Digest {
    let mut q: Vec<(&str, &str)> = qualifiers
        .iter()
        .filter(|q| !is_transport(&q.name))
        .map(|q| (q.name.as_str(), q.value.as_str()))
        .collect();
    q.sort_unstable();
    let mut bytes = Vec::with_capacity(64 + uri.len());
    bytes.extend_from_slice(b"recache-asset-v1");
    let mut field = |b: &[u8]| {
        bytes.extend_from_slice(&(b.len() as u64).to_le_bytes());
        bytes.extend_from_slice(b);
    };
    field(uri.as_bytes());
    field(&(q.len() as u64).to_le_bytes());
    for (name, value) in q {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    Digest::of_bytes(&bytes)
}

/// Checks qualifiers: every name known or a transport parameter, none twice. Returns the SRI
/// checksums asked for (any one must match).
pub(crate) fn check_qualifiers(qualifiers: &[Qualifier]) -> Result<Vec<Sri>, Status> {
    let mut seen = std::collections::HashSet::new();
    let mut unknown = Vec::new();
    let mut sri = Vec::new();
    for q in qualifiers {
        if !seen.insert(q.name.as_str()) {
            return Err(Status::invalid_argument(format!(
                "qualifier {:?} is given twice",
                q.name
            )));
        }
        if is_transport(&q.name) {
            continue;
        }
        if !KNOWN.contains(&q.name.as_str()) {
            unknown.push(q.name.clone());
            continue;
        }
        if q.name == "checksum.sri" {
            sri = Sri::parse_list(&q.value)
                .map_err(|e| Status::invalid_argument(format!("qualifier checksum.sri: {e}")))?;
        }
    }
    if !unknown.is_empty() {
        return Err(Status::invalid_argument(format!(
            "unsupported qualifiers {unknown:?} (this server honours {KNOWN:?} and http_header:*)"
        )));
    }
    Ok(sri)
}

/// HTTP headers the client asked the origin to get (`http_header:NAME` = value).
fn headers(qualifiers: &[Qualifier]) -> Vec<(String, String)> {
    qualifiers
        .iter()
        .filter_map(|q| {
            q.name
                .strip_prefix("http_header:")
                .map(|h| (h.to_owned(), q.value.clone()))
        })
        .collect()
}

fn status(code: Code, message: impl Into<String>) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message: message.into(),
        details: vec![],
    })
}

fn timestamp(secs: i64) -> Option<Timestamp> {
    (secs > 0).then_some(Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// The Fetch and Push services.
#[derive(Debug, Clone)]
pub(crate) struct AssetSvc(pub Arc<Inner>);

impl AssetSvc {
    /// A download from an origin writes to the cache: only a caller with the write role may
    /// cause one (a caller the auth layer did not see, in-process, may).
    fn may_download(&self, who: Option<&crate::core::Identity>) -> Result<(), Status> {
        match who {
            Some(who) => Ok(crate::core::authorize(
                who,
                crate::core::Role::Write,
                "downloading an asset from its origin",
            )?),
            None => Ok(()),
        }
    }

    fn check_instance(&self, name: &str) -> Result<(), Status> {
        Ok(self.0.check_instance(name)?)
    }

    /// A usable record for any of `uris`: of `kind`, not expired, not older than `oldest`, and
    /// its content still here.
    fn lookup(
        &self,
        uris: &[String],
        qualifiers: &[Qualifier],
        kind: Kind,
        oldest: i64,
    ) -> Option<(String, Record)> {
        let now = now_secs();
        for uri in uris {
            let key = asset_key(uri, qualifiers);
            let Some(record) = self
                .0
                .store
                .get_ref(key)
                .ok()
                .flatten()
                .and_then(|b| Record::decode(&b))
            else {
                continue;
            };
            let fresh = record.expire_at == 0 || record.expire_at > now;
            if record.kind == kind
                && fresh
                && record.stored_at >= oldest
                && self.0.store.contains(record.digest)
                && self.references_alive(&record)
            {
                return Some((uri.clone(), record));
            }
        }
        None
    }

    /// Whether everything `record` references is here (every blob, every tree whole): an asset
    /// whose references are gone is a miss, never a hit naming a tree that is gone. A hit is a
    /// use of all of it, for LRU, so references live as long as the asset is used.
    fn references_alive(&self, record: &Record) -> bool {
        let store = &self.0.store;
        if !store.missing(record.refs_blobs.iter().copied()).is_empty() {
            return false;
        }
        let mut used: Vec<Digest> = record.refs_blobs.clone();
        used.push(record.digest);
        for d in &record.refs_dirs {
            match store.tree_digests(*d) {
                Ok(Some(all)) => used.extend(all),
                _ => return false,
            }
        }
        store.touch_all(used);
        true
    }

    /// Checks that the references of a push are in the CAS (whole trees for directories).
    fn check_references(
        &self,
        blobs: &[reapi::build::bazel::remote::execution::v2::Digest],
        dirs: &[reapi::build::bazel::remote::execution::v2::Digest],
    ) -> Result<(Vec<Digest>, Vec<Digest>), Status> {
        let mut refs_blobs = Vec::with_capacity(blobs.len());
        for (i, b) in blobs.iter().enumerate() {
            let d = required(&format!("references_blobs[{i}]"), Some(b))?;
            if !self.0.store.contains(d) {
                return Err(Status::failed_precondition(format!(
                    "referenced blob {d} is not in the CAS: upload it first"
                )));
            }
            refs_blobs.push(d);
        }
        let mut refs_dirs = Vec::with_capacity(dirs.len());
        for (i, t) in dirs.iter().enumerate() {
            let d = required(&format!("references_directories[{i}]"), Some(t))?;
            match self.0.store.directory_complete(d) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Status::failed_precondition(format!(
                        "referenced directory {d} or something in it is not in the CAS: upload \
                         it first"
                    )));
                }
                Err(e) => {
                    return Err(Status::invalid_argument(format!(
                        "referenced directory {d} is not a valid tree: {e}"
                    )));
                }
            }
            refs_dirs.push(d);
        }
        Ok((refs_blobs, refs_dirs))
    }

    fn record(
        &self,
        uris: &[String],
        qualifiers: &[Qualifier],
        record: &Record,
    ) -> Result<(), Status> {
        for uri in uris {
            self.0
                .store
                .put_ref(asset_key(uri, qualifiers), &record.encode())
                .map_err(|e| Status::internal(format!("recording the asset: {e}")))?;
        }
        Ok(())
    }
}

/// `oldest_content_accepted` as unix seconds (0: anything).
fn oldest(t: Option<&Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds)
}

#[tonic::async_trait]
impl Fetch for AssetSvc {
    async fn fetch_blob(
        &self,
        req: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let who = req.extensions().get::<crate::core::Identity>().cloned();
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        if req.uris.is_empty() {
            return Err(Status::invalid_argument("uris is empty: name at least one"));
        }
        let sri = check_qualifiers(&req.qualifiers)?;
        let answer = |uri: String, digest: Digest, expire_at: i64| FetchBlobResponse {
            status: status(Code::Ok, ""),
            uri,
            qualifiers: req.qualifiers.clone(),
            expires_at: timestamp(expire_at),
            blob_digest: Some(digest.into()),
            digest_function: 0,
        };
        // 1. The index.
        if let Some((uri, r)) = self.lookup(
            &req.uris,
            &req.qualifiers,
            Kind::Blob,
            oldest(req.oldest_content_accepted.as_ref()),
        ) {
            self.0.metrics.asset_fetch("index", "OK");
            return Ok(Response::new(answer(uri, r.digest, r.expire_at)));
        }
        // 2. The CAS, when the checksum names a SHA-256 it holds.
        for s in &sri {
            if let Some(digest) = s.sha256().and_then(|h| self.0.store.find_by_hash(h)) {
                let r = Record::new(Kind::Blob, digest, 0);
                self.record(&req.uris[..1], &req.qualifiers, &r)?;
                self.0.metrics.asset_fetch("cas", "OK");
                return Ok(Response::new(answer(req.uris[0].clone(), digest, 0)));
            }
        }
        // 3. The origin, URI by URI; concurrent fetches of one asset share one download. A
        //    download writes to the cache: it needs the write role.
        self.may_download(who.as_ref())?;
        download::check_headers(&headers(&req.qualifiers)).map_err(Status::invalid_argument)?;
        let options = download::Options::for_request(
            req.timeout.as_ref(),
            self.0.options.max_blob_size,
            headers(&req.qualifiers),
            self.0.options.storage.join("downloads"),
            self.0.options.asset_policy.clone(),
        );
        let key = asset_key(&req.uris.join("\u{0}"), &req.qualifiers);
        let shared = {
            let mut inflight = self.0.downloads.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let (store, uris) = (self.0.store.clone(), req.uris.clone());
                    let f = async move { download_any(&store, &uris, &sri, &options).await }
                        .boxed()
                        .shared();
                    inflight.insert(key, f.clone());
                    f
                }
            }
        };
        let outcome = shared.await;
        self.0
            .downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        match outcome {
            Ok((uri, digest)) => {
                if let Some(t) = &self.0.tier {
                    // The download is the bucket's too, so every server sharing it can serve it.
                    t.adopt(digest);
                }
                let r = Record::new(Kind::Blob, digest, 0);
                self.record(std::slice::from_ref(&uri), &req.qualifiers, &r)?;
                self.0.metrics.asset_fetch("origin", "OK");
                Ok(Response::new(answer(uri, digest, 0)))
            }
            Err(e) => {
                self.0
                    .metrics
                    .asset_fetch("origin", crate::metrics::grpc_code_label(e.code() as i32));
                Ok(Response::new(FetchBlobResponse {
                    status: status(e.code(), e.to_string()),
                    uri: String::new(),
                    qualifiers: req.qualifiers,
                    expires_at: None,
                    blob_digest: None,
                    digest_function: 0,
                }))
            }
        }
    }

    async fn fetch_directory(
        &self,
        req: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let who = req.extensions().get::<crate::core::Identity>().cloned();
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        if req.uris.is_empty() {
            return Err(Status::invalid_argument("uris is empty: name at least one"));
        }
        check_qualifiers(&req.qualifiers)?;
        if let Some((uri, r)) = self.lookup(
            &req.uris,
            &req.qualifiers,
            Kind::Directory,
            oldest(req.oldest_content_accepted.as_ref()),
        ) {
            return Ok(Response::new(FetchDirectoryResponse {
                status: status(Code::Ok, ""),
                uri,
                qualifiers: req.qualifiers,
                expires_at: timestamp(r.expire_at),
                root_directory_digest: Some(r.digest.into()),
                digest_function: 0,
            }));
        }
        // An archive the origin serves, unpacked (same path rules as action outputs).
        let resource_type = req
            .qualifiers
            .iter()
            .find(|q| q.name == "resource_type")
            .map(|q| q.value.as_str());
        let kinds: Vec<(String, fetcher::archive::ArchiveKind)> = req
            .uris
            .iter()
            .filter_map(|u| {
                fetcher::archive::ArchiveKind::detect(resource_type, u).map(|k| (u.clone(), k))
            })
            .collect();
        let failed = |code: Code, message: String| FetchDirectoryResponse {
            status: status(code, message),
            uri: String::new(),
            qualifiers: req.qualifiers.clone(),
            expires_at: None,
            root_directory_digest: None,
            digest_function: 0,
        };
        if kinds.is_empty() {
            return Ok(Response::new(failed(
                Code::NotFound,
                "no pushed directory for these URIs and qualifiers, and none of them is an \
                 archive this server unpacks (.tar, .tar.gz, .tgz, .zip, or a resource_type \
                 naming one)"
                    .into(),
            )));
        }
        let sri = check_qualifiers(&req.qualifiers)?;
        self.may_download(who.as_ref())?;
        download::check_headers(&headers(&req.qualifiers)).map_err(Status::invalid_argument)?;
        let options = download::Options::for_request(
            req.timeout.as_ref(),
            self.0.options.max_blob_size,
            headers(&req.qualifiers),
            self.0.options.storage.join("downloads"),
            self.0.options.asset_policy.clone(),
        );
        let mut last = failed(Code::NotFound, "no URI could be fetched".into());
        for (uri, kind) in kinds {
            let archive = match download::fetch(&self.0.store, &uri, &sri, &options).await {
                Ok(d) => d,
                Err(e) => {
                    last = failed(e.code(), format!("{uri}: {e}"));
                    continue;
                }
            };
            let (store, limits) = (self.0.store.clone(), self.0.options.archive_limits);
            let _turn = self
                .0
                .unpacking
                .acquire()
                .await
                .map_err(|e| Status::internal(format!("unpacking: {e}")))?;
            // Held while it unpacks, so eviction for other uploads cannot take it midway.
            let _lease = store.lease([archive]);
            let unpacked = tokio::task::spawn_blocking(move || {
                fetcher::archive::unpack(&store, archive, kind, limits).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| Status::internal(format!("unpacking: {e}")))?;
            match unpacked {
                Ok(root) => {
                    let r = Record::new(Kind::Directory, root, 0);
                    self.record(std::slice::from_ref(&uri), &req.qualifiers, &r)?;
                    return Ok(Response::new(FetchDirectoryResponse {
                        status: status(Code::Ok, ""),
                        uri,
                        qualifiers: req.qualifiers,
                        expires_at: None,
                        root_directory_digest: Some(root.into()),
                        digest_function: 0,
                    }));
                }
                Err(why) => {
                    last = failed(
                        Code::Aborted,
                        format!("{uri}: the archive was refused: {why}"),
                    );
                }
            }
        }
        Ok(Response::new(last))
    }
}

/// Tries `uris` in order; the first that downloads and verifies wins. The error is the last
/// URI's, naming it.
async fn download_any(
    store: &store::LocalStore,
    uris: &[String],
    sri: &[Sri],
    options: &download::Options,
) -> Result<(String, Digest), download::DownloadError> {
    let mut last = None;
    for uri in uris {
        match download::fetch(store, uri, sri, options).await {
            Ok(digest) => return Ok((uri.clone(), digest)),
            Err(e) => {
                tracing::info!(%uri, error = %e, "remote asset download failed");
                last = Some(e.naming(uri));
            }
        }
    }
    Err(last
        .unwrap_or_else(|| download::DownloadError::new(Code::NotFound, "no URI could be fetched")))
}

fn required(
    field: &str,
    d: Option<&reapi::build::bazel::remote::execution::v2::Digest>,
) -> Result<Digest, Status> {
    hashing::reapi::require_digest(field, d).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn expire(t: Option<&Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds.max(1))
}

#[tonic::async_trait]
impl Push for AssetSvc {
    async fn push_blob(
        &self,
        req: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        if req.uris.is_empty() {
            return Err(Status::invalid_argument("uris is empty: name at least one"));
        }
        check_qualifiers(&req.qualifiers)?;
        let digest = required("blob_digest", req.blob_digest.as_ref())?;
        if !self.0.store.contains(digest) {
            return Err(Status::failed_precondition(format!(
                "blob {digest} is not in the CAS: upload it first"
            )));
        }
        let (refs_blobs, refs_dirs) =
            self.check_references(&req.references_blobs, &req.references_directories)?;
        let r = Record {
            refs_blobs,
            refs_dirs,
            ..Record::new(Kind::Blob, digest, expire(req.expire_at.as_ref()))
        };
        self.record(&req.uris, &req.qualifiers, &r)?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        req: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let req = req.into_inner();
        self.check_instance(&req.instance_name)?;
        if req.uris.is_empty() {
            return Err(Status::invalid_argument("uris is empty: name at least one"));
        }
        check_qualifiers(&req.qualifiers)?;
        let digest = required("root_directory_digest", req.root_directory_digest.as_ref())?;
        // The whole tree must be here and valid, not just its root.
        let store = self.0.store.clone();
        let complete = tokio::task::spawn_blocking(move || store.directory_complete(digest))
            .await
            .map_err(|e| Status::internal(format!("checking the tree: {e}")))?;
        match complete {
            Ok(true) => {}
            Ok(false) => {
                return Err(Status::failed_precondition(format!(
                    "directory {digest} or something in it is not in the CAS: upload it first"
                )));
            }
            Err(e) => {
                return Err(Status::invalid_argument(format!(
                    "directory {digest} is not a valid tree: {e}"
                )));
            }
        }
        let (refs_blobs, mut refs_dirs) =
            self.check_references(&req.references_blobs, &req.references_directories)?;
        // The pushed tree itself counts like a referenced one: whole, and kept whole by use.
        refs_dirs.push(digest);
        let r = Record {
            refs_blobs,
            refs_dirs,
            ..Record::new(Kind::Directory, digest, expire(req.expire_at.as_ref()))
        };
        self.record(&req.uris, &req.qualifiers, &r)?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn q(name: &str, value: &str) -> Qualifier {
        Qualifier {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn keys_ignore_order_and_credentials_but_nothing_else() {
        let a = [
            q("resource_type", "application/x-tar"),
            q("checksum.sri", "sha256-x"),
        ];
        let b = [
            q("checksum.sri", "sha256-x"),
            q("resource_type", "application/x-tar"),
        ];
        assert_eq!(asset_key("https://h/f", &a), asset_key("https://h/f", &b));
        let with_token = [
            a[0].clone(),
            a[1].clone(),
            q("http_header:Authorization", "Bearer s"),
        ];
        assert_eq!(
            asset_key("https://h/f", &a),
            asset_key("https://h/f", &with_token)
        );
        assert_ne!(asset_key("https://h/f", &a), asset_key("https://h/g", &a));
        assert_ne!(
            asset_key("https://h/f", &a),
            asset_key("https://h/f", &[q("resource_type", "application/x-tar")])
        );
        // Length prefixes: moving bytes between fields changes the key.
        assert_ne!(
            asset_key("u", &[q("ab", "c")]),
            asset_key("u", &[q("a", "bc")])
        );
    }

    #[test]
    fn qualifiers_are_checked_by_name() {
        assert!(check_qualifiers(&[q("resource_type", "x"), q("http_header:X", "y")]).is_ok());
        let e = check_qualifiers(&[q("vcs.commit", "abc"), q("directory", "sub")]).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("vcs.commit") && e.message().contains("directory"));
        let e = check_qualifiers(&[q("checksum.sri", "md5-abc")]).unwrap_err();
        assert!(e.message().contains("checksum.sri"), "{}", e.message());
        let e = check_qualifiers(&[q("resource_type", "a"), q("resource_type", "b")]).unwrap_err();
        assert!(e.message().contains("twice"));
    }

    #[test]
    fn records_read_back() {
        let r = Record {
            kind: Kind::Directory,
            digest: Digest::of_bytes(b"x"),
            expire_at: 12,
            stored_at: 34,
            refs_blobs: Vec::new(),
            refs_dirs: Vec::new(),
        };
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        let with_refs = Record {
            refs_blobs: vec![Digest::of_bytes(b"a"), Digest::of_bytes(b"b")],
            refs_dirs: vec![Digest::of_bytes(b"t")],
            ..r
        };
        assert_eq!(Record::decode(&with_refs.encode()), Some(with_refs));
        assert_eq!(Record::decode(b"recache-asset-v1 blob nonsense 1 2"), None);
    }
}
