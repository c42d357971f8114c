//! Blobs and action results in an S3-compatible bucket: the calls the S3 tier
//! ([`crate::tier`]) makes, each one S3 request (retried by the SDK, see [`S3_ATTEMPTS`]).
//!
//! Keys come from validated digests only, never from client text:
//! `<prefix>cas/<64 hex>-<size>` for blobs, `<prefix>ac/<64 hex>-<size>` for action results. A blob is uploaded in one PUT below
//! [`S3Options::multipart_threshold`], else in parts of [`S3Options::part_size`] read from the
//! file one at a time (memory: one part); a failed multipart upload is aborted before the error
//! is returned. Downloads stream to a file and are verified against the digest; a blob whose
//! content does not match is an error, never a result.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use hashing::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Attempts per S3 request (the first and its retries). The SDK's standard retry strategy
/// retries throttling (503 SlowDown), 5xx answers, timeouts and broken connections, with
/// exponential backoff and full jitter between [`S3_BACKOFF_START`] and [`S3_BACKOFF_MAX`];
/// what still fails is the caller's to surface (as UNAVAILABLE) or to requeue.
pub const S3_ATTEMPTS: u32 = 5;
/// First retry delay (before jitter); doubles per attempt.
pub const S3_BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const S3_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Time to open a connection to the S3 server.
pub const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time from sending a request to the first byte of its answer.
pub const S3_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest action result accepted from the bucket.
const MAX_AC_BYTES: i64 = 16 << 20;

/// Where the bucket is and how to reach it.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// `http(s)://host:port` of an S3-compatible server; `None`: AWS itself.
    pub endpoint: Option<String>,
    /// Region (S3-compatible servers mostly accept any).
    pub region: String,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix, e.g. `team-a/` (empty: the bucket's root).
    pub prefix: String,
    /// Address buckets as `host/bucket` rather than `bucket.host` (what most S3-compatible
    /// servers need).
    pub path_style: bool,
    /// Access key and secret; `None`: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub credentials: Option<(String, String)>,
    /// Blobs at least this large go multipart. Default 16 MiB.
    pub multipart_threshold: u64,
    /// Bytes per part (S3's minimum is 5 MiB but for the last). Default 8 MiB.
    pub part_size: u64,
    /// Time from sending a request to the first byte of its answer before the attempt is
    /// abandoned (and retried). Default [`S3_READ_TIMEOUT`].
    pub read_timeout: Duration,
}

impl S3Options {
    /// Defaults for `bucket` at `endpoint`, path-style.
    pub fn new(endpoint: Option<String>, bucket: impl Into<String>) -> S3Options {
        S3Options {
            endpoint,
            region: "us-east-1".into(),
            bucket: bucket.into(),
            prefix: String::new(),
            path_style: true,
            credentials: None,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            read_timeout: S3_READ_TIMEOUT,
        }
    }
}

/// An S3 failure, with the operation and key it happened on.
#[derive(Debug, thiserror::Error)]
#[error("S3 {op} {key}: {message}")]
pub struct S3Error {
    op: &'static str,
    key: String,
    message: String,
    no_such_upload: bool,
    bad_object: bool,
}

impl S3Error {
    /// The object is not the blob its key names (the wrong size): delete it and treat the blob
    /// as missing.
    pub fn is_bad_object(&self) -> bool {
        self.bad_object
    }

    /// The multipart upload named does not exist (any more): completed, aborted (by a sweep of
    /// another server, say) or never created. The upload must start over.
    pub fn is_no_such_upload(&self) -> bool {
        self.no_such_upload
    }
}

fn s3_err(op: &'static str, key: &str, e: impl std::fmt::Display) -> S3Error {
    S3Error {
        op,
        key: key.to_owned(),
        message: e.to_string(),
        no_such_upload: false,
        bad_object: false,
    }
}

/// Credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`),
/// else from the shared credentials file's profile (`AWS_PROFILE`, default `default`).
fn environment_credentials() -> Option<(String, String, Option<String>)> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        return Some((id, secret, var("AWS_SESSION_TOKEN")));
    }
    let file = match var("AWS_SHARED_CREDENTIALS_FILE") {
        Some(f) => std::path::PathBuf::from(f),
        None => std::path::PathBuf::from(var("HOME")?).join(".aws/credentials"),
    };
    let text = std::fs::read_to_string(file).ok()?;
    profile_credentials(
        &text,
        &var("AWS_PROFILE").unwrap_or_else(|| "default".into()),
    )
}

/// The keys of `[profile]` in an AWS shared credentials file.
fn profile_credentials(text: &str, profile: &str) -> Option<(String, String, Option<String>)> {
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == profile;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some((id?, secret?, token))
}

/// A failure of the local side of an S3 transfer (reading the fast tier, the journal).
pub(crate) fn local_error(d: Digest, e: impl std::fmt::Display) -> S3Error {
    s3_err("(local)", &d.to_string(), e)
}

/// An SDK failure, with its code kept where a caller branches on it.
fn sdk_err<E, R>(op: &'static str, key: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> S3Error
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let no_such_upload = e.as_service_error().and_then(|s| s.code()) == Some("NoSuchUpload");
    let mut err = s3_err(op, key, aws_sdk_s3::error::DisplayErrorContext(e));
    err.no_such_upload = no_such_upload;
    err
}

/// An upload S3 holds open (from `ListMultipartUploads`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    /// The object key.
    pub key: String,
    /// S3's upload id.
    pub upload_id: String,
    /// When it was initiated (unix seconds; 0 if the server did not say).
    pub initiated: i64,
}

/// A bucket (and prefix) holding blobs.
#[derive(Debug, Clone)]
pub struct S3Blobs {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    threshold: u64,
    part_size: u64,
}

impl S3Blobs {
    /// A client for `options` (no request is made).
    pub fn new(options: S3Options) -> Result<S3Blobs, S3Error> {
        let S3Options {
            endpoint,
            region,
            bucket,
            prefix,
            path_style,
            credentials,
            multipart_threshold,
            part_size,
            read_timeout,
        } = options;
        let (id, secret, token) = match credentials {
            Some((id, secret)) => (id, secret, None),
            None => environment_credentials().ok_or_else(|| {
                s3_err(
                    "credentials",
                    &bucket,
                    "no access key: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give \
                     ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE) an [AWS_PROFILE or default] \
                     profile with aws_access_key_id and aws_secret_access_key",
                )
            })?,
        };
        let creds = aws_sdk_s3::config::Credentials::new(id, secret, token, None, "recache");
        // rustls with ring, as everywhere else in recache: the SDK's default client would enable
        // aws-lc in rustls for the whole build, and a rustls with two providers picks neither.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let retry = aws_sdk_s3::config::retry::RetryConfig::standard()
            .with_max_attempts(S3_ATTEMPTS)
            .with_initial_backoff(S3_BACKOFF_START)
            .with_max_backoff(S3_BACKOFF_MAX);
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(S3_CONNECT_TIMEOUT)
            .read_timeout(read_timeout)
            .build();
        let mut config = aws_sdk_s3::config::Builder::new()
            .http_client(http)
            .retry_config(retry)
            .timeout_config(timeouts)
            // Every blob is verified against its SHA-256 by whoever reads it: the SDK's own
            // CRC32 on each body would be a second pass over every byte for nothing.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(region))
            .credentials_provider(creds)
            .force_path_style(path_style);
        if let Some(e) = endpoint {
            config = config.endpoint_url(e);
        }
        Ok(S3Blobs {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket,
            prefix,
            threshold: multipart_threshold.max(1),
            part_size: part_size.max(5 << 20),
        })
    }

    /// The object key of blob `d`.
    pub fn key(&self, d: Digest) -> String {
        format!("{}cas/{}-{}", self.prefix, d.hash, d.size_bytes)
    }

    /// Whether `key` is a blob key of this server's own layout (`<prefix>cas/<64 hex>-<size>`),
    /// not merely a key under its prefix: a server whose prefix is `a/` must leave alone the
    /// keys of one whose prefix is `a/cas/` (`a/cas/cas/…`).
    pub fn is_own_blob_key(&self, key: &str) -> bool {
        self.is_own_key("cas/", key)
    }

