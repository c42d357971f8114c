//! The remote-cache runner against the in-process fault-injecting server.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hashing::Digest;
use process_execution::CacheOutcome;
use process_execution::action::make_action;
use process_execution::{
    CacheScope, CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process,
    ProcessError, ResultSource,
};
use prost::Message;
use reapi::build::bazel::remote::execution::v2 as remexec;
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner, WarningsBehavior};
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::remote::retry::RetryPolicy;
use store::{LocalStore, LocalStoreOptions, MaterializeOptions, Store};
use testutil::server::{Method, TestServer};
use tonic::Code;

const ALL: [CacheContentBehavior; 3] = [
    CacheContentBehavior::Fetch,
    CacheContentBehavior::Validate,
    CacheContentBehavior::Defer,
];

struct Fixture {
    dir: tempfile::TempDir,
    server: Arc<TestServer>,
    runner: RemoteCacheRunner,
    store: Store,
}

impl Fixture {
    async fn new(behavior: CacheContentBehavior) -> Fixture {
        Self::with(behavior, |_| {}).await
    }

    async fn with(
        behavior: CacheContentBehavior,
        tweak: impl FnOnce(&mut RemoteCacheOptions),
    ) -> Fixture {
        Self::on_server(Arc::new(TestServer::start().await), behavior, tweak).await
    }

    /// A fresh machine (new local store) against an existing server.
    async fn on_server(
        server: Arc<TestServer>,
        behavior: CacheContentBehavior,
        tweak: impl FnOnce(&mut RemoteCacheOptions),
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let provider = Arc::new(
            GrpcProvider::connect(
                &server.address(),
                GrpcOptions {
                    retry: RetryPolicy {
                        attempts: 2,
                        base_delay: Duration::from_millis(1),
                        max_delay: Duration::from_millis(2),
                    },
                    request_timeout: Duration::from_secs(5),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
        );
        let local = LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap();
        let store = Store::with_remote(local, provider.clone());
        let inner_store = match behavior {
            CacheContentBehavior::Fetch => store.into_local_only(),
            _ => store.clone(),
        };
        let inner = LocalRunner::new(inner_store, LocalRunnerOptions::new(dir.path().join("sb")));
        let mut options = RemoteCacheOptions {
            cache_content_behavior: behavior,
            warnings_behavior: WarningsBehavior::Always,
            ..Default::default()
        };
        tweak(&mut options);
        let runner = RemoteCacheRunner::new(Arc::new(inner), store.clone(), provider, options);
        Fixture {
            dir,
            server,
            runner,
            store,
        }
    }

    fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    async fn run(&self, p: Process) -> process_execution::ProcessResult {
        self.runner.run(Context::default(), p).await.unwrap()
    }

    fn text(&self, d: Digest) -> String {
        String::from_utf8(self.store.local().load_bytes(d).unwrap().unwrap().to_vec()).unwrap()
    }
}

/// A process that counts its runs in `counter` (outside the sandbox) and produces a file, a
/// directory with a nested file, and stdout.
fn producer(counter: &Path, tag: &str) -> Process {
    let script = format!(
        "echo run >> {c}; echo out-{tag} > out.txt; mkdir -p gen/sub; \
         echo nested-{tag} > gen/sub/n.txt; echo stdout-{tag}",
        c = counter.display()
    );
    Process::new(["/bin/sh", "-c", &script])
        .env("PATH", "/usr/bin:/bin")
        .output_files(["out.txt"])
        .output_directories(["gen"])
}

fn runs(counter: &Path) -> usize {
    std::fs::read_to_string(counter).map_or(0, |s| s.lines().count())
}

#[tokio::test]
async fn miss_runs_locally_writes_back_and_the_second_run_hits() {
    for behavior in ALL {
        let f = Fixture::new(behavior).await;
        let counter = f.scratch().join("count");
        let p = producer(&counter, "a");

        let first = f.run(p.clone()).await;
        assert_eq!(
            first.metadata.source,
            ResultSource::RanLocally,
            "{behavior:?}"
        );
        f.runner.wait_for_writes().await;
        assert_eq!(f.runner.stats().writes, 1, "{behavior:?}");
        let action = make_action(&p).action_digest;
        assert!(
            f.server.action_result(action).is_some(),
            "{behavior:?}: written back"
        );

        // A second machine (empty local store) hits.
        let g = Fixture::on_server(f.server.clone(), behavior, |_| {}).await;
        let second = g.run(p.clone()).await;
        assert_eq!(
            second.metadata.source,
            ResultSource::RemoteCacheHit,
            "{behavior:?}"
        );
        assert_eq!(second.output_root, first.output_root, "{behavior:?}");
        assert_eq!(second.stdout, first.stdout);
        assert_eq!(runs(&counter), 1, "{behavior:?}: ran once in total");
        assert_eq!(g.runner.stats().hits, 1);
        assert_eq!(f.runner.stats().true_misses, 1);
        assert!(second.metadata.original_run_time.is_some());

        // The outputs are usable on the second machine (fetched now for validate/defer).
        g.store
            .ensure_downloaded(Default::default(), [second.output_root].into())
            .await
            .unwrap();
        g.store.ensure_local(second.stdout).await.unwrap();
        assert_eq!(g.text(second.stdout), "stdout-a\n");
        let out = tempfile::tempdir().unwrap();
        g.store
            .local()
            .materialize_directory(
                second.output_root,
                &out.path().join("o"),
                MaterializeOptions::default(),
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(out.path().join("o/gen/sub/n.txt")).unwrap(),
            "nested-a\n"
        );
        f.runner.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn fetch_mode_hit_makes_every_output_local_and_the_inner_runner_never_calls_the_remote() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "b");
    f.run(p.clone()).await;
    f.runner.wait_for_writes().await;

    let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Fetch, |_| {}).await;
    let hit = g.run(p.clone()).await;
    assert_eq!(hit.metadata.source, ResultSource::RemoteCacheHit);
    // Every output is local now: a local-only view can materialize it.
    let local_only = g.store.into_local_only();
    local_only
        .ensure_downloaded([hit.stdout, hit.stderr].into(), [hit.output_root].into())
        .await
        .unwrap();

    // A consumer of that output runs through the same runner: the inner runner reads its
    // inputs from the local-only store, so the remote sees only the cache lookup (a miss) and
    // the write-behind, never a blob read.
    let consumer = Process::new(["/bin/sh", "-c", "cat out.txt gen/sub/n.txt"])
        .env("PATH", "/usr/bin:/bin")
        .input_root(hit.output_root);
    f.server.reset_calls();
    let c = g.run(consumer).await;
    assert_eq!(c.metadata.source, ResultSource::RanLocally);
    assert_eq!(g.text(c.stdout), "out-b\nnested-b\n");
    for m in [Method::BatchReadBlobs, Method::Read] {
        assert_eq!(g.server.calls(m), 0, "{m:?}");
    }
}

/// Runs `p` once on one machine (writing it back), then deletes one output blob from the server.
async fn cached_then_blob_deleted(
    behavior: CacheContentBehavior,
    tag: &str,
) -> (Fixture, Process, PathBuf, Digest) {
    let f = Fixture::new(behavior).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, tag);
    let first = f.run(p.clone()).await;
    f.runner.wait_for_writes().await;
    let out_txt = Digest::of_bytes(format!("out-{tag}\n").as_bytes());
    assert!(f.server.has_blob(out_txt));
    f.server.remove_blob(out_txt);
    let _ = first;
    (f, p, counter, out_txt)
}

