//! Bottlerocket `apiclient` subcommands Keel has no counterpart for: `report` (CIS and
//! FIPS compliance reports) and `ephemeral-storage` (RAID and mount of instance-store
//! disks). They parse, so that a script or a bootstrap command written for Bottlerocket
//! gets a clear answer instead of a usage error, and fail with exit 1 saying why.
//! Hidden from help and completions: they are not Keel's commands.

use clap::Args;

use super::CliError;

/// Any arguments, as Bottlerocket's command took them.
#[derive(Debug, Args)]
pub struct AnyArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn report(_args: AnyArgs) -> CliError {
    CliError::Unsupported(
        "`apiclient report` (Bottlerocket's CIS and FIPS compliance reports) is not \
         available on Keel: a Keel host has no report checks to run"
            .to_owned(),
    )
}

pub fn ephemeral_storage(_args: AnyArgs) -> CliError {
    CliError::Unsupported(
        "`apiclient ephemeral-storage` (Bottlerocket's set-up of instance-store disks) is \
         not available on Keel: the Keel image lays out its own disks"
            .to_owned(),
    )
}
