//! The `http` section of `perf-report` (issue 24): `recache serve --http-listen` beside nginx
//! (Debian's, storing and serving the same files with `dav_methods PUT`; started by
//! `scripts/nginx.sh`) in one run, through the same client on the same loopback, and our HTTP
//! path beside our own gRPC path on the same data.
//!
//! recache serve runs in this process on a runtime of its own (2 worker threads, as nginx runs
//! `worker_processes auto` here), storing as it does by default (zstd at rest: random data is
//! tried, then kept plain).
//!
//! Rows (each with its goal in `issue 24`):
//! - `get_4k_ops_s_{recache,nginx}`, `get_4k_over_nginx` (≥ 0.7): GETs of 4 KiB blobs from 64
//!   keep-alive connections for a fixed time;
//! - `get_large_mib_s_*`, `get_large_over_nginx` (≥ 0.7) and `put_large_mib_s_*`,
//!   `put_large_over_nginx` (≥ 0.8): one `large_mib` MiB blob (256; 64 with `--quick`), a
//!   different one per PUT (recache verifies SHA-256 as it stores, nginx does not);
//! - `http_over_grpc_get`, `http_over_grpc_put` (≥ 0.9): the same large transfers through our
//!   HTTP front end over our gRPC one (ByteStream).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hashing::Digest;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};

use crate::hit::median;
use crate::transfer::mib_per_s;

/// Connections for the small-GET row.
const CONNECTIONS: usize = 64;
/// Distinct 4 KiB blobs the small-GET row cycles through.
const SMALL_BLOBS: usize = 256;

/// recache serve with both front ends, on a runtime of its own; stopped when dropped.
struct Served {
    http: String,
    grpc: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(dir: &std::path::Path) -> Served {
    let storage = tempfile::tempdir_in(dir).unwrap();
    let mut options = server::ServerOptions::new(storage.path());
    options.max_size = 8 << 30;
    let server = server::CacheServer::open(options).unwrap();
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    grpc.set_nonblocking(true).unwrap();
    http.set_nonblocking(true).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let grpc = tokio::net::TcpListener::from_std(grpc).unwrap();
            let http = tokio::net::TcpListener::from_std(http).unwrap();
            server
                .serve_with_http(grpc, Some(http), async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
    });
    Served {
        http: format!("http://{http_addr}"),
        grpc: format!("http://{grpc_addr}"),
        stop: Some(tx),
        thread: Some(thread),
        _dir: storage,
    }
}

type HttpClient<B> = Client<HttpConnector, B>;

fn client<B>() -> HttpClient<B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(CONNECTIONS)
        .build(connector)
}

async fn put(client: &HttpClient<Full<Bytes>>, url: &str, data: Bytes) {
    let req = hyper::Request::put(url)
        .header("content-length", data.len())
        .body(Full::new(data))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    assert!(status.is_success(), "PUT {url}: {status}");
}

/// GETs `url`; the bytes received.
async fn get(client: &HttpClient<Empty<Bytes>>, url: &str) -> u64 {
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
        }
    }
    n
}

/// GETs of the small blobs under `base` from [`CONNECTIONS`] connections for `time`: ops/s.
async fn small_gets(base: &str, keys: &Arc<Vec<String>>, time: Duration) -> f64 {
    let client: HttpClient<Empty<Bytes>> = client();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let (client, keys, done, base) =
                (client.clone(), keys.clone(), done.clone(), base.to_owned());
            tokio::spawn(async move {
                let mut i = c;
                while started.elapsed() < time {
                    let n = get(&client, &format!("{base}/cas/{}", keys[i % keys.len()])).await;
                    assert_eq!(n, 4096);
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 7;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// A gRPC channel to our server, with the windows `recache serve` itself sets.
async fn channel(grpc: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(grpc.to_owned())
        .unwrap()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(6 << 20))
        .initial_connection_window_size(Some(12 << 20))
        .connect()
        .await
        .unwrap()
}

async fn grpc_read(grpc: &str, d: Digest) -> Duration {
    let channel = channel(grpc).await;
    let started = Instant::now();
    let mut stream = ByteStreamClient::new(channel)
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u64;
    while let Some(m) = stream.next().await {
        n += m.unwrap().data.len() as u64;
    }
    assert_eq!(n, d.size_bytes);
    started.elapsed()
}

async fn grpc_write(grpc: &str, data: Bytes) -> Duration {
    let d = Digest::of_bytes(&data);
    let channel = channel(grpc).await;
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        d.size_bytes
    );
    let chunk = 1 << 20;
    let n = data.len().div_ceil(chunk);
    let msgs: Vec<WriteRequest> = (0..n)
        .map(|i| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * chunk) as i64,
            finish_write: i + 1 == n,
            data: data[i * chunk..((i + 1) * chunk).min(data.len())].to_vec(),
        })
        .collect();
    let started = Instant::now();
    ByteStreamClient::new(channel)
        .write(futures::stream::iter(msgs))
        .await
        .unwrap();
    started.elapsed()
}

