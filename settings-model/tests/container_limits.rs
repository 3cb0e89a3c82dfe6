//! Container memory and CPU limits convert exactly, or are refused where they are
//! written (PATCH, user-data, key=value) with an error naming the key.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use settings_model::types::{
    cpu_millicores, memory_bytes, CpuQuantity, Identifier, MemoryQuantity, Quantity,
};
use settings_model::Settings;

const NUMBERS: &[&str] = &[
    "0",
    "00",
    "0.0",
    "1",
    "5",
    "10",
    "100",
    "512",
    "1.5",
    "0.5",
    "0.25",
    "0.001",
    "0.0001",
    "00012",
    "1.000",
    "123456789",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551616",
    "99999999999999999999999999999999999999",
    "999999999999999999999999999999999999999",
    "0.000000000000000000000000000000000000000000001",
    "1.0000000000000000000000000000000000000000000000000001",
    "7",
    "8",
];

const TAILS: &[&str] = &[
    "",
    "Ki",
    "Mi",
    "Gi",
    "Ti",
    "Pi",
    "Ei",
    "n",
    "u",
    "m",
    "k",
    "M",
    "G",
    "T",
    "P",
    "E",
    "e0",
    "e3",
    "e-3",
    "E9",
    "e+2",
    "e18",
    "e19",
    "e-20",
    "e-9",
    "e40",
    "e-40",
    "e99999999999999999999999",
    "e-99999999999999999999999",
    "i",
    "K",
    "mi",
    "b",
    "e",
    "E-",
    " ",
    "%",
];

/// A small deterministic generator, for strings no list above thought of.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn string(&mut self) -> String {
        const ALPHABET: &[u8] = b"0123456789012345678901234567890.eE+-KMGTPEkmuni";
        let len = 1 + self.next() % 12;
        (0..len)
            .map(|_| {
                let i = usize::try_from(self.next()).unwrap() % ALPHABET.len();
                char::from(ALPHABET[i])
            })
            .collect()
    }
}

fn candidates() -> Vec<String> {
    let mut out: Vec<String> = NUMBERS
        .iter()
        .flat_map(|n| TAILS.iter().map(move |t| format!("{n}{t}")))
        .collect();
    let mut lcg = Lcg(0x6b65_656c);
    out.extend((0..20_000).map(|_| lcg.string()));
    out
}

/// The value of a quantity the model accepted, computed another way (floating point,
/// so only approximately): mantissa × the factor its suffix or exponent names.
fn approximate(s: &str) -> f64 {
    const FACTORS: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    if let Ok(plain) = s.parse::<f64>() {
        return plain; // digits, a fraction, an exponent
    }
    let (number, factor) = FACTORS
        .iter()
        .find_map(|(suffix, f)| s.strip_suffix(suffix).map(|n| (n, *f)))
        .unwrap();
    number.parse::<f64>().unwrap() * factor
}

fn close(exact: f64, approx: f64) -> bool {
    (exact - approx).abs() <= approx.abs() * 1e-9
}

fn limit_patch(key: &str, value: &str) -> Value {
    json!({"host-containers": {"a": {"enabled": true, "source": "x/y:1", key: value}}})
}

#[test]
fn every_memory_limit_the_model_accepts_converts_exactly() {
    let mut accepted = 0;
    for s in candidates() {
        let patch = limit_patch("memory-limit", &s);
        match settings_model::validate_patch(&patch) {
            Ok(()) => {
                accepted += 1;
                let settings: Settings = serde_json::from_value(patch).unwrap();
                let q = settings.host_containers.unwrap()[&Identifier::new("a").unwrap()]
                    .memory_limit
                    .clone()
                    .unwrap();
                assert_eq!(q.as_str(), s);
                assert_eq!(memory_bytes(&s), Ok(q.bytes()), "{s}");
                assert!(q.bytes() >= 1, "{s}");
                assert!(
                    close(q.bytes() as f64, approximate(&s)),
                    "{s}: {}",
                    q.bytes()
                );
            }
            Err(e) => {
                assert_eq!(e.key(), Some("settings.host-containers.a.memory-limit"));
                assert!(memory_bytes(&s).is_err(), "{s}");
                assert!(MemoryQuantity::new(s.as_str()).is_err(), "{s}");
            }
        }
    }
    assert!(
        accepted > 300,
        "only {accepted} accepted: the generator is too narrow"
    );
}

