//! The S3 slow tier's first layer against real S3-compatible servers started by
//! `scripts/s3-servers.sh` (moto, SeaweedFS). Under `CI=true` a server that is not configured
//! or not reachable fails the test; elsewhere it is a loud skip.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use hashing::Digest;
use server::s3::{S3Blobs, S3Options};
use testutil::real_servers::in_ci;

fn blobs(var: &str) -> Option<S3Blobs> {
    let endpoint = match std::env::var(var) {
        Ok(e) => e,
        Err(_) => {
            let msg = format!(
                "{var} is not set: start the S3 servers with `scripts/s3-servers.sh start` and \
                 `eval \"$(scripts/s3-servers.sh env)\"`, or run scripts/test.sh"
            );
            assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
            eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
            return None;
        }
    };
    let mut o = S3Options::new(Some(endpoint), "recache-test");
    o.credentials = Some((
        std::env::var("RECACHE_TEST_S3_ACCESS_KEY").unwrap(),
        std::env::var("RECACHE_TEST_S3_SECRET_KEY").unwrap(),
    ));
    o.prefix = format!("run-{}/", uuid::Uuid::new_v4().simple());
    o.multipart_threshold = 6 << 20;
    o.part_size = 5 << 20;
    Some(S3Blobs::new(o).unwrap())
}

async fn round_trip(var: &str) {
    let Some(s3) = blobs(var) else {
        return;
    };
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (len, seed) in [(1000usize, 1u64), (17 << 20, 2)] {
        let data = testutil::data::pseudo_random(len, seed);
        let d = Digest::of_bytes(&data);
        let path = dir.path().join(format!("in-{seed}"));
        std::fs::write(&path, &data).unwrap();
        assert!(!s3.contains(d).await.unwrap());
        s3.put_file(d, &path).await.unwrap();
        assert!(
            s3.contains(d).await.unwrap(),
            "{len} bytes: not there after the upload"
        );
        let back = dir.path().join(format!("out-{seed}"));
        assert!(s3.get_to_file(d, &back).await.unwrap());
        assert_eq!(std::fs::read(&back).unwrap(), data, "{len} bytes read back");
    }
    // Absent: false, not an error.
    let absent = Digest::of_bytes(b"never uploaded");
    assert!(!s3.get_to_file(absent, &dir.path().join("x")).await.unwrap());
    assert!(!dir.path().join("x").exists());
    // An upload left open is listed, and gone once aborted.
    let open = Digest::of_bytes(&testutil::data::pseudo_random(7 << 20, 3));
    let id = s3.start_multipart(open).await.unwrap();
    let listed = s3.open_uploads(None).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|u| u.upload_id == id && u.key == s3.key(open)),
        "{listed:?}"
    );
    s3.abort(&s3.key(open), &id).await.unwrap();
    assert!(
        s3.open_uploads(None)
            .await
            .unwrap()
            .iter()
            .all(|u| u.upload_id != id)
    );
    assert!(!s3.contains(open).await.unwrap());
}

