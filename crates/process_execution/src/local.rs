//! The local runner: runs a process in a fresh sandbox on this machine.
//!
//! 1. Wait for a slot (bounded parallelism, default: the number of cores).
//! 2. Make a sandbox directory under the configured root and materialize the input root into
//!    `<sandbox>/root` (pool files by read-only hardlink).
//! 3. Spawn the process in its own process group, with exactly the Process's environment,
//!    stdout/stderr going straight to files (never held in memory).
//! 4. On timeout, or if the `run` future is dropped, SIGKILL the whole process group.
//! 5. Capture stdout, stderr and the declared outputs into the store; outputs that were not
//!    produced are simply absent; outputs that escape the sandbox (through a symlink) are an
//!    error.
//! 6. Remove the sandbox (or keep it, for debugging).
//!
//! A sandbox is removed when its last user is done: the `run` future *and* any blocking task
//! still writing into it (a cancelled run's materialize keeps going on its thread; removing the
//! directory under it would let it re-create half a tree). Each sandbox holds a `lock` file,
//! flock'd while it is in use, so a runner starting up clears the sandboxes crashed or killed
//! runs left behind, and never one in use by another process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use hashing::Digest;
use store::directory::{DirectoryBuilder, validate_name};
use store::{LocalStore, MaterializeOptions, Store};
use tokio::sync::Semaphore;

use crate::process::{
    CommandRunner, Context, Process, ProcessError, ProcessResult, ResultMetadata, ResultSource,
};

/// When to keep a sandbox after the run, for debugging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeepSandboxes {
    /// Always remove it. The default.
    #[default]
    Never,
    /// Keep it when the process fails (non-zero exit or timeout).
    OnFailure,
    /// Always keep it.
    Always,
}

/// Options for [`LocalRunner::new`].
#[derive(Debug, Clone)]
pub struct LocalRunnerOptions {
    /// Directory under which sandboxes are created (created if missing).
    pub sandbox_root: PathBuf,
    /// Processes running at once; 0 (the default): the number of cores.
    pub parallelism: usize,
    /// Keep sandboxes after runs.
    pub keep_sandboxes: KeepSandboxes,
    /// Where to leave each finished run's sandbox for the caller (see [`RanSandbox`]).
    /// Default `None`: sandboxes are removed after the run.
    pub handoff: Option<SandboxHandoff>,
}

impl LocalRunnerOptions {
    /// Defaults, with sandboxes under `sandbox_root`.
    pub fn new(sandbox_root: impl Into<PathBuf>) -> LocalRunnerOptions {
        LocalRunnerOptions {
            sandbox_root: sandbox_root.into(),
            parallelism: 0,
            keep_sandboxes: KeepSandboxes::Never,
            handoff: None,
        }
    }
}

/// A finished local run's sandbox, handed to the caller instead of removed: what the command
/// produced (stdout, stderr, outputs) as it wrote them, for a caller that must give the user
/// the command's result even when the store cannot (a full disk, a file name REAPI cannot
/// represent, a blob another process evicted), without running the command again. The
/// directory is removed when this is dropped.
#[derive(Debug)]
pub struct RanSandbox {
    sandbox: Arc<Sandbox>,
    working_directory: String,
    /// The command's exit code (the negated signal number when a signal ended it).
    pub exit_code: i32,
    /// Whether the command was killed for running past its timeout.
    pub timed_out: bool,
    /// The captured outputs' lease (when capturing succeeded): they stay in the store as long
    /// as the sandbox is kept.
    _held: Option<store::Lease>,
}

impl RanSandbox {
    /// The file holding the command's stdout.
    pub fn stdout(&self) -> PathBuf {
        self.sandbox.path().join("stdout")
    }

    /// The file holding the command's stderr.
    pub fn stderr(&self) -> PathBuf {
        self.sandbox.path().join("stderr")
    }

    /// Where the command wrote the output at `path` (relative to its working directory).
    pub fn output(&self, path: &str) -> PathBuf {
        self.sandbox
            .path()
            .join("root")
            .join(&self.working_directory)
            .join(path)
    }
}

