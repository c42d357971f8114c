//! `recache run`: one command through remote-cache runner → local runner.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashing::Digest;
use process_execution::action::make_action;
use process_execution::{
    CacheScope, CommandRunner as _, Context, LocalRunner, LocalRunnerOptions, Process,
    ProcessError, ProcessResult, RanSandbox, ResultSource, SandboxHandoff,
};
use remote_cache::{CacheContentBehavior, RemoteCacheOptions, RemoteCacheRunner};
use store::directory::DirectoryBuilder;
use store::remote::grpc::GrpcOptions;
use store::remote::{RemoteProviders, local_dir::LocalDirProvider, provider_from_address};
use store::{ErrorKind, LocalStore, LocalStoreOptions, MaterializeOptions, Store};

use crate::CliError;
use crate::args::{RemoteArgs, RunArgs};
use crate::cache_dir::{CacheDir, RunRecord};

/// Why a cached run could not go on.
pub(crate) enum Failure {
    /// The user's mistake (bad input path, a command that cannot be started): exit 125.
    Usage(CliError),
    /// The cache (its directory, its disk, its server) failed: run the command without it.
    Cache(String),
}

impl From<CliError> for Failure {
    fn from(e: CliError) -> Self {
        Failure::Usage(e)
    }
}

/// How long a command has to finish after a forwarded SIGINT/SIGTERM/SIGHUP before it is
/// killed (SIGKILL to its process group).
const SIGNAL_GRACE: Duration = Duration::from_secs(5);

/// Runs the command; returns the exit code recache should exit with.
///
/// The promise: nothing a cache server or the cache directory does turns into a failed run.
/// A hit whose outputs cannot be fetched or restored is re-run locally; a store that cannot
/// take anything (a full disk) makes recache run the command without the cache, once, with a
/// warning. Exit 125 is left for recache's own usage errors.
///
/// SIGINT, SIGTERM and SIGHUP to recache (a terminal's Ctrl-C reaches recache's process group,
/// not the command's own) are forwarded to the command's process group; recache waits up to
/// [`SIGNAL_GRACE`] for it, then kills what is left, and exits 128 + the signal's number, its
/// sandbox and staging directories removed on the way out.
pub async fn run(args: RunArgs, started: Instant) -> Result<i32, CliError> {
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ];
    let mut streams = Vec::new();
    for (kind, number) in kinds {
        match signal(kind) {
            Ok(s) => streams.push((s, number)),
            Err(e) => tracing::warn!(error = %e, "cannot watch a signal; it will not be forwarded"),
        }
    }
    let received = async {
        let waits = streams
            .iter_mut()
            .map(|(s, n)| Box::pin(async move { s.recv().await.map(|_| *n) }));
        match futures::future::select_all(waits).await {
            (Some(n), _, _) => n,
            (None, _, _) => std::future::pending().await,
        }
    };
    let work = run_unsignalled(args, started);
    tokio::pin!(work);
    tokio::select! {
        code = &mut work => code,
        number = received => {
            let reached = process_execution::signal_running(number);
            tracing::info!(signal = number, groups = reached, "forwarded a signal to the command");
            if tokio::time::timeout(SIGNAL_GRACE, &mut work).await.is_err() {
                eprintln!(
                    "recache: the command did not stop within {} s of the signal; killing it",
                    SIGNAL_GRACE.as_secs()
                );
            }
            // Dropping the run (here, if it is still going) kills the command's group and
            // removes its sandbox and staging directories.
            Ok(128 + number)
        }
    }
}

async fn run_unsignalled(mut args: RunArgs, started: Instant) -> Result<i32, CliError> {
    args.apply_list_env().map_err(CliError::new)?;
    let cache_root = CacheDir::locate(args.cache_dir.cache_dir.clone())?;
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::new(format!("cannot read the current directory: {e}")))?;
    let behavior: CacheContentBehavior =
        args.cache_content_behavior.parse().map_err(CliError::new)?;
    let process = build_process(&args, hashing::EMPTY_DIGEST)?;

    let cache = CacheDir::create(cache_root);
    let outcome = match &cache {
        Ok(cache) => cached_run(&args, cache, &cwd, behavior, process.clone(), started).await,
        Err(why) => Err(Failure::Cache(why.clone())),
    };
    match outcome {
        Ok(code) => Ok(code),
        Err(Failure::Usage(e)) => Err(e),
        Err(Failure::Cache(why)) => {
            crate::warnings::warn(format!(
                "the cache is unusable for this run ({why}); running the command without it"
            ));
            let result = run_uncached(&process, &cwd).await?;
            let record = RunRecord::uncached(&result, behavior, started.elapsed());
            report(cache.as_ref().ok(), &record, args.json);
            Ok(exit_code(&result))
        }
    }
}

