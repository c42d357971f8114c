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

pub use local::{KeepSandboxes, LocalRunner, LocalRunnerOptions};
pub use process::{
    CacheScope, CommandRunner, Context, Process, ProcessError, ProcessResult, ResultMetadata,
    ResultSource,
};
