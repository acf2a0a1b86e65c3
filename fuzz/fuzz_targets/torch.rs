//! The PyTorch `state_dict` reader (zip and legacy layouts, its pickle interpreter, tensor
//! views over storages) on arbitrary bytes: it must return, never panic, and never
//! allocate more than the input can describe.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mfn_model::import::torch::read_state_dict_bytes(
        data,
        Path::new("fuzz.pt"),
        &candle_core::Device::Cpu,
    );
});
