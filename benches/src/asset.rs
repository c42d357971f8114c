//! Remote Asset rows for `perf-report`: a large asset fetched cold through `recache serve`
//! (FetchBlob: download, verify, store) against a plain HTTP download of the same file on the
//! same loopback, the memory that costs, and a warm FetchBlob against a GetActionResult.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use reapi::build::bazel::remote::asset::v1::{FetchBlobRequest, fetch_client::FetchClient};
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
};
use testutil::origin::{Behavior, Origin};
use tokio::io::AsyncWriteExt;

/// The rows: (name, value).
pub async fn rows(mib: usize, reps: usize, dir: &std::path::Path) -> Vec<(String, f64)> {
    let origin = Origin::start().await;
    let file = dir.join("asset.bin");
    std::fs::write(&file, crate::pseudo_random_bytes(mib << 20, 90)).unwrap();
    origin.set("/asset.bin", Behavior::File(file.clone()));

    // recache serve on its own storage, with the origin reachable.
    let storage = tempfile::tempdir_in(dir).unwrap();
    let mut options = server::ServerOptions::new(storage.path());
    options.asset_policy = fetcher::download::OriginPolicy::global_only(vec!["127.0.0.1".into()]);
    let server = server::CacheServer::open(options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let store = server.store().clone();
    tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();

    let (mut plain, mut cold, mut growth) = (vec![], vec![], 0.0f64);
    for i in 0..reps {
        // Plain: the same bytes over the same loopback into a file, nothing else.
        let out = dir.join(format!("plain-{i}"));
        let s = Instant::now();
        plain_download(&origin.url("/asset.bin"), &out).await;
        plain.push(s.elapsed());
        let _ = std::fs::remove_file(&out);
        // Cold: a fresh URL each time (so the index misses) and the blob gone from the CAS.
        store.gc(0).unwrap();
        let url = format!("{}?rep={i}", origin.url("/asset.bin"));
        crate::reset_peak_rss().ok();
        let before = crate::rss_mib();
        let s = Instant::now();
        let resp = FetchClient::new(channel.clone())
            .fetch_blob(FetchBlobRequest {
                uris: vec![url],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        cold.push(s.elapsed());
        growth = growth.max(crate::peak_rss_mib() - before);
        let status = resp.status.unwrap_or_default();
        assert_eq!(status.code, 0, "the cold fetch failed: {}", status.message);
    }
    // Warm: FetchBlob of an indexed asset vs GetActionResult of a cached action.
    let warm_url = format!("{}?rep=0", origin.url("/asset.bin"));
    let _ = FetchClient::new(channel.clone())
        .fetch_blob(FetchBlobRequest {
            uris: vec![warm_url.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let action = hashing::Digest::of_bytes(b"perf-report asset row action");
    ActionCacheClient::new(channel.clone())
        .update_action_result(remexec::UpdateActionResultRequest {
            action_digest: Some(action.into()),
            action_result: Some(remexec::ActionResult::default()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut warm, mut ac) = (vec![], vec![]);
    for _ in 0..(reps * 100).max(200) {
        let s = Instant::now();
        FetchClient::new(channel.clone())
            .fetch_blob(FetchBlobRequest {
                uris: vec![warm_url.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
        warm.push(s.elapsed());
        let s = Instant::now();
        ActionCacheClient::new(channel.clone())
            .get_action_result(remexec::GetActionResultRequest {
                action_digest: Some(action.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        ac.push(s.elapsed());
    }
    let _ = tx.send(());
    let mib_s = |d: Duration| mib as f64 / d.as_secs_f64();
    let (p, c) = (
        mib_s(crate::hit::median(&mut plain)),
        mib_s(crate::hit::median(&mut cold)),
    );
    let (w, a) = (
        crate::hit::median(&mut warm).as_secs_f64() * 1e6,
        crate::hit::median(&mut ac).as_secs_f64() * 1e6,
    );
    let r = |v: f64| (v * 100.0).round() / 100.0;
    vec![
        ("asset_mib".into(), mib as f64),
        ("asset_plain_http_mib_s".into(), r(p)),
        ("asset_cold_fetch_mib_s".into(), r(c)),
        ("asset_cold_over_plain".into(), r(c / p)),
        ("asset_cold_fetch_peak_rss_growth_mib".into(), r(growth)),
        ("asset_warm_fetch_us".into(), r(w)),
        ("asset_get_action_result_us".into(), r(a)),
        ("asset_warm_over_get_action_result".into(), r(w / a)),
    ]
}

/// GET `url` into `out` with a plain hyper client: the baseline.
async fn plain_download(url: &str, out: &std::path::Path) {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let mut f = tokio::fs::File::create(out).await.unwrap();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            f.write_all(&data).await.unwrap();
        }
    }
    f.flush().await.unwrap();
}
