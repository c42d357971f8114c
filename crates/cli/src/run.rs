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
    ProcessError, ProcessResult, ResultSource,
};
use remote_cache::{CacheContentBehavior, CommandRunner, RemoteCacheOptions};
use store::directory::DirectoryBuilder;
use store::remote::grpc::GrpcOptions;
use store::remote::{RemoteProviders, local_dir::LocalDirProvider, provider_from_address};
use store::{LocalStore, LocalStoreOptions, MaterializeOptions, Store};

use crate::CliError;
use crate::args::RunArgs;
use crate::cache_dir::{CacheDir, RunRecord};

/// Runs the command; returns the exit code recache should exit with.
pub async fn run(args: RunArgs) -> Result<i32, CliError> {
    let started = Instant::now();
    let cache = CacheDir::resolve(args.cache_dir.cache_dir.clone())?;
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::new(format!("cannot read the current directory: {e}")))?;
    let behavior: CacheContentBehavior =
        args.cache_content_behavior.parse().map_err(CliError::new)?;

    let local = LocalStore::open(LocalStoreOptions::new(cache.store_dir()))
        .map_err(|e| CliError::new(format!("cannot open the local store: {e}")))?;
    let providers = providers(&args, &cache).await?;
    let store = Store::with_remote(local.clone(), providers.bytes.clone());

    // Inputs: the current directory (minus the declared outputs), or the --input paths.
    let mut process = build_process(&args, hashing::EMPTY_DIGEST)?;
    let outputs: Vec<String> = process
        .output_files
        .iter()
        .chain(&process.output_directories)
        .cloned()
        .collect();
    process.input_root = capture_inputs(&local, &cwd, &args.inputs, &outputs, &cache).await?;
    let action_digest = make_action(&process).action_digest;
    let inner_store = match behavior {
        CacheContentBehavior::Fetch => store.into_local_only(),
        _ => store.clone(),
    };
    let inner = LocalRunner::new(inner_store, LocalRunnerOptions::new(cache.sandbox_dir()));
    let runner = CommandRunner::new(
        Arc::new(inner),
        store.clone(),
        providers.action_cache.clone(),
        RemoteCacheOptions {
            cache_read: !args.no_cache_read,
            cache_write: !args.no_cache_write,
            cache_content_behavior: behavior,
            read_timeout: Duration::from_secs_f64(args.read_timeout.max(0.001)),
            ..Default::default()
        },
    );

    let progress = crate::progress::Progress::start(local.clone());
    let ctx = Context::default();
    let mut result = run_with_recovery(&runner, ctx.clone(), process.clone()).await?;

    // Outputs the user asked for, stdout and stderr must be local now (deferred hits fetch here;
    // a blob the cache lost is re-created by re-running the command).
    let needed = (
        HashSet::from([result.stdout, result.stderr]),
        HashSet::from([result.output_root]),
    );
    if let Err(e) = store.ensure_downloaded(needed.0, needed.1).await {
        match e.missing_digest() {
            Some(d) => {
                tracing::warn!("the cache lost {d} after the hit; running the command locally");
                result = runner
                    .recover_missing(ctx.clone(), d)
                    .await
                    .map_err(|e| CliError::new(format!("re-running after a lost cache blob: {e}")))?
                    .ok_or_else(|| {
                        CliError::new(format!("blob {d} is missing and nothing can re-create it"))
                    })?;
            }
            None => {
                return Err(CliError::new(format!(
                    "fetching the command's outputs: {e}"
                )));
            }
        }
    }
    progress.finish();

    restore_outputs(&local, &cwd, &process, &result)?;
    replay(&local, result.stdout, &mut std::io::stdout())?;
    replay(&local, result.stderr, &mut std::io::stderr())?;

    // Flush write-behind: a miss is written to the cache before we exit.
    let flush = runner.shutdown().await;
    let stats = runner.stats();
    if let Err(e) = flush {
        tracing::warn!("{e}");
    }

    let record = RunRecord::new(&result, &stats, action_digest, behavior, started.elapsed());
    cache.append_record(&record);
    if args.json {
        eprintln!("{}", record.to_json());
    } else {
        eprintln!("{}", record.summary());
    }
    Ok(exit_code(&result))
}

/// Runs, and if a deferred hit's blob turns out to be gone, re-runs its producer.
async fn run_with_recovery(
    runner: &CommandRunner,
    ctx: Context,
    process: Process,
) -> Result<ProcessResult, CliError> {
    match runner.run(ctx.clone(), process).await {
        Ok(r) => Ok(r),
        Err(ProcessError::MissingDigest { digest, context }) => {
            match runner.recover_missing(ctx, digest).await {
                Ok(Some(r)) => Ok(r),
                _ => Err(CliError::new(format!(
                    "{context}: blob {digest} is missing. If it is an input, check that the file exists and is readable."
                ))),
            }
        }
        Err(e) => Err(CliError::new(e.to_string())),
    }
}

