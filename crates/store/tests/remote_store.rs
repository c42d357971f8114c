//! The remote half against the in-process fault-injecting server: every fault a real server
//! cannot be made to show on demand.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashing::Digest;
use store::remote::grpc::{GrpcOptions, GrpcProvider};
use store::remote::retry::RetryPolicy;
use store::remote::{ActionCacheProvider, ByteStoreProvider};
use store::{ErrorKind, LocalStore, LocalStoreOptions, Store};
use testutil::server::{Knobs, Method, TestServer};
use tonic::Code;

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

async fn provider(server: &TestServer, attempts: u32) -> Arc<GrpcProvider> {
    provider_with(
        server,
        GrpcOptions {
            retry: fast_retry(attempts),
            ..Default::default()
        },
    )
    .await
}

async fn provider_with(server: &TestServer, options: GrpcOptions) -> Arc<GrpcProvider> {
    Arc::new(
        GrpcProvider::connect(&server.address(), options)
            .await
            .unwrap(),
    )
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
}

fn store_with(provider: Arc<dyn ByteStoreProvider>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStore::open(LocalStoreOptions::new(dir.path())).unwrap();
    Fixture {
        _dir: dir,
        store: Store::with_remote(local, provider),
    }
}

/// Compressible but not trivially so: text-like lines with a counter.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(format!("line {i:08} of some build output text\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    testutil::data::pseudo_random(len, seed)
}

#[tokio::test]
async fn small_and_large_round_trips() {
    let server = TestServer::start().await;
    let f = store_with(provider(&server, 3).await);
    for (i, len) in [10usize, 100_000, 600_000, 6 * 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        let data = noise(len, i as u64);
        let d = server.put_blob(&data);
        assert_eq!(f.store.load_bytes(d).await.unwrap().unwrap(), &data[..]);
        assert!(f.store.local().contains(d), "fetched into the local store");
    }
    // Small blobs went through BatchReadBlobs, the large ones through ByteStream.
    assert_eq!(server.calls(Method::BatchReadBlobs), 2);
    assert_eq!(server.calls(Method::Read), 2);
    // A second load is local: no RPC at all.
    server.reset_calls();
    let d = Digest::of_bytes(&noise(600_000, 2));
    f.store.load_bytes(d).await.unwrap().unwrap();
    assert_eq!(server.total_calls(), 0);
}

#[tokio::test]
async fn absent_blobs_are_missing_digests() {
    let server = TestServer::start().await;
    let f = store_with(provider(&server, 3).await);
    let d = Digest::of_bytes(b"never uploaded");
    assert!(f.store.load_bytes(d).await.unwrap().is_none());
    let err = f.store.ensure_local(d).await.unwrap_err();
    assert_eq!(err.missing_digest(), Some(d));
    let err = f
        .store
        .ensure_downloaded(HashSet::from([d]), HashSet::new())
        .await
        .unwrap_err();
    assert_eq!(err.missing_digest(), Some(d), "{err}");
}

#[tokio::test]
async fn batches_are_split_to_stay_under_the_server_limit() {
    let server = TestServer::start_with(Knobs {
        batch_limit: 200_000,
        ..Default::default()
    })
    .await;
    let f = store_with(provider(&server, 1).await);
    let digests: HashSet<Digest> = (0..20)
        .map(|i| server.put_blob(&noise(30_000, i)))
        .collect();
    let summary = f
        .store
        .ensure_downloaded(digests.clone(), HashSet::new())
        .await
        .unwrap();
    assert_eq!(summary.blobs, 20);
    assert_eq!(summary.bytes, 600_000);
    // The server rejects any batch over 200 000 bytes with RESOURCE_EXHAUSTED and retries are
    // off, so success proves every batch fit; 600 kB needs at least 4 of them.
    let batches = server.calls(Method::BatchReadBlobs);
    assert!((4..=6).contains(&batches), "{batches} batches");
    for d in digests {
        assert!(f.store.local().contains(d));
    }
}

