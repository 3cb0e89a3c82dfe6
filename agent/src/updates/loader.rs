//! systemd-boot loader entries for the two slots, with boot counting: which entry the
//! boot loader will pick, writing the entry that makes a staged slot the next boot, and
//! removing it again.
//!
//! Owns the ESP layout the image follows: each slot's kernel and initrd at
//! `<esp>/keel/<slot>/vmlinuz` and `<esp>/keel/<slot>/initrd.img`, its entry at
//! `<esp>/loader/entries/keel-<slot>[+LEFT[-DONE]].conf`. The boot loader renames a
//! counted entry at each try (`+3` → `+2-1` …); `systemd-bless-boot.service` drops the
//! counter once the boot reaches `boot-complete.target` (the image orders it after Keel's
//! `configured`); an entry with no tries left is "bad" and sorted after every other, so the
//! previous slot boots again: that is the rollback.
//!
//! Why every write order is safe against a power cut (see also `durable.rs`):
//! - preparing a slot first removes its entry ([`EspLayout::invalidate`]), durably, before
//!   a byte of its partitions changes: from then on no entry names a slot being written,
//!   and the running slot's entry is the only boot choice;
//! - the kernel and initrd are replaced whole before any entry names them;
//! - activation writes one new file (`keel-<slot>+<tries>.conf`, the highest `version` of
//!   all Keel entries, so systemd-boot sorts it first); until its rename is durable the
//!   boot loader sees no such entry and boots the running slot; after, it boots the new
//!   slot with `tries` attempts, then falls back;
//! - deactivation removes that file: the running slot is again the only choice.
//!
//! `settings.boot`'s kernel and init parameters live in every Keel entry, on a second
//! `options` line after [`PARAMETERS_MARK`] (the Boot Loader Specification joins an
//! entry's `options` lines in order). keeld hands the rendered lines to the slot writer
//! at each apply that changes them, and they are tried before they are kept: they go into
//! a counted trial entry of the running slot (`keel-<slot>-trial+1.conf`,
//! [`EspLayout::stage_parameters`]); once a boot with them is blessed they are written
//! into every entry ([`EspLayout::set_parameters`]) and the trial removed; a trial boot
//! that fails leaves the trial "bad", the kept entry boots, and the next settling
//! ([`EspLayout::settle_parameters`]) removes it and reports it. Activation carries the
//! kept parameters into the new slot's entry. Rewriting an entry keeps its name, boot counter included (the same replace as
//! above: a power cut leaves the old text or the new). `systemd-bless-boot` renames the
//! running slot's entry once per trial boot, right after `configured`, and may do so in
//! the middle of a rewrite, bringing back a counting copy beside the blessed entry: the
//! rewrite repeats until a pass finds nothing to do, and removes such a copy
//! ([`EspLayout::set_parameters`]). Only a power cut inside that instant can still leave
//! the copy: both entries boot the same slot; `systemd-bless-boot` does not rename over
//! an existing file, so the copy counts down at each boot from it until it is "bad" and
//! the blessed entry is chosen; it does not hold up a prepare; and the next parameter
//! change removes it.
//!
//! Every change of the entries holds [`EspLayout::lock`], so a parameter change and an
//! activation (separate writer sessions) never interleave.
//!
//! Must not touch anything under the ESP but `keel/<slot>/` and `loader/entries/keel-*`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::durable;
use super::slots::{Part, Slot};

/// The `sort-key` of Keel's entries: systemd-boot sorts entries with a sort key by it,
/// then by `version`, newest first.
pub const SORT_KEY: &str = "keel";
/// The boot files of a slot on the ESP.
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
/// Longest loader entry read (they are a few hundred bytes).
const MAX_ENTRY_BYTES: u64 = 64 * 1024;
/// The comment line before the `options` line that holds `settings.boot`'s parameters.
pub const PARAMETERS_MARK: &str = "# settings.boot (keeld): kernel parameters -- init parameters";
/// What follows `keel-<slot>` in the name of a parameter trial's entry. A name of its
/// own: `systemd-bless-boot` does not rename over an existing file, so a trial cannot
/// share the slot entry's name.
pub const TRIAL_SUFFIX: &str = "-trial";
/// The option a parameter trial's entry adds to Keel's, `keel.parameters-trial=<version>`
/// (the entry's `version`), so that the boot it starts can tell (from `/proc/cmdline`)
/// which trial it runs. A `keel.` word: never carried into another entry (see
/// [`extra_options`]), ignored by the initramfs.
pub const TRIAL_MARK: &str = "keel.parameters-trial";

/// What a parameter trial's title adds to the kept entry's.
const TRIAL_TITLE: &str = ", new boot parameters on trial";
/// The longest kernel command line x86_64 Linux takes (`COMMAND_LINE_SIZE`, with its
/// terminating NUL): a longer one is cut, silently, and loses its last parameters.
pub const MAX_COMMAND_LINE: usize = 2047;

/// Why the ESP could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("ESP {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {slot} has no {file} on the ESP ({path}): prepare the update first")]
    MissingBootFile {
        slot: Slot,
        file: &'static str,
        path: PathBuf,
    },
    #[error(
        "the kernel command line of {file} would be {bytes} bytes with these parameters, and \
         Linux takes at most {MAX_COMMAND_LINE}: shorten settings.boot.kernel-parameters or \
         init-parameters"
    )]
    CommandLineTooLong { file: String, bytes: usize },
    #[error(
        "the running slot {slot} booted from a loader entry that is not marked good yet \
         ({file}): the boot has not completed, so the other slot is still its fallback and \
         may not be overwritten; try again once the host is configured"
    )]
    RunningNotBlessed { slot: Slot, file: String },
    #[error(
        "new boot parameters from settings.boot await their trial ({file}): an update is \
         activated once a boot has reached configured with them (and they are kept) or \
         gone back without them; reboot to try them, or set settings.boot back"
    )]
    ParametersOnTrial { file: String },
    #[error(
        "this boot tries new boot parameters from settings.boot ({file}) and has not reached \
         configured yet: an update is activated once it has (and they are kept)"
    )]
    ParametersBeingTried { file: String },
    #[error("no loader entry names the running slot {slot}: there is no entry to try new boot parameters from")]
    NoRunningEntry { slot: Slot },
    #[error(
        "a loader entry's version is {version}: no version is left to sort a new entry \
         before it (remove or renumber that entry on the ESP)"
    )]
    VersionExhausted { version: u64 },
}

/// Where a trial of new `settings.boot` parameters stands (see [`EspLayout::stage_parameters`]).
/// `parameters` are in the `options` form of [`BootParameters::options`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ParameterTrial {
    /// No trial entry.
    None,
    /// Written and not booted yet: the next boot tries them.
    Pending { entry: String, parameters: String },
    /// This boot runs them; they are kept once it reaches `configured`.
    Running { entry: String, parameters: String },
    /// A boot with them reached `configured`: they are in every entry now, and the trial
    /// entry is gone.
    Kept { parameters: String },
    /// The boot with them did not reach `configured`, and the boot loader went back to
    /// the kept entry: the trial entry is removed, the parameters are not kept.
    Failed { entry: String, parameters: String },
    /// Not handed over now (`reason`): a trial cannot start while this boot is itself on
    /// trial, or while an update waits for the next boot. Nothing was written; the caller
    /// hands them over again at a later boot.
    Deferred { reason: String },
}

/// What a change or a settling of the boot parameters answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    /// The parameters (`options` form) of the running slot's kept entry: what a boot
    /// from it gets.
    pub kept: String,
    pub trial: ParameterTrial,
    /// The loader entries written or removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<String>,
}

/// A Keel loader entry found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// The file name, with its boot counter.
    pub file: String,
    pub slot: Slot,
    /// Tries left (`+LEFT`); `None` for an entry without a counter (blessed or never
    /// counted).
    pub tries_left: Option<u32>,
    /// Tries done (`-DONE`).
    pub tries_done: Option<u32>,
    /// The entry's `version` (its order among Keel's entries).
    pub sort_version: Option<u64>,
    /// The Keel version the slot holds (`# keel-os-version` line), when written by keeld.
    pub os_version: Option<String>,
    /// `keel.roothash=` of its options.
    pub root_hash: Option<String>,
    /// A trial of new `settings.boot` parameters (`keel-<slot>-trial…`), not one of the
    /// slot's own entries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trial: bool,
}

