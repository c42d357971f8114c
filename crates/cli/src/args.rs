//! Command-line flags. Every flag can also be set by a `RECACHE_*` environment variable.

use std::path::PathBuf;
use std::time::Duration;

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
    /// Shrink the local store to at most SIZE by evicting least-recently-used blobs. Blobs a
    /// running `recache run` (or any process using the store) has leased are kept. Also removes
    /// the temp files that killed writes left in the default cache.
    Gc(GcArgs),
    /// Run a REAPI cache server (CAS, ByteStream, ActionCache, Remote Asset) for a team's builds:
    /// `recache serve --listen 127.0.0.1:8980`. Point Bazel at it with
    /// `--remote_cache=grpc://HOST:PORT`, recache with `--remote grpc://HOST:PORT`.
    Serve(Box<ServeArgs>),
    /// Measure what a cache hit costs against a cache: populate synthetic actions under a fresh
    /// namespace, then time the bare calls (the floor), hits per behavior through the runner an
    /// engine embeds, and misses with write-behind, at several concurrencies.
    /// `recache bench --remote grpc://HOST:PORT --report bench.html`.
    Bench(Box<BenchArgs>),
    /// Fetch a file by URL, once for everyone: from the local store (by --sri), else the
    /// cache's Remote Asset service (with --remote), else the URL itself, whose download is
    /// verified and pushed to the cache. `recache fetch URL… --sri sha256-… -o FILE`.
    Fetch(Box<FetchArgs>),
    /// Cache a CI job's directories by key (cargo's target/ and registry, node_modules, a
    /// ccache directory), incrementally by content, on any cache recache speaks:
    /// `recache cache save KEY PATH…`, `recache cache restore KEY --restore-key PREFIX`.
    /// A cache problem never fails the job: it is a warning and exit 0 (`--strict`: exit 1).
    #[command(subcommand)]
    Cache(CacheCommand),
}

/// `recache cache …`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Save PATH… (relative to --root; `~/…` under the home directory) under KEY: files,
    /// directories, symlinks, executable bits, empty directories and modification times.
    /// Uploads only the blobs the cache lacks. Also records KEY as the newest entry of each of
    /// its prefixes that ends at a separator (`-`, `_`, `.`, `+`), for `restore --restore-key`.
    Save(Box<CacheSaveArgs>),
    /// Restore the entry saved under KEY, else the newest entry of the first --restore-key
    /// prefix that has one, to the places it was saved from (only those paths are replaced;
    /// PATH… restores only those). Downloads only what the local store lacks.
    Restore(Box<CacheRestoreArgs>),
    /// List the entries (newest first), optionally only keys starting with PREFIX. Only the
    /// embedded default cache and file:// caches can list; REAPI servers have no listing.
    List(CacheListArgs),
    /// Delete the entry KEY: it no longer restores, by key or by prefix. Works on every cache
    /// the client may write to (the entry is overwritten with a tombstone); its blobs go by
    /// the cache's own eviction.
    Delete(CacheDeleteArgs),
    /// Cache a cargo workspace's third-party build: `recache cache rust save|restore`.
    #[command(subcommand)]
    Rust(RustCacheCommand),
}

/// `recache cache rust …`: the key is `rust-[KEY-]` + rustc's release, host and commit + the
/// profile + a hash of every Cargo.lock and Cargo.toml in the workspace; a restore falls back
/// to the newest entry of the same toolchain and profile with any lockfile. Saved: the cargo
/// home's `registry/index`, `registry/cache` and `git/db`, and `target/` without the
/// workspace's own crates (their `deps/`, `.fingerprint/` and `build/` entries, found with
/// `cargo metadata`) and without `incremental/`. Set CARGO_INCREMENTAL=0 in CI.
#[derive(Debug, Subcommand)]
pub enum RustCacheCommand {
    /// Save the workspace's third-party build and downloads.
    Save(Box<RustCacheArgs>),
    /// Restore them (exact key, else the same toolchain with any lockfile).
    Restore(Box<RustCacheArgs>),
}

#[derive(Debug, Args)]
pub struct RustCacheArgs {
    #[command(flatten)]
    pub common: CacheCommon,

    /// A key of your own to keep caches apart (e.g. the job's name).
    #[arg(long, env = "RECACHE_RUST_KEY", value_name = "KEY")]
    pub key: Option<String>,

