//! `recache serve`: the REAPI cache server (crates/server) behind the command line.

use std::io::Write;

use server::{CacheServer, ServerOptions};

use crate::CliError;
use crate::args::ServeArgs;
use crate::cache_dir::{CacheDir, human_bytes};

/// Serves until SIGTERM or ctrl-c.
pub async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let default_dir = || -> Result<std::path::PathBuf, CliError> {
        Ok(CacheDir::resolve(args.cache_dir.cache_dir.clone())?
            .root()
            .join("server"))
    };
    let (storage, s3) = match args.storage.as_deref() {
        Some(url) if url.starts_with("s3://") => {
            let (bucket, prefix) = parse_s3_url(url)?;
            let mut o = server::s3::S3Options::new(args.s3_endpoint.clone(), bucket);
            o.prefix = prefix;
            o.region = args.s3_region.clone();
            o.path_style = match args.s3_addressing.as_deref() {
                Some(style) => style == "path",
                None => args.s3_endpoint.is_some(),
            };
            o.multipart_threshold = args.s3_multipart_threshold.max(5 << 20);
            let mut t = server::tier::TierOptions::new(o);
            t.uploaders = args.s3_uploaders.max(1);
            t.queue = args.s3_queue.max(1);
            t.queue_wait = args.s3_queue_wait;
            t.sweep_grace = args.s3_sweep_grace;
            t.cooldown = args.s3_cooldown;
            if args.s3_retention > 0 {
                t.retention = Some(std::time::Duration::from_secs(
                    args.s3_retention.saturating_mul(86_400),
                ));
                println!("{}", lifecycle_rule(&t.s3.prefix, args.s3_retention));
            }
            (default_dir()?, Some(t))
        }
        Some(dir) => (std::path::PathBuf::from(dir), None),
        None => (default_dir()?, None),
    };
    let s3_label = s3
        .as_ref()
        .map(|t| format!(", S3 bucket {} prefix {:?}", t.s3.bucket, t.s3.prefix));
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
    let mut tokens = Vec::new();
    let mut certificate_roles = Vec::new();
    if let Some(p) = &args.auth_token_file {
        let t = String::from_utf8(read("--auth-token-file", p)?)
            .map_err(|_| CliError::new(format!("--auth-token-file {}: not UTF-8", p.display())))?;
        let t = t.trim().to_owned();
        if t.is_empty() {
            return Err(CliError::new(format!(
                "--auth-token-file {}: the file is empty",
                p.display()
            )));
        }
        tokens.push(server::Token {
            token: t,
            role: server::Role::Write,
            name: "token".into(),
        });
    }
    if let Some(p) = &args.auth_tokens {
        let text = String::from_utf8(read("--auth-tokens", p)?)
            .map_err(|_| CliError::new(format!("--auth-tokens {}: not UTF-8", p.display())))?;
        let more = server::Credentials::parse(&text)
            .map_err(|e| CliError::new(format!("--auth-tokens {}: {e}", p.display())))?;
        if more.tokens.is_empty() && more.certificates.is_empty() {
            return Err(CliError::new(format!(
                "--auth-tokens {}: no tokens in the file",
                p.display()
            )));
        }
        if !more.certificates.is_empty() && args.tls_client_ca.is_none() {
            return Err(CliError::new(format!(
                "--auth-tokens {}: `cert:` lines give roles to client certificates, which only \
                 --tls-client-ca asks for",
                p.display()
            )));
        }
        tokens.extend(more.tokens);
        certificate_roles = more.certificates;
    }
    let tls_client_ca = match &args.tls_client_ca {
        Some(p) => Some(read("--tls-client-ca", p)?),
        None => None,
    };
    let anonymous = match args.anonymous.as_deref() {
        Some("read") if tokens.is_empty() && certificate_roles.is_empty() => {
            return Err(CliError::new(
                "--anonymous read: without tokens (--auth-tokens) every caller may already do everything",
            ));
        }
        Some("read") => Some(server::Role::Read),
        _ => None,
    };
    let tls_on = tls.is_some();
    let mut allow = args.asset_allow_origins.clone();
    if allow.is_empty()
        && let Ok(v) = std::env::var("RECACHE_SERVE_ASSET_ALLOW_ORIGIN")
    {
        allow = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    let asset_policy = if args.asset_fetch == "off" {
        fetcher::download::OriginPolicy::off()
    } else {
        fetcher::download::OriginPolicy::global_only(allow)
    };
    let options = ServerOptions {
        storage: storage.clone(),
        max_size: args.max_size,
        max_blob_size: args.max_blob_size,
        disk_reserve: args.disk_reserve,
        access_log: args.access_log.clone(),
        instance_names: instance_names.clone(),
        tokens,
        certificate_roles,
        anonymous,
        tls,
        tls_client_ca,
        compress_at_rest: args.storage_compression == "zstd",
        s3,
        archive_limits: fetcher::archive::Limits {
            max_bytes: args.asset_max_unpacked,
            max_entries: args.asset_max_entries,
        },
        asset_policy,
    };
    server::return_large_buffers_to_the_system();
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
        "recache serve: listening on {}://{addr} (storage {}{}, {} in {} blobs, max {}, instances: {})",
        if tls_on { "grpcs" } else { "grpc" },
        storage.display(),
        s3_label.unwrap_or_default(),
        human_bytes(usage.total_bytes()),
        usage.total_blobs(),
        human_bytes(args.max_size),
        if instance_names.is_empty() {
            "any".to_owned()
        } else {
            instance_names.join(", ")
        }
    );
    let http = match &args.http_listen {
        Some(address) => {
            let l = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| CliError::new(format!("--http-listen {address}: {e}")))?;
            let addr = l
                .local_addr()
                .map_err(|e| CliError::new(format!("--http-listen {address}: {e}")))?;
            println!("recache serve: HTTP on http://{addr}");
            Some(l)
        }
        None => None,
    };
    let _ = std::io::stdout().flush();
    server
        .serve_with_http(listener, http, server::termination_signal())
        .await
        .map_err(|e| CliError::new(e.to_string()))?;
    println!("recache serve: stopped");
    Ok(())
}

