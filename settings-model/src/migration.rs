//! Settings migrations between image versions: data, not code.
//!
//! Owns the vocabulary and its semantics. An image ships its migrations as a list of
//! steps (`packaging/migrations.toml`), each from one settings format to the next, with
//! the operations that carry settings up and the ones that carry them back down. Because
//! they are data, an older keeld can run the down operations a newer keeld wrote for it
//! (keeld records every step it knows in the state directory): after a rollback, the
//! older image reads the settings the newer one left, in the shape it knows.
//!
//! Every operation is idempotent (applying it twice equals applying it once), and so is a
//! step: a migration cut short by a crash is simply run again. Operations:
//! - `rename {from, to}`: moves a value (and the subtree below it); nothing if `from` is
//!   absent; `to` is replaced;
//! - `remove {key}`: removes a value; nothing if absent;
//! - `set-default {key, value}`: sets a value where there is none;
//! - `map-values {key, values = [[old, new], …]}`: replaces a value equal to an `old` by
//!   its `new`.
//!
//! Must not do I/O: `agent/src/store/migrate.rs` reads and records, and commits.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::KeyPath;

/// One operation on the settings (key paths with the `settings.` prefix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MigrationOp {
    Rename {
        from: String,
        to: String,
    },
    Remove {
        key: String,
    },
    SetDefault {
        key: String,
        value: Value,
    },
    MapValues {
        key: String,
        values: Vec<(Value, Value)>,
    },
}

/// One step between two consecutive settings formats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationStep {
    pub from: u32,
    pub to: u32,
    #[serde(default)]
    pub up: Vec<MigrationOp>,
    #[serde(default)]
    pub down: Vec<MigrationOp>,
}

/// The steps of an image (or recorded by keelds): the format the settings have when
/// every step is applied is [`Migrations::format`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migrations {
    #[serde(default, rename = "step")]
    pub steps: Vec<MigrationStep>,
}

/// The format of settings with no migration at all.
pub const BASE_FORMAT: u32 = 1;

/// Why a list of steps or an operation cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("settings migrations: {0}")]
pub struct MigrationError(pub String);

fn path(key: &str) -> Result<Vec<String>, MigrationError> {
    let parsed = KeyPath::parse(key).map_err(|e| MigrationError(e.to_string()))?;
    let segments = parsed.segments();
    match segments.split_first() {
        Some((first, rest)) if first == "settings" && !rest.is_empty() => Ok(rest.to_vec()),
        _ => Err(MigrationError(format!(
            "{key:?} is not a settings key (settings.<group>…)"
        ))),
    }
}

impl MigrationOp {
    fn keys(&self) -> Vec<&str> {
        match self {
            MigrationOp::Rename { from, to } => vec![from, to],
            MigrationOp::Remove { key }
            | MigrationOp::SetDefault { key, .. }
            | MigrationOp::MapValues { key, .. } => vec![key],
        }
    }
}

impl Migrations {
    /// Checks the steps: consecutive (`to = from + 1`), starting at [`BASE_FORMAT`],
    /// every key a settings key.
    pub fn check(&self) -> Result<(), MigrationError> {
        let mut expected = BASE_FORMAT;
        for step in &self.steps {
            if step.from != expected || step.to != step.from + 1 {
                return Err(MigrationError(format!(
                    "step {} to {} out of order: steps go from {BASE_FORMAT} up, one format \
                     at a time (expected {expected} to {})",
                    step.from,
                    step.to,
                    expected + 1
                )));
            }
            for op in step.up.iter().chain(&step.down) {
                for key in op.keys() {
                    path(key)?;
                }
            }
            expected = step.to;
        }
        Ok(())
    }

    /// The settings format these steps lead to.
    pub fn format(&self) -> u32 {
        self.steps.last().map_or(BASE_FORMAT, |s| s.to)
    }

    /// The steps known here and in `other` (by `from`; this one's first): what a keeld
    /// records, so that an older keeld finds the steps it does not ship.
    pub fn merged(&self, other: &Migrations) -> Migrations {
        let mut steps = self.steps.clone();
        for step in &other.steps {
            if !steps.iter().any(|s| s.from == step.from) {
                steps.push(step.clone());
            }
        }
        steps.sort_by_key(|s| s.from);
        Migrations { steps }
    }

    /// Carries `settings` from format `from` to format `to`: the up operations of each
    /// step between them, or the down operations in reverse order. Fails when a step is
    /// missing.
    pub fn migrate(&self, settings: &mut Value, from: u32, to: u32) -> Result<(), MigrationError> {
        let step = |f: u32| {
            self.steps.iter().find(|s| s.from == f).ok_or_else(|| {
                MigrationError(format!(
                    "no step from format {f} to {}: cannot carry settings from format \
                     {from} to {to}",
                    f + 1
                ))
            })
        };
        if from < to {
            for f in from..to {
                apply_all(settings, &step(f)?.up)?;
            }
        } else {
            for f in (to..from).rev() {
                apply_all(settings, &step(f)?.down)?;
            }
        }
        Ok(())
    }
}

fn apply_all(settings: &mut Value, ops: &[MigrationOp]) -> Result<(), MigrationError> {
    for op in ops {
        apply(settings, op)?;
    }
    Ok(())
}

fn get<'a>(settings: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(settings, |v, segment| v.get(segment))
}

fn take(settings: &mut Value, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut current = settings;
    for segment in parents {
        current = current.get_mut(segment)?;
    }
    let taken = current.as_object_mut()?.remove(last);
    taken
}

