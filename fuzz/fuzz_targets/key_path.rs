#![no_main]
//! Fuzz target `key_path`: see [`keel_fuzz::key_path`] for what it checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keel_fuzz::key_path(data));
