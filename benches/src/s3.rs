//! `perf-report`'s `s3` section: `recache serve` with its S3 tier on the SeaweedFS that
//! `scripts/s3-servers.sh` starts.
//!
//! - A large file (1 GiB; 256 MiB with `--quick`) uploaded through `recache serve` until it is
//!   in the bucket (ByteStream write, then the upload queue drained; the client itself waits
//!   only until the write is acknowledged, printed too), and downloaded through a
//!   second server with an empty fast tier (ByteStream read, fetched from the bucket), each
//!   against a plain copy of the same file with the same S3 client crate (multipart, parts of
//!   the same size, as many in flight), and the peak RSS growth of the process while
//!   `recache serve` moves it.
//! - REAPI writes then reads of 1 000 × 64 KiB (BatchUpdate/BatchRead) and 1 × 256 MiB
//!   (ByteStream) through `recache serve` and through BuildGrid 0.9.1 with its own S3 storage
//!   backend on the same SeaweedFS (`RECACHE_TEST_BUILDGRID_S3`). recache acknowledges a
//!   write once it is in the fast tier and journaled; the time until its queue has drained into
//!   the bucket is printed beside it.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hashing::Digest;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, content_addressable_storage_client::ContentAddressableStorageClient,
};
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use server::s3::{S3Blobs, S3Options};
use server::tier::TierOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::peers::resource;

/// The SeaweedFS options from `scripts/s3-servers.sh env`, on a fresh prefix.
fn options() -> Option<S3Options> {
    let endpoint = std::env::var("RECACHE_TEST_S3_SEAWEED").ok()?;
    let mut o = S3Options::new(Some(endpoint), "recache-bench");
    o.credentials = Some((
        std::env::var("RECACHE_TEST_S3_ACCESS_KEY").ok()?,
        std::env::var("RECACHE_TEST_S3_SECRET_KEY").ok()?,
    ));
    o.prefix = format!("bench-{}/", uuid::Uuid::new_v4().simple());
    Some(o)
}