#[tokio::test]
async fn a_missing_output_blob_falls_back_in_fetch_and_validate() {
    for behavior in [CacheContentBehavior::Fetch, CacheContentBehavior::Validate] {
        let (f, p, counter, _) = cached_then_blob_deleted(behavior, "m").await;
        let g = Fixture::on_server(f.server.clone(), behavior, |_| {}).await;
        let r = g.run(p).await;
        assert_eq!(r.metadata.source, ResultSource::RanLocally, "{behavior:?}");
        assert_eq!(runs(&counter), 2, "{behavior:?}");
        assert_eq!(g.runner.stats().error_misses, 1, "{behavior:?}");
        // The fresh run was written back: the blob is on the server again.
        g.runner.wait_for_writes().await;
        assert!(
            f.server.has_blob(Digest::of_bytes(b"out-m\n")),
            "{behavior:?}"
        );
    }
}

#[tokio::test]
async fn defer_returns_the_hit_then_recovers_a_missing_blob_by_rerunning_its_producer() {
    let (f, p, counter, missing) = cached_then_blob_deleted(CacheContentBehavior::Defer, "d").await;
    let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Defer, |_| {}).await;
    let hit = g.run(p.clone()).await;
    assert_eq!(hit.metadata.source, ResultSource::RemoteCacheHit);
    assert_eq!(runs(&counter), 1);

    // A consumer needs the outputs: the missing blob surfaces as a typed error.
    let consumer = Process::new(["/bin/sh", "-c", "cat out.txt"])
        .env("PATH", "/usr/bin:/bin")
        .input_root(hit.output_root);
    let err = g
        .runner
        .run(Context::default(), consumer.clone())
        .await
        .unwrap_err();
    let ProcessError::MissingDigest { digest, .. } = err else {
        panic!("expected MissingDigest, got {err:?}");
    };
    assert_eq!(digest, missing);
    assert_eq!(g.runner.producer_of(digest), Some(p.clone()));

    // Recovery: re-run the producer with cache reads off; the fresh result is written back.
    let fresh = g
        .runner
        .recover_missing(Context::default(), digest)
        .await
        .unwrap()
        .expect("this runner served the blob");
    assert_eq!(fresh.metadata.source, ResultSource::RanLocally);
    assert_eq!(runs(&counter), 2);
    g.runner.wait_for_writes().await;
    assert!(f.server.has_blob(missing), "rewritten");
    assert_eq!(g.runner.stats().recoveries, 1);

    // The consumer now succeeds.
    let c = g.runner.run(Context::default(), consumer).await.unwrap();
    assert_eq!(g.text(c.stdout), "out-d\n");
}

