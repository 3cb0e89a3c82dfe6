#![no_main]
//! Fuzz target `user_data`: see [`keel_fuzz::user_data`] for what it checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keel_fuzz::user_data(data));
