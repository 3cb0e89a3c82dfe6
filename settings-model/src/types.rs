//! Validated string newtypes used by the settings model.
//!
//! Owns: the grammar of every setting that has one (identifiers, image references, URLs,
//! base64, hostnames, label keys, quantities, durations, ...) and the reason text shown
//! when a value breaks it. Each type keeps the original string and serializes it
//! unchanged, so validation never rewrites what the user wrote.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use schemars::gen::SchemaGenerator;
use schemars::schema::{InstanceType, Metadata, Schema, SchemaObject, StringValidation};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A JSON Schema for a string with an optional format and pattern.
fn string_schema(description: &str, format: Option<&str>, pattern: Option<&str>) -> Schema {
    SchemaObject {
        instance_type: Some(InstanceType::String.into()),
        format: format.map(str::to_owned),
        string: pattern.map(|p| {
            Box::new(StringValidation {
                pattern: Some(p.to_owned()),
                ..StringValidation::default()
            })
        }),
        metadata: Some(Box::new(Metadata {
            description: Some(description.to_owned()),
            ..Metadata::default()
        })),
        ..SchemaObject::default()
    }
    .into()
}

/// `"value" is not a valid <what> (<why>)`.
fn invalid(value: &str, what: &str, why: &str) -> String {
    format!("{value:?} is not a valid {what} ({why})")
}

// ---------------------------------------------------------------------------------------
// Characters no setting carries unless its grammar says so

/// Whether `c` is a Unicode noncharacter: U+FDD0..=U+FDEF and the last two code points of
/// every plane (U+FFFE, U+FFFF, U+1FFFE, ...). YAML parsers (the kubelet's among them)
/// refuse U+FFFE and U+FFFF, and no text needs any of them.
pub fn is_noncharacter(c: char) -> bool {
    let code = u32::from(c);
    (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
}

/// Whether `c` is refused in every setting whose grammar does not name it: C0 controls
/// (newline, return, tab, NUL, and ESC, which introduces ANSI CSI and OSC sequences),
/// DEL, C1 controls (NEL, and the 8-bit CSI U+009B and OSC U+009D introducers) and
/// Unicode noncharacters.
pub fn is_forbidden_char(c: char) -> bool {
    c.is_control() || is_noncharacter(c)
}

/// The JSON Schema (ECMA 262) character class of [`is_forbidden_char`], for `concat!`,
/// without the noncharacters above U+FFFF (a pattern without the `u` flag cannot name
/// them) and without tab and newline, which the patterns add where they are refused.
macro_rules! forbidden_class {
    () => {
        "\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F\\uFDD0-\\uFDEF\\uFFFE\\uFFFF"
    };
}

/// The first character of `s` that [`is_forbidden_char`] refuses and `allowed` does not
/// list, with its byte offset.
fn first_forbidden(s: &str, allowed: &[char]) -> Option<(usize, char)> {
    s.char_indices()
        .find(|&(_, c)| is_forbidden_char(c) && !allowed.contains(&c))
}

/// Refuses `s` when it holds a character [`is_forbidden_char`] refuses and `allowed` does
/// not list; the reason names the character and its offset.
fn check_chars(s: &str, what: &str, allowed: &[char]) -> Result<(), String> {
    match first_forbidden(s, allowed) {
        Some((offset, c)) => Err(invalid(
            s,
            what,
            &format!(
                "control characters and noncharacters are not allowed: U+{:04X} at byte {offset}",
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses `s` when it is longer than `max` bytes, without repeating it.
fn check_len(s: &str, what: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!(
            "a {what} is at most {max} bytes long; this one has {}",
            s.len()
        ));
    }
    Ok(())
}

macro_rules! validated_string {
    (
        $(#[$doc:meta])*
        $name:ident, check = $check:path, description = $desc:expr,
        format = $format:expr, pattern = $pattern:expr
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        validated_string!(@impl $name, $check, $desc, $format, $pattern);
    };
    (
        $(#[$doc:meta])*
        $name:ident, check = $check:path, description = $desc:expr,
        format = $format:expr, pattern = $pattern:expr, debug = $debug:path
    ) => {
        validated_string! {
            $(#[$doc])*
            $name, check = $check, description = $desc,
            format = $format, pattern = $pattern, debug = $debug, read = String::deserialize
        }
    };
    (
        $(#[$doc:meta])*
        $name:ident, check = $check:path, description = $desc:expr,
        format = $format:expr, pattern = $pattern:expr, debug = $debug:path, read = $read:path
    ) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&$debug(&self.0)).finish()
            }
        }

        validated_string!(@impl $name, $check, $desc, $format, $pattern, $read);
    };
    (@impl $name:ident, $check:path, $desc:expr, $format:expr, $pattern:expr) => {
        validated_string!(@impl $name, $check, $desc, $format, $pattern, String::deserialize);
    };
    (@impl $name:ident, $check:path, $desc:expr, $format:expr, $pattern:expr, $read:path) => {

        impl $name {
            /// Validates `s`; the error is the reason text shown to users.
            pub fn new(s: impl Into<String>) -> Result<Self, String> {
                let s = s.into();
                $check(&s)?;
                Ok(Self(s))
            }

            /// The string exactly as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = $read(deserializer)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> String {
                stringify!($name).to_owned()
            }
            fn is_referenceable() -> bool {
                false
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                string_schema($desc, $format, $pattern)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Names

fn check_identifier(s: &str) -> Result<(), String> {
    let what = "name";
    if s.is_empty() || s.len() > 76 {
        return Err(invalid(s, what, "must be 1 to 76 characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid(
            s,
            what,
            "only ASCII letters, digits and '-' are allowed",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err(invalid(
            s,
            what,
            "'-' must separate letters or digits, not start, end or repeat",
        ));
    }
    Ok(())
}

validated_string! {
    /// A name usable as a containerd id: ASCII letters, digits and single `-`, 1..=76 chars.
    Identifier, check = check_identifier,
    description = "A name: ASCII letters, digits and '-', 1 to 76 characters",
    format = None, pattern = Some("^[A-Za-z0-9]+(-[A-Za-z0-9]+)*$")
}

/// The longest environment variable name accepted.
pub const ENV_NAME_MAX: usize = 256;

fn check_env_name(s: &str) -> Result<(), String> {
    check_len(s, "environment variable name", ENV_NAME_MAX)?;
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            s,
            "environment variable name",
            "letters, digits and '_', not starting with a digit",
        ));
    }
    Ok(())
}

validated_string! {
    /// An environment variable name (`[A-Za-z_][A-Za-z0-9_]*`), at most 256 bytes.
    EnvName, check = check_env_name,
    description = "An environment variable name",
    format = None, pattern = Some("^[A-Za-z_][A-Za-z0-9_]*$")
}

fn check_module_name(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            s,
            "kernel module name",
            "letters, digits, '_' and '-', 1 to 64 characters",
        ));
    }
    Ok(())
}

validated_string! {
    /// A kernel module name.
    KernelModuleName, check = check_module_name,
    description = "A kernel module name",
    format = None, pattern = Some("^[A-Za-z0-9_-]{1,64}$")
}

/// The longest kernel or init parameter name accepted.
pub const BOOT_PARAM_KEY_MAX: usize = 128;

fn check_boot_param_key(s: &str) -> Result<(), String> {
    let what = "kernel or init parameter name";
    check_len(s, what, BOOT_PARAM_KEY_MAX)?;
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(invalid(s, what, "letters, digits, '_', '.' and '-'"));
    }
    // The kernel hands everything after a bare `--` to init, and a leading '-' names no
    // parameter of either: `--` as a key would move every later parameter to init.
    if s.starts_with('-') {
        return Err(invalid(
            s,
            what,
            "it cannot start with '-' (\"--\" ends the kernel's own parameters)",
        ));
    }
    // Keel's initramfs reads every `keel.*` word of the command line (the slot, its root
    // hash and verity devices), kernel's or init's; `initrd=` is the boot loader's.
    if s.starts_with("keel.") || s == "initrd" {
        return Err(invalid(
            s,
            what,
            "keel.* and initrd are Keel's and the boot loader's own parameters",
        ));
    }
    Ok(())
}

validated_string! {
    /// A kernel or init command-line parameter name (`console`, `usbcore.quirks`): ASCII
    /// letters, digits, `_`, `.` and `-`, not starting with `-` (a bare `--` on the kernel
    /// command line ends the kernel's parameters), at most 128 bytes; not `keel.*` or
    /// `initrd` (Keel's and the boot loader's own).
    BootParamKey, check = check_boot_param_key,
    description = "A kernel or init command-line parameter name",
    format = None, pattern = Some("^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,127}$")
}

/// The longest kernel or init parameter value accepted.
pub const BOOT_PARAM_VALUE_MAX: usize = 256;

fn check_boot_param_value(s: &str) -> Result<(), String> {
    let what = "kernel or init parameter value";
    check_len(s, what, BOOT_PARAM_VALUE_MAX)?;
    // Printable ASCII only: the kernel splits its command line at bytes its ctype calls
    // space, and that includes 0xA0, which is inside the UTF-8 of many characters. No
    // quote or backslash either: systemd reads /proc/cmdline unquoting, and an unpaired
    // `'` or a `\` would join every later word into this one (PID 1 and udev would then
    // miss all later parameters, the init parameters after `--` too).
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"'\\".contains(&b))
    {
        return Err(invalid(
            s,
            what,
            "must be non-empty printable ASCII, without spaces, quotes, backslashes or control characters",
        ));
    }
    Ok(())
}

validated_string! {
    /// One value of a kernel or init command-line parameter: printable ASCII without
    /// spaces, `"`, `'` or `\`, at most 256 bytes.
    BootParamValue, check = check_boot_param_value,
    description = "A kernel or init command-line parameter value",
    format = None, pattern = Some("^[!#-&(-\\[\\]-~]{1,256}$")
}

fn check_numa_node(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(s, "NUMA node id", "a decimal number such as \"0\""));
    }
    Ok(())
}

