//! What a build engine asks to run ([`Process`]), what it gets back ([`ProcessResult`]), the
//! [`CommandRunner`] trait every runner implements, the [`LocalRunner`] that runs processes in a
//! sandbox on this machine, and the REAPI action digest that keys the cache ([`action`]).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use process_execution::{CommandRunner, Context, LocalRunner, LocalRunnerOptions, Process};
//! let local = store::LocalStore::open(store::LocalStoreOptions::new("/tmp/recache-store"))?;
//! let runner = LocalRunner::new(store::Store::local_only(local), LocalRunnerOptions::new("/tmp/sandboxes"));
//! let result = runner
//!     .run(Context::default(), Process::new(["/bin/echo", "hello"]))
//!     .await?;
//! assert_eq!(result.exit_code, 0);
//! # Ok(()) }
//! ```

pub mod action;
mod local;
mod process;

pub use local::{
    KeepSandboxes, LocalRunner, LocalRunnerOptions, RanSandbox, SandboxHandoff, signal_running,
};
pub use process::{
    CacheOutcome, CacheScope, CommandRunner, Context, Process, ProcessError, ProcessResult,
    ResultMetadata, ResultSource,
};

/// A finished process's exit code as [`ProcessResult::exit_code`] holds it: the code, or the
/// negated signal number when a signal ended it (-1 if neither is known).
pub fn exit_code_of(status: &std::process::ExitStatus) -> i32 {
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(status),
    ) {
        (Some(c), _) => c,
        (None, Some(sig)) => -sig,
        (None, None) => -1,
    }
}
