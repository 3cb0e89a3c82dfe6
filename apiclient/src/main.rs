//! The `apiclient` binary: parses the command line, runs the command on a
//! single-threaded runtime, prints its output or error, and sets the exit status
//! (0 success, 1 failure, 2 usage error — from clap or the command —, 124 a wait that
//! timed out; see `CliError::exit_code`).

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
            apiclient::note!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(output) => match output.write_to(&mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            // A closed pipe (`apiclient get | head -1`): the reader had what it wanted.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            // A full disk or an I/O error: what was asked for did not get out.
            Err(e) => {
                apiclient::note!("cannot write the output: {e}");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            apiclient::note!("{error}");
            ExitCode::from(error.exit_code())
        }
    }
}
