//! The MXNet `.params` (NDArray list) reader on arbitrary bytes: it must return, never
//! panic, and never allocate more than the input can describe.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mfn_model::import::mxnet::parse_params(data, Path::new("fuzz.params"));
});