#[tokio::test]
async fn corrupted_and_truncated_downloads_are_rejected_and_never_committed() {
    let server = TestServer::start().await;
    let f = store_with(provider(&server, 3).await);
    let small = server.put_blob(&noise(5000, 1));
    let large = server.put_blob(&noise(3 * 1024 * 1024, 2));
    let short = server.put_blob(&noise(2 * 1024 * 1024, 3));
    {
        let mut k = server.knobs();
        k.corrupt.insert(small);
        k.corrupt.insert(large);
        k.truncate.insert(short);
    }
    for d in [small, large, short] {
        let err = f.store.ensure_local(d).await.unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::InvalidData, "{d}: {err}");
        assert!(!f.store.local().contains(d), "{d} must not be committed");
    }
    // Invalid data is not retried: one call per blob.
    assert_eq!(server.calls(Method::BatchReadBlobs), 1);
    assert_eq!(server.calls(Method::Read), 2);
    // No temp files are left in the pool.
    let leftovers = walk_files(&f.store.local().root().join("large"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn retries_are_honored_exactly() {
    let server = TestServer::start().await;
    let large = server.put_blob(&noise(1024 * 1024, 4));
    let f = store_with(provider(&server, 3).await);

    // Two failures, then success on the third and last attempt.
    server.knobs().fail_next(Method::Read, 2, Code::Unavailable);
    f.store.ensure_local(large).await.unwrap();
    assert_eq!(server.calls(Method::Read), 3);

    // Five failures with three attempts: exactly three calls, then the error.
    let other = server.put_blob(&noise(1024 * 1024, 5));
    server.reset_calls();
    server
        .knobs()
        .fail_next(Method::Read, 5, Code::ResourceExhausted);
    let err = f.store.ensure_local(other).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("gave up after 3 attempts"),
        "{err}"
    );
    assert_eq!(server.calls(Method::Read), 3);
}

#[tokio::test]
async fn non_retryable_codes_are_not_retried() {
    let server = TestServer::start().await;
    let d = server.put_blob(&noise(2 * 1024 * 1024, 6));
    let f = store_with(provider(&server, 5).await);
    for code in [
        Code::PermissionDenied,
        Code::InvalidArgument,
        Code::Unauthenticated,
    ] {
        server.reset_calls();
        server.knobs().error.insert(Method::Read, code);
        let err = f.store.ensure_local(d).await.unwrap_err();
        assert!(!err.is_retryable(), "{code:?}: {err}");
        assert_eq!(
            server.calls(Method::Read),
            1,
            "{code:?} must not be retried"
        );
    }
}

#[tokio::test]
async fn a_stream_dropped_half_way_is_retried_from_scratch() {
    let server = TestServer::start_with(Knobs {
        read_chunk_size: 256 * 1024,
        ..Default::default()
    })
    .await;
    let data = noise(2 * 1024 * 1024, 7);
    let d = server.put_blob(&data);
    let f = store_with(provider(&server, 3).await);
    server.knobs().drop_mid_stream = true;
    let err = f.store.ensure_local(d).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(server.calls(Method::Read), 3);
    assert!(!f.store.local().contains(d));

    // Drop once, then serve: the destination is reset, so the result is exact.
    server.knobs().drop_mid_stream = false;
    server.knobs().fail_next(Method::Read, 1, Code::Unavailable);
    f.store.ensure_local(d).await.unwrap();
    assert_eq!(f.store.local().load_bytes(d).unwrap().unwrap(), &data[..]);
}

#[tokio::test]
async fn timeouts_are_retryable_and_bounded() {
    let server = TestServer::start().await;
    server
        .knobs()
        .delay
        .insert(Method::GetActionResult, Duration::from_secs(5));
    let p = provider_with(
        &server,
        GrpcOptions {
            request_timeout: Duration::from_millis(200),
            retry: fast_retry(2),
            ..Default::default()
        },
    )
    .await;
    let start = Instant::now();
    let err = p
        .get_action_result(Digest::of_bytes(b"action"))
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(
        err.kind(),
        &ErrorKind::Retryable(Code::DeadlineExceeded),
        "{err}"
    );
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(server.calls(Method::GetActionResult), 2);
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}

#[tokio::test]
async fn time_waiting_for_a_slot_does_not_count_against_the_timeout() {
    let server = TestServer::start().await;
    server
        .knobs()
        .delay
        .insert(Method::GetActionResult, Duration::from_millis(300));
    // One slot, three calls of 300 ms each with a 500 ms timeout: the later calls wait up to
    // 600 ms for the slot, but each RPC itself takes 300 ms, so none may time out.
    let p = provider_with(
        &server,
        GrpcOptions {
            request_timeout: Duration::from_millis(500),
            concurrency_limit: 1,
            retry: fast_retry(1),
            ..Default::default()
        },
    )
    .await;
    let results =
        futures::future::join_all((0..3).map(|i| p.get_action_result(Digest::of_bytes(&[i]))))
            .await;
    for r in results {
        assert!(r.unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_loads_of_one_digest_issue_one_rpc() {
    let server = TestServer::start().await;
    let data = noise(3 * 1024 * 1024, 8);
    let d = server.put_blob(&data);
    server
        .knobs()
        .delay
        .insert(Method::Read, Duration::from_millis(200));
    let f = store_with(provider(&server, 3).await);
    let loads = (0..10).map(|_| {
        let store = f.store.clone();
        tokio::spawn(async move { store.load_bytes(d).await })
    });
    for r in futures::future::join_all(loads).await {
        assert_eq!(r.unwrap().unwrap().unwrap(), &data[..]);
    }
    assert_eq!(server.calls(Method::Read), 1);
}

#[tokio::test]
async fn zstd_round_trips_above_the_threshold_only() {
    let server = TestServer::start_with(Knobs {
        zstd: true,
        ..Default::default()
    })
    .await;
    let p = provider_with(
        &server,
        GrpcOptions {
            zstd_min_size: Some(1024 * 1024),
            retry: fast_retry(1),
            ..Default::default()
        },
    )
    .await;
    let f = store_with(p.clone());

    // Below the threshold: plain.
    let small = text(200_000, 1);
    let small_d = Digest::of_bytes(&small);
    p.store_bytes(small_d, small.clone().into()).await.unwrap();
    assert_eq!(server.zstd_transfers(), 0);
    assert!(server.has_blob(small_d));

    // Above: compressed upload through ByteStream, compressed download.
    let big = text(3 * 1024 * 1024, 2);
    let big_d = Digest::of_bytes(&big);
    p.store_bytes(big_d, big.clone().into()).await.unwrap();
    assert_eq!(server.zstd_transfers(), 1);
    assert!(
        server.has_blob(big_d),
        "server decompressed and verified it"
    );
    assert_eq!(f.store.load_bytes(big_d).await.unwrap().unwrap(), &big[..]);
    assert_eq!(server.zstd_transfers(), 2);
    assert_eq!(
        f.store.load_bytes(small_d).await.unwrap().unwrap(),
        &small[..]
    );
    assert_eq!(server.zstd_transfers(), 2, "small download not compressed");
}

#[tokio::test]
async fn into_local_only_never_touches_the_remote() {
    let server = TestServer::start().await;
    let remote_only = server.put_blob(b"only on the server");
    let f = store_with(provider(&server, 3).await);
    let local = f.store.into_local_only();
    assert!(!local.has_remote());
    server.reset_calls();
    assert!(local.load_bytes(remote_only).await.unwrap().is_none());
    let err = local.ensure_local(remote_only).await.unwrap_err();
    assert_eq!(err.missing_digest(), Some(remote_only));
    assert!(
        local
            .ensure_downloaded(HashSet::from([remote_only]), HashSet::new())
            .await
            .is_err()
    );
    assert_eq!(server.total_calls(), 0);
    // Data stored through it is visible to the full store (shared local store).
    let d = local.store_bytes(b"shared").unwrap();
    assert!(f.store.local().contains(d));
}

#[tokio::test]
async fn ensure_remote_has_recursive_uploads_only_what_is_missing() {
    let server = TestServer::start().await;
    let f = store_with(provider(&server, 3).await);
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("sub")).unwrap();
    let contents: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            if i == 4 {
                noise(2 * 1024 * 1024, i)
            } else {
                noise(1000, i)
            }
        })
        .collect();
    for (i, c) in contents.iter().enumerate() {
        let dir = if i % 2 == 0 { "" } else { "sub" };
        std::fs::write(src.path().join(dir).join(format!("f{i}")), c).unwrap();
    }
    let root = f.store.local().capture_directory(src.path()).unwrap();
    // The server already has two of the files.
    server.put_blob(&contents[0]);
    server.put_blob(&contents[1]);

    let summary = f
        .store
        .ensure_remote_has_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    // 3 files + 2 Directory messages (root and sub).
    assert_eq!(summary.blobs, 5);
    assert_eq!(
        server.calls(Method::Write),
        1,
        "the 2 MiB file was streamed"
    );
    assert_eq!(server.blob_count(), 7);

    // Everything is there now: validate proves it, and a second upload moves nothing.
    f.store
        .exists_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    server.reset_calls();
    let again = f
        .store
        .ensure_remote_has_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    assert_eq!(again.blobs, 0);
    assert_eq!(server.calls(Method::FindMissingBlobs), 1);
    assert_eq!(
        server.calls(Method::Write) + server.calls(Method::BatchUpdateBlobs),
        0
    );

    // A fresh store can fetch the whole directory back, and validate spots a missing blob.
    let g = store_with(provider(&server, 3).await);
    g.store
        .ensure_downloaded(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    g.store
        .local()
        .materialize_directory(root, &out.path().join("o"), Default::default())
        .unwrap();
    assert_eq!(std::fs::read(out.path().join("o/f4")).unwrap(), contents[4]);
    let gone = Digest::of_bytes(&contents[3]);
    server.remove_blob(gone);
    let err = g
        .store
        .exists_recursive(HashSet::new(), HashSet::from([root]))
        .await
        .unwrap_err();
    assert_eq!(err.missing_digest(), Some(gone));
}

#[tokio::test]
async fn bytestream_upload_tolerates_a_server_that_already_has_the_blob() {
    let server = TestServer::start().await;
    let p = provider(&server, 1).await;
    let data = noise(5 * 1024 * 1024, 9);
    let d = server.put_blob(&data);
    // The server answers after the first chunk with the full committed size.
    p.store_bytes(d, data.into()).await.unwrap();
    assert_eq!(server.calls(Method::Write), 1);
}

#[tokio::test]
async fn action_cache_round_trip_and_miss() {
    let server = TestServer::start().await;
    let p = provider(&server, 3).await;
    let action = Digest::of_bytes(b"some action");
    assert!(p.get_action_result(action).await.unwrap().is_none());
    let result = reapi::build::bazel::remote::execution::v2::ActionResult {
        exit_code: 3,
        ..Default::default()
    };
    p.update_action_result(action, result.clone())
        .await
        .unwrap();
    assert_eq!(p.get_action_result(action).await.unwrap(), Some(result));
}

#[tokio::test]
async fn headers_and_instance_name_are_validated() {
    let err = GrpcProvider::connect(
        "grpc://127.0.0.1:1",
        GrpcOptions {
            headers: vec![("bad header".into(), "x".into())],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("bad header"), "{err}");
    let err = GrpcProvider::connect("http://127.0.0.1:1", GrpcOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("grpc://"), "{err}");
}

#[tokio::test]
async fn unreachable_server_is_a_retryable_error_not_a_hang() {
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = GrpcProvider::connect(
        &format!("grpc://127.0.0.1:{port}"),
        GrpcOptions {
            retry: fast_retry(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let err = p
        .get_action_result(Digest::of_bytes(b"x"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
}

/// Where a `file://` cache rooted at `root` keeps the blob `d`.
fn local_dir_blob_path(root: &std::path::Path, d: Digest) -> std::path::PathBuf {
    let hex = d.hash.to_hex();
    root.join("cas")
        .join(&hex[..2])
        .join(format!("{hex}-{}", d.size_bytes))
}

/// `file://` batches (many small blobs, as a job cache saves them): every blob readable and
/// verified afterwards, a torn entry already there rewritten, no temp file left behind, and more
/// blobs than one flush takes.
#[tokio::test]
async fn local_directory_provider_stores_a_batch_whole() {
    use store::remote::local_dir::LocalDirProvider;
    let cache = tempfile::tempdir().unwrap();
    let p = Arc::new(LocalDirProvider::open(cache.path()).unwrap());
    let blobs: Vec<Vec<u8>> = (0..600).map(|i| noise(100 + i, i as u64)).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of_bytes(b)).collect();
    // One entry is already there but torn (a crashed writer's): the batch must replace it.
    let torn_path = local_dir_blob_path(cache.path(), digests[7]);
    std::fs::create_dir_all(torn_path.parent().unwrap()).unwrap();
    std::fs::write(&torn_path, &blobs[7][..10]).unwrap();

    let batch = digests
        .iter()
        .zip(&blobs)
        .map(|(d, b)| (*d, b.clone().into()))
        .collect();
    p.store_batch(batch).await.unwrap();

    let missing = p
        .list_missing_digests(&mut digests.iter().copied())
        .await
        .unwrap();
    assert!(
        missing.is_empty(),
        "{} blobs missing after the batch",
        missing.len()
    );
    let f = store_with(p.clone());
    for (d, b) in digests.iter().zip(&blobs) {
        assert_eq!(f.store.load_bytes(*d).await.unwrap().unwrap(), &b[..]);
    }
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("tmp"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[tokio::test]
async fn local_directory_provider_round_trips_and_refuses_corruption() {
    use store::remote::local_dir::LocalDirProvider;
    let cache = tempfile::tempdir().unwrap();
    let p = Arc::new(LocalDirProvider::open(cache.path()).unwrap());
    let f = store_with(p.clone());
    let small = noise(1000, 1);
    let large = noise(3 * 1024 * 1024, 2);
    for data in [&small, &large] {
        let d = Digest::of_bytes(data);
        p.store_bytes(d, data.clone().into()).await.unwrap();
        assert_eq!(f.store.load_bytes(d).await.unwrap().unwrap(), &data[..]);
    }
    let missing = p
        .list_missing_digests(
            &mut [Digest::of_bytes(&small), Digest::of_bytes(b"nope")].into_iter(),
        )
        .await
        .unwrap();
    assert_eq!(missing, HashSet::from([Digest::of_bytes(b"nope")]));

    // Corrupt a stored blob on disk: a fresh store refuses it.
    let victim = noise(2 * 1024 * 1024, 3);
    let vd = Digest::of_bytes(&victim);
    p.store_bytes(vd, victim.clone().into()).await.unwrap();
    let path = local_dir_blob_path(cache.path(), vd);
    let mut bad = victim.clone();
    bad[100] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let g = store_with(p.clone());
    let err = g.store.ensure_local(vd).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::InvalidData, "{err}");
    assert!(!g.store.local().contains(vd));
    // The damaged entry is gone, so it reads as missing and the next write repairs it.
    assert!(!path.exists(), "a file that fails verification is removed");
    let missing = p.list_missing_digests(&mut [vd].into_iter()).await.unwrap();
    assert_eq!(missing, HashSet::from([vd]));
    p.store_bytes(vd, victim.clone().into()).await.unwrap();
    assert_eq!(g.store.load_bytes(vd).await.unwrap().unwrap(), &victim[..]);
    // A truncated entry (a torn write) is not "present": a write replaces it.
    std::fs::write(&path, &victim[..1000]).unwrap();
    let missing = p.list_missing_digests(&mut [vd].into_iter()).await.unwrap();
    assert_eq!(missing, HashSet::from([vd]));
    p.store_bytes(vd, victim.clone().into()).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), victim);

    // Action cache.
    let action = Digest::of_bytes(b"act");
    assert!(p.get_action_result(action).await.unwrap().is_none());
    let r = reapi::build::bazel::remote::execution::v2::ActionResult {
        exit_code: 7,
        ..Default::default()
    };
    p.update_action_result(action, r.clone()).await.unwrap();
    assert_eq!(p.get_action_result(action).await.unwrap(), Some(r));
    // No temp files left behind.
    assert_eq!(
        std::fs::read_dir(cache.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn a_cancelled_download_releases_its_lock_and_temp_file() {
    let server = TestServer::start().await;
    let data = noise(6 * 1024 * 1024, 77);
    let d = server.put_blob(&data);
    server
        .knobs()
        .delay
        .insert(Method::Read, Duration::from_secs(30));
    let f = store_with(provider(&server, 1).await);
    // Every waiter gives up (a lost speculation race, an engine cancelling a run).
    let cancelled = tokio::time::timeout(Duration::from_millis(300), f.store.load_bytes(d)).await;
    assert!(cancelled.is_err(), "the download was still in progress");
    // Storing the same digest afterwards must not wait for the orphaned download.
    let local = f.store.local().clone();
    let content = data.clone();
    let stored = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || local.store_verified(d, &mut &content[..])),
    )
    .await
    .expect("store_verified hung behind a cancelled download")
    .unwrap();
    stored.unwrap();
    assert!(f.store.local().contains(d));
    let temps: Vec<_> = std::fs::read_dir(f.store.local().root().join("large"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "temp file left behind: {temps:?}");
    // And a new download of another blob is not blocked either.
    server.knobs().delay.clear();
    let other = server.put_blob(&noise(6 * 1024 * 1024, 78));
    tokio::time::timeout(Duration::from_secs(10), f.store.ensure_local(other))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn small_uploads_are_batched() {
    let server = TestServer::start().await;
    let f = store_with(provider(&server, 3).await);
    let digests: HashSet<Digest> = (0..200)
        .map(|i| f.store.store_bytes(&noise(2000, 1000 + i)).unwrap())
        .collect();
    let summary = f
        .store
        .ensure_remote_has_recursive(digests.clone(), HashSet::new())
        .await
        .unwrap();
    assert_eq!(summary.blobs, 200);
    assert_eq!(
        server.calls(Method::BatchUpdateBlobs),
        1,
        "one batch for 400 KB"
    );
    assert_eq!(server.calls(Method::Write), 0);
    for d in digests {
        assert!(server.has_blob(d));
    }
}

#[tokio::test]
async fn many_small_downloads_commit_in_bounded_groups() {
    let server = TestServer::start().await;
    // 3 000 × 4 KiB = 12 MiB of small blobs: more than one commit group.
    let digests: HashSet<Digest> = (0..3000)
        .map(|i| server.put_blob(&noise(4096, 5000 + i)))
        .collect();
    let f = store_with(provider(&server, 3).await);
    let summary = f
        .store
        .ensure_downloaded(digests.clone(), HashSet::new())
        .await
        .unwrap();
    assert_eq!(summary.blobs, 3000);
    assert!(f.store.local().missing(digests).is_empty());
    assert!(server.calls(Method::BatchReadBlobs) >= 3);
}

#[tokio::test]
async fn a_bounded_cache_directory_evicts_least_recently_used_entries() {
    use store::remote::local_dir::LocalDirProvider;
    let cache = tempfile::tempdir().unwrap();
    let p = LocalDirProvider::open(cache.path())
        .unwrap()
        .with_max_size(3 * 1024 * 1024);
    let blobs: Vec<(Digest, Vec<u8>)> = (0..8)
        .map(|i| {
            let b = noise(1024 * 1024, 900 + i);
            (Digest::of_bytes(&b), b)
        })
        .collect();
    let keep = blobs[0].0;
    for (i, (d, b)) in blobs.iter().enumerate() {
        p.store_bytes(*d, b.clone().into()).await.unwrap();
        // Reading the first one keeps it recently used.
        let f = store_with(Arc::new(p.clone()));
        f.store.ensure_local(keep).await.unwrap();
        assert!(
            p.approximate_size() <= 3 * 1024 * 1024,
            "after write {i}: {}",
            p.approximate_size()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let missing = p
        .list_missing_digests(&mut blobs.iter().map(|(d, _)| *d))
        .await
        .unwrap();
    assert!(!missing.contains(&keep), "the recently read entry stays");
    assert!(!missing.contains(&blobs[7].0), "the newest stays");
    assert!(
        missing.contains(&blobs[1].0),
        "the least recently used went"
    );
}

/// Issue 25: a server with no room (RESOURCE_EXHAUSTED on a write: a full disk or cache) will
/// not have it a moment later. Each write fails at once, final for that blob, instead of three
/// attempts; a read's RESOURCE_EXHAUSTED (a busy server) is still retried (above).
#[tokio::test]
async fn a_write_the_server_has_no_room_for_is_not_retried() {
    let server = TestServer::start().await;
    let p = provider(&server, 5).await;
    let small = noise(1000, 11);
    let big = noise(3 * 1024 * 1024, 12);
    let action = Digest::of_bytes(b"full server action");
    for method in [
        Method::BatchUpdateBlobs,
        Method::Write,
        Method::UpdateActionResult,
    ] {
        server.reset_calls();
        server.knobs().error.insert(method, Code::ResourceExhausted);
        let err = match method {
            Method::BatchUpdateBlobs => p
                .store_bytes(Digest::of_bytes(&small), small.clone().into())
                .await
                .unwrap_err(),
            Method::Write => p
                .store_bytes(Digest::of_bytes(&big), big.clone().into())
                .await
                .unwrap_err(),
            _ => p
                .update_action_result(action, Default::default())
                .await
                .unwrap_err(),
        };
        assert!(!err.is_retryable(), "{method:?}: {err}");
        assert_eq!(server.calls(method), 1, "{method:?} is not retried: {err}");
        server.knobs().error.clear();
    }
}
