//! What a build engine asks to run, what comes back, and the trait every runner implements.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use hashing::Digest;
use store::{ErrorKind, StoreError};

/// When a result may be written to (and read from) a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CacheScope {
    /// Cache every result, failures included: a cached non-zero exit counts as a hit.
    Always,
    /// Cache only successful (exit code 0) results. The default.
    #[default]
    Successful,
    /// Never cache; always run.
    Never,
}

/// A process to run: everything that determines its result, plus how to treat that result.
///
/// Everything except `description` and `cache_scope` is part of the action digest, so changing
/// it makes a different cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The command line; `argv[0]` is looked up in the process's own `PATH` (if any), not ours.
    pub argv: Vec<String>,
    /// The complete environment (hermetic: nothing is inherited). Include `PATH` if needed.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the input root ("" = the root).
    pub working_directory: String,
    /// The input root: digest of a Directory message in the store.
    pub input_root: Digest,
    /// Files the process produces, relative to the working directory.
    pub output_files: Vec<String>,
    /// Directories the process produces, relative to the working directory.
    pub output_directories: Vec<String>,
    /// Kill the process after this long. `None` = no limit.
    pub timeout: Option<Duration>,
    /// Human description for logs.
    pub description: String,
    /// Platform properties (e.g. `OSFamily=linux`), part of the cache key.
    pub platform_properties: Vec<(String, String)>,
    /// Which results may be cached.
    pub cache_scope: CacheScope,
    /// Salts the action digest, to keep separate caches apart (e.g. per toolchain version).
    pub cache_namespace: String,
}

impl Process {
    /// A process running `argv` in an empty input root, with defaults for the rest.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Process {
        Process {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            working_directory: String::new(),
            input_root: crate::action::empty_directory_digest(),
            output_files: vec![],
            output_directories: vec![],
            timeout: None,
            description: String::new(),
            platform_properties: vec![],
            cache_scope: CacheScope::default(),
            cache_namespace: String::new(),
        }
    }

    /// Sets an environment variable (builder style).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Process {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the input root (builder style).
    pub fn input_root(mut self, digest: Digest) -> Process {
        self.input_root = digest;
        self
    }

    /// Declares output files (builder style).
    pub fn output_files(mut self, files: impl IntoIterator<Item = impl Into<String>>) -> Process {
        self.output_files = files.into_iter().map(Into::into).collect();
        self
    }

    /// Declares output directories (builder style).
    pub fn output_directories(
        mut self,
        dirs: impl IntoIterator<Item = impl Into<String>>,
    ) -> Process {
        self.output_directories = dirs.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the timeout (builder style).
    pub fn timeout(mut self, timeout: Duration) -> Process {
        self.timeout = Some(timeout);
        self
    }
}

/// Where a result came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultSource {
    /// The process ran on this machine.
    RanLocally,
    /// The result came from the remote cache.
    RemoteCacheHit,
}

/// What a cache layer did for one result, so an engine can show "cache: hit" per action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheOutcome {
    /// No cache layer handled this result (a bare runner).
    #[default]
    NotLookedUp,
    /// Not looked up: cache reads are off, or the process may not be cached.
    Skipped,
    /// Served from the cache.
    Hit,
    /// The cache had no usable result; the process ran locally.
    Miss,
    /// The cache failed (an RPC error, a timeout, a missing or corrupt blob, an unsafe result,
    /// a hit whose outputs could not be used) with this kind of error; the process ran locally.
    ErrorMiss(ErrorKind),
    /// Speculation: the local run finished before the cache answered.
    SpeculationLocalWin,
    /// Re-run to re-create a blob found missing after a deferred hit.
    Recovered,
    /// The cache breaker is open after repeated failures: not asked; ran locally.
    BreakerOpen,
}

/// Facts about how a result was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultMetadata {
    /// Where the result came from.
    pub source: ResultSource,
    /// How long obtaining it took (the run, or the cache hit).
    pub wall_time: Duration,
    /// For a cache hit: how long the original run took, if the cache recorded it.
    pub original_run_time: Option<Duration>,
    /// The process was killed for exceeding its timeout.
    pub timed_out: bool,
    /// The action digest (the cache key), when a cache layer computed it.
    pub action_digest: Option<Digest>,
    /// What the cache layer did.
    pub cache: CacheOutcome,
}

