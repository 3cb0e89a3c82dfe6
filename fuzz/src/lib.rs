//! The checks behind Keel's fuzz targets: one function per target, each taking arbitrary
//! bytes.
//!
//! A check panics only when Keel misbehaves: a parser that panics, or a property that
//! must hold for every input Keel accepts and does not. Input that is not UTF-8 is read
//! lossily (U+FFFD for each bad sequence), as text from the outside world would be.
//!
//! The fuzz targets (`fuzz_targets/*.rs`) call these functions, and
//! `tests/tests/fuzz_regressions.rs` includes this file to replay the committed corpus
//! (`fuzz/corpus/<target>/`) through the very same functions, so `cargo test` exercises
//! it. Keep this file free of `unwrap()`: the test crate denies it.

use keel_agent::containers::oci::{self, Document, ImageConfiguration, ImageSource};
use serde_json::{Map, Value};
use settings_model::types::{ImageRef, OCI_ARCHIVE_PREFIX};
use settings_model::{keypair, patch, schema, userdata, KeyPath, Settings};

/// The source name user-data is parsed under (it only appears in error messages).
const SOURCE: &str = "fuzz";

/// The check of one fuzz target.
pub type Check = fn(&[u8]);

/// The fuzz targets by name, as `fuzz_targets/<name>.rs` and `corpus/<name>/` name them.
pub const TARGETS: [(&str, Check); 6] = [
    ("user_data", user_data),
    ("settings_patch", settings_patch),
    ("key_path", key_path),
    ("key_value", key_value),
    ("image_ref", image_ref),
    ("imds_response", imds_response),
];

