//! The `apiclient` binary: parses the command line, runs the command on a
//! single-threaded runtime, prints its output or error, and sets the exit status
//! (0 success, 1 failure, 2 usage error — from clap or the command —, 124 a wait that
//! timed out; see `CliError::exit_code`).

use std::io::Write;
use std::process::ExitCode;

use apiclient::cli::{self, Cli};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`apiclient get | head -1`) is not worth a panic.
            let _ = stdout.write_all(output.render().as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(error.exit_code())
        }
    }
}
