//! Template filters Keel adds to minijinja: decoding and quoting for the formats the
//! configuration files are written in.
//!
//! Owns: `base64_decode`, `toml_string`, `yaml_string`, `shell_env_quote`, `proxy_url`,
//! `url_host` and their registration. Each filter is a pure function of its input; none reads
//! files or the environment. `join`, `default`, `unique` and `tojson` are minijinja's
//! built-ins and are not redefined here.

use base64::Engine as _;
use minijinja::{Environment, Error, ErrorKind, Value};
use settings_model::types::is_noncharacter;

/// Registers every Keel filter on `env`.
pub fn register(env: &mut Environment<'_>) {
    env.add_filter("base64_decode", base64_decode);
    env.add_filter("toml_string", toml_string);
    env.add_filter("yaml_string", yaml_string);
    env.add_filter("shell_env_quote", shell_env_quote);
    env.add_filter("proxy_url", proxy_url);
    env.add_filter("proxy_rules", proxy_rules);
    env.add_filter("url_host", url_host);
    env.add_filter("url_port", url_port);
}

/// Decodes standard base64 (with padding) into UTF-8 text, e.g. a PEM bundle.
pub fn base64_decode(value: &str) -> Result<String, Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("base64_decode: not base64 ({e})"),
            )
        })?;
    String::from_utf8(bytes).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "base64_decode: the decoded data is not UTF-8 text",
        )
    })
}

/// Quotes `value` as a TOML basic string: `"..."` with `\`, `"`, control characters and
/// Unicode noncharacters escaped.
pub fn toml_string(value: &str) -> String {
    double_quoted(value, |c| match c {
        '\u{8}' => Some("\\b"),
        '\u{c}' => Some("\\f"),
        _ => None,
    })
}

/// Quotes `value` as a YAML double-quoted scalar, so that no value can change type
/// (`"true"`, `"0x10"`, `"null"` stay strings) or break the document structure. Only
/// YAML's printable characters are written as they are: controls, U+FFFE and U+FFFF
/// (which YAML parsers, the kubelet's among them, refuse in a document) and the other
/// noncharacters are escaped.
pub fn yaml_string(value: &str) -> String {
    // YAML treats these as line breaks or non-printable: escape them.
    double_quoted(value, |c| match c {
        '\u{85}' => Some("\\N"),
        '\u{2028}' => Some("\\L"),
        '\u{2029}' => Some("\\P"),
        '\u{feff}' => Some("\\uFEFF"),
        _ => None,
    })
}

/// `"..."` with `"`, `\`, newline, return and tab escaped the way TOML and YAML share,
/// the format's own escapes from `special`, and other control characters and every
/// noncharacter as `\uXXXX` (`\UXXXXXXXX` above U+FFFF).
fn double_quoted(value: &str, special: impl Fn(char) -> Option<&'static str>) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    // Runs of characters written as they are go in with one copy each.
    let mut plain = 0;
    for (at, c) in value.char_indices() {
        if (' '..='~').contains(&c) && c != '"' && c != '\\' {
            continue;
        }
        let escape = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            c => special(c),
        };
        let numeric = escape.is_none() && (c.is_control() || is_noncharacter(c));
        if escape.is_none() && !numeric {
            continue;
        }
        out.push_str(&value[plain..at]);
        plain = at + c.len_utf8();
        match escape {
            Some(escape) => out.push_str(escape),
            None if u32::from(c) > 0xFFFF => out.push_str(&format!("\\U{:08X}", u32::from(c))),
            None => out.push_str(&format!("\\u{:04X}", u32::from(c))),
        }
    }
    out.push_str(&value[plain..]);
    out.push('"');
    out
}

/// Quotes `value` for a `KEY=value` environment file read by systemd's
/// `EnvironmentFile=` or sourced by a POSIX shell: plain when it only has characters
/// neither treats specially, otherwise single-quoted with `'` written as `'"'"'` (close,
/// a double-quoted `'`, reopen). Not `'\''`: systemd reads a quote that follows an
/// escaped character as a literal one, so `'it'\''s'` is `it''s'` to it. Newlines cannot
/// be represented portably and are refused.
pub fn shell_env_quote(value: &str) -> Result<String, Error> {
    if value.contains(['\n', '\r', '\0']) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "shell_env_quote: an environment value cannot contain a newline",
        ));
    }
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-+.,:/=@%".contains(c));
    if plain {
        return Ok(value.to_owned());
    }
    Ok(format!("'{}'", value.replace('\'', "'\"'\"'")))
}