/// `imds_response`: what keeld does with an IMDS user-data body: gunzip when it is gzip
/// (bounded), then UTF-8, then `parse_user_data`; nothing panics, and what decodes is
/// never more than the limit.
pub fn imds_response(data: &[u8]) {
    match keel_agent::boot::imds::decode_user_data(data.to_vec()) {
        Ok(decoded) => {
            assert!(decoded.len() <= keel_agent::boot::imds::MAX_USER_DATA);
            if let Ok(text) = String::from_utf8(decoded) {
                let _ = userdata::parse_user_data(SOURCE, &text);
            }
        }
        Err(e) => {
            // The message is for logs: it must not echo the body.
            let _ = e.to_string();
        }
    }
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// `user_data`: `parse_user_data` on any text. What it accepts is a valid patch, and
/// writing it back as a JSON user-data document parses to the same patch.
pub fn user_data(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let patch = match userdata::parse_user_data(SOURCE, &text) {
        Ok(patch) => patch,
        Err(error) => {
            let _ = error.to_string();
            return;
        }
    };
    if let Err(error) = settings_model::validate_patch(&patch) {
        panic!(
            "parse_user_data accepted a patch that validate_patch refuses: {error}\npatch: {patch}"
        );
    }
    let mut document = Map::new();
    document.insert("settings".to_owned(), patch.clone());
    let written = serde_json::to_string(&Value::Object(document))
        .unwrap_or_else(|e| panic!("cannot serialize an accepted patch: {e}"));
    let again = userdata::parse_user_data(SOURCE, &written).unwrap_or_else(|e| {
        panic!("user-data written back as JSON is refused: {e}\ndocument: {written}")
    });
    assert_eq!(
        again, patch,
        "user-data written back as JSON parses to another patch\ndocument: {written}"
    );
    check_valid_patch(&patch);
}

/// `settings_patch`: any JSON value as a merge-patch. A patch `validate_patch` accepts,
/// merged onto the empty model, validates, deserializes into [`Settings`], and its
/// canonical form is stable (see [`check_valid_patch`]).
pub fn settings_patch(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match settings_model::validate_patch(&value) {
        Ok(()) => check_valid_patch(&value),
        Err(error) => {
            let _ = error.to_string();
        }
    }
    // The same value as a complete model rather than a patch.
    match settings_model::validate(&value) {
        Ok(canonical) => check_canonical(&canonical),
        Err(error) => {
            let _ = error.to_string();
        }
    }
    if let Value::Object(members) = &value {
        let groups = members.keys().cloned().collect();
        let _ = settings_model::validate_groups(&value, &groups);
    }
}

/// What must hold for a patch `validate_patch` accepted.
fn check_valid_patch(patch_value: &Value) {
    let mut merged = empty_object();
    patch::merge_patch(&mut merged, patch_value);
    let canonical = settings_model::validate(&merged).unwrap_or_else(|e| {
        panic!("a valid patch merged onto {{}} does not validate: {e}\npatch: {patch_value}")
    });
    let typed: Settings = serde_json::from_value(merged.clone()).unwrap_or_else(|e| {
        panic!("a valid patch merged onto {{}} does not deserialize into Settings: {e}\nmodel: {merged}")
    });
    let typed_json =
        serde_json::to_value(&typed).unwrap_or_else(|e| panic!("Settings does not serialize: {e}"));
    assert_eq!(
        typed_json, canonical,
        "validate disagrees with deserializing into Settings"
    );
    check_canonical(&canonical);
    // Applying the patch to {} changes exactly the keys the patch names.
    let all = patch::changed_keys(&empty_object(), &canonical);
    let touched = patch::changed_keys_touched(&empty_object(), &canonical, &[patch_value]);
    assert_eq!(
        all, touched,
        "changed_keys_touched disagrees with changed_keys\npatch: {patch_value}"
    );
}

/// What must hold for the canonical JSON `validate` answered.
fn check_canonical(canonical: &Value) {
    let again = settings_model::validate(canonical)
        .unwrap_or_else(|e| panic!("a canonical model does not validate: {e}\nmodel: {canonical}"));
    assert_eq!(&again, canonical, "validate is not idempotent");
    // A patch is also held to the rules for incoming values that `validate` leaves to
    // what is stored (certificates parsed as X.509): only those may refuse it.
    if let Err(error) = settings_model::validate_patch(canonical) {
        let incoming = settings_model::model::incoming_problem(canonical).err();
        if incoming.as_ref() != Some(&error) {
            panic!("a canonical model is not a valid patch: {error}\nmodel: {canonical}");
        }
    }
    let flat = patch::flatten(canonical);
    let rebuilt = patch::unflatten(&flat);
    assert_eq!(
        &rebuilt, canonical,
        "unflatten(flatten(model)) is not the model\nflat: {flat:?}"
    );
}

/// `key_path`: `KeyPath::parse` on any text. A parsed key prints as text that parses
/// back to the same key, and prints the same again.
pub fn key_path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match KeyPath::parse(&text) {
        Ok(key) => {
            assert!(
                !key.segments().is_empty() && key.segments().iter().all(|s| !s.is_empty()),
                "a parsed key has an empty segment: {key:?}"
            );
            let shown = key.to_string();
            let back = KeyPath::parse(&shown).unwrap_or_else(|e| {
                panic!("{key:?} prints as {shown:?}, which does not parse: {e}")
            });
            assert_eq!(back, key, "{shown:?} parses to another key");
            assert_eq!(back.to_string(), shown, "printing is not stable");
            assert_eq!(
                KeyPath::from_segments(key.segments().to_vec()).as_ref(),
                Some(&key)
            );
            let _ = key.to_patch(Value::Bool(true));
            let _ = schema::kind_at(&key);
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
    if let Ok(key) = KeyPath::parse_setting(&text) {
        assert!(
            key.starts_with_settings(),
            "parse_setting lost the prefix: {key:?}"
        );
        let _ = schema::kind_at(&key);
    }
}

/// `key_value`: the `key=value` typing of `apiclient set` on any text. An accepted pair
/// names a `settings.` key, makes a valid one-key patch, and `pairs_to_patch` agrees.
pub fn key_value(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match keypair::parse_pair(&text) {
        Ok((key, value)) => {
            assert!(
                key.starts_with_settings(),
                "a pair's key lacks settings.: {key:?}"
            );
            let one = key.to_patch(value);
            if let Err(error) = settings_model::validate_patch(&one) {
                panic!("parse_pair accepted a pair whose patch is invalid: {error}\npatch: {one}");
            }
            // One pair is its own patch, removals (`null`) kept.
            let mut expected = empty_object();
            patch::compose_patch(&mut expected, &one);
            let merged = keypair::pairs_to_patch(&[text.to_string()]).unwrap_or_else(|e| {
                panic!("pairs_to_patch refuses a pair parse_pair accepts: {e}")
            });
            assert_eq!(merged, expected, "pairs_to_patch disagrees with parse_pair");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
    // Several pairs at once, one per line.
    let pairs: Vec<String> = text.lines().map(str::to_owned).collect();
    if let Ok(merged) = keypair::pairs_to_patch(&pairs) {
        if let Err(error) = settings_model::validate_patch(&merged) {
            panic!("pairs_to_patch made an invalid patch: {error}\npatch: {merged}");
        }
    }
}

/// `image_ref`: image references (`ImageRef::new`, `ImageSource::parse`) and OCI index /
/// manifest documents (`parse_document`, `select_platform`, the GC labels) from the same
/// bytes.
pub fn image_ref(data: &[u8]) {
    // A `&str` from here on: `Cow::as_ref` is ambiguous once a crate in the graph adds
    // another `AsRef` impl for `Cow<str>` (typed-path, through tough, does).
    let text = String::from_utf8_lossy(data);
    let text: &str = &text;
    let source = ImageSource::parse(text);
    match &source {
        ImageSource::Registry(name) => {
            assert_eq!(name.as_str(), text);
            assert!(!text.starts_with(OCI_ARCHIVE_PREFIX));
        }
        ImageSource::Archive { path, tag } => {
            let mut rebuilt = format!("{OCI_ARCHIVE_PREFIX}{path}");
            if let Some(tag) = tag {
                rebuilt.push(':');
                rebuilt.push_str(tag);
            }
            assert_eq!(rebuilt, text, "ImageSource::parse lost characters");
        }
    }
    assert_eq!(
        source.to_string(),
        text,
        "ImageSource does not print as written"
    );
    match ImageRef::new(text) {
        Ok(reference) => {
            assert_eq!(reference.as_str(), text);
            if let ImageSource::Archive { path, .. } = &source {
                assert!(
                    path.starts_with('/') && !path.contains(':'),
                    "a valid oci-archive reference has a bad path: {path:?}"
                );
            }
            let json = serde_json::to_value(&reference)
                .unwrap_or_else(|e| panic!("ImageRef does not serialize: {e}"));
            let back: ImageRef = serde_json::from_value(json)
                .unwrap_or_else(|e| panic!("a serialized ImageRef does not deserialize: {e}"));
            assert_eq!(back, reference);
        }
        Err(reason) => assert!(!reason.is_empty(), "an ImageRef error without a reason"),
    }

    match oci::parse_document(None, data) {
        Ok(Document::Index(index)) => {
            if let Some(chosen) = oci::select_platform(&index) {
                let (os, arch) = oci::host_platform();
                let platform = chosen.platform().as_ref().unwrap_or_else(|| {
                    panic!("select_platform chose a descriptor without platform")
                });
                assert_eq!(
                    (
                        platform.os().to_string(),
                        platform.architecture().to_string()
                    ),
                    (os.to_owned(), arch.to_owned())
                );
                let _ = oci::verify_digest(chosen.digest(), data);
            }
        }
        Ok(Document::Manifest(manifest)) => {
            let labels = oci::manifest_gc_labels(&manifest);
            assert!(labels.len() <= manifest.layers().len() + 1);
        }
        Err(_) => {}
    }
    if let Ok(config) = oci::parse_json::<ImageConfiguration>("image config", data) {
        assert!(oci::config_gc_labels(&config).len() <= 1);
    }
}
