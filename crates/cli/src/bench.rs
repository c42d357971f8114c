//! `recache bench`: what a cache hit costs against a given cache, measured the way a build
//! engine meets it.
//!
//! 1. **Populate** `--actions` synthetic actions under a fresh namespace (a random id in every
//!    action's environment and in every output's bytes, so nothing collides with real entries):
//!    outputs uploaded, then one ActionResult each.
//! 2. **Floors:** the bare calls a hit has to make (plain tonic clients for `grpc://`; the
//!    provider calls for `file://` and the default cache): GetActionResult (defer's floor),
//!    + FindMissingBlobs of the outputs (validate's), + reading the outputs (fetch's).
//! 3. **Hits** per behavior through `remote_cache::RemoteCacheRunner`, the runner an engine
//!    embeds, each pass on a fresh local store (so fetch really downloads), every result checked
//!    to be a hit.
//! 4. **Misses:** fresh actions run locally (`/bin/sh` writing the outputs) with write-behind
//!    to the cache, then the time the write-behind queue takes to drain.
//!
//! Each is run at every `--concurrency` (that many in flight); latencies go into HDR
//! histograms (`hdrhistogram`), and [`crate::bench_report`] prints them (table, `--json`,
//! `--report FILE.html`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hashing::Digest;
use hdrhistogram::Histogram;
use process_execution::action::make_action;
use process_execution::{
    CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process, ResultSource,
};
use reapi::build::bazel::remote::execution::v2::{
    self as remexec, action_cache_client::ActionCacheClient,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use reapi::google::bytestream::{ReadRequest, byte_stream_client::ByteStreamClient};
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner};
use store::remote::RemoteProviders;
use store::{LocalStore, LocalStoreOptions, Store};

use crate::CliError;
use crate::args::BenchArgs;
use crate::bench_report::{Measurement, Report};
use crate::cache_dir::{CacheDir, human_bytes};
use crate::run::{Failure, providers};

/// One output shape: `count` files of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub count: usize,
    pub size: u64,
}

/// Parses `10x4KiB,1x8MiB`.
pub fn parse_shapes(s: &str) -> Result<Vec<Shape>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (count, size) = part
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("--outputs {part:?}: expected COUNTxSIZE, e.g. 10x4KiB"))?;
        let count: usize = count
            .trim()
            .parse()
            .map_err(|_| format!("--outputs {part:?}: {count:?} is not a count"))?;
        let size = crate::args::parse_size(size).map_err(|e| format!("--outputs {part:?}: {e}"))?;
        if count == 0 || size == 0 {
            return Err(format!(
                "--outputs {part:?}: count and size must be above 0"
            ));
        }
        out.push(Shape { count, size });
    }
    if out.is_empty() {
        return Err("--outputs is empty: give shapes like 10x4KiB,1x8MiB".into());
    }
    Ok(out)
}

/// Parses `1,8,64`.
pub fn parse_concurrency(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<usize>() {
            Ok(n) if (1..=4096).contains(&n) => out.push(n),
            _ => {
                return Err(format!(
                    "--concurrency {part:?}: expected a number from 1 to 4096"
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("--concurrency is empty: give levels like 1,8,64".into());
    }
    Ok(out)
}

fn parse_behaviors(s: &str) -> Result<Vec<CacheContentBehavior>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let b: CacheContentBehavior = part
            .parse()
            .map_err(|e: String| format!("--behaviors: {e}"))?;
        if !out.contains(&b) {
            out.push(b);
        }
    }
    if out.is_empty() {
        return Err("--behaviors is empty: give some of fetch,validate,defer".into());
    }
    Ok(out)
}

pub fn behavior_name(b: CacheContentBehavior) -> &'static str {
    match b {
        CacheContentBehavior::Fetch => "fetch",
        CacheContentBehavior::Validate => "validate",
        CacheContentBehavior::Defer => "defer",
    }
}

/// Deterministic bytes unique to (namespace, action, output): a xorshift stream seeded from
/// all three, so outputs never collide with real blobs or with another run's.
fn output_bytes(namespace: &str, action: usize, output: usize, size: u64) -> Vec<u8> {
    let seed = Digest::of_bytes(format!("{namespace}/{action}/{output}").as_bytes());
    let mut state = u64::from_le_bytes(seed.hash.0[..8].try_into().unwrap_or([7; 8])) | 1;
    let mut out = Vec::with_capacity(size as usize);
    while (out.len() as u64) < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size as usize);
    out
}