/// What `--s3-retention DAYS` prints at start: the bucket lifecycle rule that expires exactly
/// what the server's own sweep would (objects not renewed for 1.5 × DAYS), for operators who
/// prefer the store to do the deleting.
fn lifecycle_rule(prefix: &str, days: u64) -> String {
    let expire = days.saturating_mul(3).div_ceil(2);
    format!(
        "recache serve: --s3-retention {days}: objects used within {days} days are kept (renewed \
         when used past {half} days); the server deletes objects unused for {expire} days every \
         hour. The same as a bucket lifecycle rule (aws s3api put-bucket-lifecycle-configuration \
         --bucket BUCKET --lifecycle-configuration FILE):\n\
         {{\"Rules\": [{{\"ID\": \"recache-retention\", \"Status\": \"Enabled\", \
         \"Filter\": {{\"Prefix\": \"{prefix}\"}}, \"Expiration\": {{\"Days\": {expire}}}, \
         \"AbortIncompleteMultipartUpload\": {{\"DaysAfterInitiation\": 2}}}}]}}",
        half = days / 2
    )
}

/// `s3://BUCKET/PREFIX` → (bucket, prefix ending in `/`, or empty).
fn parse_s3_url(url: &str) -> Result<(String, String), CliError> {
    let rest = url.trim_start_matches("s3://");
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_bucket {
        return Err(CliError::new(format!(
            "--storage {url}: {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')"
        )));
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|seg| seg.is_empty() && !prefix.is_empty() || seg == "." || seg == "..")
        || prefix.chars().any(char::is_control)
    {
        return Err(CliError::new(format!(
            "--storage {url}: the prefix {prefix:?} has an empty, '.' or '..' segment or a control character"
        )));
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn s3_urls_are_parsed_and_checked() {
        assert_eq!(
            parse_s3_url("s3://team-cache/ci/main/").unwrap(),
            ("team-cache".into(), "ci/main/".into())
        );
        assert_eq!(
            parse_s3_url("s3://team-cache").unwrap(),
            ("team-cache".into(), String::new())
        );
        for bad in [
            "s3://",
            "s3://Upper",
            "s3://a",
            "s3://ok-bucket/a//b",
            "s3://ok-bucket/../x",
        ] {
            let e = parse_s3_url(bad).unwrap_err().0;
            assert!(e.contains("--storage"), "{bad}: {e}");
        }
    }
}
