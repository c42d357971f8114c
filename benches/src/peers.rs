//! recache serve beside its peers: the same workloads against `recache serve`, buildbox-casd and
//! BuildGrid started side by side (plain tonic clients, loopback, medians), as `perf-report`'s
//! `server` section and the `server-report` binary print them. Rows:
//!
//! - `find_missing_10k_ms`: FindMissingBlobs of 10 000 absent digests (one request);
//! - `batch_read_1000x4k_ms`: BatchReadBlobs of 1 000 × 4 KiB (two requests of 500, under every
//!   server's 4 MiB message cap);
//! - `get_action_result_c1_us`: GetActionResult latency, one call at a time;
//! - `get_action_result_c64_per_s`: GetActionResult throughput with 64 calls in flight
//!   (answered calls only: buildbox-casd refuses some with "Concurrent RPC limit exceeded");
//! - `bytestream_write_mib_s` / `bytestream_read_mib_s`: one blob of `mib` MiB written and read
//!   back in 1 MiB messages, the servers taking turns rep by rep (the disk's writeback state
//!   swings these rows more than anything the servers do);
//!
//! and, per row, `ratio_vs_casd` / `ratio_vs_buildgrid` (recache's throughput over the peer's:
//! above 1 is faster). The servers are the ones `scripts/reapi-servers.sh start` runs, found
//! through its `RECACHE_TEST_*` variables.

use std::time::{Duration, Instant};

use crate::hit::median;
use futures::StreamExt;
use hashing::Digest;
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use reapi::google::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use tonic::transport::Channel;

struct Target {
    name: &'static str,
    channel: Channel,
    instance: String,
}

/// A ByteStream resource name under `instance` (none when empty).
pub(crate) fn resource(instance: &str, rest: String) -> String {
    if instance.is_empty() {
        rest
    } else {
        format!("{instance}/{rest}")
    }
}

fn unique(len: usize) -> Vec<u8> {
    testutil::data::unique(len)
}

async fn connect(name: &'static str, var: &str) -> Option<Target> {
    let address = std::env::var(var).ok()?;
    let instance = std::env::var(format!("{var}_INSTANCE")).unwrap_or_default();
    let channel = tonic::transport::Endpoint::from_shared(address.replace("grpc://", "http://"))
        .ok()?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .connect()
        .await
        .ok()?;
    Some(Target {
        name,
        channel,
        instance,
    })
}