/// The whole cached path: inputs into the store, lookup or local run, outputs restored.
async fn cached_run(
    args: &RunArgs,
    cache: &CacheDir,
    cwd: &Path,
    behavior: CacheContentBehavior,
    mut process: Process,
    started: Instant,
) -> Result<i32, Failure> {
    let mut phases = crate::cache_dir::Phases::since(started);
    phases.mark("setup");
    // With the embedded default cache, the bound is shared by the store and the cache itself.
    let store_bound = if args.remote.address.is_none() {
        args.max_size / 2
    } else {
        args.max_size
    };
    let mut store_options = LocalStoreOptions::new(cache.store_dir());
    store_options.max_size = Some(store_bound);
    // One process per command: its blobs are committed when it closes the store whatever the
    // setting, and a commit thread would only add its start-up to the hit.
    store_options.write_behind = false;
    let local = LocalStore::open(store_options)
        .map_err(|e| Failure::Cache(format!("cannot open the local store: {e}")))?;
    phases.mark("open_store");
    let providers = providers(&args.remote, cache, args.max_size).await?;
    let store = Store::with_remote(local.clone(), providers.bytes.clone());
    phases.mark("connect");

    // Inputs: the current directory (minus the declared outputs and the cache directory), or
    // the --input paths.
    let outputs: Vec<String> = process
        .output_files
        .iter()
        .chain(&process.output_directories)
        .cloned()
        .collect();
    // Leased until the run is over: no GC, here or in another process, takes them meanwhile.
    let (input_root, _inputs_held) =
        capture_inputs(&local, cwd, &args.inputs, &outputs, cache).await?;
    process.input_root = input_root;
    let action_digest = make_action(&process).action_digest;
    phases.mark("capture");
    let sandboxes = cache.sandbox_dir();
    // The sandbox of the command's run, kept until recache is done: if the store cannot give
    // back what the command produced, the user gets it from there (never from a second run).
    let handoff = SandboxHandoff::default();
    let runner = RemoteCacheRunner::wrapping(
        store.clone(),
        providers.action_cache.clone(),
        RemoteCacheOptions {
            cache_read: !args.no_cache_read,
            cache_write: !args.no_cache_write,
            cache_content_behavior: behavior,
            read_timeout: args.read_timeout.max(Duration::from_millis(1)),
            speculation_delay: args.speculation_delay,
            ..Default::default()
        },
        |inner_store| {
            // One command per process: no need to ask how many cores there are.
            let options = LocalRunnerOptions {
                parallelism: 1,
                handoff: Some(handoff.clone()),
                ..LocalRunnerOptions::new(sandboxes)
            };
            Arc::new(LocalRunner::new(inner_store, options))
        },
    );

    let progress = crate::progress::Progress::start(local.clone());
    let ctx = Context {
        build_id: args.invocation_id.clone().unwrap_or_default(),
        mnemonic: args.mnemonic.clone().unwrap_or_else(|| {
            Path::new(&args.command[0]).file_name().map_or_else(
                || args.command[0].clone(),
                |n| n.to_string_lossy().into_owned(),
            )
        }),
        target: args
            .target
            .clone()
            .unwrap_or_else(|| args.command.join(" ")),
    };
    let first = run_with_recovery(&runner, ctx.clone(), process.clone()).await;
    let mut source = match first {
        // A hit: what it names must be local (deferred and validated hits fetch here) and
        // leased. If that fails for any reason (a blob gone or corrupt, the server gone), the
        // hit is worthless: the command runs (once).
        Ok(result) if was_hit(&result) => match hold_hit(&store, &result).await {
            Ok(lease) => Source::Store {
                result,
                _held: lease,
            },
            Err(e) => {
                let rerun = runner
                    .run_after_failed_hit(ctx.clone(), process.clone(), &e)
                    .await
                    .map_err(process_failure);
                ran_locally(&local, rerun, &handoff)?
            }
        },
        ran => ran_locally(&local, ran, &handoff)?,
    };
    progress.finish();
    phases.mark("lookup");

    // Outputs into the workspace. From the store a hit's outputs can still fail to come back
    // (damaged on disk): a hit is then re-run once; a command that ran already is taken from
    // its sandbox.
    let mut may_rerun = true;
    while let Err(e) = restore_outputs(&local, cwd, &process, &source) {
        let why = match e {
            Restore::Workspace(e) => return Err(Failure::Usage(e)),
            Restore::Store(e) => e,
        };
        source = match source {
            Source::Store { result, .. } if was_hit(&result) && may_rerun => {
                may_rerun = false;
                let rerun = runner
                    .run_after_failed_hit(ctx.clone(), process.clone(), &why)
                    .await
                    .map_err(process_failure);
                ran_locally(&local, rerun, &handoff)?
            }
            Source::Store { result, .. } => match handoff.take() {
                Some(ran) => Source::Sandbox {
                    result: Some(result),
                    ran,
                    why: format!("restoring outputs from the local store: {why}"),
                },
                None => {
                    return Err(Failure::Cache(format!(
                        "restoring outputs from the local store: {why}"
                    )));
                }
            },
            Source::Sandbox { .. } => {
                return Err(Failure::Usage(CliError::new(format!(
                    "restoring outputs from the command's sandbox: {why}"
                ))));
            }
        };
    }
    match &source {
        Source::Store { result, .. } => {
            // Leased and checked: a failure here is a damaged or hand-deleted blob. A command
            // that ran prints from its sandbox instead; a hit says so once.
            let ran = handoff.take();
            for (digest, sandbox_file, out) in [
                (result.stdout, ran.as_ref().map(|r| r.stdout()), Out::Stdout),
                (result.stderr, ran.as_ref().map(|r| r.stderr()), Out::Stderr),
            ] {
                match replay(&local, digest, out) {
                    Err(Failure::Cache(why)) => match sandbox_file {
                        Some(file) => replay_file(&file, out)?,
                        None => crate::warnings::warn(why),
                    },
                    other => other?,
                }
            }
        }
        Source::Sandbox { ran, why, .. } => {
            crate::warnings::warn(format!(
                "{why}; the command's own outputs are used (it is not run again)"
            ));
            replay_file(&ran.stdout(), Out::Stdout)?;
            replay_file(&ran.stderr(), Out::Stderr)?;
        }
    }
    phases.mark("restore");

    // Flush write-behind: a miss is written to the cache before we exit.
    let flush = runner.shutdown().await;
    let stats = runner.stats();
    if let Err(e) = flush {
        tracing::warn!("{e}");
    }

    phases.mark("flush");
    let (result, mut record) = match &source {
        Source::Store { result, .. }
        | Source::Sandbox {
            result: Some(result),
            ..
        } => {
            let record = RunRecord::new(result, &stats, action_digest, behavior, started.elapsed());
            (result.clone(), record)
        }
        Source::Sandbox {
            result: None, ran, ..
        } => {
            let result = sandbox_result(ran);
            let record = RunRecord::uncached(&result, behavior, started.elapsed());
            (result, record)
        }
    };
    record.phases_ms = phases.into_inner();
    report(Some(cache), &record, args.json);
    Ok(exit_code(&result))
}

