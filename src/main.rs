//! The `pipe` command line: parse, run, map errors to exit codes (see `pipe::exit`).
use clap::Parser;

fn main() -> std::process::ExitCode {
    pipe_stages::prepare_process();
    let cli = pipe::cli::Cli::parse();
    pipe::init_tracing(cli.verbose);
    match pipe::run(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            pipe::report(&err);
            std::process::ExitCode::from(pipe::exit::code_for(&err))
        }
    }
}