impl EntryInfo {
    /// Whether systemd-boot considers it bad (no tries left): sorted last, chosen only
    /// when nothing else is left.
    pub fn is_bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    /// Whether it still counts tries (not yet blessed).
    pub fn is_counting(&self) -> bool {
        self.tries_left.is_some()
    }
}

/// Splits `keel-b+2-1.conf` into the slot and the counter; `None` for other files (a
/// parameter trial's included: see [`parse_trial_name`]).
pub fn parse_entry_name(file: &str) -> Option<(Slot, Option<u32>, Option<u32>)> {
    parse_name(file, "")
}

/// Splits a parameter trial's `keel-a-trial+0-1.conf` as [`parse_entry_name`] does.
pub fn parse_trial_name(file: &str) -> Option<(Slot, Option<u32>, Option<u32>)> {
    parse_name(file, TRIAL_SUFFIX)
}

fn parse_name(file: &str, suffix: &str) -> Option<(Slot, Option<u32>, Option<u32>)> {
    let stem = file.strip_suffix(".conf")?;
    let (id, counter) = match stem.split_once('+') {
        Some((id, counter)) => (id, Some(counter)),
        None => (stem, None),
    };
    let slot = Slot::parse(id.strip_prefix("keel-")?.strip_suffix(suffix)?)?;
    let (left, done) = match counter {
        None => (None, None),
        Some(counter) => {
            let (left, done) = match counter.split_once('-') {
                Some((left, done)) => (left, Some(done.parse().ok()?)),
                None => (counter, None),
            };
            (Some(left.parse().ok()?), done)
        }
    };
    Some((slot, left, done))
}

/// What to write into a new entry.
#[derive(Debug, Clone)]
pub struct NewEntry<'a> {
    pub slot: Slot,
    pub os_version: &'a str,
    pub root_hash: &'a str,
    pub sort_version: u64,
    /// Kernel options beyond Keel's own (console flags…), carried over from the running
    /// slot's entry.
    pub extra_options: &'a str,
    /// `settings.boot`'s parameters, carried over from the running slot's entry.
    pub parameters: &'a BootParameters,
}

/// `settings.boot`'s parameters as they go on the kernel command line: the kernel's,
/// then, after `--`, init's (each a space-separated line, as the templates render them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootParameters {
    pub kernel: String,
    pub init: String,
}

impl BootParameters {
    /// The `options` value: `kernel -- init`, `kernel` alone without init parameters.
    pub fn options(&self) -> String {
        let kernel = self.kernel.split_ascii_whitespace();
        let init = self.init.split_ascii_whitespace();
        let mut words: Vec<&str> = kernel.collect();
        let init: Vec<&str> = init.collect();
        if !init.is_empty() {
            words.push("--");
            words.extend(init);
        }
        words.join(" ")
    }

    /// Parses an `options` value written by [`BootParameters::options`].
    fn parse(options: &str) -> BootParameters {
        let words: Vec<&str> = options.split_ascii_whitespace().collect();
        let (kernel, init) = match words.iter().position(|w| *w == "--") {
            Some(i) => (&words[..i], &words[i + 1..]),
            None => (&words[..], &[][..]),
        };
        BootParameters {
            kernel: kernel.join(" "),
            init: init.join(" "),
        }
    }

    /// Why these words cannot go on the command line: a word a kernel or init parameter
    /// cannot be (Keel's own `keel.*` keys, a bare `--`, quotes, controls, non-ASCII).
    pub fn check(&self) -> Result<(), String> {
        for (what, line) in [("kernel", &self.kernel), ("init", &self.init)] {
            for word in line.split_ascii_whitespace() {
                // systemd reads the command line unquoting: a `'` or `\` would join the
                // words after it (see settings-model's BootParamValue).
                let printable = word
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"\"'\\".contains(&b));
                if !printable || word.starts_with('-') {
                    return Err(format!(
                        "{what} parameter {word:?} is not a parameter (printable ASCII without \
                         quotes or backslashes, not starting with '-')"
                    ));
                }
                // Not even after `--`: the initramfs reads every `keel.*` word of the line.
                if word.starts_with("keel.") || word.starts_with("initrd=") {
                    return Err(format!(
                        "{what} parameter {word:?} is the boot loader's or Keel's own"
                    ));
                }
            }
            if line.len() > MAX_COMMAND_LINE {
                return Err(format!(
                    "{what} parameters are longer than {MAX_COMMAND_LINE} bytes"
                ));
            }
        }
        Ok(())
    }
}

/// The options line of a slot: Keel's keys, then `extra`.
pub fn options_line(slot: Slot, root_hash: &str, extra: &str) -> String {
    let mut line = format!(
        "keel.slot={slot} keel.roothash={root_hash} keel.root=PARTLABEL={} \
         keel.verity=PARTLABEL={}",
        Part::Root.label(slot),
        Part::Hash.label(slot)
    );
    if !extra.trim().is_empty() {
        line.push(' ');
        line.push_str(extra.trim());
    }
    line
}

/// The text of a loader entry.
pub fn render_entry(entry: &NewEntry<'_>) -> String {
    let slot = entry.slot;
    let text = format!(
        "# Written by keeld (updates): slot {slot}, Keel {version}.\n\
         # keel-os-version {version}\n\
         title Keel {version} (slot {slot})\n\
         sort-key {SORT_KEY}\n\
         version {sort}\n\
         linux /keel/{slot}/{KERNEL}\n\
         initrd /keel/{slot}/{INITRD}\n\
         options {options}\n",
        version = entry.os_version,
        sort = entry.sort_version,
        options = options_line(slot, entry.root_hash, entry.extra_options),
    );
    with_parameters(&text, entry.parameters)
}

/// An entry's lines, each with whether it is the marked `options` line of the parameters
/// (or the mark itself).
fn parameter_lines(entry_text: &str) -> impl Iterator<Item = (&str, bool)> {
    let mut after_mark = false;
    entry_text.lines().map(move |line| {
        let is_mark = line.trim() == PARAMETERS_MARK;
        let is_parameters = after_mark && line.trim_start().starts_with("options");
        after_mark = is_mark;
        (line, is_mark || is_parameters)
    })
}

/// The options of an entry's text other than Keel's own keys and `settings.boot`'s
/// parameters: what the image put there.
pub fn extra_options(entry_text: &str) -> String {
    parameter_lines(entry_text)
        .filter(|(_, parameters)| !parameters)
        .filter_map(|(l, _)| l.trim().strip_prefix("options"))
        .flat_map(str::split_ascii_whitespace)
        .filter(|w| !w.starts_with("keel."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `settings.boot`'s parameters in an entry's text (empty when it has none).
pub fn entry_parameters(entry_text: &str) -> BootParameters {
    parameter_lines(entry_text)
        .filter(|(_, parameters)| *parameters)
        .find_map(|(l, _)| l.trim().strip_prefix("options"))
        .map(BootParameters::parse)
        .unwrap_or_default()
}

/// The entry's text with its parameters replaced by `parameters` (the mark and its
/// `options` line last; neither when there are none).
pub fn with_parameters(entry_text: &str, parameters: &BootParameters) -> String {
    let mut text: String = parameter_lines(entry_text)
        .filter(|(_, p)| !p)
        .map(|(l, _)| format!("{l}\n"))
        .collect();
    let options = parameters.options();
    if !options.is_empty() {
        text.push_str(PARAMETERS_MARK);
        text.push('\n');
        text.push_str("options ");
        text.push_str(&options);
        text.push('\n');
    }
    text
}

/// The command line systemd-boot makes of an entry: `initrd=<path>` for the EFI stub,
/// then its `options` lines joined.
pub fn command_line(entry_text: &str) -> String {
    let mut words: Vec<String> = Vec::new();
    if let Some(initrd) = entry_field(entry_text, "initrd") {
        words.push(format!("initrd={}", initrd.replace('/', "\\")));
    }
    for line in entry_text.lines() {
        if let Some(options) = line.trim().strip_prefix("options") {
            if options.starts_with(char::is_whitespace) {
                words.extend(options.split_ascii_whitespace().map(str::to_owned));
            }
        }
    }
    words.join(" ")
}

fn entry_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix(key)?;
        rest.starts_with(char::is_whitespace).then(|| rest.trim())
    })
}