/// Where the run's stdout, stderr and outputs are taken from.
enum Source {
    /// The store, leased there until recache exits.
    Store {
        result: ProcessResult,
        _held: store::Lease,
    },
    /// The sandbox the command ran in, because the store could not keep or give back what it
    /// produced (`why`, said once as a warning). `result` is the runner's, when it got one.
    Sandbox {
        result: Option<ProcessResult>,
        ran: RanSandbox,
        why: String,
    },
}

/// A command that ran: its result held in the store (leased, every blob checked present), or,
/// when the store could not take or keep it (a full disk, a name REAPI cannot represent, a
/// blob evicted by another process), its sandbox. Only when the command never ran is the
/// failure returned (the caller then runs it without the cache).
fn ran_locally(
    local: &LocalStore,
    ran: Result<ProcessResult, Failure>,
    handoff: &SandboxHandoff,
) -> Result<Source, Failure> {
    let (result, why) = match ran {
        Ok(result) => {
            match local.lease_tree(&[result.output_root], &[result.stdout, result.stderr]) {
                Ok(Some(lease)) => {
                    return Ok(Source::Store {
                        result,
                        _held: lease,
                    });
                }
                Ok(None) => (
                    Some(result),
                    "the command's outputs were evicted from the local store meanwhile (another \
                 process's GC)"
                        .to_owned(),
                ),
                Err(e) => (Some(result), format!("checking the command's outputs: {e}")),
            }
        }
        Err(Failure::Cache(why)) => (None, why),
        Err(usage) => return Err(usage),
    };
    match handoff.take() {
        Some(ran) => Ok(Source::Sandbox { result, ran, why }),
        None => Err(Failure::Cache(why)),
    }
}