/// Where a [`LocalRunner`] leaves the sandbox of its latest finished run (see [`RanSandbox`]).
/// Set one in [`LocalRunnerOptions::handoff`] and keep a clone: each run that finishes its
/// command puts its sandbox there (before its outputs are captured, so it is there also when
/// capturing fails), replacing the one before.
///
/// ```
/// let handoff = process_execution::SandboxHandoff::default();
/// let options = process_execution::LocalRunnerOptions {
///     handoff: Some(handoff.clone()),
///     ..process_execution::LocalRunnerOptions::new("/tmp/sandboxes")
/// };
/// # let _ = options;
/// // ... after a run: handoff.take() gives its stdout, stderr and outputs as files.
/// assert!(handoff.take().is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct SandboxHandoff(Arc<std::sync::Mutex<Option<RanSandbox>>>);

impl SandboxHandoff {
    /// The latest finished run's sandbox, if any (then the handoff is empty).
    pub fn take(&self) -> Option<RanSandbox> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn put(&self, ran: RanSandbox) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(ran);
    }
}

/// Runs processes on this machine. See the module docs.
#[derive(Debug, Clone)]
pub struct LocalRunner {
    store: Store,
    options: LocalRunnerOptions,
    slots: Arc<Semaphore>,
}

impl LocalRunner {
    /// A runner reading inputs from and writing outputs to `store`. Clears sandboxes left
    /// under `sandbox_root` by runs that no longer exist (kept ones are left alone).
    pub fn new(store: Store, options: LocalRunnerOptions) -> LocalRunner {
        let LocalRunnerOptions {
            sandbox_root,
            parallelism,
            keep_sandboxes,
            handoff,
        } = options;
        clear_stale_sandboxes(&sandbox_root);
        // Asked only when needed: reading the CPU count (cgroup files) costs a short-lived
        // process that runs one command more than the command's own bookkeeping.
        let parallelism = match parallelism {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        LocalRunner {
            store,
            slots: Arc::new(Semaphore::new(parallelism.max(1))),
            options: LocalRunnerOptions {
                sandbox_root,
                parallelism: parallelism.max(1),
                keep_sandboxes,
                handoff,
            },
        }
    }

    /// The store the runner uses.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Captures of a run's outputs before giving up on a store that keeps losing them (another
/// process's GC evicting each as it is stored).
const CAPTURE_ATTEMPTS: usize = 3;

/// Prefix of sandbox directories under the sandbox root.
const SANDBOX_PREFIX: &str = "recache-sandbox-";
/// File in a sandbox, flock'd by the run using it.
const SANDBOX_LOCK: &str = "lock";
/// File in a sandbox kept for debugging: never cleared.
const SANDBOX_KEPT: &str = "KEPT";

/// A sandbox directory and the lock that says it is in use. Shared (`Arc`) by the run and the
/// blocking tasks working in it; the directory goes when the last of them drops it.
#[derive(Debug)]
struct Sandbox {
    dir: tempfile::TempDir,
    _lock: std::fs::File,
}

impl Sandbox {
    fn create(root: &Path) -> Result<Arc<Sandbox>, ProcessError> {
        let dir = tempfile::Builder::new()
            .prefix(SANDBOX_PREFIX)
            .tempdir_in(root)
            .map_err(|e| storage(format!("creating a sandbox: {e}")))?;
        let lock_path = dir.path().join(SANDBOX_LOCK);
        let lock = std::fs::File::create(&lock_path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|e| storage(format!("locking {}: {e}", lock_path.display())))?;
        Ok(Arc::new(Sandbox { dir, _lock: lock }))
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes sandboxes no run holds: their lock is free (its run crashed or was killed), or they
/// have no lock file and are older than a minute (an interrupted creation). Kept ones stay.
fn clear_stale_sandboxes(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut cleared = 0usize;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(SANDBOX_PREFIX) || path.join(SANDBOX_KEPT).exists() {
            continue;
        }
        let stale = match std::fs::File::open(path.join(SANDBOX_LOCK)) {
            Ok(f) => f.try_lock().is_ok(),
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(60)),
        };
        if stale && std::fs::remove_dir_all(&path).is_ok() {
            cleared += 1;
        }
    }
    if cleared > 0 {
        tracing::info!(cleared, root = %root.display(), "removed sandboxes left by interrupted runs");
    }
}

fn unclassified(what: impl std::fmt::Display) -> ProcessError {
    ProcessError::Unclassified(what.to_string())
}

/// The sandbox directory (under the cache directory) could not take what the run needs.
fn storage(what: impl std::fmt::Display) -> ProcessError {
    ProcessError::Storage(what.to_string())
}

/// Checks a relative path from a Process (working directory, output path).
fn validate_relative(kind: &str, path: &str) -> Result<(), ProcessError> {
    if path.is_empty() {
        return Ok(());
    }
    for part in path.split('/') {
        validate_name(part).map_err(|e| unclassified(format!("{kind} {path:?}: {e}")))?;
    }
    Ok(())
}

/// Process groups of the commands this process's local runners are running now.
static RUNNING_GROUPS: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn running_groups() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<i32>> {
    RUNNING_GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends signal number `signal` (e.g. `libc::SIGINT`) to the process group of every command
/// the local runners of this process are running, and returns how many it reached. Each
/// command runs in a process group of its own, so a terminal's Ctrl-C or a supervisor's SIGTERM
/// sent to the engine (or to `recache run`) does not reach it by itself: the engine forwards
/// it, waits a bounded time for the commands to finish, then drops their runs (which kills
/// what is left with SIGKILL).
pub fn signal_running(signal: i32) -> usize {
    let Ok(signal) = nix::sys::signal::Signal::try_from(signal) else {
        return 0;
    };
    running_groups()
        .iter()
        .filter(|pgid| nix::sys::signal::killpg(nix::unistd::Pid::from_raw(**pgid), signal).is_ok())
        .count()
}

/// Kills a process group when dropped, unless disarmed: the `run` future being dropped (a
/// cancelled build) must not leave the process or its children running. While it lives, the
/// group is one [`signal_running`] reaches.
struct KillGroupOnDrop(Option<i32>);

impl KillGroupOnDrop {
    fn new(pgid: Option<i32>) -> KillGroupOnDrop {
        if let Some(pgid) = pgid {
            running_groups().insert(pgid);
        }
        KillGroupOnDrop(pgid)
    }

    fn kill(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH (already gone) is fine.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        self.kill();
        if let Some(pgid) = self.0 {
            running_groups().remove(&pgid);
        }
    }
}

#[async_trait]
impl CommandRunner for LocalRunner {
    async fn run(&self, _ctx: Context, process: Process) -> Result<ProcessResult, ProcessError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| unclassified("the local runner is shut down"))?;
        let desc = if process.description.is_empty() {
            process.argv.join(" ")
        } else {
            process.description.clone()
        };
        tracing::debug!(process = %desc, "running locally");
        let start = Instant::now();
        if process.argv.is_empty() {
            return Err(unclassified("cannot run a process with an empty argv"));
        }
        validate_relative("working directory", &process.working_directory)?;
        for p in process
            .output_files
            .iter()
            .chain(&process.output_directories)
        {
            if p.is_empty() {
                return Err(unclassified("an output path may not be empty"));
            }
            validate_relative("output path", p)?;
        }

        std::fs::create_dir_all(&self.options.sandbox_root).map_err(|e| {
            storage(format!(
                "creating sandbox root {}: {e}",
                self.options.sandbox_root.display()
            ))
        })?;
        let sandbox = Sandbox::create(&self.options.sandbox_root)?;
        let root = sandbox.path().join("root");

        // Inputs: must be local (a local-only store reports MissingDigest otherwise).
        self.store
            .ensure_downloaded(HashSet::new(), HashSet::from([process.input_root]))
            .await
            .map_err(|e| ProcessError::from(e).context("fetching the input root"))?;
        let local = self.store.local().clone();
        let input_root = process.input_root;
        let root_for_blocking = root.clone();
        let in_use = sandbox.clone();
        blocking(move || {
            let _in_use = in_use; // the sandbox outlives this task, even if the run is cancelled
            local
                .materialize_directory(
                    input_root,
                    &root_for_blocking,
                    MaterializeOptions::default(),
                )
                .map_err(|e| ProcessError::from(e).context("materializing the input root"))
        })
        .await?;
        let cwd = root.join(&process.working_directory);
        for p in process
            .output_files
            .iter()
            .chain(&process.output_directories)
        {
            if let Some(parent) = cwd.join(p).parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| storage(format!("creating {}: {e}", parent.display())))?;
            }
        }
        std::fs::create_dir_all(&cwd)
            .map_err(|e| storage(format!("creating {}: {e}", cwd.display())))?;