    /// Whether `key` is `<prefix><kind><64 hex>-<size>`, nothing more.
    fn is_own_key(&self, kind: &str, key: &str) -> bool {
        let Some((hash, size)) = key
            .strip_prefix(&self.prefix)
            .and_then(|k| k.strip_prefix(kind))
            .and_then(|rest| rest.split_once('-'))
        else {
            return false;
        };
        hash.len() == 64
            && hash.bytes().all(|b| b.is_ascii_hexdigit())
            && !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
    }

    /// The object key of the action result of action `d`.
    pub fn ac_key(&self, d: Digest) -> String {
        format!("{}ac/{}-{}", self.prefix, d.hash, d.size_bytes)
    }

    /// Blobs at least this large are uploaded in parts.
    pub fn multipart_threshold(&self) -> u64 {
        self.threshold
    }

    /// Bytes per part of a multipart upload.
    pub fn part_size(&self) -> u64 {
        self.part_size
    }

    /// Creates the bucket if it does not exist (for tests and first runs).
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| sdk_err("CreateBucket", &self.bucket, e))?;
        Ok(())
    }

    /// Whether the bucket holds `d` (an object of its key and size).
    pub async fn contains(&self, d: Digest) -> Result<bool, S3Error> {
        Ok(self.stat(d).await?.is_some())
    }

    /// When the bucket holds `d` (an object of its key and size): the object's last-modified
    /// time, in seconds since the epoch (0 when the store does not say).
    pub async fn stat(&self, d: Digest) -> Result<Option<i64>, S3Error> {
        let key = self.key(d);
        Ok(self
            .stat_key(&key)
            .await?
            .filter(|(len, _)| *len == d.size_bytes)
            .map(|(_, modified)| modified))
    }

    /// The size and last-modified time (seconds since the epoch) of the object at `key`.
    pub async fn stat_key(&self, key: &str) -> Result<Option<(u64, i64)>, S3Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(h) => Ok(Some((
                h.content_length().map_or(u64::MAX, |n| n as u64),
                h.last_modified().map_or(0, |t| t.secs()),
            ))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(sdk_err("HeadObject", key, e)),
        }
    }

    /// Renews the age of the object at `key` (for retention: a lifecycle rule or a sweep
    /// counts age from it): a copy onto itself with its metadata replaced, done inside the
    /// store, no byte through this server. `Ok(false)` when the object is gone.
    pub async fn refresh(&self, key: &str) -> Result<bool, S3Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        match self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(format!("{}/{key}", self.bucket))
            .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
            .metadata("recache-used", now.to_string())
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
            Err(e) => Err(sdk_err("CopyObject", key, e)),
        }
    }

    /// Every object under this server's prefix of `kind` (`"cas/"` or `"ac/"`): key and
    /// last-modified time (seconds since the epoch), listed a page (1 000) at a time.
    pub async fn list(&self, kind: &str) -> Result<Vec<(String, i64)>, S3Error> {
        let prefix = format!("{}{kind}", self.prefix);
        let mut out = Vec::new();
        let mut token = None::<String>;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| sdk_err("ListObjectsV2", &prefix, e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push((k.to_owned(), o.last_modified().map_or(0, |t| t.secs())));
                }
            }
            token = page.next_continuation_token().map(str::to_owned);
            if page.is_truncated() != Some(true) || token.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes the object at `key`. One already gone counts as deleted.
    pub async fn delete_key(&self, key: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_err("DeleteObject", key, e))
    }

    /// Whether `key` is an action-result key of this server's layout (`<prefix>ac/<64 hex>-<size>`).
    pub fn is_own_ac_key(&self, key: &str) -> bool {
        self.is_own_key("ac/", key)
    }

    /// Uploads `data`, the whole of blob `d` (the caller verified it), in one conditional PUT
    /// (`If-None-Match: *`): a blob the bucket already has is not written again (412), and a
    /// server that ignores the condition just rewrites the same bytes. A 412 is success only
    /// when the object there has the blob's size: a truncated object (a crash, an old bug, a
    /// hand) is overwritten with the verified bytes, never kept.
    pub async fn put_bytes(&self, d: Digest, data: bytes::Bytes) -> Result<(), S3Error> {
        let key = self.key(d);
        let put = |conditional: bool| {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_length(data.len() as i64)
                .body(ByteStream::from(data.clone()));
            if conditional {
                req = req.if_none_match("*");
            }
            req.send()
        };
        match put(true).await {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {
                if self.contains(d).await? {
                    return Ok(());
                }
                tracing::warn!(key = %key, "the bucket's object of a blob has the wrong size; replacing it");
                put(false)
                    .await
                    .map(|_| ())
                    .map_err(|e| sdk_err("PutObject", &key, e))
            }
            Err(e) => Err(sdk_err("PutObject", &key, e)),
        }
    }

    /// Deletes blob `d`'s object (one that failed verification). An object already gone counts
    /// as deleted.
    pub async fn delete(&self, d: Digest) -> Result<(), S3Error> {
        self.delete_key(&self.key(d)).await
    }

    /// Uploads the file at `path`, which holds blob `d` (the caller verified it): one PUT below
    /// the multipart threshold, else parts read one at a time (a failed upload is aborted).
    pub async fn put_file(&self, d: Digest, path: &Path) -> Result<(), S3Error> {
        let key = self.key(d);
        if d.size_bytes < self.threshold {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| s3_err("PutObject", &key, e))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_length(d.size_bytes as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| sdk_err("PutObject", &key, e))?;
            return Ok(());
        }
        let upload_id = self.start_multipart(d).await?;
        let result: Result<(), S3Error> = async {
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|e| s3_err("UploadPart", &key, e))?;
            let mut parts = Vec::new();
            let mut number = 1;
            loop {
                let mut buf = Vec::with_capacity(self.part_size as usize);
                (&mut file)
                    .take(self.part_size)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(|e| s3_err("UploadPart", &key, e))?;
                if buf.is_empty() && number > 1 {
                    break;
                }
                let last = (buf.len() as u64) < self.part_size;
                let etag = self.upload_part(d, &upload_id, number, buf.into()).await?;
                parts.push((number, etag));
                number += 1;
                if last {
                    break;
                }
            }
            self.complete(d, &upload_id, &parts).await
        }
        .await;
        if let Err(e) = result {
            // Never leave an upload behind (a crash is for the sweep to find).
            let _ = self.abort(&key, &upload_id).await;
            return Err(e);
        }
        Ok(())
    }

    /// Starts a multipart upload of `d`; returns its id.
    pub async fn start_multipart(&self, d: Digest) -> Result<String, S3Error> {
        let key = self.key(d);
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| sdk_err("CreateMultipartUpload", &key, e))?;
        started
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| s3_err("CreateMultipartUpload", &key, "no upload id in the answer"))
    }

    /// Uploads part `number` (from 1) of upload `upload_id` of `d`; returns its ETag.
    pub async fn upload_part(
        &self,
        d: Digest,
        upload_id: &str,
        number: i32,
        data: bytes::Bytes,
    ) -> Result<String, S3Error> {
        let key = self.key(d);
        let part = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(data.len() as i64)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| sdk_err("UploadPart", &key, e))?;
        part.e_tag()
            .map(str::to_owned)
            .ok_or_else(|| s3_err("UploadPart", &key, "no ETag in the answer"))
    }

    /// Completes upload `upload_id` of `d` from its parts (number, ETag), in any order.
    pub async fn complete(
        &self,
        d: Digest,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), S3Error> {
        let key = self.key(d);
        let mut parts = parts.to_vec();
        parts.sort();
        let parts = parts
            .into_iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(n).e_tag(etag).build())
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| sdk_err("CompleteMultipartUpload", &key, e))?;
        Ok(())
    }

    /// The body of blob `d`, streaming; `None` when the bucket does not have it. Unverified:
    /// the caller hashes what it reads.
    pub async fn get(&self, d: Digest) -> Result<Option<ByteStream>, S3Error> {
        let key = self.key(d);
        let Some((length, body)) = self.get_object(&key).await? else {
            return Ok(None);
        };
        if length.is_some_and(|n| n as u64 != d.size_bytes) {
            return Err(S3Error {
                bad_object: true,
                ..s3_err(
                    "GetObject",
                    &key,
                    format!(
                        "the object has {length:?} bytes, not the {} its key names",
                        d.size_bytes
                    ),
                )
            });
        }
        Ok(Some(body))
    }

    /// The object at `key` (its announced length and body), `None` when there is none.
    async fn get_object(&self, key: &str) -> Result<Option<(Option<i64>, ByteStream)>, S3Error> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(r) => Ok(Some((r.content_length(), r.body))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(sdk_err("GetObject", key, e)),
        }
    }

    /// Downloads `d` to `path`, verified; `Ok(false)` when the bucket does not have it. A
    /// mismatch removes the file and is an error.
    pub async fn get_to_file(&self, d: Digest, path: &Path) -> Result<bool, S3Error> {
        let key = self.key(d);
        let Some(mut body) = self.get(d).await? else {
            return Ok(false);
        };
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| s3_err("GetObject", &key, e))?;
        let mut hasher = hashing::Hasher::new();
        let result: Result<(), S3Error> = async {
            while let Some(chunk) = body
                .try_next()
                .await
                .map_err(|e| s3_err("GetObject", &key, e))?
            {
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| s3_err("GetObject", &key, e))?;
            }
            file.flush().await.map_err(|e| s3_err("GetObject", &key, e))
        }
        .await;
        let got = hasher.finish();
        if result.is_err() || got != d {
            let _ = tokio::fs::remove_file(path).await;
            result?;
            return Err(s3_err(
                "GetObject",
                &key,
                format!("the object is {got}, not the blob its key names"),
            ));
        }
        Ok(true)
    }

    /// Stores the encoded action result of action `action`.
    pub async fn put_ac(&self, action: Digest, encoded: Vec<u8>) -> Result<(), S3Error> {
        let key = self.ac_key(action);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_length(encoded.len() as i64)
            .body(ByteStream::from(encoded))
            .send()
            .await
            .map_err(|e| sdk_err("PutObject", &key, e))?;
        Ok(())
    }

    /// The encoded action result of action `action`, if the bucket has one (at most 16 MiB).
    pub async fn get_ac(&self, action: Digest) -> Result<Option<Vec<u8>>, S3Error> {
        let key = self.ac_key(action);
        let Some((length, body)) = self.get_object(&key).await? else {
            return Ok(None);
        };
        if length.is_none_or(|n| n > MAX_AC_BYTES) {
            return Err(s3_err(
                "GetObject",
                &key,
                format!("an action result of {length:?} bytes (the limit is {MAX_AC_BYTES})"),
            ));
        }
        let data = body
            .collect()
            .await
            .map_err(|e| s3_err("GetObject", &key, e))?;
        Ok(Some(data.to_vec()))
    }

    /// Multipart uploads S3 holds open for blobs under this prefix (`key`: only that blob's).
    pub async fn open_uploads(&self, key: Option<&str>) -> Result<Vec<OpenUpload>, S3Error> {
        let prefix = match key {
            Some(k) => k.to_owned(),
            None => format!("{}cas/", self.prefix),
        };
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| sdk_err("ListMultipartUploads", &prefix, e))?;
            for u in page.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    if key.is_some_and(|want| want != k) {
                        continue;
                    }
                    out.push(OpenUpload {
                        key: k.to_owned(),
                        upload_id: id.to_owned(),
                        initiated: u.initiated().map_or(0, |t| t.secs()),
                    });
                }
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// Aborts an open multipart upload. One already gone counts as aborted.
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = sdk_err("AbortMultipartUpload", key, e);
                if e.is_no_such_upload() {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn profiles_are_read_from_the_shared_credentials_file() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n\
                    [ci]\naws_access_key_id=C\naws_secret_access_key = D\naws_session_token=T\n";
        assert_eq!(
            profile_credentials(text, "default"),
            Some(("A".into(), "B".into(), None))
        );
        assert_eq!(
            profile_credentials(text, "ci"),
            Some(("C".into(), "D".into(), Some("T".into())))
        );
        assert_eq!(profile_credentials(text, "other"), None);
    }
}
