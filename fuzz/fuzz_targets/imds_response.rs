#![no_main]
//! Fuzz target `imds_response`: see [`keel_fuzz::imds_response`] for what it checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keel_fuzz::imds_response(data));