    /// The cargo profile the job builds (part of the key).
    #[arg(
        long,
        env = "RECACHE_RUST_PROFILE",
        default_value = "dev",
        value_name = "PROFILE"
    )]
    pub profile: String,

    /// The workspace's Cargo.toml. Default: cargo's own search from the current directory.
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,

    /// Largest entry saved.
    #[arg(long, env = "RECACHE_CACHE_MAX_ENTRY_SIZE", default_value = "10G", value_name = "SIZE", value_parser = parse_size)]
    pub max_entry_size: u64,
}

/// Flags every `recache cache` command takes.
#[derive(Debug, Args)]
pub struct CacheCommon {
    #[command(flatten)]
    pub cache_dir: CacheDirArg,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Print a JSON record on stdout instead of the summary line.
    #[arg(long, env = "RECACHE_JSON")]
    pub json: bool,

    /// Exit 1 on a cache problem (server down, entry corrupt, disk full…) instead of warning
    /// and exiting 0.
    #[arg(long, env = "RECACHE_CACHE_STRICT")]
    pub strict: bool,

    /// Overall deadline in seconds for talking to the cache (`inf`: none); past it, a warning
    /// and exit 0. Writing a restored entry to disk, once started, finishes.
    #[arg(long, env = "RECACHE_CACHE_TIMEOUT", default_value = "inf", value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Duration,

    /// Bound on the local cache directory's size (LRU eviction as it fills).
    #[arg(long, env = "RECACHE_MAX_SIZE", default_value = "10G", value_name = "SIZE", value_parser = parse_size)]
    pub max_size: u64,
}

#[derive(Debug, Args)]
pub struct CacheSaveArgs {
    #[command(flatten)]
    pub common: CacheCommon,

    /// Paths are relative to this directory. Default: the current directory.
    #[arg(long, env = "RECACHE_CACHE_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Read more paths from FILE (`-`: standard input), one per line.
    #[arg(long, value_name = "FILE|-")]
    pub files_from: Option<PathBuf>,

    /// Largest entry saved (the files' total size), checked before anything is uploaded.
    #[arg(long, env = "RECACHE_CACHE_MAX_ENTRY_SIZE", default_value = "10G", value_name = "SIZE", value_parser = parse_size)]
    pub max_entry_size: u64,

    /// The key: letters, digits and `._+-`, at most 512 bytes.
    #[arg(value_name = "KEY")]
    pub key: String,

