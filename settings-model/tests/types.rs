//! Grammar of the validated newtypes.
#![allow(clippy::unwrap_used)]

use settings_model::types::{
    Base64, Capability, Duration, Hostname, Identifier, ImageRef, LabelKey, ProxyAddress, Quantity,
    SysctlKey, Taint, Threshold, TimeServer, Url,
};

#[test]
fn image_references() {
    for ok in [
        "alpine",
        "library/alpine:3.19",
        "public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.13",
        "localhost:5000/a/b__c.d-e",
        "localhost/img",
        "[::1]:5000/img:tag",
        "img@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "oci-archive:/local/images/admin.tar",
        "oci-archive:/local/images/admin.tar:v1.2",
    ] {
        assert!(ImageRef::new(ok).is_ok(), "{ok}");
    }
    let err = ImageRef::new("MY-CONTAINER-URI").unwrap_err();
    assert!(err.contains("repository names must be lowercase"), "{err}");
    for bad in [
        "<SOURCE>",
        "",
        "a:b:c",
        "img:",
        "img@sha256:abc",
        "a//b",
        "-a",
        "oci-archive:relative.tar",
        "oci-archive:/a/../etc/shadow",
        "oci-archive:/a.tar:bad tag",
        "oci-archive:",
    ] {
        let err = ImageRef::new(bad).unwrap_err();
        assert!(
            err.contains("is not a valid image reference"),
            "{bad}: {err}"
        );
    }
    assert_eq!(ImageRef::new("alpine:3").unwrap().as_str(), "alpine:3");
}

#[test]
fn identifiers() {
    assert!(Identifier::new("admin").is_ok());
    assert!(Identifier::new("a".repeat(76)).is_ok());
    for bad in ["", "a_b", "-a", "a-", "a--b", "a.b", &"a".repeat(77)] {
        assert!(Identifier::new(bad).is_err(), "{bad}");
    }
}

#[test]
fn urls_and_proxies() {
    assert!(Url::new("https://mirror.example.com/v2").is_ok());
    assert!(Url::new("https://<example-mirror>").is_err());
    assert!(Url::new("ftp://x.example.com").is_err());
    assert!(Url::new("mirror.example.com").is_err());
    for ok in [
        "1.2.3.4:8080",
        "proxy",
        "http://proxy:3128",
        "https://u:p@proxy.example.com",
        "http://u:it's%25@proxy:3128",
    ] {
        assert!(ProxyAddress::new(ok).is_ok(), "{ok}");
    }
    // The last four: what Go's URL parser (containerd, the kubelet) refuses though the
    // url crate repairs it.
    for bad in [
        "socks5://proxy:1080",
        "proxy:99999",
        "proxy:80/x",
        "pro xy",
        "http://u:p%ss@proxy:3128",
        "http://u:p\u{e4}@proxy:3128",
        "http://u:p{w@proxy:3128",
        "http://proxy:3128\\",
    ] {
        let refused = ProxyAddress::new(bad).expect_err(bad).to_string();
        assert!(
            !refused.contains("p%ss") && !refused.contains("p{w"),
            "{refused}"
        );
    }
    assert!(Url::new("https://mirror.example.com/a%2").is_err());
    assert!(Url::new("https://mirror.example.com/a%2Fb").is_ok());
}

#[test]
fn base64_values() {
    assert!(Base64::new("aGk=").is_ok());
    assert_eq!(Base64::new("aGk=").unwrap().decode(), b"hi");
    for bad in ["W3N...", "example_base64_encoded_auth_string", "aGk"] {
        let err = Base64::new(bad).unwrap_err();
        assert!(err.contains("not base64"), "{bad}: {err}");
    }
}

#[test]
fn hostnames_and_time_servers() {
    assert!(Hostname::new("node-1.example.com").is_ok());
    assert!(Hostname::new("a_b").is_err());
    assert!(Hostname::new("a".repeat(64)).is_err());
    for ok in [
        "2.amazon.pool.ntp.org",
        "ntp://time.example.org",
        "169.254.169.123",
        "fd00::1",
    ] {
        assert!(TimeServer::new(ok).is_ok(), "{ok}");
    }
    assert!(TimeServer::new("bad host").is_err());
}