#[tokio::test]
async fn action_cache_failures_are_misses_not_failed_builds() {
    for behavior in ALL {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::PermissionDenied,
        ] {
            let f = Fixture::new(behavior).await;
            f.server.knobs().error.insert(Method::GetActionResult, code);
            let counter = f.scratch().join("count");
            let r = f.run(producer(&counter, "u")).await;
            assert_eq!(r.exit_code, 0);
            assert_eq!(r.metadata.source, ResultSource::RanLocally);
            assert_eq!(f.runner.stats().error_misses, 1, "{behavior:?} {code:?}");
            assert_eq!(f.runner.stats().true_misses, 0);
        }
    }
}

#[tokio::test]
async fn a_slow_lookup_times_out_into_a_miss() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.read_timeout = Duration::from_millis(200)
    })
    .await;
    f.server
        .knobs()
        .delay
        .insert(Method::GetActionResult, Duration::from_secs(3));
    let counter = f.scratch().join("count");
    let start = std::time::Instant::now();
    let r = f.run(producer(&counter, "s")).await;
    assert_eq!(r.metadata.source, ResultSource::RanLocally);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(f.runner.stats().error_misses, 1);
}

#[tokio::test]
async fn speculation_picks_the_local_run_when_the_lookup_is_slow() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.speculation_delay = Duration::from_millis(50);
    })
    .await;
    f.server
        .knobs()
        .delay
        .insert(Method::GetActionResult, Duration::from_secs(3));
    let counter = f.scratch().join("count");
    let start = std::time::Instant::now();
    let r = f.run(producer(&counter, "spec")).await;
    assert_eq!(r.metadata.source, ResultSource::RanLocally);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(f.runner.stats().speculation_local_wins, 1);

    // With a fast cache, the hit wins and the local run never completes.
    f.runner.wait_for_writes().await;
    f.server.knobs().delay.clear();
    let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Fetch, |o| {
        o.speculation_delay = Duration::from_millis(500);
    })
    .await;
    let hit = g.run(producer(&counter, "spec")).await;
    assert_eq!(hit.metadata.source, ResultSource::RemoteCacheHit);
    assert_eq!(runs(&counter), 1);
}

#[tokio::test]
async fn a_corrupted_output_blob_never_enters_the_local_store() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "c");
    f.run(p.clone()).await;
    f.runner.wait_for_writes().await;
    let good = Digest::of_bytes(b"out-c\n");
    f.server.knobs().corrupt.insert(good);

    let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Fetch, |_| {}).await;
    let r = g.run(p).await;
    assert_eq!(
        r.metadata.source,
        ResultSource::RanLocally,
        "corruption = miss"
    );
    assert_eq!(g.runner.stats().error_misses, 1);
    // The local run produced the real content; the corrupt bytes were never committed.
    assert_eq!(g.text(good), "out-c\n");
}

/// Plants `result` for `p`'s action on the server and checks a fresh runner treats it as an
/// error miss (runs locally) without writing anything outside its store.
async fn assert_rejected(result: remexec::ActionResult, why: &str) {
    for behavior in ALL {
        let f = Fixture::new(behavior).await;
        let counter = f.scratch().join("count");
        let p = producer(&counter, "x");
        f.server
            .put_action_result(make_action(&p).action_digest, result.clone());
        let r = f.run(p).await;
        assert_eq!(
            r.metadata.source,
            ResultSource::RanLocally,
            "{why} ({behavior:?})"
        );
        assert_eq!(f.runner.stats().error_misses, 1, "{why} ({behavior:?})");
        assert_eq!(f.runner.stats().hits, 0);
    }
}

