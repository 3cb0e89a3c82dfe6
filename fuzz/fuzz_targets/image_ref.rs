#![no_main]
//! Fuzz target `image_ref`: see [`keel_fuzz::image_ref`] for what it checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keel_fuzz::image_ref(data));
