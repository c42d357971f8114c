//! Blobs in an S3-compatible bucket: the slow tier the S3 backend (issue 12) will put behind the
//! disk store. This is its first layer only: keys, single and multipart uploads streamed from a
//! file, verified downloads, existence checks, and the multipart-upload listing and abort the
//! leak sweep needs. The tiering, the upload journal and the queue are not built yet.
//!
//! Keys come from validated digests only, never from client text:
//! `<prefix>cas/<64 hex>-<size>`. A blob is uploaded in one PUT below
//! [`S3Options::multipart_threshold`], else in parts of [`S3Options::part_size`] read from the
//! file one at a time (memory: one part); a failed multipart upload is aborted before the error
//! is returned. Downloads stream to a file and are verified against the digest; a blob whose
//! content does not match is an error, never a result.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use hashing::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
}

fn s3_err(op: &'static str, key: &str, e: impl std::fmt::Display) -> S3Error {
    S3Error {
        op,
        key: key.to_owned(),
        message: e.to_string(),
    }
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
        } = options;
        let (id, secret) = match credentials {
            Some(c) => c,
            None => (
                std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
            ),
        };
        if id.is_empty() || secret.is_empty() {
            return Err(s3_err(
                "credentials",
                &bucket,
                "no access key: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ));
        }
        let creds = aws_sdk_s3::config::Credentials::new(id, secret, None, None, "recache");
        // rustls with ring, as everywhere else in recache: the SDK's default client would enable
        // aws-lc in rustls for the whole build, and a rustls with two providers picks neither.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut config = aws_sdk_s3::config::Builder::new()
            .http_client(http)
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

    /// The object key of `d`.
    pub fn key(&self, d: Digest) -> String {
        format!("{}cas/{}-{}", self.prefix, d.hash, d.size_bytes)
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
            .map_err(|e| {
                s3_err(
                    "CreateBucket",
                    &self.bucket,
                    aws_sdk_s3::error::DisplayErrorContext(e),
                )
            })?;
        Ok(())
    }

    /// Whether the bucket holds `d` (an object of its key and size).
    pub async fn contains(&self, d: Digest) -> Result<bool, S3Error> {
        let key = self.key(d);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(h) => Ok(h.content_length().is_some_and(|n| n as u64 == d.size_bytes)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(s3_err(
                "HeadObject",
                &key,
                aws_sdk_s3::error::DisplayErrorContext(e),
            )),
        }
    }

    /// Uploads the file at `path`, which holds blob `d` (the caller verified it).
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
                .map_err(|e| {
                    s3_err("PutObject", &key, aws_sdk_s3::error::DisplayErrorContext(e))
                })?;
            return Ok(());
        }
        let upload_id = self.start_multipart(d).await?;
        match self.put_parts(&key, &upload_id, path).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Never leave an upload behind (a crash is for the sweep to find).
                let _ = self.abort(&key, &upload_id).await;
                Err(e)
            }
        }
    }

    /// Starts a multipart upload of `d`; returns its id (a journal records it before parts go).
    pub async fn start_multipart(&self, d: Digest) -> Result<String, S3Error> {
        let key = self.key(d);
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| {
                s3_err(
                    "CreateMultipartUpload",
                    &key,
                    aws_sdk_s3::error::DisplayErrorContext(e),
                )
            })?;
        started
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| s3_err("CreateMultipartUpload", &key, "no upload id in the answer"))
    }

    async fn put_parts(&self, key: &str, upload_id: &str, path: &Path) -> Result<(), S3Error> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| s3_err("UploadPart", key, e))?;
        let mut parts = Vec::new();
        let mut number = 1;
        loop {
            let mut buf = Vec::with_capacity(self.part_size as usize);
            (&mut file)
                .take(self.part_size)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| s3_err("UploadPart", key, e))?;
            if buf.is_empty() && number > 1 {
                break;
            }
            let last = (buf.len() as u64) < self.part_size;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| {
                    s3_err("UploadPart", key, aws_sdk_s3::error::DisplayErrorContext(e))
                })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_owned))
                    .build(),
            );
            number += 1;
            if last {
                break;
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                s3_err(
                    "CompleteMultipartUpload",
                    key,
                    aws_sdk_s3::error::DisplayErrorContext(e),
                )
            })?;
        Ok(())
    }

    /// Downloads `d` to `path`, verified; `Ok(false)` when the bucket does not have it. A
    /// mismatch removes the file and is an error.
    pub async fn get_to_file(&self, d: Digest, path: &Path) -> Result<bool, S3Error> {
        let key = self.key(d);
        let resp = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(false),
            Err(e) => {
                return Err(s3_err(
                    "GetObject",
                    &key,
                    aws_sdk_s3::error::DisplayErrorContext(e),
                ));
            }
        };
        let mut body = resp.body;
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

    /// Multipart uploads S3 holds open under this prefix.
    pub async fn open_uploads(&self) -> Result<Vec<OpenUpload>, S3Error> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(format!("{}cas/", self.prefix))
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| {
                    s3_err(
                        "ListMultipartUploads",
                        &self.prefix,
                        aws_sdk_s3::error::DisplayErrorContext(e),
                    )
                })?;
            for u in page.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
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

    /// Aborts an open multipart upload.
    pub async fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| {
                s3_err(
                    "AbortMultipartUpload",
                    key,
                    aws_sdk_s3::error::DisplayErrorContext(e),
                )
            })?;
        Ok(())
    }
}