validated_string! {
    /// A NUMA node id written as a decimal string (`"0"`, `"1"`).
    NumaNode, check = check_numa_node,
    description = "A NUMA node id",
    format = None, pattern = Some("^[0-9]{1,4}$")
}

const EVICTION_SIGNALS: &[&str] = &[
    "memory.available",
    "nodefs.available",
    "nodefs.inodesFree",
    "imagefs.available",
    "imagefs.inodesFree",
    "containerfs.available",
    "containerfs.inodesFree",
    "pid.available",
    "allocatableMemory.available",
];

fn check_eviction_signal(s: &str) -> Result<(), String> {
    if !EVICTION_SIGNALS.contains(&s) {
        return Err(format!(
            "{s:?} is not a kubelet eviction signal (expected one of {})",
            EVICTION_SIGNALS.join(", ")
        ));
    }
    Ok(())
}

validated_string! {
    /// A kubelet eviction signal (`memory.available`, `nodefs.available`, ...).
    EvictionSignal, check = check_eviction_signal,
    description = "A kubelet eviction signal such as memory.available",
    format = None, pattern = None
}

// ---------------------------------------------------------------------------------------
// Text

/// The longest single-line string accepted.
pub const SINGLE_LINE_MAX: usize = 4096;

/// That `s` is one line of text; an error names it as `name()` does.
fn check_one_line(s: &str, name: impl FnOnce() -> String) -> Result<(), String> {
    check_len(s, "single line of text", SINGLE_LINE_MAX)?;
    if let Some((offset, c)) = first_forbidden(s, &['\t']) {
        return Err(format!(
            "{} must be a single line (no newlines, control characters or noncharacters: U+{:04X} at byte {offset})",
            name(),
            u32::from(c)
        ));
    }
    Ok(())
}

fn check_single_line(s: &str) -> Result<(), String> {
    check_one_line(s, || format!("{s:?}"))
}

validated_string! {
    /// A line of text, at most 4096 bytes: no newline, return, NUL, ESC or other C0 or C1
    /// control character (tab is allowed), no DEL and no Unicode noncharacter.
    SingleLineString, check = check_single_line,
    description = "A single line of text (tabs allowed; no other control characters)",
    format = None, pattern = Some(concat!("^[^\\n", forbidden_class!(), "]*$"))
}

fn check_env_value(s: &str) -> Result<(), String> {
    // Not quoted: environment variables carry secrets (credential providers' keys), and
    // errors are logged and served by GET /boot.
    check_one_line(s, || "the value".to_owned())
}

/// An environment value read from a document: a value of another type is refused
/// without being quoted, as a secret's is.
fn deserialize_env_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    deserialize_secret(deserializer, "environment value")
}

/// What `Debug` shows of a value that may be a secret.
fn redacted(_: &str) -> &'static str {
    "<redacted>"
}

validated_string! {
    /// An environment variable's value: a [`SingleLineString`] that errors and `Debug`
    /// never show (such values often hold secrets).
    EnvValue, check = check_env_value,
    description = "A single line of text (tabs allowed; no other control characters)",
    format = None, pattern = Some(concat!("^[^\\n", forbidden_class!(), "]*$")),
    debug = redacted, read = deserialize_env_value
}

/// The longest message of the day accepted. Generous (Bottlerocket sets no limit, and
/// user-data written for it must not be refused for a long banner); the motd renders
/// linearly and the whole model is bounded by the store (4 MiB).
pub const MOTD_MAX: usize = 1024 * 1024;

fn check_motd(s: &str) -> Result<(), String> {
    check_len(s, "message of the day", MOTD_MAX)?;
    check_chars(s, "message of the day", &['\n', '\t'])
}

validated_string! {
    /// The message of the day, shown as is on login terminals: any lines of text up to
    /// 1 MiB, with newlines and tabs but no other control character (no ESC, so no
    /// ANSI CSI or OSC sequence; no return, no C1 control) and no Unicode noncharacter.
    Motd, check = check_motd,
    description = "Lines of text (newlines and tabs allowed; no other control characters, no escape sequences)",
    format = None, pattern = Some(concat!("^[^", forbidden_class!(), "]*$"))
}

/// Without quoting the value: base64 settings (container user-data, manifests) often
/// carry scripts and tokens, and a refusal reaches the boot's log.
fn check_base64(s: &str) -> Result<(), String> {
    base64_problem(s).map(|_| ())
}

validated_string! {
    /// Standard-alphabet base64 with padding.
    Base64, check = check_base64,
    description = "Base64 (standard alphabet, with padding)",
    format = None, pattern = Some("^[A-Za-z0-9+/]*={0,2}$")
}

impl Base64 {
    /// The decoded bytes (the value was checked when it was built).
    pub fn decode(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .unwrap_or_default()
    }
}

/// The longest PEM bundle accepted, in base64 characters: 96 KiB of PEM text, some 60
/// certificates.
pub const PEM_BUNDLE_MAX: usize = 128 * 1024;

/// The PEM labels a certificate bundle may hold.
const PEM_LABELS: &[&str] = &["CERTIFICATE", "TRUSTED CERTIFICATE"];