#[tokio::test]
async fn blobs_round_trip_through_moto() {
    round_trip("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test]
async fn blobs_round_trip_through_seaweedfs() {
    round_trip("RECACHE_TEST_S3_SEAWEED").await;
}

// ---------------------------------------------------------------------------------------------
// `recache serve` with the S3 tier, over the wire.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use server::tier::TierOptions;
use server::{CacheServer, ServerOptions};
use tonic::transport::Channel;

/// The S3 options of a test against `var`'s server, on a fresh prefix.
fn s3_options(var: &str) -> Option<S3Options> {
    let s3 = blobs(var)?;
    drop(s3);
    let mut o = S3Options::new(Some(std::env::var(var).unwrap()), "recache-test");
    o.credentials = Some((
        std::env::var("RECACHE_TEST_S3_ACCESS_KEY").unwrap(),
        std::env::var("RECACHE_TEST_S3_SECRET_KEY").unwrap(),
    ));
    o.prefix = format!("tier-{}/", uuid::Uuid::new_v4().simple());
    o.multipart_threshold = 6 << 20;
    o.part_size = 5 << 20;
    Some(o)
}

struct Serving {
    server: CacheServer,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Serving {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.handle).await;
    }

    /// Waits until every journaled upload reached the bucket.
    async fn drained(&self, within: Duration) {
        let start = Instant::now();
        while self.server.s3_pending() != Some(0) {
            assert!(
                start.elapsed() < within,
                "{:?} uploads still journaled after {within:?}",
                self.server.s3_pending()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve(dir: &std::path::Path, tier: TierOptions) -> Serving {
    let mut options = ServerOptions::new(dir);
    options.s3 = Some(tier);
    serve_with(options).await
}

async fn serve_with(options: ServerOptions) -> Serving {
    let server = CacheServer::open(options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let handle = tokio::spawn(async move {
        s.serve(listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Serving {
        server,
        channel,
        stop: Some(tx),
        handle,
    }
}

fn cas(s: &Serving) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(s.channel.clone()).max_decoding_message_size(16 << 20)
}

async fn put_small(s: &Serving, data: &[u8]) -> Result<Digest, tonic::Status> {
    let d = Digest::of_bytes(data);
    let resp = cas(s)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: data.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    let st = resp.responses[0].status.clone().unwrap_or_default();
    if st.code != 0 {
        return Err(tonic::Status::new(tonic::Code::from(st.code), st.message));
    }
    Ok(d)
}

async fn write_blob(s: &Serving, data: &[u8]) -> Result<Digest, tonic::Status> {
    write_blob_on(&s.channel, data).await
}

async fn read_blob(s: &Serving, d: Digest) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = ByteStreamClient::new(s.channel.clone())
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.extend_from_slice(&msg?.data);
    }
    Ok(out)
}

async fn missing(s: &Serving, ds: &[Digest]) -> Vec<Digest> {
    cas(s)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            blob_digests: ds.iter().map(|d| (*d).into()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .iter()
        .map(|d| Digest::try_from(d).unwrap())
        .collect()
}

/// Two servers, each with its own fast tier, share one bucket: what one is given, the other
/// finds and serves, action results included; and what reached the bucket is exactly the blob.
async fn two_servers_share_a_bucket(var: &str) {
    let Some(o) = s3_options(var) else { return };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve(dir_a.path(), TierOptions::new(o.clone())).await;
    let small = testutil::data::pseudo_random(40_000, 11);
    let large = testutil::data::pseudo_random(13 << 20, 12);
    let ds = put_small(&a, &small).await.unwrap();
    let dl = write_blob(&a, &large).await.unwrap();
    // Readable at once, from the fast tier.
    assert_eq!(read_blob(&a, dl).await.unwrap(), large);
    let output = remexec::OutputFile {
        path: "out/big".into(),
        digest: Some(dl.into()),
        ..Default::default()
    };
    let result = remexec::ActionResult {
        output_files: vec![output],
        stdout_digest: Some(ds.into()),
        ..Default::default()
    };
    let action = Digest::of_bytes(b"an action recorded on server A");
    ActionCacheClient::new(a.channel.clone())
        .update_action_result(remexec::UpdateActionResultRequest {
            action_digest: Some(action.into()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    a.drained(Duration::from_secs(60)).await;
    assert!(s3.contains(ds).await.unwrap() && s3.contains(dl).await.unwrap());
    let check = tempfile::tempdir().unwrap();
    assert!(s3.get_to_file(dl, &check.path().join("l")).await.unwrap());
    assert!(
        s3.open_uploads(None).await.unwrap().is_empty(),
        "no multipart upload left open"
    );

    let b = serve(dir_b.path(), TierOptions::new(o.clone())).await;
    assert!(missing(&b, &[ds, dl]).await.is_empty(), "B finds A's blobs");
    let got = ActionCacheClient::new(b.channel.clone())
        .get_action_result(remexec::GetActionResultRequest {
            action_digest: Some(action.into()),
            ..Default::default()
        })
        .await
        .expect("a hit recorded on A is a hit on B")
        .into_inner();
    assert_eq!(got, result);
    assert_eq!(
        read_blob(&b, dl).await.unwrap(),
        large,
        "B serves A's large blob"
    );
    let batch = cas(&b)
        .batch_read_blobs(remexec::BatchReadBlobsRequest {
            digests: vec![ds.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.responses[0].data, small);
    // An unknown blob is missing on both.
    let never = Digest::of_bytes(b"never written anywhere");
    assert_eq!(missing(&b, &[never]).await, vec![never]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_moto_bucket() {
    two_servers_share_a_bucket("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_seaweedfs_bucket() {
    two_servers_share_a_bucket("RECACHE_TEST_S3_SEAWEED").await;
}

/// A ByteStream write of `data` under `d`'s name that stops after `pause_at` bytes until the
/// returned sender says go on. The call's result comes from the handle.
fn write_with_pause(
    s: &Serving,
    d: Digest,
    data: Vec<u8>,
    pause_at: usize,
) -> (
    tokio::task::JoinHandle<Result<(), tonic::Status>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(1);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        d.size_bytes
    );
    tokio::spawn(async move {
        let mut wait = Some(wait);
        for (i, c) in data.chunks(1 << 20).enumerate() {
            if i << 20 >= pause_at
                && let Some(w) = wait.take()
            {
                let _ = w.await;
            }
            let msg = WriteRequest {
                resource_name: if i == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: (i << 20) as i64,
                finish_write: (i + 1) << 20 >= data.len(),
                data: c.to_vec(),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut client = ByteStreamClient::new(s.channel.clone());
    let call = tokio::spawn(async move {
        let stream = futures::stream::poll_fn({
            let mut rx = rx;
            move |cx| rx.poll_recv(cx)
        });
        client.write(stream).await.map(|_| ())
    });
    (call, go)
}

/// Waits (up to 20 s) until the bucket has a multipart upload open under `key`.
async fn upload_opens(s3: &S3Blobs, key: &str) {
    let start = Instant::now();
    while s3.open_uploads(Some(key)).await.unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no multipart upload of {key} was opened while the blob was arriving"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A large blob's multipart upload starts while the blob still arrives (its first parts go
/// up before the client has finished sending), and only a blob that verified is ever
/// completed: a write whose bytes are not its digest's leaves no object and no open upload,
/// even though some of its parts were already in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blobs_go_up_while_they_arrive_and_only_verified_ones_complete() {
    let Some(o) = s3_options("RECACHE_TEST_S3_SEAWEED") else {
        return;
    };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), TierOptions::new(o.clone())).await;
    s3.ensure_bucket().await.unwrap();

    // A good blob of four parts: the upload is open while 11 MiB of 17 have arrived.
    let good = testutil::data::pseudo_random(17 << 20, 71);
    let d = Digest::of_bytes(&good);
    let (call, go) = write_with_pause(&s, d, good.clone(), 11 << 20);
    upload_opens(&s3, &s3.key(d)).await;
    assert!(
        !s3.contains(d).await.unwrap(),
        "completed before the blob was whole"
    );
    go.send(()).unwrap();
    call.await.unwrap().unwrap();
    s.drained(Duration::from_secs(60)).await;
    let back = dir.path().join("good-back");
    assert!(s3.get_to_file(d, &back).await.unwrap());
    assert_eq!(
        std::fs::read(&back).unwrap(),
        good,
        "the bucket's copy is the blob"
    );

    // Bytes that are not the named blob: parts went up, nothing is completed.
    let claimed = Digest::of_bytes(&testutil::data::pseudo_random(17 << 20, 72));
    let wrong = testutil::data::pseudo_random(17 << 20, 73);
    let (call, go) = write_with_pause(&s, claimed, wrong, 11 << 20);
    upload_opens(&s3, &s3.key(claimed)).await;
    go.send(()).unwrap();
    let refused = call.await.unwrap().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    s.drained(Duration::from_secs(60)).await;
    assert!(
        !s3.contains(claimed).await.unwrap(),
        "a blob that did not verify reached the bucket"
    );
    assert!(
        s3.open_uploads(None).await.unwrap().is_empty(),
        "the refused blob's multipart upload was left open"
    );
    assert_eq!(
        read_blob(&s, claimed).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    s.stop().await;
}

/// The fast tier as recache serve opens it, for staging what a crash leaves behind.
fn open_fast_tier(dir: &std::path::Path) -> store::LocalStore {
    let mut o = store::LocalStoreOptions::new(dir.join("store"));
    o.pool_compression = store::PoolCompression::Zstd;
    o.write_behind = false;
    store::LocalStore::open(o).unwrap()
}

/// Every state a crash can leave the journal in, staged by hand, then a start: the upload
/// completed before the crash is reconciled, the one cut mid-way resumes, a create whose answer
/// was lost has its stray upload aborted, a row for a blob never stored is dropped, and the
/// sweep aborts an upload nothing owns. Afterwards the bucket has exactly the blobs, and no
/// multipart upload is open under the prefix.
async fn a_restart_recovers_every_journal_state(var: &str) {
    let Some(o) = s3_options(var) else { return };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fast = open_fast_tier(dir.path());
    let part = o.part_size;
    let blob = |seed| testutil::data::pseudo_random(12 << 20, seed);
    let (x, y, z) = (blob(21), blob(22), blob(23));
    let (dx, dy, dz) = (
        Digest::of_bytes(&x),
        Digest::of_bytes(&y),
        Digest::of_bytes(&z),
    );
    for data in [&x, &y, &z] {
        fast.store_verified(Digest::of_bytes(data), &mut &data[..])
            .unwrap();
    }
    // X: completed in S3, the row not yet deleted.
    let id_x = s3.start_multipart(dx).await.unwrap();
    let mut parts_x = Vec::new();
    for (i, chunk) in x.chunks(part as usize).enumerate() {
        let n = i as i32 + 1;
        parts_x.push((
            n,
            s3.upload_part(dx, &id_x, n, chunk.to_vec().into())
                .await
                .unwrap(),
        ));
    }
    s3.complete(dx, &id_x, &parts_x).await.unwrap();
    fast.journal_put(
        dx,
        &server::tier::encode_row_for_tests(Some((&id_x, part, &parts_x))),
    )
    .unwrap();
    // Y: one part of three uploaded and recorded.
    let id_y = s3.start_multipart(dy).await.unwrap();
    let etag = s3
        .upload_part(dy, &id_y, 1, y[..part as usize].to_vec().into())
        .await
        .unwrap();
    fast.journal_put(
        dy,
        &server::tier::encode_row_for_tests(Some((&id_y, part, &[(1, etag)]))),
    )
    .unwrap();
    // Z: created in S3, the answer never recorded.
    let stray_z = s3.start_multipart(dz).await.unwrap();
    fast.journal_put(dz, &server::tier::encode_row_for_tests(None))
        .unwrap();
    // V: admitted, never stored.
    let dv = Digest::of_bytes(&blob(24));
    fast.journal_put(dv, &server::tier::encode_row_for_tests(None))
        .unwrap();
    // W: an upload no row owns (another server's crash, long ago).
    let dw = Digest::of_bytes(b"w");
    let stray_w = s3.start_multipart(dw).await.unwrap();
    drop(fast);

    let mut tier = TierOptions::new(o.clone());
    tier.sweep_grace = Duration::ZERO;
    let s = serve(dir.path(), tier).await;
    s.drained(Duration::from_secs(60)).await;
    let check = tempfile::tempdir().unwrap();
    for d in [dx, dy, dz] {
        assert!(
            s3.get_to_file(d, &check.path().join(d.hash.to_string()))
                .await
                .unwrap(),
            "{d} is in the bucket, verified"
        );
    }
    assert!(!s3.contains(dv).await.unwrap());
    // The sweep runs in the background at start: give it a moment.
    let start = Instant::now();
    loop {
        let open = s3.open_uploads(None).await.unwrap();
        if open.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "uploads still open: {open:?} (stray Z {stray_z}, stray W {stray_w})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once uploaded, the blobs are evictable again; all of them still read.
    assert_eq!(read_blob(&s, dy).await.unwrap(), y);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_recovers_every_journal_state_on_moto() {
    a_restart_recovers_every_journal_state("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_recovers_every_journal_state_on_seaweedfs() {
    a_restart_recovers_every_journal_state("RECACHE_TEST_S3_SEAWEED").await;
}

/// With the bucket unreachable, writes are accepted until the queue is full, then refused
/// with RESOURCE_EXHAUSTED (nothing stored); the accepted ones stay readable and, after a
/// restart with the bucket back, all reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_pushes_back_and_loses_nothing() {
    let Some(o) = s3_options("RECACHE_TEST_S3_MOTO") else {
        return;
    };
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut down = o.clone();
    down.endpoint = Some(dead);
    let mut tier = TierOptions::new(down);
    tier.queue = 2;
    tier.queue_wait = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), tier).await;
    let one = put_small(&s, b"first blob while S3 is down").await.unwrap();
    let two = write_blob(&s, &testutil::data::pseudo_random(7 << 20, 31))
        .await
        .unwrap();
    let refused = put_small(&s, b"third blob: the queue is full")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("queue is full"),
        "{}",
        refused.message()
    );
    let third = Digest::of_bytes(b"third blob: the queue is full");
    assert_eq!(missing(&s, &[one, two, third]).await, vec![third]);
    assert_eq!(
        read_blob(&s, one).await.unwrap(),
        b"first blob while S3 is down"
    );
    assert_eq!(s.server.s3_pending(), Some(2));
    s.stop().await;

    let s3 = S3Blobs::new(o.clone()).unwrap();
    let s = serve(dir.path(), TierOptions::new(o)).await;
    s.drained(Duration::from_secs(60)).await;
    assert!(s3.contains(one).await.unwrap() && s3.contains(two).await.unwrap());
    assert!(!s3.contains(third).await.unwrap());
    s.stop().await;
}

/// Faults no real server shows on demand, through the fault proxy: resets, 503 SlowDown, 500
/// and a hung connection are retried and the upload lands; a bucket that keeps failing reaches
/// the client as UNAVAILABLE (a miss to recache), never as a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_faults_are_retried_then_reported_unavailable() {
    let Some(o) = s3_options("RECACHE_TEST_S3_MOTO") else {
        return;
    };
    let proxy = testutil::s3_proxy::S3Proxy::start(o.endpoint.as_deref().unwrap()).await;
    let mut via = o.clone();
    via.endpoint = Some(proxy.endpoint.clone());
    via.read_timeout = Duration::from_secs(1);
    let s3 = S3Blobs::new(o.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), TierOptions::new(via.clone())).await;
    use std::sync::atomic::Ordering;
    let f = &proxy.faults;
    f.resets.store(1, Ordering::Release);
    f.slow_downs.store(1, Ordering::Release);
    f.internal_errors.store(1, Ordering::Release);
    f.stalls.store(1, Ordering::Release);
    proxy.cut_connections();
    let d = put_small(&s, b"uploaded through four faults")
        .await
        .unwrap();
    s.drained(Duration::from_secs(60)).await;
    assert!(s3.contains(d).await.unwrap());
    assert_eq!(
        f.served.load(Ordering::Acquire),
        4,
        "every fault was met and retried"
    );

    // A blob only the bucket has, read through a server whose S3 keeps answering 503.
    let only_remote = testutil::data::pseudo_random(300_000, 41);
    let dr = Digest::of_bytes(&only_remote);
    s3.put_bytes(dr, only_remote.clone().into()).await.unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let cooldown = Duration::from_secs(2);
    let b = serve(
        dir_b.path(),
        TierOptions {
            cooldown,
            ..TierOptions::new(via)
        },
    )
    .await;
    let get_ac = || async {
        ActionCacheClient::new(b.channel.clone())
            .get_action_result(remexec::GetActionResultRequest {
                action_digest: Some(Digest::of_bytes(b"some action").into()),
                ..Default::default()
            })
            .await
            .unwrap_err()
    };
    // The start-up sweep (a background listing) must be done before the faults start, or its
    // retries would land in the cooldown this test checks.
    let start = Instant::now();
    while b.server.s3_retention_stats().unwrap().sweeps == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the start-up sweep never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.always_slow_down.store(true, Ordering::Release);
    proxy.cut_connections();
    let before = f.served.load(Ordering::Acquire);
    let e = read_blob(&b, dr).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let asked = f.served.load(Ordering::Acquire);
    assert!(
        asked > before,
        "the read asked the bucket (and its retries met 503s)"
    );
    // The failure starts the cooldown: no request reaches the bucket, each answer is at once.
    let e = get_ac().await;
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // Existence checks that cannot ask report the blob missing (the client uploads it again).
    assert_eq!(missing(&b, &[dr]).await, vec![dr]);
    let e = read_blob(&b, dr).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("asked again in"), "{e:?}");
    assert_eq!(
        f.served.load(Ordering::Acquire),
        asked,
        "nothing was sent to the bucket during the cooldown"
    );
    // After it, the bucket is asked again; an action result it fails to give is UNAVAILABLE.
    tokio::time::sleep(cooldown + Duration::from_millis(100)).await;
    let e = get_ac().await;
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(f.served.load(Ordering::Acquire) > asked, "asked again");
    f.always_slow_down.store(false, Ordering::Release);
    tokio::time::sleep(cooldown + Duration::from_millis(100)).await;
    assert_eq!(
        read_blob(&b, dr).await.unwrap(),
        only_remote,
        "served once S3 recovers"
    );

    // An object that is not the blob its key names (bit rot, a bad writer): streamed reads
    // end in DATA_LOSS, never a clean finish, and nothing lands in the fast tier.
    let real = testutil::data::pseudo_random(2 << 20, 42);
    let dc = Digest::of_bytes(&real);
    let mut rotten = real.clone();
    rotten[1_500_000] ^= 1;
    s3.put_bytes(dc, rotten.into()).await.unwrap();
    let e = read_blob(&b, dc).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e:?}");
    assert!(!b.server.store().contains(dc));
    s.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Issue 27: only verified bytes reach the bucket, bad objects are repaired, nothing leaks.

/// Waits until `s3` has `d` as exactly `data` (read back and compared), within 60 s.
async fn bucket_holds(s3: &S3Blobs, d: Digest, data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("back");
    let start = Instant::now();
    loop {
        if s3.get_to_file(d, &path).await.unwrap_or(false) {
            assert_eq!(
                std::fs::read(&path).unwrap(),
                data,
                "the bucket's object is the blob"
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{d} never reached the bucket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 27 item 1: a write of wrong bytes (right length) is refused; parts it sent early
/// belong to it alone. A later or overlapping good write of the same digest must complete an
/// object of the good bytes (it used to complete with the rejected write's first parts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_write_never_lends_its_parts_to_the_next_one() {
    let Some(o) = s3_options("RECACHE_TEST_S3_SEAWEED") else {
        return;
    };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), TierOptions::new(o.clone())).await;
    for (round, overlap) in [(0u64, false), (1, true)] {
        let good = testutil::data::pseudo_random(40 << 20, 900 + round);
        let d = Digest::of_bytes(&good);
        let bad = testutil::data::pseudo_random(40 << 20, 950 + round);
        // The bad write sends 21 MiB, so early parts go up, then waits.
        let (call, go) = write_with_pause(&s, d, bad, 21 << 20);
        upload_opens(&s3, &s3.key(d)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let good_write = if overlap {
            let s_channel = s.channel.clone();
            let good = good.clone();
            Some(tokio::spawn(async move {
                write_blob_on(&s_channel, &good).await
            }))
        } else {
            None
        };
        go.send(()).unwrap();
        let refused = call.await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        match good_write {
            Some(w) => {
                w.await.unwrap().unwrap();
            }
            None => {
                write_blob(&s, &good).await.unwrap();
            }
        }
        s.drained(Duration::from_secs(120)).await;
        bucket_holds(&s3, d, &good).await;
    }
    s.stop().await;
}

/// `write_blob` over a channel (for a write spawned on its own task).
async fn write_blob_on(channel: &Channel, data: &[u8]) -> Result<Digest, tonic::Status> {
    let d = Digest::of_bytes(data);
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        d.size_bytes
    );
    let msgs: Vec<WriteRequest> = data
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: resource.clone(),
            write_offset: (i << 20) as i64,
            finish_write: (i << 20) + c.len() == data.len(),
            data: c.to_vec(),
        })
        .collect();
    ByteStreamClient::new(channel.clone())
        .write(futures::stream::iter(msgs))
        .await?;
    Ok(d)
}

/// Issue 27 item 2: an object that is not its blob is deleted when a read finds out, the blob
/// reads as missing, and a verified upload replaces it; a truncated object is replaced by the
/// next upload even though the conditional PUT answers 412.
async fn bad_objects_are_repaired(var: &str) {
    let Some(o) = s3_options(var) else { return };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    // Same size, wrong bytes, planted in the bucket.
    let good = testutil::data::pseudo_random(9 << 20, 960);
    let d = Digest::of_bytes(&good);
    let wrong = testutil::data::pseudo_random(9 << 20, 961);
    s3.put_bytes(d, wrong.into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), TierOptions::new(o.clone())).await;
    assert!(
        missing(&s, &[d]).await.is_empty(),
        "a HEAD sees the right size"
    );
    let e = read_blob(&s, d).await.unwrap_err();
    assert!(
        matches!(e.code(), tonic::Code::DataLoss | tonic::Code::NotFound),
        "{e:?}"
    );
    assert_eq!(missing(&s, &[d]).await, vec![d], "found bad: missing now");
    assert!(!s3.contains(d).await.unwrap(), "the bad object was deleted");
    write_blob(&s, &good).await.unwrap();
    s.drained(Duration::from_secs(60)).await;
    bucket_holds(&s3, d, &good).await;
    assert_eq!(read_blob(&s, d).await.unwrap(), good);

    // A truncated small object: reported missing, and the upload replaces it.
    let small = testutil::data::pseudo_random(1 << 20, 962);
    let sd = Digest::of_bytes(&small);
    let key = s3.key(sd);
    s3.put_bytes(sd, small[..small.len() / 2].to_vec().into())
        .await
        .unwrap();
    assert!(
        !s3.contains(sd).await.unwrap(),
        "{key}: the wrong size is not the blob"
    );
    assert_eq!(missing(&s, &[sd]).await, vec![sd]);
    put_small(&s, &small).await.unwrap();
    s.drained(Duration::from_secs(60)).await;
    bucket_holds(&s3, sd, &small).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_repaired_on_moto() {
    bad_objects_are_repaired("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_repaired_on_seaweedfs() {
    bad_objects_are_repaired("RECACHE_TEST_S3_SEAWEED").await;
}

/// Issue 27 items 3 and 4, on SeaweedFS (moto dates every upload 2010, which hid item 4
/// behind its sweep; here the sweep's grace is the default 24 h, so only the journal's own
/// recovery can close them): a `multipart` row whose blob now goes up as one PUT (a raised
/// threshold) aborts its upload, and a `creating` row of a blob never stored aborts every open
/// upload of its key. Nothing is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_uploads_never_leak_across_a_restart() {
    let Some(o) = s3_options("RECACHE_TEST_S3_SEAWEED") else {
        return;
    };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fast = open_fast_tier(dir.path());
    let part = o.part_size;
    // X: stored, a multipart row with two of three parts recorded.
    let x = testutil::data::pseudo_random(12 << 20, 970);
    let dx = Digest::of_bytes(&x);
    fast.store_verified(dx, &mut &x[..]).unwrap();
    let id_x = s3.start_multipart(dx).await.unwrap();
    let mut parts = Vec::new();
    for n in 1..=2i32 {
        let from = (n as usize - 1) * part as usize;
        let etag = s3
            .upload_part(dx, &id_x, n, x[from..from + part as usize].to_vec().into())
            .await
            .unwrap();
        parts.push((n, etag));
    }
    fast.journal_put(
        dx,
        &server::tier::encode_row_for_tests(Some((&id_x, part, &parts))),
    )
    .unwrap();
    // V: a create reached S3, then kill -9 before the blob was stored.
    let dv = Digest::of_bytes(&testutil::data::pseudo_random(12 << 20, 971));
    let _stray = s3.start_multipart(dv).await.unwrap();
    fast.journal_put(dv, &server::tier::encode_row_for_tests(None))
        .unwrap();
    drop(fast);

    let mut raised = o.clone();
    raised.multipart_threshold = 64 << 20;
    let s = serve(dir.path(), TierOptions::new(raised)).await;
    s.drained(Duration::from_secs(60)).await;
    bucket_holds(&s3, dx, &x).await;
    assert!(!s3.contains(dv).await.unwrap());
    let open = s3.open_uploads(None).await.unwrap();
    assert!(open.is_empty(), "uploads left open: {open:?}");
    s.stop().await;
}

/// Issue 27 item 5: a fast tier smaller than a blob cannot keep it, yet serves it (whole and
/// ranged) straight from the bucket, verified, instead of answering present and failing every
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_fast_tier_is_served_from_the_bucket() {
    let Some(o) = s3_options("RECACHE_TEST_S3_SEAWEED") else {
        return;
    };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    let big = testutil::data::pseudo_random(40 << 20, 980);
    let d = Digest::of_bytes(&big);
    let path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(path.path(), &big).unwrap();
    s3.put_file(d, path.path()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::new(dir.path());
    options.max_size = 10 << 20;
    options.s3 = Some(TierOptions::new(o.clone()));
    let small = serve_with(options).await;
    assert!(missing(&small, &[d]).await.is_empty());
    assert_eq!(read_blob(&small, d).await.unwrap(), big, "a whole read");
    let mut stream = ByteStreamClient::new(small.channel.clone())
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            read_offset: (17 << 20) + 5,
            read_limit: 3 << 20,
        })
        .await
        .unwrap()
        .into_inner();
    let mut ranged = Vec::new();
    while let Some(msg) = stream.next().await {
        ranged.extend_from_slice(&msg.unwrap().data);
    }
    assert_eq!(
        ranged,
        &big[(17 << 20) + 5..(20 << 20) + 5],
        "a ranged read"
    );
    assert!(!small.server.store().contains(d), "nothing was kept");
    small.stop().await;
}

/// Issue 27 item 6: a server on prefix `p/` sweeps only keys of its own layout: the open
/// upload of a server on `p/cas/` (key `p/cas/cas/…`) stays, its own stray upload goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_leaves_other_prefixes_alone() {
    let Some(o) = s3_options("RECACHE_TEST_S3_SEAWEED") else {
        return;
    };
    let mine = S3Blobs::new(o.clone()).unwrap();
    mine.ensure_bucket().await.unwrap();
    let mut nested = o.clone();
    nested.prefix = format!("{}cas/", o.prefix);
    let theirs = S3Blobs::new(nested).unwrap();
    let d = Digest::of_bytes(b"someone else's blob");
    let foreign = theirs.start_multipart(d).await.unwrap();
    let stray = mine.start_multipart(d).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut tier = TierOptions::new(o.clone());
    tier.sweep_grace = Duration::ZERO;
    let s = serve(dir.path(), tier).await;
    let start = Instant::now();
    while mine
        .open_uploads(Some(&mine.key(d)))
        .await
        .unwrap()
        .iter()
        .any(|u| u.upload_id == stray)
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the sweep never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open = theirs.open_uploads(Some(&theirs.key(d))).await.unwrap();
    assert!(
        open.iter().any(|u| u.upload_id == foreign),
        "the other server's upload was swept: {open:?}"
    );
    theirs.abort(&theirs.key(d), &foreign).await.unwrap();
    s.stop().await;
}

/// A hit never names a blob that is gone: a server that knows an object is in the bucket
/// (it answered FindMissingBlobs from a HEAD) still checks a hit's outputs afresh, so an
/// object deleted behind its back (a lifecycle rule, another server, an operator) makes the
/// entry a miss, and a read of it NOT_FOUND.
async fn vanished_objects_are_misses(var: &str) {
    let Some(o) = s3_options(var) else { return };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve(dir_a.path(), TierOptions::new(o.clone())).await;
    let out = testutil::data::pseudo_random(3000, 990);
    let od = put_small(&a, &out).await.unwrap();
    let action = Digest::of_bytes(b"vanishing action");
    let ar = remexec::ActionResult {
        output_files: vec![remexec::OutputFile {
            path: "out".into(),
            digest: Some(od.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    ActionCacheClient::new(a.channel.clone())
        .update_action_result(remexec::UpdateActionResultRequest {
            action_digest: Some(action.into()),
            action_result: Some(ar.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    a.drained(Duration::from_secs(60)).await;
    let b = serve(dir_b.path(), TierOptions::new(o.clone())).await;
    assert!(
        missing(&b, &[od]).await.is_empty(),
        "B learns it is in the bucket"
    );
    let get = remexec::GetActionResultRequest {
        action_digest: Some(action.into()),
        ..Default::default()
    };
    let mut ac_b = ActionCacheClient::new(b.channel.clone());
    assert_eq!(
        ac_b.get_action_result(get.clone())
            .await
            .unwrap()
            .into_inner(),
        ar
    );

    s3.delete(od).await.unwrap();
    let e = ac_b.get_action_result(get.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "a dangling hit: {e:?}");
    assert_eq!(
        read_blob(&b, od).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(missing(&b, &[od]).await, vec![od]);
    // The build's rewrite through B repairs it for everyone.
    put_small(&b, &out).await.unwrap();
    b.drained(Duration::from_secs(60)).await;
    bucket_holds(&s3, od, &out).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_objects_are_misses_on_moto() {
    vanished_objects_are_misses("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_objects_are_misses_on_seaweedfs() {
    vanished_objects_are_misses("RECACHE_TEST_S3_SEAWEED").await;
}

/// Issue 27 retention, with a retention of 8 s (so: renewed when used past 4 s, deleted when
/// unused for 12 s; the sweep runs every second): an object used after half its retention gets
/// its age renewed, an unused one does not, and the expiry sweep leaves exactly the used one
/// under the prefix.
async fn retention_keeps_what_is_used(var: &str) {
    let Some(o) = s3_options(var) else { return };
    let s3 = S3Blobs::new(o.clone()).unwrap();
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut tier = TierOptions::new(o.clone());
    tier.retention = Some(Duration::from_secs(8));
    tier.sweep_every = Duration::from_secs(1);
    let s = serve(dir.path(), tier).await;
    let (used, unused) = (
        testutil::data::pseudo_random(5000, 1001),
        testutil::data::pseudo_random(5000, 1002),
    );
    let du = put_small(&s, &used).await.unwrap();
    let dn = put_small(&s, &unused).await.unwrap();
    s.drained(Duration::from_secs(60)).await;
    let born_u = s3.stat(du).await.unwrap().expect("uploaded");
    let born_n = s3.stat(dn).await.unwrap().expect("uploaded");
    // Past half the retention, one is used (a read), the other is not.
    tokio::time::sleep(Duration::from_millis(5200)).await;
    assert_eq!(read_blob(&s, du).await.unwrap(), used);
    let start = Instant::now();
    while s3.stat(du).await.unwrap().is_none_or(|m| m <= born_u) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the used object was never renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s3.stat(dn).await.unwrap(),
        Some(born_n),
        "the unused one keeps its age"
    );
    // The unused one goes 12 s after its upload; the used one (renewed at ~5 s) stays.
    let start = Instant::now();
    while s3.stat(dn).await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the unused object never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed: Vec<String> = s3
        .list("cas/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, vec![s3.key(du)], "only the used object remains");
    let stats = s.server.s3_retention_stats().unwrap();
    assert!(stats.refreshed >= 1 && stats.expired >= 1, "{stats:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_is_used_on_moto() {
    retention_keeps_what_is_used("RECACHE_TEST_S3_MOTO").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_is_used_on_seaweedfs() {
    retention_keeps_what_is_used("RECACHE_TEST_S3_SEAWEED").await;
}
