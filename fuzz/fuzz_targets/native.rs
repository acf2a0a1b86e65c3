//! The native format (safetensors, the config in its metadata) on arbitrary bytes: the
//! header and its caps, the config (validated before anything is sized from it), the
//! tensor list against the config, the finite check, and the build of whatever loads. It
//! must return, never panic, and never allocate more than the input can describe.

#![no_main]

use std::path::Path;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use mfn_model::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let device = Device::Cpu;
    if let Ok(ckpt) = Checkpoint::from_native_bytes(data, Path::new("fuzz.safetensors"), &device) {
        let _ = ckpt.build(&device);
    }
});
