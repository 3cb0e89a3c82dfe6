//! Colour on terminals: whether to use it (`--color`, `NO_COLOR`, whether the stream is
//! a terminal) and the few ANSI styles the CLI paints with. Owns the decision, once
//! per process; must not paint anything that is not going to a terminal unless the
//! user asked for it with `--color always`.

use std::io::IsTerminal;
use std::sync::OnceLock;

use clap::ValueEnum;

/// `--color`: when to colour output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ColorChoice {
    /// When the output is a terminal, `NO_COLOR` is unset or empty and `TERM` is not
    /// `dumb`.
    #[default]
    Auto,
    /// Always, even into a pipe or with `NO_COLOR` set.
    Always,
    /// Never.
    Never,
}

static CHOICE: OnceLock<ColorChoice> = OnceLock::new();

/// Records the command line's `--color` for the whole process (the first call wins).
pub fn set_choice(choice: ColorChoice) {
    let _ = CHOICE.set(choice);
}

/// The palette for what is printed on stdout.
pub fn stdout_palette() -> Palette {
    Palette {
        on: decide(
            CHOICE.get().copied().unwrap_or_default(),
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
            std::env::var_os("TERM").as_deref(),
        ),
    }
}

/// Whether to colour a stream. <https://no-color.org>: a `NO_COLOR` that is present
/// and not empty disables colour, whatever its value; an explicit `--color always`
/// still wins, as the convention allows.
pub fn decide(
    choice: ColorChoice,
    is_terminal: bool,
    no_color: Option<&std::ffi::OsStr>,
    term: Option<&std::ffi::OsStr>,
) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            is_terminal
                && no_color.is_none_or(|value| value.is_empty())
                && term.is_none_or(|term| term != "dumb")
        }
    }
}

/// ANSI styles, or none at all when colour is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Palette {
    pub on: bool,
}

impl Palette {
    /// No colour.
    pub fn plain() -> Self {
        Self { on: false }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.on && !text.is_empty() {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// Added lines.
    pub fn added(self, text: &str) -> String {
        self.paint("32", text)
    }

    /// Removed lines.
    pub fn removed(self, text: &str) -> String {
        self.paint("31", text)
    }

    /// Changed values.
    pub fn changed(self, text: &str) -> String {
        self.paint("33", text)
    }

    /// Hunk headers (`@@ … @@`).
    pub fn hunk(self, text: &str) -> String {
        self.paint("36", text)
    }

    /// Headings: file names, diff headers.
    pub fn heading(self, text: &str) -> String {
        self.paint("1", text)
    }

    /// Asides (settings stored with no effect).
    pub fn dim(self, text: &str) -> String {
        self.paint("2", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn no_color_when_set_and_not_empty() {
        let auto = ColorChoice::Auto;
        assert!(decide(auto, true, None, Some(OsStr::new("xterm"))));
        assert!(!decide(auto, true, Some(OsStr::new("1")), None));
        assert!(
            !decide(auto, true, Some(OsStr::new("0")), None),
            "any value"
        );
        assert!(
            decide(auto, true, Some(OsStr::new("")), None),
            "empty is unset"
        );
        assert!(!decide(auto, false, None, None), "not a terminal");
        assert!(!decide(auto, true, None, Some(OsStr::new("dumb"))));
        assert!(decide(
            ColorChoice::Always,
            false,
            Some(OsStr::new("1")),
            None
        ));
        assert!(!decide(ColorChoice::Never, true, None, None));
    }

    #[test]
    fn painting_only_when_on() {
        assert_eq!(Palette::plain().added("+x"), "+x");
        assert_eq!(Palette { on: true }.added("+x"), "\x1b[32m+x\x1b[0m");
        assert_eq!(Palette { on: true }.removed(""), "");
    }
}
