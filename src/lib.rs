//! pipe: runs YAML pipelines of LLM fine-tuning stages as content-hashed, cached,
//! resumable steps.
//!
//! The flow of `pipe run`: [`pipeline`] loads and validates the YAML (with
//! [`pipeline::source_map`] for error places and [`pipeline::interpolate`] for `${...}`), [`plan`] builds the
//! DAG, [`executor`] computes each stage's [`fingerprint`] and either finds its result in
//! the [`store`] or runs the stage (a `pipe_stages::Stage` from the registry it was given)
//! and stores the outputs. [`commands`] holds one module per subcommand. The engine never
//! names a concrete stage kind.
#![warn(missing_docs)]

pub mod cli;
pub mod commands;
pub mod digest;
pub mod executor;
pub mod fingerprint;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod redact;
pub mod store;
pub mod tracking;

pub use cli::Cli;

/// Exit codes.
pub mod exit {
    use crate::pipeline::LoadError;

    /// Everything ran (or was cached).
    pub const OK: u8 = 0;
    /// A stage failed, or `pipe verify` found corruption.
    pub const FAILED: u8 = 1;
    /// The pipeline or the command line is invalid.
    pub const INVALID: u8 = 2;
    /// The store or the file system failed.
    pub const STORE: u8 = 3;
    /// Interrupted by Ctrl-C; rerun to resume.
    pub const INTERRUPTED: u8 = 130;

    /// The exit code for an error that ended a command.
    pub fn code_for(err: &anyhow::Error) -> u8 {
        let invalid = err.downcast_ref::<LoadError>().is_some()
            || err.downcast_ref::<crate::pipeline::SpecError>().is_some()
            || err.downcast_ref::<crate::commands::UsageError>().is_some();
        if invalid {
            INVALID
        } else {
            STORE
        }
    }
}

/// Prints an error the way users read it: one `error:` line per problem.
pub fn report(err: &anyhow::Error) {
    if let Some(pipeline::LoadError::Spec(errors)) = err.downcast_ref::<pipeline::LoadError>() {
        for e in errors {
            eprintln!("error: {e}");
        }
        return;
    }
    eprintln!("error: {err:#}");
}

/// Sets up tracing: `PIPE_LOG` (an env-filter directive) wins, else `-v` levels.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs one parsed command line and returns its exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    commands::dispatch(cli)
}
