//! Where the real REAPI servers are, as `scripts/reapi-servers.sh start` announced them.
//!
//! The script writes `.reapi/run/env.sh` with one address variable per server; the test script
//! sources it before `cargo test`. A test asks for a server with [`RealServer::require`]:
//!
//! - the variable set and the server answering: the test runs;
//! - otherwise, with `CI=true`: the test **fails** (a skipped interop test in CI is a failed one);
//! - otherwise (a developer's machine): the test prints a loud `SKIPPED` line and returns.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A real REAPI server the interop tests can talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// BuildGrid 0.9.1 (Python), cache-only configuration, instance `main`.
    BuildGrid,
    /// buildbox-casd 1.4.x (C++), instance `""`.
    BuildboxCasd,
    /// `recache serve`, this project's own server, started from the built binary.
    Recache,
    /// buildbox-casd as a proxy in front of `recache serve` (`--cas-remote`, `--ac-remote`):
    /// every call it cannot answer locally goes to our server, as a real client of it.
    CasdProxy,
}

impl ServerKind {
    /// Human name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::BuildGrid => "BuildGrid",
            ServerKind::BuildboxCasd => "buildbox-casd",
            ServerKind::Recache => "recache serve",
            ServerKind::CasdProxy => "buildbox-casd proxying to recache serve",
        }
    }

    /// The variable holding the server's `grpc://host:port` address.
    pub fn address_var(self) -> &'static str {
        match self {
            ServerKind::BuildGrid => "RECACHE_TEST_BUILDGRID",
            ServerKind::BuildboxCasd => "RECACHE_TEST_CASD",
            ServerKind::Recache => "RECACHE_TEST_RECACHE",
            ServerKind::CasdProxy => "RECACHE_TEST_CASD_PROXY",
        }
    }

    /// The variable holding the directory where the server keeps its blobs.
    pub fn storage_var(self) -> &'static str {
        match self {
            ServerKind::BuildGrid => "RECACHE_TEST_BUILDGRID_STORAGE",
            ServerKind::BuildboxCasd => "RECACHE_TEST_CASD_STORAGE",
            ServerKind::Recache => "RECACHE_TEST_RECACHE_STORAGE",
            ServerKind::CasdProxy => "RECACHE_TEST_CASD_PROXY_STORAGE",
        }
    }

    /// The variable holding the REAPI instance name to use.
    pub fn instance_var(self) -> &'static str {
        match self {
            ServerKind::BuildGrid => "RECACHE_TEST_BUILDGRID_INSTANCE",
            ServerKind::BuildboxCasd => "RECACHE_TEST_CASD_INSTANCE",
            ServerKind::Recache => "RECACHE_TEST_RECACHE_INSTANCE",
            ServerKind::CasdProxy => "RECACHE_TEST_CASD_PROXY_INSTANCE",
        }
    }
}

/// A connected real server.
#[derive(Debug, Clone)]
pub struct RealServer {
    /// Which server this is.
    pub kind: ServerKind,
    /// The address as configured, e.g. `grpc://127.0.0.1:4317`.
    pub address: String,
    /// The REAPI instance name.
    pub instance: String,
    /// A connected gRPC channel.
    pub channel: Channel,
    /// Where the server keeps its blobs, if the script said.
    pub storage: Option<std::path::PathBuf>,
}

/// True when running under CI (`CI=true`), where unreachable servers fail tests.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Turns `grpc://host:port` into the `http://host:port` URI tonic dials.
pub fn grpc_to_http(address: &str) -> String {
    match address.strip_prefix("grpc://") {
        Some(rest) => format!("http://{rest}"),
        None => address.to_owned(),
    }
}

impl RealServer {
    /// Connects to the server of `kind`, or returns `None` after printing a loud skip notice.
    ///
    /// Panics (failing the test) when `CI=true` and the server is not configured or not
    /// reachable.
    pub async fn require(kind: ServerKind) -> Option<RealServer> {
        match Self::connect(kind).await {
            Ok(server) => Some(server),
            Err(why) => {
                let msg = format!(
                    "{} interop test cannot reach the server: {why}. Start the servers with \
                     `scripts/reapi-servers.sh start` and `eval \"$(scripts/reapi-servers.sh env)\"`, \
                     or run `scripts/test.sh`.",
                    kind.name()
                );
                if in_ci() {
                    panic!("CI=true, so this is a failure, not a skip: {msg}");
                }
                eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
                None
            }
        }
    }

    async fn connect(kind: ServerKind) -> Result<RealServer, String> {
        let address = std::env::var(kind.address_var())
            .map_err(|_| format!("{} is not set", kind.address_var()))?;
        let instance = std::env::var(kind.instance_var()).unwrap_or_default();
        let endpoint = Endpoint::from_shared(grpc_to_http(&address))
            .map_err(|e| {
                format!(
                    "{}={address:?} is not a valid address: {e}",
                    kind.address_var()
                )
            })?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connecting to {address} failed: {e}"))?;
        let storage = std::env::var_os(kind.storage_var()).map(std::path::PathBuf::from);
        Ok(RealServer {
            kind,
            address,
            instance,
            channel,
            storage,
        })
    }

