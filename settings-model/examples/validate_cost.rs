//! Prints what validating, diffing and serializing a realistic settings model costs.
use serde_json::json;
fn main() {
    let v = json!({"motd":"x","kernel":{"sysctl":{"a.b":"1","c.d":"2","e.f":"3","g.h":"4"}},"host-containers":{"admin":{"enabled":true,"source":"public.ecr.aws/bottlerocket/bottlerocket-admin:v0.11.13","superpowered":true},"control":{"enabled":true,"source":"public.ecr.aws/bottlerocket/bottlerocket-control:v0.7.17"}},"ntp":{"time-servers":["a.example","b.example"]},"dns":{"name-servers":["1.1.1.1"],"search-list":["example.com"]},"network":{"hostname":"node-1"},"kubernetes":{"node-labels":{"a":"b","c":"d","e":"f"}}});
    let n = 20000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(settings_model::validate(&v).ok());
    }
    println!("validate (22 keys)    {:?}", t.elapsed() / n);
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(settings_model::validate_patch(&json!({"motd":"1"})).ok());
    }
    println!("validate_patch (1 key) {:?}", t.elapsed() / n);
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(settings_model::patch::changed_keys(&v, &v));
    }
    println!("changed_keys          {:?}", t.elapsed() / n);
    let t = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(serde_json::to_vec(&v).ok());
    }
    println!("serialize             {:?}", t.elapsed() / n);
}
