//! Template rendering: loads `packaging/templates/` once and renders one configuration
//! file from the settings and `/os` values.
//!
//! Owns the minijinja environment (strict undefined, Keel's filters, no auto-escaping)
//! and turning its errors into messages that name the template, the line and, when the
//! failure is an undefined value, the settings key. Must not write files or decide which
//! files to render: that is the apply pipeline's job.
//!
//! Templates see two variables: `settings` (the settings JSON without its wrapper, every
//! member optional) and `os`; a file rendered once per item of a settings list or map
//! (`for-each`) also sees `item` (the item's value) and `item_name`. Kebab-case members are read with subscripts
//! (`settings["host-containers"]`); optional groups are usually bound once with
//! `{% set k8s = settings.kubernetes | default({}) %}` and tested with `is defined`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

/// The settings as templates see them: a map whose top-level groups are turned into
/// template values (`Value::from_serialize`, as for the whole settings before) the first
/// time a template reads them, and kept for the next read. A commit's check renders a
/// file or two, which read a group or two; turning all the settings into template
/// values up front, and dropping them afterwards, cost a sixth of keeld's instructions
/// per PATCH+commit (callgrind). Reads, iteration (sorted keys, as a template map has),
/// `length`, `items` and `tojson` see what they saw before.
#[derive(Debug)]
struct SettingsView {
    settings: Arc<serde_json::Value>,
    groups: Mutex<BTreeMap<String, Value>>,
}

impl SettingsView {
    fn map(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.settings.as_object()
    }
}

impl Object for SettingsView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let json = self.map()?.get(name)?;
        let mut groups = self
            .groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(
            groups
                .entry(name.to_owned())
                .or_insert_with(|| Value::from_serialize(json))
                .clone(),
        )
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: Vec<&String> = self.map().map(|m| m.keys().collect()).unwrap_or_default();
        keys.sort();
        Enumerator::Values(keys.into_iter().map(|k| Value::from(k.as_str())).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.map().map_or(0, |m| m.len()))
    }
}

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read templates from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template file name {path:?} is not UTF-8")]
    BadName { path: PathBuf },
    #[error("no template named {template:?}")]
    UnknownTemplate { template: String },
    #[error("template {template:?}{}: syntax error: {reason}", line_suffix(*.line))]
    Syntax {
        template: String,
        line: Option<usize>,
        reason: String,
    },
    /// A variable or member the template reads is not set.
    #[error("template {template:?}{}: undefined value {expression}", line_suffix(*.line))]
    Undefined {
        template: String,
        line: Option<usize>,
        /// The expression as written in the template, normalized to a dotted key when it
        /// reads `settings` (`settings.kubernetes.cluster-dns-ip`).
        expression: String,
        /// The settings key, when the expression reads one.
        key: Option<String>,
    },
    #[error("template {template:?}{}: {reason}", line_suffix(*.line))]
    Render {
        template: String,
        line: Option<usize>,
        reason: String,
    },
    /// A multi-file's items cannot be listed or named (see `for-each`).
    #[error("configuration file {file:?}: {reason}")]
    Items {
        file: String,
        /// The `for-each` settings key.
        key: String,
        reason: String,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" line {l}")).unwrap_or_default()
}

impl RenderError {
    /// The settings key whose absence made rendering fail, when known.
    pub fn key(&self) -> Option<String> {
        match self {
            RenderError::Undefined { key, .. } => key.clone(),
            RenderError::Items { key, .. } => Some(key.clone()),
            _ => None,
        }
    }

    /// The template the error is about, if it is about one.
    pub fn template(&self) -> Option<&str> {
        match self {
            RenderError::Syntax { template, .. }
            | RenderError::Undefined { template, .. }
            | RenderError::Render { template, .. }
            | RenderError::UnknownTemplate { template } => Some(template),
            RenderError::Read { .. } | RenderError::BadName { .. } | RenderError::Items { .. } => {
                None
            }
        }
    }

    /// The line in the template, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            RenderError::Syntax { line, .. }
            | RenderError::Undefined { line, .. }
            | RenderError::Render { line, .. } => *line,
            _ => None,
        }
    }
}

