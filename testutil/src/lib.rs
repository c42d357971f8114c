//! Test helpers for recache: finding the real REAPI servers that `scripts/reapi-servers.sh`
//! started, and (later) an in-process fault-injecting REAPI server for faults real servers cannot
//! be made to show.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod clients;
pub mod data;
pub mod origin;
pub mod real_servers;
pub mod s3_proxy;
pub mod server;
pub mod tmpfs;
