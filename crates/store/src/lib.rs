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

pub use destination::{LoadDestination, LocalDestination};
pub use directory::MaterializeOptions;
pub use error::{ErrorKind, ResultExt, StoreError};
pub use facade::{Store, TransferSummary};
pub use local::{GcReport, Lease, LocalStore, LocalStoreOptions, StoreUsage};
