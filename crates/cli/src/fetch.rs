//! `recache fetch`: one file by URL through [`fetcher::Fetcher`] (local store → the cache's
//! Remote Asset service → origin), written to a path. The cache never fails a fetch: a broken
//! service is one warning and the origin; only the origin's failure or a checksum mismatch
//! fails (exit 1).

use std::path::{Path, PathBuf};
use std::time::Instant;

use fetcher::{AssetService, FetchRequest, Fetcher, Sri};
use store::{LocalStore, LocalStoreOptions, MaterializeOptions};

use crate::CliError;
use crate::args::{FetchArgs, RemoteArgs};
use crate::cache_dir::{CacheDir, human_bytes};

/// `recache fetch`: see the module docs.
pub async fn fetch(mut args: FetchArgs) -> Result<i32, CliError> {
    let started = Instant::now();
    args.remote.apply_list_env().map_err(CliError::new)?;
    let mut sri = Vec::new();
    for s in &args.sri {
        sri.extend(Sri::parse_list(s).map_err(|e| CliError::new(format!("--sri {s:?}: {e}")))?);
    }
    let output = match &args.output {
        Some(p) => p.clone(),
        None => PathBuf::from(default_name(&args.urls[0])?),
    };
    let cache = CacheDir::create(CacheDir::locate(args.cache_dir.cache_dir.clone())?)
        .map_err(CliError::new)?;
    let local = LocalStore::open(LocalStoreOptions::new(cache.store_dir()))
        .map_err(|e| CliError::new(format!("cannot open the local store: {e}")))?;
    let mut warnings = Vec::new();
    let service = match service(&args.remote, &cache).await {
        Ok(s) => s,
        Err(why) => {
            warnings.push(format!(
                "the cache is unusable ({why}); fetching from the origin"
            ));
            None
        }
    };
    let fetcher = Fetcher::new(local.clone(), service);
    let mut req = FetchRequest::new(args.urls.clone());
    req.sri = sri;
    req.timeout = args.timeout;
    req.temp_dir = cache.root().join("downloads");
    // A bar on a terminal for large downloads, from the origin or the cache's CAS.
    let from_origin = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    req.progress = Some(from_origin.clone());
    let (store_base, watched) = (local.bytes_received(), local.clone());
    let progress = crate::progress::Progress::watching("downloading", move || {
        from_origin.load(std::sync::atomic::Ordering::Relaxed) + watched.bytes_received()
            - store_base
    });
    let fetched = fetcher.fetch(&req).await;
    progress.finish();
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            for w in &warnings {
                eprintln!("recache: warning: {w}");
            }
            eprintln!("recache: error: fetch failed: {e}");
            return Ok(1);
        }
    };
    warnings.extend(fetched.warnings.iter().cloned());
    for w in &warnings {
        eprintln!("recache: warning: {w}");
    }
    write_output(&local, fetched.digest, &output)?;
    if args.json {
        let record = serde_json::json!({
            "source": fetched.source.label(),
            "uri": fetched.uri,
            "digest": fetched.digest.to_string(),
            "bytes": fetched.digest.size_bytes,
            "output": output.display().to_string(),
            "pushed": fetched.pushed,
            "warnings": warnings,
            "wall_time_ms": (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        });
        eprintln!("{record}");
    } else {
        eprintln!(
            "recache: fetched {} ({}) from {}{}",
            output.display(),
            human_bytes(fetched.digest.size_bytes),
            fetched.source.label(),
            if fetched.pushed {
                ", pushed to the cache"
            } else {
                ""
            }
        );
    }
    Ok(0)
}

/// The URL's last path segment, if it makes a plain file name.
fn default_name(url: &str) -> Result<String, CliError> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." || path.ends_with("://") {
        return Err(CliError::new(format!(
            "{url} does not end in a file name: say where to write it with --output"
        )));
    }
    Ok(name.to_owned())
}

/// The Remote Asset service (and its CAS) at `--remote`, when it is a REAPI server.
async fn service(remote: &RemoteArgs, cache: &CacheDir) -> Result<Option<AssetService>, String> {
    let Some(address) = &remote.address else {
        return Ok(None);
    };
    let endpoint = match address.strip_prefix("grpc://") {
        Some(rest) => format!("http://{rest}"),
        None => return Ok(None), // file:// caches have no Remote Asset service
    };
    let providers = crate::run::providers(remote, cache, 10 << 30)
        .await
        .map_err(|f| match f {
            crate::run::Failure::Usage(e) => e.0,
            crate::run::Failure::Cache(why) => why,
        })?;
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .map_err(|e| e.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    Ok(Some(AssetService {
        channel,
        instance: remote.instance_name.clone(),
        headers: remote.headers.clone(),
        cas: providers.bytes,
    }))
}

/// Writes blob `digest` to `output` whole or not at all (a temp file beside it, renamed).
fn write_output(
    local: &LocalStore,
    digest: hashing::Digest,
    output: &Path,
) -> Result<(), CliError> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = dir.join(format!(".recache-fetch-{}", uuid::Uuid::new_v4()));
    let result = local
        .materialize_file(
            digest,
            &temp,
            false,
            MaterializeOptions {
                mutable: true,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::rename(&temp, output).map_err(|e| e.to_string()));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(CliError::new(format!("writing {}: {e}", output.display())));
    }
    Ok(())
}
