//! Secrets (registry passwords, auth and identity tokens, the bootstrap token, AWS
//! credentials, a proxy's password) never appear in an error or in `Debug`; `Serialize`
//! keeps the real value for the store.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use settings_model::types::{
    BootstrapToken, ProxyAddress, RegistryAuth, SecretBase64, SecretString,
};
use settings_model::{keypair, userdata};

const SECRET: &str = "Hunter2Secret";

fn assert_hidden(err: &settings_model::Error, key: &str) {
    let text = err.to_string();
    assert!(!text.contains(SECRET), "{text}");
    assert!(!text.contains("SGVudGVy"), "{text}"); // base64 of the secret's start
    assert!(text.contains("redacted"), "{text}");
    assert_eq!(err.key(), Some(key));
}

#[test]
fn a_bad_secret_is_never_echoed_in_the_error() {
    let cases = [
        (
            json!({"container-registry": {"credentials": [{"registry": "x.io", "password": format!("{SECRET}\n")}]}}),
            "settings.container-registry.credentials[0].password",
        ),
        (
            json!({"container-registry": {"credentials": [{"registry": "x.io", "identitytoken": format!("{SECRET}\u{1b}")}]}}),
            "settings.container-registry.credentials[0].identitytoken",
        ),
        (
            json!({"container-registry": {"credentials": [{"registry": "x.io", "auth": format!("{SECRET}%%")}]}}),
            "settings.container-registry.credentials[0].auth",
        ),
        (
            // Valid base64 ("Hunter2Secret") without the "username:password" colon.
            json!({"container-registry": {"credentials": [{"registry": "x.io", "auth": "SHVudGVyMlNlY3JldA=="}]}}),
            "settings.container-registry.credentials[0].auth",
        ),
        (
            json!({"kubernetes": {"bootstrap-token": format!("abcdef.{SECRET}")}}),
            "settings.kubernetes.bootstrap-token",
        ),
        (
            json!({"aws": {"credentials": format!("{SECRET}!")}}),
            "settings.aws.credentials",
        ),
    ];
    for (patch, key) in cases {
        let err = settings_model::validate_patch(&patch).unwrap_err();
        assert_hidden(&err, key);
    }
}

#[test]
fn a_secret_of_the_wrong_type_is_not_echoed_either() {
    let patch = json!({"kubernetes": {"bootstrap-token": 12_345_678_901_u64}});
    let err = settings_model::validate_patch(&patch).unwrap_err();
    assert!(!err.to_string().contains("12345678901"), "{err}");
    assert_eq!(err.key(), Some("settings.kubernetes.bootstrap-token"));
}

#[test]
fn user_data_and_key_value_errors_hide_secrets_too() {
    let doc = format!(
        "[settings.kubernetes]\nbootstrap-token = \"{SECRET}\"\n\n\
         [[settings.container-registry.credentials]]\nregistry = \"x.io\"\n"
    );
    let err = userdata::parse_user_data("user-data", &doc).unwrap_err();
    assert_hidden(&err, "settings.kubernetes.bootstrap-token");

    let err = keypair::parse_pair(&format!("kubernetes.bootstrap-token={SECRET}")).unwrap_err();
    assert_hidden(&err, "settings.kubernetes.bootstrap-token");
}

#[test]
fn a_proxy_password_is_not_echoed() {
    let err = settings_model::validate_patch(&json!({
        "network": {"https-proxy": format!("http://user:{SECRET}@proxy:notaport")}
    }))
    .unwrap_err();
    let text = err.to_string();
    assert!(!text.contains(SECRET), "{text}");
    assert!(text.contains("http://<redacted>@proxy:notaport"), "{text}");

    let proxy = ProxyAddress::new(format!("https://user:{SECRET}@proxy:3128")).unwrap();
    assert!(!format!("{proxy:?}").contains(SECRET));
    assert_eq!(proxy.as_str(), format!("https://user:{SECRET}@proxy:3128"));
}