        let stdout_path = sandbox.path().join("stdout");
        let stderr_path = sandbox.path().join("stderr");
        let open = |p: &Path| {
            std::fs::File::create(p).map_err(|e| storage(format!("creating {}: {e}", p.display())))
        };
        let program = resolve_program(&process.argv[0], process.env.get("PATH"), &cwd)?;
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&process.argv[1..])
            .env_clear()
            .envs(&process.env)
            .current_dir(&cwd)
            .stdin(std::process::Stdio::null())
            .stdout(open(&stdout_path)?)
            .stderr(open(&stderr_path)?)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| unclassified(format!("could not start {:?}: {e}", process.argv[0])))?;
        let mut group = KillGroupOnDrop::new(child.id().and_then(|id| i32::try_from(id).ok()));

        let waited = match process.timeout {
            Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
            None => Some(child.wait().await),
        };
        let (status, timed_out) = match waited {
            Some(status) => (status, false),
            None => {
                group.kill();
                (child.wait().await, true)
            }
        };
        // Whatever the process left behind in its group (daemonized children) goes too.
        group.kill();
        let status = status.map_err(|e| unclassified(format!("waiting for the process: {e}")))?;
        let exit_code = crate::exit_code_of(&status);
        // Handed over before capturing: the caller gets the command's result also when
        // capturing fails.
        let hand_over = |held: Option<store::Lease>| {
            if let Some(handoff) = &self.options.handoff {
                handoff.put(RanSandbox {
                    sandbox: sandbox.clone(),
                    working_directory: process.working_directory.clone(),
                    exit_code,
                    timed_out,
                    _held: held,
                });
            }
        };
        hand_over(None);

        // Capture stdout, stderr and outputs (blocking file work), and lease them: another
        // process's GC may evict a blob between its capture and the lease, so what is missing
        // then is captured again (the sandbox still has it).
        let local = self.store.local().clone();
        let p = process.clone();
        let in_use = sandbox.clone();
        let (stdout, stderr, output_root, held) = blocking(move || {
            let _in_use = in_use;
            for _ in 0..CAPTURE_ATTEMPTS {
                let stdout = local.store_file(&stdout_path, true)?;
                let stderr = local.store_file(&stderr_path, true)?;
                let output_root = match capture_outputs(&local, &root, &p) {
                    Ok(root) => root,
                    // A blob evicted while the outputs were checked: capture again.
                    Err(ProcessError::MissingDigest { .. }) => continue,
                    Err(e) => return Err(e),
                };
                if let Some(held) = local.lease_tree(&[output_root], &[stdout, stderr])? {
                    return Ok((stdout, stderr, output_root, held));
                }
            }
            Err(storage(format!(
                "another process's GC evicted the command's outputs from the local store as they \
                 were stored ({CAPTURE_ATTEMPTS} tries), so this run is not cached"
            )))
        })
        .await?;
        // With a handoff, the outputs stay leased for as long as the caller keeps the sandbox.
        hand_over(Some(held));

        let keep = match self.options.keep_sandboxes {
            KeepSandboxes::Always => true,
            KeepSandboxes::OnFailure => exit_code != 0 || timed_out,
            KeepSandboxes::Never => false,
        };
        if keep {
            // The blocking tasks are done: this is the last holder.
            if let Ok(sandbox) = Arc::try_unwrap(sandbox) {
                let _ = std::fs::write(sandbox.path().join(SANDBOX_KEPT), b"");
                let kept = sandbox.dir.keep();
                tracing::info!(sandbox = %kept.display(), "kept sandbox for debugging");
            }
        }
        Ok(ProcessResult {
            stdout,
            stderr,
            exit_code,
            output_root,
            metadata: ResultMetadata {
                source: ResultSource::RanLocally,
                wall_time: start.elapsed(),
                original_run_time: None,
                timed_out,
                action_digest: None,
                cache: crate::CacheOutcome::NotLookedUp,
            },
        })
    }

    async fn shutdown(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Finds `argv0` the way a shell would, but in the *process's* PATH: the standard library would
/// fall back to recache's own PATH when the process has none, which is not hermetic.
fn resolve_program(
    argv0: &str,
    path: Option<&String>,
    cwd: &Path,
) -> Result<PathBuf, ProcessError> {
    if argv0.contains('/') {
        return Ok(PathBuf::from(argv0));
    }
    let Some(path) = path else {
        return Err(unclassified(format!(
            "cannot find {argv0:?}: the process environment has no PATH; give one, or use an absolute path"
        )));
    };
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = cwd.join(dir).join(argv0);
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
            && std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(unclassified(format!(
        "cannot find {argv0:?} in the process's PATH {path:?}"
    )))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProcessError> + Send + 'static,
) -> Result<T, ProcessError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| unclassified(format!("blocking task failed: {e}")))?
}

