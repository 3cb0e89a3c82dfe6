//! `apiclient completions <shell>` and `apiclient man`: shell completions and man pages,
//! generated from the same clap definitions that parse the command line, so they never
//! drift from it. Packaging writes them with `packaging/dev/cli-assets.sh`; users of a
//! container that has only the binary can `source <(apiclient completions bash)`.

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, ValueEnum};

use super::{Cli, CliError, Output};

/// The shells completions are generated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Prints a shell completion script for apiclient
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  source <(apiclient completions bash)
  apiclient completions zsh > ~/.zfunc/_apiclient
  apiclient completions fish > ~/.config/fish/completions/apiclient.fish")]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes apiclient's man pages (`apiclient.1`, `apiclient-get.1`, …)
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write every page into this directory; without it, print `apiclient.1` on stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> String {
    let mut command = Cli::command();
    let mut script = Vec::new();
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(generator, &mut command, "apiclient", &mut script);
    String::from_utf8_lossy(&script).into_owned()
}

pub fn completions(args: CompletionsArgs) -> Output {
    Output::Text(completion_script(args.shell))
}

/// Every man page: `(file name, roff text)`, the top-level page first, then one per
/// visible subcommand (and sub-subcommand: `apiclient-boot-wait.1`).
pub fn man_pages() -> Result<Vec<(String, String)>, CliError> {
    let mut command = Cli::command();
    command.build();
    let mut pages = Vec::new();
    collect_pages(&command, "apiclient", &mut pages)?;
    Ok(pages)
}

fn collect_pages(
    command: &clap::Command,
    name: &str,
    pages: &mut Vec<(String, String)>,
) -> Result<(), CliError> {
    let page_command = command
        .clone()
        .name(name.to_owned())
        .bin_name(name.replace('-', " "));
    let mut roff = Vec::new();
    clap_mangen::Man::new(page_command)
        .render(&mut roff)
        .map_err(|error| {
            CliError::Invalid(format!("cannot render the man page {name}: {error}"))
        })?;
    pages.push((
        format!("{name}.1"),
        String::from_utf8_lossy(&roff).into_owned(),
    ));
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        collect_pages(sub, &format!("{name}-{}", sub.get_name()), pages)?;
    }
    Ok(())
}

pub fn man(args: ManArgs) -> Result<Output, CliError> {
    let pages = man_pages()?;
    let Some(dir) = args.out_dir else {
        return Ok(pages
            .into_iter()
            .next()
            .map_or(Output::Nothing, |(_, text)| Output::Text(text)));
    };
    let mut written = Vec::new();
    for (file, text) in pages {
        let path = dir.join(&file);
        write_file(&path, &text)?;
        written.push(path.display().to_string());
    }
    Ok(Output::Text(written.join("\n")))
}

fn write_file(path: &Path, text: &str) -> Result<(), CliError> {
    std::fs::write(path, text)
        .map_err(|error| CliError::Invalid(format!("cannot write {}: {error}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand a user can type, by name.
    fn visible_subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .map(|sub| sub.get_name().to_owned())
            .collect()
    }

    #[test]
    fn every_shell_completes_every_subcommand() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = completion_script(shell);
            assert!(script.len() > 1000, "{shell:?}: {script}");
            for name in visible_subcommands() {
                assert!(script.contains(&name), "{shell:?} completion lacks {name}");
            }
        }
        let bash = completion_script(Shell::Bash);
        assert!(bash.contains("complete -F _apiclient"), "{bash}");
        assert!(bash.contains("--socket-path"), "{bash}");
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let pages = man_pages().unwrap_or_default();
        let names: Vec<&str> = pages.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names.first(), Some(&"apiclient.1"));
        for name in visible_subcommands() {
            assert!(
                names.contains(&format!("apiclient-{name}.1").as_str()),
                "no page for {name}: {names:?}"
            );
        }
        assert!(names.contains(&"apiclient-boot-wait.1"), "{names:?}");
        for (name, text) in &pages {
            assert!(text.contains(".TH "), "{name} has no .TH");
        }
        let (_, wait) = pages
            .iter()
            .find(|(name, _)| name == "apiclient-boot-wait.1")
            .expect("boot wait page");
        assert!(
            wait.contains("124"),
            "the timeout's exit code is documented"
        );
    }
}
