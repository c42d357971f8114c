//! A small filesystem that fills up: a tmpfs mounted for one test (needs root; under `CI=true`
//! a machine without it fails the test rather than skipping it).

use std::path::Path;
use std::process::Command;

/// Runs `f` with a tmpfs of `mib` MiB mounted at a fresh directory, unmounted afterwards (also
/// when `f` panics). Without root: a loud skip, or a failure under `CI=true`.
pub fn with_small_tmpfs(mib: u32, f: impl FnOnce(&Path)) {
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    if !root_user {
        assert!(
            !crate::real_servers::in_ci(),
            "a full-disk test needs root (to mount a tmpfs) and CI=true is set"
        );
        eprintln!("SKIPPED: a full-disk test needs root to mount a tmpfs");
        return;
    }
    let mnt = tempfile::tempdir().expect("a mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount -t tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(mnt.path());
    f(mnt.path());
}
