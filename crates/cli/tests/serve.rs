//! `recache serve` as an operator runs it: the real binary, killed with -9 in the middle of an
//! upload and restarted, and stopped with SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use reapi::build::bazel::remote::execution::v2::{
    self as remexec, content_addressable_storage_client::ContentAddressableStorageClient,
};
use reapi::google::bytestream::{WriteRequest, byte_stream_client::ByteStreamClient};

/// Starts `recache serve` on a free port; returns the child and its grpc address.
fn serve(storage: &Path) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_recache"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--storage"])
        .arg(storage);
    testutil::real_servers::spawn_serve(cmd)
}

async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(addr.replace("grpc://", "http://"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn is_missing(addr: &str, d: hashing::Digest) -> bool {
    let resp = ContentAddressableStorageClient::new(channel(addr).await)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            blob_digests: vec![d.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    !resp.missing_blob_digests.is_empty()
}

fn temp_files(storage: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(storage.join("store/large"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(".tmp-")
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_upload_then_restart_leaves_no_partial_blob() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let (mut child, addr) = serve(&storage);
    let blob = testutil::data::pseudo_random(8 * 1024 * 1024, 9);
    let d = hashing::Digest::of_bytes(&blob);
    let resource = format!("uploads/k/blobs/{}/{}", d.hash, d.size_bytes);

    // Send 3 MiB, then hold the stream open: the server is mid-write.
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(8);
    let mut client = ByteStreamClient::new(channel(&addr).await);
    let upload = tokio::spawn(async move {
        client
            .write(tokio_stream_from(rx))
            .await
            .map(|r| r.into_inner().committed_size)
    });
    for (i, chunk) in blob[..3 * 1024 * 1024].chunks(1024 * 1024).enumerate() {
        tx.send(WriteRequest {
            resource_name: if i == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: (i * 1024 * 1024) as i64,
            finish_write: false,
            data: chunk.to_vec(),
        })
        .await
        .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !temp_files(&storage)
        .iter()
        .any(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) >= 1024 * 1024)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never started writing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    drop(tx);
    assert!(
        upload.await.unwrap().is_err(),
        "the client sees the upload fail"
    );

    // Restart on the same storage: nothing partial is visible, the temp file is gone, and the
    // blob can be uploaded again.
    let (mut child, addr) = serve(&storage);
    assert!(
        is_missing(&addr, d).await,
        "a partial upload must never become visible"
    );
    assert!(
        temp_files(&storage).is_empty(),
        "{:?}",
        temp_files(&storage)
    );
    let msgs: Vec<WriteRequest> = blob
        .chunks(1024 * 1024)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 {
                resource.clone()
            } else {
                String::new()
            },
            write_offset: (i * 1024 * 1024) as i64,
            finish_write: (i + 1) * 1024 * 1024 >= blob.len(),
            data: c.to_vec(),
        })
        .collect();
    let committed = ByteStreamClient::new(channel(&addr).await)
        .write(futures::stream::iter(msgs))
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(committed, d.size_bytes as i64);
    assert!(!is_missing(&addr, d).await);

    // SIGTERM stops it cleanly.
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "recache serve exits 0 on SIGTERM: {status:?}"
    );
}

/// An mpsc receiver as a stream (without pulling in tokio-stream for one use).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `recache serve --storage s3://…` killed with -9 while a blob is going to the bucket in
/// parts, then restarted: the journal resumes (or the sweep aborts) the upload, so the blob ends
/// complete in the bucket and no multipart upload stays open under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_multipart_to_s3_then_restart_completes_or_aborts() {
    let endpoint = match std::env::var("RECACHE_TEST_S3_SEAWEED") {
        Ok(e) => e,
        Err(_) => {
            let msg = "RECACHE_TEST_S3_SEAWEED is not set: run scripts/s3-servers.sh start";
            assert!(!testutil::real_servers::in_ci(), "CI=true: {msg}");
            eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
            return;
        }
    };
    let (key, secret) = (
        std::env::var("RECACHE_TEST_S3_ACCESS_KEY").unwrap(),
        std::env::var("RECACHE_TEST_S3_SECRET_KEY").unwrap(),
    );
    let proxy = testutil::s3_proxy::S3Proxy::start(&endpoint).await;
    // 8 MiB/s to the bucket: the 40 MiB upload takes ~5 s, long enough to be cut.
    proxy
        .faults
        .upload_rate
        .store(8 << 20, std::sync::atomic::Ordering::Release);
    let prefix = format!("kill9-{}", uuid::Uuid::new_v4().simple());
    let mut o = server::s3::S3Options::new(Some(endpoint.clone()), "recache-test");
    o.credentials = Some((key.clone(), secret.clone()));
    o.prefix = format!("{prefix}/");
    let s3 = server::s3::S3Blobs::new(o).unwrap();
    s3.ensure_bucket().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |via: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_recache"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(dir.path())
            .args(["--storage", &format!("s3://recache-test/{prefix}")])
            .args(["--s3-endpoint", via, "--s3-sweep-grace", "0"])
            .args(["--s3-multipart-threshold", "5M"])
            .env("AWS_ACCESS_KEY_ID", &key)
            .env("AWS_SECRET_ACCESS_KEY", &secret);
        testutil::real_servers::spawn_serve(cmd)
    };
    let (mut child, addr) = start(&proxy.endpoint);
    let blob = testutil::data::pseudo_random(40 << 20, 77);
    let d = hashing::Digest::of_bytes(&blob);
    let msgs: Vec<WriteRequest> = blob
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 {
                format!("uploads/k/blobs/{}/{}", d.hash, d.size_bytes)
            } else {
                String::new()
            },
            write_offset: (i << 20) as i64,
            finish_write: (i + 1) << 20 >= blob.len(),
            data: c.to_vec(),
        })
        .collect();
    ByteStreamClient::new(channel(&addr).await)
        .write(futures::stream::iter(msgs))
        .await
        .expect("acknowledged once in the fast tier and journaled");
    // Wait for the multipart upload to be open in the bucket, let a part or two go, then kill.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s3.open_uploads(None).await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!s3.contains(d).await.unwrap(), "cut before it completed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !s3.open_uploads(None).await.unwrap().is_empty(),
        "left open by the kill"
    );

    // Restart without the slow link.
    let (mut child, _addr) = start(&endpoint);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open = s3.open_uploads(None).await.unwrap();
        if s3.contains(d).await.unwrap() && open.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after the restart: in bucket {}, open uploads {open:?}",
            s3.contains(d).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = dir.path().join("check");
    assert!(
        s3.get_to_file(d, &out).await.unwrap(),
        "complete and verified"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