/// The result of a command whose outputs could not be captured: its exit code, nothing stored.
fn sandbox_result(ran: &RanSandbox) -> ProcessResult {
    ProcessResult {
        stdout: hashing::EMPTY_DIGEST,
        stderr: hashing::EMPTY_DIGEST,
        exit_code: ran.exit_code,
        output_root: hashing::EMPTY_DIGEST,
        metadata: process_execution::ResultMetadata {
            source: ResultSource::RanLocally,
            wall_time: Duration::ZERO,
            original_run_time: None,
            timed_out: ran.timed_out,
            action_digest: None,
            cache: process_execution::CacheOutcome::NotLookedUp,
        },
    }
}

/// Makes a hit's outputs, stdout and stderr local and leases them. Fetched twice at most: what
/// another process's GC took between the fetch and the lease comes back on the second.
async fn hold_hit(
    store: &Store,
    result: &ProcessResult,
) -> Result<store::Lease, store::StoreError> {
    let local = store.local();
    let roots = [result.output_root];
    let blobs = [result.stdout, result.stderr];
    // A fetch hit has everything local already: leased and checked, done.
    if let Some(lease) = local.lease_tree(&roots, &blobs)? {
        return Ok(lease);
    }
    let _roots = local.lease(roots.iter().chain(&blobs).copied());
    for _ in 0..2 {
        make_local(store, result).await?;
        if let Some(lease) = local.lease_tree(&roots, &blobs)? {
            return Ok(lease);
        }
    }
    Err(store::StoreError::new(
        ErrorKind::Other,
        "the hit's outputs were evicted from the local store as they were fetched",
    ))
}

/// Records the run (when there is a cache directory to record it in) and prints its summary
/// line, or the JSON record with `--json`.
fn report(cache: Option<&CacheDir>, record: &RunRecord, json: bool) {
    // The run's one warning line, if the cache had trouble, then the summary.
    crate::warnings::finish();
    if let Some(cache) = cache {
        cache.append_record(record);
    }
    if json {
        eprintln!("{}", record.to_json());
    } else {
        eprintln!("{}", record.summary());
    }
}

/// Fetches what a hit needs locally: every output, stdout and stderr (`ensure_downloaded`
/// fails with `MissingDigest` for any the remote lacks).
async fn make_local(store: &Store, result: &ProcessResult) -> Result<(), store::StoreError> {
    store
        .ensure_downloaded(
            HashSet::from([result.stdout, result.stderr]),
            HashSet::from([result.output_root]),
        )
        .await
        .map(|_| ())
}

/// Maps a runner error to a failure: storage trouble is the cache's, anything else the user's.
fn process_failure(e: ProcessError) -> Failure {
    match e {
        ProcessError::Storage(m) => Failure::Cache(m),
        ProcessError::MissingDigest { digest, context } => Failure::Cache(format!(
            "{context}: blob {digest} is missing from the local store"
        )),
        ProcessError::Unclassified(m) => Failure::Usage(CliError::new(m)),
    }
}

/// Runs, and if a deferred hit's blob turns out to be gone, re-runs its producer.
async fn run_with_recovery(
    runner: &RemoteCacheRunner,
    ctx: Context,
    process: Process,
) -> Result<ProcessResult, Failure> {
    match runner.run(ctx.clone(), process).await {
        Ok(r) => Ok(r),
        Err(ProcessError::MissingDigest { digest, context }) => {
            match runner.recover_missing(ctx, digest).await {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err(Failure::Cache(format!(
                    "{context}: blob {digest} is missing and nothing in this run can re-create it"
                ))),
                Err(e) => Err(process_failure(e)),
            }
        }
        Err(e) => Err(process_failure(e)),
    }
}

