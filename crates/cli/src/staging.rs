//! Staging directories (`<prefix><pid>-<random>`) that restores write into before renaming
//! into place: removing a tree whatever its modes, and removing those a dead process left.

use std::path::{Path, PathBuf};

/// Removes a directory tree, making read-only directories writable on the way (a restore moves
/// aside whatever was in its place, which may hold them: Go's module cache, for one).
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(_) => {
            use std::os::unix::fs::PermissionsExt as _;
            for dir in walk_dirs(path) {
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
            }
            std::fs::remove_dir_all(path)
        }
    }
}

/// Every directory under `root` (not following symlinks), `root` first.
fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Removes the staging directories in `dir` named `<prefix><pid>-…` whose process is gone;
/// returns the names of those still there (live ones, or ones that could not be removed).
pub(crate) fn remove_stale(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let gone = pid.is_none_or(|pid| {
            pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
        });
        if gone && Path::new("/proc/self").exists() {
            match remove_tree(&e.path()) {
                Ok(()) => {
                    tracing::info!(dir = %e.path().display(), "removed a staging directory an interrupted run left");
                    continue;
                }
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cannot remove a stale staging directory")
                }
            }
        }
        found.push(PathBuf::from(name));
    }
    found
}
