//! The apply journal: the apply log and the apply in progress, kept in keeld's runtime
//! directory so that both survive a keeld restart within one boot.
//!
//! A commit is durable before its apply starts, so a keeld killed between the two would
//! leave the render root behind the live settings with no trace. Each apply appends a
//! `started` record before it writes anything and a `finished` record (its report, and
//! whether a reboot is required) once it is done, one JSON object per line, to
//! `apply-journal.jsonl`. At start, [`Applier::load_journal`] reads the records back: the
//! last [`super::LOG_SIZE`] reports are the apply log again, and a `started` record with no
//! `finished` after it is the apply that was in progress; [`Applier::recover`] renders
//! every file against the live settings and re-applies the services whose files differ
//! from what is on disk, plus those of the apply in progress (its restart commands may
//! not have run). The load takes the applies' turn before the API serves, and the
//! recovery keeps it until its own `started` record is written: an apply a client asks
//! for meanwhile waits, so the record of the apply cut short cannot be buried under
//! records of others before one that covers it exists.
//!
//! An apply costs two appended lines, whatever the length of the log: the journal is
//! written again whole (a temp file renamed into place) only when it has grown past
//! [`COMPACT_AFTER`] records, or after a failed append. The file lives on the runtime
//! tmpfs and is never fsync'd: a write is a copy into memory, which is why it is done on
//! the apply's own task rather than handed to a blocking thread. A keeld killed in the
//! middle of an append leaves a torn last line, which the next start skips (with a
//! warning) like any line that does not parse; a power loss starts a new boot, whose full
//! render makes the journal moot. Mode 0600: the reports hold the output of restart
//! commands.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{Applier, ApplyReport, LOG_SIZE};
use crate::store::Store;

const JOURNAL: &str = "apply-journal.jsonl";
/// Records after which the journal is written again with only the kept reports.
pub(super) const COMPACT_AFTER: usize = 4 * LOG_SIZE;

/// An apply that has started and not yet been recorded in the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct InFlight {
    pub id: u64,
    /// The live generation when it started.
    pub generation: u64,
    pub keys: Vec<String>,
    pub services: BTreeMap<String, Vec<String>>,
}

/// One line of the journal, as read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Record {
    Started(InFlight),
    Finished {
        report: ApplyReport,
        reboot_required: bool,
    },
}

/// One line of the journal, as written (borrowing what it records).
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
enum RecordRef<'a> {
    Started(&'a InFlight),
    Finished {
        report: &'a ApplyReport,
        reboot_required: bool,
    },
}

/// The open journal.
#[derive(Debug, Default)]
pub(super) struct JournalFile {
    /// Open for appending; `None` until the first write (or after a failed one).
    file: Option<File>,
    /// Records in the file.
    records: usize,
    /// An append failed: the file may end in a torn line, so it is written again whole
    /// before the next record.
    damaged: bool,
}

/// What [`Applier::load_journal`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// A journal existed: keeld ran in this boot before, and the render root holds
    /// what it rendered then.
    pub existed: bool,
    pub in_flight: Option<InFlight>,
    /// The applies' turn, taken when the journal existed, before the API serves: no
    /// apply asked for by a client can journal itself before the recovery does, so the
    /// apply cut short stays the last `started` record until one that covers it is
    /// written (were keeld to die again before that, the next start still finds it).
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// What the records of a journal say.
#[derive(Debug, Default)]
struct Replay {
    records: usize,
    reports: VecDeque<ApplyReport>,
    reboot_required: bool,
    /// The last record, if it is a `started` one. Applies run one at a time, so only the
    /// newest can have been cut short; and the first apply after a restart is the
    /// recovery (it holds the applies' turn from the load on: [`Loaded`]), which takes
    /// over the services of the one cut short, so a `started` record followed by any
    /// other record has been dealt with.
    in_flight: Option<InFlight>,
    /// The highest apply id seen.
    last_id: u64,
    /// A line did not parse, or the last one has no newline: appending to this file
    /// could glue a new record to a torn one, so it is written again whole first.
    damaged: bool,
}

