//! Running the real clients and servers the CLI tests drive as child processes: a guard that
//! stops a child, a command that must succeed, Bazel, and `recache serve` on the S3 test
//! bucket.

use std::path::Path;
use std::process::{Child, Command};

use crate::real_servers::in_ci;

/// A child process killed (and reaped) when the guard is dropped, also when a test fails.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to the end; its stdout and stderr together. Fails the test, naming `what` and
/// showing the output, when it does not exit 0.
pub fn output_of(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Runs Bazel (`bin`, in batch mode, its output base under `root`) in the workspace `ws`; its
/// combined output, failing the test if it fails.
pub fn bazel(bin: &str, root: &Path, ws: &Path, args: &[&str]) -> String {
    output_of(
        Command::new(bin)
            .arg(format!("--output_user_root={}", root.display()))
            .arg("--batch")
            .args(args)
            .current_dir(ws),
        &format!("bazel {args:?}"),
    )
}

/// Starts `recache serve` (the binary at `recache`) with its S3 tier on the SeaweedFS test
/// bucket under `prefix`, its fast tier in `cache_dir`; the child and its grpc address.
/// `None`, a loud skip, outside CI when the S3 servers are not running (`CI=true`: a failure).
pub fn serve_on_s3(recache: &Path, cache_dir: &Path, prefix: &str) -> Option<(Child, String)> {
    let Ok(endpoint) = std::env::var("RECACHE_TEST_S3_SEAWEED") else {
        let msg = "RECACHE_TEST_S3_SEAWEED is not set: run scripts/s3-servers.sh start";
        assert!(!in_ci(), "CI=true, so this is a failure, not a skip: {msg}");
        eprintln!("\n*** SKIPPED (not in CI): {msg}\n");
        return None;
    };
    let mut cmd = Command::new(recache);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(cache_dir)
        .args(["--storage", &format!("s3://recache-test/{prefix}")])
        .args(["--s3-endpoint", &endpoint])
        .env(
            "AWS_ACCESS_KEY_ID",
            std::env::var("RECACHE_TEST_S3_ACCESS_KEY").unwrap_or_default(),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            std::env::var("RECACHE_TEST_S3_SECRET_KEY").unwrap_or_default(),
        );
    Some(crate::real_servers::spawn_serve(cmd))
}