fn file_output(server: &TestServer, path: &str) -> remexec::OutputFile {
    remexec::OutputFile {
        path: path.into(),
        digest: Some(server.put_blob(b"evil").into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn unsafe_paths_in_cached_results_are_rejected() {
    let server = TestServer::start().await;
    for bad in ["/etc/passwd", "../outside", "a/../../b", "a//b", "./x", ""] {
        assert_rejected(
            remexec::ActionResult {
                output_files: vec![file_output(&server, bad)],
                ..Default::default()
            },
            &format!("output file {bad:?}"),
        )
        .await;
    }
    for target in ["/etc", "../..", "a/../../x"] {
        assert_rejected(
            remexec::ActionResult {
                output_symlinks: vec![remexec::OutputSymlink {
                    path: "link".into(),
                    target: target.into(),
                    node_properties: None,
                }],
                ..Default::default()
            },
            &format!("symlink to {target:?}"),
        )
        .await;
    }
    // Two outputs claiming one path.
    assert_rejected(
        remexec::ActionResult {
            output_files: vec![file_output(&server, "same"), file_output(&server, "same")],
            ..Default::default()
        },
        "duplicate path",
    )
    .await;
}

#[tokio::test]
async fn trees_with_bad_names_are_rejected() {
    for bad_name in ["..", "a/b", ""] {
        for behavior in ALL {
            let f = Fixture::new(behavior).await;
            let leaf = f.server.put_blob(b"content");
            let tree = remexec::Tree {
                root: Some(remexec::Directory {
                    files: vec![remexec::FileNode {
                        name: bad_name.into(),
                        digest: Some(leaf.into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                children: vec![],
            };
            let tree_digest = f.server.put_blob(&tree.encode_to_vec());
            let counter = f.scratch().join("count");
            let p = producer(&counter, "t");
            f.server.put_action_result(
                make_action(&p).action_digest,
                remexec::ActionResult {
                    output_directories: vec![remexec::OutputDirectory {
                        path: "gen".into(),
                        tree_digest: Some(tree_digest.into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
            let r = f.run(p).await;
            assert_eq!(
                r.metadata.source,
                ResultSource::RanLocally,
                "{bad_name:?} {behavior:?}"
            );
            assert_eq!(f.runner.stats().error_misses, 1);
        }
    }
}

#[tokio::test]
async fn a_cached_failure_is_a_hit_only_under_scope_always() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let mut p = Process::new([
        "/bin/sh",
        "-c",
        &format!("echo run >> {}; exit 3", counter.display()),
    ])
    .env("PATH", "/usr/bin:/bin");
    p.cache_scope = CacheScope::Always;
    assert_eq!(f.run(p.clone()).await.exit_code, 3);
    f.runner.wait_for_writes().await;
    let hit = f.run(p.clone()).await;
    assert_eq!(hit.metadata.source, ResultSource::RemoteCacheHit);
    assert_eq!(hit.exit_code, 3);
    assert_eq!(runs(&counter), 1);

    // Same action looked up under scope "successful": the cached failure is a miss.
    let mut q = p.clone();
    q.cache_scope = CacheScope::Successful;
    assert_eq!(make_action(&q).action_digest, make_action(&p).action_digest);
    let r = f.run(q.clone()).await;
    assert_eq!(r.metadata.source, ResultSource::RanLocally);
    // And a failed run under "successful" is not written.
    f.runner.wait_for_writes().await;
    assert_eq!(f.runner.stats().writes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_behind_applies_back_pressure_and_flushes_at_shutdown() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.write_queue_size = 1;
        o.cache_read = false;
    })
    .await;
    // Slow writes: each UpdateActionResult takes 2 s.
    f.server
        .knobs()
        .delay
        .insert(Method::UpdateActionResult, Duration::from_secs(2));
    let counter = f.scratch().join("count");
    // The writer takes 8 jobs at once and the queue holds 1 more: 9 runs return at once.
    for i in 0..9 {
        f.run(producer(&counter, &format!("w{i}"))).await;
    }
    assert_eq!(f.runner.pending_writes(), 9, "8 writing + 1 queued");
    // The 10th run's process runs, but its result cannot be queued: the run waits.
    let runner = Arc::new(f);
    let tenth = {
        let runner = runner.clone();
        let counter = counter.clone();
        tokio::spawn(async move { runner.run(producer(&counter, "w9")).await })
    };
    while runs(&counter) < 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !tenth.is_finished(),
        "a full write queue must hold the caller back"
    );
    // Counted once it has its slot: 8 writing + 1 queued; the 10th waits outside.
    assert_eq!(runner.runner.pending_writes(), 9);
    assert_eq!(
        runner.server.action_result_count(),
        0,
        "writes still stalled"
    );
    tenth.await.unwrap();
    let f = Arc::try_unwrap(runner).ok().unwrap();
    f.runner.shutdown().await.unwrap();
    assert_eq!(f.runner.stats().writes, 10);
    assert_eq!(f.server.action_result_count(), 10);
    assert_eq!(f.runner.pending_writes(), 0);
}

#[tokio::test]
async fn shutdown_reports_writes_that_miss_the_deadline() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.flush_deadline = Duration::from_millis(200);
    })
    .await;
    f.server
        .knobs()
        .delay
        .insert(Method::UpdateActionResult, Duration::from_secs(5));
    let counter = f.scratch().join("count");
    f.run(producer(&counter, "late")).await;
    let err = f.runner.shutdown().await.unwrap_err();
    assert!(err.contains("1 abandoned"), "{err}");
}

#[tokio::test]
async fn write_errors_are_warnings_and_backoff_counts_them() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.warnings_behavior = WarningsBehavior::Backoff;
        o.cache_read = false;
    })
    .await;
    f.server
        .knobs()
        .error
        .insert(Method::UpdateActionResult, Code::FailedPrecondition);
    let counter = f.scratch().join("count");
    for i in 0..10 {
        let r = f.run(producer(&counter, &format!("e{i}"))).await;
        assert_eq!(r.exit_code, 0, "a write error never fails the run");
        f.runner.wait_for_writes().await;
    }
    let stats = f.runner.stats();
    assert_eq!(stats.write_errors, 10);
    // The same failure on ten different actions is one recurring error (messages name action
    // digests, but warnings are grouped by operation and kind): logged on 1, 2, 4, 8.
    assert_eq!(stats.warnings_logged, 4);

    // Lookups failing the same way ten times: logged on occurrences 1, 2, 4, 8.
    let g = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.warnings_behavior = WarningsBehavior::Backoff;
        o.cache_write = false;
    })
    .await;
    g.server
        .knobs()
        .error
        .insert(Method::GetActionResult, Code::FailedPrecondition);
    let counter = g.scratch().join("count");
    for _ in 0..10 {
        g.run(producer(&counter, "same")).await;
    }
    assert_eq!(g.runner.stats().error_misses, 10);
    assert_eq!(g.runner.stats().warnings_logged, 4);
}

#[tokio::test]
async fn stats_count_bytes_and_time_saved() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let mut p = producer(&counter, "slow");
    p.argv[2] = format!("sleep 0.3; {}", p.argv[2]);
    f.run(p.clone()).await;
    f.runner.wait_for_writes().await;
    let up = f.runner.stats();
    assert!(up.blobs_uploaded >= 4, "{up:?}"); // out.txt, n.txt, stdout, Tree, Action, Command

    let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Fetch, |_| {}).await;
    g.run(p).await;
    let s = g.runner.stats();
    assert_eq!(s.hits, 1);
    assert!(s.bytes_downloaded > 0, "{s:?}");
    assert!(s.time_saved >= Duration::from_millis(200), "{s:?}");
}