/// The section, or `None` (with a line on stderr) when nginx is not running.
pub async fn report(quick: bool, dir: &std::path::Path) -> Option<serde_json::Value> {
    let nginx = std::env::var("RECACHE_TEST_NGINX").ok()?;
    let served = serve(dir);
    let recache = served.http.clone();
    let put_client: HttpClient<Full<Bytes>> = client();
    let get_client: HttpClient<Empty<Bytes>> = client();
    let mut rows = serde_json::Map::new();
    let mut row = |k: &str, v: f64| {
        rows.insert(
            k.to_owned(),
            serde_json::json!((v * 1000.0).round() / 1000.0),
        );
    };

    // Small GETs at 64 connections.
    let mut keys = Vec::with_capacity(SMALL_BLOBS);
    for i in 0..SMALL_BLOBS {
        let data = Bytes::from(crate::pseudo_random_bytes(4096, 7000 + i as u64));
        let hash = Digest::of_bytes(&data).hash.to_hex();
        for base in [&recache, &nginx] {
            put(&put_client, &format!("{base}/cas/{hash}"), data.clone()).await;
        }
        keys.push(hash);
    }
    let keys = Arc::new(keys);
    let time = Duration::from_secs(if quick { 2 } else { 4 });
    let (mut ours, mut theirs) = (vec![], vec![]);
    for _ in 0..if quick { 2 } else { 3 } {
        ours.push(small_gets(&recache, &keys, time).await);
        theirs.push(small_gets(&nginx, &keys, time).await);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours, theirs) = (med(&mut ours), med(&mut theirs));
    row("get_4k_ops_s_recache", ours);
    row("get_4k_ops_s_nginx", theirs);
    row("get_4k_over_nginx", ours / theirs);

    // Large blobs: PUT a different one each time (in the same order to both), GET the last.
    let mib = if quick { 64 } else { 256 };
    let reps = if quick { 2 } else { 3 };
    row("large_mib", mib as f64);
    let (mut put_ours, mut put_theirs, mut put_grpc) = (vec![], vec![], vec![]);
    let mut last = None;
    for rep in 0..reps {
        let data = Bytes::from(crate::pseudo_random_bytes(mib << 20, 8000 + rep as u64));
        let d = Digest::of_bytes(&data);
        for (base, out) in [(&recache, &mut put_ours), (&nginx, &mut put_theirs)] {
            let s = Instant::now();
            put(
                &put_client,
                &format!("{base}/cas/{}", d.hash.to_hex()),
                data.clone(),
            )
            .await;
            out.push(s.elapsed());
        }
        // The same size over gRPC: another blob (this one is stored already).
        let other = Bytes::from(crate::pseudo_random_bytes(mib << 20, 8500 + rep as u64));
        put_grpc.push(grpc_write(&served.grpc, other).await);
        last = Some(d);
    }
    let d = last?;
    let (mut get_ours, mut get_theirs, mut get_grpc) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        for (base, out) in [(&recache, &mut get_ours), (&nginx, &mut get_theirs)] {
            let s = Instant::now();
            let n = get(&get_client, &format!("{base}/cas/{}", d.hash.to_hex())).await;
            assert_eq!(n, d.size_bytes);
            out.push(s.elapsed());
        }
        get_grpc.push(grpc_read(&served.grpc, d).await);
    }
    let rate = |v: &mut Vec<Duration>| mib_per_s(mib << 20, median(v));
    let (g_ours, g_theirs, g_grpc) = (
        rate(&mut get_ours),
        rate(&mut get_theirs),
        rate(&mut get_grpc),
    );
    let (p_ours, p_theirs, p_grpc) = (
        rate(&mut put_ours),
        rate(&mut put_theirs),
        rate(&mut put_grpc),
    );
    row("get_large_mib_s_recache", g_ours);
    row("get_large_mib_s_nginx", g_theirs);
    row("get_large_over_nginx", g_ours / g_theirs);
    row("put_large_mib_s_recache", p_ours);
    row("put_large_mib_s_nginx", p_theirs);
    row("put_large_over_nginx", p_ours / p_theirs);
    row("get_large_mib_s_recache_grpc", g_grpc);
    row("put_large_mib_s_recache_grpc", p_grpc);
    row("http_over_grpc_get", g_ours / g_grpc);
    row("http_over_grpc_put", p_ours / p_grpc);
    drop(served);
    Some(serde_json::Value::Object(rows))
}