/// Whether an entry's text can boot a slot: it names a kernel, an initrd and the root
/// hash. On vfat a power cut in the instant after a rename can leave an entry's name
/// with no content, or another file's (see `durable.rs`); such an entry is not rewritten
/// and does not count as a slot's entry when a trial is folded.
fn is_whole(entry: &EntryInfo, text: &str) -> bool {
    entry_field(text, "linux").is_some()
        && entry_field(text, "initrd").is_some()
        && entry.root_hash.is_some()
}

/// The ESP as the updates see it.
#[derive(Debug, Clone)]
pub struct EspLayout {
    pub esp: PathBuf,
}

impl EspLayout {
    pub fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }

    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.esp.join("keel").join(slot.as_str())
    }

    /// `slot`'s kernel and initrd are on the ESP (an entry needs both to boot), or which
    /// is missing.
    pub fn boot_files_present(&self, slot: Slot) -> Result<(), LoaderError> {
        for file in [KERNEL, INITRD] {
            let path = self.slot_dir(slot).join(file);
            if !path.is_file() {
                return Err(LoaderError::MissingBootFile { slot, file, path });
            }
        }
        Ok(())
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoaderError + '_ {
        move |source| LoaderError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Keel's entries, in file-name order.
    pub fn entries(&self) -> Result<Vec<(EntryInfo, String)>, LoaderError> {
        let dir = self.entries_dir();
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&dir)(e)),
        };
        let mut found = Vec::new();
        for item in listing {
            let item = item.map_err(Self::io(&dir))?;
            let file = item.file_name().to_string_lossy().into_owned();
            let (name, trial) = match parse_entry_name(&file) {
                Some(name) => (name, false),
                None => match parse_trial_name(&file) {
                    Some(name) => (name, true),
                    None => continue,
                },
            };
            let (slot, tries_left, tries_done) = name;
            let path = item.path();
            let bytes = durable::read_bounded(&path, MAX_ENTRY_BYTES).map_err(Self::io(&path))?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let root_hash = entry_field(&text, "options")
                .and_then(|o| super::slots::cmdline_value(o, "keel.roothash").map(str::to_owned));
            let info = EntryInfo {
                file,
                slot,
                tries_left,
                tries_done,
                sort_version: entry_field(&text, "version").and_then(|v| v.parse().ok()),
                os_version: entry_field(&text, "# keel-os-version").map(str::to_owned),
                root_hash,
                trial,
            };
            found.push((info, text));
        }
        found.sort_by(|a, b| a.0.file.cmp(&b.0.file));
        Ok(found)
    }

    /// Holds off every other change of Keel's entries (another writer session) until
    /// dropped: an exclusive `flock` on the entries directory.
    pub fn lock(&self) -> Result<std::fs::File, LoaderError> {
        let dir = self.entries_dir();
        std::fs::create_dir_all(&dir).map_err(Self::io(&dir))?;
        let file = std::fs::File::open(&dir).map_err(Self::io(&dir))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Self::io(&dir)(e.into()))?;
        Ok(file)
    }

    /// Holds off every other writer session's slot writes until the answer is dropped:
    /// an exclusive `flock` on the ESP's mount point (not on the entries directory,
    /// which [`EspLayout::lock`] takes for each entry change; always taken before it).
    /// A session takes it at its first request that touches a slot (invalidate, write,
    /// activate, deactivate, and a settled inspect, which asks for what such a session
    /// leaves) and keeps it to its end; one that only inspects or stages boot parameters
    /// never does, so those still run beside a prepare that streams an image for hours. Without it, a session that keeld gave up on (a prepare past its
    /// deadline) while it still checked what it wrote ran beside the next prepare's,
    /// which invalidates and writes the same slot; and a deactivate could remove an
    /// entry that an abandoned activate wrote next. Waits up to `wait` for the session
    /// before it (`keel-slot-writer --session-wait`, 45 s: under keeld's 60 s wait for
    /// an answer, so that keeld hears why), then answers why not.
    pub fn lock_slots(&self, wait: std::time::Duration) -> Result<std::fs::File, String> {
        use rustix::fs::{flock, FlockOperation};
        let esp = &self.esp;
        // `/.`: into the file system mounted there (an automount is triggered), which
        // the open descriptor then keeps mounted.
        let dir = std::fs::File::open(esp.join("."))
            .map_err(|e| format!("cannot open the ESP {} to lock it: {e}", esp.display()))?;
        let deadline = std::time::Instant::now() + wait;
        let mut said = false;
        loop {
            match flock(&dir, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(dir),
                Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                    if !said {
                        tracing::info!(esp = %esp.display(), "waiting for another slot writer session's writes to end");
                        said = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(format!(
                        "another slot writer session still writes or checks a slot (it holds {}) after {} s: try again once it has ended",
                        esp.display(),
                        wait.as_secs()
                    ))
                }
                Err(e) => return Err(format!("cannot lock the ESP {}: {e}", esp.display())),
            }
        }
    }

    /// Removes every entry of `slot` (durably): from now on no entry names it. Answers
    /// the files removed.
    pub fn invalidate(&self, slot: Slot) -> Result<Vec<String>, LoaderError> {
        let _lock = self.lock()?;
        // A kept trial's parameters go into the slots' entries first, where an
        // activation carries them from.
        self.fold_blessed_trials()?;
        let mut removed = Vec::new();
        for (entry, _) in self.entries()? {
            if entry.slot == slot {
                let path = self.entries_dir().join(&entry.file);
                durable::remove(&path).map_err(Self::io(&path))?;
                removed.push(entry.file);
            }
        }
        Ok(removed)
    }

    /// Refuses when the running slot booted from an entry still counting tries: the boot
    /// has not been blessed, so the other slot's entry is its fallback. A counting copy
    /// of a blessed entry of the same version (see [`EspLayout::set_parameters`]) does
    /// not count: that version has been blessed.
    /// A parameter trial does not count here: its fallback is the running slot's own
    /// kept entry, not the other slot.
    pub fn check_running_blessed(&self, running: Slot) -> Result<(), LoaderError> {
        let entries: Vec<_> = self
            .entries()?
            .into_iter()
            .filter(|(e, _)| !e.trial)
            .collect();
        let blessed = |e: &EntryInfo| {
            entries.iter().any(|(other, _)| {
                other.slot == e.slot && !other.is_counting() && other.sort_version == e.sort_version
            })
        };
        match entries
            .iter()
            .find(|(e, _)| e.slot == running && e.is_counting() && !blessed(e))
            .cloned()
        {
            Some((entry, _)) => Err(LoaderError::RunningNotBlessed {
                slot: running,
                file: entry.file,
            }),
            None => Ok(()),
        }
    }

    /// Writes the entry that makes `entry.slot` the next boot with `tries` attempts.
    /// Requires the slot's kernel and initrd on the ESP; replaces any older entry of the
    /// slot (the new one first: at no point is there no entry where one was). With
    /// `carry_from` (the running slot and the kernel command line), the entry's extra
    /// options and parameters are [`Self::carried`] over, read under the same lock, so a
    /// parameter change ([`Self::set_parameters`]) lands before or after, never lost
    /// between the read and the write.
    pub fn activate(
        &self,
        entry: NewEntry<'_>,
        carry_from: Option<(Slot, &str)>,
        tries: u32,
    ) -> Result<String, LoaderError> {
        let _lock = self.lock()?;
        self.fold_blessed_trials()?;
        // A trial still counting (not booted yet, or booted and not blessed yet): the new
        // entry would carry parameters no boot has kept, or drop the ones on trial.
        for (trial, _) in self
            .entries()?
            .into_iter()
            .filter(|(e, _)| e.trial && e.is_counting())
        {
            if carry_from.is_some_and(|(running, cmdline)| {
                trial.slot == running && runs_trial(cmdline, &trial)
            }) {
                return Err(LoaderError::ParametersBeingTried { file: trial.file });
            }
            if !trial.is_bad() {
                return Err(LoaderError::ParametersOnTrial { file: trial.file });
            }
            if carry_from.is_none() {
                return Err(LoaderError::ParametersBeingTried { file: trial.file });
            }
            // Tried, and this boot came back without it: it failed, and keeld had not
            // settled it yet (the writer could not be asked at this boot's start). Its
            // parameters are in no entry once it is gone, so the next boot's settling
            // takes the staged ones as failed (the lost-verdict rule): removing it here
            // loses no report, where refusing would hold every update back until keeld
            // settles.
            let path = self.entries_dir().join(&trial.file);
            tracing::warn!(entry = %trial.file, "a boot with new boot parameters did not reach configured and was not settled: removed before the activation");
            durable::remove(&path).map_err(Self::io(&path))?;
        }
        let carried = carry_from
            .map(|(running, cmdline)| self.carried(running, cmdline))
            .transpose()?;
        let mut entry = match &carried {
            Some((extra, parameters)) => NewEntry {
                extra_options: extra,
                parameters,
                ..entry
            },
            None => entry,
        };
        self.boot_files_present(entry.slot)?;
        let existing = self.entries()?;
        entry.sort_version = entry.sort_version.max(next_version(&existing, None)?);
        let file = format!("keel-{}+{tries}.conf", entry.slot);
        let dir = self.entries_dir();
        let path = dir.join(&file);
        let text = render_entry(&entry);
        check_length(&file, &text)?;
        durable::replace(&path, text.as_bytes()).map_err(Self::io(&path))?;
        for (old, _) in existing {
            if old.slot == entry.slot && old.file != file {
                let path = dir.join(&old.file);
                durable::remove(&path).map_err(Self::io(&path))?;
            }
        }
        Ok(file)
    }

    /// What a new entry carries over from the running slot's: the options beyond Keel's
    /// own keys (console flags the image set) and `settings.boot`'s parameters; from the
    /// kernel command line, up to a `--`, when no entry names the running slot.
    pub fn carried(
        &self,
        running: Slot,
        cmdline: &str,
    ) -> Result<(String, BootParameters), LoaderError> {
        if let Some((_, text)) = self
            .entries()?
            .into_iter()
            .find(|(e, t)| e.slot == running && !e.trial && is_whole(e, t))
        {
            return Ok((extra_options(&text), entry_parameters(&text)));
        }
        // systemd-boot adds initrd= for the EFI stub; BOOT_IMAGE comes from other loaders.
        let extra = cmdline
            .split_ascii_whitespace()
            .take_while(|w| *w != "--")
            .filter(|w| {
                !w.starts_with("keel.")
                    && !w.starts_with("initrd=")
                    && !w.starts_with("BOOT_IMAGE=")
            })
            .collect::<Vec<_>>()
            .join(" ");
        Ok((extra, BootParameters::default()))
    }

    /// Writes `parameters` into every Keel entry (each keeps its name and counter), so the
    /// next boot of either slot has them. Nothing is written when one entry's command line
    /// would be too long. Answers the entries rewritten; an entry that already holds them
    /// is left alone.
    ///
    /// `systemd-bless-boot` renames the running slot's entry (drops its counter) once per
    /// trial boot, without this lock. If it does so between a pass's read and its replace,
    /// the replace brings the counting name back beside the blessed one, which still holds
    /// the old parameters; if between the listing and the read, the read finds the file
    /// gone. So passes repeat until one finds nothing to do: a later pass rewrites the
    /// blessed entry and then removes the counting copy of it (see [`parameters_pass`]).
    /// The rename happens once, so the second pass normally settles it.
    /// Parameter trials are left alone (see [`EspLayout::stage_parameters`]).
    pub fn set_parameters(&self, parameters: &BootParameters) -> Result<Vec<String>, LoaderError> {
        let _lock = self.lock()?;
        self.write_parameters(parameters)
    }

    /// [`EspLayout::set_parameters`], with the lock held.
    fn write_parameters(&self, parameters: &BootParameters) -> Result<Vec<String>, LoaderError> {
        const PASSES: usize = 4;
        let mut written: Vec<String> = Vec::new();
        let mut vanished = false;
        for _ in 0..PASSES {
            // `None`: an entry was gone when read, as when renamed after the listing; list
            // again, once: an entry that stays unreadable that way (a dangling link) is an
            // error of its own, which a last listing reports.
            let Some((rewritten, removed)) = self.parameters_pass(parameters)? else {
                if vanished {
                    self.entries()?;
                }
                vanished = true;
                continue;
            };
            if rewritten.is_empty() && removed == 0 {
                // A file a pass rewrote may be the copy a later pass removed.
                let dir = self.entries_dir();
                written.retain(|file| dir.join(file).exists());
                return Ok(written);
            }
            for file in rewritten {
                if !written.contains(&file) {
                    written.push(file);
                }
            }
        }
        Err(LoaderError::Io {
            path: self.entries_dir(),
            source: std::io::Error::other(format!(
                "the loader entries kept changing while keeld wrote the boot parameters \
                 ({PASSES} passes)"
            )),
        })
    }

    /// One pass of [`EspLayout::set_parameters`]: rewrites each entry that does not hold
    /// `parameters`, then removes each counting entry that duplicates a blessed entry of
    /// the same slot and version (what a rewrite racing `systemd-bless-boot` leaves; no
    /// other path makes two entries of one slot, since activation replaces the slot's
    /// entries). The blessed entry is rewritten first, so the slot always has an entry
    /// with the parameters. Answers the files rewritten and how many were removed (none
    /// of either when settled), or `None` when an entry listed was gone when read.
    fn parameters_pass(
        &self,
        parameters: &BootParameters,
    ) -> Result<Option<(Vec<String>, usize)>, LoaderError> {
        let entries = match self.entries() {
            Ok(entries) => entries,
            Err(LoaderError::Io { path, source })
                if source.kind() == std::io::ErrorKind::NotFound && path != self.entries_dir() =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let entries: Vec<_> = entries.into_iter().filter(|(e, _)| !e.trial).collect();
        let duplicate = |entry: &EntryInfo| {
            entry.is_counting()
                && entries.iter().any(|(other, _)| {
                    other.slot == entry.slot
                        && !other.is_counting()
                        && other.sort_version == entry.sort_version
                })
        };
        let mut rewrite = Vec::new();
        let mut remove = Vec::new();
        for (entry, text) in &entries {
            if duplicate(entry) {
                remove.push(entry.file.clone());
                continue;
            }
            if !is_whole(entry, text) {
                tracing::error!(file = %entry.file, "a loader entry names no kernel, initrd or root hash (damaged by a power cut?): not rewritten");
                continue;
            }
            let new = with_parameters(text, parameters);
            if &new != text {
                check_length(&entry.file, &new)?;
                rewrite.push((entry.file.clone(), new));
            }
        }
        let dir = self.entries_dir();
        for (file, text) in &rewrite {
            let path = dir.join(file);
            durable::replace(&path, text.as_bytes()).map_err(Self::io(&path))?;
        }
        for file in &remove {
            tracing::info!(file = %file, "removing a counting copy of a blessed loader entry (a parameter rewrite raced systemd-bless-boot)");
            let path = dir.join(file);
            durable::remove(&path).map_err(Self::io(&path))?;
        }
        Ok(Some((
            rewrite.into_iter().map(|(file, _)| file).collect(),
            remove.len(),
        )))
    }

    /// Hands new `settings.boot` parameters to the boot loader to be tried before they are
    /// kept: they go into one new counted entry for the running slot,
    /// `keel-<slot>-trial+1.conf` (a copy of the slot's kept entry with them, sorted first,
    /// marked with [`TRIAL_MARK`]), and the kept entries stay as they are. The next boot
    /// tries them once. A boot that reaches `configured` is blessed
    /// (`systemd-bless-boot`), and the next [`EspLayout::settle_parameters`] (or slot
    /// change) writes them into every entry and removes the trial; a boot that does not
    /// leaves the trial with no tries left, sorted last, so the boot after it is the kept
    /// entry's, with the parameters it had. A parameter that stops the boot therefore
    /// costs one boot, not the host.
    ///
    /// Parameters the kept entry already holds remove any trial instead (a change taken
    /// back). A new trial replaces an older one, except the one this boot runs (`cmdline`
    /// has its mark) before it is blessed: the same parameters answer `Running`, others
    /// are deferred. Deferred too (nothing written, [`ParameterTrial::Deferred`]) while
    /// the running slot's own entry still counts tries (an update's first boot: the trial
    /// would be sorted before it) and while an update is activated for the next boot (the
    /// trial would be booted instead of it). A deferral is no error: an apply at boot
    /// that failed on it would fail the boot, and so roll an update back. An activation
    /// waits for a trial in turn ([`EspLayout::activate`]). Counting copies of the kept
    /// entry (see [`EspLayout::set_parameters`]) are removed.
    ///
    /// Power cuts: the trial is written whole (temporary file, fsync, rename, directory
    /// fsync) before an older trial is removed; until its rename is durable the next boot
    /// is the kept entry's, after it the trial's; either boots.
    pub fn stage_parameters(
        &self,
        parameters: &BootParameters,
        running: Slot,
        cmdline: &str,
    ) -> Result<Settled, LoaderError> {
        let _lock = self.lock()?;
        let mut changed = match self.fold_blessed_trials()? {
            Some((_, written)) => written,
            None => Vec::new(),
        };
        let dir = self.entries_dir();
        let entries = self.entries()?;
        let kept = match kept_entry(&entries, running) {
            Err(LoaderError::NoRunningEntry { .. })
                if entries
                    .iter()
                    .any(|(e, _)| e.trial && e.slot == running && !e.is_counting()) =>
            {
                return Ok(deferred(format!(
                    "the running slot {running} has no whole loader entry of its own (its \
                     blessed parameter trial boots it): new boot parameters wait until an \
                     update writes the slot's entry again"
                )))
            }
            other => other?,
        };
        let kept_text = match kept {
            Kept::Blessed { text, copies } => {
                // Counting copies of the kept entry (a rewrite that raced
                // systemd-bless-boot, see `set_parameters`): the same slot and version.
                for copy in copies {
                    tracing::info!(file = %copy, "removing a counting copy of a blessed loader entry");
                    let path = dir.join(&copy);
                    if durable::remove(&path).map_err(Self::io(&path))? {
                        changed.push(copy);
                    }
                }
                text
            }
            Kept::Counting(file) => {
                return Ok(deferred(format!(
                    "the running slot {running} booted from a loader entry that is not marked \
                     good yet ({file}): new boot parameters are tried from a kept entry, so \
                     they are handed over at the next boot"
                )))
            }
        };
        let kept_parameters = entry_parameters(&kept_text).options();
        if let Some((update, _)) = entries
            .iter()
            .find(|(e, _)| !e.trial && e.slot != running && e.is_counting() && !e.is_bad())
        {
            return Ok(deferred(format!(
                "an update is activated for the next boot ({}): new boot parameters are \
                 handed over at the boot after it (deactivate it to try them first)",
                update.file
            )));
        }
        let trials: Vec<&(EntryInfo, String)> = entries.iter().filter(|(e, _)| e.trial).collect();
        if let Some((this, text)) = trials
            .iter()
            .find(|(e, _)| e.is_counting() && runs_trial(cmdline, e))
        {
            // This boot is the trial of some parameters and not blessed yet: replacing its
            // entry now would make the bless fail and lose its verdict.
            let on_trial = entry_parameters(text).options();
            if on_trial == parameters.options() {
                return Ok(Settled {
                    kept: kept_parameters,
                    trial: ParameterTrial::Running {
                        entry: this.file.clone(),
                        parameters: on_trial,
                    },
                    entries: changed,
                });
            }
            return Ok(deferred(format!(
                "this boot tries other new boot parameters ({}): changes are handed over at \
                 the next boot, once its verdict is in",
                this.file
            )));
        }
        let trials: Vec<String> = trials.iter().map(|(e, _)| e.file.clone()).collect();
        if kept_parameters == parameters.options() {
            for file in trials {
                let path = dir.join(&file);
                if durable::remove(&path).map_err(Self::io(&path))? {
                    changed.push(file);
                }
            }
            return Ok(Settled {
                kept: kept_parameters,
                trial: ParameterTrial::None,
                entries: changed,
            });
        }
        // Above this boot's own trial mark too: that trial may be gone (folded once
        // blessed) with the versions of the entries unchanged, and a new trial of the
        // same version would read as the one this boot runs.
        let version = next_version(&entries, Some(cmdline))?;
        let file = format!("keel-{running}{TRIAL_SUFFIX}+1.conf");
        let text = trial_entry_text(&kept_text, parameters, version);
        check_length(&file, &text)?;
        let path = dir.join(&file);
        durable::replace(&path, text.as_bytes()).map_err(Self::io(&path))?;
        changed.push(file.clone());
        for old in trials.into_iter().filter(|old| *old != file) {
            let path = dir.join(&old);
            if durable::remove(&path).map_err(Self::io(&path))? {
                changed.push(old);
            }
        }
        Ok(Settled {
            kept: kept_parameters,
            trial: ParameterTrial::Pending {
                entry: file,
                parameters: parameters.options(),
            },
            entries: changed,
        })
    }

    /// Where the parameter trial stands, at a boot's start (`cmdline` is this boot's
    /// kernel command line): a blessed trial is kept ([`Self::fold_blessed_trials`]); a
    /// trial with no tries left that this boot does not run failed, and is removed (the
    /// answer is the only report of it: keeld records it in the boot's status); one this
    /// boot runs, or one not booted yet, stays.
    pub fn settle_parameters(&self, running: Slot, cmdline: &str) -> Result<Settled, LoaderError> {
        let _lock = self.lock()?;
        let mut changed = Vec::new();
        let mut trial = match self.fold_blessed_trials()? {
            Some((parameters, written)) => {
                changed = written;
                ParameterTrial::Kept {
                    parameters: parameters.options(),
                }
            }
            None => ParameterTrial::None,
        };
        // One verdict is answered: a failure before a running trial before a pending one
        // before a kept one (there is normally one trial at most).
        let rank = |t: &ParameterTrial| match t {
            ParameterTrial::Failed { .. } => 4,
            ParameterTrial::Running { .. } => 3,
            ParameterTrial::Pending { .. } => 2,
            ParameterTrial::Kept { .. } => 1,
            ParameterTrial::None | ParameterTrial::Deferred { .. } => 0,
        };
        let dir = self.entries_dir();
        for (entry, text) in self.entries()?.into_iter().filter(|(e, _)| e.trial) {
            let parameters = entry_parameters(&text).options();
            let verdict = if !entry.is_counting() {
                // Blessed and still here: the fold above could not make its slot a
                // whole entry of its own.
                ParameterTrial::Kept { parameters }
            } else if entry.slot == running && runs_trial(cmdline, &entry) {
                if entry.tries_left.unwrap_or(0) > 0 && is_whole(&entry, &text) {
                    // Booted with tries left: the boot loader did not count this try
                    // (systemd-boot boots an entry it cannot rename: a firmware FAT
                    // driver that cannot, a write-protected ESP), so no outcome of this
                    // boot would bless or end it, and without counting there is no way
                    // back to try. This boot has the parameters: they are kept now.
                    tracing::error!(entry = %entry.file, "this boot runs a trial of new boot parameters that the boot loader did not count (is the ESP writable by the firmware?): kept without a trial");
                    let (_, written) = self.fold(&[(entry, text)])?;
                    changed.extend(written);
                    ParameterTrial::Kept { parameters }
                } else {
                    ParameterTrial::Running {
                        entry: entry.file,
                        parameters,
                    }
                }
            } else if entry.tries_left.unwrap_or(0) > 0 {
                ParameterTrial::Pending {
                    entry: entry.file,
                    parameters,
                }
            } else {
                let path = dir.join(&entry.file);
                tracing::warn!(entry = %entry.file, parameters = %parameters, "a boot with new boot parameters did not reach configured: they are not kept");
                durable::remove(&path).map_err(Self::io(&path))?;
                changed.push(entry.file.clone());
                ParameterTrial::Failed {
                    entry: entry.file,
                    parameters,
                }
            };
            if rank(&verdict) >= rank(&trial) {
                trial = verdict;
            }
        }
        let kept = self
            .entries()?
            .into_iter()
            .find(|(e, t)| e.slot == running && !e.trial && is_whole(e, t))
            .map(|(_, text)| entry_parameters(&text).options())
            .unwrap_or_default();
        Ok(Settled {
            kept,
            trial,
            entries: changed,
        })
    }

    /// Keeps a blessed parameter trial (one whose boot reached `configured`, so that
    /// `systemd-bless-boot` dropped its counter): see [`Self::fold`]. `None` when there is
    /// no blessed trial. The lock is held by the caller.
    fn fold_blessed_trials(&self) -> Result<Option<(BootParameters, Vec<String>)>, LoaderError> {
        let (mut blessed, broken): (Vec<(EntryInfo, String)>, Vec<_>) = self
            .entries()?
            .into_iter()
            .filter(|(e, _)| e.trial && !e.is_counting())
            .partition(|(e, t)| is_whole(e, t));
        // A blessed trial that is not whole (vfat emptied it after systemd-bless-boot's
        // rename) has no parameters to keep: they would read as none, and wipe the kept
        // ones from every entry. Removed unread; the next boot's settling then finds the
        // staged parameters in no entry and takes them as failed (the safe side: they
        // are not handed over again until settings.boot changes).
        let dir = self.entries_dir();
        for (trial, _) in &broken {
            tracing::error!(entry = %trial.file, "a blessed parameter trial names no kernel, initrd or root hash (damaged by a power cut?): removed, its parameters not kept");
            let path = dir.join(&trial.file);
            durable::remove(&path).map_err(Self::io(&path))?;
        }
        blessed.sort_by_key(|(e, _)| e.sort_version);
        if blessed.is_empty() {
            return Ok(None);
        }
        let (parameters, changed) = self.fold(&blessed)?;
        tracing::info!(parameters = %parameters.options(), entries = ?changed, "new boot parameters reached configured: kept in every loader entry");
        Ok(Some((parameters, changed)))
    }

    /// Keeps the parameters of the last of `trials`: written into every slot entry,
    /// then the trials removed, in that order (a cut between leaves two entries with the
    /// same parameters, and the next fold removes the trial). A trial's slot that has no
    /// whole entry of its own (vfat can leave an entry's name empty after a power cut in
    /// the instant after a rename) gets one first, from the trial's own text without its
    /// mark: the trial is what boots that slot, so it goes only once another entry can.
    /// Answers the parameters and the entries written and removed. The lock is held by
    /// the caller.
    fn fold(
        &self,
        trials: &[(EntryInfo, String)],
    ) -> Result<(BootParameters, Vec<String>), LoaderError> {
        let Some((_, last)) = trials.last() else {
            return Ok((BootParameters::default(), Vec::new()));
        };
        let parameters = entry_parameters(last);
        let mut changed = self.write_parameters(&parameters)?;
        let dir = self.entries_dir();
        let options = parameters.options();
        for (trial, text) in trials {
            let holds = |entries: &[(EntryInfo, String)]| {
                entries.iter().any(|(e, t)| {
                    !e.trial
                        && e.slot == trial.slot
                        && is_whole(e, t)
                        && entry_parameters(t).options() == options
                })
            };
            if !holds(&self.entries()?) {
                if !is_whole(trial, text) {
                    tracing::error!(entry = %trial.file, slot = %trial.slot, "neither the slot nor its parameter trial has a whole loader entry: the trial stays");
                    continue;
                }
                let file = format!("keel-{}.conf", trial.slot);
                tracing::error!(entry = %trial.file, slot = %trial.slot, file = %file, "the slot has no whole loader entry of its own: written again from its parameter trial");
                let repaired = with_parameters(&entry_from_trial(text), &parameters);
                check_length(&file, &repaired)?;
                let path = dir.join(&file);
                durable::replace(&path, repaired.as_bytes()).map_err(Self::io(&path))?;
                changed.push(file);
                if !holds(&self.entries()?) {
                    continue;
                }
            }
            let path = dir.join(&trial.file);
            durable::remove(&path).map_err(Self::io(&path))?;
            changed.push(trial.file.clone());
        }
        Ok((parameters, changed))
    }
}

