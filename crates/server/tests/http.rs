//! `recache serve --http-listen`: the HTTP/1.1 cache protocol, driven by curl (a real client)
//! for the edge cases, and checked against the gRPC face of the same server (one store, one
//! key space, one set of rules).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;

use hashing::Digest;
use prost::Message;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use server::{CacheServer, ServerOptions};
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    http: String,
    channel: Channel,
    server: CacheServer,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.handle).await;
    }
}

async fn start(tweak: impl FnOnce(&mut ServerOptions)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::new(dir.path());
    tweak(&mut options);
    let server = CacheServer::open(options).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = server.clone();
    let handle = tokio::spawn(async move {
        serving
            .serve_with_http(grpc, Some(http), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Running {
        http: format!("http://{http_addr}"),
        channel,
        server,
        _dir: dir,
        stop: Some(tx),
        handle,
    }
}

/// What curl got: the status of the last response, its headers (lower-cased names), its body.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs curl with `args` (the URL among them); `--max-time 10` unless the args set one.
async fn curl(args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-s", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"]);
    if !args.contains(&"--max-time") {
        cmd.args(["--max-time", "10"]);
    }
    let out = cmd.args(args).output().await.expect("curl is installed");
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let head = std::fs::read_to_string(&head).unwrap_or_default();
    // The last response's headers (a 100 Continue may come first).
    let last = head.trim_end().rsplit("\r\n\r\n").next().unwrap_or("");
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Got {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    format!("@{}", p.display())
}

fn cas(r: &Running) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(r.channel.clone())
}

async fn grpc_missing(r: &Running, d: Digest) -> bool {
    !cas(r)
        .find_missing_blobs(remexec::FindMissingBlobsRequest {
            blob_digests: vec![d.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .is_empty()
}

async fn grpc_put(r: &Running, data: &[u8]) -> Digest {
    let d = Digest::of_bytes(data);
    let resp = cas(r)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: data.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    d
}

/// Blobs go in and out over HTTP, whatever their size and coding, and over gRPC alike.
#[tokio::test(flavor = "multi_thread")]
async fn blobs_cross_between_http_and_grpc() {
    let r = start(|_| {}).await;
    let tmp = tempfile::tempdir().unwrap();
    for (len, seed) in [(0usize, 0u64), (11, 1), (100_000, 2), (3 << 20, 3)] {
        let data = testutil::data::pseudo_random(len, seed);
        let d = Digest::of_bytes(&data);
        let url = format!("{}/cas/{}", r.http, d.hash.to_hex());
        let put = curl(&[
            "-X",
            "PUT",
            "--data-binary",
            &file_with(tmp.path(), "b", &data),
            &url,
        ])
        .await;
        assert_eq!(put.status, 200, "PUT {len}: {}", put.text());
        let got = curl(&[&url]).await;
        assert_eq!(got.status, 200, "{len}");
        assert_eq!(got.body, data, "{len}: the bytes come back");
        assert_eq!(
            got.header("etag"),
            Some(format!("\"{}\"", d.hash.to_hex()).as_str())
        );
        let head = curl(&["-I", &url]).await;
        assert_eq!(head.status, 200);
        assert_eq!(
            head.header("content-length"),
            Some(len.to_string().as_str())
        );
        assert!(
            !grpc_missing(&r, d).await,
            "{len}: gRPC sees what HTTP stored"
        );
    }
    // The other way: stored over gRPC, read over HTTP.
    let data = b"written over grpc".to_vec();
    let d = grpc_put(&r, &data).await;
    let got = curl(&[&format!("{}/cas/{}", r.http, d.hash.to_hex())]).await;
    assert_eq!((got.status, got.body), (200, data));
    // Chunked transfer encoding: no length up front, still verified.
    let data = testutil::data::pseudo_random(700_000, 9);
    let d = Digest::of_bytes(&data);
    let put = curl(&[
        "-X",
        "PUT",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &file_with(tmp.path(), "c", &data),
        &format!("{}/cas/{}", r.http, d.hash.to_hex()),
    ])
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert!(!grpc_missing(&r, d).await);
    r.stop().await;
}

/// What curl can throw at it: each answered with the status that fits, and nothing partial or
/// wrong ever becomes visible.
#[tokio::test(flavor = "multi_thread")]
async fn curl_edge_cases() {
    let r = start(|o| {
        o.max_blob_size = 1 << 20;
        o.instance_names = vec![String::new(), "main".into()];
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let data = testutil::data::pseudo_random(200_000, 4);
    let d = Digest::of_bytes(&data);
    let url = format!("{}/cas/{}", r.http, d.hash.to_hex());

    // Content that does not hash to its key: refused, nothing stored.
    let mut wrong = data.clone();
    wrong[7] ^= 1;
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "w", &wrong),
        &url,
    ])
    .await;
    assert_eq!(put.status, 400, "{}", put.text());
    assert!(
        put.text().contains("does not match") || put.text().contains("hashes to"),
        "{}",
        put.text()
    );
    assert_eq!(curl(&[&url]).await.status, 404);
    assert!(grpc_missing(&r, d).await);

    // A body shorter than its Content-Length (the client gives up): nothing stored.
    let short = curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Content-Length: {}", data.len()),
        "--data-binary",
        &file_with(tmp.path(), "s", &data[..1000]),
        "--max-time",
        "2",
        &url,
    ])
    .await;
    assert_ne!(short.status, 200);
    assert_eq!(
        curl(&[&url]).await.status,
        404,
        "a short body leaves nothing"
    );

    // Larger than --max-blob-size: 413 from the Content-Length, before the body is read.
    let big = testutil::data::pseudo_random((1 << 20) + 1, 5);
    let big_d = Digest::of_bytes(&big);
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "big", &big),
        &format!("{}/cas/{}", r.http, big_d.hash.to_hex()),
    ])
    .await;
    assert_eq!(put.status, 413, "{}", put.text());

    // Stored properly, then read back in parts.
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "d", &data),
        &url,
    ])
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let part = curl(&["-r", "1000-1999", &url]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &data[1000..2000]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 1000-1999/{}", data.len()).as_str())
    );
    let past = curl(&["-r", "300000-", &url]).await;
    assert_eq!(past.status, 416);

    // 304 for the ETag the client has.
    let etag = format!("\"{}\"", d.hash.to_hex());
    let again = curl(&["-H", &format!("If-None-Match: {etag}"), &url]).await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    // zstd both ways: a compressible blob comes back as the stored frames, and a zstd PUT is
    // decoded (its size limit applies to the decoded bytes).
    let text = "recache over http ".repeat(50_000).into_bytes();
    let t = Digest::of_bytes(&text);
    let turl = format!("{}/cas/{}", r.http, t.hash.to_hex());
    let packed = zstd::bulk::compress(&text, 3).unwrap();
    let put = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Encoding: zstd",
        "--data-binary",
        &file_with(tmp.path(), "z", &packed),
        &turl,
    ])
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let z = curl(&["-H", "Accept-Encoding: zstd", &turl]).await;
    assert_eq!(z.status, 200);
    assert_eq!(z.header("content-encoding"), Some("zstd"));
    assert!(
        z.body.len() < text.len() / 10,
        "{} bytes on the wire",
        z.body.len()
    );
    assert_eq!(zstd::stream::decode_all(&z.body[..]).unwrap(), text);
    let bomb = zstd::bulk::compress(&vec![0u8; (1 << 20) + 10], 3).unwrap();
    let put = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Encoding: zstd",
        "--data-binary",
        &file_with(tmp.path(), "bomb", &bomb),
        &format!(
            "{}/cas/{}",
            r.http,
            Digest::of_bytes(&vec![0u8; (1 << 20) + 10]).hash.to_hex()
        ),
    ])
    .await;
    assert_eq!(
        put.status,
        400,
        "decoded past --max-blob-size: {}",
        put.text()
    );

    // Instances: an allowed one works, an unknown one is refused naming it.
    let inst = curl(&[&format!("{}/main/cas/{}", r.http, d.hash.to_hex())]).await;
    assert_eq!((inst.status, inst.body.len()), (200, data.len()));
    let other = curl(&[&format!("{}/other/cas/{}", r.http, d.hash.to_hex())]).await;
    assert_eq!(other.status, 400);
    assert!(other.text().contains("\"other\""), "{}", other.text());

    // Not a key at all.
    assert_eq!(curl(&[&format!("{}/cas/xyz", r.http)]).await.status, 400);
    r.stop().await;
}

