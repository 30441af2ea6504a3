//! `safetensors::parse_header` on a whole file's bytes: length prefix, JSON header, layout checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ckpt::checkpoint::safetensors::parse_header(data);
});