/// A slot's own entry made from its parameter trial's text: the mark's line gone, the
/// title as the kept entry had it (what [`trial_entry_text`] added, taken away).
fn entry_from_trial(trial: &str) -> String {
    trial
        .lines()
        .filter(|line| {
            line.trim()
                .strip_prefix("options")
                .map(str::trim)
                .is_none_or(|o| !o.starts_with(TRIAL_MARK))
        })
        .map(|line| {
            let trimmed = line.trim();
            match trimmed.strip_suffix(TRIAL_TITLE) {
                Some(title) if entry_field(trimmed, "title").is_some() => format!("{title}\n"),
                _ => format!("{line}\n"),
            }
        })
        .collect()
}

/// The running slot's kept entry.
enum Kept {
    /// Its blessed entry's text, with the counting copies of it (same version) to remove.
    Blessed { text: String, copies: Vec<String> },
    /// The counting entry it has instead (an update's first boot, not blessed yet).
    Counting(String),
}

/// The running slot's kept entry among `entries` (the slots' and the trials').
fn kept_entry(entries: &[(EntryInfo, String)], running: Slot) -> Result<Kept, LoaderError> {
    let own = || {
        entries
            .iter()
            .filter(|(e, t)| e.slot == running && !e.trial && is_whole(e, t))
    };
    if let Some((entry, text)) = own().find(|(e, _)| !e.is_counting()) {
        let copies = own()
            .filter(|(e, _)| e.is_counting() && e.sort_version == entry.sort_version)
            .map(|(e, _)| e.file.clone())
            .collect();
        return Ok(Kept::Blessed {
            text: text.clone(),
            copies,
        });
    }
    match own().next() {
        Some((entry, _)) => Ok(Kept::Counting(entry.file.clone())),
        None => Err(LoaderError::NoRunningEntry { slot: running }),
    }
}