/// A blob the cache cannot make room for (larger than --max-size, within --max-blob-size):
/// 507, nothing stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_cache_answers_507() {
    let r = start(|o| {
        o.max_size = 100_000;
        o.max_blob_size = 1 << 20;
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let data = testutil::data::pseudo_random(300_000, 6);
    let d = Digest::of_bytes(&data);
    let url = format!("{}/cas/{}", r.http, d.hash.to_hex());
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "b", &data),
        &url,
    ])
    .await;
    assert_eq!(put.status, 507, "{}", put.text());
    assert!(put.text().contains("full"), "{}", put.text());
    assert_eq!(curl(&[&url]).await.status, 404);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_as_bearer_or_basic() {
    let r = start(|o| {
        o.tokens = vec![server::Token {
            token: "s3cret".into(),
            role: server::Role::Write,
            name: "ci".into(),
        }]
    })
    .await;
    let data = b"guarded".to_vec();
    let d = Digest::of_bytes(&data);
    let url = format!("{}/cas/{}", r.http, d.hash.to_hex());
    let tmp = tempfile::tempdir().unwrap();
    let body = file_with(tmp.path(), "b", &data);
    let none = curl(&["-X", "PUT", "--data-binary", &body, &url]).await;
    assert_eq!(none.status, 401);
    assert!(none.header("www-authenticate").is_some());
    let wrong = curl(&[
        "-H",
        "Authorization: Bearer nope",
        "-X",
        "PUT",
        "--data-binary",
        &body,
        &url,
    ])
    .await;
    assert_eq!(wrong.status, 401);
    let basic_wrong = curl(&["-u", "ci:nope", &url]).await;
    assert_eq!(basic_wrong.status, 401);
    // The token as the password of the URL, as Bazel and ccache send it.
    let authed = format!(
        "http://ci:s3cret@{}/cas/{}",
        r.http.trim_start_matches("http://"),
        d.hash.to_hex()
    );
    assert_eq!(
        curl(&["-X", "PUT", "--data-binary", &body, &authed])
            .await
            .status,
        200
    );
    let bearer = curl(&["-H", "Authorization: Bearer s3cret", &url]).await;
    assert_eq!((bearer.status, bearer.body), (200, data));
    r.stop().await;
}

