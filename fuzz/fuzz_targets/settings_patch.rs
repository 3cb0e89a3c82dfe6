#![no_main]
//! Fuzz target `settings_patch`: see [`keel_fuzz::settings_patch`] for what it checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keel_fuzz::settings_patch(data));
