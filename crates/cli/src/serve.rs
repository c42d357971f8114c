//! `recache serve`: the REAPI cache server (crates/server) behind the command line.

use std::io::Write;

use server::{CacheServer, ServerOptions};

use crate::CliError;
use crate::args::ServeArgs;
use crate::cache_dir::{CacheDir, human_bytes};

/// Serves until SIGTERM or ctrl-c.
pub async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let storage = match args.storage {
        Some(s) => s,
        None => CacheDir::resolve(args.cache_dir.cache_dir)?
            .root()
            .join("server"),
    };
    let mut instance_names = args.instance_names;
    if instance_names.is_empty()
        && let Ok(v) = std::env::var("RECACHE_SERVE_INSTANCE_NAME")
    {
        instance_names = v.split(',').map(str::to_owned).collect();
    }
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| CliError::new(format!("{flag} {}: {e}", path.display())))
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((read("--tls-cert", c)?, read("--tls-key", k)?)),
        _ => None,
    };
    let auth_token = match &args.auth_token_file {
        Some(p) => {
            let t = String::from_utf8(read("--auth-token-file", p)?).map_err(|_| {
                CliError::new(format!("--auth-token-file {}: not UTF-8", p.display()))
            })?;
            let t = t.trim().to_owned();
            if t.is_empty() {
                return Err(CliError::new(format!(
                    "--auth-token-file {}: the file is empty",
                    p.display()
                )));
            }
            Some(t)
        }
        None => None,
    };
    let tls_on = tls.is_some();
    let options = ServerOptions {
        storage: storage.clone(),
        max_size: args.max_size,
        max_blob_size: args.max_blob_size,
        instance_names: instance_names.clone(),
        auth_token,
        tls,
        compress_at_rest: args.storage_compression == "zstd",
    };
    let server = CacheServer::open(options)
        .map_err(|e| CliError::new(format!("cannot open {}: {e}", storage.display())))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| CliError::new(format!("--listen {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(format!("--listen {}: {e}", args.listen)))?;
    let usage = server.store().usage();
    println!(
        "recache serve: listening on {}://{addr} (storage {}, {} in {} blobs, max {}, instances: {})",
        if tls_on { "grpcs" } else { "grpc" },
        storage.display(),
        human_bytes(usage.total_bytes()),
        usage.total_blobs(),
        human_bytes(args.max_size),
        if instance_names.is_empty() {
            "any".to_owned()
        } else {
            instance_names.join(", ")
        }
    );
    let _ = std::io::stdout().flush();
    server
        .serve(listener, server::termination_signal())
        .await
        .map_err(|e| CliError::new(e.to_string()))?;
    println!("recache serve: stopped");
    Ok(())
}