/// Why the decoded text of a PEM bundle is not one, if it is not.
///
/// RFC 7468: one or more `-----BEGIN <label>-----` ... `-----END <label>-----` blocks, each
/// label one of `labels`,
/// whose body is base64 (lines may be wrapped and end in CRLF), with explanatory text
/// allowed between them. The text may hold newline, return and tab, but no other control
/// character and no noncharacter. With `x509`, each certificate block must also parse as
/// an X.509 certificate ([`certificate_problem`]).
fn pem_problem(text: &str, labels: &[&str], x509: bool) -> Option<String> {
    if let Some((offset, c)) = first_forbidden(text, &['\n', '\r', '\t']) {
        return Some(format!(
            "the decoded text holds a control character or noncharacter: U+{:04X} at byte {offset}",
            u32::from(c)
        ));
    }
    let mut open: Option<(&str, usize, String)> = None;
    let mut blocks = 0usize;
    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.contains('\r') {
            return Some(format!(
                "line {number}: a return is only allowed before a newline"
            ));
        }
        let line = line.trim_matches([' ', '\t']);
        match open.take() {
            None => {
                let Some(rest) = line.strip_prefix("-----BEGIN ") else {
                    if line.starts_with("-----") {
                        return Some(format!("line {number}: {line:?} outside a BEGIN/END block"));
                    }
                    continue; // explanatory text
                };
                let label = rest.strip_suffix("-----").unwrap_or_default();
                if !labels.contains(&label) {
                    return Some(format!(
                        "line {number}: {line:?} does not begin a {} block",
                        labels.join(" or ")
                    ));
                }
                open = Some((label, number, String::new()));
            }
            Some((label, start, mut body)) => {
                if let Some(rest) = line.strip_prefix("-----END ") {
                    if rest.strip_suffix("-----") != Some(label) {
                        return Some(format!(
                            "line {number}: {line:?} does not end the {label} block of line {start}"
                        ));
                    }
                    let der = base64::engine::general_purpose::STANDARD.decode(&body);
                    let der = match der {
                        Ok(der) if !body.is_empty() => der,
                        _ => {
                            return Some(format!(
                                "the {label} block of line {start} does not hold base64 data"
                            ))
                        }
                    };
                    if let Some(why) = certificate_problem(label, &der).filter(|_| x509) {
                        return Some(format!(
                            "the {label} block of line {start} is not an X.509 certificate: {why}"
                        ));
                    }
                    blocks += 1;
                    continue;
                }
                let valid = line
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
                if !valid {
                    return Some(format!(
                        "line {number}: the {label} block of line {start} holds a line that is not base64"
                    ));
                }
                body.push_str(line);
                open = Some((label, start, body));
            }
        }
    }
    if let Some((label, start, _)) = open {
        return Some(format!("the {label} block of line {start} has no END line"));
    }
    if blocks == 0 {
        return Some(format!("it holds no -----BEGIN {}----- block", labels[0]));
    }
    None
}

/// Why the DER of a `CERTIFICATE` or `TRUSTED CERTIFICATE` block is not an X.509
/// certificate, if it is not; `None` for blocks of other labels.
///
/// Read as rustls reads a trust anchor (`webpki::anchor_from_trusted_cert`): the DER
/// framing of the whole certificate, its version (1 or 3, what CAs issue), and the tags
/// of its fields; not the contents of every field, and no signature, date or purpose,
/// which are the verifier's business. It catches what a PEM check cannot: base64 that is
/// no certificate, one cut short, one with bytes after it. OpenSSL's `TRUSTED
/// CERTIFICATE` is the certificate followed by its trust settings (`X509_CERT_AUX`, one
/// DER SEQUENCE, which OpenSSL allows to be absent); their contents are not read.
fn certificate_problem(label: &str, der: &[u8]) -> Option<String> {
    let certificate =
        match label {
            "CERTIFICATE" => der,
            "TRUSTED CERTIFICATE" => match first_der_element(der) {
                None => return Some("its DER length runs past its end or is malformed".to_owned()),
                Some((first, [])) => first,
                Some((first, aux)) => match first_der_element(aux) {
                    Some((settings, [])) if settings.first() == Some(&0x30) => first,
                    _ => return Some(
                        "what follows the certificate is not one DER SEQUENCE of trust settings"
                            .to_owned(),
                    ),
                },
            },
            _ => return None,
        };
    let certificate = rustls_pki_types::CertificateDer::from(certificate);
    // webpki's errors name the DER structure that did not parse (a version other than
    // 1 or 3 is `BadDer` too).
    webpki::anchor_from_trusted_cert(&certificate)
        .err()
        .map(|e| format!("malformed DER ({e:?})"))
}

/// Splits DER `bytes` after its first element (tag, definite length, contents): `None`
/// when the length is malformed or runs past the end.
fn first_der_element(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&first_length, rest) = bytes.get(1..)?.split_first()?;
    let (length, header) = if first_length < 0x80 {
        (usize::from(first_length), 2)
    } else {
        // Long form: the low bits say how many length bytes follow (at most 4 here: a
        // certificate is far below 4 GiB).
        let count = usize::from(first_length & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let length = rest
            .get(..count)?
            .iter()
            .fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, 2 + count)
    };
    let end = header.checked_add(length)?;
    (end <= bytes.len()).then(|| bytes.split_at(end))
}

fn check_pem_bundle(s: &str) -> Result<(), String> {
    let what = "PEM bundle";
    check_len(s, what, PEM_BUNDLE_MAX)?;
    check_base64(s)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("not base64 ({e})"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "the base64 is not a {what}: the decoded data is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    match pem_problem(&text, PEM_LABELS, false) {
        Some(why) => Err(format!("the base64 is not a {what}: {why}")),
        None => Ok(()),
    }
}

validated_string! {
    /// Base64 (standard alphabet, with padding) of a PEM certificate bundle: UTF-8 text
    /// with one or more `CERTIFICATE` or `TRUSTED CERTIFICATE` blocks and, between them,
    /// explanatory text without control characters (RFC 7468). At most 128 KiB of base64.
    PemBundle, check = check_pem_bundle,
    description = "Base64 of a PEM certificate bundle",
    format = None, pattern = Some("^[A-Za-z0-9+/]*={0,2}$")
}

impl PemBundle {
    /// Why a certificate of the bundle is not an X.509 certificate, if one is not.
    ///
    /// Not part of the type's own check: settings stored by an older keeld, which did
    /// not parse the certificates, must still read (every consumer reads the live
    /// settings through this type). The model checks it on what comes in instead: each
    /// patch (`model::check_incoming`, from `validate_patch`); not a commit, a rollback,
    /// a migration or the start check, which also read what is stored.
    pub fn x509_problem(&self) -> Option<String> {
        pem_problem(&self.decode(), PEM_LABELS, true)
    }

    /// The decoded PEM text (the value was checked when it was built).
    pub fn decode(&self) -> String {
        base64::engine::general_purpose::STANDARD
            .decode(&self.0)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------
// Network names and addresses

/// Why `s` is not an RFC 1123 host name, if it is not one.
fn hostname_problem(s: &str, allow_underscore: bool) -> Option<&'static str> {
    if s.is_empty() || s.len() > 253 {
        return Some("must be 1 to 253 characters");
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some("each dot-separated label must be 1 to 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || (allow_underscore && c == '_'))
        {
            return Some("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label cannot start or end with '-'");
        }
    }
    None
}

fn check_hostname(s: &str) -> Result<(), String> {
    match hostname_problem(s, false) {
        Some(why) => Err(invalid(s, "hostname", why)),
        None => Ok(()),
    }
}

validated_string! {
    /// An RFC 1123 host name.
    Hostname, check = check_hostname,
    description = "An RFC 1123 host name",
    format = Some("hostname"), pattern = None
}

fn check_dns_domain(s: &str) -> Result<(), String> {
    match hostname_problem(s, true) {
        Some(why) => Err(invalid(s, "DNS domain", why)),
        None => Ok(()),
    }
}

validated_string! {
    /// A DNS domain name (like a host name; `_` allowed in labels).
    DnsDomain, check = check_dns_domain,
    description = "A DNS domain name",
    format = Some("hostname"), pattern = None
}

fn check_ip(s: &str) -> Result<(), String> {
    match s.parse::<std::net::IpAddr>() {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("{s:?} is not an IP address")),
    }
}

validated_string! {
    /// An IPv4 or IPv6 address, kept as written.
    IpAddress, check = check_ip,
    description = "An IPv4 or IPv6 address",
    format = Some("ip"), pattern = None
}

impl IpAddress {
    /// The parsed address (the value was checked when it was built).
    pub fn addr(&self) -> Option<std::net::IpAddr> {
        self.0.parse().ok()
    }
}

/// The longest URL accepted.
pub const URL_MAX: usize = 2048;

/// Whether `c` may appear in a URI (RFC 3986): unreserved, reserved or `%`.
fn is_uri_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c)
}

fn check_url(s: &str) -> Result<(), String> {
    let what = "URL";
    check_len(s, what, URL_MAX)?;
    check_chars(s, what, &[])?;
    let url = url::Url::parse(s).map_err(|e| invalid(s, what, &e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(s, what, "the scheme must be http or https"));
    }
    if url.host_str().unwrap_or_default().is_empty() {
        return Err(invalid(s, what, "a host is required"));
    }
    // What the url crate would repair or percent-encode (spaces, quotes, backslashes,
    // non-ASCII) is refused, so that every reader of the string sees the same URL.
    if let Some(c) = s.chars().find(|&c| !is_uri_char(c)) {
        return Err(invalid(
            s,
            what,
            &format!("{c:?} is not allowed (only RFC 3986 characters; percent-encode others)"),
        ));
    }
    if !percent_escapes_are_whole(s) {
        return Err(invalid(
            s,
            what,
            "a % must start an escape of two hex digits (%25 for % itself)",
        ));
    }
    Ok(())
}

