//! Regenerates the REAPI bindings of `crates/reapi` from its `.proto` files.
//!
//! ```sh
//! cargo run -p reapi-codegen            # rewrite crates/reapi/src/generated/
//! cargo run -p reapi-codegen -- --check # exit 1 if the checked-in files are stale
//! ```
//!
//! The bindings are generated here, once, and checked in, rather than by a build script: an
//! engine that depends on recache then compiles neither a protobuf compiler nor a code
//! generator. `cargo test -p reapi-codegen` fails when a `.proto` changed and the generated
//! code was not regenerated.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The `.proto` files to compile, relative to `crates/reapi/proto`. Their imports of
/// `google/protobuf/*.proto` are protox's built-in well-known types, mapped to `prost_types`.
const PROTOS: &[&str] = &[
    "build/bazel/semver/semver.proto",
    "google/rpc/status.proto",
    "google/bytestream/bytestream.proto",
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/remote/asset/v1/remote_asset.proto",
];

/// `crates/reapi`: this program's crate sits in its `codegen/` folder.
fn reapi_dir() -> PathBuf {
    let codegen = Path::new(env!("CARGO_MANIFEST_DIR"));
    codegen.parent().unwrap_or(codegen).to_path_buf()
}

/// Generates every binding into `out_dir`: one `<package>.rs` file per protobuf package.
fn generate(out_dir: &Path) -> Result<(), String> {
    let proto_dir = reapi_dir().join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_dir.join(p)).collect();
    let descriptors = protox::compile(&files, [&proto_dir]).map_err(|e| format!("{e:?}"))?;
    tonic_prost_build::configure()
        // Clients build their own channels (TLS, timeouts, limits); no `connect` helper, so the
        // bindings need none of tonic's transport.
        .build_transport(false)
        // Only `recache serve` needs the server halves.
        .server_mod_attribute(".", r#"#[cfg(feature = "server")]"#)
        .out_dir(out_dir)
        .compile_fds(descriptors)
        .map_err(|e| format!("generating the bindings: {e}"))
}

/// The generated files in `dir`, sorted by name, with their contents.
fn read_generated(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.push((name, text));
        }
    }
    files.sort();
    Ok(files)
}

/// Compares freshly generated bindings with the checked-in ones; `Ok(None)` when they match.
fn stale() -> Result<Option<String>, String> {
    let fresh = tempfile::tempdir().map_err(|e| e.to_string())?;
    generate(fresh.path())?;
    let checked_in = reapi_dir().join("src/generated");
    let (want, have) = (read_generated(fresh.path())?, read_generated(&checked_in)?);
    if want == have {
        return Ok(None);
    }
    let want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    let have_names: Vec<&str> = have.iter().map(|(n, _)| n.as_str()).collect();
    let differing: Vec<&str> = want
        .iter()
        .filter(|w| !have.contains(w))
        .map(|(n, _)| n.as_str())
        .collect();
    Ok(Some(format!(
        "crates/reapi/src/generated is stale: run `cargo run -p reapi-codegen`\n  \
         expected files {want_names:?}\n  checked in     {have_names:?}\n  differing      {differing:?}"
    )))
}

fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|a| a == "--check");
    let result = if check {
        stale().map(|s| {
            s.map(|why| {
                eprintln!("{why}");
                ExitCode::FAILURE
            })
            .unwrap_or(ExitCode::SUCCESS)
        })
    } else {
        let out = reapi_dir().join("src/generated");
        std::fs::create_dir_all(&out)
            .map_err(|e| format!("creating {}: {e}", out.display()))
            .and_then(|()| generate(&out))
            .map(|()| {
                println!("wrote {}", out.display());
                ExitCode::SUCCESS
            })
    };
    result.unwrap_or_else(|e| {
        eprintln!("reapi-codegen: {e}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_bindings_match_the_proto_files() {
        match super::stale() {
            Ok(None) => {}
            Ok(Some(why)) => panic!("{why}"),
            Err(e) => panic!("reapi-codegen: {e}"),
        }
    }
}