fn deferred(reason: String) -> Settled {
    Settled {
        kept: String::new(),
        trial: ParameterTrial::Deferred { reason },
        entries: Vec::new(),
    }
}

/// Whether the boot with `cmdline` was started by the trial `entry` (its mark names the
/// entry's version).
fn runs_trial(cmdline: &str, entry: &EntryInfo) -> bool {
    let Some(version) = entry.sort_version else {
        return false;
    };
    trial_marks(cmdline).any(|v| v == version)
}

/// The versions the trial marks on `cmdline` name.
fn trial_marks(cmdline: &str) -> impl Iterator<Item = u64> + '_ {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(TRIAL_MARK)?.strip_prefix('='))
        .filter_map(|v| v.parse::<u64>().ok())
}

/// The version that sorts a new entry before every one of `entries` (and, with
/// `cmdline`, above the trial this boot runs, so no later trial takes its version).
fn next_version(
    entries: &[(EntryInfo, String)],
    cmdline: Option<&str>,
) -> Result<u64, LoaderError> {
    let highest = entries
        .iter()
        .filter_map(|(e, _)| e.sort_version)
        .chain(cmdline.into_iter().flat_map(trial_marks))
        .max()
        .unwrap_or(0);
    highest
        .checked_add(1)
        .ok_or(LoaderError::VersionExhausted { version: highest })
}