#[test]
fn debug_hides_valid_secrets_and_serialize_keeps_them() {
    let value = json!({
        "container-registry": {"credentials": [{
            "registry": "x.io", "username": "robot", "password": SECRET,
            "identitytoken": SECRET, "auth": "cm9ib3Q6SHVudGVyMlNlY3JldA=="
        }]},
        "kubernetes": {"bootstrap-token": "abcdef.0123456789abcdef"},
        "aws": {"credentials": "SHVudGVyMlNlY3JldA=="}
    });
    let settings = settings_model::model::parse(&value).unwrap();
    let debug = format!("{settings:?}");
    for hidden in [
        SECRET,
        "cm9ib3Q6SHVudGVyMlNlY3JldA",
        "0123456789abcdef",
        "SHVudGVyMlNlY3JldA",
    ] {
        assert!(!debug.contains(hidden), "{hidden} in {debug}");
    }
    assert!(debug.contains("robot"), "{debug}");
    // The store keeps the real values.
    assert_eq!(serde_json::to_value(&settings).unwrap(), value);

    let auth = RegistryAuth::new("cm9ib3Q6SHVudGVyMlNlY3JldA==").unwrap();
    assert_eq!(auth.expose_credentials(), ("robot", SECRET));
    assert!(!format!("{auth:?}").contains("cm9ib3Q6"));
    for debug in [
        format!("{:?}", SecretString::new(SECRET).unwrap()),
        format!("{:?}", SecretBase64::new("SHVudGVyMlNlY3JldA==").unwrap()),
        format!(
            "{:?}",
            BootstrapToken::new("abcdef.0123456789abcdef").unwrap()
        ),
    ] {
        assert!(debug.ends_with("(<redacted>)"), "{debug}");
    }
}

/// Container user-data is base64 of scripts and tokens: a refusal (here the common
/// mistake, base64 wrapped at 76 columns) names the key and the offset, never the value.
#[test]
fn bad_container_user_data_is_not_quoted_in_the_error() {
    let wrapped = format!("{}\n{}", "SGVudGVyMlNlY3JldA".repeat(4), "SGVudGVy");
    for group in ["host-containers", "bootstrap-containers"] {
        let settings = json!({group: {"x": {
            "source": "public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.0",
            "user-data": wrapped}}});
        let err = settings_model::validate(&settings).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("SGVudGVy"), "{text}");
        assert!(text.contains("offset 72"), "{text}");
        assert_eq!(
            err.key(),
            Some(format!("settings.{group}.x.user-data").as_str())
        );
    }
}

/// Environment variables carry secrets (a credential provider's AWS keys): a value
/// refused for a newline is named by its key, never quoted.
#[test]
fn an_environment_value_is_not_echoed() {
    let cases = [
        (
            json!({"kubernetes": {"credential-providers": {"ecr-credential-provider": {
                "image-patterns": ["*.dkr.ecr.*.amazonaws.com"],
                "environment": {"AWS_SECRET_ACCESS_KEY": format!("{SECRET}\n")}
            }}}}),
            "settings.kubernetes.credential-providers.ecr-credential-provider.environment.AWS_SECRET_ACCESS_KEY",
        ),
        (
            json!({"host-containers": {"admin": {"environment": {"TOKEN": format!("{SECRET}\n")}}}}),
            "settings.host-containers.admin.environment.TOKEN",
        ),
        (
            json!({"bootstrap-containers": {"setup": {"environment": {"TOKEN": format!("{SECRET}\n")}}}}),
            "settings.bootstrap-containers.setup.environment.TOKEN",
        ),
    ];
    for (patch, key) in cases {
        let err = settings_model::validate_patch(&patch).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("must be a single line"), "{text}");
        assert_eq!(err.key(), Some(key), "{text}");
    }
}

/// Environment values often hold secrets: a value of the wrong type, or a malformed
/// `key=value` pair, is refused without being repeated, and `Debug` does not show one.
#[test]
fn environment_values_are_never_echoed() {
    let err = settings_model::validate(&json!({"host-containers": {"x": {
        "source": "public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.0",
        "environment": {"PIN": 918273645}}}}))
    .unwrap_err();
    assert!(!err.to_string().contains("918273645"), "{err}");
    assert_eq!(
        err.key(),
        Some("settings.host-containers.x.environment.PIN")
    );

    let err = keypair::parse_pair(&format!(
        "settings.host-containers.x.environment={{\"TOKEN\":\"{SECRET}\""
    ))
    .unwrap_err();
    assert!(!err.to_string().contains(SECRET), "{err}");
    // An unbalanced quote in the key hides the `=` from the split: still not echoed.
    let err = keypair::parse_pair(&format!("host-containers.\"a.environment.TOKEN={SECRET}"))
        .unwrap_err();
    assert!(!err.to_string().contains(SECRET), "{err}");

    let settings = settings_model::model::parse(&json!({"host-containers": {"x": {
        "source": "public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.0",
        "environment": {"TOKEN": SECRET}}}}))
    .unwrap();
    let debug = format!("{settings:?}");
    assert!(!debug.contains(SECRET), "{debug}");
}