/// The synthetic process of action `index` in `namespace`: a shell script that writes its
/// outputs (run only for misses), with the namespace and index in its environment (so its
/// action digest is new).
fn synthetic_process(namespace: &str, index: usize, shapes: &[Shape]) -> Process {
    let mut script = String::from("mkdir -p out");
    let mut files = Vec::new();
    for (k, (shape_no, shape)) in shapes
        .iter()
        .enumerate()
        .flat_map(|(s, sh)| (0..sh.count).map(move |_| (s, *sh)))
        .enumerate()
    {
        let name = format!("out/{shape_no}-{k}.bin");
        script.push_str(&format!(" && head -c {} /dev/urandom > {name}", shape.size));
        files.push(name);
    }
    Process::new(["/bin/sh", "-c", &script])
        .env("RECACHE_BENCH_NAMESPACE", namespace)
        .env("RECACHE_BENCH_ACTION", index.to_string())
        .output_files(files)
}

/// An action put in the cache by [`populate`].
struct Cached {
    process: Process,
    action: Digest,
    outputs: Vec<Digest>,
}

/// What [`populate`] wrote.
struct Populated {
    actions: Vec<Cached>,
    blobs: u64,
    bytes: u64,
    took: Duration,
}

async fn populate(
    providers: &RemoteProviders,
    namespace: &str,
    n: usize,
    shapes: &[Shape],
) -> Result<Populated, CliError> {
    let started = Instant::now();
    let batch_max = providers.bytes.max_batch_blob_size();
    let results: Vec<Result<(Cached, u64, u64), CliError>> = futures::stream::iter(0..n)
        .map(|i| async move {
            let process = synthetic_process(namespace, i, shapes);
            let action = make_action(&process).action_digest;
            let mut small: Vec<(Digest, Bytes)> = Vec::new();
            let mut output_files = Vec::new();
            let mut outputs = Vec::new();
            let (mut blobs, mut bytes) = (0u64, 0u64);
            for (k, path) in process.output_files.iter().enumerate() {
                let size = shapes
                    .iter()
                    .flat_map(|s| std::iter::repeat_n(s.size, s.count))
                    .nth(k)
                    .unwrap_or(1);
                let data = Bytes::from(output_bytes(namespace, i, k, size));
                let d = Digest::of_bytes(&data);
                if d.size_bytes <= batch_max {
                    small.push((d, data));
                } else {
                    providers
                        .bytes
                        .store_bytes(d, data)
                        .await
                        .map_err(|e| CliError::new(format!("uploading output {d}: {e}")))?;
                }
                blobs += 1;
                bytes += size;
                outputs.push(d);
                output_files.push(remexec::OutputFile {
                    path: path.clone(),
                    digest: Some(d.into()),
                    ..Default::default()
                });
            }
            if !small.is_empty() {
                providers
                    .bytes
                    .store_batch(small)
                    .await
                    .map_err(|e| CliError::new(format!("uploading outputs: {e}")))?;
            }
            let result = remexec::ActionResult {
                output_files,
                ..Default::default()
            };
            providers
                .action_cache
                .update_action_result(action, result)
                .await
                .map_err(|e| CliError::new(format!("writing the action result {action}: {e}")))?;
            Ok((
                Cached {
                    process,
                    action,
                    outputs,
                },
                blobs,
                bytes,
            ))
        })
        .buffered(8)
        .collect()
        .await;
    let mut actions = Vec::with_capacity(n);
    let (mut blobs, mut bytes) = (0, 0);
    for r in results {
        let (c, b, s) = r?;
        actions.push(c);
        blobs += b;
        bytes += s;
    }
    Ok(Populated {
        actions,
        blobs,
        bytes,
        took: started.elapsed(),
    })
}

/// How floors are measured: bare tonic calls (grpc://) or the provider calls (others).
enum Floors {
    Grpc {
        channel: tonic::transport::Channel,
        instance: String,
        batch_max: u64,
    },
    Providers(RemoteProviders),
}