/// The value of one `KEY=value` line of an environment file as systemd's
/// `EnvironmentFile=` reads it (`raw` is what follows the `=`): leading blanks skipped;
/// `'…'` literal; `"…"` with `\` escaping only `"`, `\`, `` ` `` and `$`; outside quotes
/// `\` escapes the next character, and a quote is literal once an unquoted character
/// came before it; trailing blanks of an unquoted run dropped. The tests check what
/// keeld writes with it, since no systemd runs where they do.
pub fn environment_file_value(raw: &str) -> String {
    #[derive(PartialEq)]
    enum State {
        PreValue,
        Value,
        Single,
        Double,
    }
    let mut state = State::PreValue;
    let mut out = String::new();
    // Where the last run of unquoted blanks began (dropped if nothing follows).
    let mut blanks_from: Option<usize> = None;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match state {
            State::PreValue | State::Value => match c {
                ' ' | '\t' if state == State::PreValue => {}
                '\'' if state == State::PreValue => state = State::Single,
                '"' if state == State::PreValue => state = State::Double,
                '\\' => {
                    blanks_from = None;
                    out.extend(chars.next());
                    state = State::Value;
                }
                c => {
                    if c == ' ' || c == '\t' {
                        blanks_from.get_or_insert(out.len());
                    } else {
                        blanks_from = None;
                    }
                    out.push(c);
                    state = State::Value;
                }
            },
            State::Single => match c {
                '\'' => state = State::PreValue,
                c => out.push(c),
            },
            State::Double => match c {
                '"' => state = State::PreValue,
                '\\' => match chars.next() {
                    Some(e) if "\"\\`$".contains(e) => out.push(e),
                    Some(e) => {
                        out.push('\\');
                        out.push(e);
                    }
                    None => out.push('\\'),
                },
                c => out.push(c),
            },
        }
    }
    if let Some(from) = blanks_from {
        out.truncate(from);
    }
    out
}

/// A proxy address as a URL: `http://` is added when it has no scheme, as
/// `settings.network.https-proxy` documents ([`settings_model::proxy::proxy_url`]).
pub fn proxy_url(value: &str) -> String {
    settings_model::proxy::proxy_url(value)
}

/// The effective proxy rules of the whole `settings` value, computed by
/// [`settings_model::proxy::ProxyRules`] (the same rules host and bootstrap containers
/// and keeld's own pulls use): `{"https-proxy": URL, "no-proxy": [entries]}`, or none
/// when no proxy is set.
pub fn proxy_rules(settings: &Value) -> Result<Value, Error> {
    use settings_model::model::{Kubernetes, Network};
    use settings_model::proxy::ProxyRules;

    fn group<T: serde::de::DeserializeOwned>(
        settings: &Value,
        name: &str,
    ) -> Result<Option<T>, Error> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("proxy_rules: settings.{name}: {e}"),
            )
        };
        let value = settings.get_attr(name)?;
        if value.is_undefined() || value.is_none() {
            return Ok(None);
        }
        let json = serde_json::to_value(&value).map_err(|e| bad(&e))?;
        serde_json::from_value(json).map(Some).map_err(|e| bad(&e))
    }

    let network: Option<Network> = group(settings, "network")?;
    let kubernetes: Option<Kubernetes> = group(settings, "kubernetes")?;
    Ok(
        match ProxyRules::from_parts(network.as_ref(), kubernetes.as_ref()) {
            Some(rules) => Value::from_iter([
                ("https-proxy", Value::from(rules.https_proxy())),
                ("no-proxy", Value::from(rules.no_proxy().to_vec())),
            ]),
            None => Value::from(()),
        },
    )
}

/// The host of a server given as a host name, an IP address or a URL
/// (`ntp://time.example.com:123` → `time.example.com`, `[fd00::1]` → `fd00::1`).
pub fn url_host(value: &str) -> String {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if let Some(bracketed) = authority.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed).to_owned();
    }
    if authority.parse::<std::net::Ipv6Addr>().is_ok() {
        return authority.to_owned();
    }
    authority.split(':').next().unwrap_or(authority).to_owned()
}