/// The fallback when the cache cannot be used at all: the command runs in the current
/// directory with the same environment (no sandbox, nothing stored), and its exit code is
/// returned as usual.
async fn run_uncached(process: &Process, cwd: &Path) -> Result<ProcessResult, CliError> {
    let started = Instant::now();
    let program = process
        .argv
        .first()
        .ok_or_else(|| CliError::new("no command given"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&process.argv[1..])
        .env_clear()
        .envs(&process.env)
        .current_dir(cwd)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError::new(format!("could not start {program:?}: {e}")))?;
    let waited = match process.timeout {
        Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
        None => Some(child.wait().await),
    };
    let (status, timed_out) = match waited {
        Some(s) => (s, false),
        None => {
            let _ = child.kill().await;
            (child.wait().await, true)
        }
    };
    let status = status.map_err(|e| CliError::new(format!("waiting for {program:?}: {e}")))?;
    let exit_code = process_execution::exit_code_of(&status);
    Ok(ProcessResult {
        stdout: hashing::EMPTY_DIGEST,
        stderr: hashing::EMPTY_DIGEST,
        exit_code,
        output_root: hashing::EMPTY_DIGEST,
        metadata: process_execution::ResultMetadata {
            source: ResultSource::RanLocally,
            wall_time: started.elapsed(),
            original_run_time: None,
            timed_out,
            action_digest: None,
            cache: process_execution::CacheOutcome::NotLookedUp,
        },
    })
}

/// The cache `remote` names: a REAPI server, a shared directory, or (none) the default cache
/// under the cache directory, bounded by half of `max_size`.
pub(crate) async fn providers(
    remote: &RemoteArgs,
    cache: &CacheDir,
    max_size: u64,
) -> Result<RemoteProviders, Failure> {
    match &remote.address {
        None => {
            let p = Arc::new(
                LocalDirProvider::open(&cache.default_cache_dir())
                    .map_err(|e| Failure::Cache(format!("cannot open the local cache: {e}")))?
                    .with_max_size(max_size - max_size / 2),
            );
            Ok(RemoteProviders {
                bytes: p.clone(),
                action_cache: p,
            })
        }
        Some(address) => {
            let options = GrpcOptions {
                instance_name: remote.instance_name.clone(),
                headers: remote.headers.clone(),
                tls_ca_cert: remote.tls_ca_cert.clone(),
                tls_client_cert: remote
                    .tls_client_cert
                    .clone()
                    .zip(remote.tls_client_key.clone()),
                capabilities_cache: Some(cache.capabilities_file(address, &remote.instance_name)),
                ..Default::default()
            };
            provider_from_address(address, options)
                .await
                .map_err(|e| match e.kind() {
                    // A malformed address is the user's; anything else (a file:// directory that
                    // cannot be created, …) is the cache's.
                    store::ErrorKind::InvalidData => {
                        Failure::Usage(CliError::new(format!("--remote: {e}")))
                    }
                    _ => Failure::Cache(format!("--remote: {e}")),
                })
        }
    }
}

/// Stores the inputs and returns the input root digest, leased (with every blob under it)
/// until the lease is dropped.
///
/// `--input .` (or no `--input`) means the whole current directory, minus the declared outputs
/// (restored by an earlier run, they must not change the key of the next) and minus the cache
/// directory when it is inside. Symlinks must stay inside the input root (the same rule as for
/// outputs).
///
/// Another process's GC can evict a blob between its capture and the lease: then the inputs
/// are captured again (the lease now protects what was kept). A store that cannot take the
/// inputs, or a file name REAPI cannot represent, is the cache's problem (the command then
/// runs without it); an input that cannot be read, or a bad path, is the user's.
async fn capture_inputs(
    local: &LocalStore,
    cwd: &Path,
    inputs: &[PathBuf],
    outputs: &[String],
    cache: &CacheDir,
) -> Result<(Digest, store::Lease), Failure> {
    /// Captures before giving up on a store that keeps losing what was just stored.
    const ATTEMPTS: usize = 3;
    let local = local.clone();
    let cwd = cwd.to_path_buf();
    let inputs: Vec<String> = inputs_as_given(inputs)?;
    let outputs = outputs.to_vec();
    let cache_root = cache.root().to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(Digest, store::Lease), Failure> {
        let store_err = |what: String, e: store::StoreError| match e.kind() {
            ErrorKind::StorageFull | ErrorKind::Unrepresentable | ErrorKind::MissingDigest(_) => {
                Failure::Cache(format!("{what}: {e}"))
            }
            _ => Failure::Usage(CliError::new(format!("{what}: {e}"))),
        };
        let mut exclude: Vec<PathBuf> = outputs
            .iter()
            .map(|o| PathBuf::from(o.trim_end_matches('/')))
            .collect();
        if inputs.is_empty() {
            // Staging directories of restores: never inputs (one a killed run left behind would
            // make the next identical run a miss), and removed once their run is gone.
            exclude.extend(restore_staging_dirs(&cwd));
            if let Ok(rel) = cache_root.strip_prefix(&cwd) {
                if rel.as_os_str().is_empty() {
                    return Err(Failure::Usage(CliError::new(format!(
                        "the cache directory {} is the current directory; use --cache-dir elsewhere",
                        cache_root.display()
                    ))));
                }
                exclude.push(rel.to_path_buf());
            }
        }
        for _ in 0..ATTEMPTS {
            let held = if inputs.is_empty() {
                local
                    .capture_directory_leased(&cwd, &exclude)
                    .map_err(|e| store_err("capturing the current directory as input".into(), e))?
            } else {
                let root = capture_listed(&local, &cwd, &inputs, &store_err)?;
                local
                    .lease_tree(&[root], &[])
                    .map_err(|e| store_err("checking the input root".into(), e))?
                    .map(|lease| (root, lease))
            };
            let Some((root, lease)) = held else {
                tracing::info!("input blobs were evicted as they were captured; capturing again");
                continue;
            };
            local.check_symlinks(root).map_err(|e| match e.kind() {
                ErrorKind::MissingDigest(_) => store_err("checking input symlinks".into(), e),
                _ => Failure::Usage(CliError::new(format!(
                    "an input symlink points outside the inputs: {e}"
                ))),
            })?;
            return Ok((root, lease));
        }
        Err(Failure::Cache(format!(
            "the local store lost input blobs as they were captured, {ATTEMPTS} times"
        )))
    })
    .await
    .map_err(|e| Failure::Cache(format!("input capture failed: {e}")))?
}

