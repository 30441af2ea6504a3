//! `pickle::parse` alone, and the queries made of its result (state-dict lookup helpers).
#![no_main]

use ckpt::checkpoint::pickle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pk) = pickle::parse(data) {
        let _ = pk.describe(&pk.root);
        let _ = pk.depth_of(&pk.root);
        if let Some(d) = pk.dict(&pk.root) {
            for (k, v) in d {
                let _ = pk.describe(k);
                let _ = pk.tensor(v);
            }
        }
    }
});
