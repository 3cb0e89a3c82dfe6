//! packaging/defaults.toml is valid user-data and every template renders from it.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use keel_agent::apply::render::Templates;
use keel_agent::apply::ServicesMeta;

fn packaging() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

#[test]
fn defaults_validate_and_render_every_file() {
    let text = std::fs::read_to_string(packaging().join("defaults.toml")).unwrap();
    let patch = settings_model::userdata::parse_user_data("defaults.toml", &text).unwrap();
    let settings = settings_model::validate(&patch).unwrap();
    assert_eq!(settings["host-containers"]["admin"]["enabled"], false);
    let meta = ServicesMeta::load(&packaging().join("services.toml")).unwrap();
    let templates = Templates::load(&packaging().join("templates")).unwrap();
    let os = serde_json::json!({"arch": "x86_64", "build_id": "t", "pretty_name": "Keel", "variant_id": "t", "version_id": "0"});
    for (name, file) in &meta.configuration_files {
        templates
            .render(&file.template_path, &settings, &os)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