/// The `--input` paths (relative to `cwd`) as one input root.
fn capture_listed(
    local: &LocalStore,
    cwd: &Path,
    inputs: &[String],
    store_err: &dyn Fn(String, store::StoreError) -> Failure,
) -> Result<Digest, Failure> {
    let mut b = DirectoryBuilder::new(local);
    for rel in inputs {
        let path = cwd.join(rel);
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| Failure::Usage(CliError::new(format!("--input {rel}: {e}"))))?;
        let added = if meta.is_dir() {
            local
                .capture_directory(&path)
                .and_then(|d| b.add_directory(rel, d))
        } else if meta.file_type().is_symlink() {
            std::fs::read_link(&path)
                .map_err(|e| store::StoreError::io(format!("reading {}", path.display()), e))
                .and_then(|t| {
                    t.into_os_string().into_string().map_err(|t| {
                        store::StoreError::new(
                            ErrorKind::Unrepresentable,
                            format!("symlink target {t:?} is not UTF-8"),
                        )
                    })
                })
                .and_then(|t| b.add_symlink(rel, &t))
        } else {
            let exec = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
            local
                .store_file(&path, false)
                .and_then(|d| b.add_file(rel, d, exec))
        };
        added.map_err(|e| store_err(format!("--input {rel}"), e))?;
    }
    b.build()
        .map_err(|e| store_err("building the input root".into(), e))
}

/// The `--input` paths as relative, `/`-separated strings; empty when they name the whole
/// current directory (`.`, `./`).
fn inputs_as_given(inputs: &[PathBuf]) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    for input in inputs {
        let s = input.to_str().ok_or_else(|| {
            Failure::Usage(CliError::new(format!(
                "--input {}: not UTF-8",
                input.display()
            )))
        })?;
        let parts: Vec<&str> = s
            .split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect();
        if s.starts_with('/') || parts.contains(&"..") {
            return Err(Failure::Usage(CliError::new(format!(
                "--input {s}: inputs must be relative paths inside the current directory"
            ))));
        }
        if parts.is_empty() {
            return Ok(Vec::new()); // `.`: the whole current directory
        }
        out.push(parts.join("/"));
    }
    Ok(out)
}

fn build_process(args: &RunArgs, input_root: Digest) -> Result<Process, CliError> {
    let mut process = Process::new(args.command.clone()).input_root(input_root);
    for (k, v) in &args.env {
        process.env.insert(k.clone(), v.clone());
    }
    if !process.env.contains_key("PATH")
        && let Ok(path) = std::env::var("PATH")
    {
        process.env.insert("PATH".into(), path);
    }
    for o in &args.outputs {
        let (path, dir) = normalize_output(o)?;
        if dir {
            process.output_directories.push(path);
        } else {
            process.output_files.push(path);
        }
    }
    check_outputs_apart(&process.output_files, &process.output_directories)?;
    if let Some(t) = args.timeout {
        // The same check as --read-timeout's, but zero makes no sense for a command.
        if !(t > 0.0 && t.is_finite()) {
            return Err(CliError::new(format!(
                "--timeout {t}: must be a positive number of seconds"
            )));
        }
        process.timeout = Some(Duration::from_secs_f64(t));
    }
    process.cache_scope = if args.cache_failures {
        CacheScope::Always
    } else {
        CacheScope::Successful
    };
    process.cache_namespace = args.cache_namespace.clone();
    process.description = args.command.join(" ");
    Ok(process)
}

