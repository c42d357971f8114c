//! Remote Asset (Fetch, Push) in `recache serve`, against an in-process HTTP origin whose
//! paths can be made to fail the ways real origins do.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use futures::StreamExt;

use base64::Engine as _;
use hashing::Digest;
use reapi::build::bazel::remote::asset::v1::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, PushBlobRequest,
    PushDirectoryRequest, Qualifier, fetch_client::FetchClient, push_client::PushClient,
};
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, content_addressable_storage_client::ContentAddressableStorageClient,
};
use server::{CacheServer, ServerOptions};
use testutil::origin::{Behavior, Origin};
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    channel: Channel,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(tweak: impl FnOnce(&mut ServerOptions)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::new(dir.path());
    // The tests' origins listen on 127.0.0.1, which the default policy refuses: opened on
    // purpose, as an operator would (`--asset-allow-origin 127.0.0.1`).
    options.asset_policy = fetcher::download::OriginPolicy::global_only(vec!["127.0.0.1".into()]);
    tweak(&mut options);
    let server = CacheServer::open(options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .serve(listener, async {
                let _ = rx.await;
            })
            .await;
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Running {
        channel,
        _dir: dir,
        _stop: tx,
    }
}

fn q(name: &str, value: &str) -> Qualifier {
    Qualifier {
        name: name.into(),
        value: value.into(),
    }
}

fn sri(data: &[u8]) -> String {
    let d = Digest::of_bytes(data);
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(d.hash.0)
    )
}

async fn fetch(r: &Running, uris: &[String], qualifiers: Vec<Qualifier>) -> FetchBlobResponse {
    fetch_with(r, uris, qualifiers, None).await.unwrap()
}

