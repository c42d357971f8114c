//! `recache cache rust save|restore`: a cargo workspace's third-party build, cached the way
//! [`crate::job_cache`] caches any directories, with the key and the paths chosen for cargo.
//!
//! - Key: `rust-[KEY-]<release>-<host>-<commit>-<profile>-<lock>`: rustc's `-vV` release,
//!   host and commit (9 hex), the profile, and 16 hex of a hash of every `Cargo.lock` and
//!   `Cargo.toml` under the workspace root (not under `target/` or hidden directories). A
//!   restore falls back to the prefix without `<lock>`: the same toolchain and profile with any
//!   lockfile (most dependencies are still right; cargo rebuilds the rest).
//! - Paths: the cargo home's `registry/index`, `registry/cache` and `git/db` (`~/…` when the
//!   cargo home is under the home directory), and `target/` minus what changes with every
//!   commit: `incremental/`, and in every profile directory (`debug/`, `release/`,
//!   `<triple>/debug/`, …) the workspace's own crates: their `deps/` files, `.fingerprint/` and
//!   `build/` directories, and their uplifted outputs. So after a restore, cargo compiles only
//!   the workspace's crates.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::args::RustCacheArgs;
use crate::job_cache::{Dirs, SavedPath, cache_problem, parse_path, usage};
use crate::run::Failure;

/// What `cargo metadata` says of the workspace.
#[derive(Debug)]
struct Workspace {
    root: PathBuf,
    target: PathBuf,
    /// Package names (as `.fingerprint/` and `build/` name their directories).
    packages: HashSet<String>,
    /// Target names with `-` as `_` (as `deps/` names its files).
    crates: HashSet<String>,
}

fn workspace(manifest: Option<&Path>) -> Result<Workspace, Failure> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    if let Some(m) = manifest {
        cmd.arg("--manifest-path").arg(m);
    }
    let out = cmd
        .output()
        .map_err(|e| usage(format!("running cargo metadata: {e}")))?;
    if !out.status.success() {
        return Err(usage(format!(
            "cargo metadata failed (is this a cargo workspace?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| usage(format!("cargo metadata's output: {e}")))?;
    let path = |field: &str| {
        v[field]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| usage(format!("cargo metadata has no {field}")))
    };
    let mut packages = HashSet::new();
    let mut crates = HashSet::new();
    for p in v["packages"].as_array().into_iter().flatten() {
        if let Some(n) = p["name"].as_str() {
            packages.insert(n.to_owned());
            crates.insert(n.replace('-', "_"));
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(n) = t["name"].as_str() {
                crates.insert(n.replace('-', "_"));
            }
        }
    }
    Ok(Workspace {
        root: path("workspace_root")?,
        target: path("target_directory")?,
        packages,
        crates,
    })
}

/// rustc's release, host and commit (first 9 hex digits).
fn rustc() -> Result<(String, String, String), Failure> {
    let out = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .arg("-vV")
        .output()
        .map_err(|e| usage(format!("running rustc -vV: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let release = field("release:").ok_or_else(|| usage("rustc -vV gave no release"))?;
    let host = field("host:").ok_or_else(|| usage("rustc -vV gave no host"))?;
    let commit: String = field("commit-hash:")
        .unwrap_or_else(|| "unknown".into())
        .chars()
        .take(9)
        .collect();
    Ok((release, host, commit))
}

/// 16 hex digits of a hash of every Cargo.lock and Cargo.toml under `root` (their paths and
/// contents), skipping `target` and hidden directories.
fn lock_hash(root: &Path, target: &Path) -> String {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            match e.file_type() {
                Ok(t) if t.is_dir() && !name.starts_with('.') && p != target => stack.push(p),
                Ok(t) if t.is_file() && (name == "Cargo.lock" || name == "Cargo.toml") => {
                    found.push(p);
                }
                _ => {}
            }
        }
    }
    found.sort();
    let mut all = Vec::new();
    for p in found {
        all.extend_from_slice(
            p.strip_prefix(root)
                .unwrap_or(&p)
                .as_os_str()
                .as_encoded_bytes(),
        );
        all.push(0);
        all.extend(std::fs::read(&p).unwrap_or_default());
        all.push(0);
    }
    hashing::Digest::of_bytes(&all).hash.to_hex()[..16].to_owned()
}

/// The key and the fallback prefix.
fn keys(a: &RustCacheArgs, ws: &Workspace) -> Result<(String, String), Failure> {
    let (release, host, commit) = rustc()?;
    let user = a
        .key
        .as_deref()
        .map(|k| format!("{k}-"))
        .unwrap_or_default();
    let prefix = format!("rust-{user}{release}-{host}-{commit}-{}-", a.profile);
    let key = format!("{prefix}{}", lock_hash(&ws.root, &ws.target));
    crate::job_cache::validate_key(&key, "the rust key").map_err(Failure::Usage)?;
    Ok((key, prefix))
}

/// The cargo home: CARGO_HOME, else `~/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cargo"))
        })
}

/// Whether `name` (a `deps/` file, or a `.fingerprint/` or `build/` directory) is one of
/// `names` followed by `-<16 hex>` (and anything after), with an optional `lib` prefix.
fn is_crate_entry(name: &str, names: &HashSet<String>) -> bool {
    let stem = name.split('.').next().unwrap_or(name);
    let Some((base, hash)) = stem.rsplit_once('-') else {
        return false;
    };
    if hash.len() != 16 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    names.contains(base) || base.strip_prefix("lib").is_some_and(|b| names.contains(b))
}