    /// What to save.
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CacheRestoreArgs {
    #[command(flatten)]
    pub common: CacheCommon,

    /// Paths are relative to this directory. Default: the current directory.
    #[arg(long, env = "RECACHE_CACHE_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// A key prefix to fall back on when KEY has no entry (repeatable, tried in order): the
    /// newest entry saved under a key starting with it. It matches at a separator (`-`, `_`,
    /// `.`, `+`) or a whole key, e.g. `linux-cargo-`.
    #[arg(long = "restore-key", value_name = "PREFIX")]
    pub restore_keys: Vec<String>,

    /// The key.
    #[arg(value_name = "KEY")]
    pub key: String,

    /// Restore only these of the saved paths. Default: all.
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CacheListArgs {
    #[command(flatten)]
    pub common: CacheCommon,

    /// Only keys starting with this.
    #[arg(value_name = "PREFIX")]
    pub prefix: Option<String>,
}

#[derive(Debug, Args)]
pub struct CacheDeleteArgs {
    #[command(flatten)]
    pub common: CacheCommon,

    /// The key.
    #[arg(value_name = "KEY")]
    pub key: String,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub cache_dir: CacheDirArg,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Expected checksum, as Subresource Integrity (`sha256-<base64>`, also sha384/sha512);
    /// repeatable, any one must match. Without one the origin is trusted.
    #[arg(long = "sri", value_name = "SRI")]
    pub sri: Vec<String>,

    /// Where to write the file. Default: the URL's last path segment, in the current directory.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Give up after this many seconds.
    #[arg(long, env = "RECACHE_FETCH_TIMEOUT", default_value = "600", value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Duration,

    /// Print a JSON record (where the bytes came from, digest, size) on stderr.
    #[arg(long, env = "RECACHE_JSON")]
    pub json: bool,

    /// The URL, and mirrors of it tried in order.
    #[arg(required = true, value_name = "URL")]
    pub urls: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub cache_dir: CacheDirArg,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Synthetic actions to put in the cache (each is then hit once per behavior and
    /// concurrency).
    #[arg(
        long,
        env = "RECACHE_BENCH_ACTIONS",
        default_value = "1000",
        value_name = "N"
    )]
    pub actions: usize,

    /// The outputs of every action: COUNTxSIZE, comma-separated, e.g. `10x4KiB,1x8MiB`.
    #[arg(
        long,
        env = "RECACHE_BENCH_OUTPUTS",
        default_value = "10x4KiB",
        value_name = "SHAPES"
    )]
    pub outputs: String,

    /// Calls in flight, comma-separated; every measurement is taken at each.
    #[arg(
        long,
        env = "RECACHE_BENCH_CONCURRENCY",
        default_value = "1,8,64",
        value_name = "LEVELS"
    )]
    pub concurrency: String,

    /// Hit behaviors to measure, comma-separated (fetch: download the outputs; validate: check
    /// they exist; defer: trust the entry).
    #[arg(
        long,
        env = "RECACHE_BENCH_BEHAVIORS",
        default_value = "fetch,validate,defer",
        value_name = "LIST"
    )]
    pub behaviors: String,

    /// Misses to run per concurrency (a local `/bin/sh` writing the outputs, then write-behind
    /// to the cache); 0 skips them.
    #[arg(
        long,
        env = "RECACHE_BENCH_MISSES",
        default_value = "100",
        value_name = "N"
    )]
    pub misses: usize,

    /// Print one JSON object on stdout instead of the table.
    #[arg(long, env = "RECACHE_JSON")]
    pub json: bool,

    /// Also write a self-contained HTML report (table and SVG charts) to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub cache_dir: CacheDirArg,

    /// Address to listen on (port 0: any free port; the real one is printed).
    #[arg(
        long,
        env = "RECACHE_SERVE_LISTEN",
        default_value = "127.0.0.1:8980",
        value_name = "HOST:PORT"
    )]
    pub listen: String,

    /// Also serve the HTTP/1.1 cache protocol (bazel-remote's REST API: `/cas/<sha256>`,
    /// `/ac/<sha256>`, `/opaque/ac/<key>`) on this address, over the same store: Bazel with
    /// `--remote_cache=http://HOST:PORT`, ccache with
    /// `remote_storage=http://HOST:PORT/opaque|layout=bazel`, curl. Off unless given.
    #[arg(long, env = "RECACHE_SERVE_HTTP_LISTEN", value_name = "HOST:PORT")]
    pub http_listen: Option<String>,

    /// Where the server keeps blobs and action results: a directory, or an S3-compatible
    /// bucket `s3://BUCKET/PREFIX` (then the folder `server` in the cache directory is the
    /// fast tier in front of it, bounded by --max-size; see the --s3-* flags). Default: the
    /// folder `server` in the cache directory.
    #[arg(
        long,
        env = "RECACHE_SERVE_STORAGE",
        value_name = "DIR|s3://BUCKET/PREFIX"
    )]
    pub storage: Option<String>,

    /// S3 endpoint URL (an S3-compatible server: MinIO, Ceph, Garage, SeaweedFS, R2…).
    /// Default: AWS S3. Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else
    /// the AWS_PROFILE (or default) profile of ~/.aws/credentials.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// S3 region.
    #[arg(
        long,
        env = "AWS_REGION",
        default_value = "us-east-1",
        value_name = "REGION"
    )]
    pub s3_region: String,

    /// Bucket addressing: path (`host/bucket`, what most S3-compatible servers need) or
    /// virtual (`bucket.host`). Default: path with --s3-endpoint, virtual without.
    #[arg(long, env = "RECACHE_S3_ADDRESSING", value_name = "STYLE", value_parser = ["path", "virtual"])]
    pub s3_addressing: Option<String>,

    /// Upload workers moving blobs from the fast tier to the bucket.
    #[arg(
        long,
        env = "RECACHE_S3_UPLOADERS",
        default_value = "4",
        value_name = "N"
    )]
    pub s3_uploaders: usize,

    /// Uploads outstanding at most; a write past it waits (--s3-queue-wait), then gets
    /// RESOURCE_EXHAUSTED. Nothing is ever dropped: the queue is journaled on disk.
    #[arg(
        long,
        env = "RECACHE_S3_QUEUE",
        default_value = "4096",
        value_name = "N"
    )]
    pub s3_queue: usize,

    /// Seconds a write waits for room in a full upload queue.
    #[arg(long, env = "RECACHE_S3_QUEUE_WAIT", default_value = "30", value_name = "SECONDS", value_parser = parse_seconds)]
    pub s3_queue_wait: Duration,

    /// Open multipart uploads under the prefix that no server's journal owns are aborted once
    /// this many seconds old (at start and hourly). Must exceed the longest upload.
    #[arg(long, env = "RECACHE_S3_SWEEP_GRACE", default_value = "86400", value_name = "SECONDS", value_parser = parse_seconds)]
    pub s3_sweep_grace: Duration,

    /// After a client's request to the bucket fails (past its retries), clients' requests
    /// leave the bucket alone this many seconds: existence checks answer "missing", reads and
    /// action results UNAVAILABLE (a miss to the client) at once, served from the fast tier
    /// meanwhile. 0: ask every time.
    #[arg(long, env = "RECACHE_S3_COOLDOWN", default_value = "10", value_name = "SECONDS", value_parser = parse_seconds)]
    pub s3_cooldown: Duration,

    /// Keep the bucket's objects while they are used: an object used when older than half of
    /// DAYS gets its age renewed (a copy onto itself inside the bucket), and objects nobody
    /// used for 1.5 × DAYS are deleted by the server's hourly sweep (or by the lifecycle rule
    /// it prints at start, if you install that instead). Anything used within DAYS stays.
    /// 0 (the default): the bucket keeps everything.
    #[arg(
        long,
        env = "RECACHE_S3_RETENTION",
        default_value = "0",
        value_name = "DAYS"
    )]
    pub s3_retention: u64,

    /// Blobs at least this large go to the bucket in parts (of 8 MiB, 2 in flight).
    #[arg(long, env = "RECACHE_S3_MULTIPART_THRESHOLD", default_value = "16M", value_name = "SIZE", value_parser = parse_size)]
    pub s3_multipart_threshold: u64,

    /// Bound on stored bytes; least-recently-used blobs are evicted past it.
    #[arg(long, env = "RECACHE_SERVE_MAX_SIZE", default_value = "10G", value_name = "SIZE", value_parser = parse_size)]
    pub max_size: u64,

    /// How large blobs are kept on disk: zstd (1 MiB frames with a seek table; reads at any
    /// offset decode one frame) or identity (plain files).
    #[arg(long, env = "RECACHE_SERVE_STORAGE_COMPRESSION", default_value = "zstd", value_name = "MODE", value_parser = ["zstd", "identity"])]
    pub storage_compression: String,

    /// Largest blob accepted (uploads above it get RESOURCE_EXHAUSTED).
    #[arg(long, env = "RECACHE_SERVE_MAX_BLOB_SIZE", default_value = "4G", value_name = "SIZE", value_parser = parse_size)]
    pub max_blob_size: u64,

    /// Free space kept on the filesystem holding the storage: an upload that would leave less
    /// evicts least-recently-used blobs first, and gets RESOURCE_EXHAUSTED if that cannot make
    /// room (so a disk that fills before --max-size never fails a write midway). Default: 1 %
    /// of the filesystem, at least 256 MiB, at most 5 %.
    #[arg(long, env = "RECACHE_SERVE_DISK_RESERVE", value_name = "SIZE", value_parser = parse_size)]
    pub disk_reserve: Option<u64>,

    /// Remote Asset FetchDirectory: the most bytes one archive may unpack to (checked while it
    /// unpacks; an archive past it is refused with ABORTED and nothing recorded).
    #[arg(long, env = "RECACHE_SERVE_ASSET_MAX_UNPACKED", default_value = "4G", value_name = "SIZE", value_parser = parse_size)]
    pub asset_max_unpacked: u64,

    /// Remote Asset FetchDirectory: the most entries (files, directories, symlinks) one
    /// archive may hold.
    #[arg(
        long,
        env = "RECACHE_SERVE_ASSET_MAX_ENTRIES",
        default_value = "500000",
        value_name = "N"
    )]
    pub asset_max_entries: u64,

    /// Remote Asset: whether the server downloads assets it has no record of from their
    /// origin (on), or serves only what clients pushed (off).
    #[arg(long, env = "RECACHE_SERVE_ASSET_FETCH", default_value = "on", value_name = "on|off", value_parser = ["on", "off"])]
    pub asset_fetch: String,

    /// Remote Asset: an origin the server may download from although it is not a global
    /// address (by default loopback, private and link-local origins are refused, also after a
    /// redirect): `host`, `host:port` or a URL prefix. Repeatable. Environment:
    /// RECACHE_SERVE_ASSET_ALLOW_ORIGIN, several separated by commas.
    #[arg(long = "asset-allow-origin", value_name = "ORIGIN")]
    pub asset_allow_origins: Vec<String>,

    /// Instance name to serve (repeatable; default: any). Others get INVALID_ARGUMENT.
    /// Environment: RECACHE_SERVE_INSTANCE_NAME, several separated by commas.
    #[arg(long = "instance-name", value_name = "NAME")]
    pub instance_names: Vec<String>,

    /// PEM certificate chain to serve TLS (grpcs://), with --tls-key.
    #[arg(
        long,
        env = "RECACHE_SERVE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(
        long,
        env = "RECACHE_SERVE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS (with --tls-cert): PEM certificate(s) of the CA that signs client
    /// certificates. Every gRPC client must present one it signed (`recache run
    /// --tls-client-cert/--tls-client-key`, Bazel's `--tls_client_certificate/--tls_client_key`);
    /// a `cert:NAME ROLE` line in --auth-tokens gives the certificates whose common name (or a
    /// subjectAltName DNS name or e-mail address) is NAME a role. The HTTP listener has no TLS.
    #[arg(
        long,
        env = "RECACHE_SERVE_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// File holding a bearer token every client must send (`authorization: Bearer …`): one
    /// token with the write role (see --auth-tokens for several, with roles).
    #[arg(long, env = "RECACHE_SERVE_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Tokens and what each may do: one `TOKEN ROLE [NAME]` per line, roles `read` (CAS, AC and
    /// ByteStream reads, FindMissing, GetTree, fetches of recorded assets), `write` (also
    /// uploads, ActionCache updates, Remote Asset pushes and downloads) and `admin`; `#`
    /// comments. `cert:SUBJECT ROLE [NAME]` gives client certificates a role (see
    /// --tls-client-ca). The common setup: CI writes, developers read. A refused call gets
    /// PERMISSION_DENIED (HTTP 403) naming the role it needs.
    #[arg(long, env = "RECACHE_SERVE_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,

    /// Write an access log: one JSON line per request (time, peer, identity, protocol, method,
    /// resource, status, bytes, duration, invocation id) to FILE (appended), or `-` for
    /// standard output.
    #[arg(long, env = "RECACHE_SERVE_ACCESS_LOG", value_name = "FILE|-")]
    pub access_log: Option<PathBuf>,

    /// With tokens configured, what a caller presenting none may do: `read`, or `none` (the
    /// default: credentials required).
    #[arg(long, env = "RECACHE_SERVE_ANONYMOUS", value_name = "ROLE", value_parser = ["read", "none"])]
    pub anonymous: Option<String>,
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

    #[command(flatten)]
    pub remote: RemoteArgs,

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

    /// Environment variable for the command (repeatable; the value is taken whole, so
    /// `--env LDFLAGS=-Wl,-O1` works). The command sees only these, plus PATH from your
    /// environment unless you set PATH yourself. Environment: RECACHE_ENV, one K=V per line.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,

    /// Kill the command after this many seconds (part of the cache key).
    #[arg(long, env = "RECACHE_TIMEOUT", value_name = "SECONDS")]
    pub timeout: Option<f64>,

    /// Input file or directory, relative to the current directory (repeatable). Default (or
    /// `--input .`): the whole current directory, minus the declared outputs and the cache
    /// directory if it is inside. Inputs are part of the cache key. Environment: RECACHE_INPUT,
    /// several separated by commas.
    #[arg(long = "input", value_name = "PATH")]
    pub inputs: Vec<PathBuf>,

    /// Output to capture and restore into the current directory (repeatable). A path ending in
    /// `/` is a directory, anything else a file. Environment: RECACHE_OUTPUT, several separated
    /// by commas.
    #[arg(long = "output", value_name = "PATH")]
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

    /// Seconds to wait for the cache lookup before running locally anyway (`inf`: no limit).
    #[arg(
        long,
        env = "RECACHE_READ_TIMEOUT",
        default_value = "10",
        value_name = "SECONDS",
        value_parser = parse_seconds
    )]
    pub read_timeout: Duration,

    /// Start the command locally too if the cache has not answered after this many seconds,
    /// and take whichever finishes first (0: off).
    #[arg(
        long,
        env = "RECACHE_SPECULATION_DELAY",
        default_value = "0",
        value_name = "SECONDS",
        value_parser = parse_seconds
    )]
    pub speculation_delay: Duration,

    /// Bound on the local cache directory's size (LRU eviction as it fills), e.g. 10G, 500M.
    /// With no --remote it is split evenly between the local store and the default cache.
    #[arg(long, env = "RECACHE_MAX_SIZE", default_value = "10G", value_name = "SIZE", value_parser = parse_size)]
    pub max_size: u64,

    /// Print a JSON record (including the action digest) on stderr instead of the summary line.
    #[arg(long, env = "RECACHE_JSON")]
    pub json: bool,

    /// Groups this run with others under one invocation on `recache serve`'s status page (sent
    /// as REAPI `tool_invocation_id`): e.g. your CI job's id, so the page shows what the job's
    /// runs hit and missed together. Default: a fresh id per run.
    #[arg(long, env = "RECACHE_INVOCATION_ID", value_name = "ID")]
    pub invocation_id: Option<String>,

    /// What this run builds, as the status page lists its misses (sent as `target_id`).
    /// Default: the command line.
    #[arg(long, env = "RECACHE_TARGET", value_name = "NAME")]
    pub target: Option<String>,

    /// What kind of step this is (sent as `action_mnemonic`), e.g. Compile. Default: the
    /// program's file name.
    #[arg(long, env = "RECACHE_MNEMONIC", value_name = "NAME")]
    pub mnemonic: Option<String>,

    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// Fills the list flags from their environment variables when none were given on the
    /// command line: RECACHE_INPUT and RECACHE_OUTPUT split on commas (paths rarely hold one),
    /// RECACHE_ENV and RECACHE_HEADER one K=V per line (values often hold commas).
    pub fn apply_list_env(&mut self) -> Result<(), String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if self.inputs.is_empty()
            && let Some(v) = var("RECACHE_INPUT")
        {
            self.inputs = v
                .split(',')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect();
        }
        if self.outputs.is_empty()
            && let Some(v) = var("RECACHE_OUTPUT")
        {
            self.outputs = v
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
        }
        fill_key_values("RECACHE_ENV", &mut self.env)?;
        self.remote.apply_list_env()
    }
}

