//! miss → write → hit (an output file and an output directory with nested subdirectories) →
//! deleted blob falls back, against BuildGrid and buildbox-casd.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use hashing::Digest;
use process_execution::{
    CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process, ResultSource,
};
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner};
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::{LocalStore, LocalStoreOptions, Store};
use testutil::real_servers::{RealServer, ServerKind};

struct Machine {
    _dir: tempfile::TempDir,
    runner: RemoteCacheRunner,
}

async fn machine(server: &RealServer, behavior: CacheContentBehavior) -> Machine {
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(
        GrpcProvider::connect(
            &server.address,
            GrpcOptions {
                instance_name: server.instance.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let store = Store::with_remote(
        LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap(),
        provider.clone(),
    );
    let inner_store = match behavior {
        CacheContentBehavior::Fetch => store.into_local_only(),
        _ => store.clone(),
    };
    let inner = LocalRunner::new(inner_store, LocalRunnerOptions::new(dir.path().join("sb")));
    let runner = RemoteCacheRunner::new(
        Arc::new(inner),
        store,
        provider,
        RemoteCacheOptions {
            cache_content_behavior: behavior,
            ..Default::default()
        },
    );
    Machine { _dir: dir, runner }
}

fn runs(counter: &Path) -> usize {
    std::fs::read_to_string(counter).map_or(0, |s| s.lines().count())
}

async fn scenario(server: RealServer) {
    for behavior in [
        CacheContentBehavior::Fetch,
        CacheContentBehavior::Validate,
        CacheContentBehavior::Defer,
    ] {
        let scratch = tempfile::tempdir().unwrap();
        let counter = scratch.path().join("count");
        // Unique content per run, so a warm server does not turn the first run into a hit.
        // The output directory has subdirectories: buildbox-casd serves such an entry only if
        // the writer uploaded its Directory messages, not just the Tree.
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let script = format!(
            "echo run >> {}; echo {tag} > out.txt; mkdir -p gen/sub/deeper; \
             echo nested-{tag} > gen/sub/n.txt; echo deep > gen/sub/deeper/d.txt",
            counter.display()
        );
        let p = Process::new(["/bin/sh", "-c", &script])
            .env("PATH", "/usr/bin:/bin")
            .output_files(["out.txt"])
            .output_directories(["gen"]);
        let name = format!("{} {behavior:?}", server.kind.name());

        // Miss: runs locally, written back.
        let a = machine(&server, behavior).await;
        let first = a.runner.run(Context::default(), p.clone()).await.unwrap();
        assert_eq!(first.metadata.source, ResultSource::RanLocally, "{name}");
        a.runner.shutdown().await.unwrap();
        assert_eq!(a.runner.stats().writes, 1, "{name}");

        // Hit on another machine.
        let b = machine(&server, behavior).await;
        let hit = b.runner.run(Context::default(), p.clone()).await.unwrap();
        assert_eq!(hit.metadata.source, ResultSource::RemoteCacheHit, "{name}");
        assert_eq!(hit.output_root, first.output_root, "{name}");
        assert_eq!(runs(&counter), 1, "{name}");

        // The server loses an output blob: fetch and validate fall back to running locally
        // (BuildGrid already answers NOT_FOUND for an entry whose outputs are gone; casd serves
        // the entry and the blob check fails). Either way the build goes on.
        let lost = Digest::of_bytes(format!("{tag}\n").as_bytes());
        server.delete_blob(&lost);
        if behavior == CacheContentBehavior::Defer {
            // Defer trusts the entry. Where the server still serves it (casd), the loss shows
            // up when a consumer needs the blob, as a typed MissingDigest the runner recovers
            // from by re-running the producer; where it does not (BuildGrid), it is a miss.
            let d = machine(&server, behavior).await;
            let r = d.runner.run(Context::default(), p.clone()).await.unwrap();
            if r.metadata.source == ResultSource::RemoteCacheHit {
                let consumer = Process::new(["/bin/sh", "-c", "cat out.txt"])
                    .env("PATH", "/usr/bin:/bin")
                    .input_root(r.output_root);
                let err = d
                    .runner
                    .run(Context::default(), consumer.clone())
                    .await
                    .unwrap_err();
                assert!(
                    matches!(err, process_execution::ProcessError::MissingDigest { digest, .. } if digest == lost),
                    "{name}: {err:?}"
                );
                d.runner
                    .recover_missing(Context::default(), lost)
                    .await
                    .unwrap()
                    .unwrap();
                let c = d.runner.run(Context::default(), consumer).await.unwrap();
                assert_eq!(c.exit_code, 0, "{name}");
            }
            assert_eq!(runs(&counter), 2, "{name}");
            d.runner.shutdown().await.unwrap();
        } else {
            let c = machine(&server, behavior).await;
            let r = c.runner.run(Context::default(), p.clone()).await.unwrap();
            assert_eq!(r.metadata.source, ResultSource::RanLocally, "{name}");
            assert_eq!(r.exit_code, 0);
            assert_eq!(runs(&counter), 2, "{name}");
            c.runner.shutdown().await.unwrap();
        }
    }
}

macro_rules! suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn miss_write_hit_then_deleted_blob_falls_back() {
                if let Some(s) = RealServer::require($kind).await {
                    scenario(s).await
                }
            }
        }
    };
}

suite!(buildgrid, ServerKind::BuildGrid);
suite!(buildbox_casd, ServerKind::BuildboxCasd);
suite!(recache_serve, ServerKind::Recache);