/// A parameter trial's entry: the kept entry's text with `parameters`, `version`
/// (sorted first), a title that says so and [`TRIAL_MARK`] after Keel's options.
fn trial_entry_text(kept: &str, parameters: &BootParameters, version: u64) -> String {
    let mut marked = false;
    let text: String = parameter_lines(kept)
        .filter(|(_, p)| !p)
        .map(|(line, _)| {
            let trimmed = line.trim();
            if entry_field(trimmed, "version").is_some() {
                format!("version {version}\n")
            } else if entry_field(trimmed, "title").is_some() {
                format!("{trimmed}{TRIAL_TITLE}\n")
            } else if !marked && entry_field(trimmed, "options").is_some() {
                marked = true;
                format!("{trimmed}\noptions {TRIAL_MARK}={version}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    with_parameters(&text, parameters)
}

fn check_length(file: &str, text: &str) -> Result<(), LoaderError> {
    let bytes = command_line(text).len();
    if bytes > MAX_COMMAND_LINE {
        return Err(LoaderError::CommandLineTooLong {
            file: file.to_owned(),
            bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> (tempfile::TempDir, EspLayout) {
        let dir = tempfile::tempdir().expect("tempdir");
        let esp = EspLayout {
            esp: dir.path().to_owned(),
        };
        std::fs::create_dir_all(esp.entries_dir()).expect("mkdir");
        (dir, esp)
    }

    fn boot_files(esp: &EspLayout, slot: Slot) {
        std::fs::create_dir_all(esp.slot_dir(slot)).expect("mkdir");
        for f in [KERNEL, INITRD] {
            std::fs::write(esp.slot_dir(slot).join(f), b"x").expect("write");
        }
    }

    #[test]
    fn entry_names_carry_the_boot_counter() {
        assert_eq!(parse_entry_name("keel-a.conf"), Some((Slot::A, None, None)));
        assert_eq!(
            parse_entry_name("keel-b+3.conf"),
            Some((Slot::B, Some(3), None))
        );
        assert_eq!(
            parse_entry_name("keel-b+0-3.conf"),
            Some((Slot::B, Some(0), Some(3)))
        );
        for other in [
            "debian.conf",
            "keel-c.conf",
            "keel-b+x.conf",
            "keel-b.conf.tmp",
        ] {
            assert_eq!(parse_entry_name(other), None, "{other}");
        }
    }

    #[test]
    fn a_parameter_trial_has_a_name_of_its_own_and_is_no_slot_entry() {
        assert_eq!(parse_entry_name("keel-a-trial+1.conf"), None);
        assert_eq!(
            parse_trial_name("keel-a-trial+0-1.conf"),
            Some((Slot::A, Some(0), Some(1)))
        );
        assert_eq!(
            parse_trial_name("keel-b-trial.conf"),
            Some((Slot::B, None, None))
        );
        assert_eq!(parse_trial_name("keel-a.conf"), None);
        let (_dir, esp) = esp();
        let kept = "title Keel 1.0.0 (slot a)\nsort-key keel\nversion 4\nlinux /keel/a/vmlinuz\n\
                    initrd /keel/a/initrd.img\noptions keel.slot=a keel.roothash=aa console=ttyS0\n";
        std::fs::write(esp.entries_dir().join("keel-a.conf"), kept).expect("write");
        let nosmt = BootParameters {
            kernel: "nosmt".to_owned(),
            init: String::new(),
        };
        let settled = esp.stage_parameters(&nosmt, Slot::A, "").expect("staged");
        assert_eq!(settled.entries, ["keel-a-trial+1.conf"]);
        let entries = esp.entries().expect("entries");
        let (trial, text) = &entries[0];
        assert!(trial.trial && trial.slot == Slot::A && trial.tries_left == Some(1));
        assert_eq!(trial.sort_version, Some(5), "sorted first");
        assert!(text.contains("title Keel 1.0.0 (slot a), new boot parameters on trial\n"));
        assert_eq!(entry_parameters(text), nosmt);
        // Nothing carries the mark or the trial's parameters into another entry.
        assert_eq!(extra_options(text), "console=ttyS0");
        let (extra, carried) = esp.carried(Slot::A, "").expect("carried");
        assert_eq!(
            (extra.as_str(), carried),
            ("console=ttyS0", BootParameters::default())
        );
        // A rewrite of the slots' entries leaves the trial alone.
        assert_eq!(
            esp.set_parameters(&BootParameters::default()).expect("set"),
            Vec::<String>::new()
        );
        assert_eq!(
            std::fs::read_to_string(esp.entries_dir().join("keel-a.conf")).expect("read"),
            kept
        );
    }

    #[test]
    fn activation_writes_a_counted_entry_sorted_first_with_the_carried_options() {
        let (_dir, esp) = esp();
        std::fs::write(
            esp.entries_dir().join("keel-a.conf"),
            "title Keel 1.0.0\nsort-key keel\nversion 1\nlinux /keel/a/vmlinuz\n\
             initrd /keel/a/initrd.img\noptions keel.slot=a keel.roothash=aa \
             keel.root=PARTLABEL=keel-root-a keel.verity=PARTLABEL=keel-verity-a console=ttyS0\n",
        )
        .expect("write");
        boot_files(&esp, Slot::B);
        let (extra, parameters) = esp.carried(Slot::A, "").expect("options");
        assert_eq!(extra, "console=ttyS0");
        assert_eq!(parameters, BootParameters::default());
        let file = esp
            .activate(
                NewEntry {
                    slot: Slot::B,
                    os_version: "1.1.0",
                    root_hash: "bb",
                    sort_version: 0,
                    extra_options: "",
                    parameters: &BootParameters::default(),
                },
                Some((Slot::A, "")),
                3,
            )
            .expect("activate");
        assert_eq!(file, "keel-b+3.conf");
        let text = std::fs::read_to_string(esp.entries_dir().join(&file)).expect("read");
        assert!(text.contains("\nversion 2\n"), "{text}");
        assert!(text.contains("\nsort-key keel\n"), "{text}");
        assert!(
            text.contains("linux /keel/b/vmlinuz\ninitrd /keel/b/initrd.img\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "options keel.slot=b keel.roothash=bb keel.root=PARTLABEL=keel-root-b \
                 keel.verity=PARTLABEL=keel-verity-b console=ttyS0\n"
            ),
            "{text}"
        );
        let entries = esp.entries().expect("entries");
        let b = &entries
            .iter()
            .find(|(e, _)| e.slot == Slot::B)
            .expect("b")
            .0;
        assert_eq!(b.tries_left, Some(3));
        assert_eq!(b.os_version.as_deref(), Some("1.1.0"));
        assert_eq!(b.root_hash.as_deref(), Some("bb"));
        // Deactivation (invalidate) removes it, and only it.
        assert_eq!(esp.invalidate(Slot::B).expect("invalidate"), vec![file]);
        assert_eq!(esp.entries().expect("entries").len(), 1);
    }

    #[test]
    fn activation_needs_the_slots_kernel_and_initrd() {
        let (_dir, esp) = esp();
        let entry = NewEntry {
            slot: Slot::B,
            os_version: "1.1.0",
            root_hash: "bb",
            sort_version: 0,
            extra_options: "",
            parameters: &BootParameters::default(),
        };
        assert!(matches!(
            esp.activate(entry, None, 3),
            Err(LoaderError::MissingBootFile { file: KERNEL, .. })
        ));
        assert!(esp.entries().expect("entries").is_empty());
    }

    #[test]
    fn a_running_slot_still_counting_tries_blocks_writing_the_other() {
        let (_dir, esp) = esp();
        std::fs::write(esp.entries_dir().join("keel-b+2-1.conf"), "version 2\n").expect("w");
        assert!(matches!(
            esp.check_running_blessed(Slot::B),
            Err(LoaderError::RunningNotBlessed { slot: Slot::B, .. })
        ));
        std::fs::rename(
            esp.entries_dir().join("keel-b+2-1.conf"),
            esp.entries_dir().join("keel-b.conf"),
        )
        .expect("bless");
        esp.check_running_blessed(Slot::B).expect("blessed");
    }

    #[test]
    fn options_come_from_the_command_line_without_an_entry() {
        let (_dir, esp) = esp();
        let (extra, parameters) = esp
            .carried(
                Slot::A,
                "initrd=\\keel\\a\\initrd.img keel.slot=a console=ttyS0,115200 quiet -- splash",
            )
            .expect("options");
        assert_eq!(extra, "console=ttyS0,115200 quiet");
        assert_eq!(parameters, BootParameters::default());
    }

    const IMAGE_ENTRY: &str =
        "# keel-os-version 1.0.0\ntitle Keel 1.0.0\nsort-key keel\nversion 1\n\
        linux /keel/a/vmlinuz\ninitrd /keel/a/initrd.img\noptions keel.slot=a keel.roothash=aa \
        console=ttyS0 quiet\n";

    fn parameters(kernel: &str, init: &str) -> BootParameters {
        BootParameters {
            kernel: kernel.to_owned(),
            init: init.to_owned(),
        }
    }

    #[test]
    fn parameters_go_on_their_own_options_line_and_come_back_apart_from_the_images() {
        let set = parameters("console=tty0,ttyS1 nosmt", "systemd.log_level=debug splash");
        let text = with_parameters(IMAGE_ENTRY, &set);
        assert!(text.starts_with(IMAGE_ENTRY), "{text}");
        assert!(
            text.ends_with(&format!(
                "{PARAMETERS_MARK}\noptions console=tty0,ttyS1 nosmt -- systemd.log_level=debug splash\n"
            )),
            "{text}"
        );
        assert_eq!(entry_parameters(&text), set);
        assert_eq!(extra_options(&text), "console=ttyS0 quiet");
        assert_eq!(
            command_line(&text),
            "initrd=\\keel\\a\\initrd.img keel.slot=a keel.roothash=aa console=ttyS0 quiet \
             console=tty0,ttyS1 nosmt -- systemd.log_level=debug splash"
        );
        // Replaced, not added to; removed when empty; kernel or init alone.
        let other = parameters("", "splash");
        assert_eq!(entry_parameters(&with_parameters(&text, &other)), other);
        assert_eq!(
            with_parameters(&text, &other)
                .matches(PARAMETERS_MARK)
                .count(),
            1
        );
        assert_eq!(
            with_parameters(&text, &BootParameters::default()),
            IMAGE_ENTRY
        );
        assert_eq!(
            entry_parameters(&with_parameters(IMAGE_ENTRY, &parameters("nosmt", ""))).options(),
            "nosmt"
        );
    }

    #[test]
    fn parameters_reach_every_entry_keep_their_counters_and_move_with_activation() {
        let (_dir, esp) = esp();
        std::fs::write(esp.entries_dir().join("keel-a.conf"), IMAGE_ENTRY).expect("write");
        boot_files(&esp, Slot::B);
        let set = parameters("nosmt", "splash");
        assert_eq!(esp.set_parameters(&set).expect("set"), vec!["keel-a.conf"]);
        // Unchanged: nothing rewritten.
        assert!(esp.set_parameters(&set).expect("set").is_empty());
        // Activation carries them into the new slot's entry.
        let (extra, carried) = esp.carried(Slot::A, "").expect("carried");
        assert_eq!(carried, set);
        let entry = NewEntry {
            slot: Slot::B,
            os_version: "1.1.0",
            root_hash: "bb",
            sort_version: 0,
            extra_options: &extra,
            parameters: &carried,
        };
        let file = esp.activate(entry, None, 3).expect("activate");
        let b = std::fs::read_to_string(esp.entries_dir().join(&file)).expect("read");
        assert_eq!(entry_parameters(&b), set);
        assert_eq!(extra_options(&b), "console=ttyS0 quiet");
        // A change reaches both entries, each under its own name.
        let changed = parameters("mitigations=off", "");
        assert_eq!(
            esp.set_parameters(&changed).expect("set"),
            vec!["keel-a.conf", "keel-b+3.conf"]
        );
        for (entry, text) in esp.entries().expect("entries") {
            assert_eq!(entry_parameters(&text), changed, "{}", entry.file);
        }
    }

    #[test]
    fn a_rewrite_that_raced_systemd_bless_boot_leaves_one_entry_with_the_parameters() {
        let (_dir, esp) = esp();
        let dir = esp.entries_dir();
        std::fs::write(dir.join("keel-a.conf"), IMAGE_ENTRY).expect("write");
        boot_files(&esp, Slot::B);
        let entry = NewEntry {
            slot: Slot::B,
            os_version: "1.1.0",
            root_hash: "bb",
            sort_version: 0,
            extra_options: "console=ttyS0",
            parameters: &BootParameters::default(),
        };
        let trial = esp.activate(entry, None, 3).expect("activate");
        // Booted once (systemd-boot moved the counter), then the race: bless renames the
        // entry between a rewrite's read and its replace, and the replace brings the
        // counting name back with the new parameters beside the blessed, old entry.
        let counting = "keel-b+2-1.conf";
        std::fs::rename(dir.join(&trial), dir.join(counting)).expect("count");
        let old = std::fs::read_to_string(dir.join(counting)).expect("read");
        std::fs::rename(dir.join(counting), dir.join("keel-b.conf")).expect("bless");
        let set = parameters("nosmt", "");
        std::fs::write(dir.join(counting), with_parameters(&old, &set)).expect("replace");
        // The copy does not hold up a prepare: its version was blessed.
        esp.check_running_blessed(Slot::B)
            .expect("blessed with a copy");
        let mut written = esp.set_parameters(&set).expect("set");
        written.sort();
        assert_eq!(written, vec!["keel-a.conf", "keel-b.conf"]);
        let entries = esp.entries().expect("entries");
        let files: Vec<&str> = entries.iter().map(|(e, _)| e.file.as_str()).collect();
        assert_eq!(files, vec!["keel-a.conf", "keel-b.conf"]);
        for (entry, text) in &entries {
            assert_eq!(entry_parameters(text), set, "{}", entry.file);
        }
        // The running slot's boot is blessed again: a prepare may go ahead.
        esp.check_running_blessed(Slot::B).expect("blessed");
        // A counting entry of another version is not a copy: it stays.
        let other = NewEntry {
            slot: Slot::A,
            os_version: "1.2.0",
            root_hash: "cc",
            sort_version: 0,
            extra_options: "",
            parameters: &set,
        };
        boot_files(&esp, Slot::A);
        let a = esp.activate(other, None, 3).expect("activate a");
        assert!(esp.set_parameters(&set).expect("set").is_empty());
        assert!(dir.join(&a).is_file() && dir.join("keel-b.conf").is_file());
    }

    #[test]
    fn a_command_line_linux_would_cut_is_refused_and_nothing_is_written() {
        let (_dir, esp) = esp();
        std::fs::write(esp.entries_dir().join("keel-a.conf"), IMAGE_ENTRY).expect("write");
        let long = parameters(&vec!["x=0123456789"; 180].join(" "), "");
        assert!(matches!(
            esp.set_parameters(&long),
            Err(LoaderError::CommandLineTooLong { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(esp.entries_dir().join("keel-a.conf")).expect("read"),
            IMAGE_ENTRY
        );
        let fits = parameters(&vec!["x=0123456789"; 150].join(" "), "");
        esp.set_parameters(&fits).expect("fits");
    }

    #[test]
    fn words_that_are_no_parameter_or_keels_own_are_refused() {
        for bad in [
            parameters("keel.slot=b", ""),
            parameters("initrd=/x", ""),
            parameters("--", ""),
            parameters("a \"b", ""),
            parameters("", "-x"),
            parameters("", "keel.roothash=00"),
            parameters("caf\u{e9}", ""),
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        parameters("console=tty0,ttyS1 nosmt", "systemd.unit=rescue.target")
            .check()
            .expect("good");
    }
}