/// Which cache to use and how to reach it (shared by `run` and `bench`).
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Remote cache: grpc://host:port, grpcs://host:port, or file:///path (a shared directory).
    /// Default: the local cache directory.
    #[arg(long = "remote", env = "RECACHE_REMOTE", value_name = "ADDRESS")]
    pub address: Option<String>,

    /// REAPI instance name on the remote.
    #[arg(
        long,
        env = "RECACHE_INSTANCE_NAME",
        default_value = "",
        value_name = "NAME"
    )]
    pub instance_name: String,

    /// Extra gRPC header for every call, e.g. `authorization=Bearer TOKEN` (repeatable; the
    /// value is taken whole, commas included). Environment: RECACHE_HEADER, one K=V per line.
    #[arg(long = "header", value_name = "K=V", value_parser = parse_key_value)]
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
}

impl RemoteArgs {
    /// Fills `--header` from RECACHE_HEADER (one K=V per line) when none was given.
    pub fn apply_list_env(&mut self) -> Result<(), String> {
        fill_key_values("RECACHE_HEADER", &mut self.headers)
    }
}

/// Fills `list` from the variable `name` (one K=V per line) when the command line gave none.
fn fill_key_values(name: &str, list: &mut Vec<(String, String)>) -> Result<(), String> {
    if list.is_empty()
        && let Ok(v) = std::env::var(name)
    {
        for line in v.lines().filter(|l| !l.trim().is_empty()) {
            list.push(parse_key_value(line).map_err(|e| format!("{name}: {e}"))?);
        }
    }
    Ok(())
}

/// Seconds as a duration: a non-negative number, or `inf` for no limit.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number of seconds {s:?}: expected e.g. 10, 0.5 or inf"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!(
            "invalid number of seconds {s:?}: must be 0 or more"
        ));
    }
    // "No limit": a year is as good as forever for one lookup, and safe for timer arithmetic.
    Ok(Duration::try_from_secs_f64(v)
        .unwrap_or(Duration::MAX)
        .min(Duration::from_secs(365 * 24 * 3600)))
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
    fn seconds() {
        assert_eq!(parse_seconds("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_seconds("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_seconds("inf").unwrap() >= Duration::from_secs(24 * 3600));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn list_values_are_taken_whole_on_the_command_line() {
        let cli = Cli::try_parse_from([
            "recache",
            "run",
            "--env",
            "LDFLAGS=-Wl,-O1",
            "--output",
            "a,b",
            "--",
            "true",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.env, vec![("LDFLAGS".into(), "-Wl,-O1".into())]);
        assert_eq!(args.outputs, vec!["a,b".to_owned()]);
    }

    #[test]
    fn flags_parse() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