/// The port of a server given as a URL (`ntp://time.example.com:1123` → `1123`), if it
/// names one: what [`url_host`] leaves out ([`settings_model::types::url_port`]).
pub fn url_port(value: &str) -> Option<String> {
    settings_model::types::url_port(value).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn base64_decode_gives_text_and_refuses_garbage() {
        assert_eq!(base64_decode("aGVsbG8K").unwrap(), "hello\n");
        assert_eq!(base64_decode("").unwrap(), "");
        let err = base64_decode("not base64!").unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        // 0xff 0xfe is valid base64 but not UTF-8.
        let err = base64_decode("//4=").unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn toml_string_round_trips_through_a_toml_parser() {
        for s in [
            "plain",
            "with \"quotes\" and \\backslash",
            "tab\tnew\nline\r",
            "bell\u{7} del\u{7f} esc\u{1b}",
            "unicode é ✓",
            "",
        ] {
            let doc = format!("v = {}", toml_string(s));
            let parsed: toml::Table = toml::from_str(&doc).unwrap();
            assert_eq!(parsed["v"].as_str().unwrap(), s, "{doc}");
        }
    }

    #[test]
    fn yaml_string_round_trips_and_keeps_strings_strings() {
        for s in [
            "true",
            "null",
            "0x10",
            "1e3",
            "- a: b",
            "#comment",
            "quote \" backslash \\ colon: x",
            "tab\tnew\nline",
            "ctl\u{1} nel\u{85} ls\u{2028} ps\u{2029}",
            "",
        ] {
            let doc = format!("v: {}", yaml_string(s));
            let parsed: serde_norway::Value = serde_norway::from_str(&doc).unwrap();
            assert_eq!(parsed["v"].as_str().unwrap(), s, "{doc}");
        }
    }

    #[test]
    fn yaml_and_toml_strings_escape_noncharacters() {
        let s = "a\u{fffe}b\u{ffff}c\u{fdd0}d\u{1fffe}e\u{10ffff}\u{9b}31m\u{1b}]0;x\u{7}";
        let yaml_doc = format!("v: {}", yaml_string(s));
        let toml_doc = format!("v = {}", toml_string(s));
        for doc in [&yaml_doc, &toml_doc] {
            assert!(
                !doc.chars()
                    .any(|c| c.is_control() || settings_model::types::is_noncharacter(c)),
                "{doc:?}"
            );
        }
        assert!(yaml_doc.contains("\\uFFFE") && yaml_doc.contains("\\U0001FFFE"));
        let parsed: serde_norway::Value = serde_norway::from_str(&yaml_doc).unwrap();
        assert_eq!(parsed["v"].as_str().unwrap(), s, "{yaml_doc}");
        let parsed: toml::Table = toml::from_str(&toml_doc).unwrap();
        assert_eq!(parsed["v"].as_str().unwrap(), s, "{toml_doc}");
    }

    #[test]
    fn shell_env_quote_quotes_only_when_needed() {
        assert_eq!(
            shell_env_quote("http://proxy:3128").unwrap(),
            "http://proxy:3128"
        );
        assert_eq!(shell_env_quote("a,b=c").unwrap(), "a,b=c");
        assert_eq!(shell_env_quote("").unwrap(), "''");
        assert_eq!(shell_env_quote("a b").unwrap(), "'a b'");
        assert!(shell_env_quote("a\nb").is_err());
    }

    /// Values systemd and sh must both read back unchanged.
    const AWKWARD: [&str; 9] = [
        "it's",
        "http://u:it's@proxy:3128",
        "'",
        "''a''",
        "$HOME `x` \"q\" \\",
        "a b ",
        " lead",
        "x'y'z\\'",
        "p@ss w'rd $X `y` \\z",
    ];

    #[test]
    fn shell_env_quote_agrees_with_systemd() {
        for s in AWKWARD {
            let quoted = shell_env_quote(s).unwrap();
            assert_eq!(environment_file_value(&quoted), s, "{quoted}");
        }
        // The reader itself, on the forms systemd documents.
        assert_eq!(environment_file_value("'it'\\''s'"), "it''s'");
        assert_eq!(environment_file_value("  plain value  "), "plain value");
        assert_eq!(environment_file_value("\"a \\\" \\n\""), "a \" \\n");
    }

    #[test]
    fn shell_env_quote_agrees_with_sh() {
        for value in AWKWARD {
            let quoted = shell_env_quote(value).unwrap();
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("V={quoted}; printf %s \"$V\""))
                .output()
                .expect("sh runs");
            assert_eq!(String::from_utf8(out.stdout).unwrap(), value, "{quoted}");
        }
    }

    #[test]
    fn proxy_url_adds_http_only_without_scheme() {
        assert_eq!(
            proxy_url("proxy.example.com:3128"),
            "http://proxy.example.com:3128"
        );
        assert_eq!(proxy_url("https://proxy:443"), "https://proxy:443");
        assert_eq!(proxy_url("http://u:p@proxy"), "http://u:p@proxy");
    }

    #[test]
    fn url_host_strips_scheme_port_path_and_brackets() {
        assert_eq!(url_host("time.example.com"), "time.example.com");
        assert_eq!(url_host("169.254.169.123"), "169.254.169.123");
        assert_eq!(url_host("ntp://time.example.com:123/x"), "time.example.com");
        assert_eq!(url_host("ntp://[fd00::1]:123"), "fd00::1");
        assert_eq!(url_host("fd00::1"), "fd00::1");
        assert_eq!(url_host("https://u:p@host:8443"), "host");
    }

    #[test]
    fn url_port_is_the_port_url_host_leaves_out() {
        assert_eq!(
            url_port("ntp://time.example.com:1123/x").as_deref(),
            Some("1123")
        );
        assert_eq!(url_port("ntp://[fd00::1]:123").as_deref(), Some("123"));
        assert_eq!(url_port("https://u:p@host:8443").as_deref(), Some("8443"));
        for none in [
            "time.example.com",
            "169.254.169.123",
            "fd00::1",
            "ntp://time.example.com",
            "ntp://[fd00::1]/x",
            "ntp://time.example.com:",
        ] {
            assert_eq!(url_port(none), None, "{none}");
        }
    }

    #[test]
    fn filters_are_registered() {
        let mut env = Environment::new();
        register(&mut env);
        let out = env
            .render_str(
                "{{ 'aGk=' | base64_decode }} {{ 'a\"b' | toml_string }} {{ 'x' | yaml_string }} \
                 {{ 'a b' | shell_env_quote }} {{ 'p:1' | proxy_url }}",
                (),
            )
            .unwrap();
        assert_eq!(out, "hi \"a\\\"b\" \"x\" 'a b' http://p:1");
    }
}