fn put(settings: &mut Value, path: &[String], value: Value) -> Result<(), MigrationError> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut current = settings;
    for segment in parents {
        let object = current
            .as_object_mut()
            .ok_or_else(|| MigrationError(format!("cannot set below {segment:?}: not a table")))?;
        current = object
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    current
        .as_object_mut()
        .ok_or_else(|| MigrationError(format!("cannot set {last:?}: its parent is not a table")))?
        .insert(last.clone(), value);
    Ok(())
}

/// Removes tables left empty along `path` (a rename or removal may empty its group).
fn prune(settings: &mut Value, path: &[String]) {
    for len in (1..path.len()).rev() {
        let parent = &path[..len];
        if get(settings, parent).is_some_and(|v| v.as_object().is_some_and(Map::is_empty)) {
            take(settings, parent);
        }
    }
}

/// Applies one operation to `settings` (no `settings` wrapper).
pub fn apply(settings: &mut Value, op: &MigrationOp) -> Result<(), MigrationError> {
    match op {
        MigrationOp::Rename { from, to } => {
            let (from, to) = (path(from)?, path(to)?);
            if let Some(value) = take(settings, &from) {
                prune(settings, &from);
                put(settings, &to, value)?;
            }
        }
        MigrationOp::Remove { key } => {
            let key = path(key)?;
            if take(settings, &key).is_some() {
                prune(settings, &key);
            }
        }
        MigrationOp::SetDefault { key, value } => {
            let key = path(key)?;
            if get(settings, &key).is_none() {
                put(settings, &key, value.clone())?;
            }
        }
        MigrationOp::MapValues { key, values } => {
            let key = path(key)?;
            if let Some(current) = get(settings, &key) {
                if let Some((_, new)) = values.iter().find(|(old, _)| old == current) {
                    put(settings, &key, new.clone())?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Format 2 renames `settings.metrics.send-metrics` to `settings.telemetry.enabled`,
    /// adds `settings.ntp.time-servers` with a default, and renames a policy's values.
    fn migrations() -> Migrations {
        toml::from_str(
            r#"
            [[step]]
            from = 1
            to = 2
            up = [
              { op = "rename", from = "settings.metrics.send-metrics", to = "settings.telemetry.enabled" },
              { op = "set-default", key = "settings.ntp.time-servers", value = ["169.254.169.123"] },
              { op = "map-values", key = "settings.kubernetes.cpu-manager-policy", values = [["none", "None"]] },
            ]
            down = [
              { op = "rename", from = "settings.telemetry.enabled", to = "settings.metrics.send-metrics" },
              { op = "remove", key = "settings.ntp.time-servers" },
              { op = "map-values", key = "settings.kubernetes.cpu-manager-policy", values = [["None", "none"]] },
            ]
            "#,
        )
        .expect("toml")
    }

    #[test]
    fn up_then_down_gives_back_the_settings_the_old_format_knows() {
        let m = migrations();
        m.check().expect("valid");
        assert_eq!(m.format(), 2);
        let old = json!({"metrics": {"send-metrics": true}, "motd": "hi",
                         "kubernetes": {"cpu-manager-policy": "none"}});
        let mut settings = old.clone();
        m.migrate(&mut settings, 1, 2).expect("up");
        assert_eq!(
            settings,
            json!({"telemetry": {"enabled": true}, "motd": "hi",
                   "ntp": {"time-servers": ["169.254.169.123"]},
                   "kubernetes": {"cpu-manager-policy": "None"}})
        );
        // What the newer version changed comes back down with it.
        settings["telemetry"]["enabled"] = json!(false);
        m.migrate(&mut settings, 2, 1).expect("down");
        assert_eq!(
            settings,
            json!({"metrics": {"send-metrics": false}, "motd": "hi",
                   "kubernetes": {"cpu-manager-policy": "none"}})
        );
    }

    #[test]
    fn steps_are_idempotent_so_a_migration_cut_short_runs_again() {
        let m = migrations();
        let mut once = json!({"metrics": {"send-metrics": true}});
        m.migrate(&mut once, 1, 2).expect("up");
        let mut twice = once.clone();
        m.migrate(&mut twice, 1, 2).expect("up again");
        assert_eq!(once, twice);
        // Down on settings never migrated up changes nothing.
        let mut never = json!({"metrics": {"send-metrics": true}, "motd": "m"});
        m.migrate(&mut never, 2, 1).expect("down");
        assert_eq!(
            never,
            json!({"metrics": {"send-metrics": true}, "motd": "m"})
        );
    }

    #[test]
    fn a_missing_step_or_steps_out_of_order_are_refused() {
        let m = migrations();
        let err = m.migrate(&mut json!({}), 1, 3).expect_err("no step 2");
        assert_eq!(
            err.to_string(),
            "settings migrations: no step from format 2 to 3: cannot carry settings from \
             format 1 to 3"
        );
        let bad: Migrations = toml::from_str("[[step]]\nfrom = 2\nto = 3\n").expect("toml");
        assert!(bad.check().is_err());
        let bad: Migrations = toml::from_str(
            "[[step]]\nfrom = 1\nto = 2\nup = [{op = \"remove\", key = \"motd\"}]\n",
        )
        .expect("toml");
        assert!(bad
            .check()
            .expect_err("not a settings key")
            .to_string()
            .contains("\"motd\""));
        assert!(toml::from_str::<Migrations>(
            "[[step]]\nfrom = 1\nto = 2\nup = [{op = \"drop\", key = \"settings.motd\"}]\n"
        )
        .is_err());
    }

    #[test]
    fn recorded_steps_complete_the_ones_an_older_image_ships() {
        let newer = migrations();
        let older = Migrations::default();
        let merged = older.merged(&newer);
        assert_eq!(merged.format(), 2);
        assert_eq!(merged.steps, newer.steps);
    }
}
