//! The JSON spec builder keeld used before the spec was typed, kept only to prove the
//! typed builder writes the same spec (`typed_spec_equals_the_json_spec`). Test-only.

use serde_json::{json, Map, Value};

use super::super::seccomp::legacy_json::default_profile;
use super::*;

/// Builds the spec for one container. Pure: reads no files.
pub fn build_json(req: &SpecRequest<'_>) -> Result<Value, SpecError> {
    if req.name.is_empty()
        || !req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(SpecError::InvalidName(req.name.to_owned()));
    }
    let cgroups_path = format!("/{}/{}", cgroup_parent(req.cgroup_parent)?, req.name);
    let persistent_dir = host_path("persistent directory", req.persistent_dir)?;
    let api_socket = host_path("API socket", req.api_socket)?;
    let apiclient = host_path("apiclient", req.apiclient)?;

    let args = process_args(req)?;
    let (uid, gid) = parse_user(req.image.user().as_deref())?;
    let cwd = match req.image.working_dir().as_deref().filter(|d| !d.is_empty()) {
        Some(dir) if !dir.starts_with('/') => {
            return Err(SpecError::RelativeWorkingDir(dir.to_owned()))
        }
        Some(dir) => dir.to_owned(),
        None => "/".to_owned(),
    };
    let image_env = req.image.env().as_deref().unwrap_or_default();
    let env = environment(image_env, req.environment)?;
    let caps = capabilities_json(req.tier, req.extra_capabilities, req.host_capabilities)?;
    let resources = resources(req)?;

    let mut namespaces = Vec::new();
    if req.tier == Tier::Host {
        namespaces.push(json!({ "type": "pid" }));
    }
    for kind in ["ipc", "uts", "mount"] {
        namespaces.push(json!({ "type": kind }));
    }

    let mut linux = Map::new();
    linux.insert("resources".into(), resources);
    linux.insert("cgroupsPath".into(), json!(cgroups_path));
    linux.insert("namespaces".into(), Value::Array(namespaces));
    match req.tier {
        Tier::Host => {
            linux.insert("seccomp".into(), default_profile(&caps, &[]));
        }
        Tier::Bootstrap => {
            let profile = default_profile(&caps, &BOOTSTRAP_EXTRA_SYSCALLS);
            linux.insert("seccomp".into(), profile);
        }
        Tier::Superpowered => {}
    }
    if req.tier != Tier::Superpowered {
        linux.insert("maskedPaths".into(), json!(MASKED_PATHS));
        linux.insert("readonlyPaths".into(), json!(READONLY_PATHS));
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": uid, "gid": gid },
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "inheritable": [],
                "permitted": caps,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": req.tier != Tier::Superpowered,
        },
        "root": { "path": "rootfs", "readonly": false },
        "mounts": mounts(req, persistent_dir, api_socket, apiclient),
        "linux": linux,
    }))
}

fn capabilities_json(tier: Tier, extra: &[String], host: u64) -> Result<Vec<String>, SpecError> {
    if let Some(unknown) = extra
        .iter()
        .find(|c| !ALL_CAPABILITIES.contains(&c.as_str()))
    {
        return Err(SpecError::UnknownCapability(unknown.clone()));
    }
    let mut caps: Vec<String> = Vec::new();
    let mut add = |cap: &str| {
        if !caps.iter().any(|c| c == cap) {
            caps.push(cap.to_owned());
        }
    };
    match tier {
        // "All" is what the host can grant: a capability outside the host's bounding
        // set (some hosts drop a few) would make runc refuse to start the container.
        Tier::Superpowered => ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| host & (1u64 << bit) != 0)
            .for_each(|(_, c)| add(c)),
        Tier::Host => {
            DEFAULT_CAPABILITIES.iter().for_each(|c| add(c));
            extra.iter().for_each(|c| add(c));
        }
        Tier::Bootstrap => {
            DEFAULT_CAPABILITIES.iter().for_each(|c| add(c));
            BOOTSTRAP_ADDED_CAPABILITIES.iter().for_each(|c| add(c));
            extra.iter().for_each(|c| add(c));
        }
    }
    Ok(caps)
}