fn cas(t: &Target) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(t.channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn find_missing(t: &Target, reps: usize) -> f64 {
    let mut samples = vec![];
    for _ in 0..reps {
        let digests: Vec<remexec::Digest> = (0..10_000)
            .map(|_| Digest::of_bytes(&unique(32)).into())
            .collect();
        let start = Instant::now();
        let resp = cas(t)
            .find_missing_blobs(remexec::FindMissingBlobsRequest {
                instance_name: t.instance.clone(),
                blob_digests: digests,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        samples.push(start.elapsed());
        assert_eq!(resp.missing_blob_digests.len(), 10_000, "{}", t.name);
    }
    median(&mut samples).as_secs_f64() * 1e3
}

async fn batch_read(t: &Target, reps: usize) -> f64 {
    let blobs: Vec<Vec<u8>> = (0..1000).map(|_| unique(4096)).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of_bytes(b)).collect();
    for half in blobs.chunks(500) {
        cas(t)
            .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
                instance_name: t.instance.clone(),
                requests: half
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
            .unwrap();
    }
    let mut samples = vec![];
    for _ in 0..reps {
        let start = Instant::now();
        for half in digests.chunks(500) {
            let resp = cas(t)
                .batch_read_blobs(remexec::BatchReadBlobsRequest {
                    instance_name: t.instance.clone(),
                    digests: half.iter().map(|d| (*d).into()).collect(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                resp.responses
                    .iter()
                    .all(|r| r.status.as_ref().map_or(0, |s| s.code) == 0 && r.data.len() == 4096),
                "{}",
                t.name
            );
        }
        samples.push(start.elapsed());
    }
    median(&mut samples).as_secs_f64() * 1e3
}

/// Caches one action with a small output; returns its digest.
async fn cached_action(t: &Target) -> Digest {
    let out = unique(1000);
    let od = Digest::of_bytes(&out);
    cas(t)
        .batch_update_blobs(remexec::BatchUpdateBlobsRequest {
            instance_name: t.instance.clone(),
            requests: vec![remexec::batch_update_blobs_request::Request {
                digest: Some(od.into()),
                data: out,
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let action = Digest::of_bytes(&unique(64));
    ActionCacheClient::new(t.channel.clone())
        .update_action_result(remexec::UpdateActionResultRequest {
            instance_name: t.instance.clone(),
            action_digest: Some(action.into()),
            action_result: Some(remexec::ActionResult {
                output_files: vec![remexec::OutputFile {
                    path: "out".into(),
                    digest: Some(od.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    action
}

/// One GetActionResult; `Err` when the server refused it (e.g. casd's concurrent-RPC limit).
async fn get_ar(t: &Target, action: Digest) -> Result<Duration, tonic::Status> {
    let start = Instant::now();
    ActionCacheClient::new(t.channel.clone())
        .get_action_result(remexec::GetActionResultRequest {
            instance_name: t.instance.clone(),
            action_digest: Some(action.into()),
            ..Default::default()
        })
        .await?;
    Ok(start.elapsed())
}

async fn get_action_result(t: &Target, calls: usize) -> (f64, f64) {
    let action = cached_action(t).await;
    let mut samples = vec![];
    for _ in 0..calls {
        samples.push(get_ar(t, action).await.unwrap());
    }
    let c1 = median(&mut samples).as_secs_f64() * 1e6;
    let start = Instant::now();
    let total = calls * 4;
    let results: Vec<_> = futures::stream::iter(0..total)
        .map(|_| get_ar(t, action))
        .buffer_unordered(64)
        .collect()
        .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    if ok < total {
        eprintln!(
            "server rows: {} refused {} of {total} GetActionResult calls at concurrency 64 ({:?}); counting answered calls only",
            t.name,
            total - ok,
            results
                .iter()
                .find_map(|r| r.as_ref().err())
                .map(|e| e.message().to_owned())
        );
    }
    let per_s = ok as f64 / start.elapsed().as_secs_f64();
    (c1, per_s)
}

/// One write then read of a fresh `mib` MiB blob: (write, read) durations.
async fn bytestream_once(t: &Target, mib: usize) -> (Duration, Duration) {
    let blob = unique(mib << 20);
    let d = Digest::of_bytes(&blob);
    let name = resource(
        &t.instance,
        format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        ),
    );
    let msgs: Vec<WriteRequest> = blob
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: ((i + 1) << 20) >= blob.len(),
            data: c.to_vec(),
        })
        .collect();
    let start = Instant::now();
    ByteStreamClient::new(t.channel.clone())
        .write(futures::stream::iter(msgs))
        .await
        .unwrap();
    let write = start.elapsed();
    let start = Instant::now();
    let mut stream = ByteStreamClient::new(t.channel.clone())
        .max_decoding_message_size(16 << 20)
        .read(ReadRequest {
            resource_name: resource(&t.instance, format!("blobs/{}/{}", d.hash, d.size_bytes)),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0usize;
    while let Some(m) = stream.next().await {
        n += m.unwrap().data.len();
    }
    let read = start.elapsed();
    assert_eq!(n, blob.len(), "{}", t.name);
    (write, read)
}

/// ByteStream write and read throughput (MiB/s, medians) per target. The targets take turns
/// rep by rep, so the disk's mood (writeback, the host's cache) falls on all of them alike.
async fn bytestream(targets: &[Target], mib: usize, reps: usize) -> Vec<(f64, f64)> {
    let mut times: Vec<(Vec<Duration>, Vec<Duration>)> = vec![(vec![], vec![]); targets.len()];
    for _ in 0..reps {
        for (t, (w, r)) in targets.iter().zip(times.iter_mut()) {
            let (write, read) = bytestream_once(t, mib).await;
            w.push(write);
            r.push(read);
        }
    }
    let mib_s = |d: Duration| mib as f64 / d.as_secs_f64();
    times
        .into_iter()
        .map(|(mut w, mut r)| (mib_s(median(&mut w)), mib_s(median(&mut r))))
        .collect()
}

/// A report row: its name, whether higher is better, and each server's value.
type Row = (&'static str, bool, Vec<(&'static str, f64)>);

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Runs every row against the servers that are reachable; `None` when `recache serve` is not
/// (nothing to compare). `quick`: fewer repetitions; `mib`: the ByteStream blob's size.
pub async fn report(quick: bool, mib: usize) -> Option<serde_json::Value> {
    let reps = if quick { 3 } else { 7 };
    let mut targets = vec![];
    for (name, var) in [
        ("recache", "RECACHE_TEST_RECACHE"),
        ("casd", "RECACHE_TEST_CASD"),
        ("buildgrid", "RECACHE_TEST_BUILDGRID"),
    ] {
        match connect(name, var).await {
            Some(t) => targets.push(t),
            None => eprintln!("server rows: {var} is not set or not reachable; {name} left out"),
        }
    }
    if !targets.iter().any(|t| t.name == "recache") {
        return None;
    }
    let mut report = serde_json::Map::new();
    let mut rows: Vec<Row> = vec![
        ("find_missing_10k_ms", false, vec![]),
        ("batch_read_1000x4k_ms", false, vec![]),
        ("get_action_result_c1_us", false, vec![]),
        ("get_action_result_c64_per_s", true, vec![]),
        ("bytestream_write_mib_s", true, vec![]),
        ("bytestream_read_mib_s", true, vec![]),
    ];
    let streams = bytestream(&targets, mib, if quick { 3 } else { 5 }).await;
    for (t, (w, r)) in targets.iter().zip(streams) {
        let fm = find_missing(t, reps).await;
        let br = batch_read(t, reps).await;
        let (c1, c64) = get_action_result(t, if quick { 200 } else { 1000 }).await;
        for (row, v) in rows.iter_mut().zip([fm, br, c1, c64, w, r]) {
            row.2.push((t.name, round(v)));
        }
    }
    for (row, higher_better, values) in &rows {
        let mut obj = serde_json::Map::new();
        for (name, v) in values {
            obj.insert((*name).into(), serde_json::json!(v));
        }
        let ours = values
            .iter()
            .find(|(n, _)| *n == "recache")
            .map(|(_, v)| *v);
        for (name, v) in values.iter().filter(|(n, _)| *n != "recache") {
            if let Some(o) = ours {
                // Throughput ratio: above 1 means recache serve is faster.
                let ratio = if *higher_better { o / v } else { v / o };
                obj.insert(
                    format!("ratio_vs_{name}"),
                    serde_json::json!((ratio * 100.0).round() / 100.0),
                );
            }
        }
        report.insert((*row).into(), serde_json::Value::Object(obj));
    }
    report.insert("blob_mib".into(), serde_json::json!(mib));
    Some(serde_json::Value::Object(report))
}