#[test]
fn kubernetes_grammars() {
    assert!(LabelKey::new("kubernetes.io/role").is_ok());
    assert!(LabelKey::new("Example.com/x").is_err());
    assert!(LabelKey::new("-x").is_err());
    assert!(Taint::new("experimental:PreferNoSchedule").is_ok());
    assert!(Taint::new(":NoExecute").is_ok());
    assert!(Taint::new("x:Never").is_err());
    assert!(Taint::new("x").is_err());
    for ok in ["500m", "2", "100Mi", "1.5Gi", "1e3", "2Ei", "3E"] {
        assert!(Quantity::new(ok).is_ok(), "{ok}");
    }
    for bad in ["", "1.5.1Gi", "Mi", "-1", "10 Mi", "1GB"] {
        assert!(Quantity::new(bad).is_err(), "{bad}");
    }
    assert!(Threshold::new("15%").is_ok());
    assert!(Threshold::new("100Mi").is_ok());
    assert!(Threshold::new("101%").is_err());
}

#[test]
fn durations_sysctls_capabilities() {
    for ok in ["30s", "5m", "12h", "1h30m", "250ms", "0", "1.5h"] {
        assert!(Duration::new(ok).is_ok(), "{ok}");
    }
    for bad in ["", "30", "s", "1d", "1h 30m", "-1s"] {
        assert!(Duration::new(bad).is_err(), "{bad}");
    }
    assert!(SysctlKey::new("net.ipv4.ip_forward").is_ok());
    assert!(SysctlKey::new("net/ipv4/ip_forward").is_ok());
    assert!(SysctlKey::new(".vm").is_err());
    // systemd-sysctl's "ignore errors" marker is not part of a key.
    assert!(SysctlKey::new("-kernel.panic").is_err());
    assert!(SysctlKey::new("net.ipv4.conf.eth-0.rp_filter").is_ok());
    assert!(SysctlKey::new("vm x").is_err());
    assert!(Capability::new("NET_ADMIN").is_ok());
    assert_eq!(
        Capability::new("SYS_ADMIN").unwrap().with_cap_prefix(),
        "CAP_SYS_ADMIN"
    );
    assert!(Capability::new("CAP_BPF").is_ok());
    assert!(Capability::new("net_admin").is_err());
}

/// Every accepted duration has the length Go gives it, and the runtime reads that same
/// length (`Duration::to_std`): `1.5h` is not "no timeout".
#[test]
fn durations_mean_what_go_means() {
    use std::time::Duration as Std;
    for (text, expected) in [
        ("0", Std::ZERO),
        ("30s", Std::from_secs(30)),
        ("1h30m", Std::from_secs(5400)),
        ("1.5h", Std::from_secs(5400)),
        ("1.5m", Std::from_secs(90)),
        ("250ms", Std::from_millis(250)),
        ("1µs", Std::from_micros(1)),
        ("2us", Std::from_micros(2)),
        ("7ns", Std::from_nanos(7)),
        ("0.000000001s", Std::from_nanos(1)),
        // Below a nanosecond: dropped, as Go drops it.
        ("0.0000000019s", Std::from_nanos(1)),
        ("1m1m", Std::from_secs(120)),
        ("2562047h", Std::from_secs(2_562_047 * 3600)),
    ] {
        let d = Duration::new(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(d.to_std().unwrap(), expected, "{text}");
    }
    // Beyond Go's int64 of nanoseconds: refused, not wrapped or saturated.
    for too_long in [
        "2562048h",
        "9223372037s",
        "99999999999999999999999999999999999999999h",
        "2562047h2562047h",
    ] {
        let err = Duration::new(too_long)
            .err()
            .unwrap_or_else(|| panic!("{too_long} accepted"));
        assert!(err.to_string().contains("limit"), "{too_long}: {err}");
    }
}

#[test]
fn aws_regions_of_every_partition_are_accepted() {
    for region in [
        "us-west-2",
        "us-gov-west-1",
        "cn-north-1",
        "us-isob-east-1",
        "eusc-de-east-1",
    ] {
        settings_model::validate_patch(&serde_json::json!({"aws": {"region": region}}))
            .unwrap_or_else(|e| panic!("{region}: {e}"));
    }
    for bad in ["us-west", "US-west-2", "us--west-2", "west2", "us-west-2a"] {
        assert!(
            settings_model::validate_patch(&serde_json::json!({"aws": {"region": bad}})).is_err(),
            "{bad}"
        );
    }
}
