//! Human-readable texts built from keeld's JSON answers: the `--dry-run` report (from
//! `POST /tx/dry-run`), the failed-apply message (from a `GET /apply/log` record) and the
//! settings an apply stored with no effect on the host (its `no-effect` list).
//! Pure functions of the JSON, lenient about missing fields: the server is the source of
//! truth and may grow new ones.

use serde_json::{Map, Value};

use super::color::Palette;

/// The `--dry-run` report for a `POST /tx/dry-run` answer: one line per changed setting
/// (`~ key: old → new`, `+ key: new`, `- key: old`, values as compact JSON), then each
/// file's unified diff under a `=== file <name> (<path>)` line, then a summary line. Says
/// `Nothing would change.` when nothing would.
pub fn dry_run_text(answer: &Value) -> String {
    dry_run_report(answer, Palette::plain())
}

/// [`dry_run_text`], coloured with `palette`: additions green, removals red, changes
/// yellow, hunk headers cyan, file and diff headers bold.
pub fn dry_run_report(answer: &Value, palette: Palette) -> String {
    let empty = Map::new();
    let settings = answer
        .get("settings")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let files: &[Value] = answer
        .get("files")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let services: Vec<&str> = match answer.get("services") {
        Some(Value::Object(map)) => map.keys().map(String::as_str).collect(),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let changed_keys = answer
        .get("changed-keys")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let setting_count = settings.len().max(changed_keys);

    if setting_count == 0 && files.is_empty() {
        return "Nothing would change.\n".to_owned();
    }

    let mut text = String::new();
    for (key, change) in settings {
        let line = setting_line(key, change);
        let line = match (change.get("old"), change.get("new")) {
            (None, Some(_)) => palette.added(&line),
            (Some(_), None) => palette.removed(&line),
            _ => palette.changed(&line),
        };
        text.push_str(&line);
        text.push('\n');
    }
    for line in no_effect_lines(answer) {
        text.push_str(&palette.dim(&line));
        text.push('\n');
    }
    for file in files {
        if !text.is_empty() {
            text.push('\n');
        }
        let field = |name: &str| file.get(name).and_then(Value::as_str).unwrap_or("?");
        let heading = format!("=== file {} ({})", field("name"), field("path"));
        text.push_str(&palette.heading(&heading));
        text.push('\n');
        let diff = file.get("diff").and_then(Value::as_str).unwrap_or("");
        text.push_str(&paint_diff(diff, palette));
    }
    if !text.is_empty() {
        text.push('\n');
    }
    let services = if services.is_empty() {
        "none".to_owned()
    } else {
        services.join(", ")
    };
    text.push_str(&format!(
        "{}, {} would change; services affected: {services}\n",
        plural(setting_count, "setting"),
        plural(files.len(), "file"),
    ));
    text
}

/// A unified diff, newline-terminated, each line painted by its role: the `---`/`+++`
/// headers before the first hunk bold, `@@` lines cyan, then `+` green and `-` red.
/// (Inside a hunk, a removed line reading `-- x` is a removal, not a header.)
pub fn paint_diff(diff: &str, palette: Palette) -> String {
    let mut out = String::with_capacity(diff.len());
    let mut in_hunk = false;
    // Not `lines()`: it would also drop a `\r` that belongs to the file's content.
    for line in diff.split_inclusive('\n') {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let painted = if line.starts_with("@@") {
            in_hunk = true;
            palette.hunk(line)
        } else if !in_hunk && (line.starts_with("--- ") || line.starts_with("+++ ")) {
            palette.heading(line)
        } else if line.starts_with('+') {
            palette.added(line)
        } else if line.starts_with('-') {
            palette.removed(line)
        } else {
            line.to_owned()
        };
        out.push_str(&painted);
        out.push('\n');
    }
    out
}

/// One line per setting of an apply record (or a dry-run answer) that is stored with no
/// effect on this host: `= <key>: stored, no effect on this host`. Empty when the answer
/// has no `no-effect` list.
pub fn no_effect_lines(answer: &Value) -> Vec<String> {
    answer
        .get("no-effect")
        .and_then(Value::as_array)
        .map(|keys| {
            keys.iter()
                .filter_map(Value::as_str)
                .map(|key| format!("= {key}: stored, no effect on this host"))
                .collect()
        })
        .unwrap_or_default()
}

/// One settings-diff line; `change` is `{"old": …, "new": …}` with either side absent.
pub fn setting_line(key: &str, change: &Value) -> String {
    match (change.get("old"), change.get("new")) {
        (Some(old), Some(new)) => format!("~ {key}: {old} → {new}"),
        (None, Some(new)) => format!("+ {key}: {new}"),
        (Some(old), None) => format!("- {key}: {old}"),
        (None, None) => format!("~ {key}"),
    }
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The message for a commit whose apply failed: a first line naming the apply, then
/// one indented line per failed file and per failed command, from the apply's record in
/// `GET /apply/log`. `record` is `Err(reason)` when the record could not be had.
pub fn apply_failure_text(id: Option<u64>, record: Result<&Value, &str>) -> String {
    let mut text = match id {
        Some(id) => format!("settings committed, but applying them failed (apply {id}):"),
        None => "settings committed, but applying them failed:".to_owned(),
    };
    let lines = match record {
        Ok(record) => failure_lines(record),
        Err(reason) => vec![format!(
            "details unavailable ({reason}); see `apiclient apply-log`"
        )],
    };
    let lines = if lines.is_empty() {
        vec!["the apply log names no failed file or command; see `apiclient apply-log`".to_owned()]
    } else {
        lines
    };
    for line in lines {
        text.push_str("\n  ");
        text.push_str(&line);
    }
    if let Ok(record) = record {
        let no_effect = no_effect_lines(record);
        if !no_effect.is_empty() {
            text.push_str("\nsettings stored with no effect on this host:");
            for line in no_effect {
                text.push_str("\n  ");
                text.push_str(&line);
            }
        }
    }
    text
}

/// One line per failed file (`file <name> (<path>): <error>`) and per failed command
/// (`service <name>: <argv>: <reason>[: <first stderr line>]`) of an apply record.
pub fn failure_lines(record: &Value) -> Vec<String> {
    let list = |name: &str| -> Vec<Value> {
        record
            .get(name)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let text = |value: &Value, name: &str| -> Option<String> {
        value.get(name).and_then(Value::as_str).map(str::to_owned)
    };
    let mut lines = Vec::new();
    for file in list("files") {
        let failed =
            text(&file, "result").as_deref() == Some("failed") || file.get("error").is_some();
        if !failed {
            continue;
        }
        let error = text(&file, "error").unwrap_or_else(|| "failed".to_owned());
        lines.push(format!(
            "file {} ({}): {error}",
            text(&file, "name").unwrap_or_else(|| "?".to_owned()),
            text(&file, "path").unwrap_or_else(|| "?".to_owned()),
        ));
    }
    for command in list("commands") {
        if command.get("success").and_then(Value::as_bool) != Some(false) {
            continue;
        }
        let argv: Vec<String> = command
            .get("argv")
            .and_then(Value::as_array)
            .map(|argv| argv.iter().map(shell_word).collect())
            .unwrap_or_default();
        let reason = if let Some(error) = text(&command, "error") {
            error
        } else if command.get("timed-out").and_then(Value::as_bool) == Some(true) {
            match command.get("duration-ms").and_then(Value::as_u64) {
                Some(ms) => format!("timed out after {ms} ms"),
                None => "timed out".to_owned(),
            }
        } else {
            match command.get("exit-code").and_then(Value::as_i64) {
                Some(code) => format!("exit code {code}"),
                None => "no exit code (killed by a signal?)".to_owned(),
            }
        };
        let mut line = format!(
            "service {}: {}: {reason}",
            text(&command, "service").unwrap_or_else(|| "?".to_owned()),
            argv.join(" "),
        );
        let stderr = text(&command, "stderr").unwrap_or_default();
        if let Some(first) = stderr.lines().map(str::trim).find(|l| !l.is_empty()) {
            line.push_str(": ");
            line.push_str(first);
        }
        lines.push(line);
    }
    lines
}

/// An argv element as typed in a shell: bare if plain, double-quoted otherwise.
fn shell_word(value: &Value) -> String {
    let word = match value {
        Value::String(word) => word.as_str(),
        other => return other.to_string(),
    };
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("{word:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MOTD_DIFF: &str = "--- a/etc/motd\n+++ b/etc/motd\n@@ -1 +1 @@\n-a\n+b\n";

    #[test]
    fn coloured_reports_paint_each_line_by_its_role() {
        let answer = json!({
            "changed-keys": ["settings.motd", "settings.ntp"],
            "settings": {"settings.motd": {"old": "a", "new": "b"}, "settings.ntp": {"new": 1}},
            "services": ["motd"],
            "files": [{"name": "motd", "path": "/etc/motd",
                       "diff": "--- a/etc/motd\n+++ b/etc/motd\n@@ -1,2 +1 @@\n--- dashes\n-a\r\n+b"}]
        });
        let palette = Palette { on: true };
        let text = dry_run_report(&answer, palette);
        for expected in [
            "\x1b[33m~ settings.motd: \"a\" → \"b\"\x1b[0m\n",
            "\x1b[32m+ settings.ntp: 1\x1b[0m\n",
            "\x1b[1m=== file motd (/etc/motd)\x1b[0m\n",
            "\x1b[1m--- a/etc/motd\x1b[0m\n\x1b[1m+++ b/etc/motd\x1b[0m\n",
            "\x1b[36m@@ -1,2 +1 @@\x1b[0m\n",
            "\x1b[31m--- dashes\x1b[0m\n",
            "\x1b[31m-a\r\x1b[0m\n",
            "\x1b[32m+b\x1b[0m\n",
        ] {
            assert!(text.contains(expected), "{expected:?} in {text:?}");
        }
        // Without colour, the same text as ever, byte for byte.
        let plain = dry_run_report(&answer, Palette::plain());
        assert_eq!(plain, dry_run_text(&answer));
        assert!(!plain.contains('\x1b'));
        assert!(plain.contains("-a\r\n+b\n"), "{plain:?}");
    }

    #[test]
    fn settings_lines_mark_changes_additions_and_removals() {
        assert_eq!(
            setting_line("settings.motd", &json!({"old": "a", "new": "b"})),
            "~ settings.motd: \"a\" → \"b\""
        );
        assert_eq!(
            setting_line("settings.ntp.time-servers", &json!({"new": ["x", "y"]})),
            "+ settings.ntp.time-servers: [\"x\",\"y\"]"
        );
        assert_eq!(
            setting_line("settings.kernel.sysctl.\"vm.x\"", &json!({"old": 5})),
            "- settings.kernel.sysctl.\"vm.x\": 5"
        );
    }

    #[test]
    fn the_report_has_settings_then_diffs_then_a_summary() {
        let answer = json!({
            "tx": "apiclient-set-x",
            "changed-keys": ["settings.motd", "settings.ntp.time-servers", "settings.old"],
            "settings": {
                "settings.motd": {"old": "a", "new": "b"},
                "settings.ntp.time-servers": {"new": ["x"]},
                "settings.old": {"old": true}
            },
            "services": {"motd": ["settings.motd"], "chronyd": ["settings.ntp.time-servers"]},
            "files": [
                {"name": "motd", "path": "/etc/motd", "diff": MOTD_DIFF},
                {"name": "chrony.conf", "path": "/etc/chrony.conf", "diff": "--- a\n+++ b\n@@ -0,0 +1 @@\n+server x"}
            ]
        });
        assert_eq!(
            dry_run_text(&answer),
            "~ settings.motd: \"a\" → \"b\"\n\
             + settings.ntp.time-servers: [\"x\"]\n\
             - settings.old: true\n\
             \n\
             === file motd (/etc/motd)\n\
             --- a/etc/motd\n\
             +++ b/etc/motd\n\
             @@ -1 +1 @@\n\
             -a\n\
             +b\n\
             \n\
             === file chrony.conf (/etc/chrony.conf)\n\
             --- a\n\
             +++ b\n\
             @@ -0,0 +1 @@\n\
             +server x\n\
             \n\
             3 settings, 2 files would change; services affected: motd, chronyd\n"
        );
    }

    #[test]
    fn singular_counts_and_no_services() {
        let answer = json!({
            "changed-keys": ["settings.x"],
            "settings": {"settings.x": {"old": 1, "new": 2}},
            "services": {},
            "files": []
        });
        assert_eq!(
            dry_run_text(&answer),
            "~ settings.x: 1 → 2\n\n1 setting, 0 files would change; services affected: none\n"
        );
    }

    #[test]
    fn an_empty_change_says_so() {
        let answer =
            json!({"tx": "t", "changed-keys": [], "settings": {}, "services": {}, "files": []});
        assert_eq!(dry_run_text(&answer), "Nothing would change.\n");
        assert_eq!(dry_run_text(&json!({})), "Nothing would change.\n");
    }

    #[test]
    fn failed_files_and_commands_get_one_line_each() {
        let record = json!({
            "id": 7,
            "files": [
                {"name": "motd", "path": "/etc/motd", "result": "written"},
                {"name": "chrony.conf", "path": "/etc/chrony.conf", "result": "failed",
                 "error": "permission denied"}
            ],
            "commands": [
                {"service": "motd", "argv": ["true"], "exit-code": 0, "success": true,
                 "timed-out": false, "duration-ms": 1, "stdout": "", "stderr": ""},
                {"service": "chronyd", "argv": ["systemctl", "try-restart", "chronyd.service"],
                 "exit-code": 1, "success": false, "timed-out": false, "duration-ms": 12,
                 "stdout": "", "stderr": "\nJob for chronyd.service failed.\nSee journalctl.\n"},
                {"service": "slow", "argv": ["sh", "-c", "sleep 99"], "exit-code": null,
                 "success": false, "timed-out": true, "duration-ms": 30000, "stdout": "",
                 "stderr": ""},
                {"service": "gone", "argv": ["/nonexistent"], "exit-code": null,
                 "success": false, "timed-out": false, "duration-ms": 0, "stdout": "",
                 "stderr": "", "error": "cannot run /nonexistent: No such file or directory"}
            ],
            "success": false
        });
        assert_eq!(
            apply_failure_text(Some(7), Ok(&record)),
            "settings committed, but applying them failed (apply 7):\n\
             \x20 file chrony.conf (/etc/chrony.conf): permission denied\n\
             \x20 service chronyd: systemctl try-restart chronyd.service: exit code 1: \
             Job for chronyd.service failed.\n\
             \x20 service slow: sh -c \"sleep 99\": timed out after 30000 ms\n\
             \x20 service gone: /nonexistent: cannot run /nonexistent: No such file or directory"
        );
    }

    #[test]
    fn settings_with_no_effect_are_named_in_the_dry_run_and_the_failure() {
        let answer = json!({
            "changed-keys": ["settings.metrics.send-metrics", "settings.motd"],
            "settings": {
                "settings.metrics.send-metrics": {"new": false},
                "settings.motd": {"old": "a", "new": "b"}
            },
            "no-effect": ["settings.metrics.send-metrics"],
            "services": {"metrics": ["settings.metrics.send-metrics"], "motd": ["settings.motd"]},
            "files": []
        });
        assert_eq!(
            dry_run_text(&answer),
            "+ settings.metrics.send-metrics: false\n\
             ~ settings.motd: \"a\" → \"b\"\n\
             = settings.metrics.send-metrics: stored, no effect on this host\n\
             \n\
             2 settings, 0 files would change; services affected: metrics, motd\n"
        );
        let record = json!({
            "files": [{"name": "motd", "path": "/etc/motd", "result": "failed", "error": "disk full"}],
            "commands": [],
            "no-effect": ["settings.updates.seed", "settings.ecs.cluster"],
            "success": false
        });
        assert_eq!(
            apply_failure_text(Some(3), Ok(&record)),
            "settings committed, but applying them failed (apply 3):\n\
             \x20 file motd (/etc/motd): disk full\n\
             settings stored with no effect on this host:\n\
             \x20 = settings.updates.seed: stored, no effect on this host\n\
             \x20 = settings.ecs.cluster: stored, no effect on this host"
        );
        assert!(no_effect_lines(&json!({"success": true})).is_empty());
    }

    #[test]
    fn a_missing_record_still_reports_the_failure() {
        assert_eq!(
            apply_failure_text(None, Err("connection refused")),
            "settings committed, but applying them failed:\n\
             \x20 details unavailable (connection refused); see `apiclient apply-log`"
        );
        assert_eq!(
            apply_failure_text(Some(1), Ok(&json!({"success": false}))),
            "settings committed, but applying them failed (apply 1):\n\
             \x20 the apply log names no failed file or command; see `apiclient apply-log`"
        );
    }
}