#[tokio::test]
async fn a_read_only_cache_gets_no_uploads_and_one_warning() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.warnings_behavior = WarningsBehavior::Backoff;
    })
    .await;
    f.server.knobs().update_enabled = false;
    let counter = f.scratch().join("count");
    for i in 0..5 {
        let r = f.run(producer(&counter, &format!("ro{i}"))).await;
        assert_eq!(r.exit_code, 0);
        f.runner.wait_for_writes().await;
    }
    let stats = f.runner.stats();
    assert_eq!(stats.writes, 0);
    assert_eq!(stats.write_errors, 0, "not attempted, so not failed");
    assert_eq!(stats.writes_read_only, 5);
    assert_eq!(stats.writes_skipped, 0);
    assert_eq!(stats.warnings_logged, 1);
    assert_eq!(f.server.calls(Method::UpdateActionResult), 0);
    assert_eq!(
        f.server.calls(Method::BatchUpdateBlobs) + f.server.calls(Method::Write),
        0,
        "no blob uploaded for results that cannot be recorded"
    );
}

#[tokio::test]
async fn recover_missing_covers_nested_outputs_and_stdout() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "nest");
    let first = f.run(p.clone()).await;
    f.runner.wait_for_writes().await;
    let nested = Digest::of_bytes(b"nested-nest\n");
    assert!(f.server.has_blob(nested));
    assert!(f.server.has_blob(first.stdout));

    for gone in [nested, first.stdout] {
        let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Defer, |_| {}).await;
        let hit = g.run(p.clone()).await;
        assert_eq!(hit.metadata.source, ResultSource::RemoteCacheHit);
        // The consumer finds `gone` missing (here: it vanished from the server).
        f.server.remove_blob(gone);
        assert_eq!(
            g.runner.producer_of(gone).map(|q| q.argv),
            Some(p.argv.clone()),
            "the producer of {gone} is known"
        );
        let before = runs(&counter);
        let rerun = g
            .runner
            .recover_missing(Context::default(), gone)
            .await
            .unwrap()
            .expect("recoverable");
        assert_eq!(rerun.metadata.source, ResultSource::RanLocally);
        assert_eq!(runs(&counter), before + 1);
        g.runner.wait_for_writes().await;
        assert!(f.server.has_blob(gone), "the re-run wrote it back");
    }
}

