//! Remote providers: where blobs and action results live beyond this machine.
//!
//! Two traits, both object-safe so providers live behind `Arc<dyn …>`:
//! [`ByteStoreProvider`] (CAS blobs) and [`ActionCacheProvider`] (action results). Two
//! implementations: [`grpc::GrpcProvider`] speaks REAPI to a server, [`local_dir::LocalDirProvider`]
//! keeps both in a plain directory (the CLI's embedded default, and a shared-filesystem cache).
//!
//! [`provider_from_address`] turns a user's `grpc://`, `grpcs://` or `file://` address into both.

pub mod grpc;
pub mod local_dir;
pub mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use hashing::Digest;
use reapi::build::bazel::remote::execution::v2 as remexec;

use crate::destination::LoadDestination;
use crate::error::StoreError;

/// A content-addressable blob store somewhere else.
#[async_trait]
pub trait ByteStoreProvider: Send + Sync + std::fmt::Debug + 'static {
    /// Uploads a blob held in memory. `digest` must be the digest of `bytes`.
    async fn store_bytes(&self, digest: Digest, bytes: Bytes) -> Result<(), StoreError>;

    /// Uploads several small blobs (each under [`max_batch_blob_size`](Self::max_batch_blob_size)).
    /// Providers that can send many blobs per request override this; the default sends them one
    /// by one.
    async fn store_batch(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), StoreError> {
        for (d, b) in blobs {
            self.store_bytes(d, b).await?;
        }
        Ok(())
    }

    /// Uploads a blob from a file, streaming it (never read whole into memory).
    async fn store_file(&self, digest: Digest, file: tokio::fs::File) -> Result<(), StoreError>;

    /// Downloads `digest` into `dest`. `Ok(false)` means the remote does not have it. A provider
    /// that retries calls `dest.reset()` first. The caller verifies and commits `dest`.
    async fn load(
        &self,
        digest: Digest,
        dest: &mut dyn LoadDestination,
    ) -> Result<bool, StoreError>;

    /// Downloads several small blobs at once. Absent blobs are left out of the map; every
    /// returned blob has been verified against its digest.
    async fn load_batch(&self, digests: Vec<Digest>) -> Result<HashMap<Digest, Bytes>, StoreError>;

    /// Which of `digests` the remote does not have.
    async fn list_missing_digests(
        &self,
        digests: &mut (dyn Iterator<Item = Digest> + Send),
    ) -> Result<HashSet<Digest>, StoreError>;

    /// The largest blob worth sending through [`load_batch`](Self::load_batch); larger ones go
    /// through [`load`](Self::load).
    fn max_batch_blob_size(&self) -> u64;
}

/// An ActionCache somewhere else.
#[async_trait]
pub trait ActionCacheProvider: Send + Sync + std::fmt::Debug + 'static {
    /// The cached result for `action_digest`, or `None` on a miss.
    async fn get_action_result(
        &self,
        action_digest: Digest,
    ) -> Result<Option<remexec::ActionResult>, StoreError>;

    /// Whether the cache accepts [`update_action_result`](Self::update_action_result) from this
    /// client (REAPI's `action_cache_update_enabled`). A writer skips its uploads when it does
    /// not. Default: true.
    async fn update_enabled(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Records `result` for `action_digest`.
    async fn update_action_result(
        &self,
        action_digest: Digest,
        result: remexec::ActionResult,
    ) -> Result<(), StoreError>;
}

/// Who is asking, sent to REAPI servers with each call (as `RequestMetadata`) so their logs can
/// tell builds and actions apart. Set it around a piece of work with [`with_request_context`];
/// calls made outside one carry only the provider's own invocation id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// The build (`tool_invocation_id`); empty: the provider's own.
    pub invocation_id: String,
    /// The action (`action_id`: its digest's hash).
    pub action_id: String,
    /// What kind of action (`action_mnemonic`, e.g. "Compile").
    pub action_mnemonic: String,
    /// What it builds (`target_id`, e.g. "//app:main").
    pub target_id: String,
}

tokio::task_local! {
    static REQUEST_CONTEXT: RequestContext;
}

/// Runs `f` with `ctx` as the request context of every provider call it makes (on this task).
pub async fn with_request_context<F: std::future::Future>(ctx: RequestContext, f: F) -> F::Output {
    REQUEST_CONTEXT.scope(ctx, f).await
}

/// The request context of the current task, if one is set.
pub fn current_request_context() -> Option<RequestContext> {
    REQUEST_CONTEXT.try_with(Clone::clone).ok()
}

/// Both halves of a remote cache.
#[derive(Debug, Clone)]
pub struct RemoteProviders {
    /// The CAS.
    pub bytes: Arc<dyn ByteStoreProvider>,
    /// The ActionCache.
    pub action_cache: Arc<dyn ActionCacheProvider>,
}

/// Builds providers from an address: `grpc://host:port`, `grpcs://host:port` or `file:///path`.
pub async fn provider_from_address(
    address: &str,
    options: grpc::GrpcOptions,
) -> Result<RemoteProviders, StoreError> {
    if let Some(path) = address.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(StoreError::invalid(format!(
                "remote address {address:?}: a file:// address needs an absolute path, e.g. file:///var/cache/recache"
            )));
        }
        let p = Arc::new(local_dir::LocalDirProvider::open(std::path::Path::new(
            path,
        ))?);
        return Ok(RemoteProviders {
            bytes: p.clone(),
            action_cache: p,
        });
    }
    if address.starts_with("grpc://") || address.starts_with("grpcs://") {
        let p = Arc::new(grpc::GrpcProvider::connect(address, options).await?);
        return Ok(RemoteProviders {
            bytes: p.clone(),
            action_cache: p,
        });
    }
    Err(StoreError::invalid(format!(
        "remote address {address:?} is not understood: use grpc://host:port, grpcs://host:port or file:///path"
    )))
}