validated_string! {
    /// An absolute http or https URL with a valid host, at most 2048 bytes of RFC 3986
    /// characters (ASCII letters, digits and `-._~:/?#[]@!$&'()*+,;=%`).
    Url, check = check_url,
    description = "An absolute http:// or https:// URL",
    format = Some("uri"), pattern = Some("^https?://[-A-Za-z0-9._~:/?#\\[\\]@!$&'()*+,;=%]+$")
}

/// `s` with the user information of a proxy URL (`user:password@`) replaced by
/// `<redacted>`, for error text and `Debug`.
pub fn redact_userinfo(s: &str) -> String {
    let start = s.find("://").map_or(0, |i| i + 3);
    // The last '@': a password may hold a '/' or '@' that was not percent-encoded.
    match s[start..].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &s[..start], &s[start + at..]),
        None => s.to_owned(),
    }
}

fn check_proxy(s: &str) -> Result<(), String> {
    let what = "proxy address";
    // A proxy URL may carry a password: errors show the address without it.
    let shown = redact_userinfo(s);
    let bad = |why: &str| invalid(&shown, what, why);
    check_len(s, what, URL_MAX)?;
    let with_scheme = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().unwrap_or_default().is_empty() {
        return Err(bad("a host is required"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("only [scheme://]host[:port] is allowed"));
    }
    if s.chars().any(|c| c.is_whitespace() || is_forbidden_char(c)) {
        return Err(bad("spaces and control characters are not allowed"));
    }
    // containerd and the kubelet (Go) refuse what the url crate would repair: only
    // RFC 3986 characters, and `%` only as an escape. Which character is not said: it
    // may be in the password.
    if !s.chars().all(is_uri_char) {
        return Err(bad(
            "only RFC 3986 characters are allowed (ASCII letters, digits and -._~:/?#[]@!$&'()*+,;=%); percent-encode others",
        ));
    }
    if !percent_escapes_are_whole(s) {
        return Err(bad(
            "a % must start an escape of two hex digits (%25 for % itself)",
        ));
    }
    Ok(())
}

/// Whether each `%` in `s` is followed by two hex digits, as Go's URL parser demands.
fn percent_escapes_are_whole(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    })
}

validated_string! {
    /// An HTTP(S) proxy: `[http[s]://][user:pass@]host[:port]`; without a scheme it means
    /// `http://`. Kept exactly as written; `Debug` and errors leave out `user:pass`.
    ProxyAddress, check = check_proxy,
    description = "[http[s]://]host[:port]; no scheme means http://",
    format = None, pattern = None, debug = redact_userinfo
}

/// The longest no-proxy entry accepted.
pub const NO_PROXY_ENTRY_MAX: usize = 255;

fn check_no_proxy(s: &str) -> Result<(), String> {
    let what = "no-proxy entry";
    check_len(s, what, NO_PROXY_ENTRY_MAX)?;
    if s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || is_forbidden_char(c) || c == ',')
    {
        return Err(invalid(
            s,
            what,
            "a host, domain, IP or CIDR without spaces, commas or control characters",
        ));
    }
    Ok(())
}

validated_string! {
    /// One no-proxy entry: a host, domain (`.example.com`), IP or CIDR; no spaces, commas
    /// or control characters, at most 255 bytes.
    NoProxyEntry, check = check_no_proxy,
    description = "A host, domain, IP address or CIDR",
    format = None, pattern = Some(concat!("^[^\\s,", forbidden_class!(), "]+$"))
}

/// The longest time server accepted.
pub const TIME_SERVER_MAX: usize = 512;

/// Whether `host` is a host name, an IPv4 address or a bracketed IPv6 address.
fn is_server_host(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            host.parse::<std::net::Ipv4Addr>().is_ok() || hostname_problem(host, false).is_none()
        }
    }
}

/// Why `s` is not `scheme://host[:port][/path][?query][#fragment]`, if it is not.
///
/// The host is found the way chrony-conf's `url_host` filter finds it (the authority
/// ends at the first `/`, `?` or `#`; a port follows the last `:` outside brackets), and
/// user information is refused, so what is checked here is what reaches chrony.conf.
fn server_url_problem(s: &str) -> Option<&'static str> {
    let (scheme, rest) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Some("the URL scheme must be letters, digits, '+', '-' or '.'");
    }
    if !rest.chars().all(is_uri_char) {
        return Some("only RFC 3986 characters are allowed in a URL");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if authority.contains('@') {
        return Some("user information is not allowed");
    }
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok();
    if port.is_some_and(|p| !port_ok(p)) {
        return Some("the port must be a number from 0 to 65535");
    }
    if !is_server_host(host) {
        return Some("the URL has no valid host");
    }
    None
}

/// The port a `scheme://[userinfo@]host:port/…` URL names, if it names one (`None` for a
/// host or address alone: the model takes no `host:port` without a scheme). What
/// chrony-conf's `url_port` filter renders as chrony's `port` option.
pub fn url_port(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let after_host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or("", |(_, after)| after),
        None => authority.rsplit_once(':').map_or("", |(_, port)| port),
    };
    let port = after_host.strip_prefix(':').unwrap_or(after_host);
    (!port.is_empty()).then_some(port)
}

fn check_ntp_server(s: &str) -> Result<(), String> {
    let what = "time server";
    check_len(s, what, TIME_SERVER_MAX)?;
    check_chars(s, what, &[])?;
    if s.parse::<std::net::IpAddr>().is_ok() || hostname_problem(s, false).is_none() {
        return Ok(());
    }
    if s.contains("://") {
        url::Url::parse(s).map_err(|e| invalid(s, what, &e.to_string()))?;
        return match server_url_problem(s) {
            Some(why) => Err(invalid(s, what, why)),
            None => Ok(()),
        };
    }
    Err(invalid(
        s,
        what,
        "expected a host name, an IP address or a URL",
    ))
}

validated_string! {
    /// An NTP server: host name, IP address or URL such as `ntp://host[:port]` (no user
    /// information; RFC 3986 characters only), at most 512 bytes. Never a control
    /// character: its host is written into chrony.conf, one directive per line.
    TimeServer, check = check_ntp_server,
    description = "An NTP server: host name, IP address or URL",
    format = None, pattern = Some("^[-A-Za-z0-9._~:/?#\\[\\]@!$&'()*+,;=%]+$")
}

fn check_registry_host(s: &str) -> Result<(), String> {
    if s == "*" {
        return Ok(());
    }
    // As an image reference names it: containerd and keeld find a registry's mirrors and
    // credentials by the exact host[:port] (or `*`), so any other spelling (a wildcard
    // such as `*.example.com`, an IPv6 address without brackets) would never be used.
    let expected = "expected \"*\" or host[:port] as image references name it (a host name, \
                    an IPv4 address, or an IPv6 address in brackets; no wildcards)";
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p)),
        _ => (s, None),
    };
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(invalid(
                s,
                "registry",
                "the port must be a number from 0 to 65535",
            ));
        }
    }
    let ipv6 = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
    if ipv6 || hostname_problem(host, false).is_none() || host.parse::<std::net::Ipv4Addr>().is_ok()
    {
        return Ok(());
    }
    Err(invalid(s, "registry", expected))
}

validated_string! {
    /// A registry host (`docker.io`, `registry.example.com:5000`) or `*` for all.
    RegistryHost, check = check_registry_host,
    description = "A registry host[:port], or * for every registry",
    format = None, pattern = None
}