struct Serving {
    server: server::CacheServer,
    channel: Channel,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

async fn serve(dir: &Path, s3: S3Options) -> Serving {
    let mut options = server::ServerOptions::new(dir);
    options.max_size = 8 << 30;
    options.s3 = Some(TierOptions::new(s3));
    let server = server::CacheServer::open(options).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let handle = tokio::spawn(async move {
        s.serve(listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Serving {
        server,
        channel: connect(&format!("grpc://{addr}")).await,
        stop,
        handle,
    }
}

impl Serving {
    /// Waits until the upload queue is empty; a bench that cannot get there (the bucket
    /// refusing writes, a full disk) stops loudly instead of hanging.
    async fn drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.server.s3_pending() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "uploads still pending after 10 min: is the S3 server refusing them (full disk)?"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.await;
    }
}

async fn connect(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(addr.replace("grpc://", "http://"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

/// Writes a pseudo-random file of `mib` MiB a piece at a time, content never seen before (a
/// fresh seed per call, so no server answers from an earlier run); returns its digest.
fn make_file(path: &Path, mib: usize) -> Digest {
    let seed = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap());
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = hashing::Hasher::new();
    for i in 0..mib.div_ceil(8) {
        let piece = crate::pseudo_random_bytes(8 << 20, seed.wrapping_add(i as u64));
        let piece = &piece[..((mib - i * 8).min(8) << 20)];
        h.update(piece);
        f.write_all(piece).unwrap();
    }
    f.flush().unwrap();
    h.finish()
}

/// The same file through the same crate, multipart: parts of the tier's size, as many in
/// flight as the tier sends, read from the file part by part.
async fn plain_upload(s3: &S3Blobs, d: Digest, path: &Path) {
    let id = s3.start_multipart(d).await.unwrap();
    let part = s3.part_size();
    let count = d.size_bytes.div_ceil(part) as i32;
    let parts: Vec<(i32, String)> = futures::stream::iter(1..=count)
        .map(|n| {
            let id = &id;
            async move {
                let mut f = tokio::fs::File::open(path).await.unwrap();
                let start = (n as u64 - 1) * part;
                tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(start))
                    .await
                    .unwrap();
                let mut buf = Vec::with_capacity(part as usize);
                f.take(part).read_to_end(&mut buf).await.unwrap();
                (n, s3.upload_part(d, id, n, buf.into()).await.unwrap())
            }
        })
        .buffer_unordered(TierOptions::new(S3Options::new(None, "x")).part_concurrency)
        .collect()
        .await;
    s3.complete(d, &id, &parts).await.unwrap();
}

/// ByteStream write of the file at `path`, streamed from disk in 1 MiB messages.
async fn write_file(channel: &Channel, instance: &str, d: Digest, path: &Path) {
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
    let resource = resource(
        instance,
        format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        ),
    );
    let path = path.to_owned();
    let feeder = tokio::spawn(async move {
        let mut f = tokio::fs::File::open(&path).await.unwrap();
        let mut offset = 0u64;
        loop {
            let mut buf = Vec::with_capacity(1 << 20);
            (&mut f).take(1 << 20).read_to_end(&mut buf).await.unwrap();
            let n = buf.len() as u64;
            let last = offset + n >= d.size_bytes;
            let msg = WriteRequest {
                resource_name: if offset == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: offset as i64,
                finish_write: last,
                data: buf,
            };
            if tx.send(msg).await.is_err() || last {
                break;
            }
            offset += n;
        }
    });
    let stream = futures::stream::poll_fn({
        let mut rx = rx;
        move |cx| rx.poll_recv(cx)
    });
    ByteStreamClient::new(channel.clone())
        .max_decoding_message_size(16 << 20)
        .write(stream)
        .await
        .unwrap();
    feeder.await.unwrap();
}

/// ByteStream read of `d` into a file (streamed; nothing held).
async fn read_to_file(channel: &Channel, instance: &str, d: Digest, path: &Path) {
    let mut stream = ByteStreamClient::new(channel.clone())
        .max_decoding_message_size(16 << 20)
        .read(ReadRequest {
            resource_name: resource(instance, format!("blobs/{}/{}", d.hash, d.size_bytes)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = tokio::fs::File::create(path).await.unwrap();
    let mut n = 0u64;
    while let Some(msg) = stream.next().await {
        let data = msg.unwrap().data;
        n += data.len() as u64;
        out.write_all(&data).await.unwrap();
    }
    out.flush().await.unwrap();
    assert_eq!(n, d.size_bytes, "read back the whole blob");
}

/// Every per-blob status of a batch answer is OK (absent counts as OK).
fn all_ok<'a>(statuses: impl IntoIterator<Item = Option<&'a reapi::google::rpc::Status>>) -> bool {
    statuses.into_iter().all(|s| s.is_none_or(|s| s.code == 0))
}

/// 1 000 × 64 KiB written in batches under 4 MiB, then read back the same way.
async fn small_blobs(
    channel: &Channel,
    instance: &str,
    blobs: &[(Digest, Vec<u8>)],
) -> (Duration, Duration) {
    let mut cas = ContentAddressableStorageClient::new(channel.clone())
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let s = Instant::now();
    for batch in blobs.chunks(60) {
        let resp = cas
            .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests: batch
                    .iter()
                    .map(|(d, data)| remexec::batch_update_blobs_request::Request {
                        digest: Some((*d).into()),
                        data: data.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(all_ok(resp.responses.iter().map(|r| r.status.as_ref())));
    }
    let write = s.elapsed();
    let s = Instant::now();
    for batch in blobs.chunks(60) {
        let resp = cas
            .batch_read_blobs(remexec::BatchReadBlobsRequest {
                instance_name: instance.into(),
                digests: batch.iter().map(|(d, _)| (*d).into()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(all_ok(resp.responses.iter().map(|r| r.status.as_ref())));
    }
    (write, s.elapsed())
}

/// CPU seconds used by this process (client and server alike) and by the S3 server between
/// `start` and `stop`: where the time went, since on these 2 cores both compete for CPU.
#[derive(Clone, Copy)]
struct CpuMeter {
    s3_pid: Option<u32>,
    at: (f64, f64),
}

impl CpuMeter {
    fn start(s3_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            s3_pid,
            at: CpuMeter::now(s3_pid),
        }
    }

    fn now(s3_pid: Option<u32>) -> (f64, f64) {
        let s3 = s3_pid
            .and_then(|p| crate::cpu_secs(&p.to_string()))
            .unwrap_or(f64::NAN);
        (crate::cpu_secs("self").unwrap_or(f64::NAN), s3)
    }

    /// (this process, the S3 server) CPU seconds since `start`.
    fn stop(self) -> (f64, f64) {
        let (a, b) = CpuMeter::now(self.s3_pid);
        (a - self.at.0, b - self.at.1)
    }
}

/// Medians of (this process, the S3 server) CPU seconds as JSON.
fn cpu_json(v: Vec<(f64, f64)>) -> serde_json::Value {
    let round = |x: f64| (x * 100.0).round() / 100.0;
    serde_json::json!({
        "bench_process": round(median(v.iter().map(|c| c.0).collect())),
        "s3_server": round(median(v.iter().map(|c| c.1).collect())),
    })
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn ratio(a: f64, b: f64) -> f64 {
    (a / b * 100.0).round() / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The section, or `None` when SeaweedFS is not running.
pub async fn report(quick: bool, dir: &Path) -> Option<serde_json::Value> {
    let base = options()?;
    // What `recache serve` does at start, so the memory figures are the server's.
    server::return_large_buffers_to_the_system();
    let reps = if quick { 1 } else { 3 };
    let big_mib = if quick { 256 } else { 1024 };
    let file = dir.join("s3-big.bin");
    let d = make_file(&file, big_mib);
    let mut out = serde_json::Map::new();

    // 1. The large file: recache serve vs a plain copy, up and down.
    let (mut plain_up, mut plain_down, mut up, mut down) = (vec![], vec![], vec![], vec![]);
    // The client's wait: until the write is acknowledged (in the fast tier and journaled).
    let mut ack = vec![];
    let (mut rss_up, mut rss_down) = (0.0f64, 0.0f64);
    let s3_pid = std::env::var("RECACHE_TEST_S3_SEAWEED_PID")
        .ok()
        .and_then(|p| p.parse().ok());
    let (mut cpu_plain_up, mut cpu_plain_down, mut cpu_up, mut cpu_down) =
        (vec![], vec![], vec![], vec![]);
    for rep in 0..reps {
        let mut o = base.clone();
        o.prefix = format!("{}plain-{rep}/", base.prefix);
        let plain = S3Blobs::new(o).unwrap();
        plain.ensure_bucket().await.unwrap();
        crate::settle_disk();
        let (s, cpu) = (Instant::now(), CpuMeter::start(s3_pid));
        plain_upload(&plain, d, &file).await;
        plain_up.push(s.elapsed().as_secs_f64());
        cpu_plain_up.push(cpu.stop());
        let back = dir.join("s3-plain-back.bin");
        crate::settle_disk();
        let (s, cpu) = (Instant::now(), CpuMeter::start(s3_pid));
        assert!(plain.get_to_file(d, &back).await.unwrap());
        plain_down.push(s.elapsed().as_secs_f64());
        cpu_plain_down.push(cpu.stop());
        let _ = std::fs::remove_file(&back);

        let mut o = base.clone();
        o.prefix = format!("{}tier-{rep}/", base.prefix);
        let fast_a = tempfile::tempdir_in(dir).unwrap();
        let a = serve(fast_a.path(), o.clone()).await;
        crate::reset_peak_rss().ok();
        let before = crate::rss_mib();
        crate::settle_disk();
        let (s, cpu) = (Instant::now(), CpuMeter::start(s3_pid));
        write_file(&a.channel, "", d, &file).await;
        ack.push(s.elapsed().as_secs_f64());
        a.drained().await;
        up.push(s.elapsed().as_secs_f64());
        cpu_up.push(cpu.stop());
        rss_up = rss_up.max(crate::peak_rss_mib() - before);
        a.stop().await;
        drop(fast_a);

        let fast_b = tempfile::tempdir_in(dir).unwrap();
        let b = serve(fast_b.path(), o).await;
        let back = dir.join("s3-tier-back.bin");
        crate::reset_peak_rss().ok();
        let before = crate::rss_mib();
        crate::settle_disk();
        let (s, cpu) = (Instant::now(), CpuMeter::start(s3_pid));
        read_to_file(&b.channel, "", d, &back).await;
        down.push(s.elapsed().as_secs_f64());
        cpu_down.push(cpu.stop());
        rss_down = rss_down.max(crate::peak_rss_mib() - before);
        let _ = std::fs::remove_file(&back);
        b.stop().await;
    }
    let (pu, pd, ru, rd) = (
        median(plain_up),
        median(plain_down),
        median(up),
        median(down),
    );
    out.insert("large_mib".into(), big_mib.into());
    out.insert("large_upload_plain_s".into(), pu.into());
    out.insert("large_upload_recache_s".into(), ru.into());
    out.insert("large_upload_ratio".into(), ratio(pu, ru).into());
    out.insert(
        "large_upload_recache_acknowledged_s".into(),
        median(ack).into(),
    );
    if s3_pid.is_some() {
        out.insert("large_upload_plain_cpu_s".into(), cpu_json(cpu_plain_up));
        out.insert("large_upload_recache_cpu_s".into(), cpu_json(cpu_up));
        out.insert(
            "large_download_plain_cpu_s".into(),
            cpu_json(cpu_plain_down),
        );
        out.insert("large_download_recache_cpu_s".into(), cpu_json(cpu_down));
    }
    out.insert("large_download_plain_s".into(), pd.into());
    out.insert("large_download_recache_s".into(), rd.into());
    out.insert("large_download_ratio".into(), ratio(pd, rd).into());
    out.insert(
        "large_upload_peak_rss_growth_mib".into(),
        (rss_up.round()).into(),
    );
    out.insert(
        "large_download_peak_rss_growth_mib".into(),
        (rss_down.round()).into(),
    );
    let _ = std::fs::remove_file(&file);

    // 2. recache serve vs BuildGrid, both on S3 on the same SeaweedFS.
    let Ok(bgd) = std::env::var("RECACHE_TEST_BUILDGRID_S3") else {
        eprintln!(
            "perf-report: no S3 peer rows: RECACHE_TEST_BUILDGRID_S3 is not set (scripts/s3-servers.sh starts it when BuildGrid is installed)"
        );
        return Some(serde_json::Value::Object(out));
    };
    let bgd = connect(&bgd).await;
    let peer_file = dir.join("s3-peer.bin");
    let mut o = base.clone();
    o.prefix = format!("{}peer/", base.prefix);
    let fast = tempfile::tempdir_in(dir).unwrap();
    let ours = serve(fast.path(), o).await;
    let (mut ours_small, mut bg_small, mut ours_large, mut bg_large, mut drain) =
        (vec![], vec![], vec![], vec![], vec![]);
    // The 256 MiB row's write and read apart: [ours, BuildGrid] × [write, read].
    let mut split: [[Vec<f64>; 2]; 2] = Default::default();
    for _ in 0..reps {
        let salt = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap());
        // Fresh content each repetition, so neither side answers from an earlier one.
        let blobs: Vec<(Digest, Vec<u8>)> = (0..1000)
            .map(|i| {
                let data = crate::pseudo_random_bytes(64 << 10, salt.wrapping_add(i));
                (Digest::of_bytes(&data), data)
            })
            .collect();
        let pd = make_file(&peer_file, 256);
        for (side, channel, instance) in [(0, &ours.channel, ""), (1, &bgd, "main")] {
            crate::settle_disk();
            let (w, r) = small_blobs(channel, instance, &blobs).await;
            crate::settle_disk();
            let s = Instant::now();
            write_file(channel, instance, pd, &peer_file).await;
            let lw = s.elapsed();
            let back = dir.join("s3-peer-back.bin");
            let s = Instant::now();
            read_to_file(channel, instance, pd, &back).await;
            let lr = s.elapsed();
            let _ = std::fs::remove_file(&back);
            split[side][0].push(lw.as_secs_f64());
            split[side][1].push(lr.as_secs_f64());
            let (small, large) = ((w + r).as_secs_f64(), (lw + lr).as_secs_f64());
            if side == 0 {
                let s = Instant::now();
                ours.drained().await;
                drain.push(s.elapsed().as_secs_f64());

                ours_small.push(small);
                ours_large.push(large);
            } else {
                bg_small.push(small);
                bg_large.push(large);
            }
        }
    }
    let _ = std::fs::remove_file(&peer_file);
    ours.stop().await;
    let (os, bs, ol, bl) = (
        median(ours_small),
        median(bg_small),
        median(ours_large),
        median(bg_large),
    );
    out.insert(
        "small_1000x64k_recache_s".into(),
        secs(Duration::from_secs_f64(os)).into(),
    );
    out.insert(
        "small_1000x64k_buildgrid_s".into(),
        secs(Duration::from_secs_f64(bs)).into(),
    );
    out.insert(
        "small_1000x64k_ratio_vs_buildgrid".into(),
        ratio(bs, os).into(),
    );
    out.insert(
        "large_256m_recache_s".into(),
        secs(Duration::from_secs_f64(ol)).into(),
    );
    out.insert(
        "large_256m_buildgrid_s".into(),
        secs(Duration::from_secs_f64(bl)).into(),
    );
    out.insert("large_256m_ratio_vs_buildgrid".into(), ratio(bl, ol).into());
    let [ours_split, bg_split] = split.map(|[w, r]| {
        serde_json::json!({
            "write": secs(Duration::from_secs_f64(median(w))),
            "read": secs(Duration::from_secs_f64(median(r))),
        })
    });
    out.insert("large_256m_recache_split_s".into(), ours_split);
    out.insert("large_256m_buildgrid_split_s".into(), bg_split);
    out.insert(
        "recache_queue_drain_after_s".into(),
        secs(Duration::from_secs_f64(median(drain))).into(),
    );
    Some(serde_json::Value::Object(out))
}