/// Every template, parsed once at startup.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// Loads every file in `dir` as a template named by its file name; fails naming the
    /// file and line on a syntax error. Hidden files (`.name`) and directories are skipped.
    pub fn load(dir: &Path) -> Result<Templates, RenderError> {
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| RenderError::Read { path, source }
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
            let entry = entry.map_err(read_err(dir))?;
            let path = entry.path();
            if !path.is_file() {
                continue;
            }
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| RenderError::BadName { path: path.clone() })?;
            if name.starts_with('.') {
                continue;
            }
            files.push((name, path));
        }
        files.sort();
        let mut sources = Vec::with_capacity(files.len());
        for (name, path) in files {
            let source = std::fs::read_to_string(&path).map_err(read_err(&path))?;
            sources.push((name, source));
        }
        Self::from_sources(sources)
    }

    /// Builds the environment from `(name, source)` pairs; used by `load` and by tests.
    pub fn from_sources(
        sources: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Templates, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Block tags take their whole line, and files end with the newline they were
        // written with: templates then read like the files they produce.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(true);
        super::filters::register(&mut env);
        for (name, source) in sources {
            env.add_template_owned(name.clone(), source)
                .map_err(|e| RenderError::Syntax {
                    template: e.name().map_or_else(|| name.clone(), str::to_owned),
                    line: e.line(),
                    reason: reason_of(&e),
                })?;
        }
        Ok(Templates { env })
    }

    /// Names of every loaded template, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .env
            .templates()
            .map(|(name, _)| name.to_owned())
            .collect();
        names.sort();
        names
    }

    /// Whether a template called `name` was loaded.
    pub fn contains(&self, name: &str) -> bool {
        self.env.get_template(name).is_ok()
    }

    /// Renders template `name` with context
    /// `{"settings": <settings JSON without wrapper>, "os": <os JSON>}`.
    pub fn render(
        &self,
        name: &str,
        settings: &serde_json::Value,
        os: &serde_json::Value,
    ) -> Result<String, RenderError> {
        self.render_in(name, &Self::context(settings, os))
    }

    /// The render context `{"settings": …, "os": …}`, built once for several renders.
    pub fn context(settings: &serde_json::Value, os: &serde_json::Value) -> Value {
        Self::context_shared(Arc::new(settings.clone()), os)
    }

    /// [`Templates::context`] of settings already shared: no copy of them is made, and
    /// each top-level group becomes a template value only once a template reads it
    /// (see [`SettingsView`]).
    pub fn context_shared(settings: Arc<serde_json::Value>, os: &serde_json::Value) -> Value {
        let settings = if settings.is_object() {
            Value::from_object(SettingsView {
                settings,
                groups: Mutex::default(),
            })
        } else {
            Value::from_serialize(&*settings)
        };
        minijinja::context! {
            settings => settings,
            os => Value::from_serialize(os),
        }
    }

    /// The render context of one item of a multi-file:
    /// `{"settings": …, "os": …, "item": <the item's value>, "item_name": <its name>}`.
    pub fn context_with_item(
        settings: &serde_json::Value,
        os: &serde_json::Value,
        item: &serde_json::Value,
        item_name: &str,
    ) -> Value {
        Self::item_context(&Self::context(settings, os), item, item_name)
    }

    /// [`Templates::context_with_item`] from a context made once by
    /// [`Templates::context`], for rendering many items.
    pub fn item_context(base: &Value, item: &serde_json::Value, item_name: &str) -> Value {
        minijinja::context! {
            item => Value::from_serialize(item),
            item_name => item_name,
            ..base.clone()
        }
    }

    /// Renders template `name` in a context made by [`Templates::context`].
    pub fn render_in(&self, name: &str, context: &Value) -> Result<String, RenderError> {
        let template = self
            .env
            .get_template(name)
            .map_err(|_| RenderError::UnknownTemplate {
                template: name.to_owned(),
            })?;
        template.render(context).map_err(|e| self.convert(name, &e))
    }

    /// Turns a minijinja render error into a `RenderError` naming the template it
    /// happened in (an included one, if so) and, for undefined values, the expression.
    fn convert(&self, requested: &str, err: &minijinja::Error) -> RenderError {
        let template = err.name().unwrap_or(requested).to_owned();
        let line = err.line();
        if err.kind() == ErrorKind::UndefinedError {
            let source = self
                .env
                .get_template(&template)
                .ok()
                .map(|t| t.source().to_owned());
            let expression = source
                .as_deref()
                .zip(err.range())
                .and_then(|(source, range)| expression_at(source, range));
            if let Some(expression) = expression {
                let key = settings_key(&expression);
                return RenderError::Undefined {
                    template,
                    line,
                    expression: key.clone().unwrap_or(expression),
                    key,
                };
            }
            return RenderError::Undefined {
                template,
                line,
                expression: "(unknown expression)".to_owned(),
                key: None,
            };
        }
        RenderError::Render {
            template,
            line,
            reason: reason_of(err),
        }
    }
}

