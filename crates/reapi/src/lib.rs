//! Rust bindings for the protocols recache speaks: the cache half of the Remote Execution API
//! v2 (ContentAddressableStorage, ActionCache, Capabilities), the Remote Asset API v1,
//! ByteStream, and `google.rpc.Status`.
//!
//! The `.proto` files under `proto/` were written for recache from the specifications (the
//! names, numbers and types are the protocols'); `src/generated/` is generated from them by
//! `cargo run -p reapi-codegen` and checked in, so depending on this crate compiles no protobuf
//! compiler. Client stubs (`*_client`) are always there and need only tonic's `codegen`; the
//! server halves (`*_server`) come with the `server` feature.
//!
//! Module paths follow the protobuf packages, and the well-known types are `prost_types`'
//! (re-exported as [`google::protobuf`]):
//!
//! ```
//! use prost::Message;
//! use reapi::build::bazel::remote::execution::v2::{ActionResult, Digest, OutputFile};
//!
//! let result = ActionResult {
//!     output_files: vec![OutputFile {
//!         path: "out.txt".into(),
//!         digest: Some(Digest { hash: "ab".repeat(32), size_bytes: 3 }),
//!         ..Default::default()
//!     }],
//!     exit_code: 0,
//!     ..Default::default()
//! };
//! let bytes = result.encode_to_vec();
//! assert_eq!(ActionResult::decode(bytes.as_slice()).unwrap(), result);
//! ```

// Generated code: its shape is the generator's, not ours to lint.
#![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]

/// `build.bazel.*`: REAPI v2, Remote Asset v1 and the API version message.
pub mod build {
    /// `build.bazel.*`.
    pub mod bazel {
        /// `build.bazel.remote.*`.
        pub mod remote {
            /// `build.bazel.remote.execution.*`.
            pub mod execution {
                /// `build.bazel.remote.execution.v2`: the CAS, the ActionCache and
                /// Capabilities.
                pub mod v2 {
                    include!("generated/build.bazel.remote.execution.v2.rs");
                }
            }
            /// `build.bazel.remote.asset.*`.
            pub mod asset {
                /// `build.bazel.remote.asset.v1`: Fetch and Push.
                pub mod v1 {
                    include!("generated/build.bazel.remote.asset.v1.rs");
                }
            }
        }
        /// `build.bazel.semver`.
        pub mod semver {
            include!("generated/build.bazel.semver.rs");
        }
    }
}

/// `google.*`: ByteStream, `google.rpc.Status`, and the well-known types.
pub mod google {
    /// `google.bytestream`: streamed reads and resumable writes.
    pub mod bytestream {
        include!("generated/google.bytestream.rs");
    }
    /// `google.rpc`: the per-item status of batch calls.
    pub mod rpc {
        include!("generated/google.rpc.rs");
    }
    /// The protobuf well-known types the messages use, from `prost_types`.
    pub mod protobuf {
        pub use prost_types::{Any, Duration, Timestamp};
    }
}
