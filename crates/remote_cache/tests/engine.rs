//! Runs the example engine (`examples/engine.rs`: 50 processes, 8 at a time, small and large
//! outputs, nested output directories) against a `file://` cache and each real server: for every
//! behavior the second build from a fresh store must be all hits, and every output must read
//! back right through the store API.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

use testutil::real_servers::{RealServer, ServerKind};

/// `cargo test` builds the examples next to the test binaries: target/<profile>/examples/.
fn engine_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("engine");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds examples; run it through cargo",
        bin.display()
    );
    bin
}

fn run_engine(args: &[&str]) {
    let out = Command::new(engine_binary()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}:\n{stdout}\n{stderr}");
    for behavior in ["Fetch", "Validate", "Defer"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{behavior}:")))
            .unwrap_or_else(|| panic!("no {behavior} line in:\n{stdout}"));
        assert!(
            line.contains("second build from a fresh store 50/50 hits")
                && line.contains("155 outputs read back correctly"),
            "{line}"
        );
    }
}

#[test]
fn the_example_engine_against_a_file_cache() {
    let cache = tempfile::tempdir().unwrap();
    run_engine(&[&format!("file://{}", cache.path().display())]);
}

fn against(kind: ServerKind) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(server) = rt.block_on(RealServer::require(kind)) {
        run_engine(&[&server.address, &server.instance]);
    }
}

#[test]
fn the_example_engine_against_buildgrid() {
    against(ServerKind::BuildGrid);
}

#[test]
fn the_example_engine_against_buildbox_casd() {
    against(ServerKind::BuildboxCasd);
}

#[test]
fn the_example_engine_against_recache_serve() {
    against(ServerKind::Recache);
}