    /// Deletes a blob behind the server's back (both BuildGrid's disk storage and casd keep
    /// blobs at `cas/objects/<2 hex>/<62 hex>`; `recache serve` keeps them in its store, which
    /// several processes may open), to simulate a cache that lost it.
    /// Panics when the storage directory is unknown or the blob is not there.
    pub fn delete_blob(&self, digest: &hashing::Digest) {
        let storage = self
            .storage
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not set", self.kind.storage_var()));
        if self.kind == ServerKind::Recache {
            let mut options = store::LocalStoreOptions::new(storage.join("store"));
            options.pool_compression = store::PoolCompression::Zstd; // as recache serve keeps it
            let store = store::LocalStore::open(options)
                .unwrap_or_else(|e| panic!("opening the recache serve store: {e}"));
            let removed = store
                .remove(&[*digest])
                .unwrap_or_else(|e| panic!("removing {digest}: {e}"));
            assert_eq!(removed, 1, "{digest} was not in the recache serve store");
            return;
        }
        let hex = digest.hash.to_hex();
        let path = storage.join("cas/objects").join(&hex[..2]).join(&hex[2..]);
        std::fs::remove_file(&path).unwrap_or_else(|e| {
            panic!("deleting {} from {}: {e}", path.display(), self.kind.name())
        });
    }

    /// A ByteStream read resource name for `digest` on this server's instance.
    pub fn read_resource(&self, digest: &hashing::Digest) -> String {
        prefix_instance(
            &self.instance,
            &format!("blobs/{}/{}", digest.hash, digest.size_bytes),
        )
    }

    /// A ByteStream write resource name for `digest` with upload id `uuid`.
    pub fn write_resource(&self, uuid: &str, digest: &hashing::Digest) -> String {
        prefix_instance(
            &self.instance,
            &format!("uploads/{uuid}/blobs/{}/{}", digest.hash, digest.size_bytes),
        )
    }
}

fn prefix_instance(instance: &str, rest: &str) -> String {
    if instance.is_empty() {
        rest.to_owned()
    } else {
        format!("{instance}/{rest}")
    }
}

/// Spawns a `recache serve` command line (its `--listen` port 0 or not) and waits for the line
/// it prints when listening; returns the child and the `grpc://` (or `grpcs://`) address in it.
/// Panics (a test helper) when the process cannot start or prints no address.
pub fn spawn_serve(mut cmd: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting recache serve");
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("piped stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading recache serve's first line");
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("grpc://") || w.starts_with("grpcs://"))
        .unwrap_or_else(|| panic!("no address in recache serve's first line {line:?}"))
        .to_owned();
    (child, addr)
}

/// Starts `recache` (the binary at `bin`) as `serve` with both front ends on free 127.0.0.1
/// ports and its cache directory at `cache_dir`: returns the child, its grpc address and its
/// HTTP base URL (`http://HOST:PORT`), read from the lines it prints at start.
pub fn spawn_serve_with_http(
    bin: &std::path::Path,
    cache_dir: &std::path::Path,
) -> (std::process::Child, String, String) {
    spawn_serve_with_http_args(bin, cache_dir, &[])
}

/// [`spawn_serve_with_http`] with more arguments for `serve` (e.g. `--auth-tokens FILE`).
pub fn spawn_serve_with_http_args(
    bin: &std::path::Path,
    cache_dir: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, String, String) {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--cache-dir",
    ])
    .arg(cache_dir)
    .args(extra);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting recache serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut grpc, mut http) = (None, None);
    while grpc.is_none() || http.is_none() {
        let line = lines
            .next()
            .expect("recache serve printed its addresses")
            .expect("reading recache serve's output");
        for w in line.split_whitespace() {
            if w.starts_with("grpc://") || w.starts_with("grpcs://") {
                grpc = Some(w.to_owned());
            } else if w.starts_with("http://") {
                http = Some(w.to_owned());
            }
        }
    }
    // The rest of its output goes nowhere, without blocking it.
    std::thread::spawn(move || lines.for_each(drop));
    (child, grpc.unwrap_or_default(), http.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_reapi_layout() {
        let d = hashing::Digest::of_bytes(b"abc");
        assert_eq!(
            prefix_instance("main", &format!("blobs/{}/3", d.hash)),
            format!("main/blobs/{}/3", d.hash)
        );
        assert_eq!(prefix_instance("", "blobs/x/1"), "blobs/x/1");
        assert_eq!(grpc_to_http("grpc://127.0.0.1:1"), "http://127.0.0.1:1");
    }
}