/// Name prefix of the staging directory a restore builds outputs in (then `<pid>-<random>`).
const RESTORE_PREFIX: &str = ".recache-restore-";

/// The restore staging directories in `cwd` (relative names, to leave out of the inputs);
/// those whose run is gone from this machine (the PID in the name) are removed on the way.
fn restore_staging_dirs(cwd: &Path) -> Vec<PathBuf> {
    crate::staging::remove_stale(cwd, RESTORE_PREFIX)
}

/// An `--output` path as the cache names it: relative, `/`-separated, no `.` or empty
/// segments (`./out.txt` is `out.txt`, as `--input ./x` is `x`); a trailing `/` means a
/// directory. Absolute paths, `..`, and the current directory itself are the user's mistake.
fn normalize_output(raw: &str) -> Result<(String, bool), CliError> {
    let dir = raw.ends_with('/');
    let parts: Vec<&str> = raw
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if raw.starts_with('/') || parts.contains(&"..") {
        return Err(CliError::new(format!(
            "--output {raw}: outputs must be relative paths inside the current directory"
        )));
    }
    if parts.is_empty() {
        return Err(CliError::new(format!(
            "--output {raw}: names the current directory itself; name a file or a directory in it"
        )));
    }
    Ok((parts.join("/"), dir))
}

/// Outputs must not overlap (`d/` and `d/f`, or the same path twice as a file and a
/// directory): one would be restored over the other. Checked before anything runs.
fn check_outputs_apart(files: &[String], dirs: &[String]) -> Result<(), CliError> {
    let all: Vec<(&String, bool)> = files
        .iter()
        .map(|f| (f, false))
        .chain(dirs.iter().map(|d| (d, true)))
        .collect();
    for (i, (a, a_dir)) in all.iter().enumerate() {
        for (b, b_dir) in &all[i + 1..] {
            let nested = |outer: &str, inner: &str| inner.starts_with(&format!("{outer}/"));
            if (a == b && a_dir != b_dir) || nested(a, b) || nested(b, a) {
                let show = |p: &str, d: bool| if d { format!("{p}/") } else { p.to_owned() };
                return Err(CliError::new(format!(
                    "--output {} and --output {} overlap: declare one of them",
                    show(a, *a_dir),
                    show(b, *b_dir)
                )));
            }
        }
    }
    Ok(())
}

/// Why restoring outputs failed: the store could not provide them, or the workspace could not
/// take them.
enum Restore {
    Store(store::StoreError),
    Workspace(CliError),
}

/// Puts the declared outputs that were produced into the current directory, replacing what is
/// there: built in a staging directory beside them, then each renamed into place.
///
/// From the store, large files are hardlinked read-only from the pool unless recache runs as
/// root (root could write through the link and corrupt the store), in which case they are
/// copied. From a sandbox, they are copied as the command wrote them.
fn restore_outputs(
    local: &LocalStore,
    cwd: &Path,
    process: &Process,
    source: &Source,
) -> Result<(), Restore> {
    if process.output_files.is_empty() && process.output_directories.is_empty() {
        return Ok(());
    }
    let staging = tempfile::Builder::new()
        .prefix(&format!("{RESTORE_PREFIX}{}-", std::process::id()))
        .tempdir_in(cwd)
        .map_err(|e| {
            Restore::Workspace(CliError::new(format!(
                "cannot restore outputs into {}: {e}",
                cwd.display()
            )))
        })?;
    let ws = |e: CliError| Restore::Workspace(e);
    let root = staging.path().join("o");
    let declared = || {
        process
            .output_files
            .iter()
            .chain(&process.output_directories)
    };
    match source {
        Source::Store { result, .. } => {
            let mutable = nix::unistd::geteuid().is_root();
            local
                .materialize_directory(
                    result.output_root,
                    &root,
                    MaterializeOptions {
                        mutable,
                        ..Default::default()
                    },
                )
                .map_err(|e| match e.kind() {
                    ErrorKind::MissingDigest(_)
                    | ErrorKind::InvalidData
                    | ErrorKind::StorageFull => Restore::Store(e),
                    // A blob gone from under the copy is the store's too, not the workspace's.
                    _ if !matches!(local.tree_digests(result.output_root), Ok(Some(_))) => {
                        Restore::Store(e)
                    }
                    _ => ws(CliError::new(format!("restoring outputs: {e}"))),
                })?;
        }
        Source::Sandbox { ran, .. } => {
            std::fs::create_dir_all(&root)
                .map_err(|e| ws(CliError::new(format!("creating {}: {e}", root.display()))))?;
            for out in declared() {
                let from = ran.output(out);
                if std::fs::symlink_metadata(&from).is_err() {
                    continue; // declared but not produced
                }
                let to = root.join(out);
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        ws(CliError::new(format!("creating {}: {e}", parent.display())))
                    })?;
                }
                copy_tree(&from, &to).map_err(|e| {
                    ws(CliError::new(format!(
                        "copying output {out} from the command's sandbox: {e}"
                    )))
                })?;
            }
        }
    }
    for out in declared() {
        let from = root.join(out);
        if std::fs::symlink_metadata(&from).is_err() {
            continue; // declared but not produced
        }
        let to = cwd.join(out);
        if let Ok(meta) = std::fs::symlink_metadata(&to) {
            let removed = if meta.is_dir() {
                std::fs::remove_dir_all(&to)
            } else {
                std::fs::remove_file(&to)
            };
            removed.map_err(|e| {
                ws(CliError::new(format!(
                    "replacing output {}: {e}",
                    to.display()
                )))
            })?;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| ws(CliError::new(format!("creating {}: {e}", parent.display()))))?;
        }
        std::fs::rename(&from, &to).map_err(|e| {
            ws(CliError::new(format!(
                "restoring output {}: {e}",
                to.display()
            )))
        })?;
    }
    Ok(())
}

