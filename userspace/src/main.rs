//! `hvprof`: entry point. Parses the command line and dispatches to one
//! module per command; every error reaches the user as one line on stderr
//! and a non-zero exit.

use std::process::ExitCode;

use clap::Parser as _;
use hvprof::cli;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = cli::Cli::parse();
    match cli.run() {
        Ok(code) => code,
        Err(err) => {
            // One line: the outermost context first, then its causes.
            eprintln!("hvprof: error: {}", cli::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
