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

/// Bottlerocket user-data that only enables the ECR credential provider commits: the
/// defaults give it Bottlerocket's image patterns, which an enabled provider needs.
#[test]
fn enabling_the_ecr_credential_provider_alone_commits_over_the_defaults() {
    for file in ["defaults.toml", "image/defaults.toml"] {
        let text = std::fs::read_to_string(packaging().join(file)).unwrap();
        let mut settings = settings_model::userdata::parse_user_data(file, &text).unwrap();
        let user_data = settings_model::userdata::parse_user_data(
            "user-data",
            "[settings.kubernetes.credential-providers.ecr-credential-provider]\nenabled = true\n",
        )
        .unwrap();
        settings_model::patch::merge_patch(&mut settings, &user_data);
        let groups = ["kubernetes".to_owned()].into_iter().collect();
        settings_model::validate_groups(&settings, &groups)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}