/// Whether `name` (a file at a profile directory's top) is an uplifted output of `crates`:
/// `NAME`, `NAME.d`, `libNAME.rlib`, … (with `-` as `_` or not).
fn is_uplifted(name: &str, crates: &HashSet<String>, packages: &HashSet<String>) -> bool {
    let stem = name.split('.').next().unwrap_or(name);
    let stem = stem
        .strip_prefix("lib")
        .filter(|s| crates.contains(*s))
        .unwrap_or(stem);
    crates.contains(stem) || packages.contains(stem)
}

/// What to leave out of `target/`, relative to it: `incremental/` and the workspace's own
/// crates in every profile directory (one with a `.fingerprint/`, at depth 1 or 2).
fn prune_list(ws: &Workspace) -> Vec<PathBuf> {
    let mut profiles = Vec::new();
    let list = |d: &Path| -> Vec<(String, bool)> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            e.file_type().is_ok_and(|t| t.is_dir()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for (name, is_dir) in list(&ws.target) {
        if !is_dir {
            continue;
        }
        let p = PathBuf::from(&name);
        if ws.target.join(&p).join(".fingerprint").is_dir() {
            profiles.push(p.clone());
        }
        for (sub, sub_dir) in list(&ws.target.join(&p)) {
            let q = p.join(&sub);
            if sub_dir && ws.target.join(&q).join(".fingerprint").is_dir() {
                profiles.push(q);
            }
        }
    }
    let mut out = Vec::new();
    for prof in profiles {
        out.push(prof.join("incremental"));
        for (name, _) in list(&ws.target.join(&prof).join("deps")) {
            if is_crate_entry(&name, &ws.crates) {
                out.push(prof.join("deps").join(name));
            }
        }
        for dir in [".fingerprint", "build"] {
            for (name, _) in list(&ws.target.join(&prof).join(dir)) {
                if is_crate_entry(&name, &ws.packages) {
                    out.push(prof.join(dir).join(name));
                }
            }
        }
        for (name, is_dir) in list(&ws.target.join(&prof)) {
            if !is_dir && is_uplifted(&name, &ws.crates, &ws.packages) {
                out.push(prof.join(name));
            }
        }
    }
    out
}

fn dirs_at(root: &Path) -> Result<Dirs, Failure> {
    Dirs::new(Some(root))
}

pub async fn save(a: &RustCacheArgs) -> Result<(), Failure> {
    let ws = workspace(a.manifest_path.as_deref())?;
    let (key, _) = keys(a, &ws)?;
    let dirs = dirs_at(&ws.root)?;
    let mut paths: Vec<(SavedPath, Vec<PathBuf>)> = Vec::new();
    match parse_path(&ws.target.to_string_lossy(), &dirs) {
        Ok(p) => paths.push((p, prune_list(&ws))),
        Err(why) => crate::warnings::warn(format!("cache rust save: target/ not saved: {why}")),
    }
    if let Some(home) = cargo_home() {
        for sub in ["registry/index", "registry/cache", "git/db"] {
            match parse_path(&home.join(sub).to_string_lossy(), &dirs) {
                Ok(p) => paths.push((p, Vec::new())),
                Err(why) => crate::warnings::warn(format!("cache rust save: {why}")),
            }
        }
    }
    if paths.is_empty() {
        return Err(cache_problem("nothing to save"));
    }
    if std::env::var("CARGO_INCREMENTAL").as_deref() != Ok("0") {
        eprintln!(
            "recache: advice: set CARGO_INCREMENTAL=0 in CI: incremental/ is never cached, and \
             writing it costs build time"
        );
    }
    crate::job_cache::save_paths(&a.common, &key, &dirs, paths, a.max_entry_size).await
}

pub async fn restore(a: &RustCacheArgs) -> Result<(), Failure> {
    let ws = workspace(a.manifest_path.as_deref())?;
    let (key, prefix) = keys(a, &ws)?;
    let dirs = dirs_at(&ws.root)?;
    crate::job_cache::restore_entry(&a.common, &key, &[prefix], &dirs, Vec::new()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_workspace_crates_are_pruned() {
        let names: HashSet<String> = ["app", "my_lib"].iter().map(|s| s.to_string()).collect();
        for yes in [
            "libmy_lib-0123456789abcdef.rlib",
            "libmy_lib-0123456789abcdef.rmeta",
            "app-0123456789abcdef",
            "app-0123456789abcdef.d",
        ] {
            assert!(is_crate_entry(yes, &names), "{yes}");
        }
        for no in [
            "libitoa-0123456789abcdef.rlib",
            "app_extra-0123456789abcdef",
            "app-0123",
            "my_lib",
        ] {
            assert!(!is_crate_entry(no, &names), "{no}");
        }
        let pkgs: HashSet<String> = ["my-lib"].iter().map(|s| s.to_string()).collect();
        assert!(is_crate_entry("my-lib-0123456789abcdef", &pkgs));
        assert!(!is_crate_entry("my-lib-extra-0123456789abcdef", &pkgs));
        assert!(is_uplifted("libmy_lib.rlib", &names, &pkgs));
        assert!(is_uplifted("app", &names, &pkgs));
        assert!(is_uplifted("app.d", &names, &pkgs));
        assert!(!is_uplifted("libitoa.rlib", &names, &pkgs));
    }
}
