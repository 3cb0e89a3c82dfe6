//! Builds a small OCI image archive from Debian's busybox-static, for the demo node.
//!
//! Usage: oci-image OUT.tar [--with BINARY]... -- COMMAND [ARG]...
//!
//! `--with` copies a host binary and the shared libraries it needs into the image (at
//! the same path), e.g. apiclient, so the bind-mounted `apiclient` runs inside.

use std::path::PathBuf;

use keel_e2e::image::ImageBuilder;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: oci-image OUT.tar [--with BINARY]... -- COMMAND [ARG]...";
    let Some(split) = args.iter().position(|a| a == "--") else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let (head, command) = (&args[..split], &args[split + 1..]);
    let Some((out, options)) = head.split_first() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    if command.is_empty() || options.len() % 2 != 0 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let mut image = ImageBuilder::busybox();
    for pair in options.chunks(2) {
        if pair[0] != "--with" {
            eprintln!("{usage}");
            std::process::exit(2);
        }
        let binary = PathBuf::from(&pair[1]);
        let inside = binary.display().to_string();
        image = image.host_binary_with_libs(&binary, &inside);
    }
    let argv: Vec<&str> = command.iter().map(String::as_str).collect();
    let info = image
        .cmd(&argv)
        .write_oci_archive(&PathBuf::from(out), "latest");
    println!("{out} {}", info.manifest_digest);
}
