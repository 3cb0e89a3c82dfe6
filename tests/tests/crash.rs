//! keeld is SIGKILLed at random moments during a stream of commits; after each restart
//! the store opens and every commit that was acknowledged is there.
//!
//! `KEEL_CRASH_ITERATIONS` sets the number of kills (default 20); `packaging/dev/crash-soak.sh`
//! runs hundreds. The kill moments come from a seeded RNG: the seed is printed at the
//! start (`crash: seed N`) and in every failure, and `KEEL_CRASH_SEED=N` replays it. (A
//! replay repeats the same delays; the kill still lands wherever the commits have got to
//! by then, so a timing-dependent failure may need a few runs.)

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_e2e::{try_raw_request, Keeld, KeeldOptions};
use rand::{Rng, SeedableRng};

#[test]
fn acknowledged_commits_survive_sigkill() {
    let iterations: u64 = std::env::var("KEEL_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut keeld = Keeld::start_with(KeeldOptions {
        history: 10_000,
        ..Default::default()
    });
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut next = 0u64;
    let seed = crash_seed();
    // Printed first so that a failure (whose output the harness shows) carries it.
    println!("crash: seed {seed} (KEEL_CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut in_flight_committed = 0;

    for iteration in 0..iterations {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = keeld.socket.clone();
        let first = next;
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = first;
                while !stop.load(Ordering::Relaxed) {
                    let tx = format!("crash-{n}");
                    let body = format!("{{\"motd\":\"{n}\"}}");
                    let patched = try_raw_request(
                        &socket,
                        "PATCH",
                        &format!("/settings?tx={tx}"),
                        Some(body.as_bytes()),
                    );
                    if !matches!(patched, Ok(ref r) if r.status == 204) {
                        break;
                    }
                    match try_raw_request(&socket, "POST", &format!("/tx/commit?tx={tx}"), None) {
                        Ok(r) if r.status == 200 => acked.push(n),
                        Ok(r) => panic!("commit {n} answered {}: {}", r.status, r.text()),
                        Err(_) => {
                            n += 1;
                            break;
                        }
                    }
                    n += 1;
                }
                (acked, n)
            })
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..120)));
        keeld.kill();
        stop.store(true, Ordering::Relaxed);
        let (acked_now, attempted_to) = writer.join().unwrap();
        acked.extend(acked_now.iter().copied());
        next = attempted_to;

        keeld.spawn();
        let live = keeld.raw("GET", "/settings", None).json();
        let motd: u64 = live["motd"].as_str().map_or(0, |m| m.parse().unwrap());
        if let Some(&last) = acked.iter().next_back() {
            assert!(
                motd >= last,
                "seed {seed}, iteration {iteration}: live motd {motd} is older than acknowledged {last}"
            );
        }
        assert!(
            motd < next.max(1),
            "seed {seed}, iteration {iteration}: live motd {motd} was never sent"
        );
        if acked.last() != Some(&motd) {
            in_flight_committed += 1;
        }
        let history = keeld.raw("GET", "/history", None).json();
        let committed: BTreeSet<u64> = history
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["tx"].as_str()?.strip_prefix("crash-")?.parse().ok())
            .collect();
        let lost: Vec<_> = acked.difference(&committed).collect();
        assert!(
            lost.is_empty(),
            "seed {seed}, iteration {iteration}: acknowledged commits lost: {lost:?}"
        );
        let generations: Vec<u64> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["generation"].as_u64().unwrap())
            .collect();
        assert!(
            generations.windows(2).all(|w| w[0] == w[1] + 1),
            "seed {seed}, iteration {iteration}: generations not contiguous"
        );
    }
    assert!(
        acked.len() as u64 >= iterations,
        "seed {seed}: too few commits were acknowledged to mean anything: {}",
        acked.len()
    );
    println!(
        "crash: seed {seed}, {iterations} SIGKILLs survived, {} acknowledged commits all present, {in_flight_committed} unacknowledged in-flight commits found committed",
        acked.len()
    );
}

/// `KEEL_CRASH_SEED` if set (a failure prints the one it used), else a fresh random seed.
fn crash_seed() -> u64 {
    match std::env::var("KEEL_CRASH_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("KEEL_CRASH_SEED={text:?} is not an unsigned integer")),
        Err(_) => rand::random(),
    }
}

/// A flipped byte in the newest committed record (an append to `generations.log`): keeld
/// refuses to start, naming the file and the flag; with `--accept-state-loss` it
/// continues from what is intact, and the history says so.
#[test]
fn a_damaged_newest_record_stops_keeld_until_the_loss_is_accepted() {
    let mut keeld = Keeld::start();
    for n in 0..3 {
        let body = format!("{{\"motd\":\"damage-{n}\"}}");
        assert_eq!(
            keeld
                .raw("PATCH", "/settings?tx=d", Some(body.as_bytes()))
                .status,
            204
        );
        assert_eq!(keeld.raw("POST", "/tx/commit?tx=d", None).status, 200);
    }
    let live = keeld.raw("GET", "/history?limit=1", None).json()[0]["generation"]
        .as_u64()
        .unwrap();
    keeld.stop();

    // The header sector of the newest record: magic, and index 0 in its tag (sequence
    // number at byte 496 of the sector, index at 504).
    let path = keeld.state_dir.join("generations.log");
    let mut bytes = std::fs::read(&path).unwrap();
    let newest = bytes
        .chunks(512)
        .enumerate()
        .filter(|(_, s)| s.starts_with(b"KEELLOG1") && s[504..508] == [0, 0, 0, 0])
        .max_by_key(|(_, s)| u64::from_le_bytes(s[496..504].try_into().unwrap()))
        .map(|(i, _)| i)
        .expect("a record in the log");
    bytes[newest * 512 + 20] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| keeld.spawn()));
    assert!(refused.is_err(), "keeld started on a damaged slot");
    keeld.kill(); // reaps the exited process
    let log = keeld.log();
    assert!(
        log.contains(&path.display().to_string()) && log.contains("--accept-state-loss"),
        "{log}"
    );

    keeld
        .options
        .extra_args
        .push("--accept-state-loss".to_owned());
    keeld.spawn();
    let history = keeld.raw("GET", "/history?limit=2", None).json();
    assert_eq!(history[0]["tx"], "accept-state-loss", "{history:#}");
    assert!(
        history[0]["generation"].as_u64().unwrap() > live,
        "numbered above every generation that may have been lost: {history:#}"
    );
    assert_eq!(
        history[1]["generation"].as_u64().unwrap(),
        live - 1,
        "the records before the damaged one are kept: {history:#}"
    );
    assert_eq!(
        keeld.raw("GET", "/settings", None).json()["motd"],
        "damage-1"
    );
    keeld.stop();
    // Recovered once and for all: the flag is not needed again.
    keeld.options.extra_args.clear();
    keeld.spawn();
}