fn result_with(path: &str, d: Digest) -> remexec::ActionResult {
    remexec::ActionResult {
        output_files: vec![remexec::OutputFile {
            path: path.into(),
            digest: Some(d.into()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The ActionCache over both protocols: one rule set (paths the spec allows, every blob
/// present), one key space (an entry written over one is read over the other), and opaque
/// values kept apart from it.
#[tokio::test(flavor = "multi_thread")]
async fn action_results_are_validated_and_shared() {
    let r = start(|_| {}).await;
    let tmp = tempfile::tempdir().unwrap();
    let mut ac = ActionCacheClient::new(r.channel.clone());
    let out = grpc_put(&r, b"the output").await;
    let absent = Digest::of_bytes(b"never uploaded");
    let action = Digest::of_bytes(b"an action");
    let ac_url = format!("{}/ac/{}", r.http, action.hash.to_hex());

    // Paths the REAPI spec forbids, planted over either protocol: refused, naming the path.
    for bad in [
        "../escape.txt",
        "/etc/cron.d/x",
        "ok/../../e",
        "a//b",
        "dir/",
        "./x",
    ] {
        let ar = result_with(bad, out);
        let e = ac
            .update_action_result(remexec::UpdateActionResultRequest {
                action_digest: Some(action.into()),
                action_result: Some(ar.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert!(
            e.message().contains(&format!("{bad:?}")),
            "{bad}: {}",
            e.message()
        );
        let put = curl(&[
            "-X",
            "PUT",
            "--data-binary",
            &file_with(tmp.path(), "ar", &ar.encode_to_vec()),
            &ac_url,
        ])
        .await;
        assert_eq!(put.status, 400, "{bad}");
        assert!(
            put.text().contains(&format!("{bad:?}")),
            "{bad}: {}",
            put.text()
        );
    }
    let mut twice = result_with("same", out);
    twice.output_files.push(twice.output_files[0].clone());
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "ar", &twice.encode_to_vec()),
        &ac_url,
    ])
    .await;
    assert_eq!(put.status, 400);
    assert!(put.text().contains("twice"), "{}", put.text());
    let mut link = remexec::ActionResult::default();
    link.output_symlinks.push(remexec::OutputSymlink {
        path: "l".into(),
        target: "/etc/passwd".into(),
        ..Default::default()
    });
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "ar", &link.encode_to_vec()),
        &ac_url,
    ])
    .await;
    assert_eq!(put.status, 400);
    assert!(put.text().contains("/etc/passwd"), "{}", put.text());

    // A result naming a blob the cache does not have: 400 naming it.
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(
            tmp.path(),
            "ar",
            &result_with("out.txt", absent).encode_to_vec(),
        ),
        &ac_url,
    ])
    .await;
    assert_eq!(put.status, 400);
    assert!(put.text().contains(&absent.to_string()), "{}", put.text());
    // Not an ActionResult at all: 400, pointing at the opaque namespace.
    let put = curl(&["-X", "PUT", "--data-binary", "\u{1}\u{2}garbage", &ac_url]).await;
    assert_eq!(put.status, 400);
    assert!(put.text().contains("/opaque/ac/"), "{}", put.text());

    // Written over HTTP, read over gRPC.
    let good = result_with("out.txt", out);
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "ar", &good.encode_to_vec()),
        &ac_url,
    ])
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let read = ac
        .get_action_result(remexec::GetActionResultRequest {
            action_digest: Some(action.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, good);
    // Written over gRPC, read over HTTP.
    let other = Digest::of_bytes(b"another action");
    let mut second = result_with("second.txt", out);
    second.exit_code = 3;
    ac.update_action_result(remexec::UpdateActionResultRequest {
        action_digest: Some(other.into()),
        action_result: Some(second.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = curl(&[&format!("{}/ac/{}", r.http, other.hash.to_hex())]).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        remexec::ActionResult::decode(&got.body[..]).unwrap(),
        second
    );

    // An entry whose output is gone: 404 over HTTP too (and dropped).
    r.server.store().remove(&[out]).unwrap();
    assert_eq!(curl(&[&ac_url]).await.status, 404);

    // Opaque values (ccache's layout=bazel): kept and returned as they are, never seen as
    // ActionResults.
    let key = Digest::of_bytes(b"ccache key");
    let opaque = format!("{}/opaque/ac/{}", r.http, key.hash.to_hex());
    let value = testutil::data::pseudo_random(600_000, 8);
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &file_with(tmp.path(), "o", &value),
        &opaque,
    ])
    .await;
    assert_eq!(put.status, 200, "{}", put.text());
    let got = curl(&[&opaque]).await;
    assert_eq!((got.status, got.body.len()), (200, value.len()));
    assert_eq!(got.body, value);
    assert_eq!(
        curl(&[&format!("{}/ac/{}", r.http, key.hash.to_hex())])
            .await
            .status,
        404
    );
    let e = ac
        .get_action_result(remexec::GetActionResultRequest {
            action_digest: Some(key.into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    r.stop().await;
}

/// Issue 25 §2: health. `/healthz` answers while the process runs; `/readyz` and gRPC's
/// `grpc.health.v1.Health` follow whether the storage takes writes: a storage filesystem another
/// program filled makes the server not ready (503, NOT_SERVING) until it has room again.
#[test]
fn health_follows_whether_the_storage_takes_writes() {
    testutil::tmpfs::with_small_tmpfs(32, |disk| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let storage = disk.join("server");
            let r = start(|o| {
                o.storage = storage.clone();
                o.tokens = vec![server::Token {
                    token: "t0ken".into(),
                    role: server::Role::Write,
                    name: "ci".into(),
                }];
            })
            .await;
            let mut health = tonic_health::pb::health_client::HealthClient::new(r.channel.clone());
            let check = |mut h: tonic_health::pb::health_client::HealthClient<Channel>,
                         service: &'static str| async move {
                h.check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
            };
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            let not_serving =
                tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
            // Without credentials: health is for load balancers.
            assert_eq!(curl(&[&format!("{}/healthz", r.http)]).await.status, 200);
            let ready = curl(&[&format!("{}/readyz", r.http)]).await;
            assert_eq!(ready.status, 200, "{}", ready.text());
            assert!(
                ready.text().contains("storage: writable"),
                "{}",
                ready.text()
            );
            assert_eq!(check(health.clone(), "").await, serving);
            assert_eq!(
                check(
                    health.clone(),
                    "build.bazel.remote.execution.v2.ActionCache"
                )
                .await,
                serving
            );

            // Another program fills the disk: not even a probe file fits.
            let filler = disk.join("filler");
            let fill = || {
                let mut f = std::fs::File::create(&filler).unwrap();
                let block = vec![0u8; 1 << 20];
                while std::io::Write::write_all(&mut f, &block).is_ok() {}
                let small = [0u8; 512];
                while std::io::Write::write_all(&mut f, &small).is_ok() {}
            };
            fill();
            let until = |want: u16| {
                let url = format!("{}/readyz", r.http);
                async move {
                    let start = std::time::Instant::now();
                    loop {
                        let got = curl(&[&url]).await;
                        if got.status == want {
                            return got;
                        }
                        assert!(
                            start.elapsed() < std::time::Duration::from_secs(15),
                            "readyz stayed {} ({})",
                            got.status,
                            got.text()
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            };
            let not_ready = until(503).await;
            assert!(
                not_ready.text().contains("NOT writable"),
                "{}",
                not_ready.text()
            );
            assert_eq!(curl(&[&format!("{}/healthz", r.http)]).await.status, 200);
            let start = std::time::Instant::now();
            while check(health.clone(), "").await != not_serving {
                assert!(start.elapsed() < std::time::Duration::from_secs(15));
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            std::fs::remove_file(&filler).unwrap();
            until(200).await;
            let start = std::time::Instant::now();
            while check(health.clone(), "").await != serving {
                assert!(start.elapsed() < std::time::Duration::from_secs(15));
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let _ = &mut health;
            r.stop().await;
        });
    });
}

/// A request carrying `token` as a bearer token (none: no credentials).
fn authed<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// What a gRPC call came to: `Ok(())`, or its code and message.
type Outcome = Result<(), (Code, String)>;

fn outcome<T>(r: Result<T, tonic::Status>) -> Outcome {
    r.map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

/// Every gRPC method this server answers, called as `token`, each with a well-formed request.
async fn every_method(
    r: &Running,
    token: Option<&str>,
    blob: Digest,
) -> Vec<(&'static str, bool, Outcome)> {
    use reapi::build::bazel::remote::asset::v1::{
        FetchBlobRequest, PushBlobRequest, fetch_client::FetchClient, push_client::PushClient,
    };
    use reapi::build::bazel::remote::execution::v2::capabilities_client::CapabilitiesClient;
    use reapi::google::bytestream::{
        QueryWriteStatusRequest, ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient,
    };
    let ch = r.channel.clone();
    let d: remexec::Digest = blob.into();
    let fresh = testutil::data::pseudo_random(100, rand_seed(token));
    let fd = Digest::of_bytes(&fresh);
    let mut out = Vec::new();
    // (method, needs write, outcome)
    out.push((
        "GetCapabilities",
        false,
        outcome(
            CapabilitiesClient::new(ch.clone())
                .get_capabilities(authed(remexec::GetCapabilitiesRequest::default(), token))
                .await,
        ),
    ));
    out.push((
        "FindMissingBlobs",
        false,
        outcome(
            cas(r)
                .find_missing_blobs(authed(
                    remexec::FindMissingBlobsRequest {
                        blob_digests: vec![d.clone()],
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "BatchReadBlobs",
        false,
        outcome(
            cas(r)
                .batch_read_blobs(authed(
                    remexec::BatchReadBlobsRequest {
                        digests: vec![d.clone()],
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "GetTree",
        false,
        outcome(
            cas(r)
                .get_tree(authed(
                    remexec::GetTreeRequest {
                        root_digest: Some(hashing::EMPTY_DIGEST.into()),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "GetActionResult",
        false,
        match ActionCacheClient::new(ch.clone())
            .get_action_result(authed(
                remexec::GetActionResultRequest {
                    action_digest: Some(d.clone()),
                    ..Default::default()
                },
                token,
            ))
            .await
        {
            Err(s) if s.code() == Code::NotFound => Ok(()),
            other => outcome(other),
        },
    ));
    out.push((
        "Read",
        false,
        outcome(
            ByteStreamClient::new(ch.clone())
                .read(authed(
                    ReadRequest {
                        resource_name: format!("blobs/{}/{}", blob.hash, blob.size_bytes),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "BatchUpdateBlobs",
        true,
        outcome(
            cas(r)
                .batch_update_blobs(authed(
                    remexec::BatchUpdateBlobsRequest {
                        requests: vec![remexec::batch_update_blobs_request::Request {
                            digest: Some(fd.into()),
                            data: fresh.clone(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "UpdateActionResult",
        true,
        outcome(
            ActionCacheClient::new(ch.clone())
                .update_action_result(authed(
                    remexec::UpdateActionResultRequest {
                        action_digest: Some(fd.into()),
                        action_result: Some(result_with("out", blob)),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    let resource = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        fd.hash,
        fd.size_bytes
    );
    out.push((
        "Write",
        true,
        outcome(
            ByteStreamClient::new(ch.clone())
                .write(authed(
                    futures::stream::iter(vec![WriteRequest {
                        resource_name: resource.clone(),
                        write_offset: 0,
                        finish_write: true,
                        data: fresh.clone(),
                    }]),
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "QueryWriteStatus",
        true,
        outcome(
            ByteStreamClient::new(ch.clone())
                .query_write_status(authed(
                    QueryWriteStatusRequest {
                        resource_name: resource,
                    },
                    token,
                ))
                .await,
        ),
    ));
    out.push((
        "PushBlob",
        true,
        outcome(
            PushClient::new(ch.clone())
                .push_blob(authed(
                    PushBlobRequest {
                        uris: vec!["https://example.invalid/pushed".into()],
                        blob_digest: Some(d.clone()),
                        ..Default::default()
                    },
                    token,
                ))
                .await,
        ),
    ));
    // A recorded asset: a read. One that needs a download from its origin: a write (the
    // answer carries its status inside the response).
    let fetch = |uri: &'static str| {
        let ch = ch.clone();
        async move {
            match FetchClient::new(ch)
                .fetch_blob(authed(
                    FetchBlobRequest {
                        uris: vec![uri.into()],
                        ..Default::default()
                    },
                    token,
                ))
                .await
            {
                Ok(resp) => {
                    let s = resp.into_inner().status.unwrap_or_default();
                    if s.code == Code::PermissionDenied as i32
                        || s.code == Code::Unauthenticated as i32
                    {
                        Err((Code::from(s.code), s.message))
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err((e.code(), e.message().to_owned())),
            }
        }
    };
    out.push((
        "FetchBlob (recorded)",
        false,
        fetch("https://example.invalid/recorded").await,
    ));
    out.push((
        "FetchBlob (from the origin)",
        true,
        fetch("https://example.invalid/never-recorded").await,
    ));
    out
}

fn rand_seed(token: Option<&str>) -> u64 {
    token.map_or(1, |t| t.bytes().map(u64::from).sum())
}

/// Issue 25 §4: roles. Read tokens read, write tokens also write, a caller without a token gets
/// the anonymous role; each refused call is PERMISSION_DENIED (403 over HTTP) naming the role
/// it needs, checked against every gRPC method and every HTTP route.
#[tokio::test(flavor = "multi_thread")]
async fn roles_allow_each_method_what_it_needs() {
    let r = start(|o| {
        o.tokens = server::Credentials::parse(
            "# who may do what\nr-tok read dev\nw-tok write ci\na-tok admin ops\n",
        )
        .unwrap()
        .tokens;
        o.anonymous = Some(server::Role::Read);
    })
    .await;
    let blob = grpc_put_as(&r, b"readable", Some("w-tok")).await;
    // A recorded asset, for the read role's fetch.
    reapi::build::bazel::remote::asset::v1::push_client::PushClient::new(r.channel.clone())
        .push_blob(authed(
            reapi::build::bazel::remote::asset::v1::PushBlobRequest {
                uris: vec!["https://example.invalid/recorded".into()],
                blob_digest: Some(blob.into()),
                ..Default::default()
            },
            Some("w-tok"),
        ))
        .await
        .unwrap();
    for (who, token, may_write) in [
        ("anonymous", None, false),
        ("dev (read)", Some("r-tok"), false),
        ("ci (write)", Some("w-tok"), true),
        ("ops (admin)", Some("a-tok"), true),
    ] {
        for (method, needs_write, got) in every_method(&r, token, blob).await {
            let refused = matches!(&got, Err((Code::PermissionDenied, _)));
            assert_eq!(
                refused,
                needs_write && !may_write,
                "{who} calling {method}: {got:?}"
            );
            if refused {
                let msg = &got.as_ref().unwrap_err().1;
                assert!(
                    msg.contains("needs the write role"),
                    "{who} {method}: {msg}"
                );
            }
            assert!(
                !matches!(&got, Err((Code::Unauthenticated, _))),
                "{who} {method}: {got:?}"
            );
        }
    }
    // A wrong token is not anonymous: UNAUTHENTICATED.
    let e = cas(&r)
        .find_missing_blobs(authed(
            remexec::FindMissingBlobsRequest::default(),
            Some("nope"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // HTTP: GET and HEAD read, PUT writes.
    let tmp = tempfile::tempdir().unwrap();
    let data = b"over http".to_vec();
    let d = Digest::of_bytes(&data);
    let body = file_with(tmp.path(), "b", &data);
    let key = d.hash.to_hex();
    let ar = file_with(tmp.path(), "ar", &result_with("o", blob).encode_to_vec());
    for (who, auth, may_write) in [
        ("anonymous", vec![], false),
        ("dev (read)", vec!["-u", "dev:r-tok"], false),
        (
            "ci (write)",
            vec!["-H", "Authorization: Bearer w-tok"],
            true,
        ),
    ] {
        for (route, method, target, file) in [
            (
                "PUT /cas",
                "PUT",
                format!("{}/cas/{key}", r.http),
                Some(&body),
            ),
            ("PUT /ac", "PUT", format!("{}/ac/{key}", r.http), Some(&ar)),
            (
                "PUT /opaque/ac",
                "PUT",
                format!("{}/opaque/ac/{key}", r.http),
                Some(&body),
            ),
            (
                "GET /cas",
                "GET",
                format!("{}/cas/{}", r.http, blob.hash.to_hex()),
                None,
            ),
            (
                "HEAD /cas",
                "HEAD",
                format!("{}/cas/{}", r.http, blob.hash.to_hex()),
                None,
            ),
            ("GET /ac", "GET", format!("{}/ac/{key}", r.http), None),
            ("GET / (status page)", "GET", format!("{}/", r.http), None),
            ("GET /status", "GET", format!("{}/status", r.http), None),
            (
                "GET /status/invocations/x",
                "GET",
                format!("{}/status/invocations/x", r.http),
                None,
            ),
            (
                "GET /opaque/ac",
                "GET",
                format!("{}/opaque/ac/{key}", r.http),
                None,
            ),
        ] {
            let mut args: Vec<&str> = auth.clone();
            if method == "HEAD" {
                args.push("-I");
            } else {
                args.extend(["-X", method]);
            }
            if let Some(f) = file {
                args.extend(["--data-binary", f.as_str()]);
            }
            args.push(&target);
            let got = curl(&args).await;
            let writes = method == "PUT";
            if writes && !may_write {
                assert_eq!(got.status, 403, "{who} {route}: {}", got.text());
                assert!(
                    got.text().contains("needs the write role"),
                    "{who} {route}: {}",
                    got.text()
                );
            } else {
                assert!(
                    got.status != 403 && got.status != 401,
                    "{who} {route}: {} {}",
                    got.status,
                    got.text()
                );
            }
        }
    }
    r.stop().await;
}

async fn grpc_put_as(r: &Running, data: &[u8], token: Option<&str>) -> Digest {
    let d = Digest::of_bytes(data);
    let resp = cas(r)
        .batch_update_blobs(authed(
            remexec::BatchUpdateBlobsRequest {
                requests: vec![remexec::batch_update_blobs_request::Request {
                    digest: Some(d.into()),
                    data: data.to_vec(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    d
}

/// Issue 25 §3 (the access log): one JSON line per request, over either protocol, naming the
/// peer, the caller, the method, the status and the build's invocation id.
#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_has_a_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.jsonl");
    let r = start(|o| {
        o.access_log = Some(log.clone());
        o.tokens = server::Credentials::parse("w-tok write ci\n")
            .unwrap()
            .tokens;
    })
    .await;
    let action = Digest::of_bytes(b"logged action");
    let mut req = authed(
        remexec::GetActionResultRequest {
            action_digest: Some(action.into()),
            ..Default::default()
        },
        Some("w-tok"),
    );
    let md = remexec::RequestMetadata {
        tool_invocation_id: "inv-42".into(),
        ..Default::default()
    };
    req.metadata_mut().insert_bin(
        "build.bazel.remote.execution.v2.requestmetadata-bin",
        tonic::metadata::MetadataValue::from_bytes(&md.encode_to_vec()),
    );
    let e = ActionCacheClient::new(r.channel.clone())
        .get_action_result(req)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let got = curl(&[
        "-H",
        "Authorization: Bearer w-tok",
        &format!("{}/cas/{}", r.http, action.hash.to_hex()),
    ])
    .await;
    assert_eq!(got.status, 404);
    let start_wait = std::time::Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 || start_wait.elapsed() > std::time::Duration::from_secs(10) {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let grpc = lines
        .iter()
        .find(|l| l.contains("\"protocol\":\"grpc\""))
        .unwrap();
    for part in [
        "\"method\":\"GetActionResult\"",
        "\"status\":\"NOT_FOUND\"",
        "\"identity\":\"ci\"",
        "\"invocation_id\":\"inv-42\"",
        "\"peer\":\"127.0.0.1:",
    ] {
        assert!(grpc.contains(part), "{part} in {grpc}");
    }
    let http = lines
        .iter()
        .find(|l| l.contains("\"protocol\":\"http\""))
        .unwrap();
    for part in [
        "\"method\":\"cas_get\"",
        "\"status\":\"404\"",
        "\"identity\":\"ci\"",
    ] {
        assert!(http.contains(part), "{part} in {http}");
    }
    // Without anonymous reads, the status page asks a browser for the token (as a password).
    let page = curl(&[&format!("{}/", r.http)]).await;
    assert_eq!(page.status, 401);
    assert!(
        page.headers
            .iter()
            .any(|(n, v)| n == "www-authenticate" && v.contains("Basic realm")),
        "{:?}",
        page.headers
    );
    let page = curl(&["-u", "me:w-tok", &format!("{}/", r.http)]).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("inv-42"), "{}", page.text());
    r.stop().await;
}
