//! `sharded::parse_index` on index JSON text, with shards resolved against the fixture's folder so
//! that seeds from the real index reach the end of the parser.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/tiny/sharded_epoch_5"
    ));
    let _ = ckpt::checkpoint::sharded::parse_index(text, dir);
});