#[tokio::test]
async fn a_hit_whose_outputs_fail_becomes_an_error_miss() {
    let f = Fixture::new(CacheContentBehavior::Defer).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "bad");
    f.run(p.clone()).await;
    f.runner.wait_for_writes().await;
    let g = Fixture::on_server(f.server.clone(), CacheContentBehavior::Defer, |_| {}).await;
    let hit = g.run(p.clone()).await;
    assert_eq!(g.runner.stats().hits, 1);
    // Fetching the outputs fails (corrupt on the server): the caller hands the error back.
    let out = Digest::of_bytes(b"out-bad\n");
    f.server.knobs().corrupt.insert(out);
    let err = g
        .store
        .ensure_downloaded(
            std::collections::HashSet::new(),
            std::collections::HashSet::from([hit.output_root]),
        )
        .await
        .unwrap_err();
    let r = g
        .runner
        .run_after_failed_hit(Context::default(), p, &err)
        .await
        .unwrap();
    assert_eq!(r.metadata.source, ResultSource::RanLocally);
    assert_eq!(g.text(out), "out-bad\n");
    let s = g.runner.stats();
    assert_eq!((s.hits, s.error_misses), (0, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_cancelled_on_a_full_write_queue_leaves_no_pending_write() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.write_queue_size = 1;
        o.cache_read = false;
    })
    .await;
    f.server
        .knobs()
        .delay
        .insert(Method::UpdateActionResult, Duration::from_secs(1));
    let counter = f.scratch().join("count");
    for i in 0..9 {
        f.run(producer(&counter, &format!("c{i}"))).await;
    }
    let f = Arc::new(f);
    let waiting = {
        let f = f.clone();
        let counter = counter.clone();
        tokio::spawn(async move {
            f.runner
                .run(Context::default(), producer(&counter, "x"))
                .await
        })
    };
    while runs(&counter) < 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The engine cancels the run while it waits for a queue slot.
    waiting.abort();
    let _ = waiting.await;
    tokio::time::timeout(Duration::from_secs(20), f.runner.wait_for_writes())
        .await
        .expect("wait_for_writes must return: the cancelled run left nothing pending");
    assert_eq!(f.runner.pending_writes(), 0);
    assert_eq!(f.runner.stats().writes, 9);
}

#[tokio::test]
async fn wrapping_hands_the_inner_runner_the_store_its_behavior_needs() {
    for behavior in ALL {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start().await;
        let provider = Arc::new(
            GrpcProvider::connect(&server.address(), GrpcOptions::default())
                .await
                .unwrap(),
        );
        let store = Store::with_remote(
            LocalStore::open(LocalStoreOptions::new(dir.path().join("s"))).unwrap(),
            provider.clone(),
        );
        let mut seen = None;
        let options = RemoteCacheOptions {
            cache_content_behavior: behavior,
            ..Default::default()
        };
        let _runner = RemoteCacheRunner::wrapping(store, provider, options, |inner_store| {
            seen = Some(inner_store.has_remote());
            Arc::new(LocalRunner::new(
                inner_store,
                LocalRunnerOptions::new(dir.path().join("sb")),
            ))
        });
        let expect_remote = behavior != CacheContentBehavior::Fetch;
        assert_eq!(seen, Some(expect_remote), "{behavior:?}");
    }
    // And a deferred hit's output is readable by a consumer built that way.
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "lazy");
    f.run(p.clone()).await;
    f.runner.wait_for_writes().await;
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(
        GrpcProvider::connect(&f.server.address(), GrpcOptions::default())
            .await
            .unwrap(),
    );
    let store = Store::with_remote(
        LocalStore::open(LocalStoreOptions::new(dir.path().join("s"))).unwrap(),
        provider.clone(),
    );
    let sb = dir.path().join("sb");
    let runner = RemoteCacheRunner::wrapping(
        store,
        provider,
        RemoteCacheOptions {
            cache_content_behavior: CacheContentBehavior::Defer,
            ..Default::default()
        },
        |s| Arc::new(LocalRunner::new(s, LocalRunnerOptions::new(sb))),
    );
    let hit = runner.run(Context::default(), p).await.unwrap();
    assert_eq!(hit.metadata.cache, CacheOutcome::Hit);
    let consumer = Process::new(["/bin/sh", "-c", "cat gen/sub/n.txt"])
        .env("PATH", "/usr/bin:/bin")
        .input_root(hit.output_root);
    let r = runner.run(Context::default(), consumer).await.unwrap();
    assert_eq!(r.exit_code, 0);
}

#[tokio::test]
async fn results_name_their_action_and_what_the_cache_did() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "o");
    let action = make_action(&p).action_digest;
    let miss = f.run(p.clone()).await;
    assert_eq!(miss.metadata.cache, CacheOutcome::Miss);
    assert_eq!(miss.metadata.action_digest, Some(action));
    f.runner.wait_for_writes().await;
    let hit = f.run(p.clone()).await;
    assert_eq!(hit.metadata.cache, CacheOutcome::Hit);
    assert_eq!(hit.metadata.action_digest, Some(action));
    f.server
        .knobs()
        .error
        .insert(Method::GetActionResult, Code::Unavailable);
    let err = f.run(p.clone()).await;
    assert_eq!(
        err.metadata.cache,
        CacheOutcome::ErrorMiss(store::ErrorKind::Retryable(Code::Unavailable))
    );
}