impl Floors {
    async fn new(address: Option<&str>, instance: &str, providers: &RemoteProviders) -> Floors {
        if let Some(rest) = address.and_then(|a| a.strip_prefix("grpc://"))
            && let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{rest}"))
            && let Ok(channel) = endpoint
                .tcp_nodelay(true)
                .initial_stream_window_size(Some(16 << 20))
                .initial_connection_window_size(Some(32 << 20))
                .connect()
                .await
        {
            return Floors::Grpc {
                channel,
                instance: instance.to_owned(),
                batch_max: providers.bytes.max_batch_blob_size(),
            };
        }
        Floors::Providers(providers.clone())
    }

    fn kind(&self) -> &'static str {
        match self {
            Floors::Grpc { .. } => "bare gRPC calls (tonic)",
            Floors::Providers(_) => "the cache provider's calls",
        }
    }

    /// The calls a `behavior` hit of `a` makes, and nothing else.
    async fn once(&self, behavior: CacheContentBehavior, a: &Cached) -> Result<(), String> {
        match self {
            Floors::Grpc {
                channel,
                instance,
                batch_max,
            } => {
                let ar = ActionCacheClient::new(channel.clone())
                    .get_action_result(remexec::GetActionResultRequest {
                        instance_name: instance.clone(),
                        action_digest: Some(a.action.into()),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("GetActionResult: {e}"))?
                    .into_inner();
                let digests: Vec<remexec::Digest> = ar
                    .output_files
                    .iter()
                    .filter_map(|f| f.digest.clone())
                    .collect();
                let mut cas = ContentAddressableStorageClient::new(channel.clone())
                    .max_decoding_message_size(64 << 20);
                match behavior {
                    CacheContentBehavior::Defer => {}
                    CacheContentBehavior::Validate => {
                        cas.find_missing_blobs(remexec::FindMissingBlobsRequest {
                            instance_name: instance.clone(),
                            blob_digests: digests,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| format!("FindMissingBlobs: {e}"))?;
                    }
                    CacheContentBehavior::Fetch => {
                        let (small, large): (Vec<_>, Vec<_>) = digests
                            .into_iter()
                            .partition(|d| d.size_bytes as u64 <= *batch_max);
                        if !small.is_empty() {
                            cas.batch_read_blobs(remexec::BatchReadBlobsRequest {
                                instance_name: instance.clone(),
                                digests: small,
                                ..Default::default()
                            })
                            .await
                            .map_err(|e| format!("BatchReadBlobs: {e}"))?;
                        }
                        for d in large {
                            let prefix = if instance.is_empty() {
                                String::new()
                            } else {
                                format!("{instance}/")
                            };
                            let mut s = ByteStreamClient::new(channel.clone())
                                .max_decoding_message_size(64 << 20)
                                .read(ReadRequest {
                                    resource_name: format!(
                                        "{prefix}blobs/{}/{}",
                                        d.hash, d.size_bytes
                                    ),
                                    read_offset: 0,
                                    read_limit: 0,
                                })
                                .await
                                .map_err(|e| format!("ByteStream.Read: {e}"))?
                                .into_inner();
                            while let Some(m) = s.next().await {
                                m.map_err(|e| format!("ByteStream.Read: {e}"))?;
                            }
                        }
                    }
                }
                Ok(())
            }
            Floors::Providers(p) => {
                p.action_cache
                    .get_action_result(a.action)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("the action result is gone")?;
                match behavior {
                    CacheContentBehavior::Defer => {}
                    CacheContentBehavior::Validate => {
                        p.bytes
                            .list_missing_digests(&mut a.outputs.iter().copied())
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    CacheContentBehavior::Fetch => {
                        let max = p.bytes.max_batch_blob_size();
                        let (small, large): (Vec<Digest>, Vec<Digest>) =
                            a.outputs.iter().partition(|d| d.size_bytes <= max);
                        p.bytes.load_batch(small).await.map_err(|e| e.to_string())?;
                        for d in large {
                            p.bytes
                                .load(d, &mut Discard)
                                .await
                                .map_err(|e| e.to_string())?;
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// A runner over a fresh local store in `dir`, as an engine builds one.
fn machine(
    dir: &Path,
    providers: &RemoteProviders,
    behavior: CacheContentBehavior,
    write: bool,
) -> Result<(RemoteCacheRunner, Store), CliError> {
    let local = LocalStore::open(LocalStoreOptions::new(dir.join("store")))
        .map_err(|e| CliError::new(format!("cannot open a bench store: {e}")))?;
    let store = Store::with_remote(local, providers.bytes.clone());
    let sandboxes = dir.join("sandboxes");
    let runner = RemoteCacheRunner::wrapping(
        store.clone(),
        providers.action_cache.clone(),
        RemoteCacheOptions {
            cache_content_behavior: behavior,
            cache_write: write,
            ..Default::default()
        },
        |inner_store| {
            Arc::new(LocalRunner::new(
                inner_store,
                LocalRunnerOptions::new(sandboxes),
            ))
        },
    );
    Ok((runner, store))
}

/// A latency histogram in microseconds: 1 µs to 10 min at 3 significant figures.
#[allow(clippy::expect_used)] // constant, valid bounds: this cannot fail
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_nanos() as u64).div_ceil(1000).max(1);
    h.saturating_record(us);
}

/// Runs `op` over `items` with `concurrency` in flight; returns the latency histogram, the
/// wall time, and the errors (counted, first kept).
async fn measure<'a, T: 'a, F, Fut>(
    items: impl IntoIterator<Item = &'a T>,
    concurrency: usize,
    op: F,
) -> (Histogram<u64>, Duration, u64, Option<String>)
where
    F: Fn(&'a T) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let timed: Vec<(Duration, Result<(), String>)> = futures::stream::iter(items)
        .map(|item| {
            let fut = op(item);
            async move {
                let s = Instant::now();
                let r = fut.await;
                (s.elapsed(), r)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut h = histogram();
    let (mut errors, mut first) = (0, None);
    for (d, r) in timed {
        match r {
            Ok(()) => record(&mut h, d),
            Err(e) => {
                errors += 1;
                first.get_or_insert(e);
            }
        }
    }
    (h, wall, errors, first)
}

/// `recache bench`: see the module docs.
pub async fn bench(args: BenchArgs) -> Result<i32, CliError> {
    let mut args = args;
    args.remote.apply_list_env().map_err(CliError::new)?;
    let shapes = parse_shapes(&args.outputs).map_err(CliError::new)?;
    let levels = parse_concurrency(&args.concurrency).map_err(CliError::new)?;
    let behaviors = parse_behaviors(&args.behaviors).map_err(CliError::new)?;
    if args.actions == 0 {
        return Err(CliError::new("--actions must be at least 1"));
    }
    let cache = CacheDir::create(CacheDir::locate(args.cache_dir.cache_dir.clone())?)
        .map_err(CliError::new)?;
    let providers = providers(&args.remote, &cache, 10 << 30)
        .await
        .map_err(|f| match f {
            Failure::Usage(e) => e,
            Failure::Cache(why) => CliError::new(format!("cannot reach the cache: {why}")),
        })?;
    let target = args.remote.address.clone().unwrap_or_else(|| {
        format!(
            "the default cache ({})",
            cache.default_cache_dir().display()
        )
    });
    let namespace = format!("recache-bench-{}", uuid::Uuid::new_v4());
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    let per_action: u64 = shapes.iter().map(|s| s.count as u64 * s.size).sum();
    say(format!(
        "recache bench: {} actions × {} ({} each) against {target}, namespace {namespace}",
        args.actions,
        args.outputs,
        human_bytes(per_action)
    ));

    let populated = populate(&providers, &namespace, args.actions, &shapes).await?;
    say(format!(
        "populated {} actions: {} blobs, {} written in {:.1} s (these entries stay in the cache until it evicts them)",
        populated.actions.len(),
        populated.blobs,
        human_bytes(populated.bytes),
        populated.took.as_secs_f64()
    ));

    let work = tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(cache.root())
        .map_err(|e| CliError::new(format!("cannot create a bench directory: {e}")))?;
    let floors = Floors::new(
        args.remote.address.as_deref(),
        &args.remote.instance_name,
        &providers,
    )
    .await;
    let mut report = Report::new(
        target.clone(),
        namespace.clone(),
        args.actions,
        args.outputs.clone(),
        floors.kind(),
    );
    report.populated_blobs = populated.blobs;
    report.populated_bytes = populated.bytes;
    report.populate_s = populated.took.as_secs_f64();

    let mut pass = 0usize;
    for &c in &levels {
        for &b in &behaviors {
            let name = behavior_name(b);
            // The floor, then the hit, both over every action.
            let (h, wall, errors, first) =
                measure(&populated.actions, c, |a| floors.once(b, a)).await;
            if let Some(e) = &first {
                eprintln!(
                    "recache bench: {errors} floor calls ({name}, concurrency {c}) failed: {e}"
                );
            }
            report.push(Measurement::new("floor", name, c, h, wall, errors));

            pass += 1;
            let dir = work.path().join(format!("pass-{pass}"));
            let (runner, _store) = machine(&dir, &providers, b, false)?;
            let ctx = Context {
                build_id: namespace.clone(),
                mnemonic: "Bench".into(),
                target: String::new(),
            };
            let (h, wall, errors, first) = measure(&populated.actions, c, |a| {
                let run = runner.run(ctx.clone(), a.process.clone());
                async move {
                    match run.await {
                        Ok(r) if r.metadata.source == ResultSource::RemoteCacheHit => Ok(()),
                        Ok(r) => Err(format!("not a hit: {:?}", r.metadata.source)),
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
            .await;
            if let Some(e) = &first {
                eprintln!(
                    "recache bench: {errors} of {} hits ({name}, concurrency {c}) did not hit: {e}",
                    args.actions
                );
            }
            report.push(Measurement::new("hit", name, c, h, wall, errors));
            drop(runner);
            let _ = std::fs::remove_dir_all(&dir);
        }
        if args.misses > 0 {
            pass += 1;
            let dir = work.path().join(format!("pass-{pass}"));
            let (runner, _store) = machine(&dir, &providers, CacheContentBehavior::Fetch, true)?;
            let fresh: Vec<Process> = (0..args.misses)
                .map(|j| synthetic_process(&format!("{namespace}-miss-{c}"), j, &shapes))
                .collect();
            let ctx = Context::default();
            let (h, wall, errors, first) = measure(&fresh, c, |p| {
                let run = runner.run(ctx.clone(), p.clone());
                async move {
                    match run.await {
                        Ok(r)
                            if r.exit_code == 0
                                && r.metadata.source != ResultSource::RemoteCacheHit =>
                        {
                            Ok(())
                        }
                        Ok(r) => Err(format!("exit {} from {:?}", r.exit_code, r.metadata.source)),
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
            .await;
            if let Some(e) = &first {
                eprintln!("recache bench: {errors} misses (concurrency {c}) failed: {e}");
            }
            let drain = Instant::now();
            let flush = runner.finish().await;
            let mut m = Measurement::new("miss", "write-behind", c, h, wall, errors);
            m.flush_s = Some(drain.elapsed().as_secs_f64());
            m.written = Some(flush.written);
            report.push(m);
            drop(runner);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.report {
        std::fs::write(path, report.html()).map_err(|e| {
            CliError::new(format!("cannot write the report {}: {e}", path.display()))
        })?;
        if !args.json {
            println!("report: {}", path.display());
        }
    }
    let failed: u64 = report.rows.iter().map(|r| r.errors).sum();
    Ok(if failed == 0 { 0 } else { 1 })
}

/// A download destination that keeps nothing (a floor reads, it does not store).
struct Discard;

impl tokio::io::AsyncWrite for Discard {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl store::LoadDestination for Discard {
    async fn reset(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_levels_parse() {
        assert_eq!(
            parse_shapes("10x4KiB, 1x8MiB"),
            Ok(vec![
                Shape {
                    count: 10,
                    size: 4096
                },
                Shape {
                    count: 1,
                    size: 8 << 20
                }
            ])
        );
        for bad in ["", "10", "0x4K", "3x0", "x4K", "2xlots"] {
            assert!(parse_shapes(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_concurrency("1,8,64"), Ok(vec![1, 8, 64]));
        for bad in ["", "0", "-1", "1,x"] {
            assert!(parse_concurrency(bad).is_err(), "{bad}");
        }
        assert!(parse_behaviors("fetch,nope").is_err());
    }

    #[test]
    fn synthetic_actions_are_new_per_namespace_and_index() {
        let shapes = parse_shapes("2x4K").unwrap_or_default();
        let a = make_action(&synthetic_process("ns1", 0, &shapes)).action_digest;
        let b = make_action(&synthetic_process("ns1", 1, &shapes)).action_digest;
        let c = make_action(&synthetic_process("ns2", 0, &shapes)).action_digest;
        assert!(a != b && a != c && b != c);
        assert_ne!(output_bytes("ns1", 0, 0, 64), output_bytes("ns2", 0, 0, 64));
        assert_eq!(output_bytes("ns1", 0, 0, 100).len(), 100);
    }
}
