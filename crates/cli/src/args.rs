//! Command-line flags. Every flag can also be set by a `RECACHE_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// recache: run a command through a remote cache (REAPI), or the local default cache.
///
/// The second identical `recache run` is a cache hit: outputs are restored without running the
/// command. With no `--remote`, the cache is a directory under your user cache dir, so this
/// works with no server at all.
#[derive(Debug, Parser)]
#[command(name = "recache", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one command through the cache: `recache run [options] -- <command> [args…]`.
    Run(Box<RunArgs>),
    /// Show what the local cache holds and what it has done.
    Stats(CacheDirArg),
    /// Shrink the local store to at most SIZE by evicting least-recently-used blobs.
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct CacheDirArg {
    /// Where recache keeps its local store (and, with no --remote, the cache itself).
    /// Default: $XDG_CACHE_HOME/recache or ~/.cache/recache.
    #[arg(long, env = "RECACHE_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub cache_dir: CacheDirArg,
    /// Target size, e.g. 10G, 500M, 64K or a number of bytes.
    #[arg(long, env = "RECACHE_GC_TARGET_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub target_size: u64,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub cache_dir: CacheDirArg,

    /// Remote cache: grpc://host:port, grpcs://host:port, or file:///path (a shared directory).
    /// Default: the local cache directory.
    #[arg(long, env = "RECACHE_REMOTE", value_name = "ADDRESS")]
    pub remote: Option<String>,

    /// REAPI instance name on the remote.
    #[arg(
        long,
        env = "RECACHE_INSTANCE_NAME",
        default_value = "",
        value_name = "NAME"
    )]
    pub instance_name: String,

    /// Extra gRPC header for every call, e.g. `authorization=Bearer TOKEN` (repeatable;
    /// in RECACHE_HEADER separate several with commas).
    #[arg(long = "header", env = "RECACHE_HEADER", value_name = "K=V", value_delimiter = ',', value_parser = parse_key_value)]
    pub headers: Vec<(String, String)>,

    /// PEM CA bundle to verify a grpcs:// server (default: the system's roots).
    #[arg(long, env = "RECACHE_TLS_CA_CERT", value_name = "FILE")]
    pub tls_ca_cert: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (with --tls-client-key).
    #[arg(
        long,
        env = "RECACHE_TLS_CLIENT_CERT",
        value_name = "FILE",
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,

    /// PEM client key for mutual TLS (with --tls-client-cert).
    #[arg(
        long,
        env = "RECACHE_TLS_CLIENT_KEY",
        value_name = "FILE",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,

    /// What a hit does with outputs: fetch (download now), validate (check they exist
    /// remotely), defer (trust the entry). Outputs you ask for with --output are always fetched.
    #[arg(long, env = "RECACHE_CACHE_CONTENT_BEHAVIOR", default_value = "fetch", value_name = "MODE", value_parser = ["fetch", "validate", "defer"])]
    pub cache_content_behavior: String,

    /// Do not look the command up in the cache (always run it).
    #[arg(long, env = "RECACHE_NO_CACHE_READ")]
    pub no_cache_read: bool,

    /// Do not write the result to the cache.
    #[arg(long, env = "RECACHE_NO_CACHE_WRITE")]
    pub no_cache_write: bool,

    /// Environment variable for the command (repeatable). The command sees only these, plus
    /// PATH from your environment unless you set PATH yourself.
    #[arg(long = "env", env = "RECACHE_ENV", value_name = "K=V", value_delimiter = ',', value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,

    /// Kill the command after this many seconds (part of the cache key).
    #[arg(long, env = "RECACHE_TIMEOUT", value_name = "SECONDS")]
    pub timeout: Option<f64>,

    /// Input file or directory, relative to the current directory (repeatable). Default: the
    /// whole current directory. Inputs are part of the cache key.
    #[arg(
        long = "input",
        env = "RECACHE_INPUT",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub inputs: Vec<PathBuf>,

    /// Output to capture and restore into the current directory (repeatable). A path ending in
    /// `/` is a directory, anything else a file.
    #[arg(
        long = "output",
        env = "RECACHE_OUTPUT",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub outputs: Vec<String>,

    /// Salt for the cache key, to keep caches apart (e.g. per toolchain version).
    #[arg(
        long,
        env = "RECACHE_CACHE_NAMESPACE",
        default_value = "",
        value_name = "STRING"
    )]
    pub cache_namespace: String,

    /// Cache failures too (a cached non-zero exit counts as a hit).
    #[arg(long, env = "RECACHE_CACHE_FAILURES")]
    pub cache_failures: bool,

    /// Seconds to wait for the cache lookup before running locally anyway.
    #[arg(
        long,
        env = "RECACHE_READ_TIMEOUT",
        default_value_t = 10.0,
        value_name = "SECONDS"
    )]
    pub read_timeout: f64,

    /// Print a JSON record (including the action digest) on stderr instead of the summary line.
    #[arg(long, env = "RECACHE_JSON")]
    pub json: bool,

    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Parses `10G`, `500M`, `64K`, `123` (bytes); binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size {s:?}: expected a number with an optional K, M, G or T, e.g. 10G, 500M or 1048576"
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn key_values() {
        assert_eq!(
            parse_key_value("A=b=c").unwrap(),
            ("A".into(), "b=c".into())
        );
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("novalue").is_err());
    }

    #[test]
    fn flags_parse() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