fn resources(req: &SpecRequest<'_>) -> Result<Value, SpecError> {
    let mut resources = Map::new();
    let devices: Vec<Value> = if req.tier == Tier::Host {
        std::iter::once(json!({ "allow": false, "access": "rwm" }))
            .chain(DEFAULT_DEVICES.iter().map(|&(major, minor)| {
                let mut rule = json!({ "allow": true, "type": "c", "major": major });
                if let Some(minor) = minor {
                    rule["minor"] = json!(minor);
                }
                rule["access"] = json!("rwm");
                rule
            }))
            .collect()
    } else {
        vec![json!({ "allow": true, "access": "rwm" })]
    };
    resources.insert("devices".into(), Value::Array(devices));
    if let Some(limit) = req.memory_limit_bytes {
        if limit <= 0 {
            return Err(SpecError::InvalidMemoryLimit(limit));
        }
        resources.insert("memory".into(), json!({ "limit": limit }));
    }
    if let Some(millicores) = req.cpu_limit_millicores {
        let quota = millicores
            .checked_mul(CPU_PERIOD_US / 1000)
            .filter(|&quota| quota >= 1000)
            .and_then(|quota| i64::try_from(quota).ok())
            .ok_or(SpecError::InvalidCpuLimit(millicores))?;
        resources.insert(
            "cpu".into(),
            json!({ "quota": quota, "period": CPU_PERIOD_US }),
        );
    }
    Ok(Value::Object(resources))
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({
        "destination": destination,
        "type": kind,
        "source": source,
        "options": options,
    })
}

fn mounts(
    req: &SpecRequest<'_>,
    persistent_dir: &str,
    api_socket: &str,
    apiclient: &str,
) -> Vec<Value> {
    let all_devices = req.tier != Tier::Host;
    let sys_mode = if req.tier == Tier::Superpowered {
        "rw"
    } else {
        "ro"
    };
    let mut mounts = vec![mount(
        "/proc",
        "proc",
        "proc",
        &["nosuid", "noexec", "nodev"],
    )];
    if all_devices {
        mounts.push(mount("/dev", "bind", "/dev", &["rbind", "rslave"]));
    } else {
        mounts.push(mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ));
        mounts.push(mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ));
    }
    mounts.push(mount(
        "/dev/shm",
        "tmpfs",
        "shm",
        &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    ));
    mounts.push(mount(
        "/dev/mqueue",
        "mqueue",
        "mqueue",
        &["nosuid", "noexec", "nodev"],
    ));
    mounts.push(mount(
        "/sys",
        "sysfs",
        "sysfs",
        &["nosuid", "noexec", "nodev", sys_mode],
    ));
    mounts.push(mount(
        "/sys/fs/cgroup",
        "cgroup",
        "cgroup",
        &["nosuid", "noexec", "nodev", "relatime", sys_mode],
    ));
    mounts.push(mount(
        "/run",
        "tmpfs",
        "tmpfs",
        &["nosuid", "strictatime", "mode=755", "size=65536k"],
    ));
    for file in [HOST_HOSTS, HOST_RESOLV_CONF] {
        mounts.push(mount(file, "bind", file, &["bind", "ro", "rprivate"]));
    }

    let persistent_root = match req.tier {
        Tier::Host | Tier::Superpowered => HOST_CONTAINERS_DIR,
        Tier::Bootstrap => BOOTSTRAP_CONTAINERS_DIR,
    };
    let persistent_target = format!("{persistent_root}/{}", req.name);
    mounts.push(mount(
        &persistent_target,
        "bind",
        persistent_dir,
        &["rbind", "rw", "rprivate"],
    ));
    mounts.push(mount(
        API_SOCKET_MOUNT,
        "bind",
        api_socket,
        &["bind", "rw", "rprivate"],
    ));
    mounts.push(mount(
        APICLIENT_MOUNT,
        "bind",
        apiclient,
        &["bind", "ro", "rprivate"],
    ));

    if req.tier == Tier::Superpowered {
        // "ro" applies to the top mount only: file systems mounted below the host's / stay
        // writable (runc would need "rro"). No boundary is lost: the container holds every
        // capability and could remount anyway.
        mounts.push(mount(
            HOST_ROOTFS_MOUNT,
            "bind",
            "/",
            &["rbind", "ro", "rslave"],
        ));
        if req.mount_host_modules {
            mounts.push(mount(
                HOST_MODULES,
                "bind",
                HOST_MODULES,
                &["rbind", "ro", "rslave"],
            ));
        }
    }
    mounts
}
