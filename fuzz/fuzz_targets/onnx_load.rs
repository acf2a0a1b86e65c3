//! A whole ONNX load on arbitrary bytes: parsing, the graph matched against every preset,
//! the weights named, shaped and checked for finite values, and the build of whatever
//! loads. It must return, never panic, and never allocate more than the input can
//! describe. External data resolves against a folder that does not exist.

#![no_main]

use std::path::Path;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use mfn_model::import::onnx;
use mfn_model::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let device = Device::Cpu;
    let path = Path::new("fuzz-dir/fuzz.onnx");
    if let Ok((config, tensors)) = onnx::load_bytes(data, path, None, None, &device) {
        let ckpt = Checkpoint {
            config,
            tensors,
            metadata: Default::default(),
            source: path.to_path_buf(),
        };
        let _ = ckpt.build(&device);
    }
});
