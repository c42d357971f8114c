//! `recache serve` as clients see it over the wire, for what the shared interop suites do not
//! cover: hostile and malformed requests, compressed and offset transfers, dangling action
//! results, limits, authentication, restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use hashing::Digest;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient, compressor,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use server::{CacheServer, ServerOptions};
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    server: CacheServer,
    dir_path: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    fn dir(&self) -> &std::path::Path {
        &self.dir_path
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.handle).await;
    }
}

async fn start_at(options: ServerOptions, dir: Option<tempfile::TempDir>) -> Running {
    let dir_path = options.storage.clone();
    let server = CacheServer::open(options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = server.clone();
    let handle = tokio::spawn(async move {
        let server = serving;
        server
            .serve(listener, async {
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
    Running {
        server,
        dir_path,
        _dir: dir,
        channel,
        stop: Some(tx),
        handle,
    }
}

async fn start_with(tweak: impl FnOnce(&mut ServerOptions)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::new(dir.path());
    tweak(&mut options);
    start_at(options, Some(dir)).await
}

/// Stops `r`, removes `gone` from its store (what an eviction or a lost file does), and starts
/// it again on the same storage.
async fn restart_without(r: Running, dir: &std::path::Path, gone: &[Digest]) -> Running {
    r.stop().await;
    let store = store::LocalStore::open(server_store_options(dir)).unwrap();
    assert_eq!(store.remove(gone).unwrap(), gone.len() as u64);
    drop(store);
    start_at(ServerOptions::new(dir), None).await
}

/// How recache serve opens its store (compressed at rest), for tests that look inside it.
fn server_store_options(storage: &std::path::Path) -> store::LocalStoreOptions {
    let mut o = store::LocalStoreOptions::new(storage.join("store"));
    o.pool_compression = store::PoolCompression::Zstd;
    o.write_behind = false;
    o
}

/// Bytes of the pool files under `storage`.
fn pool_bytes(storage: &std::path::Path) -> u64 {
    let mut total = 0;
    for shard in std::fs::read_dir(storage.join("store/large"))
        .unwrap()
        .flatten()
    {
        if shard.path().is_dir() {
            for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                total += f.metadata().unwrap().len();
            }
        }
    }
    total
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    testutil::data::pseudo_random(len, seed)
}

fn cas(r: &Running) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(r.channel.clone()).max_decoding_message_size(16 << 20)
}

async fn missing(r: &Running, d: Digest) -> bool {
    let resp = cas(r)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            blob_digests: vec![d.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    !resp.missing_blob_digests.is_empty()
}

/// Writes `chunks` (already encoded as they go on the wire) to `resource`.
async fn write(r: &Running, resource: &str, chunks: Vec<Vec<u8>>) -> Result<i64, tonic::Status> {
    let mut offset = 0i64;
    let n = chunks.len();
    let msgs: Vec<WriteRequest> = chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let m = WriteRequest {
                resource_name: if i == 0 {
                    resource.to_owned()
                } else {
                    String::new()
                },
                write_offset: offset,
                finish_write: i + 1 == n,
                data: c.clone(),
            };
            offset += c.len() as i64;
            m
        })
        .collect();
    ByteStreamClient::new(r.channel.clone())
        .write(futures::stream::iter(msgs))
        .await
        .map(|resp| resp.into_inner().committed_size)
}

async fn read(
    r: &Running,
    resource: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = ByteStreamClient::new(r.channel.clone())
        .read(ReadRequest {
            resource_name: resource.to_owned(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.extend_from_slice(&msg?.data);
    }
    Ok(out)
}

fn blob_resource(d: Digest) -> String {
    format!("blobs/{}/{}", d.hash, d.size_bytes)
}

#[tokio::test]
async fn a_corrupted_upload_is_refused_and_nothing_is_stored() {
    let r = start_with(|_| {}).await;
    let good = data(100_000, 1);
    let d = Digest::of_bytes(&good);
    let mut bad = good.clone();
    bad[500] ^= 1;
    // Batch: a per-blob INVALID_ARGUMENT.
    let resp = cas(&r)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: bad.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        Code::InvalidArgument as i32
    );
    assert!(missing(&r, d).await);
    // ByteStream, large: streamed into a temp file, refused at the end, never visible.
    let big = data(3 * 1024 * 1024, 2);
    let bd = Digest::of_bytes(&big);
    let mut big_bad = big.clone();
    big_bad[2_000_000] ^= 1;
    let err = write(
        &r,
        &format!("uploads/u1/{}", blob_resource(bd)),
        big_bad.chunks(1024 * 1024).map(<[u8]>::to_vec).collect(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(missing(&r, bd).await);
    // Too long: refused before it is all written.
    let mut long = big.clone();
    long.extend_from_slice(b"extra");
    let err = write(&r, &format!("uploads/u2/{}", blob_resource(bd)), vec![long])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(missing(&r, bd).await);
    // The right bytes go in.
    let committed = write(
        &r,
        &format!("uploads/u3/{}", blob_resource(bd)),
        big.chunks(1024 * 1024).map(<[u8]>::to_vec).collect(),
    )
    .await
    .unwrap();
    assert_eq!(committed, bd.size_bytes as i64);
    assert!(!missing(&r, bd).await);
    // Writing it again ends at once with the full size.
    let again = write(
        &r,
        &format!("uploads/u4/{}", blob_resource(bd)),
        vec![big[..10].to_vec()],
    )
    .await
    .unwrap();
    assert_eq!(again, bd.size_bytes as i64);
    r.stop().await;
}

#[tokio::test]
async fn multi_frame_compressed_writes_and_offset_reads() {
    let r = start_with(|_| {}).await;
    // Text-like, so it compresses; 3 MiB + change, so reads cross 1 MiB chunk boundaries.
    let mut content = Vec::new();
    let mut i = 0u64;
    while content.len() < 3 * 1024 * 1024 + 12_345 {
        content.extend_from_slice(format!("line {i:09} of some build output\n").as_bytes());
        i += 1;
    }
    let d = Digest::of_bytes(&content);
    // One zstd frame per 256 KiB chunk, as Bazel sends them; the chunks of the compressed
    // stream are cut at arbitrary points.
    let mut stream = Vec::new();
    for part in content.chunks(256 * 1024) {
        stream.extend(zstd::bulk::compress(part, 3).unwrap());
    }
    let committed = write(
        &r,
        &format!(
            "uploads/z/compressed-blobs/zstd/{}/{}",
            d.hash, d.size_bytes
        ),
        stream.chunks(77_777).map(<[u8]>::to_vec).collect(),
    )
    .await
    .unwrap();
    assert_eq!(committed, -1, "a compressed write reports -1 (REAPI)");
    assert!(!missing(&r, d).await);
    // Kept compressed at rest: the pool file is a fraction of the blob.
    let stored = pool_bytes(r.dir());
    assert!(
        stored * 2 < d.size_bytes,
        "{stored} bytes on disk for {} logical",
        d.size_bytes
    );
    // Plain reads at offsets across chunk boundaries.
    let res = blob_resource(d);
    assert_eq!(read(&r, &res, 0, 0).await.unwrap(), content);
    for (offset, limit) in [(1024 * 1024 - 10, 100), (2 * 1024 * 1024 + 5, 0), (7, 1)] {
        let got = read(&r, &res, offset, limit).await.unwrap();
        let start = offset as usize;
        let end = if limit == 0 {
            content.len()
        } else {
            start + limit as usize
        };
        assert_eq!(got, &content[start..end], "offset {offset} limit {limit}");
    }
    // Past the end is OUT_OF_RANGE; the end itself is an empty read.
    let err = read(&r, &res, d.size_bytes as i64 + 1, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        read(&r, &res, d.size_bytes as i64, 0)
            .await
            .unwrap()
            .is_empty()
    );
    // A compressed read decodes to the same bytes.
    let z = read(
        &r,
        &format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes),
        0,
        0,
    )
    .await
    .unwrap();
    assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), content);
    assert!(
        z.len() as u64 <= stored,
        "the stored frames are sent as they are"
    );
    // Garbage in a compressed upload is refused.
    let other = b"other".to_vec();
    let od = Digest::of_bytes(&other);
    let err = write(
        &r,
        &format!(
            "uploads/g/compressed-blobs/zstd/{}/{}",
            od.hash, od.size_bytes
        ),
        vec![b"not zstd at all".to_vec()],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(missing(&r, od).await);
    // Batches: zstd in, zstd out when asked.
    let small = content[..100_000].to_vec();
    let sd = Digest::of_bytes(&small);
    cas(&r)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(sd.into()),
                data: zstd::bulk::compress(&small, 1).unwrap(),
                compressor: compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let resp = cas(&r)
        .batch_read_blobs(remexec::BatchReadBlobsRequest {
            digests: vec![sd.into()],
            acceptable_compressors: vec![compressor::Value::Zstd as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = &resp.responses[0];
    assert_eq!(got.compressor, compressor::Value::Zstd as i32);
    assert_eq!(zstd::stream::decode_all(&got.data[..]).unwrap(), small);
    r.stop().await;
}

#[tokio::test]
async fn bad_requests_name_what_is_wrong() {
    let r = start_with(|o| {
        o.instance_names = vec!["main".into()];
        o.max_blob_size = 1024 * 1024;
    })
    .await;
    let d = Digest::of_bytes(b"x");
    for (resource, why) in [
        (format!("main/blobs/{}", d.hash), "<hash>/<size>"),
        (format!("main/blobs/{}/x", d.hash), "resource_name"),
        (
            format!("main/blobs/{}/1", &d.hash.to_hex()[..10]),
            "resource_name",
        ),
        ("main/nothing".to_owned(), "blobs"),
        (
            format!("other/blobs/{}/1", d.hash),
            "instance_name \"other\"",
        ),
    ] {
        let err = read(&r, &resource, 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{resource}");
        assert!(err.message().contains(why), "{resource}: {}", err.message());
    }
    let err = read(&r, &format!("main/blobs/{}/1", d.hash), -1, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    // Wrong instance on the CAS, a malformed digest field.
    let err = cas(&r)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            instance_name: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = cas(&r)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            instance_name: "main".into(),
            blob_digests: vec![remexec::Digest {
                hash: "nothex".into(),
                size_bytes: 1,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("blob_digests[0]"),
        "{}",
        err.message()
    );
    // A blob above --max-blob-size is refused before anything is written.
    let big = data(2 * 1024 * 1024, 3);
    let bd = Digest::of_bytes(&big);
    let err = write(
        &r,
        &format!("main/uploads/u/{}", blob_resource(bd)),
        vec![big],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    r.stop().await;
}

#[tokio::test]
async fn an_action_result_whose_outputs_are_gone_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let r = start_at(ServerOptions::new(dir.path()), None).await;
    let out = data(2000, 4);
    let od = Digest::of_bytes(&out);
    cas(&r)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(od.into()),
                data: out,
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let action = Digest::of_bytes(b"an action");
    let ar = remexec::ActionResult {
        output_files: vec![remexec::OutputFile {
            path: "out".into(),
            digest: Some(od.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut ac = ActionCacheClient::new(r.channel.clone());
    ac.update_action_result(remexec::UpdateActionResultRequest {
        action_digest: Some(action.into()),
        action_result: Some(ar.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let get = remexec::GetActionResultRequest {
        action_digest: Some(action.into()),
        ..Default::default()
    };
    assert_eq!(
        ac.get_action_result(get.clone())
            .await
            .unwrap()
            .into_inner(),
        ar
    );
    // Restart: the entry and the blob survive.
    r.stop().await;
    let r = start_at(ServerOptions::new(dir.path()), None).await;
    let mut ac = ActionCacheClient::new(r.channel.clone());
    assert_eq!(
        ac.get_action_result(get.clone())
            .await
            .unwrap()
            .into_inner(),
        ar
    );
    // The output is lost (evicted, deleted): the entry is not served.
    let r = restart_without(r, dir.path(), &[od]).await;
    let mut ac = ActionCacheClient::new(r.channel.clone());
    let err = ac.get_action_result(get).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    r.stop().await;
}

#[tokio::test]
async fn a_bearer_token_is_required_when_set() {
    let r = start_with(|o| {
        o.tokens = vec![server::Token {
            token: "s3cret".into(),
            role: server::Role::Write,
            name: "ci".into(),
        }]
    })
    .await;
    let err = cas(&r)
        .find_missing_blobs(remexec::FindMissingBlobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(remexec::FindMissingBlobsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        cas(&r).find_missing_blobs(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut req = tonic::Request::new(remexec::FindMissingBlobsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    cas(&r).find_missing_blobs(req).await.unwrap();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_past_the_size_bound_keep_the_store_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::new(dir.path());
    options.max_size = 8 * 1024 * 1024;
    let r = start_at(options, None).await;
    let writes = (0..12u64).map(|i| {
        let blob = data(1024 * 1024, 100 + i);
        let d = Digest::of_bytes(&blob);
        let r = &r;
        async move { write(r, &format!("uploads/c{i}/{}", blob_resource(d)), vec![blob]).await }
    });
    let results = futures::future::join_all(writes).await;
    // With reservations, an upload that would take uploads-in-progress past the bound is
    // refused (RESOURCE_EXHAUSTED, retry later) rather than overfilling; the others land.
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        }
    }
    assert!(
        results.iter().filter(|r| r.is_ok()).count() >= 4,
        "{results:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.stop().await;
    let store = store::LocalStore::open(server_store_options(dir.path())).unwrap();
    let usage = store.usage();
    assert!(
        usage.total_bytes() <= 8 * 1024 * 1024,
        "12 MiB written into an 8 MiB bound: {usage:?}"
    );
    // How much is left depends on how the uploads interleaved (each reservation evicts for the
    // uploads then in flight); what must hold is the bound, and that the cache is not emptied.
    assert!(usage.total_blobs() >= 1, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_reserve_their_size_and_a_full_cache_says_so() {
    let r = start_with(|o| o.max_size = 5 * 1024 * 1024).await;
    // Two 2 MiB uploads in progress hold 4 MiB of the 5 MiB bound.
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| data(2 * 1024 * 1024, 200 + i)).collect();
    let mut open = Vec::new();
    for (i, blob) in blobs.iter().take(2).enumerate() {
        let d = Digest::of_bytes(blob);
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let mut client = ByteStreamClient::new(r.channel.clone());
        let call = tokio::spawn(async move {
            client
                .write(futures::stream::poll_fn({
                    let mut rx = rx;
                    move |cx| rx.poll_recv(cx)
                }))
                .await
                .map(|resp| resp.into_inner().committed_size)
        });
        tx.send(WriteRequest {
            resource_name: format!("uploads/r{i}/{}", blob_resource(d)),
            write_offset: 0,
            finish_write: false,
            data: blob[..1024 * 1024].to_vec(),
        })
        .await
        .unwrap();
        open.push((tx, call, blob.clone()));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third would need 6 MiB: refused while the two are in flight, with nothing to evict.
    let third = &blobs[2];
    let td = Digest::of_bytes(third);
    let err = write(
        &r,
        &format!("uploads/r2/{}", blob_resource(td)),
        vec![third.clone()],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("in progress"), "{}", err.message());
    // The two finish; their reservations become stored bytes.
    for (tx, call, blob) in open {
        tx.send(WriteRequest {
            resource_name: String::new(),
            write_offset: 1024 * 1024,
            finish_write: true,
            data: blob[1024 * 1024..].to_vec(),
        })
        .await
        .unwrap();
        drop(tx);
        assert_eq!(call.await.unwrap().unwrap(), 2 * 1024 * 1024);
    }
    // Now the third fits by evicting the least recently used of them.
    write(
        &r,
        &format!("uploads/r3/{}", blob_resource(td)),
        vec![third.clone()],
    )
    .await
    .unwrap();
    assert!(!missing(&r, td).await);
    r.stop().await;
}

async fn write_status(r: &Running, resource: &str) -> (i64, bool) {
    let s = ByteStreamClient::new(r.channel.clone())
        .query_write_status(reapi::google::bytestream::QueryWriteStatusRequest {
            resource_name: resource.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    (s.committed_size, s.complete)
}

/// Sends `msgs` as one Write call.
async fn write_msgs(r: &Running, msgs: Vec<WriteRequest>) -> Result<i64, tonic::Status> {
    ByteStreamClient::new(r.channel.clone())
        .write(futures::stream::iter(msgs))
        .await
        .map(|resp| resp.into_inner().committed_size)
}

#[tokio::test]
async fn a_broken_upload_resumes_where_it_stopped() {
    let r = start_with(|_| {}).await;
    let blob = data(3 << 20, 40);
    let d = Digest::of_bytes(&blob);
    let name = format!("uploads/6b1a7c52-resume/{}", blob_resource(d));
    let msg = |from: usize, to: usize, finish: bool| WriteRequest {
        resource_name: name.clone(),
        write_offset: from as i64,
        finish_write: finish,
        data: blob[from..to].to_vec(),
    };

    // A stream that ends after 1 MiB without finish_write: refused, nothing visible, but the
    // bytes are kept for a resume.
    let e = write_msgs(&r, vec![msg(0, 1 << 20, false)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("resume at write_offset 1048576"),
        "{}",
        e.message()
    );
    assert_eq!(write_status(&r, &name).await, (1 << 20, false));
    assert!(missing(&r, d).await, "a paused upload must not be visible");

    // A call cancelled mid-stream (the client goes away): also paused, at what arrived.
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
    let mut client = ByteStreamClient::new(r.channel.clone());
    let call = tokio::spawn(async move {
        client
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(msg(1 << 20, 2 << 20, false)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Once the call has taken the paused upload it is in progress (not paused: 0).
    while write_status(&r, &name).await.0 != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the resume never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    call.abort();
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (committed, complete) = write_status(&r, &name).await;
        assert!(!complete);
        if committed == 2 << 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "committed {committed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(missing(&r, d).await);

    // A resume at the wrong offset is refused and names the right one; the upload survives it.
    let e = write_msgs(&r, vec![msg(1 << 20, 3 << 20, true)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("resume at 2097152"), "{}", e.message());

    // The right offset finishes it: the blob verifies and reads back whole.
    let done = write_msgs(&r, vec![msg(2 << 20, 3 << 20, true)])
        .await
        .unwrap();
    assert_eq!(done, 3 << 20);
    assert_eq!(write_status(&r, &name).await, (3 << 20, true));
    assert_eq!(read(&r, &blob_resource(d), 0, 0).await.unwrap(), blob);

    // Resuming something never started is refused with a way forward.
    let other = format!("uploads/other/{}", blob_resource(Digest::of_bytes(b"x")));
    let e = write_msgs(
        &r,
        vec![WriteRequest {
            resource_name: other,
            write_offset: 5,
            finish_write: true,
            data: b"x".to_vec(),
        }],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("start at 0"), "{}", e.message());
    r.stop().await;
}

#[tokio::test]
async fn blobs_a_client_was_told_exist_outlive_older_unmentioned_ones() {
    // Room for two 400 kB blobs, not three.
    let r = start_with(|o| o.max_size = 1_000_000).await;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| data(400_000, 500 + i)).collect();
    let ds: Vec<Digest> = blobs.iter().map(|b| Digest::of_bytes(b)).collect();
    for (i, b) in blobs.iter().take(2).enumerate() {
        let name = format!("uploads/lru{i}/{}", blob_resource(ds[i]));
        write(&r, &name, vec![b.clone()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The client asks about the older one (it will reference it rather than upload it).
    assert!(!missing(&r, ds[0]).await);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let name = format!("uploads/lru2/{}", blob_resource(ds[2]));
    write(&r, &name, vec![blobs[2].clone()]).await.unwrap();
    assert!(
        !missing(&r, ds[0]).await,
        "the blob FindMissingBlobs vouched for was evicted"
    );
    assert!(
        missing(&r, ds[1]).await,
        "the least recently used blob should have gone"
    );
    assert!(!missing(&r, ds[2]).await);
    r.stop().await;
}

/// Issue 28 item 1: a blob that does not compress is stored plain, and a client can make one
/// whose last bytes are a well-formed seek table. How a blob is stored is recorded in its file
/// name, so every read path gives back exactly the uploaded bytes.
#[tokio::test]
async fn a_plain_blob_that_looks_framed_reads_back_as_itself() {
    let r = start_with(|_| {}).await;
    let forged = testutil::data::forged_framed_blob(1024 * 1024);
    let d = Digest::of_bytes(&forged);
    write(
        &r,
        &format!("uploads/f/blobs/{}/{}", d.hash, d.size_bytes),
        forged.chunks(100_000).map(<[u8]>::to_vec).collect(),
    )
    .await
    .unwrap();
    // A second forgery, uploaded by batch.
    let mut other = testutil::data::forged_framed_blob(1024 * 1024);
    other[0] ^= 1;
    let od = Digest::of_bytes(&other);
    put_blobs(&r, std::slice::from_ref(&other)).await;

    for (d, content) in [(d, &forged), (od, &other)] {
        let res = blob_resource(d);
        assert_eq!(&read(&r, &res, 0, 0).await.unwrap(), content, "whole read");
        let ranged = read(&r, &res, 1000, 5000).await.unwrap();
        assert_eq!(ranged, &content[1000..6000], "ranged read");
        let batch = cas(&r)
            .batch_read_blobs(remexec::BatchReadBlobsRequest {
                digests: vec![d.into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&batch.responses[0].data, content, "batch read");
        let zres = format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
        let z = read(&r, &zres, 0, 0).await.unwrap();
        assert_eq!(
            &zstd::stream::decode_all(&z[..]).expect("a compressed read is zstd"),
            content,
            "compressed read"
        );
    }
    r.stop().await;
}

/// A stored file damaged on disk (here: a plain pool file cut short) is DATA_LOSS, never OK with
/// other bytes, and is evicted so that the next upload replaces it.
#[tokio::test]
async fn a_damaged_stored_blob_is_data_loss_and_evicted() {
    use std::os::unix::fs::PermissionsExt;
    let r = start_with(|_| {}).await;
    let content = data(2 * 1024 * 1024, 77);
    let d = Digest::of_bytes(&content);
    let upload = format!("uploads/a/blobs/{}/{}", d.hash, d.size_bytes);
    write(&r, &upload, vec![content.clone()]).await.unwrap();
    let hex = d.hash.to_hex();
    let file = r
        .dir()
        .join(format!("store/large/{}/{hex}-{}", &hex[..2], d.size_bytes));
    assert!(
        file.is_file(),
        "random bytes are stored plain, under the plain name"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(d.size_bytes - 1).unwrap();
    drop(f);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();

    let err = read(&r, &blob_resource(d), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(missing(&r, d).await, "the damaged copy was evicted");
    write(&r, &upload, vec![content.clone()]).await.unwrap();
    assert_eq!(read(&r, &blob_resource(d), 0, 0).await.unwrap(), content);
    r.stop().await;
}

/// Text-like bytes: the writer compresses them, so it is slower than the network and the
/// `Write` handler waits on its channel (where a cancelled call used to lose a message).
fn text_blob(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = seed;
    while v.len() < len {
        v.extend_from_slice(format!("{i:016x} some build output line\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// Issue 28 item 2: a Write cancelled while the server waits to hand a message to its writer
/// used to count that message anyway, so QueryWriteStatus ran ahead of what the writer held and
/// the resume ended "truncated". committed_size is now what the writer took: every resume at
/// the reported offset completes and the blob reads back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_mid_send_resumes_at_what_the_writer_holds() {
    let r = start_with(|_| {}).await;
    for round in 0..5u64 {
        let blob = text_blob(48 << 20, round * 1_000_000);
        let d = Digest::of_bytes(&blob);
        let name = format!("uploads/cancel-{round}/{}", blob_resource(d));
        let chunk = 256 * 1024;
        let msgs: Vec<WriteRequest> = blob
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| WriteRequest {
                resource_name: name.clone(),
                write_offset: (i * chunk) as i64,
                finish_write: false,
                data: c.to_vec(),
            })
            .collect();
        // Sends as fast as the server takes them and never finishes: cancelled mid-stream.
        let mut client = ByteStreamClient::new(r.channel.clone());
        let call = tokio::spawn(async move {
            client
                .write(futures::stream::iter(msgs).chain(futures::stream::pending()))
                .await
        });
        tokio::time::sleep(Duration::from_millis(60 + 15 * round)).await;
        call.abort();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let committed = loop {
            let (committed, complete) = write_status(&r, &name).await;
            assert!(!complete, "round {round}");
            if committed > 0 {
                break committed;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: never paused"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let rest: Vec<WriteRequest> = blob[committed as usize..]
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| WriteRequest {
                resource_name: name.clone(),
                write_offset: committed + (i << 20) as i64,
                finish_write: committed as usize + (i << 20) + c.len() == blob.len(),
                data: c.to_vec(),
            })
            .collect();
        let done = write_msgs(&r, rest)
            .await
            .unwrap_or_else(|e| panic!("round {round}: resume at {committed}: {e:?}"));
        assert_eq!(done, d.size_bytes as i64);
        assert_eq!(read(&r, &blob_resource(d), 0, 0).await.unwrap(), blob);
    }
    r.stop().await;
}

/// Issue 28 item 5: upload A of a blob is active, upload B of the same blob sends everything
/// and waits for A's writer (which holds the blob's write lock); then A's client goes away.
/// A used to be paused, lock held, and B answered only when the pause expired (121 s). Now A
/// is abandoned because B is active, and B commits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_upload_never_waits_behind_a_paused_one() {
    let r = start_with(|_| {}).await;
    let blob = data(4 << 20, 55);
    let d = Digest::of_bytes(&blob);
    let a_name = format!("uploads/a/{}", blob_resource(d));
    let b_name = format!("uploads/b/{}", blob_resource(d));
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
    let mut a_client = ByteStreamClient::new(r.channel.clone());
    let a = tokio::spawn(async move {
        a_client
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(WriteRequest {
        resource_name: a_name.clone(),
        write_offset: 0,
        finish_write: false,
        data: blob[..1 << 20].to_vec(),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = {
        let msgs: Vec<WriteRequest> = blob
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| WriteRequest {
                resource_name: b_name.clone(),
                write_offset: (i << 20) as i64,
                finish_write: (i + 1) << 20 >= blob.len(),
                data: c.to_vec(),
            })
            .collect();
        let mut client = ByteStreamClient::new(r.channel.clone());
        tokio::spawn(async move { client.write(futures::stream::iter(msgs)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "B waits for A's writer while A is active");
    a.abort();
    drop(tx);
    let done = tokio::time::timeout(Duration::from_secs(30), b)
        .await
        .expect("B must not wait for A's pause to expire")
        .unwrap()
        .unwrap();
    assert_eq!(done.into_inner().committed_size, d.size_bytes as i64);
    assert_eq!(read(&r, &blob_resource(d), 0, 0).await.unwrap(), blob);
    r.stop().await;
}

/// Minor item of issue 28: an upload whose every byte arrived but whose stream ended without
/// finish_write is told "nothing was stored"; that stays true when the paused upload is
/// abandoned (it used to commit then), and a resume with finish_write completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_without_finish_write_is_never_committed_by_abandonment() {
    let r = start_with(|o| o.max_size = 7 << 20).await;
    let x = data(4 << 20, 61);
    let xd = Digest::of_bytes(&x);
    let x_name = format!("uploads/x/{}", blob_resource(xd));
    let e = write_msgs(
        &r,
        vec![WriteRequest {
            resource_name: x_name.clone(),
            write_offset: 0,
            finish_write: false,
            data: x.clone(),
        }],
    )
    .await
    .unwrap_err();
    assert!(
        e.message().contains("nothing was stored"),
        "{}",
        e.message()
    );
    assert_eq!(write_status(&r, &x_name).await, (4 << 20, false));
    // Another 4 MiB upload needs the paused one's room: it is abandoned, and stores nothing.
    let y = data(4 << 20, 62);
    let yd = Digest::of_bytes(&y);
    write(
        &r,
        &format!("uploads/y/{}", blob_resource(yd)),
        vec![y.clone()],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(missing(&r, xd).await, "an abandoned upload stores nothing");
    assert!(!missing(&r, yd).await);
    assert_eq!(write_status(&r, &x_name).await, (0, false));

    // Paused again, then finished by a resume with finish_write and no more bytes.
    let e = write_msgs(
        &r,
        vec![WriteRequest {
            resource_name: x_name.clone(),
            write_offset: 0,
            finish_write: false,
            data: x.clone(),
        }],
    )
    .await;
    assert!(e.is_err());
    let done = write_msgs(
        &r,
        vec![WriteRequest {
            resource_name: x_name.clone(),
            write_offset: 4 << 20,
            finish_write: true,
            data: vec![],
        }],
    )
    .await
    .unwrap();
    assert_eq!(done, 4 << 20);
    assert_eq!(read(&r, &blob_resource(xd), 0, 0).await.unwrap(), x);
    r.stop().await;
}

/// Bytes of committed pool files under `storage`, tolerating files removed while listing.
fn pool_bytes_now(storage: &std::path::Path) -> u64 {
    let mut total = 0;
    let Ok(shards) = std::fs::read_dir(storage.join("store/large")) else {
        return 0;
    };
    for shard in shards.flatten() {
        if let Ok(files) = std::fs::read_dir(shard.path()) {
            for f in files.flatten() {
                total += f.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// `uploaders` clients upload distinct 1–3 MiB blobs in a loop (`total` in all) into a 64 MiB
/// store. Returns (stored, refused, the most bytes the store counted as stored, or stored plus
/// reserved, while they ran). The bound is checked on the store's own books while they run (a
/// directory walk under churn can count a file being evicted and its replacement both) and on
/// disk once they are done.
async fn upload_storm(uploaders: usize, total: usize) -> (usize, Vec<String>, u64) {
    const MAX: u64 = 64 << 20;
    let r = start_with(|o| o.max_size = MAX).await;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let refused = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (store, stop) = (r.server.store().clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let room = store.room();
                most = most.max(room.stored + room.reserved);
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let workers = (0..uploaders).map(|_| {
        let (next, refused, channel) = (next.clone(), refused.clone(), r.channel.clone());
        async move {
            let mut stored = 0;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return stored;
                }
                let len = (1 << 20) + (i * 700_001) % (2 << 20);
                let blob = data(len, 10_000 + i as u64);
                let d = Digest::of_bytes(&blob);
                let msgs: Vec<WriteRequest> = blob
                    .chunks(1 << 20)
                    .enumerate()
                    .map(|(k, c)| WriteRequest {
                        resource_name: format!("uploads/s{i}/{}", blob_resource(d)),
                        write_offset: (k << 20) as i64,
                        finish_write: (k << 20) + c.len() == blob.len(),
                        data: c.to_vec(),
                    })
                    .collect();
                match ByteStreamClient::new(channel.clone())
                    .write(futures::stream::iter(msgs))
                    .await
                {
                    Ok(_) => stored += 1,
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        refused.lock().unwrap().push(e.message().to_owned());
                    }
                    Err(e) => panic!("upload {i}: {e:?}"),
                }
            }
        }
    });
    let stored: usize =
        tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(workers))
            .await
            .expect("the uploads finish")
            .into_iter()
            .sum();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watcher.await.unwrap();
    let dir = r.dir().to_path_buf();
    r.stop().await;
    let refused = std::mem::take(&mut *refused.lock().unwrap());
    assert!(
        most <= MAX,
        "stored plus reserved reached {most} bytes, over the {MAX} bound"
    );
    let on_disk = pool_bytes_now(&dir);
    assert!(
        on_disk <= MAX,
        "{on_disk} bytes on disk, over the {MAX} bound"
    );
    let counted = store::LocalStore::open(server_store_options(&dir))
        .unwrap()
        .usage()
        .total_bytes();
    assert_eq!(on_disk, counted, "the books agree with the disk");
    (stored, refused, most)
}

/// Issue 28 item 3: concurrent uploads that each fit after eviction were refused (an upload
/// finishing during a reservation was counted twice: stored, and still reserved). Every upload
/// now lands, whatever the concurrency, and the store stays within its bound. Uploader counts
/// can be set with RECACHE_UPLOAD_STORM (e.g. `1,2,4,16`) to compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_that_fit_after_eviction_are_never_refused() {
    let counts: Vec<usize> = std::env::var("RECACHE_UPLOAD_STORM")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![4, 16]);
    for uploaders in counts {
        let total = 96.max(uploaders * 6);
        let (stored, refused, most) = upload_storm(uploaders, total).await;
        eprintln!(
            "{uploaders} uploaders: {stored} stored, {} refused, stored+reserved peak {most} bytes",
            refused.len()
        );
        assert!(
            refused.is_empty(),
            "{uploaders} uploaders: {} of {total} refused, e.g. {:?}",
            refused.len(),
            refused.first()
        );
        assert_eq!(stored, total);
    }
}

/// Issue 28 item 6: re-sending a stored blob by BatchUpdateBlobs must not reserve room for it
/// again (which evicted an unrelated blob in a full store).
#[tokio::test]
async fn resending_a_stored_blob_by_batch_evicts_nothing() {
    let r = start_with(|o| o.max_size = 64 << 20).await;
    let big: Vec<Vec<u8>> = (0..3).map(|i| data(20 << 20, 300 + i)).collect();
    for b in &big {
        let d = Digest::of_bytes(b);
        write(
            &r,
            &format!("uploads/big/{}", blob_resource(d)),
            b.chunks(1 << 20).map(<[u8]>::to_vec).collect(),
        )
        .await
        .unwrap();
    }
    let p = data(3 << 20, 310);
    let pd = Digest::of_bytes(&p);
    let batch = || remexec::BatchUpdateBlobsRequest {
        requests: vec![remexec::batch_update_blobs_request::Request {
            digest: Some(pd.into()),
            data: p.clone(),
            compressor: 0,
        }],
        ..Default::default()
    };
    // 63 MiB in a 64 MiB store. (No FindMissingBlobs before the resend: it would count as a
    // use of the big blobs and make P the least recently used.)
    let first = cas(&r)
        .batch_update_blobs(batch())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.responses[0].status.as_ref().unwrap().code, 0);
    let again = cas(&r)
        .batch_update_blobs(batch())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.responses[0].status.as_ref().unwrap().code, 0);
    for b in &big {
        assert!(
            !missing(&r, Digest::of_bytes(b)).await,
            "sending a stored blob again evicted another"
        );
    }
    r.stop().await;
}

/// Uploads small blobs by batch.
async fn put_blobs(r: &Running, blobs: &[Vec<u8>]) {
    let resp = cas(r)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: blobs
                .iter()
                .map(|b| remexec::batch_update_blobs_request::Request {
                    digest: Some(Digest::of_bytes(b).into()),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for resp in resp.responses {
        assert_eq!(resp.status.unwrap().code, 0);
    }
}

/// Issue 28 item 4: a result naming its output directory by `root_directory_digest` only
/// (REAPI 2.3's DIRECTORY_ONLY) is accepted, and every Directory message under it counts: with
/// the root Directory or a nested one evicted, the entry is a miss, never a dangling hit. The
/// same holds for a Tree result whose Tree blob is gone; a result naming neither is refused.
#[tokio::test]
async fn directory_only_results_are_accepted_and_every_directory_counts() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let r = start_at(ServerOptions::new(dir.path()), None).await;
    let leaf = data(3000, 81);
    let leaf_d = Digest::of_bytes(&leaf);
    let sub = remexec::Directory {
        files: vec![remexec::FileNode {
            name: "f".into(),
            digest: Some(leaf_d.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let sub_bytes = sub.encode_to_vec();
    let sub_d = Digest::of_bytes(&sub_bytes);
    let root = remexec::Directory {
        directories: vec![remexec::DirectoryNode {
            name: "sub".into(),
            digest: Some(sub_d.into()),
        }],
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    let root_d = Digest::of_bytes(&root_bytes);
    let tree = remexec::Tree {
        root: Some(root.clone()),
        children: vec![sub.clone()],
    };
    let tree_bytes = tree.encode_to_vec();
    let tree_d = Digest::of_bytes(&tree_bytes);
    put_blobs(
        &r,
        &[
            leaf.clone(),
            sub_bytes.clone(),
            root_bytes.clone(),
            tree_bytes.clone(),
        ],
    )
    .await;

    let mut ac = ActionCacheClient::new(r.channel.clone());
    let result = |tree: Option<Digest>, root: Option<Digest>| remexec::ActionResult {
        output_directories: vec![remexec::OutputDirectory {
            path: "out".into(),
            tree_digest: tree.map(Into::into),
            root_directory_digest: root.map(Into::into),
            ..Default::default()
        }],
        ..Default::default()
    };
    let put = |action: &str, ar: remexec::ActionResult| remexec::UpdateActionResultRequest {
        action_digest: Some(Digest::of_bytes(action.as_bytes()).into()),
        action_result: Some(ar),
        ..Default::default()
    };
    let get = |action: &str| remexec::GetActionResultRequest {
        action_digest: Some(Digest::of_bytes(action.as_bytes()).into()),
        ..Default::default()
    };
    let err = ac
        .update_action_result(put("neither", result(None, None)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("root_directory_digest"),
        "{}",
        err.message()
    );
    for (action, ar) in [
        ("dir-only", result(None, Some(root_d))),
        ("tree-only", result(Some(tree_d), None)),
        ("both", result(Some(tree_d), Some(root_d))),
    ] {
        ac.update_action_result(put(action, ar.clone()))
            .await
            .unwrap_or_else(|e| panic!("{action}: {e}"));
        assert_eq!(
            ac.get_action_result(get(action))
                .await
                .unwrap()
                .into_inner(),
            ar
        );
    }

    // Evict only the nested Directory: DIRECTORY_ONLY and "both" must miss; the Tree form
    // carries its own copy of every Directory and still hits.
    let r = restart_without(r, dir.path(), &[sub_d]).await;
    let mut ac = ActionCacheClient::new(r.channel.clone());
    for action in ["dir-only", "both"] {
        let err = ac.get_action_result(get(action)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{action}: {err}");
    }
    ac.get_action_result(get("tree-only")).await.unwrap();

    // Put it back, then evict only the root Directory: again a miss, never a dangling hit.
    put_blobs(&r, std::slice::from_ref(&sub_bytes)).await;
    ac.update_action_result(put("dir-only", result(None, Some(root_d))))
        .await
        .unwrap();
    ac.get_action_result(get("dir-only")).await.unwrap();
    let r = restart_without(r, dir.path(), &[root_d]).await;
    let mut ac = ActionCacheClient::new(r.channel.clone());
    let err = ac.get_action_result(get("dir-only")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    r.stop().await;
}

/// Every page GetTree streams for `root`, from `token`, with `page_size`.
async fn tree_pages(
    r: &Running,
    root: Digest,
    token: &str,
    page_size: i32,
) -> Result<Vec<remexec::GetTreeResponse>, tonic::Status> {
    let mut stream = cas(r)
        .get_tree(remexec::GetTreeRequest {
            root_digest: Some(root.into()),
            page_token: token.to_owned(),
            page_size,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(p) = stream.next().await {
        pages.push(p?);
    }
    Ok(pages)
}

/// Issue 28 item 7: GetTree paged by count only, so 1 000 directories of 60 files each (≈ 6 MB)
/// failed with "encoded message length too large". Pages are now bounded in bytes too, every
/// page comes in the one call, each fits a client's default 4 MiB, and page_size is honoured.
#[tokio::test]
async fn get_tree_pages_large_trees_by_bytes_and_honours_page_size() {
    use prost::Message;
    let r = start_with(|_| {}).await;
    let file = Digest::of_bytes(b"shared content");
    let mut subdirs = Vec::new();
    let mut blobs = Vec::new();
    for i in 0..1000 {
        let dir = remexec::Directory {
            files: (0..60)
                .map(|j| remexec::FileNode {
                    name: format!("generated_source_file_number_{j:03}_of_directory_{i:04}.rs"),
                    digest: Some(file.into()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let bytes = dir.encode_to_vec();
        subdirs.push(remexec::DirectoryNode {
            name: format!("d{i:04}"),
            digest: Some(Digest::of_bytes(&bytes).into()),
        });
        blobs.push(bytes);
    }
    let root = remexec::Directory {
        directories: subdirs,
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    let root_d = Digest::of_bytes(&root_bytes);
    blobs.push(root_bytes);
    let total: usize = blobs.iter().map(Vec::len).sum();
    assert!(total > 5 << 20, "the tree is {total} bytes");
    for batch in blobs.chunks(400) {
        put_blobs(&r, batch).await;
    }

    let pages = tree_pages(&r, root_d, "", 0).await.unwrap();
    assert!(pages.len() >= 2, "{} pages", pages.len());
    let mut names = HashSet::new();
    for (i, p) in pages.iter().enumerate() {
        assert!(
            p.encoded_len() <= 4 << 20,
            "page {i}: {} bytes",
            p.encoded_len()
        );
        assert_eq!(p.next_page_token.is_empty(), i + 1 == pages.len());
        for d in &p.directories {
            assert!(names.insert(Digest::of_bytes(&d.encode_to_vec())));
        }
    }
    assert_eq!(names.len(), 1001, "every directory once");
    assert_eq!(pages[0].directories[0], root);

    // A client's page size; a token resumes after what was returned.
    let small = tree_pages(&r, root_d, "", 100).await.unwrap();
    assert_eq!(small.len(), 11);
    assert!(small.iter().take(10).all(|p| p.directories.len() == 100));
    let rest = tree_pages(&r, root_d, &small[0].next_page_token, 100)
        .await
        .unwrap();
    assert_eq!(rest.len(), 10);
    assert_eq!(rest[0].directories, small[1].directories);
    r.stop().await;
}

/// Issue 25 §5: a disk that fills before `--max-size`. On a 16 MiB tmpfs with `--max-size 1G`,
/// uploads used to fail with "No space left on device" once the disk was full. The server
/// keeps a reserve free on the filesystem: each upload evicts least-recently-used blobs when
/// it would not fit, so later uploads succeed, and nothing is ever answered INTERNAL.
#[test]
fn a_disk_that_fills_before_max_size_evicts_instead_of_failing() {
    testutil::tmpfs::with_small_tmpfs(16, |disk| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut options = ServerOptions::new(disk.join("server"));
            options.max_size = 1 << 30;
            let r = start_at(options, None).await;
            let mut last = None;
            for i in 0..24u64 {
                let blob = data(2 << 20, 9000 + i);
                let d = Digest::of_bytes(&blob);
                let chunks: Vec<Vec<u8>> = blob.chunks(1 << 20).map(<[u8]>::to_vec).collect();
                let resource = format!("uploads/u{i}/blobs/{}/{}", d.hash, d.size_bytes);
                match write(&r, &resource, chunks).await {
                    Ok(size) => assert_eq!(size, d.size_bytes as i64),
                    Err(e) => panic!("upload {i} of 2 MiB into a full 16 MiB disk: {e:?}"),
                }
                // Small blobs too (they go to the database).
                let small = data(20_000, 9500 + i);
                let sd = Digest::of_bytes(&small);
                let resp = cas(&r)
                    .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
                        requests: vec![remexec::batch_update_blobs_request::Request {
                            digest: Some(sd.into()),
                            data: small,
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let status = resp.responses[0].status.clone().unwrap_or_default();
                assert_eq!(status.code, 0, "batch upload {i}: {}", status.message);
                last = Some((d, blob));
            }
            let (d, blob) = last.unwrap();
            let back = read(&r, &format!("blobs/{}/{}", d.hash, d.size_bytes), 0, 0)
                .await
                .unwrap();
            assert_eq!(back, blob, "the newest upload reads back");
            r.stop().await;
        });
    });
}
