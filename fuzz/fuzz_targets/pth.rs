//! A torch.save file: `pth::read` on zip bytes (zip, data.pkl, state-dict choice, record bounds),
//! and `pickle::parse` on the same bytes, so that a bare data.pkl seed also exercises the pickle
//! machine through this target.
#![no_main]

use ckpt::checkpoint::{pickle, pth};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if pth::is_zip(data) {
        let _ = pth::read(data, None);
        let _ = pth::read(data, Some("state_dict"));
    } else {
        let _ = pickle::parse(data);
    }
});