/// Copies a file, a symlink (as a link) or a directory tree from `from` to `to`, never following
/// a symlink. Files come out writable by their owner, executable bits kept: the store's
/// read-only pool modes are not the command's.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if meta.is_dir() {
        std::fs::create_dir(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to)?;
        let exec = meta.permissions().mode() & 0o111 != 0;
        std::fs::set_permissions(
            to,
            std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
        )
    }
}

/// Where a replayed stream goes.
#[derive(Clone, Copy)]
enum Out {
    Stdout,
    Stderr,
}

impl Out {
    fn writer(self) -> Box<dyn Write> {
        match self {
            Out::Stdout => Box::new(std::io::stdout().lock()),
            Out::Stderr => Box::new(std::io::stderr().lock()),
        }
    }
}

fn write_failed(e: std::io::Error) -> Failure {
    Failure::Usage(CliError::new(format!("writing the command's output: {e}")))
}

/// Writes a stored blob (stdout or stderr) to `out`, streaming pool files. A blob that is not
/// there is an error (nothing written), never silently nothing.
fn replay(local: &LocalStore, digest: Digest, out: Out) -> Result<(), Failure> {
    let store_err = |e: store::StoreError| {
        Failure::Cache(format!(
            "reading the command's output from the local store: {e}"
        ))
    };
    let mut w = out.writer();
    if let Some(path) = local.load_file(digest).map_err(store_err)? {
        let mut f = std::fs::File::open(&path).map_err(|e| {
            store_err(store::StoreError::io(
                format!("opening {}", path.display()),
                e,
            ))
        })?;
        std::io::copy(&mut f, &mut w).map_err(write_failed)?;
    } else {
        let bytes = local
            .load_bytes(digest)
            .map_err(store_err)?
            .ok_or_else(|| store_err(store::StoreError::missing(digest)))?;
        w.write_all(&bytes).map_err(write_failed)?;
    }
    w.flush().map_err(write_failed)
}

/// Writes a file of the command's sandbox (its stdout or stderr) to `out`.
fn replay_file(path: &Path, out: Out) -> Result<(), Failure> {
    let mut f = std::fs::File::open(path).map_err(|e| {
        Failure::Usage(CliError::new(format!(
            "reading the command's output {}: {e}",
            path.display()
        )))
    })?;
    let mut w = out.writer();
    std::io::copy(&mut f, &mut w).map_err(write_failed)?;
    w.flush().map_err(write_failed)
}

/// The exit code to hand back: the command's, or 128 + signal like a shell.
fn exit_code(result: &ProcessResult) -> i32 {
    match result.exit_code {
        c if c >= 0 => c,
        c => 128 + (-c),
    }
}

/// Whether the result came from the cache (for messages).
pub fn was_hit(result: &ProcessResult) -> bool {
    result.metadata.source == ResultSource::RemoteCacheHit
}