/// `kind: detail`, plus the causes, without minijinja's own `(in name:line)` suffix.
fn reason_of(err: &minijinja::Error) -> String {
    let mut reason = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        reason.push_str(&format!(": {c}"));
        cause = c.source();
    }
    reason
}

/// The lookup chain around `range` in `source`: minijinja's span starts after the base
/// variable (`.kubernetes["x"]`), so walk back to include it (`settings`).
fn expression_at(source: &str, range: Range<usize>) -> Option<String> {
    let bytes = source.as_bytes();
    let end = range.end.min(bytes.len());
    let mut start = range.start.min(end);
    while start > 0 {
        let c = bytes[start - 1];
        if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' {
            start -= 1;
        } else if c == b']' {
            // Jump to the matching '['.
            let mut depth = 0usize;
            let mut i = start;
            let mut found = None;
            while i > 0 {
                i -= 1;
                match bytes[i] {
                    b']' => depth += 1,
                    b'[' => {
                        depth -= 1;
                        if depth == 0 {
                            found = Some(i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            start = found?;
        } else {
            break;
        }
    }
    let text = source.get(start..end)?.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// `settings.kubernetes["cluster-dns-ip"]` → `settings.kubernetes.cluster-dns-ip`;
/// `None` when the expression does not start with a plain `settings` lookup chain.
fn settings_key(expression: &str) -> Option<String> {
    let rest = expression.strip_prefix("settings")?;
    let mut key = String::from("settings");
    let mut chars = rest.chars().peekable();
    let mut segments = 0;
    while let Some(&c) = chars.peek() {
        match c {
            '.' => {
                chars.next();
                let mut segment = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        segment.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if segment.is_empty() {
                    return None;
                }
                key.push('.');
                key.push_str(&settings_model::key::format_segment(&segment));
            }
            '[' => {
                chars.next();
                let quote = match chars.next()? {
                    q @ ('"' | '\'') => q,
                    d if d.is_ascii_digit() => {
                        let mut index = String::from(d);
                        for c in chars.by_ref() {
                            if c == ']' {
                                break;
                            }
                            index.push(c);
                        }
                        key.push_str(&format!("[{index}]"));
                        segments += 1;
                        continue;
                    }
                    _ => return None,
                };
                let mut segment = String::new();
                for c in chars.by_ref() {
                    if c == quote {
                        break;
                    }
                    segment.push(c);
                }
                if chars.next() != Some(']') {
                    return None;
                }
                key.push('.');
                key.push_str(&settings_model::key::format_segment(&segment));
            }
            _ => break,
        }
        segments += 1;
    }
    (segments > 0 || rest.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn one(source: &str) -> Templates {
        Templates::from_sources([("t".to_owned(), source.to_owned())]).unwrap()
    }

    /// What a template can do with the whole `settings` (iterate, count, list items,
    /// serialize, test members, subscript, pass it to a filter) gives the same result
    /// with the groups read lazily as with the settings turned into template values up
    /// front.
    #[test]
    fn settings_read_lazily_render_as_settings_converted_up_front() {
        let settings = json!({
            "motd": "m",
            "network": {"https-proxy": "http://proxy:3128", "no-proxy": ["x.internal"]},
            "kubernetes": {"node-labels": {"b": "2", "a": "1"}, "cluster-domain": "c.local"},
            "host-containers": {"admin": {"enabled": true}}
        });
        let t = one(concat!(
            "{% for k in settings %}{{ k }},{% endfor %}|{{ settings | length }}|",
            "{% for k, v in settings | items %}{{ k }}={{ v | tojson }};{% endfor %}|",
            "{{ settings | tojson }}|{{ settings | dictsort | length }}|",
            "{{ settings.kubernetes is defined }}{{ settings.nope is defined }}|",
            "{{ settings is mapping }}|{{ settings['host-containers'].admin.enabled }}|",
            "{% for k, v in settings.kubernetes['node-labels'] | dictsort %}{{ k }}{{ v }}{% endfor %}|",
            "{{ (settings | proxy_rules)['no-proxy'] | join(',') }}|{{ settings | first }}"
        ));
        let os = json!({"arch": "x86_64"});
        let up_front = minijinja::context! {
            settings => Value::from_serialize(&settings),
            os => Value::from_serialize(&os),
        };
        let expected = t.render_in("t", &up_front).unwrap();
        assert!(expected.contains("kubernetes"), "{expected}");
        let lazy = Templates::context(&settings, &os);
        assert_eq!(t.render_in("t", &lazy).unwrap(), expected);
        // And again on the same context: the groups kept from the first render.
        assert_eq!(t.render_in("t", &lazy).unwrap(), expected);
    }

    #[test]
    fn undefined_names_template_line_and_key() {
        let t = one("a\nb\n{{ settings.kubernetes[\"cluster-dns-ip\"] }}\n");
        let err = t.render("t", &json!({}), &json!({})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "template \"t\" line 3: undefined value settings.kubernetes.cluster-dns-ip"
        );
        assert_eq!(
            err.key().as_deref(),
            Some("settings.kubernetes.cluster-dns-ip")
        );
        assert_eq!(err.line(), Some(3));
    }

    #[test]
    fn undefined_is_never_an_empty_string() {
        let t = one("{{ settings.motd }}");
        let err = t.render("t", &json!({}), &json!({})).unwrap_err();
        assert_eq!(err.key().as_deref(), Some("settings.motd"));
        assert_eq!(
            t.render("t", &json!({"motd": "hi"}), &json!({})).unwrap(),
            "hi"
        );
    }

    #[test]
    fn undefined_in_a_loop_or_local_variable() {
        let t = one("{% for s in settings.ntp['time-servers'] %}{{ s }}{% endfor %}");
        let err = t.render("t", &json!({}), &json!({})).unwrap_err();
        assert_eq!(err.key().as_deref(), Some("settings.ntp.time-servers"));

        let t = one("{% set k = settings.kubernetes | default({}) %}\n{{ k.x }}");
        let err = t.render("t", &json!({}), &json!({})).unwrap_err();
        assert_eq!(err.key(), None);
        assert!(
            err.to_string().contains("line 2: undefined value k.x"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_template_and_line() {
        let err =
            Templates::from_sources([("bad".to_owned(), "ok\n{% if x %}\n{{ y }".to_owned())])
                .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("template \"bad\" line 3: syntax error"),
            "{text}"
        );
    }

    #[test]
    fn filter_failures_are_render_errors() {
        let t = one("x\n{{ settings.v | base64_decode }}");
        let err = t.render("t", &json!({"v": "%%%"}), &json!({})).unwrap_err();
        assert!(
            err.to_string().starts_with("template \"t\" line 2: "),
            "{err}"
        );
        assert!(err.to_string().contains("not base64"), "{err}");
    }

    #[test]
    fn unknown_template_is_an_error() {
        let t = one("x");
        assert!(matches!(
            t.render("nope", &json!({}), &json!({})),
            Err(RenderError::UnknownTemplate { .. })
        ));
    }

    #[test]
    fn block_tags_take_whole_lines_and_trailing_newline_is_kept() {
        let t = one("a\n{% if true %}\nb\n{% endif %}\nc\n");
        assert_eq!(t.render("t", &json!({}), &json!({})).unwrap(), "a\nb\nc\n");
    }

    #[test]
    fn no_html_escaping() {
        let t = one("{{ settings.v }}");
        assert_eq!(
            t.render("t", &json!({"v": "<a & 'b'>"}), &json!({}))
                .unwrap(),
            "<a & 'b'>"
        );
    }

    #[test]
    fn item_context_adds_item_and_its_name() {
        let t = one("{{ item_name }} {{ item.endpoint[0] }} {{ settings.motd }} {{ os.arch }}");
        let ctx = Templates::context_with_item(
            &json!({"motd": "m"}),
            &json!({"arch": "x86_64"}),
            &json!({"endpoint": ["https://e"]}),
            "*",
        );
        assert_eq!(t.render_in("t", &ctx).unwrap(), "* https://e m x86_64");
        let err = t
            .render_in("t", &Templates::context(&json!({}), &json!({})))
            .unwrap_err();
        assert!(matches!(err, RenderError::Undefined { .. }), "{err}");
    }

    #[test]
    fn settings_key_normalizes_subscripts() {
        assert_eq!(
            settings_key("settings[\"host-containers\"].admin['user-data']").as_deref(),
            Some("settings.host-containers.admin.user-data")
        );
        assert_eq!(
            settings_key("settings.pki[\"my.ca\"]").as_deref(),
            Some("settings.pki.\"my.ca\"")
        );
        assert_eq!(settings_key("os.arch"), None);
        assert_eq!(settings_key("settingsx.y"), None);
    }
}
