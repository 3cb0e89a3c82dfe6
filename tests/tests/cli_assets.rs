//! `packaging/dev/cli-assets.sh OUTDIR` writes apiclient's shell completions and man
//! pages where Debian looks for them; they cover every subcommand, the bash script is
//! valid bash that completes subcommands, and the man pages render with `man -l`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use keel_e2e::{bin, repo_root};

/// The subcommands `apiclient --help` lists (the visible ones), without `help`.
fn subcommands() -> Vec<String> {
    let help = Command::new(bin("apiclient"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let section = help
        .split("Commands:\n")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap()
        .to_owned();
    section
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

fn generate(out: &Path) -> String {
    let run = Command::new("bash")
        .arg(repo_root().join("packaging/dev/cli-assets.sh"))
        .arg(out)
        .env("APICLIENT", bin("apiclient"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "cli-assets.sh: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    let out = tempfile::tempdir().unwrap();
    let listed = generate(out.path());
    let names = subcommands();
    assert!(names.len() >= 14, "{names:?}");
    for must in [
        "raw",
        "get",
        "set",
        "apply",
        "reboot",
        "logs",
        "completions",
    ] {
        assert!(names.iter().any(|n| n == must), "{must} in {names:?}");
    }

    let bash = out
        .path()
        .join("share/bash-completion/completions/apiclient");
    let zsh = out.path().join("share/zsh/vendor-completions/_apiclient");
    let fish = out
        .path()
        .join("share/fish/vendor_completions.d/apiclient.fish");
    for (path, marker) in [
        (&bash, "complete -F _apiclient"),
        (&zsh, "#compdef apiclient"),
        (&fish, "complete -c apiclient"),
    ] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains(marker), "{}", path.display());
        for name in &names {
            assert!(
                text.contains(name.as_str()),
                "{} lacks {name}",
                path.display()
            );
        }
        assert!(listed.contains(&path.display().to_string()), "{listed}");
    }
    // Valid bash, and it completes: `apiclient bo<TAB>` → boot.
    let complete = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}' && COMP_WORDS=(apiclient bo) COMP_CWORD=1 COMP_LINE='apiclient bo' \
             COMP_POINT=12 && _apiclient apiclient bo apiclient && echo \"${{COMPREPLY[@]}}\"",
            bash.display()
        ))
        .output()
        .unwrap();
    assert!(
        complete.status.success(),
        "{}",
        String::from_utf8_lossy(&complete.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&complete.stdout).trim(), "boot");

    let man_dir = out.path().join("share/man/man1");
    for page in std::iter::once("apiclient".to_owned())
        .chain(names.iter().map(|name| format!("apiclient-{name}")))
        .chain(["apiclient-boot-wait".to_owned()])
    {
        let path = man_dir.join(format!("{page}.1.gz"));
        assert!(path.exists(), "{}", path.display());
        // man -l reads the gzip'd roff and renders it; errors go to stderr.
        let rendered = Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .env("LANG", "C.UTF-8")
            .output()
            .unwrap();
        assert!(rendered.status.success(), "man -l {page}");
        let stderr = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            !stderr.contains("warning") && !stderr.contains("error"),
            "{page}: {stderr}"
        );
        let text = String::from_utf8_lossy(&rendered.stdout);
        assert!(text.contains("NAME"), "{page}: {text}");
        assert!(
            text.contains(&page.replace('-', " ")) || text.contains(&page),
            "{page}"
        );
    }
    let wait = Command::new("man")
        .arg("-l")
        .arg(man_dir.join("apiclient-boot-wait.1.gz"))
        .env("MANPAGER", "cat")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&wait.stdout).contains("124"),
        "the timeout's exit code is in the page"
    );

    // Reproducible: the same binary writes the same bytes.
    let again = tempfile::tempdir().unwrap();
    generate(again.path());
    for relative in [
        "share/bash-completion/completions/apiclient",
        "share/man/man1/apiclient-get.1.gz",
    ] {
        assert_eq!(
            std::fs::read(out.path().join(relative)).unwrap(),
            std::fs::read(again.path().join(relative)).unwrap(),
            "{relative}"
        );
    }
}