async fn fetch_with(
    r: &Running,
    uris: &[String],
    qualifiers: Vec<Qualifier>,
    timeout_s: Option<i64>,
) -> Result<FetchBlobResponse, tonic::Status> {
    FetchClient::new(r.channel.clone())
        .fetch_blob(FetchBlobRequest {
            uris: uris.to_vec(),
            qualifiers,
            timeout: timeout_s.map(|s| reapi::google::protobuf::Duration {
                seconds: s,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn code(resp: &FetchBlobResponse) -> Code {
    Code::from(resp.status.as_ref().map_or(0, |s| s.code))
}

async fn in_cas(r: &Running, d: Digest) -> bool {
    ContentAddressableStorageClient::new(r.channel.clone())
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

#[tokio::test]
async fn a_fetched_asset_is_verified_stored_and_served_without_the_origin() {
    let origin = Origin::start().await;
    let r = start(|_| {}).await;
    let body = testutil::data::pseudo_random(3 << 20, 70);
    let d = Digest::of_bytes(&body);
    origin.set("/src.tar.gz", Behavior::Serve(body.clone()));
    let url = origin.url("/src.tar.gz");

    let resp = fetch(
        &r,
        std::slice::from_ref(&url),
        vec![q("checksum.sri", &sri(&body))],
    )
    .await;
    assert_eq!(code(&resp), Code::Ok, "{:?}", resp.status);
    assert_eq!(
        Digest::try_from(resp.blob_digest.as_ref().unwrap()).unwrap(),
        d
    );
    assert_eq!(resp.uri, url);
    assert!(in_cas(&r, d).await);

    // The origin goes away; the asset is still served, from the index.
    origin.set("/src.tar.gz", Behavior::Status(404));
    let resp = fetch(
        &r,
        std::slice::from_ref(&url),
        vec![q("checksum.sri", &sri(&body))],
    )
    .await;
    assert_eq!(code(&resp), Code::Ok);
    assert_eq!(origin.hits("/src.tar.gz"), 1);

    // The same content under another URL, named by its checksum: answered from the CAS.
    let other = origin.url("/mirror/src.tar.gz");
    let resp = fetch(&r, &[other], vec![q("checksum.sri", &sri(&body))]).await;
    assert_eq!(code(&resp), Code::Ok);
    assert_eq!(origin.hits("/mirror/src.tar.gz"), 0);
}

#[tokio::test]
async fn a_wrong_checksum_is_refused_and_nothing_is_stored() {
    let origin = Origin::start().await;
    let r = start(|_| {}).await;
    let served = b"the origin serves this".to_vec();
    origin.set("/f", Behavior::Serve(served.clone()));
    let resp = fetch(
        &r,
        &[origin.url("/f")],
        vec![q("checksum.sri", &sri(b"but we expect this"))],
    )
    .await;
    assert_eq!(code(&resp), Code::Aborted, "{:?}", resp.status);
    let msg = &resp.status.as_ref().unwrap().message;
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert!(resp.blob_digest.is_none());
    assert!(
        !in_cas(&r, Digest::of_bytes(&served)).await,
        "a refused download must not be stored"
    );
    let downloads = r._dir.path().join("downloads");
    let left = std::fs::read_dir(&downloads).map_or(0, |d| d.count());
    assert_eq!(
        left,
        0,
        "a refused download left temp files in {}",
        downloads.display()
    );
    // The second of two checksums matching is enough.
    let resp = fetch(
        &r,
        &[origin.url("/f")],
        vec![q(
            "checksum.sri",
            &format!("{} {}", sri(b"nope"), sri(&served)),
        )],
    )
    .await;
    assert_eq!(code(&resp), Code::Ok);
}

#[tokio::test]
async fn keys_ignore_qualifier_order_and_credentials() {
    let origin = Origin::start().await;
    let r = start(|_| {}).await;
    let body = b"archive bytes".to_vec();
    origin.set("/a", Behavior::Serve(body.clone()));
    let url = origin.url("/a");
    let first = vec![
        q("resource_type", "application/x-tar"),
        q("checksum.sri", &sri(&body)),
        q("http_header:Authorization", "Bearer alice"),
    ];
    assert_eq!(
        code(&fetch(&r, std::slice::from_ref(&url), first).await),
        Code::Ok
    );
    // The origin saw the header.
    assert!(
        origin
            .last_headers("/a")
            .contains(&("authorization".into(), "Bearer alice".into()))
    );
    // Same asset, qualifiers in another order, another user's token: one download in all.
    let second = vec![
        q("http_header:Authorization", "Bearer bob"),
        q("checksum.sri", &sri(&body)),
        q("resource_type", "application/x-tar"),
    ];
    assert_eq!(
        code(&fetch(&r, std::slice::from_ref(&url), second).await),
        Code::Ok
    );
    assert_eq!(origin.hits("/a"), 1);
    // A different resource_type is a different asset.
    let third = vec![q("resource_type", "application/zip")];
    assert_eq!(code(&fetch(&r, &[url], third).await), Code::Ok);
    assert_eq!(origin.hits("/a"), 2);
}

#[tokio::test]
async fn origin_faults_get_the_codes_the_api_lists() {
    let origin = Origin::start().await;
    let r = start(|o| o.max_blob_size = 1 << 20).await;
    let body = b"0123456789".to_vec();
    origin.set("/gone", Behavior::Status(404));
    origin.set("/private", Behavior::Status(403));
    origin.set("/loop1", Behavior::Redirect("/loop2".into()));
    origin.set("/loop2", Behavior::Redirect("/loop1".into()));
    origin.set("/moved", Behavior::Redirect("/here".into()));
    origin.set("/here", Behavior::Serve(body.clone()));
    origin.set(
        "/short",
        Behavior::Truncated {
            body: body.clone(),
            announced: 1000,
        },
    );
    origin.set("/stream", Behavior::NoContentLength(body.clone()));
    origin.set("/huge", Behavior::Serve(vec![7u8; 2 << 20]));
    origin.set(
        "/slow",
        Behavior::Slow(Duration::from_secs(5), body.clone()),
    );
    for (path, want) in [
        ("/gone", Code::NotFound),
        ("/private", Code::PermissionDenied),
        ("/loop1", Code::Aborted),
        ("/moved", Code::Ok),
        ("/short", Code::Aborted),
        ("/stream", Code::Ok),
        ("/huge", Code::ResourceExhausted),
    ] {
        let resp = fetch(&r, &[origin.url(path)], vec![]).await;
        assert_eq!(code(&resp), want, "{path}: {:?}", resp.status);
        if want != Code::Ok {
            assert!(
                resp.blob_digest.is_none(),
                "{path}: a failure carries no digest"
            );
        }
    }
    let resp = fetch_with(&r, &[origin.url("/slow")], vec![], Some(1))
        .await
        .unwrap();
    assert_eq!(code(&resp), Code::DeadlineExceeded, "{:?}", resp.status);
    // URIs are tried in order: a dead mirror first does not fail the fetch.
    let resp = fetch(&r, &[origin.url("/gone"), origin.url("/here")], vec![]).await;
    assert_eq!(code(&resp), Code::Ok);
    assert_eq!(resp.uri, origin.url("/here"));
    // Nothing on the origin connects: not found, no digest.
    let resp = fetch(&r, &["http://127.0.0.1:9/x".into()], vec![]).await;
    assert_eq!(code(&resp), Code::NotFound);
}

#[tokio::test]
async fn requests_the_server_cannot_honour_name_what_is_wrong() {
    let r = start(|_| {}).await;
    for (quals, says) in [
        (vec![q("vcs.commit", "abc")], "vcs.commit"),
        (vec![q("checksum.sri", "md5-xyz")], "checksum.sri"),
        (
            vec![q("resource_type", "a"), q("resource_type", "b")],
            "twice",
        ),
    ] {
        let e = fetch_with(&r, &["http://127.0.0.1:9/x".into()], quals, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(says), "{}", e.message());
    }
    let e = fetch_with(&r, &[], vec![], None).await.unwrap_err();
    assert!(e.message().contains("uris"));
    // A URI the server cannot download is a miss (NOT_FOUND inline), never INVALID_ARGUMENT:
    // the spec allows only five codes there.
    let resp = fetch(&r, &["ftp://127.0.0.1/x".into()], vec![]).await;
    assert_eq!(code(&resp), Code::NotFound);
    // A malformed header qualifier is the request's fault: the RPC's own status.
    let e = fetch_with(
        &r,
        &["http://127.0.0.1:9/x".into()],
        vec![q("http_header:bad name", "v")],
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test]
async fn pushed_assets_are_served_until_they_expire() {
    let r = start(|_| {}).await;
    let blob = b"pushed content".to_vec();
    let d = Digest::of_bytes(&blob);
    let mut push = PushClient::new(r.channel.clone());
    let req = |expire: Option<i64>| PushBlobRequest {
        uris: vec!["https://example.invalid/pushed".into()],
        blob_digest: Some(d.into()),
        expire_at: expire.map(|s| reapi::google::protobuf::Timestamp {
            seconds: s,
            nanos: 0,
        }),
        ..Default::default()
    };
    // Not in the CAS yet: refused.
    let e = push.push_blob(req(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    ContentAddressableStorageClient::new(r.channel.clone())
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: blob.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    push.push_blob(req(None)).await.unwrap();
    let resp = fetch(&r, &["https://example.invalid/pushed".into()], vec![]).await;
    assert_eq!(code(&resp), Code::Ok);
    assert_eq!(
        Digest::try_from(resp.blob_digest.as_ref().unwrap()).unwrap(),
        d
    );
    // Expired: not served (and the origin does not exist, so not found).
    push.push_blob(req(Some(1_000))).await.unwrap();
    let resp = fetch(&r, &["https://example.invalid/pushed".into()], vec![]).await;
    assert_ne!(code(&resp), Code::Ok);

    // Directories: the whole tree must be there.
    let file = Digest::of_bytes(b"inside");
    let dir = remexec::Directory {
        files: vec![remexec::FileNode {
            name: "f".into(),
            digest: Some(file.into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let dir_bytes = prost::Message::encode_to_vec(&dir);
    let dd = Digest::of_bytes(&dir_bytes);
    let mut cas = ContentAddressableStorageClient::new(r.channel.clone());
    let upload = |d: Digest, data: Vec<u8>| remexec::BatchUpdateBlobsRequest {
        requests: vec![remexec::batch_update_blobs_request::Request {
            digest: Some(d.into()),
            data,
            compressor: 0,
        }],
        ..Default::default()
    };
    cas.batch_update_blobs(upload(dd, dir_bytes)).await.unwrap();
    let push_dir = PushDirectoryRequest {
        uris: vec!["https://example.invalid/tree".into()],
        root_directory_digest: Some(dd.into()),
        ..Default::default()
    };
    let e = push.push_directory(push_dir.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    cas.batch_update_blobs(upload(file, b"inside".to_vec()))
        .await
        .unwrap();
    push.push_directory(push_dir).await.unwrap();
    let resp = FetchClient::new(r.channel.clone())
        .fetch_directory(FetchDirectoryRequest {
            uris: vec!["https://example.invalid/tree".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status.as_ref().unwrap().code, 0);
    assert_eq!(
        Digest::try_from(resp.root_directory_digest.as_ref().unwrap()).unwrap(),
        dd
    );
}

#[tokio::test]
async fn pushes_need_the_token_when_one_is_set() {
    let r = start(|o| {
        o.tokens = vec![server::Token {
            token: "s3cret".into(),
            role: server::Role::Write,
            name: "ci".into(),
        }]
    })
    .await;
    let e = PushClient::new(r.channel.clone())
        .push_blob(PushBlobRequest {
            uris: vec!["https://example.invalid/x".into()],
            blob_digest: Some(Digest::of_bytes(b"x").into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn concurrent_fetches_of_one_asset_share_one_download() {
    let origin = Origin::start().await;
    let r = start(|_| {}).await;
    let body = testutil::data::pseudo_random(100_000, 71);
    origin.set(
        "/big",
        Behavior::Slow(Duration::from_millis(400), body.clone()),
    );
    let url = origin.url("/big");
    let fetches = (0..4).map(|_| fetch(&r, std::slice::from_ref(&url), vec![]));
    let answers = futures::future::join_all(fetches).await;
    for a in &answers {
        assert_eq!(code(a), Code::Ok, "{:?}", a.status);
        assert_eq!(
            Digest::try_from(a.blob_digest.as_ref().unwrap()).unwrap(),
            Digest::of_bytes(&body)
        );
    }
    assert_eq!(origin.hits("/big"), 1, "four fetches, one download");
}

/// A tar with these (path, bytes) entries, names written raw (as a hostile archive would).
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn archives_from_the_origin_become_directories_and_hostile_ones_are_refused() {
    let origin = Origin::start().await;
    let r = start(|_| {}).await;
    let good = gzip(&tar_of(&[
        ("src/lib.rs", b"pub fn f() {}\n"),
        ("./README", b"hello\n"),
    ]));
    origin.set("/pkg-1.0.tar.gz", Behavior::Serve(good.clone()));
    let evil = tar_of(&[
        ("ok.txt", b"fine"),
        ("../../etc/cron.d/evil", b"* * * * * root sh"),
    ]);
    origin.set("/evil.tar", Behavior::Serve(evil));
    let mut client = FetchClient::new(r.channel.clone());
    let fetch_dir = |uri: String, sri: Option<String>| FetchDirectoryRequest {
        uris: vec![uri],
        qualifiers: sri.map(|s| vec![q("checksum.sri", &s)]).unwrap_or_default(),
        ..Default::default()
    };

    let resp = client
        .fetch_directory(fetch_dir(origin.url("/pkg-1.0.tar.gz"), Some(sri(&good))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status.as_ref().unwrap().code, 0, "{:?}", resp.status);
    let root = resp.root_directory_digest.unwrap();
    let tree: Vec<remexec::Directory> = ContentAddressableStorageClient::new(r.channel.clone())
        .get_tree(remexec::GetTreeRequest {
            root_digest: Some(root.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap()
        .directories;
    let names: Vec<&str> = tree
        .iter()
        .flat_map(|d| {
            d.files
                .iter()
                .map(|f| f.name.as_str())
                .chain(d.directories.iter().map(|d| d.name.as_str()))
        })
        .collect();
    assert!(
        names.contains(&"README") && names.contains(&"src") && names.contains(&"lib.rs"),
        "{names:?}"
    );
    // Served again without the origin.
    origin.set("/pkg-1.0.tar.gz", Behavior::Status(404));
    let again = client
        .fetch_directory(fetch_dir(origin.url("/pkg-1.0.tar.gz"), Some(sri(&good))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.root_directory_digest, Some(root));

    let resp = client
        .fetch_directory(fetch_dir(origin.url("/evil.tar"), None))
        .await
        .unwrap()
        .into_inner();
    let st = resp.status.unwrap();
    assert_eq!(Code::from(st.code), Code::Aborted, "{}", st.message);
    assert!(st.message.contains("climbs out"), "{}", st.message);
    assert!(resp.root_directory_digest.is_none());
    // Not recorded: asking again goes to the origin again.
    let hits = origin.hits("/evil.tar");
    client
        .fetch_directory(fetch_dir(origin.url("/evil.tar"), None))
        .await
        .unwrap();
    assert_eq!(origin.hits("/evil.tar"), hits + 1);
}

/// A listener on 127.0.0.1 (or `[::1]`) that counts the connections it is offered: proof that
/// a refused origin saw none.
struct Counter {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn counter(bind: &str) -> Option<Counter> {
    let listener = tokio::net::TcpListener::bind(bind).await.ok()?;
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_sock, _)) = listener.accept().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    Some(Counter { addr, accepted })
}

impl Counter {
    fn count(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Issue 22 item 1: Remote Asset clients that index their own artifacts ask FetchBlob for URIs
/// nobody can download (`urn:…`) before every pull and push, and treat only NOT_FOUND as "not
/// cached". A never-pushed `urn:`, `file:` or unparsable URI is NOT_FOUND inline, saying why;
/// once pushed, it is served.
#[tokio::test]
async fn a_uri_nobody_can_download_is_a_miss_until_pushed() {
    let r = start(|_| {}).await;
    let urn = "urn:fdc:example.org:2020:artifact:project/element/0123abcd".to_owned();
    for uri in [
        urn.clone(),
        "file:///etc/passwd".into(),
        "not a uri at all".into(),
    ] {
        let resp = fetch(&r, std::slice::from_ref(&uri), vec![]).await;
        assert_eq!(code(&resp), Code::NotFound, "{uri}: {:?}", resp.status);
        let message = resp.status.unwrap().message;
        assert!(message.contains("not recorded here"), "{uri}: {message}");
    }
    let dir = FetchClient::new(r.channel.clone())
        .fetch_directory(FetchDirectoryRequest {
            uris: vec![urn.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        Code::from(dir.status.as_ref().map_or(0, |s| s.code)),
        Code::NotFound
    );

    let blob = b"an artifact record".to_vec();
    let d = Digest::of_bytes(&blob);
    ContentAddressableStorageClient::new(r.channel.clone())
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(d.into()),
                data: blob,
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    PushClient::new(r.channel.clone())
        .push_blob(PushBlobRequest {
            uris: vec![urn.clone()],
            blob_digest: Some(d.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let resp = fetch(&r, &[urn], vec![]).await;
    assert_eq!(code(&resp), Code::Ok);
    assert_eq!(resp.blob_digest, Some(d.into()));
}

/// Issue 22 item 3: Fetch cannot be aimed inside the server's network. Without an allow rule,
/// loopback (by address and by name), IPv6 loopback, link-local (cloud metadata) and private
/// origins are refused before any connection: NOT_FOUND naming the policy, and the listeners
/// standing in for them see nothing. An allowed origin that redirects to a refused one is
/// refused at the redirect. `--asset-fetch off` serves pushed assets only.
#[tokio::test]
async fn the_origin_policy_refuses_inside_addresses_before_connecting() {
    let r = start(|o| {
        o.asset_policy = fetcher::download::OriginPolicy::global_only(Vec::new());
    })
    .await;
    let v4 = counter("127.0.0.1:0").await.unwrap();
    let v6 = counter("[::1]:0").await;
    let mut uris = vec![
        format!("http://127.0.0.1:{}/x", v4.addr.port()),
        format!("http://localhost:{}/x", v4.addr.port()),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/x".to_owned(),
        "http://[::ffff:127.0.0.1]/x".to_owned(),
    ];
    match &v6 {
        Some(c) => uris.push(format!("http://[::1]:{}/x", c.addr.port())),
        None => uris.push("http://[::1]:9/x".to_owned()),
    }
    for uri in &uris {
        let resp = fetch(&r, std::slice::from_ref(uri), vec![]).await;
        assert_eq!(code(&resp), Code::NotFound, "{uri}: {:?}", resp.status);
        let message = resp.status.unwrap().message;
        assert!(message.contains("origin policy"), "{uri}: {message}");
    }
    assert_eq!(v4.count(), 0, "a refused loopback origin saw a connection");
    if let Some(c) = &v6 {
        assert_eq!(c.count(), 0, "a refused [::1] origin saw a connection");
    }

    // An origin the operator opened, redirecting to one that is not.
    let origin = Origin::start().await;
    origin.set(
        "/hop",
        Behavior::Redirect(format!("http://127.0.0.1:{}/x", v4.addr.port())),
    );
    let hop = origin.url("/hop");
    let opened: String = hop
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let r = start(|o| {
        o.asset_policy = fetcher::download::OriginPolicy::global_only(vec![opened]);
    })
    .await;
    let resp = fetch(&r, &[hop], vec![]).await;
    assert_eq!(code(&resp), Code::NotFound, "{:?}", resp.status);
    assert!(resp.status.unwrap().message.contains("origin policy"));
    assert_eq!(v4.count(), 0, "the redirect's target saw a connection");

    // Origin downloads off: only pushed assets.
    origin.set("/f", Behavior::Serve(b"from the origin".to_vec()));
    let r = start(|o| o.asset_policy = fetcher::download::OriginPolicy::off()).await;
    let resp = fetch(&r, &[origin.url("/f")], vec![]).await;
    assert_eq!(code(&resp), Code::NotFound);
    assert!(resp.status.unwrap().message.contains("--asset-fetch off"));
    assert_eq!(origin.hits("/f"), 0);
}

/// Issue 22 item 2: an asset's `references_blobs` and `references_directories` live as long as
/// the asset is used. Under eviction pressure, a referenced directory's leaf blob survives while
/// the asset is fetched (each hit is a use of everything it references); once the leaf is
/// evicted, the asset is a miss, never a hit whose tree is gone. References not in the CAS are
/// refused at push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_live_as_long_as_the_asset_and_a_missing_one_is_a_miss() {
    use prost::Message;
    let r = start(|o| o.max_size = 1_000_000).await;
    let mut cas = ContentAddressableStorageClient::new(r.channel.clone());
    let put = |blobs: Vec<Vec<u8>>| remexec::BatchUpdateBlobsRequest {
        requests: blobs
            .into_iter()
            .map(|b| remexec::batch_update_blobs_request::Request {
                digest: Some(Digest::of_bytes(&b).into()),
                data: b,
                compressor: 0,
            })
            .collect(),
        ..Default::default()
    };
    let blob = |seed: u64| testutil::data::pseudo_random(100_000, seed);
    let (asset, leaf, extra) = (blob(1), blob(2), blob(3));
    let (ad, ld, xd) = (
        Digest::of_bytes(&asset),
        Digest::of_bytes(&leaf),
        Digest::of_bytes(&extra),
    );
    let dir = remexec::Directory {
        files: vec![remexec::FileNode {
            name: "leaf".into(),
            digest: Some(ld.into()),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let dd = Digest::of_bytes(&dir);
    let uri = "urn:example:artifact:with-references".to_owned();
    let push = |refs_dirs: Vec<Digest>| PushBlobRequest {
        uris: vec![uri.clone()],
        blob_digest: Some(ad.into()),
        references_blobs: vec![xd.into()],
        references_directories: refs_dirs.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    cas.batch_update_blobs(put(vec![asset.clone(), extra.clone()]))
        .await
        .unwrap();
    // The referenced tree is not uploaded yet: refused.
    let e = PushClient::new(r.channel.clone())
        .push_blob(push(vec![dd]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    cas.batch_update_blobs(put(vec![leaf.clone(), dir.clone()]))
        .await
        .unwrap();
    PushClient::new(r.channel.clone())
        .push_blob(push(vec![dd]))
        .await
        .unwrap();

    // 2 MB of other blobs into a 1 MB cache, the asset fetched between rounds: it keeps its
    // references alive.
    for round in 0..10u64 {
        let resp = fetch(&r, std::slice::from_ref(&uri), vec![]).await;
        assert_eq!(code(&resp), Code::Ok, "round {round}: {:?}", resp.status);
        cas.batch_update_blobs(put(vec![blob(100 + 2 * round), blob(101 + 2 * round)]))
            .await
            .unwrap();
    }
    assert!(
        in_cas(&r, ld).await,
        "a used asset's referenced leaf was evicted"
    );

    // No longer fetched; only the asset's own blob is kept in use (FindMissingBlobs): the
    // leaf goes, and with it the asset's hits.
    for round in 0..12u64 {
        assert!(in_cas(&r, ad).await);
        cas.batch_update_blobs(put(vec![blob(200 + 2 * round), blob(201 + 2 * round)]))
            .await
            .unwrap();
    }
    assert!(!in_cas(&r, ld).await, "the leaf should be evicted by now");
    let resp = fetch(&r, &[uri], vec![]).await;
    assert_eq!(code(&resp), Code::NotFound, "{:?}", resp.status);
}