/// Reads the records of `text`, skipping (with a warning naming the line) any that does
/// not parse: a torn last line from a keeld killed while appending, or damage.
fn replay(text: &str, path: &Path) -> Replay {
    let mut replay = Replay {
        damaged: !text.is_empty() && !text.ends_with('\n'),
        ..Replay::default()
    };
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(Record::Started(in_flight)) => {
                replay.last_id = replay.last_id.max(in_flight.id);
                replay.in_flight = Some(in_flight);
            }
            Ok(Record::Finished {
                report,
                reboot_required,
            }) => {
                replay.last_id = replay.last_id.max(report.id);
                replay.in_flight = None;
                replay.reboot_required = reboot_required;
                if replay.reports.len() == LOG_SIZE {
                    replay.reports.pop_front();
                }
                replay.reports.push_back(report);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), line = number + 1, error = %e,
                    "an apply journal record does not parse (a keeld killed while writing it leaves one torn); skipped");
                replay.damaged = true;
                continue;
            }
        }
        replay.records += 1;
    }
    replay
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// One record as a line.
fn line(record: &RecordRef<'_>) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    Ok(line)
}

impl Applier {
    /// Loads the journal: the log (and `reboot-required`) of earlier applies in this
    /// boot, the next apply id, and an apply that was in progress.
    pub fn load_journal(&self) -> Loaded {
        let Some(dir) = &self.inner.config.journal_dir else {
            return Loaded::default();
        };
        let path = dir.join(JOURNAL);
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the apply journal");
                return Loaded::default();
            }
        };
        let replay = replay(&text, &path);
        self.inner
            .reboot_required
            .store(replay.reboot_required, Ordering::Relaxed);
        if let Ok(mut memory) = self.inner.log.lock() {
            *memory = replay.reports;
        }
        self.inner
            .next_id
            .fetch_max(replay.last_id.saturating_add(1), Ordering::Relaxed);
        if let Ok(mut journal) = self.inner.journal.lock() {
            journal.records = replay.records;
            journal.damaged = replay.damaged;
        }
        let existed = replay.records > 0;
        Loaded {
            existed,
            in_flight: replay.in_flight,
            // Nothing else runs yet: the turn is free.
            turn: existed
                .then(|| self.inner.serial.clone().try_lock_owned().ok())
                .flatten(),
        }
    }

    /// Records `in_flight` before anything is written.
    pub(super) fn journal(&self, in_flight: &InFlight) {
        self.append(&RecordRef::Started(in_flight));
    }

    /// Records the finished apply `report` (already at the end of the in-memory log).
    pub(super) fn journal_done(&self, report: &ApplyReport) {
        self.append(&RecordRef::Finished {
            report,
            reboot_required: self.inner.reboot_required.load(Ordering::Relaxed),
        });
    }

    /// Appends `record` (see the module documentation for why a plain append is safe),
    /// writing the journal again whole first when it has grown long or is damaged.
    fn append(&self, record: &RecordRef<'_>) {
        let Some(dir) = &self.inner.config.journal_dir else {
            return;
        };
        let path = dir.join(JOURNAL);
        let Ok(mut journal) = self.inner.journal.lock() else {
            return;
        };
        let result = (|| {
            let line = line(record)?;
            if journal.damaged || journal.records >= COMPACT_AFTER {
                self.rewrite(dir, &path, &mut journal)?;
                if matches!(record, RecordRef::Finished { .. }) {
                    // Its report is at the end of the in-memory log, so the rewrite
                    // wrote it already.
                    return Ok(());
                }
            }
            if journal.file.is_none() {
                std::fs::create_dir_all(dir)?;
                journal.file = Some(open_append(&path)?);
            }
            let file = journal
                .file
                .as_mut()
                .ok_or_else(|| std::io::Error::other("the journal is not open"))?;
            // One write of the whole line: O_APPEND puts it at the end.
            file.write_all(&line)?;
            journal.records += 1;
            Ok::<(), std::io::Error>(())
        })();
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot journal the apply");
            journal.file = None;
            journal.damaged = true;
        }
    }

    /// Writes the journal again with only the kept reports (a temp file renamed into
    /// place: a crash leaves the old journal or the new one), and reopens it.
    fn rewrite(&self, dir: &Path, path: &Path, journal: &mut JournalFile) -> std::io::Result<()> {
        let reboot_required = self.inner.reboot_required.load(Ordering::Relaxed);
        let mut bytes = Vec::new();
        let mut records = 0;
        if let Ok(log) = self.inner.log.lock() {
            for report in log.iter() {
                bytes.extend(line(&RecordRef::Finished {
                    report,
                    reboot_required,
                })?);
                records += 1;
            }
        }
        std::fs::create_dir_all(dir)?;
        let temp = dir.join(format!(".{JOURNAL}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)?;
        file.write_all(&bytes)?;
        drop(file);
        std::fs::rename(&temp, path)?;
        *journal = JournalFile {
            file: Some(open_append(path)?),
            records,
            damaged: false,
        };
        Ok(())
    }

    /// Brings the render root in line with the live settings after keeld restarted
    /// within a boot (`loaded` from [`Applier::load_journal`]): every file is rendered,
    /// and the services whose files differ from what is on disk, or that an apply in
    /// progress had not finished, are applied again (files written, restart commands
    /// run). Nothing to do on the first start of a boot: the boot renders everything.
    pub async fn recover(&self, store: &Store, loaded: Loaded) -> Option<ApplyReport> {
        if !loaded.existed {
            return None;
        }
        let turn = loaded.turn;
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut keys = BTreeSet::new();
        if let Some(in_flight) = loaded.in_flight {
            tracing::warn!(
                id = in_flight.id,
                generation = in_flight.generation,
                "an apply was interrupted by a keeld restart; applying again"
            );
            keys.extend(in_flight.keys);
            for (service, service_keys) in in_flight.services {
                services.entry(service).or_default().extend(service_keys);
            }
        }
        let this = self.clone();
        let settings = store.snapshot();
        let all = vec!["settings".to_owned()];
        let differing =
            tokio::task::spawn_blocking(move || this.plan(settings.live_settings(), &all)).await;
        let stale_files: Option<BTreeSet<String>> = match differing {
            Ok(Ok(diffs)) => Some(
                diffs
                    .into_iter()
                    .map(|d| d.name.split('[').next().unwrap_or_default().to_owned())
                    .collect(),
            ),
            // Cannot tell which files differ: apply every service.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot render the live settings to compare; applying every service");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "comparing the render root stopped; applying every service");
                None
            }
        };
        for (name, def) in &self.inner.meta.services {
            let stale = match &stale_files {
                Some(files) => def.configuration_files.iter().any(|f| files.contains(f)),
                None => true,
            };
            if stale {
                let prefixes = self
                    .inner
                    .meta
                    .affected_services
                    .iter()
                    .filter(|(_, affected)| affected.contains(name))
                    .map(|(prefix, _)| prefix.clone());
                let entry = services.entry(name.clone()).or_default();
                entry.extend(prefixes.clone());
                keys.extend(prefixes);
            }
        }
        if services.is_empty() {
            return None;
        }
        for service_keys in services.values_mut() {
            service_keys.sort();
            service_keys.dedup();
        }
        tracing::info!(services = ?services.keys().collect::<Vec<_>>(), "the render root is behind the live settings; applying");
        let turn = match turn {
            Some(turn) => turn,
            None => self.inner.serial.clone().lock_owned().await,
        };
        Some(
            self.apply_services_in_turn(turn, store, keys.into_iter().collect(), services)
                .await,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::apply::render::Templates;
    use crate::apply::{ApplyConfig, ServicesMeta};

    fn applier(journal: &Path) -> Applier {
        let meta = ServicesMeta::parse(
            Path::new("x"),
            "[services.motd]\nrestart-commands = []\nconfiguration-files = []\n",
        )
        .unwrap();
        let templates = Templates::from_sources(Vec::<(String, String)>::new()).unwrap();
        let config = ApplyConfig {
            render_root: journal.join("root"),
            restart_timeout: Duration::from_secs(1),
            journal_dir: Some(journal.to_owned()),
            events: Default::default(),
            boot_loader: None,
        };
        Applier::new(meta, templates, config, json!({}))
    }

    /// One apply as `apply_services` journals it; `finish: false` stops after `started`.
    fn apply(a: &Applier, finish: bool, reboot: bool) -> u64 {
        let id = a.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight {
            id,
            generation: id * 10,
            keys: vec!["settings.motd".to_owned()],
            services: BTreeMap::from([("motd".to_owned(), vec!["settings.motd".to_owned()])]),
        };
        a.journal(&in_flight);
        if finish {
            let mut report = ApplyReport::failed(format!("apply {id}"));
            report.id = id;
            report.success = true;
            if reboot {
                a.inner.reboot_required.store(true, Ordering::Relaxed);
            }
            {
                let mut log = a.inner.log.lock().unwrap();
                if log.len() == LOG_SIZE {
                    log.pop_front();
                }
                log.push_back(report.clone());
            }
            a.journal_done(&report);
        }
        id
    }

    fn log_ids(a: &Applier) -> Vec<u64> {
        a.inner.log.lock().unwrap().iter().map(|r| r.id).collect()
    }

    fn records_in_file(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join(JOURNAL))
            .unwrap()
            .lines()
            .count()
    }

    #[test]
    fn a_restart_finds_the_log_the_reboot_flag_and_the_apply_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let first = applier(dir.path());
        assert!(!first.load_journal().existed, "no journal yet");
        apply(&first, true, false);
        apply(&first, true, true);
        let cut = apply(&first, false, false);
        drop(first);

        let second = applier(dir.path());
        let loaded = second.load_journal();
        assert!(loaded.existed);
        assert!(
            second.inner.serial.try_lock().is_err(),
            "no client's apply can journal itself before the recovery"
        );
        assert_eq!(
            loaded.in_flight.as_ref().map(|f| (f.id, f.generation)),
            Some((cut, cut * 10))
        );
        drop(loaded);
        assert!(second.inner.serial.try_lock().is_ok());
        assert_eq!(log_ids(&second), vec![1, 2]);
        assert!(second.inner.reboot_required.load(Ordering::Relaxed));
        assert_eq!(second.inner.next_id.load(Ordering::Relaxed), cut + 1);
        // The recovery applies its services again under a new id; once it is journaled,
        // the apply cut short is dealt with.
        apply(&second, true, false);
        let third = applier(dir.path());
        let loaded = third.load_journal();
        assert!(loaded.in_flight.is_none());
        assert_eq!(log_ids(&third), vec![1, 2, cut + 1]);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        apply(&a, true, false);
        apply(&a, true, false);
        drop(a);
        // keeld killed half way through the `started` record of apply 3.
        let mut file = open_append(&dir.path().join(JOURNAL)).unwrap();
        file.write_all(br#"{"started":{"id":3,"generation":30,"ke"#)
            .unwrap();
        drop(file);
        let b = applier(dir.path());
        let loaded = b.load_journal();
        assert!(loaded.existed);
        assert!(loaded.in_flight.is_none(), "a torn record is no record");
        assert_eq!(log_ids(&b), vec![1, 2]);
        // The next record is not glued to the torn line: the journal is written again
        // whole before anything is appended to it.
        assert!(b.inner.journal.lock().unwrap().damaged);
        apply(&b, true, false);
        let c = applier(dir.path());
        c.load_journal();
        assert_eq!(log_ids(&c), vec![1, 2, 3]);
    }

    #[test]
    fn the_journal_is_compacted_so_an_apply_costs_the_same_however_many_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        let total = COMPACT_AFTER * 2 + 7;
        for _ in 0..total {
            apply(&a, true, false);
            // Two records per apply, never many more than COMPACT_AFTER in the file.
            assert!(records_in_file(dir.path()) <= COMPACT_AFTER + 2);
        }
        let b = applier(dir.path());
        b.load_journal();
        let ids = log_ids(&b);
        assert_eq!(ids.len(), LOG_SIZE);
        assert_eq!(ids.last(), Some(&(total as u64)));
        assert_eq!(ids.first(), Some(&((total - LOG_SIZE + 1) as u64)));
    }

    #[test]
    fn an_append_that_failed_is_repaired_by_writing_the_journal_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        apply(&a, true, false);
        // The journal cannot be written: its name is taken by a directory.
        std::fs::remove_file(dir.path().join(JOURNAL)).unwrap();
        a.inner.journal.lock().unwrap().file = None;
        std::fs::create_dir(dir.path().join(JOURNAL)).unwrap();
        apply(&a, true, false);
        assert!(a.inner.journal.lock().unwrap().damaged);
        std::fs::remove_dir(dir.path().join(JOURNAL)).unwrap();
        apply(&a, true, false);
        assert!(!a.inner.journal.lock().unwrap().damaged);
        let b = applier(dir.path());
        b.load_journal();
        assert_eq!(
            log_ids(&b),
            vec![1, 2, 3],
            "the rewrite holds what the failed append lost"
        );
    }

    /// A rewrite made on the way to a `finished` record already holds that report: it is
    /// not written a second time.
    #[test]
    fn a_rewrite_before_a_finished_record_does_not_write_it_twice() {
        let dir = tempfile::tempdir().unwrap();
        let a = applier(dir.path());
        apply(&a, true, false);
        let cut = apply(&a, false, false);
        a.inner.journal.lock().unwrap().damaged = true;
        let mut report = ApplyReport::failed(format!("apply {cut}"));
        report.id = cut;
        a.inner.log.lock().unwrap().push_back(report.clone());
        a.journal_done(&report);
        let b = applier(dir.path());
        let loaded = b.load_journal();
        assert!(loaded.in_flight.is_none());
        assert_eq!(log_ids(&b), vec![1, cut]);
        assert_eq!(records_in_file(dir.path()), 2);
    }
}
