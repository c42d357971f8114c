//! The blob store: where every blob recache touches lives.
//!
//! - [`LocalStore`]: small blobs (below 512 KiB by default) in an LMDB database, large blobs one
//!   read-only file each in a pool, written through a temp file and renamed into place only once
//!   their digest verifies. Garbage collection by least-recent use, with leases.
//! - [`LoadDestination`]: the object-safe sink a remote download streams into;
//!   [`LocalDestination`] commits into the local store only verified content.
//! - [`directory`]: REAPI `Directory`/`Tree` validation, capture from disk, materialization.
//!
//! - [`remote`]: providers for a REAPI server ([`remote::grpc::GrpcProvider`]) and a plain
//!   directory ([`remote::local_dir::LocalDirProvider`]).
//! - [`Store`]: the local store with an optional remote behind it, what a build engine holds.

pub mod destination;
pub mod directory;
mod error;
mod facade;
pub mod local;
pub mod remote;
pub(crate) mod zstd_stream;

pub use destination::{LoadDestination, LocalDestination};
pub use directory::{CaptureOptions, MaterializeOptions};
pub use error::{ErrorKind, ResultExt, StoreError};
pub use facade::{Store, TransferSummary};
pub use local::{
    BlobReader, GcReport, Lease, LocalStore, LocalStoreOptions, PoolCompression, RepairReport,
    Reservation, Room, StoreUsage,
};

/// Splits `digests` into groups whose sizes (plus `per_item` bytes each) add up to at most
/// `limit`, in order; a blob larger than the limit is a group of its own. One packing rule for
/// batch RPCs and for bounded local commits.
pub(crate) fn group_by_size(
    digests: Vec<hashing::Digest>,
    limit: u64,
    per_item: u64,
) -> Vec<Vec<hashing::Digest>> {
    let mut groups: Vec<Vec<hashing::Digest>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0u64;
    for d in digests {
        let cost = d.size_bytes + per_item;
        if !current.is_empty() && size + cost > limit {
            groups.push(std::mem::take(&mut current));
            size = 0;
        }
        size += cost;
        current.push(d);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// Runs `f` on a blocking thread; a panicked task is an error, not a panic of the caller.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::new(ErrorKind::Other, format!("blocking task failed: {e}")))?
}