/// Captures the declared outputs that exist into one directory, at their paths relative to the
/// working directory.
fn capture_outputs(
    store: &LocalStore,
    root: &Path,
    process: &Process,
) -> Result<Digest, ProcessError> {
    let cwd = root.join(&process.working_directory);
    let canonical_root = root
        .canonicalize()
        .map_err(|e| unclassified(format!("resolving the sandbox {}: {e}", root.display())))?;
    let escapes = |what: &str, path: &str| {
        unclassified(format!(
            "output {what} {path:?} escapes the sandbox through a symlink; refusing to capture it"
        ))
    };
    let mut builder = DirectoryBuilder::new(store);
    for f in &process.output_files {
        let p = cwd.join(f);
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue; // not produced: absent, not an error
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p)
                .map_err(|e| unclassified(format!("reading symlink {}: {e}", p.display())))?;
            let target = target.into_os_string().into_string().map_err(|t| {
                ProcessError::from(store::StoreError::new(
                    store::ErrorKind::Unrepresentable,
                    format!(
                        "output {f}: the symlink points to {t:?}, which is not UTF-8 (REAPI \
                         cannot represent it), so it cannot be cached"
                    ),
                ))
            })?;
            builder.add_symlink(f, &target)?;
            continue;
        }
        let real = p
            .canonicalize()
            .map_err(|e| unclassified(format!("resolving output {}: {e}", p.display())))?;
        if !real.starts_with(&canonical_root) {
            return Err(escapes("file", f));
        }
        if meta.is_dir() {
            return Err(unclassified(format!(
                "declared output file {f:?} is a directory; declare it as an output directory"
            )));
        }
        let exec = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
        let digest = store.store_file(&p, true)?;
        builder.add_file(f, digest, exec)?;
    }
    for d in &process.output_directories {
        let p = cwd.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        let real = p
            .canonicalize()
            .map_err(|e| unclassified(format!("resolving output {}: {e}", p.display())))?;
        if !real.starts_with(&canonical_root) {
            return Err(escapes("directory", d));
        }
        if !real.is_dir() {
            return Err(unclassified(format!(
                "declared output directory {d:?} is not a directory"
            )));
        }
        let digest = store
            .capture_directory(&real)
            .map_err(|e| e.context(format!("output directory {d}/")))?;
        builder.add_directory(d, digest)?;
    }
    let output_root = builder.build()?;
    // One rule for every symlink (store::directory::symlink_resolves_inside): it must resolve
    // inside the output root, following the links in it.
    // A blob that vanished meanwhile (another process's GC) is the store's problem, not an
    // escape.
    store
        .check_symlinks(output_root)
        .map_err(|e| match e.kind() {
            store::ErrorKind::MissingDigest(_) => ProcessError::from(e).context("checking outputs"),
            _ => unclassified(format!(
                "an output escapes the sandbox through a symlink; refusing to capture it: {e}"
            )),
        })?;
    Ok(output_root)
}
