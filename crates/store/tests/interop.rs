//! `Store` against the real REAPI servers started by `scripts/reapi-servers.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::sync::Arc;

use hashing::Digest;
use store::remote::ByteStoreProvider;
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::real_servers::{RealServer, ServerKind};

use testutil::data::unique;

async fn provider(server: &RealServer) -> Arc<GrpcProvider> {
    Arc::new(
        GrpcProvider::connect(
            &server.address,
            GrpcOptions {
                instance_name: server.instance.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    )
}

fn fresh_store(p: Arc<GrpcProvider>) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap();
    (dir, Store::with_remote(local, p))
}

async fn round_trips(server: RealServer) {
    let p = provider(&server).await;
    for len in [100usize, 6 * 1024 * 1024, 64 * 1024 * 1024] {
        let data = unique(len);
        let d = Digest::of_bytes(&data);
        p.store_bytes(d, data.clone().into()).await.unwrap();
        // A fresh local store downloads it back, verified.
        let (_dir, store) = fresh_store(p.clone());
        store.ensure_local(d).await.unwrap();
        if len >= 512 * 1024 {
            let path = store.local().load_file(d).unwrap().unwrap();
            assert_eq!(std::fs::metadata(path).unwrap().len(), len as u64);
        }
        assert_eq!(
            store.local().load_bytes(d).unwrap().unwrap(),
            &data[..],
            "{} {len} bytes",
            server.kind.name()
        );
    }
}

async fn upload_then_validate_a_directory(server: RealServer) {
    let p = provider(&server).await;
    let (_dir, store) = fresh_store(p.clone());
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("a/b")).unwrap();
    std::fs::write(src.path().join("top.txt"), unique(500)).unwrap();
    std::fs::write(src.path().join("a/mid.bin"), unique(700 * 1024)).unwrap();
    std::fs::write(src.path().join("a/b/leaf"), unique(10)).unwrap();
    let root = store.local().capture_directory(src.path()).unwrap();

    // Not there yet: validation names a missing blob.
    let err = store
        .exists_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap_err();
    assert!(err.missing_digest().is_some(), "{err}");

    let up = store
        .ensure_remote_has_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    assert_eq!(up.blobs, 6, "3 files and 3 directories");
    store
        .exists_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();

    // A second machine (fresh local store) validates without downloading file content, then
    // fetches and materializes everything.
    let (_d2, other) = fresh_store(p);
    other
        .exists_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    assert!(!other.local().contains(Digest::of_bytes(
        &std::fs::read(src.path().join("a/mid.bin")).unwrap()
    )));
    other
        .ensure_downloaded(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    other
        .local()
        .materialize_directory(root, &out.path().join("o"), Default::default())
        .unwrap();
    assert_eq!(
        std::fs::read(out.path().join("o/a/mid.bin")).unwrap(),
        std::fs::read(src.path().join("a/mid.bin")).unwrap()
    );
}

macro_rules! suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn store_round_trips_small_6mib_64mib() {
                if let Some(s) = RealServer::require($kind).await {
                    round_trips(s).await
                }
            }

            #[tokio::test]
            async fn upload_validate_and_fetch_a_directory() {
                if let Some(s) = RealServer::require($kind).await {
                    upload_then_validate_a_directory(s).await
                }
            }
        }
    };
}

suite!(buildgrid, ServerKind::BuildGrid);
suite!(buildbox_casd, ServerKind::BuildboxCasd);
suite!(recache_serve, ServerKind::Recache);