#[test]
fn every_cpu_limit_the_model_accepts_converts_exactly() {
    let mut accepted = 0;
    for s in candidates() {
        let patch = limit_patch("cpu-limit", &s);
        match settings_model::validate_patch(&patch) {
            Ok(()) => {
                accepted += 1;
                let settings: Settings = serde_json::from_value(patch).unwrap();
                let q = settings.host_containers.unwrap()[&Identifier::new("a").unwrap()]
                    .cpu_limit
                    .clone()
                    .unwrap();
                assert_eq!(cpu_millicores(&s), Ok(q.millicores()), "{s}");
                assert!((10..=1_000_000_000).contains(&q.millicores()), "{s}");
                let millis = approximate(&s) * 1000.0;
                assert!(
                    close(q.millicores() as f64, millis),
                    "{s}: {}",
                    q.millicores()
                );
                // A whole number of millicores, exactly.
                assert!((millis - millis.round()).abs() < 1e-6, "{s}");
            }
            Err(e) => {
                assert_eq!(e.key(), Some("settings.host-containers.a.cpu-limit"));
                assert!(CpuQuantity::new(s.as_str()).is_err(), "{s}");
            }
        }
    }
    assert!(
        accepted > 200,
        "only {accepted} accepted: the generator is too narrow"
    );
}

#[test]
fn limits_that_used_to_be_dropped_are_refused_with_the_reason() {
    for (key, value, why) in [
        ("memory-limit", "100m", "'m', 'u' and 'n' mean thousandths"),
        ("memory-limit", "5n", "not a whole number of bytes"),
        ("memory-limit", "5u", "not a whole number of bytes"),
        ("memory-limit", "1.5", "not a whole number of bytes"),
        ("memory-limit", "0", "leave the setting unset for no limit"),
        ("memory-limit", "8Ei", "largest memory limit"),
        ("memory-limit", "1e19", "largest memory limit"),
        ("cpu-limit", "2Gi", "binary suffixes"),
        ("cpu-limit", "0", "leave the setting unset for no limit"),
        ("cpu-limit", "5m", "below the minimum of 10m"),
        ("cpu-limit", "0.0005", "finer than a millicore"),
        ("cpu-limit", "2E", "largest CPU limit"),
    ] {
        let err = settings_model::validate_patch(&limit_patch(key, value)).unwrap_err();
        assert_eq!(
            err.key(),
            Some(format!("settings.host-containers.a.{key}").as_str())
        );
        assert!(err.reason().contains(why), "{value}: {err}");
        // The same values under bootstrap containers.
        let patch = json!({"bootstrap-containers": {"b": {key: value}}});
        let err = settings_model::validate_patch(&patch).unwrap_err();
        assert_eq!(
            err.key(),
            Some(format!("settings.bootstrap-containers.b.{key}").as_str())
        );
    }
    // The conversions themselves.
    assert_eq!(memory_bytes("512Mi"), Ok(512 << 20));
    assert_eq!(memory_bytes("0.5Ki"), Ok(512));
    assert_eq!(memory_bytes("5000m"), Ok(5));
    assert_eq!(memory_bytes("1e9"), Ok(1_000_000_000));
    assert_eq!(memory_bytes("7Ei"), Ok(7 << 60));
    assert_eq!(memory_bytes("9223372036854775807"), Ok(i64::MAX));
    assert_eq!(cpu_millicores("500m"), Ok(500));
    assert_eq!(cpu_millicores("1.5"), Ok(1500));
    assert_eq!(cpu_millicores("10m"), Ok(10));
    assert_eq!(cpu_millicores("1e-2"), Ok(10));
    assert_eq!(cpu_millicores("2k"), Ok(2_000_000));
    // Kubelet quantities keep their own, wider grammar.
    assert!(Quantity::new("100m").is_ok());
}

#[test]
fn limits_are_stored_as_written() {
    let patch = json!({"host-containers": {"a": {"memory-limit": "0.5Gi", "cpu-limit": "1.50"}}});
    let settings: Settings = serde_json::from_value(patch.clone()).unwrap();
    assert_eq!(serde_json::to_value(&settings).unwrap(), patch);
}

/// A container's containerd id (`host-<name>`, `bootstrap-<name>`) must fit containerd's
/// 76 characters: a longer name is refused at validation, naming the key, instead of
/// failing every start.
#[test]
fn container_names_fit_containerd_ids() {
    for (group, longest) in [("host-containers", 71), ("bootstrap-containers", 66)] {
        let fits = "a".repeat(longest);
        let ok = json!({ group: { &fits: { "source": "oci-archive:/x.tar" } } });
        assert!(settings_model::validate(&ok).is_ok(), "{group}: {longest}");
        let long = "a".repeat(longest + 1);
        let refused = json!({ group: { &long: { "source": "oci-archive:/x.tar" } } });
        let error = settings_model::validate(&refused).unwrap_err();
        assert_eq!(
            error.key(),
            Some(format!("settings.{group}.{long}").as_str()),
            "{error}"
        );
        assert!(
            error.to_string().contains(&format!("at most {longest}")),
            "{error}"
        );
    }
}