/// What a process produced. All digests are in the store the runner was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessResult {
    /// Standard output.
    pub stdout: Digest,
    /// Standard error.
    pub stderr: Digest,
    /// Exit code (negative: killed by that signal).
    pub exit_code: i32,
    /// A directory holding the declared outputs that were produced, at their paths relative to
    /// the working directory.
    pub output_root: Digest,
    /// How the result was obtained.
    pub metadata: ResultMetadata,
}

/// Why a runner could not produce a result. (A process that ran and failed is a result with a
/// non-zero exit code, not an error.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// A blob the run needed (an input, or a deferred output being read) is missing. Callers
    /// recover by re-creating it, e.g. re-running its producer.
    #[error("{context}: blob {digest} is missing")]
    MissingDigest {
        /// The missing blob.
        digest: Digest,
        /// What was being done.
        context: String,
    },
    /// The local store or the sandbox directory could not take what the run needed (a full
    /// or read-only disk, a database failure). The process itself may be fine: a caller that
    /// must not fail a build because of its cache runs it another way.
    #[error("{0}")]
    Storage(String),
    /// Anything else, with context.
    #[error("{0}")]
    Unclassified(String),
}

impl ProcessError {
    /// Adds context to the message.
    pub fn context(self, ctx: impl std::fmt::Display) -> ProcessError {
        match self {
            ProcessError::MissingDigest { digest, context } => ProcessError::MissingDigest {
                digest,
                context: format!("{ctx}: {context}"),
            },
            ProcessError::Storage(m) => ProcessError::Storage(format!("{ctx}: {m}")),
            ProcessError::Unclassified(m) => ProcessError::Unclassified(format!("{ctx}: {m}")),
        }
    }
}

impl From<StoreError> for ProcessError {
    fn from(e: StoreError) -> Self {
        match e.kind() {
            ErrorKind::MissingDigest(d) => ProcessError::MissingDigest {
                digest: *d,
                context: e.to_string(),
            },
            // A file the cache cannot represent (not UTF-8) is as uncacheable as a full disk.
            ErrorKind::Io | ErrorKind::StorageFull | ErrorKind::Unrepresentable => {
                ProcessError::Storage(e.to_string())
            }
            _ => ProcessError::Unclassified(e.to_string()),
        }
    }
}

/// Per-call context from the build engine.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Identifies the build: sent to remote caches with every call as the invocation id
    /// (`RequestMetadata.tool_invocation_id`), so their logs can tell builds apart.
    pub build_id: String,
    /// What kind of action this is (e.g. "Compile"), sent as `action_mnemonic`.
    pub mnemonic: String,
    /// What the action builds (e.g. "//app:main"), sent as `target_id`.
    pub target: String,
}

/// Runs processes. Object-safe: runners wrap each other behind `Box`/`Arc<dyn CommandRunner>`.
#[async_trait]
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Runs `process`, or obtains its result some other way (e.g. from a cache).
    async fn run(&self, ctx: Context, process: Process) -> Result<ProcessResult, ProcessError>;

    /// Finishes background work (e.g. cache writes). Called once, at the end of a build.
    async fn shutdown(&self) -> Result<(), String>;
}

#[async_trait]
impl<T: CommandRunner + ?Sized> CommandRunner for Box<T> {
    async fn run(&self, ctx: Context, process: Process) -> Result<ProcessResult, ProcessError> {
        (**self).run(ctx, process).await
    }
    async fn shutdown(&self) -> Result<(), String> {
        (**self).shutdown().await
    }
}

#[async_trait]
impl<T: CommandRunner + ?Sized> CommandRunner for std::sync::Arc<T> {
    async fn run(&self, ctx: Context, process: Process) -> Result<ProcessResult, ProcessError> {
        (**self).run(ctx, process).await
    }
    async fn shutdown(&self) -> Result<(), String> {
        (**self).shutdown().await
    }
}