#[tokio::test]
async fn the_flush_report_says_when_writes_failed() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| o.cache_read = false).await;
    f.server
        .knobs()
        .error
        .insert(Method::UpdateActionResult, Code::FailedPrecondition);
    let counter = f.scratch().join("count");
    for i in 0..3 {
        f.run(producer(&counter, &format!("f{i}"))).await;
    }
    let report = f.runner.finish().await;
    assert_eq!((report.written, report.failed, report.abandoned), (0, 3, 0));
    assert!(!report.is_complete());
    assert!(report.to_string().contains("3 failed"), "{report}");
    // shutdown() (the trait's) says so too instead of Ok.
    let g = Fixture::with(CacheContentBehavior::Fetch, |o| o.cache_read = false).await;
    g.server
        .knobs()
        .error
        .insert(Method::UpdateActionResult, Code::FailedPrecondition);
    g.run(producer(&counter, "g")).await;
    let err = g.runner.shutdown().await.unwrap_err();
    assert!(err.contains("1 failed"), "{err}");
}

#[tokio::test]
async fn a_dead_cache_trips_the_breaker_and_a_probe_closes_it() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.breaker_threshold = 3;
        o.breaker_cooldown = Duration::from_millis(400);
        o.cache_write = false;
    })
    .await;
    f.server
        .knobs()
        .error
        .insert(Method::GetActionResult, Code::Unavailable);
    let counter = f.scratch().join("count");
    let mut outcomes = vec![];
    for i in 0..10 {
        let r = f.run(producer(&counter, &format!("b{i}"))).await;
        assert_eq!(r.exit_code, 0, "the build goes on");
        outcomes.push(r.metadata.cache);
    }
    // Three failing lookups (2 attempts each: the fixture's retry policy), then none.
    assert_eq!(f.server.calls(Method::GetActionResult), 6);
    assert!(
        outcomes[..3]
            .iter()
            .all(|o| matches!(o, CacheOutcome::ErrorMiss(_)))
    );
    assert!(
        outcomes[3..]
            .iter()
            .all(|o| *o == CacheOutcome::BreakerOpen),
        "{outcomes:?}"
    );
    let s = f.runner.stats();
    assert_eq!((s.error_misses, s.breaker_trips), (10, 1));

    // The cache comes back: after the cooldown one lookup probes, and the breaker closes.
    f.server.knobs().error.clear();
    tokio::time::sleep(Duration::from_millis(450)).await;
    let probe = f.run(producer(&counter, "probe")).await;
    assert_eq!(probe.metadata.cache, CacheOutcome::Miss);
    let next = f.run(producer(&counter, "after")).await;
    assert_eq!(next.metadata.cache, CacheOutcome::Miss, "asked again");
    assert_eq!(f.server.calls(Method::GetActionResult), 8);
}

#[tokio::test]
async fn every_call_names_the_build_and_the_action() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    let p = producer(&counter, "md");
    let action = make_action(&p).action_digest;
    let ctx = Context {
        build_id: "build-42".into(),
        mnemonic: "Genrule".into(),
        target: "//pkg:gen".into(),
    };
    f.runner.run(ctx.clone(), p.clone()).await.unwrap(); // lookup (miss), then write-behind
    f.runner.wait_for_writes().await;
    let seen = f.server.request_metadata();
    let methods: Vec<Method> = seen.iter().map(|(m, _)| *m).collect();
    assert_eq!(
        methods,
        vec![Method::GetActionResult, Method::UpdateActionResult],
        "the write carries the context too, though it runs on the writer task"
    );
    for (method, md) in seen {
        assert_eq!(md.tool_invocation_id, "build-42", "{method:?}");
        assert_eq!(md.action_id, action.hash.to_hex(), "{method:?}");
        assert_eq!(md.action_mnemonic, "Genrule");
        assert_eq!(md.target_id, "//pkg:gen");
        assert_eq!(md.tool_details.unwrap().tool_name, "recache");
    }
}

/// A cache that refuses this client's writes (PERMISSION_DENIED: a read-only token) is used
/// read-only for the rest of the run: the first write fails, later ones are not attempted.
#[tokio::test]
async fn permission_denied_on_a_write_makes_the_cache_read_only() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| o.cache_read = false).await;
    f.server
        .knobs()
        .error
        .insert(Method::UpdateActionResult, Code::PermissionDenied);
    let counter = f.scratch().join("count");
    for i in 0..5 {
        let r = f.run(producer(&counter, &format!("ro{i}"))).await;
        assert_eq!(r.exit_code, 0);
        f.runner.wait_for_writes().await;
    }
    let stats = f.runner.stats();
    assert_eq!(stats.write_errors, 1, "{stats:?}");
    assert_eq!(stats.writes_read_only, 4, "{stats:?}");
    assert_eq!(f.server.calls(Method::UpdateActionResult), 1);
}