// ---------------------------------------------------------------------------------------
// Image references (OCI distribution grammar)

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`
fn is_path_component(s: &str) -> bool {
    let bytes: Vec<char> = s.chars().collect();
    if bytes.is_empty() || !is_lower_alnum(bytes[0]) || !is_lower_alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_lower_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_lower_alnum(bytes[i]) {
            i += 1;
        }
        let sep: String = bytes[start..i].iter().collect();
        let ok = sep == "." || sep == "_" || sep == "__" || sep.chars().all(|c| c == '-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_domain(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p)),
        _ => (s, None),
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    hostname_problem(host, false).is_none()
}

fn is_tag(s: &str) -> bool {
    let mut chars = s.chars();
    let first = chars.next();
    s.len() <= 128
        && first.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn is_digest(s: &str) -> bool {
    let Some((algorithm, hex)) = s.split_once(':') else {
        return false;
    };
    let hex_ok = |len: usize| hex.len() == len && hex.bytes().all(|b| b.is_ascii_hexdigit());
    match algorithm {
        "sha256" => hex_ok(64) && !hex.bytes().any(|b| b.is_ascii_uppercase()),
        "sha512" => hex_ok(128) && !hex.bytes().any(|b| b.is_ascii_uppercase()),
        _ => false,
    }
}

/// The prefix of a local OCI archive source: `oci-archive:<absolute path>[:<tag>]`.
pub const OCI_ARCHIVE_PREFIX: &str = "oci-archive:";

/// Checks an `oci-archive:` source: an absolute, normalized path without `:` (which
/// separates the optional tag), then an optional tag.
fn archive_ref_problem(rest: &str) -> Option<&'static str> {
    let (path, tag) = match rest.split_once(':') {
        Some((p, t)) => (p, Some(t)),
        None => (rest, None),
    };
    if !path.starts_with('/') || path.len() < 2 {
        return Some(
            "oci-archive: needs an absolute path, e.g. oci-archive:/local/images/admin.tar",
        );
    }
    if path.len() > 4096 || path.chars().any(is_forbidden_char) {
        return Some("the archive path is too long or holds control characters");
    }
    if path.split('/').any(|c| c == ".." || c == ".") || path.contains("//") {
        return Some("the archive path must be normalized (no '.', '..' or '//')");
    }
    if tag.is_some_and(|t| !is_tag(t)) {
        return Some("the tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
    }
    None
}

/// Checks `s` against the distribution reference grammar (or the `oci-archive:` form);
/// `Err` holds the short why.
fn image_ref_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("empty");
    }
    if let Some(rest) = s.strip_prefix(OCI_ARCHIVE_PREFIX) {
        return archive_ref_problem(rest);
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        if !is_digest(d) {
            return Some("the digest must be sha256:<64 lowercase hex digits>");
        }
    }
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        if !is_tag(t) {
            return Some("the tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
        }
    }
    if name.len() > 255 {
        return Some("the name is longer than 255 characters");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 {
        let first = components[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            if !is_domain(first) {
                return Some("the registry host is not valid");
            }
            components.remove(0);
        }
    }
    for component in &components {
        if !is_path_component(component) {
            let lower = component.to_ascii_lowercase();
            if lower != *component && is_path_component(&lower) {
                return Some("repository names must be lowercase");
            }
            return Some(
                "expected [registry[:port]/]name[:tag][@digest] with lowercase letters, digits and . _ - separators",
            );
        }
    }
    None
}

fn check_image_ref(s: &str) -> Result<(), String> {
    match image_ref_problem(s) {
        Some(why) => Err(invalid(s, "image reference", why)),
        None => Ok(()),
    }
}

validated_string! {
    /// A container image reference, `[registry[:port]/]path[:tag][@sha256:<hex>]`, or
    /// a local OCI archive, `oci-archive:/path[:tag]`.
    ImageRef, check = check_image_ref,
    description = "A container image reference, e.g. public.ecr.aws/org/image:tag, or oci-archive:/path/to/image.tar",
    format = None, pattern = None
}

fn check_registry_image_ref(s: &str) -> Result<(), String> {
    if s.starts_with(OCI_ARCHIVE_PREFIX) {
        return Err(invalid(
            s,
            "registry image reference",
            "containerd's CRI pulls it from a registry: an oci-archive: path is not a reference it can use",
        ));
    }
    check_image_ref(s)
}

validated_string! {
    /// An image reference in a registry, `[registry[:port]/]path[:tag][@sha256:<hex>]`:
    /// an [`ImageRef`] that is not an `oci-archive:`, for what containerd's CRI pulls
    /// itself (the pod sandbox image).
    RegistryImageRef, check = check_registry_image_ref,
    description = "A container image reference in a registry, e.g. public.ecr.aws/org/image:tag",
    format = None, pattern = None
}

// ---------------------------------------------------------------------------------------
// Kubernetes grammars

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn is_k8s_name(s: &str) -> bool {
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && first_last_ok(s.chars().next())
        && first_last_ok(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn check_label_key(s: &str) -> Result<(), String> {
    let what = "Kubernetes label key";
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        let lower = prefix.to_ascii_lowercase();
        if lower != prefix || hostname_problem(prefix, false).is_some() {
            return Err(invalid(
                s,
                what,
                "the prefix must be a lowercase DNS subdomain",
            ));
        }
    }
    if !is_k8s_name(name) {
        return Err(invalid(
            s,
            what,
            "the name must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

validated_string! {
    /// A Kubernetes label key: `[prefix/]name`.
    LabelKey, check = check_label_key,
    description = "A Kubernetes label key: [dns-prefix/]name",
    format = None, pattern = None
}

fn check_label_value(s: &str) -> Result<(), String> {
    if s.is_empty() || is_k8s_name(s) {
        Ok(())
    } else {
        Err(invalid(
            s,
            "Kubernetes label value",
            "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
        ))
    }
}

validated_string! {
    /// A Kubernetes label value (may be empty).
    LabelValue, check = check_label_value,
    description = "A Kubernetes label value",
    format = None, pattern = Some("^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
}

fn check_taint(s: &str) -> Result<(), String> {
    let what = "taint";
    let Some((value, effect)) = s.rsplit_once(':') else {
        return Err(invalid(s, what, "expected value:Effect"));
    };
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(invalid(
            s,
            what,
            "the effect must be NoSchedule, PreferNoSchedule or NoExecute",
        ));
    }
    check_label_value(value).map_err(|_| invalid(s, what, "the value is not a valid label value"))
}

validated_string! {
    /// A node taint `value:Effect`, Effect one of NoSchedule, PreferNoSchedule, NoExecute.
    Taint, check = check_taint,
    description = "value:Effect with Effect one of NoSchedule, PreferNoSchedule, NoExecute",
    format = None, pattern = Some("^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?:(NoSchedule|PreferNoSchedule|NoExecute)$")
}

/// A quantity's scale: a power of ten (`k`, `m`, an exponent such as `e9`) or a power of
/// two (`Ki`, `Mi`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Decimal(i64),
    Binary(u32),
}

const QUANTITY_SUFFIXES: &[(&str, Scale)] = &[
    ("Ki", Scale::Binary(10)),
    ("Mi", Scale::Binary(20)),
    ("Gi", Scale::Binary(30)),
    ("Ti", Scale::Binary(40)),
    ("Pi", Scale::Binary(50)),
    ("Ei", Scale::Binary(60)),
    ("n", Scale::Decimal(-9)),
    ("u", Scale::Decimal(-6)),
    ("m", Scale::Decimal(-3)),
    ("k", Scale::Decimal(3)),
    ("M", Scale::Decimal(6)),
    ("G", Scale::Decimal(9)),
    ("T", Scale::Decimal(12)),
    ("P", Scale::Decimal(15)),
    ("E", Scale::Decimal(18)),
    ("", Scale::Decimal(0)),
];

/// Exponents beyond this are clamped: with at most 38 significant digits, any non-zero
/// number scaled this far is either far too large or not a whole number.
const EXPONENT_CLAMP: i64 = 100_000;

fn is_decimal(s: &str) -> bool {
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s, None),
    };
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    digits(whole)
        && match frac {
            Some(f) => digits(f),
            None => true,
        }
}

/// Splits a quantity into its decimal number and its scale; `None` when `s` is not a
/// quantity (`<decimal>[<exponent>|<suffix>]`). This is the one grammar of quantities.
fn split_quantity(s: &str) -> Option<(&str, Scale)> {
    if let Some((number, exponent)) = s.split_once(['e', 'E']) {
        let (negative, digits) = match exponent.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, exponent.strip_prefix('+').unwrap_or(exponent)),
        };
        if is_decimal(number) && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let magnitude = digits
                .parse::<i64>()
                .map_or(EXPONENT_CLAMP, |e| e.min(EXPONENT_CLAMP));
            let exponent = if negative { -magnitude } else { magnitude };
            return Some((number, Scale::Decimal(exponent)));
        }
    }
    QUANTITY_SUFFIXES.iter().find_map(|(suffix, scale)| {
        s.strip_suffix(suffix)
            .filter(|number| is_decimal(number))
            .map(|number| (number, *scale))
    })
}

fn is_quantity(s: &str) -> bool {
    split_quantity(s).is_some()
}

/// Why a quantity has no exact integer value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inexact {
    /// It has a fractional part.
    Fraction,
    /// It does not fit in 128 bits.
    TooLarge,
    /// More than 38 significant digits.
    TooPrecise,
}

/// `number` × 10^`exp10` × 2^`exp2`, exactly (`number` is a checked decimal).
fn exact_integer(number: &str, exp10: i64, exp2: u32) -> Result<u128, Inexact> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let frac_len = i64::try_from(frac.len()).map_err(|_| Inexact::TooPrecise)?;
    let mut exp10 = exp10 - frac_len;
    let digits: String = whole.chars().chain(frac.chars()).collect();
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Ok(0);
    }
    let significant = digits.trim_end_matches('0');
    exp10 += i64::try_from(digits.len() - significant.len()).map_err(|_| Inexact::TooLarge)?;
    if significant.len() > 38 {
        return Err(Inexact::TooPrecise);
    }
    let mantissa: u128 = significant.parse().map_err(|_| Inexact::TooPrecise)?;
    if exp10 >= 0 {
        let power = u32::try_from(exp10)
            .ok()
            .and_then(|e| 10u128.checked_pow(e))
            .ok_or(Inexact::TooLarge)?;
        return mantissa
            .checked_mul(power)
            .and_then(|v| v.checked_mul(2u128.checked_pow(exp2)?))
            .ok_or(Inexact::TooLarge);
    }
    // Divide by 10^k = 2^k × 5^k, letting the binary scale cancel twos first. A divisor
    // too large for u128 is larger than the mantissa, which then is not a multiple of it.
    let k = u32::try_from(-exp10).map_err(|_| Inexact::Fraction)?;
    let cancelled = k.min(exp2);
    let divisor = 5u128
        .checked_pow(k)
        .and_then(|five| five.checked_mul(2u128.checked_pow(k - cancelled)?))
        .ok_or(Inexact::Fraction)?;
    let quotient = mantissa / divisor;
    if quotient * divisor != mantissa {
        return Err(Inexact::Fraction);
    }
    quotient
        .checked_mul(
            2u128
                .checked_pow(exp2 - cancelled)
                .ok_or(Inexact::TooLarge)?,
        )
        .ok_or(Inexact::TooLarge)
}

/// The smallest CPU limit: the kernel's smallest CFS quota is 1 ms per period, and a
/// container's period is 100 ms.
pub const MIN_CPU_MILLICORES: u64 = 10;

/// The largest CPU limit: one million CPUs.
pub const MAX_CPU_MILLICORES: u64 = 1_000_000_000;

/// Why a memory or CPU quantity cannot be a container limit. The text never holds the
/// value itself (the caller names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("expected a number of bytes with an optional suffix such as 512Mi, 1Gi, 100M or 1e9")]
    MemorySyntax,
    #[error("expected a number of CPUs such as 2 or 0.5, or millicores such as 500m")]
    CpuSyntax,
    #[error("a limit of zero cannot be enforced; leave the setting unset for no limit")]
    Zero,
    #[error("not a whole number of bytes")]
    FractionOfByte,
    #[error(
        "not a whole number of bytes: 'm', 'u' and 'n' mean thousandths, millionths and \
         billionths; for megabytes write M or Mi"
    )]
    SubByteSuffix,
    #[error("finer than a millicore (1m)")]
    FractionOfMillicore,
    #[error(
        "binary suffixes such as Ki or Gi are for memory; a CPU limit is a number of CPUs \
         such as 2 or 0.5, or millicores such as 500m"
    )]
    BinaryCpuSuffix,
    #[error(
        "below the minimum of {MIN_CPU_MILLICORES}m: the smallest CPU quota is 1 ms per \
         100 ms"
    )]
    CpuTooSmall,
    #[error("more than the largest memory limit, {} bytes", i64::MAX)]
    MemoryTooLarge,
    #[error("more than the largest CPU limit, {} CPUs", MAX_CPU_MILLICORES / 1000)]
    CpuTooLarge,
    #[error("more than 38 significant digits")]
    TooPrecise,
}

/// A memory quantity in bytes: `512Mi` → 536870912, `1G` → 1000000000, `1e9`,
/// `5000m` → 5. Refuses what no memory limit can be: zero, a fraction of a byte, more
/// than `i64::MAX` (the OCI runtime spec's type).
pub fn memory_bytes(s: &str) -> Result<i64, QuantityError> {
    let (number, scale) = split_quantity(s).ok_or(QuantityError::MemorySyntax)?;
    let exact = match scale {
        Scale::Decimal(exp10) => exact_integer(number, exp10, 0),
        Scale::Binary(exp2) => exact_integer(number, 0, exp2),
    };
    let bytes = exact.map_err(|e| match e {
        Inexact::Fraction
            if matches!(scale, Scale::Decimal(x) if x < 0) && !s.contains(['e', 'E']) =>
        {
            QuantityError::SubByteSuffix
        }
        Inexact::Fraction => QuantityError::FractionOfByte,
        Inexact::TooLarge => QuantityError::MemoryTooLarge,
        Inexact::TooPrecise => QuantityError::TooPrecise,
    })?;
    match i64::try_from(bytes) {
        Ok(0) => Err(QuantityError::Zero),
        Ok(bytes) => Ok(bytes),
        Err(_) => Err(QuantityError::MemoryTooLarge),
    }
}

/// A CPU quantity in millicores: `500m` → 500, `2` → 2000, `1.5` → 1500, `2k` →
/// 2000000. Refuses binary suffixes, zero, less than [`MIN_CPU_MILLICORES`], a fraction
/// of a millicore and more than [`MAX_CPU_MILLICORES`].
pub fn cpu_millicores(s: &str) -> Result<u64, QuantityError> {
    let (number, scale) = split_quantity(s).ok_or(QuantityError::CpuSyntax)?;
    let Scale::Decimal(exp10) = scale else {
        return Err(QuantityError::BinaryCpuSuffix);
    };
    let millicores = exact_integer(number, exp10.saturating_add(3), 0).map_err(|e| match e {
        Inexact::Fraction => QuantityError::FractionOfMillicore,
        Inexact::TooLarge => QuantityError::CpuTooLarge,
        Inexact::TooPrecise => QuantityError::TooPrecise,
    })?;
    match u64::try_from(millicores) {
        Ok(0) => Err(QuantityError::Zero),
        Ok(m) if m < MIN_CPU_MILLICORES => Err(QuantityError::CpuTooSmall),
        Ok(m) if m <= MAX_CPU_MILLICORES => Ok(m),
        _ => Err(QuantityError::CpuTooLarge),
    }
}

fn check_quantity(s: &str) -> Result<(), String> {
    if is_quantity(s) {
        Ok(())
    } else {
        Err(invalid(
            s,
            "quantity",
            "a number with an optional suffix such as 500m, 2, 100Mi or 1Gi",
        ))
    }
}

validated_string! {
    /// A Kubernetes resource quantity: `500m`, `2`, `100Mi`, `1Gi`. Kept as text for
    /// the files rendered from it; container limits use [`MemoryQuantity`] and
    /// [`CpuQuantity`], which convert.
    Quantity, check = check_quantity,
    description = "A resource quantity such as 500m, 2, 100Mi or 1Gi",
    format = None, pattern = Some("^[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
}

/// A quantity with the value it converts to, checked once when it is built.
macro_rules! converted_quantity {
    (
        $(#[$doc:meta])*
        $name:ident, value = $value:ty, convert = $convert:path, what = $what:expr,
        description = $desc:expr, pattern = $pattern:expr
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name {
            text: String,
            value: $value,
        }

        impl $name {
            /// Validates and converts `s`; the error is the reason text shown to users.
            pub fn new(s: impl Into<String>) -> Result<Self, String> {
                let text = s.into();
                match $convert(&text) {
                    Ok(value) => Ok(Self { text, value }),
                    Err(e) => Err(invalid(&text, $what, &e.to_string())),
                }
            }

            /// The string exactly as given.
            pub fn as_str(&self) -> &str {
                &self.text
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.text)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> String {
                stringify!($name).to_owned()
            }
            fn is_referenceable() -> bool {
                false
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                string_schema($desc, None, Some($pattern))
            }
        }
    };
}

converted_quantity! {
    /// A container memory limit: a quantity that is a whole number of bytes, at least
    /// one and at most `i64::MAX` (`512Mi`, `1G`, `1e9`).
    MemoryQuantity, value = i64, convert = memory_bytes, what = "memory limit",
    description = "A memory limit in bytes with an optional suffix, such as 512Mi, 1Gi or 100M",
    pattern = "^[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
}

impl MemoryQuantity {
    /// The limit in bytes (always at least 1).
    pub fn bytes(&self) -> i64 {
        self.value
    }
}

converted_quantity! {
    /// A container CPU limit: CPUs (`2`, `0.5`) or millicores (`500m`), a whole number of
    /// millicores from [`MIN_CPU_MILLICORES`] to [`MAX_CPU_MILLICORES`]; no binary suffixes.
    CpuQuantity, value = u64, convert = cpu_millicores, what = "CPU limit",
    description = "A CPU limit: CPUs such as 2 or 0.5, or millicores such as 500m (at least 10m)",
    pattern = "^[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+|n|u|m|k|M|G|T|P|E)?$"
}

impl CpuQuantity {
    /// The limit in millicores (always within the bounds above).
    pub fn millicores(&self) -> u64 {
        self.value
    }
}

fn check_threshold(s: &str) -> Result<(), String> {
    if let Some(number) = s.strip_suffix('%') {
        let in_range = number
            .parse::<f64>()
            .is_ok_and(|p| (0.0..=100.0).contains(&p));
        if is_decimal(number) && in_range {
            return Ok(());
        }
        return Err(invalid(
            s,
            "eviction threshold",
            "a percentage must be 0% to 100%",
        ));
    }
    if let Some((number, _)) = split_quantity(s) {
        // The kubelet refuses a threshold of zero ("must be positive"): 0% is how to
        // say none.
        if number.bytes().all(|b| b == b'0' || b == b'.') {
            return Err(invalid(
                s,
                "eviction threshold",
                "a quantity must be above zero (the kubelet refuses 0; 0% means no threshold)",
            ));
        }
        return Ok(());
    }
    Err(invalid(
        s,
        "eviction threshold",
        "expected a percentage such as 15% or a quantity such as 100Mi",
    ))
}

validated_string! {
    /// An eviction threshold: a percentage (`15%`) or a quantity (`100Mi`).
    Threshold, check = check_threshold,
    description = "A percentage such as 15% or a quantity such as 100Mi",
    format = None, pattern = None
}

fn check_duration(s: &str) -> Result<(), String> {
    parse_duration(s).map(|_| ())
}

/// The most a [`Duration`] may be: Go's limit (an `int64` of nanoseconds, about 292
/// years), so that a value Bottlerocket's tools accept is one Keel accepts, and no larger.
const MAX_DURATION_NANOS: u128 = i64::MAX as u128;

/// A Go-syntax duration (`30s`, `1.5h`, `1h30m`, `0`): its length, or why it is not one.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || {
        invalid(
            s,
            "duration",
            "expected number+unit parts such as 30s, 5m, 12h or 1h30m (units ns, us, ms, s, m, h)",
        )
    };
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let too_long = || invalid(s, "duration", "longer than 2562047h (Go's limit)");
    let mut rest = s;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number = &rest[..number_len];
        if !is_decimal(number) {
            return Err(bad());
        }
        rest = &rest[number_len..];
        let (unit, per_unit) = [
            ("ns", 1u128),
            ("us", 1_000),
            ("µs", 1_000),
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")))
        .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = whole.parse().map_err(|_| too_long())?;
        // Digits beyond the 18th are below a nanosecond for every unit: dropped, as Go
        // drops them.
        let fraction = &fraction[..fraction.len().min(18)];
        let scale = 10u128.pow(u32::try_from(fraction.len()).unwrap_or(18));
        let fraction: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| bad())?
        };
        let part = whole
            .checked_mul(per_unit)
            .and_then(|w| w.checked_add(fraction * per_unit / scale))
            .ok_or_else(too_long)?;
        nanos = nanos.checked_add(part).ok_or_else(too_long)?;
        if nanos > MAX_DURATION_NANOS {
            return Err(too_long());
        }
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_long())?;
    let subsec = u32::try_from(nanos % 1_000_000_000).map_err(|_| too_long())?;
    Ok(std::time::Duration::new(secs, subsec))
}

validated_string! {
    /// A duration in Go syntax: `30s`, `5m`, `12h`, `1h30m`.
    Duration, check = check_duration,
    description = "A duration such as 30s, 5m, 12h or 1h30m",
    format = None, pattern = Some("^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$|^0$")
}

impl Duration {
    /// The length this duration names, as the runtime uses it. Every validated value
    /// has one (validation parses it the same way); the error is for a value that
    /// bypassed validation.
    pub fn to_std(&self) -> Result<std::time::Duration, String> {
        parse_duration(self.as_str())
    }
}

fn check_sysctl_key(s: &str) -> Result<(), String> {
    let what = "sysctl key";
    if s.is_empty() || s.len() > 256 {
        return Err(invalid(s, what, "must be 1 to 256 characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c))
    {
        return Err(invalid(
            s,
            what,
            "only letters, digits, '_', '-', '.' and '/' are allowed",
        ));
    }
    let separator = |c: char| c == '.' || c == '/';
    if s.starts_with(separator)
        || s.ends_with(separator)
        || s.split(separator)
            .any(|part| part.is_empty() || part == "..")
    {
        return Err(invalid(s, what, "empty parts are not allowed"));
    }
    // systemd-sysctl reads a leading '-' as "ignore errors for this key", not as part of
    // the key: the rendered line would mean something else than the setting.
    if s.starts_with('-') {
        return Err(invalid(s, what, "must not start with '-'"));
    }
    Ok(())
}

validated_string! {
    /// A sysctl key such as `vm.max_map_count` (`/` separators accepted too).
    SysctlKey, check = check_sysctl_key,
    description = "A sysctl key such as vm.max_map_count",
    format = None, pattern = Some("^[A-Za-z0-9_][A-Za-z0-9_-]*([./][A-Za-z0-9_-]+)*$")
}

/// The Linux capability names, without the `CAP_` prefix.
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

fn check_capability(s: &str) -> Result<(), String> {
    let name = s.strip_prefix("CAP_").unwrap_or(s);
    if CAPABILITIES.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a Linux capability (expected a name such as NET_ADMIN or CAP_NET_ADMIN)"
        ))
    }
}

validated_string! {
    /// A Linux capability name (`NET_ADMIN`; a `CAP_` prefix is accepted).
    Capability, check = check_capability,
    description = "A Linux capability name such as NET_ADMIN",
    format = None, pattern = Some("^(CAP_)?[A-Z_]+$")
}

impl Capability {
    /// The name with the `CAP_` prefix, as the OCI runtime spec writes it.
    pub fn with_cap_prefix(&self) -> String {
        if self.0.starts_with("CAP_") {
            self.0.clone()
        } else {
            format!("CAP_{}", self.0)
        }
    }
}

fn check_aws_region(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split('-').collect();
    // The first part is not always two letters: `eusc-de-east-1` (the European
    // Sovereign Cloud) is a region too.
    let ok = parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            s,
            "AWS region",
            "expected a name such as us-west-2",
        ))
    }
}

validated_string! {
    /// An AWS region name such as `us-west-2`.
    AwsRegion, check = check_aws_region,
    description = "An AWS region such as us-west-2",
    format = None, pattern = Some("^[a-z]+(-[a-z]+)+-[0-9]+$")
}

// ---------------------------------------------------------------------------------------
// Secrets: passwords, tokens and credential files. Their values never appear in `Debug`
// or in an error (errors are logged, and served by GET /boot); `Serialize` writes the
// real value, which the store keeps.

/// The reason a secret was refused: what it should be, never the value.
fn secret_invalid(what: &str, why: &str) -> String {
    format!("not a valid {what}: {why} (value redacted)")
}

/// Reads the string of a secret. A value of another type is refused without being
/// quoted (serde's own message would quote a number).
fn deserialize_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
    what: &'static str,
) -> Result<String, D::Error> {
    use serde::de::Unexpected;

    struct SecretVisitor(&'static str);

    impl SecretVisitor {
        fn refuse<E: serde::de::Error>(&self, kind: &'static str) -> E {
            E::invalid_type(Unexpected::Other(kind), self)
        }
    }

    impl serde::de::Visitor<'_> for SecretVisitor {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a string ({})", self.0)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<String, E> {
            Err(self.refuse("a boolean (value redacted)"))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<String, E> {
            Err(self.refuse("a number (value redacted)"))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<String, E> {
            Err(self.refuse("a number (value redacted)"))
        }
        fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<String, E> {
            Err(self.refuse("a number (value redacted)"))
        }
        fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<String, E> {
            Err(self.refuse("a number (value redacted)"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<String, E> {
            Err(self.refuse("a number (value redacted)"))
        }
        fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<String, E> {
            Err(self.refuse("bytes (value redacted)"))
        }
    }

    deserializer.deserialize_any(SecretVisitor(what))
}

macro_rules! secret_string {
    (
        $(#[$doc:meta])*
        $name:ident, parsed = $parsed:ty, check = $check:path, what = $what:expr,
        description = $desc:expr, pattern = $pattern:expr
    ) => {
        $(#[$doc])*
        ///
        /// A secret: `Debug` and every error about it leave the value out.
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub struct $name {
            text: String,
            #[allow(dead_code)]
            parsed: $parsed,
        }

        impl $name {
            /// Validates `s`; the error says what is wrong without quoting the value.
            pub fn new(s: impl Into<String>) -> Result<Self, String> {
                let text = s.into();
                match $check(&text) {
                    Ok(parsed) => Ok(Self { text, parsed }),
                    Err(why) => Err(secret_invalid($what, &why)),
                }
            }

            /// The secret exactly as given. Never log or format it.
            pub fn expose_secret(&self) -> &str {
                &self.text
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.text)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = deserialize_secret(deserializer, $what)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> String {
                stringify!($name).to_owned()
            }
            fn is_referenceable() -> bool {
                false
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                string_schema($desc, None, $pattern)
            }
        }
    };
}

fn check_secret_line(s: &str) -> Result<(), String> {
    if s.chars().any(|c| c.is_control() && c != '\t') {
        return Err("it must be a single line (no newlines or control characters)".to_owned());
    }
    Ok(())
}

secret_string! {
    /// A single-line secret: a registry password or identity token.
    SecretString, parsed = (), check = check_secret_line, what = "secret",
    description = "A secret on a single line", pattern = Some("^[^\\n\\r]*$")
}

/// Why `s` is not standard base64 with padding, without quoting any of it.
fn base64_problem(s: &str) -> Result<Vec<u8>, String> {
    use base64::DecodeError as E;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| match e {
            E::InvalidByte(offset, _) => {
                format!("not base64 (invalid character at offset {offset})")
            }
            E::InvalidLength(_) => "not base64 (the length is not a multiple of 4)".to_owned(),
            E::InvalidLastSymbol(offset, _) => {
                format!("not base64 (invalid last symbol at offset {offset})")
            }
            E::InvalidPadding => "not base64 (invalid padding)".to_owned(),
        })
}

fn check_secret_base64(s: &str) -> Result<(), String> {
    base64_problem(s).map(drop)
}

secret_string! {
    /// Base64 of a secret document, such as an AWS credentials file.
    SecretBase64, parsed = (), check = check_secret_base64, what = "base64 secret",
    description = "Base64 (standard alphabet, with padding) of a secret",
    pattern = Some("^[A-Za-z0-9+/]*={0,2}$")
}

/// A registry `auth` value decoded: `(username, password)`.
fn check_registry_auth(s: &str) -> Result<(String, String), String> {
    let raw = base64_problem(s)?;
    let text = String::from_utf8(raw).map_err(|_| "the decoded text is not UTF-8".to_owned())?;
    let (username, password) = text
        .split_once(':')
        .ok_or_else(|| "the decoded text is not username:password".to_owned())?;
    Ok((username.to_owned(), password.to_owned()))
}

secret_string! {
    /// A registry `auth` value: base64 of `username:password`, decoded once here.
    RegistryAuth, parsed = (String, String), check = check_registry_auth,
    what = "registry auth",
    description = "Base64 of username:password",
    pattern = Some("^[A-Za-z0-9+/]*={0,2}$")
}

impl RegistryAuth {
    /// The decoded `(username, password)`. Never log or format them.
    pub fn expose_credentials(&self) -> (&str, &str) {
        (&self.parsed.0, &self.parsed.1)
    }
}

fn check_bootstrap_token(s: &str) -> Result<(), String> {
    let ok = s.split_once('.').is_some_and(|(id, secret)| {
        let lower = |p: &str| {
            p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        id.len() == 6 && secret.len() == 16 && lower(id) && lower(secret)
    });
    if ok {
        Ok(())
    } else {
        Err("expected [a-z0-9]{6}.[a-z0-9]{16}".to_owned())
    }
}

secret_string! {
    /// A Kubernetes bootstrap token `abcdef.0123456789abcdef`.
    BootstrapToken, parsed = (), check = check_bootstrap_token, what = "bootstrap token",
    description = "A Kubernetes bootstrap token",
    pattern = Some("^[a-z0-9]{6}\\.[a-z0-9]{16}$")
}

// ---------------------------------------------------------------------------------------
// One or many IP addresses

/// A single IP address or a list of at most [`IpOrIps::MAX`] (`cluster-dns-ip`), kept in
/// the form given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpOrIps {
    One(IpAddress),
    Many(Vec<IpAddress>),
}

impl IpOrIps {
    /// The most addresses a list holds (`cluster-dns-ip`: the kubelet writes them all
    /// into pods' resolv.conf, where only 3 are used).
    pub const MAX: usize = 16;

    /// The addresses as a list.
    pub fn to_vec(&self) -> Vec<IpAddress> {
        match self {
            IpOrIps::One(ip) => vec![ip.clone()],
            IpOrIps::Many(ips) => ips.clone(),
        }
    }
}

impl Serialize for IpOrIps {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            IpOrIps::One(ip) => ip.serialize(serializer),
            IpOrIps::Many(ips) => ips.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for IpOrIps {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IpOrIpsVisitor;
        impl<'de> serde::de::Visitor<'de> for IpOrIpsVisitor {
            type Value = IpOrIps;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or a list of IP addresses")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IpOrIps, E> {
                IpAddress::new(v).map(IpOrIps::One).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<IpOrIps, A::Error> {
                let mut ips = Vec::new();
                while let Some(ip) = seq.next_element::<IpAddress>()? {
                    if ips.len() == IpOrIps::MAX {
                        return Err(serde::de::Error::custom(format!(
                            "more than the limit of {} addresses for this setting",
                            IpOrIps::MAX
                        )));
                    }
                    ips.push(ip);
                }
                Ok(IpOrIps::Many(ips))
            }
        }
        deserializer.deserialize_any(IpOrIpsVisitor)
    }
}

impl JsonSchema for IpOrIps {
    fn schema_name() -> String {
        "IpOrIps".to_owned()
    }
    fn is_referenceable() -> bool {
        false
    }
    fn json_schema(gen: &mut SchemaGenerator) -> Schema {
        let one = IpAddress::json_schema(gen);
        let mut many = <Vec<IpAddress>>::json_schema(gen);
        if let Schema::Object(list) = &mut many {
            list.array().max_items = u32::try_from(IpOrIps::MAX).ok();
        }
        SchemaObject {
            subschemas: Some(Box::new(schemars::schema::SubschemaValidation {
                any_of: Some(vec![one, many]),
                ..Default::default()
            })),
            metadata: Some(Box::new(Metadata {
                description: Some("An IP address or a list of IP addresses".to_owned()),
                ..Metadata::default()
            })),
            ..SchemaObject::default()
        }
        .into()
    }
}

// ---------------------------------------------------------------------------------------
// The grammars of the settings Bottlerocket's variants add (declared last: the module uses
// the macros above).

mod bottlerocket;
pub use bottlerocket::*;