async fn providers(args: &RunArgs, cache: &CacheDir) -> Result<RemoteProviders, CliError> {
    match &args.remote {
        None => {
            let p = Arc::new(
                LocalDirProvider::open(&cache.default_cache_dir())
                    .map_err(|e| CliError::new(format!("cannot open the local cache: {e}")))?,
            );
            Ok(RemoteProviders {
                bytes: p.clone(),
                action_cache: p,
            })
        }
        Some(address) => {
            let options = GrpcOptions {
                instance_name: args.instance_name.clone(),
                headers: args.headers.clone(),
                tls_ca_cert: args.tls_ca_cert.clone(),
                tls_client_cert: args
                    .tls_client_cert
                    .clone()
                    .zip(args.tls_client_key.clone()),
                ..Default::default()
            };
            provider_from_address(address, options)
                .await
                .map_err(|e| CliError::new(format!("--remote: {e}")))
        }
    }
}

/// Stores the inputs and returns the input root digest.
async fn capture_inputs(
    local: &LocalStore,
    cwd: &Path,
    inputs: &[PathBuf],
    outputs: &[String],
    cache: &CacheDir,
) -> Result<Digest, CliError> {
    if inputs.is_empty() && cache.root().starts_with(cwd) {
        return Err(CliError::new(format!(
            "the cache directory {} is inside the current directory, which is the default input; \
             name the inputs with --input, or use --cache-dir outside it",
            cache.root().display()
        )));
    }
    let local = local.clone();
    let cwd = cwd.to_path_buf();
    let inputs = inputs.to_vec();
    let outputs = outputs.to_vec();
    tokio::task::spawn_blocking(move || -> Result<Digest, CliError> {
        if inputs.is_empty() {
            // Outputs restored by an earlier run must not become inputs of the next one, or the
            // key would change every time and the command would never hit.
            let err = |e: store::StoreError| {
                CliError::new(format!("capturing the current directory as input: {e}"))
            };
            let root = local.capture_directory(&cwd).map_err(err)?;
            let mut b = DirectoryBuilder::from_directory(&local, root);
            for out in &outputs {
                b.remove(out).map_err(err)?;
            }
            return b.build().map_err(err);
        }
        let mut b = DirectoryBuilder::new(&local);
        for input in &inputs {
            let rel = input
                .to_str()
                .ok_or_else(|| CliError::new(format!("--input {}: not UTF-8", input.display())))?
                .trim_end_matches('/');
            let path = cwd.join(rel);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| CliError::new(format!("--input {rel}: {e}")))?;
            let added = if meta.is_dir() {
                local.capture_directory(&path).and_then(|d| b.add_directory(rel, d))
            } else if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .map_err(|e| store::StoreError::io(format!("reading {}", path.display()), e))
                    .and_then(|t| b.add_symlink(rel, &t.to_string_lossy()))
            } else {
                let exec = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0;
                local.store_file(&path, false).and_then(|d| b.add_file(rel, d, exec))
            };
            added.map_err(|e| CliError::new(format!("--input {rel}: {e} (inputs must be relative paths inside the current directory)")))?;
        }
        b.build().map_err(|e| CliError::new(format!("building the input root: {e}")))
    })
    .await
    .map_err(|e| CliError::new(format!("input capture failed: {e}")))?
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
        match o.strip_suffix('/') {
            Some(dir) => process.output_directories.push(dir.to_owned()),
            None => process.output_files.push(o.clone()),
        }
    }
    if let Some(t) = args.timeout {
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

/// Puts the declared outputs that were produced into the current directory, replacing what is
/// there. Large files are hardlinked read-only from the pool unless recache runs as root (root
/// could write through the link and corrupt the store), in which case they are copied.
fn restore_outputs(
    local: &LocalStore,
    cwd: &Path,
    process: &Process,
    result: &ProcessResult,
) -> Result<(), CliError> {
    if process.output_files.is_empty() && process.output_directories.is_empty() {
        return Ok(());
    }
    let staging = tempfile::Builder::new()
        .prefix(".recache-restore-")
        .tempdir_in(cwd)
        .map_err(|e| {
            CliError::new(format!(
                "cannot restore outputs into {}: {e}",
                cwd.display()
            ))
        })?;
    let mutable = nix::unistd::geteuid().is_root();
    let root = staging.path().join("o");
    local
        .materialize_directory(result.output_root, &root, MaterializeOptions { mutable })
        .map_err(|e| CliError::new(format!("restoring outputs: {e}")))?;
    for out in process
        .output_files
        .iter()
        .chain(&process.output_directories)
    {
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
            removed
                .map_err(|e| CliError::new(format!("replacing output {}: {e}", to.display())))?;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| CliError::new(format!("creating {}: {e}", parent.display())))?;
        }
        std::fs::rename(&from, &to)
            .map_err(|e| CliError::new(format!("restoring output {}: {e}", to.display())))?;
    }
    Ok(())
}

/// Writes a stored blob (stdout or stderr) to `out`, streaming pool files.
fn replay(local: &LocalStore, digest: Digest, out: &mut dyn Write) -> Result<(), CliError> {
    let err = |e: std::io::Error| CliError::new(format!("writing the command's output: {e}"));
    if let Some(path) = local
        .load_file(digest)
        .map_err(|e| CliError::new(e.to_string()))?
    {
        let mut f = std::fs::File::open(&path).map_err(err)?;
        std::io::copy(&mut f, out).map_err(err)?;
    } else if let Some(bytes) = local
        .load_bytes(digest)
        .map_err(|e| CliError::new(e.to_string()))?
    {
        out.write_all(&bytes).map_err(err)?;
    }
    out.flush().map_err(err)
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