/// Issue 26 item 4: the counters say what happened. A cache down for the whole build leaves
/// its results unwritten, and the flush report says it is not complete; a result that comes
/// after `finish()` is counted as skipped; runs with reads off count as uncacheable.
#[tokio::test]
async fn counters_tell_the_truth_about_a_dead_cache_and_late_results() {
    let f = Fixture::with(CacheContentBehavior::Fetch, |o| {
        o.breaker_threshold = 1;
        o.breaker_cooldown = Duration::from_secs(60);
    })
    .await;
    for m in [
        Method::GetActionResult,
        Method::UpdateActionResult,
        Method::FindMissingBlobs,
        Method::BatchUpdateBlobs,
    ] {
        f.server.knobs().error.insert(m, Code::Unavailable);
    }
    let counter = f.scratch().join("count");
    for i in 0..6 {
        let r = f.run(producer(&counter, &format!("down{i}"))).await;
        assert_eq!(r.exit_code, 0);
        f.runner.wait_for_writes().await;
    }
    let report = f.runner.finish().await;
    // The first lookup's failure opened the breaker: no write was even tried.
    assert_eq!(
        (report.written, report.failed, report.skipped),
        (0, 0, 6),
        "{report}"
    );
    assert!(!report.is_complete(), "nothing reached the cache: {report}");

    // After finish(): the result is fine, its write is counted as skipped.
    let before = f.runner.stats().writes_skipped;
    let late = f.run(producer(&counter, "late")).await;
    assert_eq!(late.exit_code, 0);
    assert_eq!(f.runner.stats().writes_skipped, before + 1);

    // Reads off: every run counts as uncacheable.
    let g = Fixture::with(CacheContentBehavior::Fetch, |o| o.cache_read = false).await;
    let counter = g.scratch().join("count");
    for i in 0..3 {
        g.run(producer(&counter, &format!("nr{i}"))).await;
    }
    assert_eq!(g.runner.stats().uncacheable, 3);
    let report = g.runner.finish().await;
    assert!(report.is_complete(), "{report}");
}

/// Issue 26 item 4: a runner dropped without `finish()`, with a write still queued, does not
/// keep its store from being opened again right away (it used to fail with "environment
/// already open" while the writer task held the store).
#[tokio::test]
async fn a_runner_dropped_without_finish_lets_its_store_be_opened_again() {
    let f = Fixture::new(CacheContentBehavior::Fetch).await;
    let counter = f.scratch().join("count");
    f.run(producer(&counter, "dropped")).await;
    let Fixture {
        dir, runner, store, ..
    } = f;
    drop(runner);
    drop(store);
    let again = LocalStore::open(LocalStoreOptions::new(dir.path().join("store")));
    let again = again.expect("the store opens again right away");
    assert!(again.usage().total_blobs() > 0);
    // And once everything is let go, a fresh open (a new process's view) works as well.
    drop(again);
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap();
}

/// Issue 26 item 3: a cache that hangs mid-build (as a SIGSTOPped server: every call waits
/// forever) costs the build's end seconds, with default options: the lookups time out and
/// open the breaker, which abandons the writes in flight at once (counted), so `finish()`
/// returns without waiting out each write's retries (3 × 30 s) or the flush deadline (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_that_hangs_mid_build_costs_seconds_at_finish() {
    let server = Arc::new(TestServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let provider = Arc::new(
        GrpcProvider::connect(&server.address(), GrpcOptions::default())
            .await
            .unwrap(),
    );
    let store = Store::with_remote(
        LocalStore::open(LocalStoreOptions::new(dir.path().join("store"))).unwrap(),
        provider.clone(),
    );
    let sandboxes = dir.path().join("sb");
    let runner = Arc::new(RemoteCacheRunner::wrapping(
        store,
        provider,
        RemoteCacheOptions::default(),
        |s| Arc::new(LocalRunner::new(s, LocalRunnerOptions::new(sandboxes))),
    ));
    // The server stops answering writes first: the first results' writes are in flight
    // (write-behind) when it hangs; then lookups hang too.
    for m in [
        Method::FindMissingBlobs,
        Method::BatchUpdateBlobs,
        Method::UpdateActionResult,
        Method::Write,
    ] {
        server.knobs().delay.insert(m, Duration::from_secs(3600));
    }
    let counter = dir.path().join("count");
    for i in 0..10 {
        runner
            .run(Context::default(), producer(&counter, &format!("ok{i}")))
            .await
            .unwrap();
    }
    assert_eq!(runner.stats().writes, 0);
    server
        .knobs()
        .delay
        .insert(Method::GetActionResult, Duration::from_secs(3600));
    let hung: Vec<_> = (0..12)
        .map(|i| {
            let runner = runner.clone();
            let p = producer(&counter, &format!("hung{i}"));
            tokio::spawn(async move { runner.run(Context::default(), p).await })
        })
        .collect();
    for h in hung {
        assert_eq!(h.await.unwrap().unwrap().exit_code, 0, "the build goes on");
    }
    let report = tokio::time::timeout(Duration::from_secs(20), runner.finish())
        .await
        .expect("finish() returns in seconds, not after the writes' retries and flush deadline");
    assert_eq!(report.written, 0, "{report}");
    assert_eq!(
        report.abandoned + report.skipped + report.failed,
        22,
        "{report}"
    );
    assert!(
        report.abandoned >= 10,
        "the writes in flight were abandoned: {report}"
    );
    assert!(!report.is_complete(), "{report}");
}
