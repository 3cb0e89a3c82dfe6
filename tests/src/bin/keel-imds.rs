//! keel-imds: an EC2-like instance metadata service (IMDSv2) for Keel OS guests under
//! qemu (`packaging/image/run.sh`, the VM tests).
//!
//! ```text
//! keel-imds serve [--listen 127.0.0.1:0] [--user-data FILE] [--port-file FILE]
//! keel-imds relay 127.0.0.1:PORT
//! ```
//!
//! `serve` runs until killed and prints `listening on ADDR` (and writes the port to
//! --port-file). `relay` is what qemu's `guestfwd=tcp:169.254.169.254:80-cmd:…` runs per
//! guest connection: it joins its stdin/stdout to the server.

use std::path::PathBuf;

use keel_e2e::imds::{relay, Imds, Instance};

fn usage() -> ! {
    eprintln!(
        "usage: keel-imds serve [--listen ADDR] [--user-data FILE] [--port-file FILE]\n       keel-imds relay ADDR"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("relay") => {
            let [_, target] = args.as_slice() else {
                usage()
            };
            if let Err(e) = relay(target) {
                eprintln!("keel-imds relay {target}: {e}");
                std::process::exit(1);
            }
        }
        Some("serve") => {
            let mut listen = "127.0.0.1:0".to_owned();
            let mut user_data = None;
            let mut port_file: Option<PathBuf> = None;
            let mut rest = args[1..].iter();
            while let Some(flag) = rest.next() {
                let Some(value) = rest.next() else { usage() };
                match flag.as_str() {
                    "--listen" => listen = value.clone(),
                    "--user-data" => match std::fs::read(value) {
                        Ok(bytes) => user_data = Some(bytes),
                        Err(e) => {
                            eprintln!("keel-imds: cannot read {value}: {e}");
                            std::process::exit(1);
                        }
                    },
                    "--port-file" => port_file = Some(PathBuf::from(value)),
                    _ => usage(),
                }
            }
            let imds = match Imds::start_on(&listen, Instance::with_user_data(user_data)) {
                Ok(imds) => imds,
                Err(e) => {
                    eprintln!("keel-imds: cannot listen on {listen}: {e}");
                    std::process::exit(1);
                }
            };
            if let Some(path) = port_file {
                if let Err(e) = std::fs::write(&path, imds.addr.port().to_string()) {
                    eprintln!("keel-imds: cannot write {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
            println!("listening on {}", imds.addr);
            loop {
                std::thread::park();
            }
        }
        _ => usage(),
    }
}
